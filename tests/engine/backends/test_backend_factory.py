"""`make_runner` and `--backend`: auto selection, sharing, torch.compile, and `python -m engine.build`."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.backends import (
    BackendChoice,
    EagerRunner,
    choose_backend,
    make_runner,
    resolve_backend,
    resolve_backend_choice,
)
from engine.backends.compiled import TorchCompileRunner
from engine.backends.factory import Availability, unavailable_reason
from engine.backends.onnxruntime import onnxruntime_available
from engine.backends.tensorrt import tensorrt_unavailable_reason
from engine.build import main as build_main
from engine.build import parse_args as build_args
from engine.flags import configs_from


def test_auto_picks_the_best_backend_that_runs_here_and_logs_it(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="engine.backends.factory"):
        chosen = resolve_backend("auto", tiny_models)
    if tensorrt_unavailable_reason() is None and next(tiny_models.unet.parameters()).is_cuda:
        assert chosen == "tensorrt"
    else:
        assert chosen == ("onnxruntime" if onnxruntime_available() else "eager")
    assert f"--backend auto chose {chosen}" in caplog.text


def test_auto_never_picks_a_cpu_only_onnxruntime_for_cuda_models(tiny_models, monkeypatch, caplog):
    onnxruntime = pytest.importorskip("onnxruntime")
    from engine.backends import factory, tensorrt

    monkeypatch.setattr(factory, "_models_device", lambda models: torch.device("cuda"))
    monkeypatch.setattr(tensorrt, "tensorrt_unavailable_reason", lambda: "tensorrt is not installed")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="engine.backends.factory"):
        assert resolve_backend("auto", tiny_models) == "eager"
    assert "onnxruntime for cuda" in caplog.text
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_backend("auto", tiny_models) == "onnxruntime"


def test_auto_is_the_default():
    assert LoadConfig().backend == "auto"


def test_eager_by_name_is_shared(tiny_models):
    load, config = LoadConfig(model="tiny", backend="eager"), StreamConfig(width=64, height=64)
    engine = StreamEngine(Engine.prepare(tiny_models, load), config)
    assert isinstance(engine.runner, EagerRunner)
    assert make_runner(tiny_models, load) is engine.runner
    assert make_runner(tiny_models, load, config) is engine.runner


@pytest.mark.slow
def test_torch_compile_runner_matches_eager(tiny_models, tiny_engine):
    # The Inductor backend compiles for minutes on two CPU cores; TorchDynamo's `eager` backend
    # exercises the same capture of the UNet, its K/V cache kwargs and the VAE wrappers.
    engine = StreamEngine(tiny_engine, StreamConfig(width=64, height=64, cfg_type="none"))
    conditioning = engine._prompt.layouts[("none", 2)]
    runner, eager = TorchCompileRunner(tiny_models, compile_backend="eager"), EagerRunner(tiny_models)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([699, 299])
    assert torch.allclose(runner.unet(latents, timesteps, conditioning),
                          eager.unet(latents, timesteps, conditioning), atol=1e-5)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.allclose(runner.encode(images), eager.encode(images), atol=1e-5)
    assert torch.allclose(runner.decode(latents[:1]), eager.decode(latents[:1]), atol=1e-5)


@pytest.mark.slow
def test_build_cli_prebuilds_then_reuses_the_cache(tmp_path, capsys):
    argv = ["--width", "64", "--height", "64", "--cfg-type", "none", "--backend", "onnxruntime",
            "--exporter", "torchscript", "--cache-dir", str(tmp_path)]
    assert build_main(argv) == 0
    first = capsys.readouterr().out
    files = sorted(tmp_path.glob("*.onnx"))
    assert [path.name.split("-")[0] for path in files] == ["unet", "vae_decoder", "vae_encoder"]
    assert "onnxruntime: 3 graphs ready" in first
    mtimes = {path: path.stat().st_mtime_ns for path in files}
    assert build_main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in files} == mtimes


def test_build_cli_takes_the_shared_engine_flags():
    """`python -m engine.build` speaks the server's flag vocabulary (`engine.flags`): `--t-index-list 32,45`,
    `--vae`, `--no-kv-cache`; its backend defaults to `auto`."""
    load, stream, _ = configs_from(vars(build_args(["--t-index-list", "20,40", "--vae", "full", "--no-kv-cache",
                                                   "--cfg-type", "full", "--frame-buffer-size", "2"])))
    assert (load.vae, load.kv_cache, load.backend) == ("full", False, "auto")
    assert (stream.t_index_list, stream.cfg_type, stream.frame_buffer_size) == ((20, 40), "full", 2)
    load, stream, _ = configs_from(vars(build_args([])))
    assert (load.vae, load.kv_cache, stream.t_index_list) == ("tiny", True, StreamConfig().t_index_list)
    with pytest.raises(SystemExit):
        build_args(["--t-index-list", "32", "45"])  # the old space-separated form


# ---------------------------------------------------------------------------------------------- the pure decision

CPU_ORT = ("CPUExecutionProvider",)
CUDA_ORT = ("CUDAExecutionProvider", "CPUExecutionProvider")
NO_TRT = "the tensorrt backend needs the `tensorrt` (10+) and `polygraphy` packages: pip install '.[trt]'"


@pytest.mark.parametrize("available, backend, needle", [
    (Availability("cuda", None, CUDA_ORT, dtype="float16"), "tensorrt", "CUDA and TensorRT"),
    (Availability("cuda", NO_TRT, CUDA_ORT, dtype="float16"), "onnxruntime", "pip install '.[trt]'"),
    (Availability("cuda", NO_TRT, CPU_ORT, dtype="float16"), "eager", "onnxruntime-gpu"),
    (Availability("cpu", "torch sees no CUDA GPU", CPU_ORT), "onnxruntime", "no CUDA GPU"),
    (Availability("cpu", "torch sees no CUDA GPU", None, "ModuleNotFoundError: onnxruntime"), "eager",
     "pip install -e '.[onnx]'"),
    (Availability("cpu", "torch sees no CUDA GPU", CPU_ORT, dtype="bfloat16"), "eager", "bfloat16"),
    # TensorRT installed and CUDA present, but the models were put on the CPU.
    (Availability("cpu", None, CPU_ORT), "onnxruntime", "--device cuda"),
])
def test_auto_is_a_pure_function_of_what_is_available(available, backend, needle):
    choice = choose_backend("auto", available)
    assert choice.backend == backend
    assert needle in choice.reason


def test_a_named_backend_is_taken_as_asked_and_a_wrong_name_refused():
    assert choose_backend("compile", None) == BackendChoice("compile", "asked for by name")
    with pytest.raises(ValueError, match="must be one of"):
        choose_backend("fastest", None)


@pytest.mark.parametrize("backend, available, needle", [
    ("eager", Availability("cpu", "no CUDA", None), None),
    ("onnxruntime", Availability("cpu", "no CUDA", None), "pip install -e '.[onnx]'"),
    ("onnxruntime", Availability("cuda", None, CPU_ORT), "onnxruntime-gpu"),
    ("onnxruntime", Availability("cuda", None, CUDA_ORT), None),
    ("tensorrt", Availability("cpu", NO_TRT, CPU_ORT), "pip install '.[trt]'"),
    ("tensorrt", Availability("cuda", None, None, dtype="bfloat16"), "Resize on bfloat16"),
    ("tensorrt", Availability("cuda", None, None, dtype="float16"), None),
])
def test_each_missing_piece_names_its_fix(backend, available, needle):
    reason = unavailable_reason(backend, available)
    assert reason is None if needle is None else needle in reason


def test_resolve_backend_choice_returns_the_reason_it_logs(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="engine.backends.factory"):
        choice = resolve_backend_choice("auto", tiny_models)
    assert choice.backend == resolve_backend("auto", tiny_models)
    assert f"--backend auto chose {choice.backend}: {choice.reason}" in caplog.text
    assert resolve_backend_choice("eager", tiny_models) == BackendChoice("eager", "asked for by name")

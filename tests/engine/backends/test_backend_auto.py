"""`--backend auto`: the fastest backend measured here, cached beside the engine cache (issue 18 item 0).

The choice is tested on fake measurements and fake clocks (no wall-clock assertion anywhere); one test runs the
real calibration of the tiny model at 32² end to end and checks only what it decided and recorded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging

import pytest
import torch

from engine import Engine, LoadConfig, StreamConfig
from engine.backends import auto
from engine.backends.auto import (
    VERDICTS_FILE,
    Measurement,
    calibration_candidates,
    calibration_key,
    measure_backend,
    read_verdict,
    resolve_auto,
    write_verdict,
)
from engine.backends.base import RunnerCapabilities
from engine.backends.factory import Availability, choose_backend, unavailable_reason

CPU = Availability("cpu", "no CUDA", ("CPUExecutionProvider",))
STREAM = StreamConfig(width=32, height=32, similarity_filter=False)


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def test_measured_speeds_choose_the_fastest_backend_that_can_run():
    measured = Availability("cpu", "no CUDA", ("CPUExecutionProvider",),
                            measured_fps=(("eager", 30.0), ("onnxruntime", 45.0), ("compile", 50.0)))
    assert choose_backend("auto", measured).backend == "compile"
    no_compiler = Availability("cpu", "no CUDA", ("CPUExecutionProvider",), compile_reason="no C++ compiler",
                               measured_fps=measured.measured_fps)
    choice = choose_backend("auto", no_compiler)
    assert choice.backend == "onnxruntime" and "45.0 fps" in choice.reason


def test_tensorrt_stays_the_choice_where_it_runs_whatever_was_measured():
    cuda = Availability("cuda", None, ("CUDAExecutionProvider", "CPUExecutionProvider"), dtype="float16",
                        measured_fps=(("eager", 300.0),))
    assert choose_backend("auto", cuda).backend == "tensorrt"


def test_without_measurements_the_rule_is_unchanged():
    assert choose_backend("auto", CPU).backend == "onnxruntime"
    assert choose_backend("auto", Availability("cpu", "no CUDA", None, "ImportError")).backend == "eager"


def test_candidates_are_what_can_run_here_and_compile_only_with_a_budget():
    assert calibration_candidates(CPU, 0) == ("eager", "onnxruntime")
    assert calibration_candidates(CPU, 600) == ("eager", "onnxruntime", "compile")
    bf16 = Availability("cpu", "no CUDA", ("CPUExecutionProvider",), dtype="bfloat16", compile_reason="no g++")
    assert calibration_candidates(bf16, 600) == ("eager",)


def test_a_compile_budget_must_not_be_negative():
    with pytest.raises(ValueError, match="auto_compile_budget_s"):
        LoadConfig(auto_compile_budget_s=-1)


def test_memory_modes_accept_auto_and_resolve_it_to_eager(tiny_models, tmp_path):
    load = LoadConfig(model="tiny", memory="slice")
    resolved, choice = resolve_auto(tiny_models, load, STREAM, tmp_path, measure=_never)
    assert resolved.backend == "eager" and "memory mode" in choice.reason


def _never(*args, **kwargs):
    raise AssertionError("nothing should be measured")


class FakeMeasure:
    """Returns the given fps per backend and counts its calls."""

    def __init__(self, fps: dict[str, float]):
        self.fps, self.calls = fps, []

    def __call__(self, backend, models, load, stream, cache_dir=None):
        self.calls.append((backend, stream.width))
        return Measurement(backend, self.fps[backend], 0.5)


def test_auto_takes_the_fastest_measured_caches_the_verdict_and_logs_its_figures(tiny_models, tmp_path, caplog,
                                                                                monkeypatch):
    monkeypatch.setattr(auto, "probe_availability", lambda device, dtype: CPU)
    measure = FakeMeasure({"eager": 40.0, "onnxruntime": 20.0})
    load = LoadConfig(model="tiny")
    with caplog.at_level(logging.INFO, logger="engine.backends.auto"):
        resolved, choice = resolve_auto(tiny_models, load, STREAM, tmp_path, measure=measure)
    assert resolved.backend == "eager" and resolved.replace(backend="auto") == load
    assert measure.calls == [("eager", 32), ("onnxruntime", 32)]
    assert "--backend auto chose eager" in caplog.text and "eager 40.0 fps" in caplog.text
    assert "onnxruntime 20.0 fps" in choice.reason
    saved = json.loads((tmp_path / VERDICTS_FILE).read_text())
    (entry,) = saved.values()
    assert entry["chosen"] == "eager" and entry["key"]["width"] == 32

    # The same key again: read from the file, nothing measured.
    resolved, _ = resolve_auto(tiny_models, load, STREAM, tmp_path, measure=_never)
    assert resolved.backend == "eager"
    # Another size is another key.
    resolve_auto(tiny_models, load, STREAM.replace(width=64), tmp_path, measure=measure)
    assert measure.calls[-1] == ("onnxruntime", 64) and len(json.loads((tmp_path / VERDICTS_FILE).read_text())) == 2


def test_the_verdict_key_holds_what_changes_the_speeds(tiny_models, tmp_path):
    load = LoadConfig(model="tiny")
    key = calibration_key(tiny_models, load, STREAM, threads=2)
    assert (key.width, key.height, key.cfg_type, key.unet_batch, key.dtype, key.device) == \
        (32, 32, "self", 2, "float32", "cpu")
    assert key.torch == torch.__version__ and key.threads == 2
    others = [calibration_key(tiny_models, load, STREAM, threads=1),
              calibration_key(tiny_models, load, STREAM.replace(cfg_type="full"), threads=2),
              calibration_key(tiny_models, load.replace(kv_cache=False), STREAM, threads=2),
              calibration_key(tiny_models, load.replace(auto_compile_budget_s=60), STREAM, threads=2)]
    assert len({key.digest(), *(other.digest() for other in others)}) == 5
    measurements = (Measurement("eager", 10.0, 0.1), Measurement("compile", None, 900.0, "too slow"))
    write_verdict(tmp_path, key, measurements, "eager")
    assert read_verdict(tmp_path, key) == measurements
    assert read_verdict(tmp_path, others[0]) is None
    (tmp_path / VERDICTS_FILE).write_text("not json")
    assert read_verdict(tmp_path, key) is None  # an unreadable file measures again


class FakeRunner:
    capabilities = RunnerCapabilities("fake")

    def __init__(self):
        self.calls = []

    def prepare(self, config, kv_cache):
        pass

    def encode(self, images):
        self.calls.append("encode")
        return images

    def unet(self, latents, timesteps, conditioning):
        self.calls.append("unet")
        return latents

    def decode(self, latents):
        self.calls.append("decode")
        return latents


def test_a_compile_over_its_budget_is_dropped_with_its_progress_logged(tiny_models, monkeypatch, caplog):
    monkeypatch.setattr(auto, "new_runner", lambda *args: FakeRunner())
    ticks = itertools.count(0, 10.0)  # every clock reading is 10 s after the previous one
    load = LoadConfig(model="tiny", auto_compile_budget_s=30)
    with caplog.at_level(logging.INFO, logger="engine.backends.auto"):
        measurement = measure_backend("compile", tiny_models, load, STREAM, clock=lambda: next(ticks))
    assert measurement.fps is None and "over auto_compile_budget_s=30" in measurement.dropped
    for network in ("VAE encoder", "UNet", "VAE decoder"):
        assert f"first {network} call on compile took 10.0 s" in caplog.text
    assert "torch.compile ready in" in caplog.text


def test_the_compile_runner_logs_each_graph_it_compiles_and_the_total(tiny_models, monkeypatch, caplog):
    from engine.backends.compiled import TorchCompileRunner

    monkeypatch.setattr(torch, "compile", lambda module, **options: module)  # the logging, not Inductor
    runner = TorchCompileRunner(tiny_models)
    images = torch.zeros(1, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="engine.backends.compiled"):
        latents = runner.encode(images)
        runner.decode(latents)
        runner.encode(images)  # the same shape again: compiled already, nothing logged
        runner.encode(torch.zeros(1, 3, 64, 64))
    assert caplog.text.count("compiling the VAE encoder") == 2 and caplog.text.count("compiling the VAE decoder") == 1
    assert "compiled the VAE decoder in" in caplog.text and "(3 graph(s)," in caplog.text
    assert len(runner._compiled) == 3


def test_a_skip_policy_or_an_attention_bank_resolves_auto_to_eager(tiny_models, tmp_path):
    for stream in (STREAM.replace(skip_policy="rehash"), STREAM.replace(temporal="bank")):
        resolved, choice = resolve_auto(tiny_models, LoadConfig(model="tiny"), stream, tmp_path, measure=_never)
        assert resolved.backend == "eager" and "eager UNet" in choice.reason


def test_a_measurement_is_the_median_of_its_rounds_and_a_failure_drops_the_backend(tiny_models, monkeypatch):
    runner = FakeRunner()
    monkeypatch.setattr(auto, "new_runner", lambda *args: runner)
    ticks = itertools.count(0, 0.01)
    measurement = measure_backend("eager", tiny_models, LoadConfig(model="tiny"), STREAM, rounds=3,
                                  clock=lambda: next(ticks))
    assert measurement.dropped is None and measurement.fps == pytest.approx(100.0)
    assert runner.calls[:3] == ["encode", "unet", "decode"] and len(runner.calls) == 3 * (1 + auto.WARMUP_ROUNDS + 3)

    def broken(*args):
        raise RuntimeError("no session")

    monkeypatch.setattr(auto, "new_runner", broken)
    failed = measure_backend("onnxruntime", tiny_models, LoadConfig(model="tiny"), STREAM)
    assert failed.fps is None and "no session" in failed.dropped


@pytest.mark.slow
def test_engine_prepare_resolves_auto_by_measuring_once(tiny_models, onnx_cache_dir, caplog):
    """The real thing on the tiny model at 32²: ONNX Runtime is exported and timed against eager."""
    with caplog.at_level(logging.INFO, logger="engine.backends.auto"):
        engine = Engine.prepare(tiny_models, LoadConfig(model="tiny"), STREAM)
    assert engine.config.backend in ("eager", "onnxruntime")
    entries = json.loads((onnx_cache_dir / VERDICTS_FILE).read_text())
    assert any(entry["chosen"] == engine.config.backend for entry in entries.values())
    assert "timing eager, onnxruntime on 32x32 self" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.backends.auto"):
        again = Engine.prepare(tiny_models, LoadConfig(model="tiny"), STREAM)
    assert again.config.backend == engine.config.backend and "measured before" in caplog.text


def test_bfloat16_models_never_get_tensorrt_and_are_told_why():
    bf16 = Availability("cuda", None, ("CPUExecutionProvider",), dtype="bfloat16")
    reason = unavailable_reason("tensorrt", bf16)
    assert "Resize on bfloat16" in reason and "--dtype float16" in reason
    assert choose_backend("auto", bf16).backend != "tensorrt"
    assert unavailable_reason("tensorrt", dataclasses.replace(bf16, dtype="float16")) is None


def test_a_tensorrt_that_fails_to_build_falls_back_and_says_why(tiny_models, monkeypatch, caplog):
    """`auto` picks TensorRT unmeasured wherever it imports; a build that then fails (here: TensorRT is not
    installed, as on this machine) must cost the start nothing but the fallback."""
    cuda_claimed = Availability("cuda", None, None, compile_reason="no compiler here")
    monkeypatch.setattr(auto, "probe_availability", lambda device, dtype: cuda_claimed)
    with caplog.at_level(logging.INFO):
        engine = Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="auto"))
    assert engine.config.backend == "eager"
    assert "--backend auto: tensorrt cannot serve, its engines failed to build here" in caplog.text
    assert "falling back to the next backend" in caplog.text
    assert "--backend auto chose eager" in caplog.text

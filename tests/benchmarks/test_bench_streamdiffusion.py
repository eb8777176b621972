"""`python -m benchmarks.streamdiffusion`: its configurations, ratios and table, the message when StreamDiffusion is
not installed (it is not, in the project's environment), and the whole run on a stand-in StreamDiffusion class."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from benchmarks import streamdiffusion as bench
from benchmarks.streamdiffusion import CONFIGURATIONS, main, ratio_summary

pytestmark = pytest.mark.slow


def test_the_four_configurations_of_the_issue():
    assert {item.name: (item.t_index_list, item.cfg_type) for item in CONFIGURATIONS} == {
        "rcfg_self_2step": ((32, 45), "self"), "one_step": ((32,), "self"),
        "four_step": ((0, 16, 32, 45), "self"), "full_cfg": ((32, 45), "full")}
    config = CONFIGURATIONS[0].stream_config(256)
    assert (config.width, config.guidance_scale, config.similarity_filter, config.seed) == (256, 1.2, False, 2)


def test_ratios_are_per_round_with_their_median_and_minimum():
    assert ratio_summary([30.0, 40.0, 45.0], [20.0, 20.0, 30.0]) == {"rounds": [1.5, 2.0, 1.5], "median": 1.5,
                                                                      "min": 1.5}


def test_without_streamdiffusion_it_names_the_setup(monkeypatch):
    monkeypatch.setitem(sys.modules, "streamdiffusion", None)  # an import of it raises ImportError
    with pytest.raises(SystemExit, match="Against StreamDiffusion 0.1.1"):
        main(["--frames", "1"])


class StandIn:
    """StreamDiffusion's interface as the benchmark uses it, doing almost nothing."""

    instances: list = []

    def __init__(self, pipe, t_index_list, torch_dtype, width, height, cfg_type):
        self.pipe, self.t_index_list, self.cfg_type = pipe, t_index_list, cfg_type
        self.height, self.width, self.device, self.dtype = height, width, torch.device("cpu"), torch_dtype
        self.image_processor = types.SimpleNamespace(preprocess=lambda image, height, width: image * 2 - 1)
        self.prepared = None
        self.frames = 0
        StandIn.instances.append(self)

    def prepare(self, prompt, negative_prompt, num_inference_steps, guidance_scale, delta, generator, seed):
        self.prepared = (prompt, negative_prompt, num_inference_steps, guidance_scale, seed)

    def encode_image(self, x):
        self.threads = torch.get_num_threads()
        return x

    def predict_x0_batch(self, latents):
        self.frames += 1
        return latents

    def decode_image(self, latents):
        return latents


def test_a_whole_run_interleaves_both_and_reports_threads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "streamdiffusion", types.SimpleNamespace(StreamDiffusion=StandIn,
                                                                             __version__="stand-in"))
    StandIn.instances.clear()
    torch.set_num_threads(2)
    main(["--model", "tiny", "--size", "32", "--frames", "2", "--warmup", "1", "--rounds", "2", "--backend", "eager",
          "--configurations", "one_step,full_cfg", "--json", str(tmp_path / "out.json")])
    results = json.loads((tmp_path / "out.json").read_text())
    assert list(results["configurations"]) == ["one_step", "full_cfg"]
    for row in results["configurations"].values():
        assert row["ours_backend"] == "eager" and len(row["fps"]["ours"]["rounds"]) == 2
        assert row["threads"] == {"streamdiffusion_torch": 2, "ours_torch": 2, "ours_onnxruntime_intra_op": None}
        assert set(row["ours_vs_streamdiffusion"]) == {"rounds", "median", "min"}
    assert [stand_in.frames for stand_in in StandIn.instances] == [1 + 2 + 2] * 2  # warm-up, then two rounds
    assert StandIn.instances[1].cfg_type == "full" and StandIn.instances[1].prepared[3] == 1.2
    assert type(StandIn.instances[0].pipe).__name__ == "StableDiffusionPipeline"
    assert all(stand_in.threads == 2 for stand_in in StandIn.instances)
    assert "one_step" in capsys.readouterr().out


def test_streamdiffusion_frame_is_its_call_without_cuda_timing():
    stand_in = StandIn(None, [32], torch.float32, 8, 8, "self")
    output = bench.streamdiffusion_frame(stand_in, torch.ones(3, 8, 8))
    assert output.shape == (1, 3, 8, 8) and torch.equal(output, torch.ones(1, 3, 8, 8))

"""`python -m benchmarks.temporal`: methods found by trying, the reference blend, the WebSocket reader, the
`counts` rule, and the command end to end (in process and through a server) on the tiny model."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from benchmarks import temporal as bench
from benchmarks.temporal_clips import make_clip
from benchmarks.temporal_metrics import clip_motion, warp_error
from engine.codec import decode_image, encode_jpeg

pytestmark = pytest.mark.slow

#: The contract's keys of every row; `cut_frames` on the cut clip only.
ROW_KEYS = {"warp_error", "warp_error_input", "consecutive_l1", "detail", "ref_l1", "fps_ratio"}


def test_off_is_always_a_method_and_only_accepted_values_are_offered(tiny_engine):
    methods = bench.engine_methods(tiny_engine, "tiny", 64, 64, ("off", "feedback", "no-such-method"))
    assert "no-such-method" not in methods
    # `off` is `{}` on an engine without the parameter; every other method names itself.
    assert methods.pop("off") in ({}, {"temporal": "off"})
    assert all(params == {"temporal": name} for name, params in methods.items())
    for params in methods.values():
        bench.make_stream(tiny_engine, "tiny", 64, 64, **params)


def test_the_adapter_refuses_unknown_parameters(tiny_engine):
    with pytest.raises(ValueError):
        bench.make_stream(tiny_engine, "tiny", 64, 64, no_such_parameter=1)


def test_blend_at_zero_weight_changes_nothing_and_the_first_frame_passes():
    clip = make_clip("pan_2px", 3, 64, 64).frames
    outputs = [np.roll(frame, 5, axis=0) for frame in clip]
    blend = bench.FlowBlend(0.0)
    assert all((blend(frame, output) == output).all() for frame, output in zip(clip, outputs, strict=True))
    assert (bench.FlowBlend(0.5)(clip[0], outputs[0]) == outputs[0]).all()


def test_blend_steadies_flicker_along_the_input_motion():
    inputs = make_clip("pan_2px", 8, 128, 128).frames
    rng = np.random.default_rng(0)
    # Outputs that follow the input but flicker: fresh noise of 8 levels on every frame.
    flicker = [np.clip(frame + rng.normal(0, 8, frame.shape), 0, 255).astype(np.uint8) for frame in inputs]
    blend = bench.FlowBlend(0.5)
    blended = [blend(frame, output) for frame, output in zip(inputs, flicker, strict=True)]
    motion = clip_motion(inputs)
    # A recursive blend at a = 0.5 keeps a third of the noise's variance: its flicker falls by about 0.58x.
    assert warp_error(blended, motion) < 0.75 * warp_error(flicker, motion)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        bench.FlowBlend(1.0)


class FakeSocket:
    """What `next_output` reads: a scripted sequence of WebSocket messages."""

    def __init__(self, messages):
        self.messages = list(messages)

    async def recv(self):
        return self.messages.pop(0)


def test_websocket_reader_skips_text_events_and_returns_outputs_in_order():
    socket = FakeSocket([json.dumps({"type": "stats", "fps": 3}), b"first",
                         json.dumps({"type": "frame", "seq": 1, "latency_ms": 5, "skipped": False}),
                         json.dumps({"type": "something_new"}), b"second"])
    assert asyncio.run(bench.next_output(socket)) == b"first"
    assert asyncio.run(bench.next_output(socket)) == b"second"


@pytest.mark.parametrize("event", [{"type": "dropped", "seq": 4}, {"type": "error", "code": "bad_image"}])
def test_websocket_reader_refuses_a_frame_without_output(event):
    with pytest.raises(RuntimeError, match="without an output"):
        asyncio.run(bench.next_output(FakeSocket([json.dumps(event), b"late"])))


def row(detail: float, cut_frames: int | None = None) -> dict:
    return {"detail": detail} if cut_frames is None else {"detail": detail, "cut_frames": cut_frames}


def test_counts_needs_detail_and_a_quick_cut():
    results = {"pan": {"off": row(1.0), "sharp": row(0.95), "blurry": row(0.85), "slow": row(1.0)},
               "cut": {"off": row(1.0, 0), "sharp": row(0.97, 3), "blurry": row(0.99, 0), "slow": row(1.0, 4)}}
    bench.mark_counts(results)
    assert {name: r["counts"] for name, r in results["pan"].items()} == {
        "off": True, "sharp": True, "blurry": False, "slow": False}
    assert results["cut"]["blurry"]["counts"] is True  # detail is judged per clip, the cut for every clip
    without_cut = {"pan": {"off": row(1.0)}}
    bench.mark_counts(without_cut)
    assert without_cut["pan"]["off"]["counts"] is None


def check_report(report: dict, clips: list[str], path: str) -> None:
    assert report["path"] == path and report["model"] == "tiny" and (report["width"], report["height"]) == (64, 64)
    assert list(report["temporal"]) == clips
    for clip, rows in report["temporal"].items():
        assert {"off", "blend_0.5"} <= set(rows)
        for figures in rows.values():
            assert ROW_KEYS <= set(figures) and ("cut_frames" in figures) == (clip == "cut")
            assert all(figures[key] >= 0 for key in ROW_KEYS)
            assert isinstance(figures["counts"], bool)
        off = rows["off"]
        assert (off["detail"], off["ref_l1"], off["fps_ratio"], off["warp_ratio"]) == (1.0, 0.0, 1.0, 1.0)
        assert off.get("cut_frames", 0) == 0 and rows["blend_0.5"]["ref_l1"] > 0
        assert len({figures["warp_error_input"] for figures in rows.values()}) == 1  # one floor per clip


def test_command_in_process_writes_every_clip_and_method(tmp_path, capsys):
    bench.main(["--model", "tiny", "--width", "64", "--height", "64", "--frames", "8", "--json",
                str(tmp_path / "temporal.json")])
    report = json.loads((tmp_path / "temporal.json").read_text())
    check_report(report, list(bench.CLIPS), "in_process")
    assert report["frames"] == 8 and report["methods"]["blend_0.5"] == {"blend": 0.5}
    printed = capsys.readouterr().out
    assert "model tiny 64x64" in printed and "torch threads 1" in printed
    assert all(clip in printed for clip in bench.CLIPS) and "cut_frames" in printed


def test_command_through_the_server_writes_every_clip_asked_for(tmp_path):
    bench.main(["--model", "tiny", "--width", "64", "--height", "64", "--frames", "8", "--clips", "pan_1px,cut",
                "--through-server", "--json", str(tmp_path / "temporal.json")])
    check_report(json.loads((tmp_path / "temporal.json").read_text()), ["pan_1px", "cut"], "websocket")


def test_server_outputs_are_paired_with_their_frames(tiny_engine):
    clip = make_clip("cut", 12, 64, 64)
    (run,) = bench.run_through_server(tiny_engine, "tiny", 64, 64, [clip], {"off": {}}, [], bench.DEFAULT_PROMPT)
    step = bench.frame_step(bench.make_stream(tiny_engine, "tiny", 64, 64, prompt=bench.DEFAULT_PROMPT))
    # The same stream in process, on the frames as the server decoded them (warm-up frames first).
    warmup = [decode_image(encode_jpeg(frame, bench.JPEG_QUALITY), 64, 64)
              for frame in clip.frames[:bench.WARMUP_FRAMES]]
    # ... and its outputs through the server's JPEG encoder: paired in order the two agree within rounding.
    quality = bench.server_settings(tiny_engine, 64, 64, 2, bench.DEFAULT_PROMPT).runtime.jpeg_quality
    local = [decode_image(encode_jpeg(np.clip(step(frame), 0, 255).round().astype(np.uint8), quality), 64, 64)
             for frame in warmup + run.inputs][bench.WARMUP_FRAMES:]
    remote = run.outputs["off"]
    assert len(remote) == len(local) == len(run.inputs) == 12 - bench.WARMUP_FRAMES
    paired = [np.abs(a.astype(float) - b).mean() for a, b in zip(remote, local, strict=True)]
    shifted = [np.abs(a.astype(float) - b).mean() for a, b in zip(remote[1:], local[:-1], strict=True)]
    assert max(paired) < 0.5 and min(shifted) > 1


def test_command_refuses_what_it_cannot_run(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--methods", "no-such-method"])
    assert "does not accept" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--frames", "4"])
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--clips", "earthquake"])

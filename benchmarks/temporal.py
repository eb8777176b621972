"""`python -m benchmarks.temporal`: how steady the stream's output is on live video, per clip and method.

Clips of real photographs (`benchmarks.temporal_clips`: a noisy still, slow pans, a slow zoom, fast motion,
a hard cut) run through one stream per method. A method is a dict of per-stream parameters applied to a
fresh stream (`{"temporal": "off"}`, ...); the engine's methods are the values of `temporal` it accepts.
Beside them runs `blend_<a>`, a reference that needs no engine change: the method-off output blended, in
output space, with the previous delivered output carried along the input's optical flow,
`out = (1 − a)·out + a·warp(previous out, flow)`, with a = 0 where the flow fails its consistency check.

Per clip and method (figures on the 0-255 scale, `benchmarks.temporal_metrics`): `warp_error` (occlusion-
masked flow warping error of the outputs, the flow taken from the input) and `warp_error_input` (the same on
the input: the floor), `consecutive_l1`, `detail` (mean gradient magnitude against the method off),
`ref_l1` (distance from the method-off output), `fps_ratio` (against the method off) and, on the cut,
`cut_frames`. A method's figures count only where `detail` >= `MIN_DETAIL` and its `cut_frames` <=
`MAX_CUT_FRAMES`, so blurring or freezing the picture cannot win. docs/temporal.md explains each measure.

`--through-server` sends the same clips as JPEG frames over the WebSocket of a real server in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import websockets

from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.codec import decode_image, encode_jpeg, rgb_to_tensor
from engine.motion import FLOW_METHODS, warp
from server.app import create_app
from server.serve import background_server
from server.settings import ServerSettings

from .report import start_logging, write_json
from .temporal_clips import CLIPS, Clip, make_clip
from .temporal_metrics import (
    CUT_BOUND_FRACTION,
    Motion,
    clip_motion,
    consecutive_l1,
    cut_bound,
    cut_frames,
    detail,
    mean_l1,
    pair_motion,
    warp_error,
)
from .timing import time_streams

logger = logging.getLogger(__name__)

#: Values of the per-stream parameter `temporal` the benchmark knows; the ones the engine accepts run.
ENGINE_METHODS: tuple[str, ...] = ("off", "feedback", "bank", "flow")
#: The reference method's name prefix: `blend_0.5` blends at a = 0.5.
BLEND_PREFIX = "blend_"
#: A method counts only where its outputs keep this share of the method-off detail ...
MIN_DETAIL = 0.9
#: ... and it follows a hard cut within this many frames.
MAX_CUT_FRAMES = 3
#: The stylised default prompt: a strong style (the demo model's pencil sketch, as in the feasibility note
#: /work/shared/notes/temporal-feasibility.md) makes flicker visible; a `photo` prompt would hide it.
DEFAULT_PROMPT = "pencil sketch"
#: Frames each stream sees before scoring and timing start: the stream batch fills with the first frames.
WARMUP_FRAMES = 2
#: Quality of the JPEG frames sent to the server (the clients' default).
JPEG_QUALITY = 85
#: Seconds to wait for one output from the server.
FRAME_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- the engine adapter
# Every engine construction, parameter update and per-frame call of this benchmark is in this section, so a
# change of the engine's configuration or call contract is adapted here and nowhere else.

def load_model(model: str) -> Engine:
    """The loaded engine of `model` (`tiny`, `demo`, ...) on the CPU in float32."""
    return Engine.load(LoadConfig(model=model, device="cpu", dtype="float32", backend="eager"))  # `bank` needs eager


def stream_config(model: str, width: int, height: int) -> StreamConfig:
    """The configuration every stream of the benchmark starts from (server sessions too): the engine's
    defaults (for `demo` its trained two-step schedule) with the similarity filter off, so that every frame
    is computed and timed."""
    return StreamConfig(width=width, height=height, similarity_filter=False)


def make_stream(models: Engine, model: str, width: int, height: int, **params) -> StreamEngine:
    """A fresh stream with the per-stream `params` (prompt, `temporal`, ...) applied.

    Raises:
        ValueError: when the engine does not accept a parameter or its value.
    """
    stream = StreamEngine(models, stream_config(model, width, height))
    if params:
        stream.update_params(**params)
    return stream


def frame_step(stream: StreamEngine) -> Callable[[np.ndarray], np.ndarray]:
    """The stream as a per-frame call: RGB uint8 (H, W, 3) in, the engine's float output (H, W, 3) out on the
    0-255 scale, not rounded (rounding alone adds about 0.04 to the still scene's warp error of 0.3)."""
    return lambda frame: stream(rgb_to_tensor(frame)).permute(1, 2, 0).mul(255).numpy()


def server_settings(engine: Engine, width: int, height: int, max_in_flight: int, prompt: str) -> ServerSettings:
    """A loopback server (free port, no token) whose sessions start like `make_stream` streams with `prompt`."""
    stream = stream_config(engine.name, width, height).replace(prompt=prompt)
    return ServerSettings(load=engine.config, stream=stream, port=0, max_in_flight=max_in_flight,
                          log_level="warning")


async def apply_session_params(base_url: str, session_id: str, params: Mapping[str, object]) -> None:
    """Apply per-stream `params` to a live server session before its first frame.

    REST rather than a WebSocket `params` message: the REST call answers once the update is applied (or
    refused), while a message gets no acknowledgement and could land after the first frames.

    Raises:
        ValueError: when the server refuses the parameters.
    """
    async with httpx.AsyncClient(base_url=base_url, timeout=FRAME_TIMEOUT_S) as client:
        answer = await client.patch(f"/api/sessions/{session_id}/params", json=dict(params))
    if answer.status_code != 200:
        raise ValueError(f"the server refused {dict(params)}: {answer.status_code} {answer.text}")


class RequestError(ValueError):
    """A request the benchmark cannot run (a method the engine refuses, too few frames)."""


# ---------------------------------------------------------------- methods

def engine_methods(models: Engine, model: str, width: int, height: int,
                   names: Sequence[str] = ENGINE_METHODS) -> dict[str, dict[str, object]]:
    """The per-stream parameters of each method in `names` that the engine accepts, found by trying.

    `off` is always there: an engine without the `temporal` parameter has no temporal method, which is
    what `off` means, so its parameters are then empty.
    """
    methods: dict[str, dict[str, object]] = {}
    for name in names:
        params: dict[str, object] = {"temporal": name}
        try:
            make_stream(models, model, width, height, **params)
        except ValueError as error:
            if name != "off":
                logger.info("the engine does not accept %s (%s)", params, type(error).__name__)
                continue
            params = {}
        methods[name] = params
    return methods


class FlowBlend:
    """The reference method, per frame: the new output blended with the previous delivered one carried
    along the input's flow, `(1 − a)·out + a·warp(previous, flow)`, a = 0 where the flow is untrustworthy.

    The flow comes from the two latest inputs; the first frame passes unchanged.

    Args:
        alpha (`float`): a, in [0, 1).
        flow_method (`str`, defaults to `"farneback"`): the flow estimator (`FLOW_METHODS`).
    """

    def __init__(self, alpha: float, flow_method: str = "farneback"):
        if not 0 <= alpha < 1:
            raise ValueError(f"the blend weight must lie in [0, 1), got {alpha}")
        self.alpha = alpha
        self.flow_method = flow_method
        self._input: np.ndarray | None = None
        self._output: np.ndarray | None = None

    def __call__(self, frame: np.ndarray, output: np.ndarray) -> np.ndarray:
        """The blended output (float32, 0-255) for input `frame` whose method-off output is `output`."""
        blended = np.asarray(output, np.float32)
        if self._input is not None:
            motion = pair_motion(self._input, frame, self.flow_method)
            weight = self.alpha * motion.mask[..., None].astype(np.float32)
            blended = (1 - weight) * blended + weight * warp(self._output, motion.flow)
        self._input, self._output = frame, blended
        return blended


def blend_name(alpha: float) -> str:
    """The method name of the reference blend at weight `alpha`."""
    return f"{BLEND_PREFIX}{alpha:g}"


# ---------------------------------------------------------------- running the clips

@dataclass
class ClipRun:
    """One clip through every method: what the streams saw, what they returned, and their seconds."""

    clip: Clip
    inputs: list[np.ndarray]
    outputs: dict[str, list[np.ndarray]]
    seconds: dict[str, float]


def run_in_process(models: Engine, model: str, width: int, height: int, clip: Clip,
                   methods: Mapping[str, Mapping[str, object]], blends: Sequence[float], prompt: str,
                   blend_flow: str = "farneback") -> ClipRun:
    """`clip` through one fresh stream per method (`off` among them), every method called in turn on each
    frame so that a load change on a shared machine hits all of them alike. Each blend post-processes the
    method-off output of the same frame and is timed as the method-off step plus its own work."""
    if "off" not in methods:
        raise ValueError("the methods must include `off`, the reference of every ratio")
    latest: dict[str, np.ndarray] = {}
    off = frame_step(make_stream(models, model, width, height, prompt=prompt, **methods["off"]))

    def off_step(frame: np.ndarray) -> np.ndarray:
        latest["off"] = off(frame)
        return latest["off"]

    # `time_streams` calls the steps in this order on each frame: `off` first, so the blends find its output.
    steps: dict[str, Callable[[np.ndarray], np.ndarray]] = {"off": off_step}
    for name, params in methods.items():
        if name != "off":
            steps[name] = frame_step(make_stream(models, model, width, height, prompt=prompt, **params))
    for alpha in blends:
        steps[blend_name(alpha)] = lambda frame, blend=FlowBlend(alpha, blend_flow): blend(frame, latest["off"])
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in steps}

    def keep(index: int, frame_outputs: dict[str, np.ndarray]) -> None:
        if index >= WARMUP_FRAMES:
            for name, output in frame_outputs.items():
                outputs[name].append(output)

    seconds = time_streams(steps, clip.frames, len(clip.frames) - WARMUP_FRAMES, WARMUP_FRAMES, on_outputs=keep)
    totals = {name: sum(times) for name, times in seconds.items()}
    for alpha in blends:
        totals[blend_name(alpha)] += totals["off"]
    return ClipRun(clip, clip.frames[WARMUP_FRAMES:], outputs, totals)


async def next_output(ws: websockets.ClientConnection) -> bytes:
    """The session's next output JPEG; outputs come in the order of the frames.

    Text events (`stats`, per-frame events, any the benchmark does not know) are skipped. An `error` or
    `dropped` event says a frame gets no output: the benchmark keeps at most `max_in_flight` frames
    unanswered so that never happens, and if it does the outputs can no longer be paired with the inputs.
    """
    while True:
        message = await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S)
        if isinstance(message, bytes):
            return message
        if json.loads(message).get("type") in ("error", "dropped"):
            raise RuntimeError(f"the server answered a frame without an output: {message}")


async def stream_over_websocket(base_url: str, frames: Sequence[bytes],
                                params: Mapping[str, object]) -> tuple[list[bytes], float]:
    """Send `frames` over a new WebSocket session with per-stream `params`; the output JPEGs in order and the
    seconds from the first frame after the warm-up to the last output.

    The warm-up frames go one at a time; then up to the session's `max_in_flight` frames are in flight.
    """
    async with websockets.connect(base_url.replace("http://", "ws://", 1) + "/ws", max_size=None) as ws:
        hello = json.loads(await ws.recv())
        if params:
            await apply_session_params(base_url, hello["session_id"], params)
        outputs: list[bytes] = []
        for data in frames[:WARMUP_FRAMES]:
            await ws.send(data)
            outputs.append(await next_output(ws))
        started = time.perf_counter()
        sent = len(outputs)
        while len(outputs) < len(frames):
            while sent < len(frames) and sent - len(outputs) < hello["max_in_flight"]:
                await ws.send(frames[sent])
                sent += 1
            outputs.append(await next_output(ws))
        return outputs, time.perf_counter() - started


def run_through_server(models: Engine, model: str, width: int, height: int, clips: Sequence[Clip],
                       methods: Mapping[str, Mapping[str, object]], blends: Sequence[float], prompt: str,
                       blend_flow: str = "farneback", max_in_flight: int = 2) -> list[ClipRun]:
    """Every clip through a real server on loopback, as JPEG frames over one new WebSocket session per
    method; the inputs scored are the frames as the server decoded them. The blends run in this process on
    the method-off outputs as a server-side blend would (their results are scored after the server's JPEG
    encoding) and are timed as the method-off session plus their own work."""
    settings = server_settings(models, width, height, max_in_flight, prompt)

    def delivered(image: np.ndarray) -> np.ndarray:
        """`image` as the server would deliver it: rounded and through its JPEG encoder."""
        rgb = np.clip(image, 0, 255).round().astype(np.uint8)
        return decode_image(encode_jpeg(rgb, settings.runtime.jpeg_quality), width, height)

    runs = []
    with background_server(create_app(settings, engine=models), settings) as base_url:
        for clip in clips:
            logger.info("clip %s through the server", clip.name)
            jpegs = [encode_jpeg(frame, JPEG_QUALITY) for frame in clip.frames]
            inputs = [decode_image(data, width, height) for data in jpegs]
            outputs, seconds = {}, {}
            for name, params in methods.items():
                answers, seconds[name] = asyncio.run(stream_over_websocket(base_url, jpegs, params))
                outputs[name] = [decode_image(data, width, height) for data in answers]
            for alpha in blends:
                blend, name = FlowBlend(alpha, blend_flow), blend_name(alpha)
                outputs[name], seconds[name] = [], seconds["off"]
                for index, (frame, output) in enumerate(zip(inputs, outputs["off"], strict=True)):
                    started = time.perf_counter()
                    blended = blend(frame, output)
                    if index >= WARMUP_FRAMES:
                        seconds[name] += time.perf_counter() - started
                    outputs[name].append(delivered(blended))
            runs.append(ClipRun(clip, inputs[WARMUP_FRAMES:],
                                {name: frames[WARMUP_FRAMES:] for name, frames in outputs.items()}, seconds))
    return runs


# ---------------------------------------------------------------- scoring


def cut_window(cut: int) -> set[int]:
    """The frame pairs of a cut clip left out of `warp_error` and `consecutive_l1`: the pair across the cut
    (no flow exists there) and the next `MAX_CUT_FRAMES`, where a stream batch shows the cut late and a
    method may still be recovering (that recovery is `cut_frames`' business)."""
    return set(range(cut - 1, cut + MAX_CUT_FRAMES))


def score(run: ClipRun, flow: str = "farneback") -> dict[str, dict[str, float | int]]:
    """The figures of every method on one clip (`cut_frames` on a cut clip only); see the module docstring."""
    cut = None if run.clip.cut is None else run.clip.cut - WARMUP_FRAMES
    skip = cut_window(cut) if cut is not None else set()
    motion: list[Motion] = clip_motion(run.inputs, flow)
    floor = warp_error(run.inputs, motion, skip)
    off = run.outputs["off"]
    off_warp, off_detail = warp_error(off, motion, skip), detail(off)
    rows: dict[str, dict[str, float | int]] = {}
    for name, frames in run.outputs.items():
        error, gradient = warp_error(frames, motion, skip), detail(frames)
        row: dict[str, float | int] = {
            "warp_error": round(error, 3),
            "warp_error_input": round(floor, 3),
            "consecutive_l1": round(consecutive_l1(frames, skip), 3),
            "detail": round(gradient / off_detail, 3),
            "ref_l1": round(mean_l1(frames, off), 3),
            "fps_ratio": round(run.seconds["off"] / run.seconds[name], 3),
            "warp_ratio": round(error / off_warp, 3),
            "gradient": round(gradient, 3),
            "fps": round(len(frames) / run.seconds[name], 2),
        }
        if cut is not None:
            row["cut_frames"] = cut_frames(frames, off, cut)
            row["cut_bound"] = round(cut_bound(frames, off, cut), 3)
        rows[name] = row
    return rows


def mark_counts(results: dict[str, dict[str, dict]]) -> None:
    """Add `counts` to every row: True where the method keeps `detail` >= `MIN_DETAIL` on that clip and its
    `cut_frames` on the cut clip is <= `MAX_CUT_FRAMES`; None when no cut clip was run."""
    cut_rows = next((rows for rows in results.values() if "cut_frames" in next(iter(rows.values()))), None)
    for rows in results.values():
        for name, row in rows.items():
            row["counts"] = None if cut_rows is None else bool(
                row["detail"] >= MIN_DETAIL and cut_rows[name]["cut_frames"] <= MAX_CUT_FRAMES)


# ---------------------------------------------------------------- the command

COLUMNS = (("warp_error", "warp_error", "{:10.3f}"), ("warp_ratio", "x off", "{:6.2f}"),
           ("consecutive_l1", "consec_l1", "{:9.3f}"), ("detail", "detail", "{:6.3f}"),
           ("ref_l1", "ref_l1", "{:7.3f}"), ("fps_ratio", "fps_ratio", "{:9.3f}"),
           ("cut_frames", "cut_frames", "{:10d}"), ("counts", "counts", "{!s:>6}"))


def format_tables(report: dict) -> str:
    """A header with the settings, then one table per clip: methods as rows, figures as columns."""
    lines = [f"model {report['model']} {report['width']}x{report['height']}, {report['frames']} frames per clip "
             f"(+{report['warmup']} warm-up), prompt {report['prompt']!r}, {report['path']}, "
             f"torch threads {report['threads']}, flow {report['flow']} (blend: {report['blend_flow']})"]
    for clip, rows in report["temporal"].items():
        floor = next(iter(rows.values()))["warp_error_input"]
        lines.append(f"\n{clip} ({report['clips'][clip]}): input floor {floor:.3f}")
        columns = [(key, title, form) for key, title, form in COLUMNS if any(key in row for row in rows.values())]
        lines.append(f"  {'method':<12}" + " ".join(f"{title:>{len(form.format(0))}}" for _, title, form in columns))
        for name, row in rows.items():
            lines.append(f"  {name:<12}" + " ".join(form.format(row[key]) for key, _, form in columns))
    return "\n".join(lines)


def run(model: str = "demo", width: int = 256, height: int = 256, frames: int = 40,
        clips: Sequence[str] = tuple(CLIPS), methods: Sequence[str] | None = None, blends: Sequence[float] = (0.5,),
        prompt: str = DEFAULT_PROMPT, flow: str = "farneback", blend_flow: str = "farneback",
        through_server: bool = False, max_in_flight: int = 2, seed: int = 0) -> dict:
    """Measure every clip and method; returns the JSON-ready report (`{"temporal": {clip: {method: row}}}`
    and the settings beside it).

    Args:
        methods (`Sequence[str]`, *optional*): `temporal` values to run (`off` is always run); None runs every
            one in `ENGINE_METHODS` the engine accepts.
        blends (`Sequence[float]`): weights a of the reference blend; empty for none.

    Raises:
        RequestError: for a method the engine refuses, a blend weight outside [0, 1) or fewer frames than
            the cut clip needs.
    """
    if frames < 2 * (MAX_CUT_FRAMES + 1):
        raise RequestError(f"need at least {2 * (MAX_CUT_FRAMES + 1)} frames per clip, got {frames}")
    if any(not 0 <= alpha < 1 for alpha in blends):
        raise RequestError(f"blend weights must lie in [0, 1), got {list(blends)}")
    blends = list(dict.fromkeys(blends))  # a weight named twice would be one method measured twice
    models = load_model(model)
    accepted = engine_methods(models, model, width, height)
    wanted = list(accepted) if methods is None else ["off", *(name for name in methods if name != "off")]
    refused = [name for name in wanted if name not in accepted]
    if refused:
        raise RequestError(f"the engine does not accept temporal={refused}; it accepts {list(accepted)}")
    chosen = {name: accepted[name] for name in wanted}
    made = [make_clip(name, frames + WARMUP_FRAMES, width, height, seed) for name in clips]
    if through_server:
        runs = run_through_server(models, model, width, height, made, chosen, blends, prompt, blend_flow,
                                  max_in_flight)
    else:
        runs = []
        for clip in made:
            logger.info("clip %s in process", clip.name)
            runs.append(run_in_process(models, model, width, height, clip, chosen, blends, prompt, blend_flow))
    results = {run.clip.name: score(run, flow) for run in runs}
    mark_counts(results)
    return {"temporal": results, "model": model, "width": width, "height": height, "frames": frames,
            "warmup": WARMUP_FRAMES, "prompt": prompt, "path": "websocket" if through_server else "in_process",
            "threads": torch.get_num_threads(), "flow": flow, "blend_flow": blend_flow,
            "methods": {**{name: dict(params) for name, params in chosen.items()},
                        **{blend_name(alpha): {"blend": alpha} for alpha in blends}},
            "clips": {run.clip.name: run.clip.description for run in runs},
            "cut_bound_fraction": CUT_BOUND_FRACTION, "min_detail": MIN_DETAIL, "max_cut_frames": MAX_CUT_FRAMES}


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def main(argv: list[str] | None = None) -> None:
    """Measure, print the tables and optionally write the JSON report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.temporal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo (default, trained), tiny or any model spec")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--frames", type=int, default=40, help="scored frames per clip (after the warm-up)")
    parser.add_argument("--clips", type=_names, default=list(CLIPS), help=f"comma-separated, of {', '.join(CLIPS)}")
    parser.add_argument("--methods", type=_names, default=None,
                        help=f"comma-separated `temporal` values of {', '.join(ENGINE_METHODS)} "
                             "(default: every one the engine accepts; off always runs)")
    parser.add_argument("--blend-alpha", type=lambda text: [float(a) for a in _names(text)], default=[0.5],
                        help="weights of the reference flow blend, comma-separated; empty for none")
    parser.add_argument("--blend-flow", choices=FLOW_METHODS, default="farneback", help="the blend's flow estimator")
    parser.add_argument("--flow", choices=FLOW_METHODS, default="farneback", help="the metric's flow estimator")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0, help="seed of the still clip's sensor noise")
    parser.add_argument("--through-server", action="store_true",
                        help="send JPEG frames over the WebSocket of a real server in this process")
    parser.add_argument("--max-in-flight", type=int, default=2, help="frames in flight per session (server)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the report to this JSON file")
    args = parser.parse_args(argv)
    unknown = [name for name in args.clips if name not in CLIPS]
    if unknown:
        parser.error(f"unknown clips {unknown}; choose from {', '.join(CLIPS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start_logging()
    logging.getLogger("server").setLevel(logging.WARNING)  # not a line per session opened and closed
    try:
        report = run(args.model, args.width, args.height, args.frames, args.clips, args.methods, args.blend_alpha,
                     args.prompt, args.flow, args.blend_flow, args.through_server, args.max_in_flight, args.seed)
    except RequestError as error:
        parser.error(str(error))
    print(format_tables(report))
    write_json(args.json, report)


if __name__ == "__main__":
    main()

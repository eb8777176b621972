"""TensorRT backend: strongly typed engines built with polygraphy from the cached ONNX graphs.

Each static shape gets one engine (or, with a resolution range, each network and batch one engine
whose optimisation profile spans the range), built once on the models' GPU (with a timing cache kept
beside the engines so later builds are fast) and deserialised once. Its precision is the ONNX graph's, that
is the models' dtype: the network is parsed strongly typed, so no precision flag is set (TensorRT 11
removed `BuilderFlag.FP16`; strong typing works on 10 and 11). Every I/O buffer is allocated once on
the GPU and bound by name (`set_tensor_address`); each frame maps its inputs to the engine's inputs
by name, checking every shape and dtype, copies them in, runs `execute_async_v3` (or replays a CUDA
graph captured and verified when the engine was opened) and copies the output out (every output: the
ControlNet's engine has one per residual). A dynamic-shape engine instead binds each call's own tensors and
shapes, and runs without a CUDA graph.

Everything that needs no GPU (version probe, builder arguments, profile shapes, I/O binding, the
replay check) is a plain function tested on CPU. Needs CUDA, TensorRT 10+ and polygraphy; without
them every entry point raises `BackendUnavailableError`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import ModelBundle
from .artifacts import GraphShape, onnx_input_shapes
from .base import RunnerCapabilities
from .cache import (
    CacheKeyParts,
    cached_artifact,
    engine_cache_key,
    evict_least_recently_used,
    gpu_name,
    mark_used,
    tensorrt_version,
    unloadable_file_error,
    write_digest,
)
from .errors import BackendUnavailableError
from .onnx_export import DEFAULT_EXPORTER
from .progress import heartbeat
from .resolution import ResolutionRange, dynamic_axis_ranges
from .static import StaticShapeRunner

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
# TensorRT 11 removed ILayer.precision; polygraphy reads it unguarded before 0.50.3 (0.49.x crashes there).
MIN_POLYGRAPHY_FOR_TENSORRT_11 = (0, 50, 3)
DEFAULT_WORKSPACE_BYTES = 4 << 30
# Strongly typed networks take their precision from the graph: these are the dtypes a graph may have.
STRONGLY_TYPED_DTYPES = ("float32", "float16", "bfloat16")
# A replay runs the captured kernels on the same inputs as the uncaptured run, so it should agree to
# the bit; the tolerance (relative to the output's largest magnitude) only absorbs kernels that reduce
# with atomics. A broken capture fails by far: its output buffer is poisoned with NaN before the replay.
REPLAY_TOLERANCE = 1e-3
# TensorRT's `DataType` member names and the torch dtypes of the buffers that hold them.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
    "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
}
# CUDA graph captures are one at a time per process (torch's caching allocator tracks one capture).
_CAPTURE_LOCK = threading.Lock()

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------- availability


def _version_tuple(version: str) -> tuple[int, ...]:
    """The leading integers of a version string: `"10.3.0.26"` -> (10, 3, 0, 26), `"0.50.3"` -> (0, 50, 3)."""
    numbers = []
    for part in str(version).split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def version_unavailable_reason(tensorrt_version_: str, polygraphy_version: str) -> str | None:
    """Why these TensorRT and polygraphy versions cannot build engines here, or None when they can."""
    trt = _version_tuple(tensorrt_version_)
    if not trt:
        return f"cannot read the TensorRT version {tensorrt_version_!r}; reinstall it: pip install '.[trt]'"
    if trt[0] < MIN_TENSORRT_MAJOR:
        return (f"the tensorrt backend needs TensorRT {MIN_TENSORRT_MAJOR}+ (its tensor-name API), found "
                f"{tensorrt_version_}: pip install '.[trt]'")
    if trt[0] >= 11 and _version_tuple(polygraphy_version) < MIN_POLYGRAPHY_FOR_TENSORRT_11:
        needed = ".".join(map(str, MIN_POLYGRAPHY_FOR_TENSORRT_11))
        return (f"TensorRT {tensorrt_version_} needs polygraphy {needed}+ (older polygraphy reads layer "
                f"precisions TensorRT 11 removed), found {polygraphy_version}: pip install -U polygraphy")
    return None


#: Where TensorRT's wheels are: on PyPI, `tensorrt-cu12-libs`/`tensorrt-cu13-libs` 11.x are stubs that download
#: the real libraries from this index while they install, which fails offline or behind a proxy.
NVIDIA_INDEX = "https://pypi.nvidia.com"


def tensorrt_extra(torch_cuda: str | None) -> str:
    """The project's TensorRT extra for torch's CUDA version (TensorRT's packages are built per CUDA major)."""
    return "trt-cu13" if torch_cuda is not None and torch_cuda.split(".")[0] == "13" else "trt"


def tensorrt_install(torch_cuda: str | None, reinstall: bool = False) -> str:
    """How to install TensorRT for torch's CUDA major: the matching extra, from NVIDIA's index (or a container
    that has it)."""
    extra = tensorrt_extra(torch_cuda)
    return (f"the extra that matches your torch's CUDA ({torch_cuda or 'none'}): pip install "
            f"{'--force-reinstall ' if reinstall else ''}--extra-index-url {NVIDIA_INDEX} -e '.[{extra}]' "
            "(TensorRT's wheels are on NVIDIA's index; its PyPI packages are stubs that download there), "
            "or run in an NGC PyTorch/TensorRT container")


def tensorrt_dtype_reason(dtype: str) -> str | None:
    """Why TensorRT cannot run models of `dtype` here, None when it can.

    bfloat16 builds meet `Resize` (every UNet and VAE upsampler exports to one) on bfloat16 tensors, which
    TensorRT does not implement, so the build fails after minutes; it is refused up front instead.
    """
    if dtype == "bfloat16":
        return ("TensorRT implements no Resize on bfloat16 tensors (every UNet and VAE upsampler exports to one): "
                "run TensorRT in float16 (--dtype float16), or bfloat16 on --backend eager or compile")
    if dtype not in STRONGLY_TYPED_DTYPES:
        return f"the tensorrt backend runs {'/'.join(STRONGLY_TYPED_DTYPES)} models, these are {dtype}"
    return None


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can.

    Never raises: `--backend auto` asks this on every machine, and a broken install raises more than
    `ImportError` (a missing libnvinfer is an `OSError`, a half-upgraded package an `AttributeError`).
    """
    if not torch.cuda.is_available():
        return ("the tensorrt backend needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
                "use --backend onnxruntime or --backend eager on this machine")
    try:
        import tensorrt
    except ModuleNotFoundError:
        return (f"the tensorrt backend needs the `tensorrt` (10+) and `polygraphy` packages: install "
                f"{tensorrt_install(torch.version.cuda)}; or use --backend onnxruntime")
    except Exception as error:
        return (f"the tensorrt package is installed but does not import ({type(error).__name__}: {error}); "
                f"reinstall {tensorrt_install(torch.version.cuda, reinstall=True)}; or use --backend onnxruntime")
    try:
        import polygraphy
    except ModuleNotFoundError:
        return "the tensorrt backend needs the `polygraphy` package: pip install '.[trt]'"
    except Exception as error:
        return (f"polygraphy is installed but does not import ({type(error).__name__}: {error}): "
                "pip install -U polygraphy")
    return version_unavailable_reason(getattr(tensorrt, "__version__", ""), getattr(polygraphy, "__version__", ""))


def require_tensorrt() -> None:
    """Raise `BackendUnavailableError` with the reason when TensorRT cannot run here."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(reason)


# ---------------------------------------------------------------------------------------------- build


def profile_shapes(input_shapes: Mapping[str, Sequence[int | str]],
                   ranges: Mapping[str, tuple[int, int, int]] | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimisation profile: (min, opt, max) shapes of every input.

    A fixed dimension is the same in all three. A named (dynamic) dimension takes its
    (min, opt, max) from `ranges[name]`: a graph exported for a resolution range names its first input's
    `height` and `width`, whose ranges `resolution.dynamic_axis_ranges` gives. A static graph has no
    named dimension and gets min = opt = max.

    Raises:
        ValueError: a dynamic dimension without a range, or a range not ordered min <= opt <= max.
    """
    ranges = ranges or {}
    for name, (low, opt, high) in ranges.items():
        if not 0 < low <= opt <= high:
            raise ValueError(f"range of {name!r} must satisfy 0 < min <= opt <= max, got {(low, opt, high)}")
    profile = {}
    for name, dims in input_shapes.items():
        low, opt, high = [], [], []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                bounds = (dim, dim, dim)
            elif isinstance(dim, str) and dim in ranges:
                bounds = ranges[dim]
            else:
                raise ValueError(f"input {name!r} axis {axis} is dynamic ({dim!r}) and has no (min, opt, max) range")
            for values, bound in zip((low, opt, high), bounds, strict=True):
                values.append(bound)
        profile[name] = (tuple(low), tuple(opt), tuple(high))
    return profile


@dataclass(frozen=True)
class BuilderArguments:
    """What `build_engine` hands polygraphy, as plain data.

    `network`: keyword arguments of `NetworkFromOnnxPath`; `config`: of `CreateConfig` (memory pools
    by their `trt.MemoryPoolType` name); `profile`: the optimisation profile's (min, opt, max) shapes.
    """

    network: dict[str, object]
    config: dict[str, object]
    profile: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)


def builder_arguments(dtype: str, input_shapes: Mapping[str, Sequence[int | str]],
                      workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, timing_cache: Path | None = None,
                      ranges: Mapping[str, tuple[int, int, int]] | None = None) -> BuilderArguments:
    """The builder's arguments for a graph of `dtype` with `input_shapes` (see `onnx_input_shapes`).

    The network is strongly typed: every tensor keeps the graph's type, so the engine runs in the
    configured dtype (fp16 only for an fp16 graph, fp32 for fp32) and no precision flag is set, which
    TensorRT forbids for strongly typed networks and TensorRT 11 removed. TF32 stays off, so an fp32
    graph computes in fp32. `timing_cache` is an existing cache to start from (None for a fresh one).

    Raises:
        ValueError: a dtype a strongly typed engine cannot take here, or a bad profile (`profile_shapes`).
    """
    if dtype not in STRONGLY_TYPED_DTYPES:
        raise ValueError(f"TensorRT engines are built from {'/'.join(STRONGLY_TYPED_DTYPES)} graphs, got {dtype!r}")
    return BuilderArguments(
        network={"strongly_typed": True},
        config={
            "tf32": False,
            "memory_pool_limits": {"WORKSPACE": int(workspace_bytes)},
            "load_timing_cache": str(timing_cache) if timing_cache is not None else None,
        },
        profile=profile_shapes(input_shapes, ranges),
    )


def build_engine(onnx_path: Path, engine_path: Path, arguments: BuilderArguments, timing_cache: Path) -> Path:
    """Build a serialized engine from `onnx_path` into `engine_path` (with its SHA-256 beside it) on the
    current CUDA device; the tactic timings are merged into `timing_cache`."""
    require_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (low, opt, high) in arguments.profile.items():
        profile.add(name, min=low, opt=opt, max=high)
    config_arguments = dict(arguments.config)
    config_arguments["memory_pool_limits"] = {
        getattr(trt.MemoryPoolType, pool): size for pool, size in arguments.config["memory_pool_limits"].items()
    }
    network = NetworkFromOnnxPath(str(onnx_path), **arguments.network)
    config = CreateConfig(profiles=[profile], **config_arguments)
    dynamic = [f"{name} {list(low)}..{list(high)}" for name, (low, _, high) in arguments.profile.items() if low != high]
    logger.info("building TensorRT engine %s from %s on %s (strongly typed, workspace %d MiB, %s); this takes minutes",
                engine_path.name, onnx_path.name, gpu_name(), arguments.config["memory_pool_limits"]["WORKSPACE"] >> 20,
                "profile " + ", ".join(dynamic) if dynamic else "static shapes")
    started = time.perf_counter()
    # The timing cache is shared by every build in the folder (and by replicas sharing it): written to a name of
    # this process's own, then renamed, so no reader ever sees half a file.
    partial = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.partial")
    with heartbeat(logger, f"building {engine_path.name}"):
        serialized = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(partial))()
    if partial.is_file():
        os.replace(partial, timing_cache)
    data = memoryview(serialized)
    engine_path.write_bytes(data)
    # The digest tells a later load failure apart: an intact file is kept, a damaged one rebuilt.
    write_digest(engine_path, data)
    logger.info("built %s (%.0f MB) in %.0f s", engine_path.name, data.nbytes / 1e6, time.perf_counter() - started)
    return engine_path


# ---------------------------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class TensorIO:
    """One I/O tensor of an engine, as TensorRT describes it."""

    name: str
    shape: Shape
    dtype: torch.dtype
    is_input: bool


def torch_dtype(tensorrt_dtype_name: str) -> torch.dtype:
    """The torch dtype of a buffer for TensorRT `DataType.<name>`.

    Raises:
        ValueError: a TensorRT type torch has no buffer for (FP8, INT4, FP4).
    """
    if tensorrt_dtype_name not in _TORCH_DTYPES:
        raise ValueError(f"TensorRT tensor type {tensorrt_dtype_name} has no torch buffer type")
    return _TORCH_DTYPES[tensorrt_dtype_name]


def check_engine_io(io: Sequence[TensorIO], input_names: Sequence[str], output_name: str | Sequence[str],
                    dynamic: bool = False) -> TensorIO:
    """Check that an engine has exactly the graph's inputs and its output(s) (`output_name`: one name, or the
    names of a multi-output graph such as the ControlNet's residuals), all static unless the graph is `dynamic`
    (built for a resolution range); returns the (first) output.

    Raises:
        ValueError: names missing or extra, or a dynamic dimension in an engine of a static graph.
    """
    output_names = [output_name] if isinstance(output_name, str) else list(output_name)
    inputs = [tensor.name for tensor in io if tensor.is_input]
    missing, extra = sorted(set(input_names) - set(inputs)), sorted(set(inputs) - set(input_names))
    if missing or extra or len(inputs) != len(input_names):
        raise ValueError(f"engine inputs do not match the graph's: missing {missing}, unexpected {extra}")
    outputs = {tensor.name: tensor for tensor in io if not tensor.is_input}
    for name in output_names:
        if name not in outputs:
            raise ValueError(f"engine has no output {name!r} (it has {sorted(outputs)})")
    dynamic_tensors = [tensor.name for tensor in io if any(dim < 0 for dim in tensor.shape)]
    if dynamic_tensors and not dynamic:
        raise ValueError(f"engine tensors {dynamic_tensors} have dynamic shapes, but its graph is static")
    return outputs[output_names[0]]


def dims_match(shape: Sequence[int], engine_shape: Sequence[int]) -> bool:
    """Whether a tensor of `shape` fits an engine tensor of `engine_shape`, whose -1 dimensions are dynamic."""
    return len(shape) == len(engine_shape) and all(dim == want or want < 0
                                                   for dim, want in zip(shape, engine_shape, strict=True))


def bind_inputs(io: Sequence[TensorIO], input_names: Sequence[str],
                tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `tensors` (in the graph's input order, `input_names`) to the engine's inputs by name.

    TensorRT's I/O order need not be the graph's, and the K/V inputs all share one shape, so binding
    by position could feed one layer's K/V to another without any error: every tensor is matched by
    name, and its shape and dtype must be exactly the engine input's (a dynamic dimension, -1, takes any
    size; TensorRT checks it against the profile when the shape is set).

    Raises:
        ValueError: a count, name, shape or dtype that does not match the engine.
    """
    if len(tensors) != len(input_names):
        raise ValueError(f"expected {len(input_names)} input tensors, got {len(tensors)}")
    inputs = {tensor.name: tensor for tensor in io if tensor.is_input}
    bound = {}
    for name, tensor in zip(input_names, tensors, strict=True):
        expected = inputs.get(name)
        if expected is None:
            raise ValueError(f"the engine has no input {name!r}")
        if not dims_match(tuple(tensor.shape), expected.shape):
            raise ValueError(f"input {name!r} has shape {tuple(tensor.shape)}, the engine takes {expected.shape}")
        if tensor.dtype != expected.dtype:
            raise ValueError(f"input {name!r} is {tensor.dtype}, the engine takes {expected.dtype}")
        bound[name] = tensor
    if len(bound) != len(inputs):
        raise ValueError(f"inputs {sorted(set(inputs) - set(bound))} are not given")
    return bound


def replay_matches(reference: torch.Tensor, replayed: torch.Tensor, tolerance: float = REPLAY_TOLERANCE) -> bool:
    """Whether a CUDA graph replay reproduced the uncaptured run's output (see `REPLAY_TOLERANCE`)."""
    if reference.shape != replayed.shape or reference.dtype != replayed.dtype:
        return False
    if not reference.is_floating_point():
        return torch.equal(reference, replayed)
    reference, replayed = reference.float(), replayed.float()
    scale = max(reference.nan_to_num(0.0, 0.0, 0.0).abs().max().item(), 1.0) if reference.numel() else 1.0
    return torch.allclose(replayed, reference, rtol=0.0, atol=tolerance * scale, equal_nan=True)


def _poison(tensor: torch.Tensor) -> None:
    """Overwrite a buffer so that a replay that writes nothing cannot pass for a correct one."""
    tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


def _fill_sample(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Deterministic sample data for the warm-up and the replay check (any finite values do)."""
    if tensor.is_floating_point():
        tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
    elif tensor.dtype == torch.bool:
        tensor.zero_()
    else:
        tensor.copy_(torch.randint(0, 1000, tensor.shape, generator=generator).to(tensor.dtype))


# ---------------------------------------------------------------------------------------------- engine


class TensorRTEngine:
    """A deserialised engine with its execution context, I/O buffers and (if it works) a CUDA graph.

    Everything that can fail happens here, when the engine is opened (at `prepare` time), not on a
    frame: buffers are allocated and bound once, the engine runs once (TensorRT allocates its lazy
    resources on the first run), then the run is captured into a CUDA graph, and the graph is kept only
    if one replay reproduces an uncaptured run.

    A `dynamic` engine (built for a resolution range) warms up at its profile's opt shapes, then binds
    each call's own tensors and shapes; it runs without a CUDA graph, because a graph replays fixed
    addresses and shapes (one graph per size would be captured on a frame, which is what capturing at
    open time avoids).

    Args:
        path (`Path`): the serialized engine.
        device (`torch.device`): the CUDA device (with index) the engine was built for.
        input_names (`Sequence[str]`): the graph's input names, in the order `run` receives tensors.
        output_name (`str | Sequence[str]`): the graph's output, or every output of a multi-output graph (the
            ControlNet's residuals, in order).
        use_cuda_graph (`bool`): capture the execution into a CUDA graph and replay it every frame
            (static engines only).
        dynamic (`bool`): the engine's graph has a dynamic height and width.
    """

    def __init__(self, path: Path, device: torch.device, input_names: Sequence[str], output_name: str | Sequence[str],
                 use_cuda_graph: bool = True, dynamic: bool = False):
        require_tensorrt()
        import tensorrt as trt

        self.path = path
        self.device = device
        self.input_names = list(input_names)
        self.output_names = [output_name] if isinstance(output_name, str) else list(output_name)
        self.output_name = self.output_names[0]
        self.dynamic = dynamic
        self._lock = threading.Lock()
        self._graph: torch.cuda.CUDAGraph | None = None
        #: Aligned copies of a dynamic engine's unaligned inputs (`bind_dynamic`), one per input name.
        self._scratch: dict[str, torch.Tensor] = {}
        #: What a static engine's input buffers hold now.
        self._copied = CopiedInputs()
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                # Also what an out-of-memory deserialisation returns: the file's digest decides.
                raise unloadable_file_error(path, "TensorRT could not deserialize it (its error is logged above)")
            self.engine = engine
            self.io = [
                TensorIO(name, tuple(engine.get_tensor_shape(name)), torch_dtype(engine.get_tensor_dtype(name).name),
                         engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
                for name in (engine.get_tensor_name(index) for index in range(engine.num_io_tensors))
            ]
            check_engine_io(self.io, self.input_names, self.output_names, dynamic)
            self.context = engine.create_execution_context()
            if self.context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for {path.name} on {device} "
                                   "(usually out of GPU memory; its error is logged above)")
            self.stream = torch.cuda.Stream(device=device)
            self.buffers: dict[str, torch.Tensor] = {}
            # Inputs first: a dynamic engine's output shape is known once its input shapes are set.
            for tensor in sorted(self.io, key=lambda each: not each.is_input):
                if tensor.is_input:
                    # A dynamic engine warms up at its profile's opt shapes (profile 0, the only one).
                    shape = tuple(engine.get_tensor_profile_shape(tensor.name, 0)[1]) if dynamic else tensor.shape
                    if not self.context.set_input_shape(tensor.name, shape):
                        raise RuntimeError(f"TensorRT refused input shape {shape} for {tensor.name!r}")
                else:
                    shape = tuple(self.context.get_tensor_shape(tensor.name))
                buffer = aligned_empty(shape, tensor.dtype, device)
                set_address(self.context, tensor.name, buffer, path.name)
                self.buffers[tensor.name] = buffer
            generator = torch.Generator().manual_seed(0)
            with torch.cuda.stream(self.stream):
                for tensor in self.io:
                    if tensor.is_input:
                        _fill_sample(self.buffers[tensor.name], generator)
                self._execute_uncaptured()
            self.stream.synchronize()
            if use_cuda_graph and not dynamic:
                self._graph = self._capture()

    @property
    def uses_cuda_graph(self) -> bool:
        """Whether frames replay a captured and verified CUDA graph."""
        return self._graph is not None

    def _execute_uncaptured(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path.name} (its error is logged above)")

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """A CUDA graph of one execution, verified against an uncaptured run; None (logged) when either fails."""
        outputs = [self.buffers[name] for name in self.output_names]
        with torch.cuda.stream(self.stream):
            self._execute_uncaptured()
            references = [output.clone() for output in outputs]
        graph = torch.cuda.CUDAGraph()
        # "thread_local": only this thread's unsafe calls break the capture. In the default "global"
        # mode, a cudaMalloc from any other thread (the runtime's other model threads allocate all the
        # time) fails and invalidates the capture.
        with _CAPTURE_LOCK:
            try:
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    captured = self.context.execute_async_v3(self.stream.cuda_stream)
            except RuntimeError as error:
                logger.warning("CUDA graph capture of %s failed (%s); running it without a graph", self.path.name,
                               error)
                return None
        if not captured:
            logger.warning("TensorRT execute_async_v3 failed while capturing %s; running it without a graph",
                           self.path.name)
            return None
        with torch.cuda.stream(self.stream):
            for output in outputs:
                _poison(output)
            graph.replay()
            replayed = [output.clone() for output in outputs]
        self.stream.synchronize()
        if not all(replay_matches(reference, again) for reference, again in zip(references, replayed, strict=True)):
            logger.warning("the CUDA graph of %s does not reproduce an uncaptured run; running it without a graph",
                           self.path.name)
            return None
        logger.info("%s: CUDA graph captured and verified", self.path.name)
        return graph

    def run(self, inputs: Sequence[torch.Tensor], output_shape: tuple[int, ...]) -> torch.Tensor:
        """Run on `inputs` (in `input_names` order) and return the (first) output, of `output_shape`, which the
        caller may keep.

        A static engine copies the inputs into the buffers bound to their names and returns a copy of its
        output buffer; a dynamic one binds the inputs' own memory and a new output tensor.
        """
        return self.run_outputs(inputs, [output_shape])[0]

    def run_outputs(self, inputs: Sequence[torch.Tensor],
                    output_shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """`run` for every output (`output_names` order, one shape each): the ControlNet's residuals."""
        if len(output_shapes) != len(self.output_names):
            raise ValueError(f"{self.path.name} has outputs {self.output_names}, got {len(output_shapes)} shapes")
        bound = bind_inputs(self.io, self.input_names, inputs)
        caller = torch.cuda.current_stream(self.device)
        with self._lock, torch.cuda.device(self.device):
            self.stream.wait_stream(caller)
            with torch.cuda.stream(self.stream):
                if self.dynamic:
                    outputs = self._run_dynamic(bound, [tuple(shape) for shape in output_shapes])
                else:
                    for name, tensor in bound.items():
                        # A prompt's K/V are the same tensors every frame: copied once per prompt, not per call.
                        if self._copied.stale(name, tensor):
                            self.buffers[name].copy_(tensor, non_blocking=True)
                            self._copied.mark(name, tensor)
                    if self._graph is not None:
                        self._graph.replay()
                    else:
                        self._execute_uncaptured()
                    # Copies: the buffers are overwritten by the next frame, the caller may keep these.
                    outputs = [self.buffers[name].clone() for name in self.output_names]
            caller.wait_stream(self.stream)
            for output in outputs:
                output.record_stream(caller)
        return outputs

    def _run_dynamic(self, bound: Mapping[str, torch.Tensor],
                     output_shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """Bind this call's shapes and tensors and execute on the engine's stream (the caller holds the lock)."""
        inputs = bind_dynamic(self.context, bound, self._scratch, self.path.name)
        for tensor in inputs.values():
            # The engine's stream reads the caller's tensor: its memory must not be reused before that.
            tensor.record_stream(self.stream)
        outputs = []
        for name, expected in zip(self.output_names, output_shapes, strict=True):
            shape = tuple(self.context.get_tensor_shape(name))
            if shape != expected:
                raise RuntimeError(f"{self.path.name} gives {name!r} of shape {shape}, expected {expected}")
            output = aligned_empty(shape, self.buffers[name].dtype, self.device)
            set_address(self.context, name, output, self.path.name)
            outputs.append(output)
        self._execute_uncaptured()
        return outputs


class CopiedInputs:
    """Which tensor each input buffer of a static engine last received, so an unchanged input is not copied again.

    A tensor counts as unchanged while it is the same live object at the same version (torch bumps a tensor's
    version on every in-place write), so a prompt's K/V, the same tensors frame after frame, are copied into
    the engine once per prompt; a new tensor, or one written since, is copied.
    """

    def __init__(self) -> None:
        self._sources: dict[str, tuple[weakref.ref, int]] = {}

    def stale(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether buffer `name` may not hold `tensor`'s current values."""
        source = self._sources.get(name)
        version = _version(tensor)
        return source is None or version is None or source[0]() is not tensor or source[1] != version

    def mark(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer `name` now holds `tensor`'s current values."""
        version = _version(tensor)
        if version is None:
            self._sources.pop(name, None)
        else:
            self._sources[name] = (weakref.ref(tensor), version)


def _version(tensor: torch.Tensor) -> int | None:
    """`tensor`'s in-place write counter; None for an inference-mode tensor, which keeps none (always copied)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


#: TensorRT requires every I/O tensor's address to be a multiple of this (bytes).
TENSOR_ALIGNMENT = 256


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor whose address is a multiple of `TENSOR_ALIGNMENT` on any device.

    CUDA's caching allocator already gives 512-byte blocks; the CPU one gives 64, so the tensor is cut from a
    slightly larger byte buffer at its first aligned offset.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + TENSOR_ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % TENSOR_ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).view(tuple(shape))


def set_address(context, name: str, tensor: torch.Tensor, engine_name: str) -> None:
    """Bind `tensor` to the engine's I/O `name`; TensorRT reports a refusal as False, which is raised here."""
    if tensor.data_ptr() % TENSOR_ALIGNMENT:
        raise ValueError(f"{name!r} of {engine_name} is at an address that is not {TENSOR_ALIGNMENT}-byte aligned")
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise RuntimeError(f"TensorRT refused the address of {name!r} for {engine_name} (its error is logged above)")


def bind_dynamic(context, bound: Mapping[str, torch.Tensor], scratch: dict[str, torch.Tensor],
                 engine_name: str) -> dict[str, torch.Tensor]:
    """Set a dynamic engine's input shapes and addresses for one call; returns the tensors bound, by name.

    A tensor whose address is not `TENSOR_ALIGNMENT`-byte aligned (a slice such as the decoder's `x0[-f:]`)
    is copied into `scratch[name]`, a per-engine buffer kept for the next call of the same shape. Every
    TensorRT call's result is checked.

    Raises:
        RuntimeError: TensorRT refused a shape (outside the engine's resolution range) or an address.
    """
    inputs = {}
    for name, tensor in bound.items():
        if not context.set_input_shape(name, tuple(tensor.shape)):
            raise RuntimeError(f"TensorRT refused shape {tuple(tensor.shape)} for {name!r} of {engine_name}: "
                               "outside the engine's resolution range")
        if tensor.data_ptr() % TENSOR_ALIGNMENT or not tensor.is_contiguous():
            buffer = scratch.get(name)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = scratch[name] = aligned_empty(tuple(tensor.shape), tensor.dtype, tensor.device)
            buffer.copy_(tensor, non_blocking=True)
            tensor = buffer
        set_address(context, name, tensor, engine_name)
        inputs[name] = tensor
    return inputs


# ---------------------------------------------------------------------------------------------- runner


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def timing_cache_name(gpu: str, tensorrt_version_: str) -> str:
    """The timing cache's file name: tactic timings are only valid for one GPU model and TensorRT version."""
    return f"timing-{_file_safe(gpu)}-trt{_file_safe(tensorrt_version_)}.cache"


def cuda_device(device: torch.device) -> torch.device:
    """`device` with its index (`cuda` means the current CUDA device), so every engine names one GPU."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device())


class TensorRTRunner(StaticShapeRunner):
    """`NetworkRunner` on TensorRT engines, one per static shape (or per resolution range), built from the
    cached ONNX graphs.

    The engines run in the models' dtype (strongly typed from the graph exported in that dtype) on
    the models' GPU, which is also the GPU named in their cache key.

    Args:
        models (`ModelBundle`): the models, on a CUDA device, in float16, bfloat16 or float32.
        cfg_type (`str`): guidance mode (part of the UNet engines' cache key).
        cache_dir (`Path`, *optional*): the cache folder (`trt_cache/` by default).
        exporter (`str`): ONNX exporter, `dynamo` (default) or `torchscript`.
        workspace_bytes (`int`): the builder's workspace memory limit.
        use_cuda_graph (`bool`): replay each static engine from a CUDA graph captured when it is opened.
        resolution_range (`ResolutionRange`, *optional*): one engine per network and batch for every size of
            this range, its optimisation profile (min, opt, max) taken from the range; None for static engines.

    Raises:
        BackendUnavailableError: without CUDA, TensorRT 10+ and polygraphy, or with models off CUDA.
    """

    capabilities = RunnerCapabilities("tensorrt", attention_bank=True, controlnet=True, graphs_per_shape=True)

    def __init__(self, models: ModelBundle, cfg_type: str = "self", cache_dir: Path | None = None,
                 exporter: str = DEFAULT_EXPORTER, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 use_cuda_graph: bool = True, resolution_range: ResolutionRange | None = None,
                 cache_max_gb: float | None = None):
        require_tensorrt()
        super().__init__(models, cfg_type, cache_dir, exporter, resolution_range)
        parameter = next(models.unet.parameters())
        if parameter.device.type != "cuda":
            raise BackendUnavailableError(
                f"the tensorrt backend needs the models on a CUDA device, they are on {parameter.device}"
            )
        self.dtype = str(parameter.dtype).removeprefix("torch.")
        reason = tensorrt_dtype_reason(self.dtype)
        if reason is not None:
            raise BackendUnavailableError(reason)
        self.device = cuda_device(parameter.device)
        self.workspace_bytes = workspace_bytes
        self.use_cuda_graph = use_cuda_graph
        self.tensorrt_version = tensorrt_version()
        self.gpu_name = gpu_name(self.device)
        self.timing_cache = self.onnx_cache.cache_dir / timing_cache_name(self.gpu_name, self.tensorrt_version)
        self.cache_max_bytes = None if cache_max_gb is None else int(cache_max_gb * 1e9)

    def engine_key_parts(self, shape: GraphShape) -> CacheKeyParts:
        """The cache key fields of `shape`'s engine: the ONNX graph's, plus this TensorRT version and GPU."""
        return self.onnx_cache.key_parts(shape, self.tensorrt_version, self.gpu_name)

    def artifact_path(self, shape: GraphShape) -> Path:
        return self.onnx_cache.cache_dir / f"{engine_cache_key(self.engine_key_parts(shape))}.engine"

    def _build(self, shape: GraphShape, engine_path: Path) -> None:
        # Only now is the ONNX graph needed: a cached engine never exports or checks it.
        onnx_path = self.onnx_cache.load(shape)
        ranges = None if shape.resolution_range is None else \
            dynamic_axis_ranges(shape.network, shape.resolution_range, self.models.vae_scale_factor)
        arguments = builder_arguments(self.dtype, onnx_input_shapes(onnx_path), self.workspace_bytes,
                                      self.timing_cache if self.timing_cache.is_file() else None, ranges)
        with torch.cuda.device(self.device):
            build_engine(onnx_path, engine_path, arguments, self.timing_cache)

    def _open(self, shape: GraphShape) -> TensorRTEngine:
        path = self.artifact_path(shape)
        with torch.cuda.device(self.device):
            engine = cached_artifact(
                path,
                build=lambda temporary: self._build(shape, temporary),
                load=lambda path: TensorRTEngine(path, self.device, self.onnx_cache.input_names(shape),
                                                 self.onnx_cache.output_names(shape), self.use_cuda_graph,
                                                 dynamic=shape.resolution_range is not None),
                key_parts=self.engine_key_parts(shape),
            )
        mark_used(path)
        if self.cache_max_bytes is not None:
            evict_least_recently_used(path.parent, self.cache_max_bytes,
                                      keep={graph.path for graph in self._graphs.values()} | {path})
        return engine

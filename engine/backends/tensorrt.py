"""TensorRT backend: fp16 engines built with polygraphy from the cached ONNX graphs.

Each static shape gets one engine, built once (with a timing cache kept beside the engines so later
builds are fast), deserialized once, with its I/O buffers allocated once on the GPU and bound by
name (`set_tensor_address`); every frame copies its inputs into those buffers, runs
`execute_async_v3` (replayed from a captured CUDA graph when capture works) and copies the output
out. Needs CUDA and TensorRT 10+; without them every entry point raises `BackendUnavailableError`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import torch

from ..models import ModelBundle
from .artifacts import GraphShape
from .cache import cached_artifact, engine_cache_key, gpu_name, tensorrt_version
from .errors import BackendUnavailableError
from .onnx_export import DEFAULT_EXPORTER
from .static import StaticShapeRunner

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
DEFAULT_WORKSPACE_BYTES = 4 << 30


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return ("the tensorrt backend needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
                "use --backend onnxruntime or --backend eager on this machine")
    try:
        import tensorrt
    except ImportError:
        return ("the tensorrt backend needs the `tensorrt` (10+) and `polygraphy` packages: "
                "pip install '.[trt]' on a CUDA machine, or use --backend onnxruntime")
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "the tensorrt backend needs the `polygraphy` package: pip install '.[trt]'"
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        return f"the tensorrt backend needs TensorRT {MIN_TENSORRT_MAJOR}+, found {tensorrt.__version__}"
    return None


def require_tensorrt() -> None:
    """Raise `BackendUnavailableError` with the reason when TensorRT cannot run here."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(reason)


def build_engine(onnx_path: Path, engine_path: Path, timing_cache: Path, fp16: bool = True,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> Path:
    """Build a serialized TensorRT engine from `onnx_path` into `engine_path` with polygraphy."""
    require_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, engine_from_network, network_from_onnx_path, save_engine

    logger.info("building TensorRT engine from %s (fp16=%s, workspace %d MiB); this takes minutes",
                onnx_path.name, fp16, workspace_bytes >> 20)
    started = time.perf_counter()
    network = network_from_onnx_path(str(onnx_path))
    config = CreateConfig(
        fp16=fp16,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes},
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
    )
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    save_engine(engine, path=str(engine_path))
    logger.info("built %s in %.0f s", engine_path.name, time.perf_counter() - started)
    return engine_path


class TensorRTEngine:
    """A deserialized engine with its execution context and I/O buffers, allocated once.

    Args:
        path (`Path`): the serialized engine.
        device (`torch.device`): the CUDA device to run on.
        use_cuda_graph (`bool`): capture the execution into a CUDA graph after the first run.
    """

    def __init__(self, path: Path, device: torch.device, use_cuda_graph: bool = True):
        require_tensorrt()
        import tensorrt as trt

        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path.name}")
        self.context = self.engine.create_execution_context()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.buffers: dict[str, torch.Tensor] = {}
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self.buffers[name] = buffer
            self.context.set_tensor_address(name, buffer.data_ptr())
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
            else:
                self.output_names.append(name)
        self.use_cuda_graph = use_cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._lock = threading.Lock()

    def _execute(self) -> None:
        if self._graph is not None:
            self._graph.replay()
            return
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        if self.use_cuda_graph:
            # TensorRT allocates its resources on the first run; capture once they exist. The buffers'
            # addresses never change, so the graph stays valid for every later frame.
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.context.execute_async_v3(self.stream.cuda_stream)
                self._graph = graph
            except RuntimeError as error:
                logger.warning("CUDA graph capture failed (%s); running without it", error)
                self.use_cuda_graph = False

    def run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Copy `inputs` into the bound buffers, execute, and return a copy of the output."""
        caller = torch.cuda.current_stream(self.device)
        with self._lock:
            self.stream.wait_stream(caller)
            with torch.cuda.stream(self.stream):
                for name, tensor in zip(self.input_names, inputs, strict=True):
                    self.buffers[name].copy_(tensor, non_blocking=True)
                self._execute()
                # A copy: the buffer is overwritten by the next frame, the caller may keep this one.
                output = self.buffers[self.output_names[0]].clone()
            caller.wait_stream(self.stream)
            output.record_stream(caller)
        return output


def _torch_dtype(trt, dtype) -> torch.dtype:
    mapping = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
               trt.int32: torch.int32, trt.bool: torch.bool}
    if dtype not in mapping:
        raise RuntimeError(f"unsupported TensorRT tensor dtype {dtype}")
    return mapping[dtype]


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


class TensorRTRunner(StaticShapeRunner):
    """`NetworkRunner` on TensorRT engines, one per static shape, built from the cached ONNX graphs.

    Args:
        models (`ModelBundle`): the models, on a CUDA device.
        cfg_type (`str`): guidance mode (part of the UNet engines' cache key).
        cache_dir (`Path`, *optional*): the cache folder (`trt_cache/` by default).
        exporter (`str`): ONNX exporter, `dynamo` (default) or `torchscript`.
        fp16 (`bool`): build fp16 engines.
        workspace_bytes (`int`): the builder's workspace memory limit.
        use_cuda_graph (`bool`): replay each engine from a captured CUDA graph.

    Raises:
        BackendUnavailableError: without CUDA or without TensorRT 10+ and polygraphy.
    """

    backend = "tensorrt"

    def __init__(self, models: ModelBundle, cfg_type: str = "self", cache_dir: Path | None = None,
                 exporter: str = DEFAULT_EXPORTER, fp16: bool = True,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, use_cuda_graph: bool = True):
        require_tensorrt()
        super().__init__(models, cfg_type, cache_dir, exporter)
        self.device = next(models.unet.parameters()).device
        if self.device.type != "cuda":
            raise BackendUnavailableError(
                f"the tensorrt backend needs the models on a CUDA device, they are on {self.device}"
            )
        self.fp16 = fp16
        self.workspace_bytes = workspace_bytes
        self.use_cuda_graph = use_cuda_graph
        self.tensorrt_version = tensorrt_version()
        self.gpu_name = gpu_name()
        self.timing_cache = self.onnx_cache.cache_dir / (
            f"timing-{_file_safe(self.gpu_name)}-trt{_file_safe(self.tensorrt_version)}.cache")

    def artifact_path(self, shape: GraphShape) -> Path:
        # The engine's precision, not the ONNX graph's, is the dtype that matters here.
        dtype = "float16" if self.fp16 else None
        parts = self.onnx_cache.key_parts(shape, self.tensorrt_version, self.gpu_name, dtype)
        return self.onnx_cache.cache_dir / f"{engine_cache_key(parts)}.engine"

    def _open(self, shape: GraphShape) -> TensorRTEngine:
        onnx_path = self.onnx_cache.load(shape)
        return cached_artifact(
            self.artifact_path(shape),
            build=lambda temporary: build_engine(onnx_path, temporary, self.timing_cache, self.fp16,
                                                 self.workspace_bytes),
            load=lambda path: TensorRTEngine(path, self.device, self.use_cuda_graph),
        )

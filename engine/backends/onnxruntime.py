"""ONNX Runtime backend: the exported graphs (static-shape, or dynamic over a resolution range) on the CPU (or
CUDA) execution provider."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models import ModelBundle
from .artifacts import GraphShape
from .base import RunnerCapabilities
from .errors import BackendUnavailableError
from .onnx_export import DEFAULT_EXPORTER
from .resolution import ResolutionRange
from .static import StaticShapeRunner

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


@dataclass(frozen=True)
class OrtThreading:
    """How an ONNX Runtime session uses the CPU's threads (what `ort_threading` decides, applied by the runner).

    Args:
        intra_op_num_threads (`int`): threads inside one operator, the caller's thread included.
        inter_op_num_threads (`int`): threads running operators side by side (1: one after another).
        execution_mode (`str`): `sequential` (the networks are chains of operators) or `parallel`.
        config_entries (`tuple[tuple[str, str], ...]`): session config entries (`add_session_config_entry`).
    """

    intra_op_num_threads: int
    inter_op_num_threads: int
    execution_mode: str
    config_entries: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict:
        """The settings as JSON-ready values (what the benchmark reports)."""
        return {"intra_op_num_threads": self.intra_op_num_threads, "inter_op_num_threads": self.inter_op_num_threads,
                "execution_mode": self.execution_mode, "config_entries": dict(self.config_entries)}


def ort_threading(threads: int) -> OrtThreading:
    """The session threading for `threads` intra-op threads (at least 1): a pure function of the thread setting.

    Spinning is off in both pools. A runner holds one session per graph (UNet, VAE encoder, VAE decoder, each
    size), each with a pool of its own, and torch's OpenMP team runs the stream's tensor work between the
    graphs in the same process: idle workers that spin (ONNX Runtime's default) hold the cores the running
    session's workers and torch's need (issue 18 item 0: 2 threads ran 2.7x slower than 1 on a 2-core
    machine). A worker that blocks costs a wake-up of microseconds per parallel operator, nothing against a
    convolution. The networks are chains of operators, so operators run one after another and the
    parallelism is inside each.
    """
    threads = max(1, int(threads))
    return OrtThreading(intra_op_num_threads=threads, inter_op_num_threads=1, execution_mode="sequential",
                        config_entries=(("session.intra_op.allow_spinning", "0"),
                                        ("session.inter_op.allow_spinning", "0")))


def cpu_thread_split(threads: int, unet_backend: str, vae_backend: str, device_type: str) -> tuple[int, int]:
    """(torch's intra-op threads, ONNX Runtime's intra-op threads) for a budget of `threads` threads: a pure
    function of the thread setting and where the networks run.

    When ONNX Runtime runs every network on the CPU, torch's work in the process is the stream's glue between
    the graphs (noise, scalings, the image's scaling and clamp): small tensors that one thread does in
    microseconds. A torch team of more threads parks an OpenMP worker beside ONNX Runtime's on the same cores,
    and each small parallel region then waits for a peer the OS has descheduled (issue 18 item 0: at the
    default 2 threads of a 2-core machine the ONNX Runtime engine ran at 0.44x eager, at 1 thread 1.59x; with
    torch at 1 thread, ONNX Runtime's own count stopped mattering). So torch keeps one thread and ONNX Runtime
    gets the budget. Anywhere else (an eager or compiled network in the process, or CUDA models) both keep it.
    """
    threads = max(1, int(threads))
    if device_type == "cpu" and unet_backend == vae_backend == "onnxruntime":
        return 1, threads
    return threads, threads


# The intra-op budget ONNX Runtime took from torch (`claim_cpu_threads`): process-wide, like torch's count.
_claimed_threads: int | None = None
_claim_lock = threading.Lock()


def claim_cpu_threads(unet_backend: str, vae_backend: str, device_type: str) -> tuple[int, int]:
    """Apply `cpu_thread_split` to this process for an engine about to serve: torch's count is the budget (the
    count before an earlier claim lowered it), torch is set to its share and later ONNX Runtime sessions get
    theirs. An engine of another kind gives torch the whole budget back: the split follows the engine prepared
    last, since torch's count is process-wide. Returns (torch, ONNX Runtime) threads."""
    global _claimed_threads
    with _claim_lock:
        budget = _claimed_threads or torch.get_num_threads()
        torch_threads, ort_threads = cpu_thread_split(budget, unet_backend, vae_backend, device_type)
        _claimed_threads = budget if torch_threads != budget else None
        if torch.get_num_threads() != torch_threads:
            logger.info("torch intra-op threads %d -> %d: the networks run on %s/%s on %s (ONNX Runtime sessions: "
                        "%d intra-op threads)", torch.get_num_threads(), torch_threads, unet_backend, vae_backend,
                        device_type, ort_threads)
            torch.set_num_threads(torch_threads)
        return torch_threads, ort_threads


def thread_budget() -> int:
    """The process's thread budget: torch's count before `claim_cpu_threads` lowered it, else torch's count."""
    return _claimed_threads or torch.get_num_threads()


def default_intra_op_threads() -> int:
    """`$ORT_INTRA_OP_THREADS` when set, else the thread budget (`thread_budget`)."""
    return int(os.environ.get("ORT_INTRA_OP_THREADS", 0)) or thread_budget()


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the `onnxruntime` package: pip install '.[onnx]' "
            "(or use --backend eager)"
        ) from error
    return onnxruntime


def onnxruntime_available(device: torch.device | None = None) -> bool:
    """Whether the `onnxruntime` package imports (and, for a CUDA `device`, has the CUDA execution provider)."""
    try:
        onnxruntime = _import_onnxruntime()
    except BackendUnavailableError:
        return False
    return device is None or device.type != "cuda" or "CUDAExecutionProvider" in onnxruntime.get_available_providers()


class OnnxRuntimeSession:
    """One ONNX Runtime session of a static- or dynamic-shape graph, run through I/O binding on torch memory."""

    def __init__(self, session, device: torch.device):
        self.session = session
        self.device = device
        self.input_names = [graph_input.name for graph_input in session.get_inputs()]
        graph_outputs = session.get_outputs()
        self.output_names = [graph_output.name for graph_output in graph_outputs]
        self.output_dtypes = [torch.float16 if graph_output.type == "tensor(float16)" else torch.float32
                              for graph_output in graph_outputs]
        self.output_name, self.output_dtype = self.output_names[0], self.output_dtypes[0]
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0

    def run(self, inputs: list[torch.Tensor], output_shape: tuple[int, ...]) -> torch.Tensor:
        """The graph's (first) output, of `output_shape`, for `inputs` in the graph's input order."""
        return self.run_outputs(inputs, [output_shape])[0]

    def run_outputs(self, inputs: list[torch.Tensor], output_shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Every output of the graph, of `output_shapes` (one per output, in order), for `inputs` in the graph's
        input order."""
        # Inputs are bound by address (no copy); the outputs land in fresh torch tensors each call,
        # because callers keep outputs across calls and streams share the session.
        binding = self.session.io_binding()
        for name, tensor in zip(self.input_names, inputs, strict=True):
            binding.bind_input(name, self._device_type, self._device_id, _NUMPY_DTYPES[tensor.dtype],
                               tuple(tensor.shape), tensor.data_ptr())
        outputs = []
        for name, dtype, shape in zip(self.output_names, self.output_dtypes, output_shapes, strict=True):
            output = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(name, self._device_type, self._device_id, _NUMPY_DTYPES[dtype], tuple(shape),
                                output.data_ptr())
            outputs.append(output)
        self.session.run_with_iobinding(binding)
        return outputs


class OnnxRuntimeRunner(StaticShapeRunner):
    """`NetworkRunner` on ONNX Runtime: one session per graph (per static shape, or per resolution range),
    created once and reused.

    Args:
        models (`ModelBundle`): the models, on the device and dtype to run in.
        cfg_type (`str`): guidance mode (part of the UNet graphs' cache key).
        cache_dir (`Path`, *optional*): the ONNX cache folder (`trt_cache/` by default).
        exporter (`str`): `dynamo` (default) or `torchscript`.
        intra_op_threads (`int`, *optional*): threads per operator; `$ORT_INTRA_OP_THREADS`, else
            torch's thread count (one per physical core, unless set); see `ort_threading`.
        resolution_range (`ResolutionRange`, *optional*): one dynamic-shape graph for the sizes of this range
            (see `StaticShapeRunner`); None for static graphs.
    """

    capabilities = RunnerCapabilities("onnxruntime", attention_bank=True, controlnet=True, graphs_per_shape=True)

    def __init__(self, models: ModelBundle, cfg_type: str = "self", cache_dir: Path | None = None,
                 exporter: str = DEFAULT_EXPORTER, intra_op_threads: int | None = None,
                 resolution_range: ResolutionRange | None = None):
        self._ort = _import_onnxruntime()
        super().__init__(models, cfg_type, cache_dir, exporter, resolution_range)
        parameter = next(models.unet.parameters())
        if parameter.dtype not in (torch.float32, torch.float16):
            raise BackendUnavailableError(
                f"the onnxruntime backend runs float32 or float16 models, these are {parameter.dtype}"
            )
        self.device = parameter.device
        self.threading = ort_threading(intra_op_threads or default_intra_op_threads())
        self.providers = self._providers()

    def _providers(self) -> list[str]:
        available = self._ort.get_available_providers()
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailableError(
                    f"the models are on {self.device} but this onnxruntime has no CUDA execution provider "
                    f"(it has {available}); install onnxruntime-gpu, or run on the CPU"
                )
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session_options(self):
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        settings = self.threading
        options.execution_mode = {"sequential": self._ort.ExecutionMode.ORT_SEQUENTIAL,
                                  "parallel": self._ort.ExecutionMode.ORT_PARALLEL}[settings.execution_mode]
        options.intra_op_num_threads = settings.intra_op_num_threads
        options.inter_op_num_threads = settings.inter_op_num_threads
        for key, value in settings.config_entries:
            options.add_session_config_entry(key, value)
        options.log_severity_level = 3
        return options

    def _create_session(self, path: Path) -> OnnxRuntimeSession:
        session = self._ort.InferenceSession(str(path), self._session_options(), providers=self.providers)
        return OnnxRuntimeSession(session, self.device)

    def _open(self, shape: GraphShape) -> OnnxRuntimeSession:
        return self.onnx_cache.load(shape, self._create_session)

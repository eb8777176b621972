"""ONNX Runtime backend: the exported graphs (static-shape, or dynamic over a resolution range) on the CPU (or
CUDA) execution provider."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..models import ModelBundle
from .artifacts import GraphShape
from .errors import BackendUnavailableError
from .onnx_export import DEFAULT_EXPORTER
from .resolution import ResolutionRange
from .static import StaticShapeRunner

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


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
        graph_output = session.get_outputs()[0]
        self.output_name = graph_output.name
        self.output_dtype = torch.float16 if graph_output.type == "tensor(float16)" else torch.float32
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0

    def run(self, inputs: list[torch.Tensor], output_shape: tuple[int, ...]) -> torch.Tensor:
        """The graph's output, of `output_shape`, for `inputs` in the graph's input order."""
        # Inputs are bound by address (no copy); the output lands in a fresh torch tensor each call,
        # because callers keep outputs across calls and streams share the session.
        binding = self.session.io_binding()
        for name, tensor in zip(self.input_names, inputs, strict=True):
            binding.bind_input(name, self._device_type, self._device_id, _NUMPY_DTYPES[tensor.dtype],
                               tuple(tensor.shape), tensor.data_ptr())
        output = torch.empty(output_shape, dtype=self.output_dtype, device=self.device)
        binding.bind_output(self.output_name, self._device_type, self._device_id, _NUMPY_DTYPES[output.dtype],
                            tuple(output_shape), output.data_ptr())
        self.session.run_with_iobinding(binding)
        return output


class OnnxRuntimeRunner(StaticShapeRunner):
    """`NetworkRunner` on ONNX Runtime: one session per graph (per static shape, or per resolution range),
    created once and reused.

    Args:
        models (`ModelBundle`): the models, on the device and dtype to run in.
        cfg_type (`str`): guidance mode (part of the UNet graphs' cache key).
        cache_dir (`Path`, *optional*): the ONNX cache folder (`trt_cache/` by default).
        exporter (`str`): `dynamo` (default) or `torchscript`.
        intra_op_threads (`int`, *optional*): threads per operator; `$ORT_INTRA_OP_THREADS`, else
            torch's thread count (one per physical core).
        resolution_range (`ResolutionRange`, *optional*): one dynamic-shape graph for the sizes of this range
            (see `StaticShapeRunner`); None for static graphs.
    """

    backend = "onnxruntime"

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
        self.intra_op_threads = intra_op_threads or int(os.environ.get("ORT_INTRA_OP_THREADS", 0)) \
            or torch.get_num_threads()
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
        options.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.intra_op_threads
        # The networks are chains of operators: the parallelism is inside each operator.
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return options

    def _create_session(self, path: Path) -> OnnxRuntimeSession:
        session = self._ort.InferenceSession(str(path), self._session_options(), providers=self.providers)
        return OnnxRuntimeSession(session, self.device)

    def _open(self, shape: GraphShape) -> OnnxRuntimeSession:
        return self.onnx_cache.load(shape, self._create_session)

"""How ONNX Runtime and torch share the CPU's threads: pure functions of the thread setting, and what a runner
applies (issue 18 item 0). No timing here: the figures are the benchmark's (docs/backends.md)."""

from __future__ import annotations

import pytest
import torch

from engine.backends import onnxruntime as ort_backend
from engine.backends.onnxruntime import OnnxRuntimeRunner, cpu_thread_split, ort_threading

pytestmark = pytest.mark.slow

NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_sessions_never_spin_and_run_operators_one_after_another(threads):
    threading = ort_threading(threads)
    assert threading.intra_op_num_threads == threads
    assert (threading.inter_op_num_threads, threading.execution_mode) == (1, "sequential")
    assert dict(threading.config_entries) == NO_SPINNING
    assert threading.as_dict()["config_entries"] == NO_SPINNING


def test_a_thread_count_below_one_means_one():
    assert ort_threading(0).intra_op_num_threads == 1
    assert cpu_thread_split(0, "onnxruntime", "onnxruntime", "cpu") == (1, 1)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_onnxruntime_on_the_cpu_takes_the_budget_and_torch_keeps_one_thread(threads):
    assert cpu_thread_split(threads, "onnxruntime", "onnxruntime", "cpu") == (1, threads)


@pytest.mark.parametrize(("unet", "vae", "device"), [
    ("eager", "eager", "cpu"),
    ("eager", "onnxruntime", "cpu"),       # the eager UNet needs torch's threads
    ("compile", "compile", "cpu"),
    ("onnxruntime", "onnxruntime", "cuda"),  # the GPU computes; nothing to share
])
def test_anywhere_else_both_keep_the_budget(unet, vae, device):
    assert cpu_thread_split(4, unet, vae, device) == (4, 4)


def test_the_runner_applies_the_threading_to_its_session_options(tiny_models):
    runner = OnnxRuntimeRunner(tiny_models, intra_op_threads=3)
    options = runner._session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.execution_mode == runner._ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in NO_SPINNING.items():
        assert options.get_session_config_entry(key) == value


def test_the_default_intra_op_count_is_the_environments_then_the_claimed_budget_then_torchs(monkeypatch):
    monkeypatch.setattr(ort_backend, "_claimed_threads", None)
    monkeypatch.delenv("ORT_INTRA_OP_THREADS", raising=False)
    assert ort_backend.default_intra_op_threads() == torch.get_num_threads()
    monkeypatch.setattr(ort_backend, "_claimed_threads", 5)
    assert ort_backend.default_intra_op_threads() == 5
    monkeypatch.setenv("ORT_INTRA_OP_THREADS", "7")
    assert ort_backend.default_intra_op_threads() == 7


def test_claiming_sets_torchs_share_once_and_later_runners_get_the_budget(monkeypatch):
    monkeypatch.setattr(ort_backend, "_claimed_threads", None)
    monkeypatch.delenv("ORT_INTRA_OP_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert ort_backend.claim_cpu_threads("onnxruntime", "onnxruntime", "cpu") == (1, 2)
        assert torch.get_num_threads() == 1
        # A second engine (or another guidance mode's runner) still sees the budget, not torch's one thread.
        assert ort_backend.claim_cpu_threads("onnxruntime", "onnxruntime", "cpu") == (1, 2)
        assert ort_backend.default_intra_op_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_claiming_for_an_eager_network_changes_nothing(monkeypatch):
    monkeypatch.setattr(ort_backend, "_claimed_threads", None)
    before = torch.get_num_threads()
    assert ort_backend.claim_cpu_threads("eager", "onnxruntime", "cpu") == (before, before)
    assert torch.get_num_threads() == before and ort_backend._claimed_threads is None


def test_an_eager_engine_prepared_after_an_onnxruntime_one_gets_the_budget_back(monkeypatch):
    monkeypatch.setattr(ort_backend, "_claimed_threads", None)
    monkeypatch.delenv("ORT_INTRA_OP_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ort_backend.claim_cpu_threads("onnxruntime", "onnxruntime", "cpu")
        assert ort_backend.claim_cpu_threads("eager", "eager", "cpu") == (2, 2)
        assert torch.get_num_threads() == 2 and ort_backend._claimed_threads is None
    finally:
        torch.set_num_threads(before)

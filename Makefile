# One entry point per job; every target sets up the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch first (a local wheel on our machines); an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The model `make serve` serves: the trained demo stylizer (engine/demo_model); `tiny` is the random-init test model.
MODEL ?= demo
# With the demo model, its canny ControlNet (engine/demo_controlnet): +1.6 dB against the style filters at 256²
# for 0.81x the frame rate (docs/controlnet.md). `make serve CONTROLNET=` serves without; other models have none.
CONTROLNET ?= $(if $(filter demo,$(MODEL)),demo,)

.PHONY: setup gpu-setup serve demo test test-fast bench doctor gpu-check lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[server,dev,onnx]"
	touch $@

setup: $(VENV)/.installed

# On a CUDA machine: the TensorRT extra for the installed torch's CUDA major (`trt` for CUDA 12, `trt-cu13` for
# 13), from NVIDIA's index, where TensorRT's wheels are (its PyPI packages are stubs that download there).
$(VENV)/.gpu-installed: $(VENV)/.installed
	$(PIP) install --quiet --extra-index-url https://pypi.nvidia.com -e ".[$$($(PY) -c 'import torch; from engine.backends.tensorrt import tensorrt_extra; print(tensorrt_extra(torch.version.cuda))')]"
	touch $@

gpu-setup: $(VENV)/.gpu-installed

serve: setup
	$(PY) -m server --model $(MODEL) $(if $(CONTROLNET),--controlnet $(CONTROLNET))

demo: setup
	$(PY) -m benchmarks.demo_clip --model $(MODEL) --out out/demo.mp4

test: setup
	$(PY) -m pytest -q

# The edit loop: pure, engine-exactness and in-process server tests; the `slow` tier (subprocess servers,
# Chromium, nginx, ONNX exports, training, benchmark commands) is left to `make test`.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m benchmarks.engine --json out/bench.json

# What this machine can run (versions, backend choice, engine cache) and a few frames on the chosen backend.
doctor: setup
	$(PY) -m engine.doctor --json out/doctor.json

# On a CUDA machine: the doctor, the cuda-marked tests and the TensorRT benchmark at 512x512 in one report;
# on a CPU machine, or where TensorRT does not import, it stops at once (status 2) with the fix.
gpu-check: gpu-setup
	$(PY) -m benchmarks.gpu_check --out out/gpu-check.json

lint: setup
	$(PY) -m ruff check engine server client tests benchmarks training

clean:
	rm -rf $(VENV) out .pytest_cache

# CPU image: serves the trained demo model (or tiny, or any model the CPU can run) with `python -m server`.
#   docker build -t streamdiff:cpu .
#   docker run -p 8000:8000 streamdiff:cpu --model demo --width 256 --height 256
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    STREAMDIFF_TRT_CACHE=/cache/trt_cache

# curl: the health check reads /health (ready or degraded is healthy; a full replica answers 503 but is fine).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

# The CPU wheel first, from PyTorch's CPU index, so the project's `torch` requirement does not pull CUDA wheels.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
COPY client ./client
COPY wire ./wire
# The onnx extra: the CPU profile runs the VAE on ONNX Runtime beside the eager UNet (--vae-backend).
RUN pip install ".[server,onnx]"

RUN useradd --create-home --uid 1000 streamdiff && mkdir -p /cache && chown streamdiff /cache
USER streamdiff

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -s http://127.0.0.1:8000/health | grep -Eq '"status":"(ready|degraded)"'
ENTRYPOINT ["python", "-m", "server", "--host", "0.0.0.0"]

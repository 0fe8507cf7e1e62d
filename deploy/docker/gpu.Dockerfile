# syntax=docker/dockerfile:1.7
# guardstream, GPU image: the worker with TensorRT-LLM in-process (engines `trtllm` and `hf`), on
# NVIDIA's TensorRT-LLM release container. 1.2.x is the last line that can still build and run
# compiled engines (`guardstream engine build`); the PyTorch runtime works on any 1.x.
#
#   docker build -f deploy/docker/gpu.Dockerfile -t guardstream/guardstream-gpu:0.1.0 .
#   docker build -f deploy/docker/gpu.Dockerfile \
#       --build-arg TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0 --build-arg TRTLLM_VERSION=1.2.0 .
#
# Build context: the repository root (gpu.Dockerfile.dockerignore keeps it small).

ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ---- builder: wheels for guardstream and its (pure or manylinux) dependencies, CPython 3.12 -------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY engine ./engine
COPY service ./service
COPY bench ./bench
# requirements.txt pins the runtime install to exactly the guardstream wheel built here.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[otlp]" \
 && python -c "import pathlib; w = next(pathlib.Path('/wheels').glob('guardstream-*.whl')); \
pathlib.Path('/wheels/requirements.txt').write_text(f'guardstream[otlp]=={w.name.split(\"-\")[1]}\n')"

# ---- runtime: NVIDIA's container (CUDA, TensorRT, tensorrt_llm, torch, Python 3.12) ---------------
FROM ${TRTLLM_IMAGE} AS runtime
# The tensorrt_llm version the base must carry: the build fails when the two disagree.
ARG TRTLLM_VERSION=1.2.1
ARG GUARDSTREAM_UID=10001
LABEL org.opencontainers.image.title="guardstream-gpu" \
      org.opencontainers.image.description="Streaming moderation worker with TensorRT-LLM (GuardReasoner)" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/var/lib/guardstream \
    GUARDSTREAM_ENGINE=trtllm \
    GUARDSTREAM_TRTLLM_ENGINE_DIR=/engines \
    GUARDSTREAM_TRTLLM_CHECKPOINT_DIR=/models \
    GUARDSTREAM_WEB_PORT=6066
# Install guardstream next to the container's own GPU stack without touching it: everything the
# base already ships from that stack (tensorrt*, torch*, nvidia-*, triton, transformers, ...) is
# pinned to its installed version through a constraints file. The `trtllm` extra is not installed:
# tensorrt_llm comes from the base.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m pip list --format=freeze \
      | grep -iE '^(tensorrt|torch|nvidia-|triton|transformers|tokenizers|flashinfer|cuda-|modelopt)' \
      > /tmp/gpu-stack-constraints.txt \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
      --find-links=/wheels --constraint /tmp/gpu-stack-constraints.txt \
      --requirement /wheels/requirements.txt \
 && rm -f /tmp/gpu-stack-constraints.txt \
 && python3 -c 'import importlib.metadata as m, sys; v = m.version("tensorrt_llm"); \
sys.exit(None if v.split("+")[0] == sys.argv[1] else f"base has tensorrt_llm {v}, want {sys.argv[1]}")' \
      "${TRTLLM_VERSION}" \
 && groupadd --system --gid "${GUARDSTREAM_UID}" guardstream \
 && useradd --system --uid "${GUARDSTREAM_UID}" --gid guardstream \
        --home-dir /var/lib/guardstream --create-home --shell /usr/sbin/nologin guardstream \
 && install -d -o "${GUARDSTREAM_UID}" -g "${GUARDSTREAM_UID}" /engines /models
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/guardstream-healthcheck
# Compiled engines are per GPU model and per tensorrt_llm version: keep them out of the image.
VOLUME ["/engines"]
WORKDIR /var/lib/guardstream
USER ${GUARDSTREAM_UID}:${GUARDSTREAM_UID}
EXPOSE 6066
# Model load (and an engine build with GUARDSTREAM_TRTLLM_BUILD_ON_START) takes minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "/usr/local/bin/guardstream-healthcheck", "/healthz"]
ENTRYPOINT ["guardstream"]
CMD ["serve"]

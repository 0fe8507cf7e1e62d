# syntax=docker/dockerfile:1.7
# guardstream, CPU image: the worker for the `openai_http` engine (a TensorRT-LLM / vLLM server
# elsewhere, e.g. the Helm chart's split topology) and the `replay` engine.
#
#   docker build -f deploy/docker/cpu.Dockerfile -t guardstream/guardstream:0.1.0 .
#
# Build context: the repository root (cpu.Dockerfile.dockerignore keeps it small).

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ---- builder: the guardstream wheel plus wheels of all its dependencies -------------------------
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

# ---- runtime: no compilers, no sources, no wheels left behind -----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG GUARDSTREAM_UID=10001
LABEL org.opencontainers.image.title="guardstream" \
      org.opencontainers.image.description="Streaming moderation worker (openai_http and replay engines)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/var/lib/guardstream \
    GUARDSTREAM_ENGINE=replay \
    GUARDSTREAM_REPLAY_PATH=/replay \
    GUARDSTREAM_WEB_PORT=6066
# The wheels come in through a bind mount of the builder stage: they never land in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --requirement /wheels/requirements.txt \
 && groupadd --system --gid "${GUARDSTREAM_UID}" guardstream \
 && useradd --system --uid "${GUARDSTREAM_UID}" --gid guardstream \
        --home-dir /var/lib/guardstream --create-home --shell /usr/sbin/nologin guardstream
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/guardstream-healthcheck
# Faust keeps its local table state under the working directory.
WORKDIR /var/lib/guardstream
USER ${GUARDSTREAM_UID}:${GUARDSTREAM_UID}
EXPOSE 6066
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/guardstream-healthcheck", "/healthz"]
ENTRYPOINT ["guardstream"]
CMD ["serve"]

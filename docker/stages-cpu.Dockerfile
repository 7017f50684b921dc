# syntax=docker/dockerfile:1.7
# The stage image, CPU variant: the same ENTRYPOINT and environment as docker/stages.Dockerfile, on a
# slim Python base with the CPU build of torch. For the compose stack on a machine without a GPU
# (S2D_IMAGE=...:cpu, S2D_GPUS_PER_TASK=0 in infra/.env) and for the tiny preset.
#
#   docker build -f docker/stages-cpu.Dockerfile -t ghcr.io/sparse-to-dense/stages:0.1.0-cpu .
#   docker run --rm ghcr.io/sparse-to-dense/stages:0.1.0-cpu workflow --config tiny --root /work/runs/demo
#
# tests/test_deploy.py runs this image's ENTRYPOINT with its ENV as a subprocess (no Docker engine there).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md constraints.txt ./
COPY stages/ stages/
RUN pip install --no-cache-dir . -c constraints.txt \
 && pip check

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sparse-to-dense stages (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/sparse-to-dense/sparse-to-dense" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 s2d \
 && useradd --uid 10001 --gid s2d --create-home --home-dir /home/s2d --shell /usr/sbin/nologin s2d \
 && mkdir -p /work && chown s2d:s2d /work
COPY --from=build /opt/venv /opt/venv
COPY infra/accelerate/ /app/infra/accelerate/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/s2d/.cache/huggingface \
    S2D_GPUS=1 \
    S2D_ACCELERATE_CONFIG=/app/infra/accelerate/deepspeed_zero3.yaml
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["python", "-m", "stages"]
CMD ["--help"]

# syntax=docker/dockerfile:1.7
# The stage image (GPU): every stage runs as `python -m stages <stage> ...` (the ENTRYPOINT), the same
# command the local runner runs as a subprocess (dags/s2d_runners.py ENTRYPOINT; tests/test_deploy.py).
#
#   docker build -f docker/stages.Dockerfile -t ghcr.io/sparse-to-dense/stages:0.1.0 .
#   docker run --rm --gpus all ghcr.io/sparse-to-dense/stages:0.1.0 validate --config qwen3-1.7b
#   docker push ghcr.io/sparse-to-dense/stages:0.1.0
#
# Versions are build args: CUDA_IMAGE (base, pinned tag), TORCH_VERSION + TORCH_INDEX (a CUDA build of
# torch: the wheel bundles its CUDA runtime, cuDNN and NCCL, so the base image only has to suit the
# host's driver), EXTRAS (the package's extras: `gpu` = DeepSpeed). vLLM pins its own torch and
# transformers: it is a separate image, docker/vllm.Dockerfile.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---------------------------------------------------------------- build: a venv with everything
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG EXTRAS=gpu
# DeepSpeed: no ahead-of-time CUDA ops (its sdist builds without nvcc); the accelerate configs use
# torch's optimizers, so no JIT-compiled op is needed at run time either
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's archive keeps only the current build of a package, so apt pins would break the build on
# every security update: the pinned base image tag is what fixes the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the CUDA index: the largest layer, cached while the code changes
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md constraints.txt ./
COPY stages/ stages/
# constraints.txt is CI's lock: the image resolves the same versions the tests ran with
RUN pip install --no-cache-dir ".[${EXTRAS}]" -c constraints.txt \
 && pip check

# ---------------------------------------------------------------- runtime: the venv, no compilers
FROM ${CUDA_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sparse-to-dense stages (GPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/sparse-to-dense/sparse-to-dense" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# the same Python as the build stage (the venv links to it); apt pins: see the build stage
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 s2d \
 && useradd --uid 10001 --gid s2d --create-home --home-dir /home/s2d --shell /usr/sbin/nologin s2d \
 && mkdir -p /work && chown s2d:s2d /work
COPY --from=build /opt/venv /opt/venv
# accelerate configs for multi-GPU stages (S2D_GPUS > 1 relaunches under `accelerate launch`)
COPY infra/accelerate/ /app/infra/accelerate/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/s2d/.cache/huggingface \
    S2D_GPUS=1 \
    S2D_ACCELERATE_CONFIG=/app/infra/accelerate/deepspeed_zero3.yaml
# /work: the working directory (a local MLflow store or artifact root, when one is used, lands here)
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["python", "-m", "stages"]
CMD ["--help"]

# syntax=docker/dockerfile:1.7
# The stage image with vLLM (GPU rollouts). vLLM pins its own torch and transformers (vllm 0.33.0:
# torch==2.14.0, transformers<5.21), which conflict with the stage package's pins (torch==2.13.0,
# transformers==5.24.0). So this image lets vLLM own torch/transformers/tokenizers, installs the stage
# package with --no-deps, and then only its remaining requirements, constrained to what vLLM resolved,
# so nothing vLLM installed moves. `pip check` must report nothing but the stage package's own
# torch/transformers pins. Same ENTRYPOINT and ENV contract as docker/stages.Dockerfile.
#
#   docker build -f docker/vllm.Dockerfile -t ghcr.io/sparse-to-dense/stages:0.1.0-vllm .
#   docker push ghcr.io/sparse-to-dense/stages:0.1.0-vllm
#
# Use it for the stages that sample with vLLM: S2D_IMAGE=ghcr.io/sparse-to-dense/stages:0.1.0-vllm.
# The served teacher (teacher.engine: server) needs no image of ours: it is upstream vllm/vllm-openai at
# the same vLLM version (infra/compose.yaml service "teacher", infra/k8s/manifests/60-teacher-server.yaml);
# the stages that talk to it run in the plain stage image (HTTP only).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG VLLM_VERSION=0.33.0
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's archive keeps only the current build of a package: the pinned base tag fixes the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# vLLM first: it decides torch, transformers and tokenizers (and their CUDA wheels)
RUN pip install --no-cache-dir "vllm==${VLLM_VERSION}" \
 && pip freeze > /tmp/vllm-lock.txt
COPY pyproject.toml README.md ./
COPY docker/remaining_deps.py docker/remaining_deps.py
COPY stages/ stages/
RUN python docker/remaining_deps.py torch transformers tokenizers > /tmp/rest.txt \
 && pip install --no-cache-dir -r /tmp/rest.txt -c /tmp/vllm-lock.txt \
 && pip install --no-cache-dir --no-deps . \
 && { pip check > /tmp/check.txt || true; } \
 && if grep -v -e '^sparse-to-dense ' -e '^No broken requirements' /tmp/check.txt; then exit 1; fi

FROM ${CUDA_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sparse-to-dense stages (GPU, vLLM)" \
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

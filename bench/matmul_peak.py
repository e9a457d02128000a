"""This machine's matmul peak with torch, in fp32 and bf16 (the ceiling for MFU figures).

    .venv/bin/python bench/matmul_peak.py

Square matmuls and the shapes of a 576-hidden model (SmolLM2-135M: attention and MLP
projections of 4,096 tokens, and a slice of the 49,152-word LM head), on the threads torch
uses by default. Each shape is warmed up, then timed several times; the table shows the
median and the RESULT line the best median per dtype. Takes well under a minute.

Prints a table, then one line: RESULT {"fp32_gflops": ..., "bf16_gflops": ..., ...}.
"""

import json
import math
import statistics
import subprocess
import time

import torch

SHAPES = [  # (m, k, n): [m x k] @ [k x n]
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (4096, 4096, 4096),
    (4096, 576, 1536),  # MLP up/gate projection of 4,096 tokens
    (4096, 1536, 576),  # MLP down projection
    (4096, 576, 576),  # attention q/o projection
    (1024, 576, 49152),  # LM head over 1,024 tokens
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECONDS_PER_SHAPE = 0.6


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """Median seconds of one [m x k] @ [k x n] matmul after warm-up."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    once = time.perf_counter() - start
    repeats = min(20, max(3, math.ceil(SECONDS_PER_SHAPE / once)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    cpu = cpu_model_name()
    print(f"torch {torch.__version__}, {threads} threads, cpu: {cpu}")
    print(f"{'shape (m x k @ k x n)':<26}" + "".join(f"{name + ' GFLOP/s':>16}" for name in DTYPES))
    best = dict.fromkeys(DTYPES, 0.0)
    emulated = set()  # dtypes under a tenth of fp32's speed: no hardware support, not timed on
    for m, k, n in SHAPES:
        row = f"{f'{m} x {k} @ {k} x {n}':<26}"
        for name, dtype in DTYPES.items():
            if name in emulated:
                row += f"{'-':>16}"
                continue
            gflops = 2 * m * k * n / time_matmul(m, k, n, dtype) / 1e9
            best[name] = max(best[name], gflops)
            row += f"{gflops:>16.0f}"
            if gflops < 0.1 * best["fp32"]:
                emulated.add(name)
        print(row, flush=True)
    if emulated:
        print(f"{', '.join(sorted(emulated))}: under a tenth of fp32's speed (emulated here)")
    result = {
        "fp32_gflops": round(best["fp32"], 1),
        "bf16_gflops": round(best["bf16"], 1),
        "threads": threads,
        "cpu": cpu,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

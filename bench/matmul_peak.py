"""This machine's matmul peak with torch (the ceiling for MFU figures): on the CPU in fp32
and bf16; on a GPU (--device cuda) in fp32, tf32, fp16 and bf16.

    .venv/bin/python bench/matmul_peak.py [--device cpu|cuda|cuda:1]

On the CPU: square matmuls and the shapes of a 576-hidden model (SmolLM2-135M: attention
and MLP projections of 4,096 tokens, and a slice of the 49,152-word LM head), on the threads
torch uses by default. On a GPU: larger squares (up to 8192^3) and the same projections
over 32,768 tokens, so that the device is saturated. Each shape is warmed up, then timed
several times (on a GPU, each time a run of back-to-back matmuls between two
synchronizations); the table shows the median and the RESULT line the best median per
dtype. Takes well under a minute.

Prints a table, then one line: RESULT {"device": ..., "fp32_gflops": ..., "bf16_gflops": ...,
"fp32_tflops": ..., ...} (on a GPU also tf32 and fp16, and the GPU's name).
"""

import argparse
import contextlib
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
CUDA_SHAPES = [
    (4096, 4096, 4096),
    (8192, 8192, 8192),
    (16384, 8192, 8192),
    (32768, 576, 1536),  # MLP up/gate projection of 32,768 tokens
    (32768, 1536, 576),  # MLP down projection
    (32768, 576, 576),  # attention q/o projection
    (8192, 576, 49152),  # LM head over 8,192 tokens
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# On CUDA: tf32 is fp32 tensors with TF32 tensor-core matmuls allowed.
CUDA_DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
SECONDS_PER_SHAPE = 0.6
SECONDS_PER_SAMPLE = 0.02  # on a GPU: back-to-back matmuls per timed sample, at least this long


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 tensor-core matmuls for fp32 tensors on CUDA, for the block only."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> float:
    """Median seconds of one [m x k] @ [k x n] matmul after warm-up. On CUDA, the clock is
    read after a synchronization, around `inner` matmuls (enough to fill SECONDS_PER_SAMPLE,
    so that launch and synchronization costs do not count)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    sync()
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    sync()
    once = time.perf_counter() - start
    inner = max(1, math.ceil(SECONDS_PER_SAMPLE / once)) if cuda else 1
    repeats = min(20, max(3, math.ceil(SECONDS_PER_SHAPE / (once * inner))))
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"matmul_peak: --device {args.device}, but torch sees no CUDA device")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    dtypes, shapes = (CUDA_DTYPES, CUDA_SHAPES) if cuda else (DTYPES, SHAPES)
    if cuda:
        gpu = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, gpu: {gpu} ({capability})")
    else:
        cpu = cpu_model_name()
        print(f"torch {torch.__version__}, {threads} threads, cpu: {cpu}")
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    print(f"{'shape (m x k @ k x n)':<26}" + "".join(f"{name + ' ' + unit:>16}" for name in dtypes))
    best = dict.fromkeys(dtypes, 0.0)  # FLOP/s
    emulated = set()  # dtypes under a tenth of fp32's speed: no hardware support, not timed on
    for m, k, n in shapes:
        row = f"{f'{m} x {k} @ {k} x {n}':<26}"
        for name, dtype in dtypes.items():
            if name in emulated:
                row += f"{'-':>16}"
                continue
            with tf32_matmuls(name == "tf32") if cuda else contextlib.nullcontext():
                flops = 2 * m * k * n / time_matmul(m, k, n, dtype, device)
            best[name] = max(best[name], flops)
            row += f"{flops / scale:>16.{1 if cuda else 0}f}"
            if flops < 0.1 * best["fp32"]:
                emulated.add(name)
        print(row, flush=True)
    if emulated:
        print(f"{', '.join(sorted(emulated))}: under a tenth of fp32's speed (emulated here)")
    result = {f"{name}_gflops": round(best[name] / 1e9, 1) for name in dtypes}
    result |= {f"{name}_tflops": round(best[name] / 1e12, 3) for name in dtypes}
    result |= {"device": device.type, "threads": threads}
    result |= {"gpu": gpu, "capability": capability} if cuda else {"cpu": cpu}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

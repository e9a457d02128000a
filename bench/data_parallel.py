"""Tokens/s of one process against several (torchrun, DDP and FSDP), on the same steps.

Each configuration runs `sftforge train` for --steps optimizer steps of --examples examples
(LoRA by default), one at a time, alternating over --repeats rounds; the median tokens/s
over steps 2..N (the first warms up) is shown, with the ratio to one process and the
largest relative gap of the per-step losses to one process's (the update is meant to be the
same). On a CPU every process gets --threads threads (default 1: two processes on two cores
against one process on one core, and one process on all of them for comparison).

    .venv/bin/python bench/data_parallel.py [--model smollm2-135m] [--device cpu|cuda]
        [--processes 2] [--steps 8] [--examples 8] [--repeats 2] [--method lora]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src/sftforge/assets/demo_train.jsonl"


def train_once(processes: int, parallelism: str, threads: int, args, extra=()) -> dict:
    with tempfile.TemporaryDirectory() as out:
        settings = [
            f"model={args.model}",
            f"method={args.method}",
            f"data.train={DATA}",
            f"output_dir={out}/run",
            f"training.max_steps={args.steps}",
            f"training.batch_size={args.examples // processes}",
            f"training.grad_accum={processes}",
            f"training.device={args.device}",
            f"training.parallelism={parallelism}",
            "max_length=256",
            "eval.forgetting=false",
            "eval.samples=0",
            "training.save_every=null",
            *extra,
        ]
        program = ["-m", "sftforge", "train", *settings]
        if processes > 1:
            torchrun = ["-m", "torch.distributed.run", "--standalone"]
            program = [*torchrun, f"--nproc_per_node={processes}", *program]
        environment = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(
            [sys.executable, *program], capture_output=True, text=True, env=environment
        )
        if done.returncode:
            raise SystemExit(
                f"{processes} processes ({parallelism}) failed:\n{done.stderr[-3000:]}"
            )
        lines = Path(f"{out}/run/metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    seconds = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    tokens = rows[-1]["tokens"] - rows[0]["tokens"]
    return {"tokens_per_s": tokens / seconds, "losses": [row["loss"] for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--examples", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = args.processes
    cases = {
        f"1 process, {args.threads} thread": (1, "ddp", args.threads),
        f"{n} processes, DDP": (n, "ddp", args.threads),
        f"{n} processes, FSDP": (n, "fsdp", args.threads),
    }
    if args.device == "cpu":
        cases[f"1 process, {n * args.threads} threads"] = (1, "ddp", n * args.threads)
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for round_ in range(args.repeats):
        for name, (processes, parallelism, threads) in cases.items():
            results[name].append(train_once(processes, parallelism, threads, args))
            print(f"round {round_ + 1}: {name}: {results[name][-1]['tokens_per_s']:.0f} tokens/s")
    alone = next(iter(results.values()))
    base_speed = statistics.median(r["tokens_per_s"] for r in alone)
    base_losses = alone[0]["losses"]
    print(f"\n{args.method}, {args.model} on {args.device}, {args.steps} steps of {args.examples}")
    print("| run | tokens/s | vs 1 process | largest loss gap |")
    print("|---|---:|---:|---:|")
    for name, runs in results.items():
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        gap = max(abs(a - b) / abs(b) for a, b in zip(runs[0]["losses"], base_losses, strict=True))
        print(f"| {name} | {speed:.0f} | {speed / base_speed:.2f}x | {gap:.1e} |")


if __name__ == "__main__":
    main()

"""Peak memory and speed of full fine-tuning, LoRA and QLoRA on the same model and data.

Each method runs in its own process (peak RSS from the OS, and on CUDA the peak GPU memory
torch saw), one at a time, alternating over --repeats rounds; the median of each is shown.

    .venv/bin/python bench/method_memory.py [--model smollm2-135m] [--steps 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src/sftforge/assets/demo_train.jsonl"

CHILD = r"""
import json, resource, sys, torch
from sftforge.config import load_config
from sftforge.train import train
method, model, steps, out = sys.argv[1:5]
config = load_config(None, [f"model={model}", f"method={method}", f"data.train={DATA}",
    f"output_dir={out}", f"training.max_steps={steps}", "training.batch_size=8",
    "max_length=128", "eval.forgetting=false", "eval.samples=0", "training.save_every=null"])
train(config)
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
steady = rows[1:]  # the first step warms up
seconds = steady[-1]["elapsed_s"] - rows[0]["elapsed_s"]
tokens = steady[-1]["tokens"] - rows[0]["tokens"]
gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print("RESULT " + json.dumps({
    "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "gpu_gib": gpu, "tokens_per_s": tokens / seconds, "loss": rows[-1]["loss"]}))
""".replace("{DATA}", str(DATA))


def run(method: str, model: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, method, model, str(steps), f"{out}/run"],
            capture_output=True,
            text=True,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    methods = ("full", "lora", "qlora")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            results[method].append(run(method, args.model, args.steps))
    print(
        f"{args.model}, {args.steps} steps of 8 examples (max_length 128), median of {args.repeats}"
    )
    print(
        f"{'method':8s} {'peak RSS GiB':>13s} {'peak GPU GiB':>13s} {'tokens/s':>9s} {'loss':>7s}"
    )
    for method in methods:
        rows = results[method]
        gpu = [r["gpu_gib"] for r in rows if r["gpu_gib"] is not None]
        shown_gpu = f"{statistics.median(gpu):13.2f}" if gpu else f"{'-':>13s}"
        print(
            f"{method:8s} {statistics.median(r['rss_gib'] for r in rows):13.2f} {shown_gpu} "
            f"{statistics.median(r['tokens_per_s'] for r in rows):9.0f} "
            f"{statistics.median(r['loss'] for r in rows):7.3f}"
        )


if __name__ == "__main__":
    main()

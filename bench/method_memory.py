"""Peak memory and speed of full fine-tuning, LoRA and QLoRA on the same model and data.

Each method runs in its own process (peak RSS from the OS, and on CUDA the peak GPU memory
torch saw), one at a time, alternating over --repeats rounds; the median of each is shown.
With --reference FILE the per-step losses are compared with a reference run's (one written
by --write-reference, e.g. on the CPU in fp32).

    .venv/bin/python bench/method_memory.py [--model smollm2-135m] [--steps 6] [--repeats 2]
        [--device auto|cpu|cuda] [--precision auto|fp32|bf16] [--attention auto|flash_attention_2]
        [--packing] [--reference FILE | --write-reference FILE]
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

CHILD = r"""
import json, resource, sys, torch
from sftforge.config.loading import load_config
from sftforge.training.loop import train
method, model, steps, out, *extra = sys.argv[1:]
config = load_config(None, [f"model={model}", f"method={method}", f"data.train={DATA}",
    f"output_dir={out}", f"training.max_steps={steps}", "training.batch_size=8",
    "max_length=128", "eval.forgetting=false", "eval.samples=0", "training.save_every=null",
    *extra])
train(config)
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
steady = rows[1:]  # the first step warms up
seconds = steady[-1]["elapsed_s"] - rows[0]["elapsed_s"]
tokens = steady[-1]["tokens"] - rows[0]["tokens"]
gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print("RESULT " + json.dumps({
    "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "gpu_gib": gpu, "tokens_per_s": tokens / seconds, "loss": rows[-1]["loss"],
    "losses": [row["loss"] for row in rows]}))
""".replace("{DATA}", str(DATA))


def run(method: str, model: str, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, method, model, str(steps), f"{out}/run", *extra],
            capture_output=True,
            text=True,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
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
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--reference", help="JSON of per-step losses to compare with")
    parser.add_argument("--write-reference", help="write this run's per-step losses here")
    args = parser.parse_args()
    methods = args.methods.split(",")
    extra = [f"training.device={args.device}", f"training.precision={args.precision}"]
    extra += [f"attention={args.attention}", f"training.packing={str(args.packing).lower()}"]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            results[method].append(run(method, args.model, args.steps, extra))
    reference = json.loads(Path(args.reference).read_text()) if args.reference else {}
    print(f"{args.model}, {args.steps} steps of 8 examples (max_length 128), {' '.join(extra)}")
    print(f"median of {args.repeats}; loss gap: largest |loss - reference| / reference over steps")
    header = f"{'method':8s} {'peak RSS GiB':>13s} {'peak GPU GiB':>13s} {'tokens/s':>9s}"
    print(header + f" {'loss':>7s} {'loss gap':>9s}")
    for method in methods:
        rows = results[method]
        gpu = [r["gpu_gib"] for r in rows if r["gpu_gib"] is not None]
        shown_gpu = f"{statistics.median(gpu):13.2f}" if gpu else f"{'-':>13s}"
        gap = "-"
        if method in reference:
            pairs = zip(rows[0]["losses"], reference[method], strict=False)
            gap = f"{max(abs(a - b) / b for a, b in pairs):.1%}"
        print(
            f"{method:8s} {statistics.median(r['rss_gib'] for r in rows):13.2f} {shown_gpu} "
            f"{statistics.median(r['tokens_per_s'] for r in rows):9.0f} "
            f"{statistics.median(r['loss'] for r in rows):7.3f} {gap:>9s}"
        )
    if args.write_reference:
        losses = {method: results[method][0]["losses"] for method in methods}
        Path(args.write_reference).write_text(json.dumps(losses, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Which LoRA settings learn the most per second: each variant trains on a bundled task and is
measured on a validation split carved from that task's *training* data (never on the task's
held-out set, which only `make demo` and the closing comparison score).

    .venv/bin/python bench/lora_methods.py --task extraction --steps 12 --eval-every 3 \\
        --variant default= --variant rslora=lora.rslora=true \\
        --variant lora_plus=lora.b_lr_ratio=16 --variant dora=lora.dora=true

Each variant is a fresh process (bench/throughput.py) with the same data, seed, examples per
step and schedule; `NAME=KEY=VALUE,KEY=VALUE` sets sftforge config keys on top. The
validation split is `eval.held_out=FRACTION` of the training file, the same examples for
every variant (the split is seeded). Reported per variant: validation loss at each measured
step, training seconds (evaluation not timed), tokens/s, and the time to reach the first
variant's final validation loss (interpolated between measurements), as a ratio to the first
variant's. Raw runs go to bench/results/methods-<task>-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from time_to_quality import time_to  # bench/time_to_quality.py

ROOT = Path(__file__).resolve().parent.parent
TASKS = {  # as `sftforge demo` trains them (src/sftforge/training/demo.py)
    "extraction": {
        "data": "src/sftforge/assets/demo_train.jsonl",
        "max_length": 256,
        "set": ["template=auto"],
    },
    "tools": {
        "data": "src/sftforge/assets/tools_train.jsonl",
        "max_length": 1024,
        "set": ["template=chatml", "training.share_prefixes=true", "training.packing=true"],
    },
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=list(TASKS), default="extraction")
    p.add_argument("--variant", action="append", required=True, help="NAME=KEY=VALUE,...")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--examples-per-step", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="the demo's")
    p.add_argument("--validation", default="0.1", help="eval.held_out of the training data")
    p.add_argument("--emulate-bf16", action="store_true")
    p.add_argument("--timeout", type=int, default=3600)
    return p.parse_args()


def command(args, task: dict, settings: list[str]) -> list[str]:
    sets = task["set"] + [
        f"eval.held_out={args.validation}",
        f"eval.every={args.eval_every}",
        "lora.r=16",
        "lora.alpha=32",
        *settings,
    ]
    return [
        sys.executable, "bench/throughput.py", "--data", task["data"], "--method", "lora",
        "--precision", args.precision, "--examples-per-step", str(args.examples_per_step),
        "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
        "--warmup-steps", "1", "--max-length", str(task["max_length"]), "--lr", str(args.lr),
        *(["--emulate-bf16"] if args.emulate_bf16 else []),
        *[f"--set={item}" for item in sets],
    ]  # fmt: skip


def main() -> None:
    args = parse_args()
    task = TASKS[args.task]
    runs = []
    for spec in args.variant:
        name, _, sets = spec.partition("=")
        settings = [s for s in sets.split(",") if s]
        cmd = command(args, task, settings)
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            sys.exit(f"{name}: failed\n{done.stderr[-3000:]}")
        (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        result = json.loads(line.removeprefix("RESULT "))
        curve = {int(step): tuple(v) for step, v in result["held_out"].items()}
        runs.append({"name": name, "settings": settings, "wall_s": time.monotonic() - started,
                     "result": result, "curve": curve})  # fmt: skip
        print(f"{name}: {[round(v[1], 4) for _, v in sorted(curve.items())]}", flush=True)

    baseline = runs[0]
    target = baseline["curve"][max(baseline["curve"])][1]
    base_time = time_to(target, baseline["curve"])
    steps = sorted(baseline["curve"])
    print(f"\ntask {args.task}, target: {baseline['name']}'s last validation loss {target:.4f}\n")
    print("| variant | " + " | ".join(f"step {s}" for s in steps)
          + " | tokens/s | s to target | speed-up |")  # fmt: skip
    print("|---|" + "---:|" * (len(steps) + 3))
    for run in runs:
        seconds = time_to(target, run["curve"])
        ratio = f"{base_time / seconds:.2f}x" if seconds else "never"
        losses = " | ".join(f"{run['curve'][s][1]:.4f}" for s in steps)
        secs = f"{seconds:.0f}" if seconds else "-"
        print(
            f"| {run['name']} | {losses} | {run['result']['tokens_per_s']:.0f} | {secs} | {ratio} |"
        )
        run["seconds_to_target"] = seconds
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"methods-{args.task}-{stamp}.json"
    out.write_text(json.dumps({"command": sys.argv, "args": vars(args), "target": target,
                               "runs": runs}, indent=1))  # fmt: skip
    print(f"\nwritten: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Does bf16 learn like fp32, and how much faster is it? Runs bench/throughput.py for full
fine-tuning and LoRA in fp32, in bf16 with round-to-nearest weights, and in bf16 with
stochastic rounding (the default), one after the other on this machine, and prints each
step's training loss with its gap to fp32, and each run's tokens/s against fp32's.

    .venv/bin/python bench/bf16_rounding.py --steps 16

Needs a CPU with fast bf16 (avx512_bf16 or AMX) or a GPU for the speed figures to mean
anything; `--emulate-bf16` gives bf16's losses at fp32's speed elsewhere. Raw runs go to
bench/results/bf16-rounding-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [  # name, precision, extra overrides
    ("fp32", "fp32", []),
    ("bf16 nearest", "bf16", ["training.bf16_rounding=nearest"]),
    ("bf16 stochastic", "bf16", ["training.bf16_rounding=stochastic"]),
]
LEARNING_RATES = {"full": 2e-5, "lora": 2e-4}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(method: str, precision: str, sets: list[str], args) -> dict:
    cmd = [
        sys.executable, "bench/throughput.py", "--method", method, "--precision", precision,
        "--examples-per-step", "16", "--micro-batch", "8", "--steps", str(args.steps),
        "--warmup-steps", "1", "--lr", str(LEARNING_RATES[method]),
        *(["--emulate-bf16"] if args.emulate_bf16 and precision == "bf16" else []),
        *[f"--set={s}" for s in sets],
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: failed\n{done.stderr[-3000:]}")
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=["full", "lora"])
    p.add_argument("--emulate-bf16", action="store_true")
    args = p.parse_args()
    runs: dict[str, dict] = {}
    for method in args.methods:
        for name, precision, sets in VARIANTS:
            result = run(method, precision, sets, args)
            runs[f"{method}: {name}"] = result
            print(f"{method}: {name}: {result['tokens_per_s']:.1f} tokens/s", flush=True)
        base = runs[f"{method}: fp32"]
        print(f"\n{method}, lr {LEARNING_RATES[method]} constant, 16 examples a step\n")
        print("| step | " + " | ".join(f"{n} | gap" for n, _, _ in VARIANTS[1:]) + " | fp32 |")
        print("|---:|" + "---:|---:|" * (len(VARIANTS) - 1) + "---:|")
        for i, ref in enumerate(base["losses"]):
            cells = []
            for name, _, _ in VARIANTS[1:]:
                loss = runs[f"{method}: {name}"]["losses"][i]
                cells += [f"{loss:.4f}", f"{(loss / ref - 1) * 100:+.1f} %"]
            print(f"| {i + 1} | " + " | ".join(cells) + f" | {ref:.4f} |")
        for name, _, _ in VARIANTS:
            run_ = runs[f"{method}: {name}"]
            ratio = run_["tokens_per_s"] / base["tokens_per_s"]
            print(f"{name}: {run_['tokens_per_s']:.1f} tokens/s, {ratio:.2f}x fp32")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"bf16-rounding-{stamp}.json"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    out.write_text(json.dumps({"command": sys.argv, "machine": cpu_name(), "git": commit,
                               "emulated_bf16": args.emulate_bf16, "runs": runs}, indent=1))  # fmt: skip
    print(f"\nwritten: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

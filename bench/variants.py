"""sftforge against itself: the same short run under several settings, one after another.

    .venv/bin/python bench/variants.py --data long --steps 6 \\
        --variant "--token-budget 2048" --variant "--token-budget 8192" \\
        --variant "--token-budget 4096 --packing"

Each --variant is a string of extra bench/throughput.py flags; every run is a fresh process
under /usr/bin/time -v. For choosing a layout or precision and for measuring what an option
costs (gradient checkpointing, compile); comparisons with TRL belong to bench/compare.py.
Single runs on a shared machine: differences under about 10 % are noise.
"""

import argparse
import json
import os
import shlex
from pathlib import Path

from compare import DATASETS, OUR_PYTHON, RUN_ENV, run_measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=list(DATASETS), default="demo")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.397, help="bench/matmul_peak.py")
    p.add_argument("--variant", action="append", required=True, help="extra throughput.py flags")
    p.add_argument("--out", type=Path, help="write the raw runs here (JSON)")
    args = p.parse_args()

    os.environ.update(RUN_ENV)
    runs = []
    for variant in args.variant:
        cmd = [
            str(OUR_PYTHON), "bench/throughput.py", "--data", str(DATASETS[args.data]),
            "--method", args.method, "--steps", str(args.steps),
            "--warmup-steps", str(args.warmup_steps), "--peak-tflops", str(args.peak_tflops),
            *shlex.split(variant),
        ]  # fmt: skip
        print(f"$ {shlex.join(cmd)}", flush=True)
        record = run_measured(cmd, timeout=3600) | {"variant": variant}
        runs.append(record)
        r = record["result"]
        if r is None:
            print(f"FAILED: {record.get('stderr_tail', '')[-800:]}", flush=True)
            continue
        print(
            f"  {r['tokens_per_s']:.1f} tok/s, {r['trained_tokens_per_s']:.1f} trained/s, "
            f"MFU {r['mfu']:.1%}, {record['max_rss_kb'] / 2**20:.2f} GiB, "
            f"losses {[round(x, 4) for x in r['losses']]}",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {"settings": vars(args) | {"out": str(args.out)}, "runs": runs},
                indent=1,
                default=str,
            )
        )
    print(
        f"\n| {args.data} ({args.method}) | tokens/s | trained/s | MFU | peak RSS GiB | last loss |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for record in runs:
        r = record["result"]
        if r:
            print(
                f"| `{record['variant']}` | {r['tokens_per_s']:.0f} | "
                f"{r['trained_tokens_per_s']:.0f} | {r['mfu']:.0%} | "
                f"{record['max_rss_kb'] / 2**20:.2f} | {r['losses'][-1]:.4f} |"
            )


if __name__ == "__main__":
    main()

"""Training throughput of sftforge alone on the embedded SmolLM2-135M (no peer).

    .venv/bin/python bench/throughput.py --method lora --precision bf16 --batch-size 8 --steps 12

Reports all tokens/s and trained tokens/s over the steps after the first two (warm-up).
The side-by-side comparison with TRL (issue 4) follows shared/BENCHMARKING.md; this script
only measures our own loop.
"""

import argparse
import json
import tempfile
from pathlib import Path

from sftforge.config import load_config
from sftforge.train import train

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--data", default=str(DEMO))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            None,
            [
                f"data.train={args.data}",
                f"output_dir={out}",
                f"method={args.method}",
                f"training.precision={args.precision}",
                f"training.batch_size={args.batch_size}",
                f"training.max_steps={args.steps}",
                "max_length=256",
            ],
        )
        train(config)
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    warm = rows[1]
    last = rows[-1]
    seconds = last["elapsed_s"] - warm["elapsed_s"]
    result = {
        "method": args.method,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "steps_timed": len(rows) - 2,
        "tokens_per_s": round((last["tokens"] - warm["tokens"]) / seconds, 1),
        "trained_tokens_per_s": round(
            (last["trained_tokens"] - warm["trained_tokens"]) / seconds, 1
        ),
        "first_loss": rows[0]["loss"],
        "last_loss": last["loss"],
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

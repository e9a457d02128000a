"""sftforge's side of the benchmark: train a few steps on the embedded SmolLM2-135M and print
one `RESULT {json}` line with the same keys as bench/run_trl.py.

    .venv/bin/python bench/throughput.py --method lora --precision bf16 \\
        --examples-per-step 32 --token-budget 4096 --steps 8 --warmup-steps 2

Throughput is measured over the steps after the warm-up ones, from the run's metrics.jsonl
(model loading and data preparation are not timed). bench/compare.py runs this alternately
with TRL; see docs/benchmarks.md.
"""

import argparse
import contextlib
import json
import tempfile
from importlib.metadata import version
from pathlib import Path

from emulated_bf16 import EmulatedBf16Matmuls  # bench/emulated_bf16.py

from sftforge.config.loading import load_config
from sftforge.training.loop import train

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEMO))
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "pure_bf16"])
    p.add_argument("--examples-per-step", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--token-budget", type=int, help="tokens per micro-batch instead")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, help="bf16 or fp32 matmul peak, for MFU")
    p.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE")
    p.add_argument("--held-out", help="held-out file: its loss every --eval-every steps")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument(
        "--emulate-bf16",
        action="store_true",
        help="bf16 matmuls computed in fp32 and rounded (bench/emulated_bf16.py): bf16's "
        "losses at fp32's speed on a CPU without fast bf16; its speed figures mean nothing",
    )
    args = p.parse_args()

    if args.token_budget:
        micro, accum = args.examples_per_step, 1
    else:
        micro, accum = args.micro_batch, args.examples_per_step // args.micro_batch
        assert micro * accum == args.examples_per_step, "micro-batch must divide the step"
    lr = args.lr or (2e-4 if args.method == "lora" else 2e-5)
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"data.train={args.data}",
            f"output_dir={out}",
            f"method={args.method}",
            f"max_length={args.max_length}",
            "lora.dropout=0.0",
            f"training.precision={args.precision}",
            f"training.batch_size={micro}",
            f"training.grad_accum={accum}",
            f"training.max_steps={args.steps}",
            f"training.lr={lr}",
            "training.schedule=constant",
            "training.warmup_ratio=0",
            "training.weight_decay=0",
            "training.max_grad_norm=1.0",
            f"training.seed={args.seed}",
            f"training.packing={str(args.packing).lower()}",
            f"training.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
            f"training.compile={str(args.compile).lower()}",
            "eval.forgetting=false",
            "eval.samples=0",
        ]
        if args.token_budget:
            overrides.append(f"training.micro_batch_tokens={args.token_budget}")
        if args.held_out:
            overrides += [f"eval.held_out={args.held_out}", f"eval.every={args.eval_every}"]
        if args.peak_tflops:
            overrides.append(f"training.peak_tflops={args.peak_tflops}")
        numerics = EmulatedBf16Matmuls() if args.emulate_bf16 else contextlib.nullcontext()
        with numerics:
            train(load_config(None, overrides + args.set))
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]

    warm, last = rows[args.warmup_steps - 1], rows[-1]
    seconds = last["elapsed_s"] - warm["elapsed_s"]
    tflops = (last["tflops"] * last["elapsed_s"] - warm["tflops"] * warm["elapsed_s"]) / seconds
    result = {
        "tool": "sftforge",
        "method": args.method,
        "precision": args.precision,
        "micro_batch": None if args.token_budget else micro,
        "grad_accum": accum,
        "token_budget": args.token_budget,
        "packing": args.packing,
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile,
        "emulated_bf16": args.emulate_bf16,
        "examples_per_step": args.examples_per_step,
        "steps_timed": len(rows) - args.warmup_steps,
        "tokens_per_s": (last["tokens"] - warm["tokens"]) / seconds,
        "trained_tokens_per_s": (last["trained_tokens"] - warm["trained_tokens"]) / seconds,
        "tflops": tflops,
        "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
        "micro_batches_per_step": last["micro_batches"],
        "losses": [r["loss"] for r in rows],
        # step -> (training seconds at its end, held-out loss): evaluation is not timed
        "held_out": {r["step"]: (r["elapsed_s"], r["eval_loss"]) for r in rows if "eval_loss" in r},
        "trained_tokens_total": last["trained_tokens"],
        "versions": {k: version(k) for k in ("torch", "transformers", "peft")},
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

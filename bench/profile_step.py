"""Where one optimizer step's time goes: torch.profiler over a LoRA step on the demo data.

    .venv/bin/python bench/profile_step.py [--precision auto|fp32|bf16] [--set KEY=VALUE ...]

The run is set up as `sftforge train` would (sftforge.train.start: model, adapters, data,
optimizer), then steps of --examples-per-step demo examples in micro-batches of
--micro-batch run through the same gradient accumulation as training. After --warmup
unprofiled steps, one step is timed plainly and one under the profiler. Prints the step time,
the share of CPU time of each group of operators (matmuls, attention, elementwise, copies,
the rest), and the top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from sftforge.config.loading import load_config
from sftforge.encode.batches import collate
from sftforge.training.loop import start
from sftforge.training.stochastic_rounding import rounding_for_step
from sftforge.training.update import accumulate_gradients

DEMO = Path(__file__).resolve().parent.parent / "src/sftforge/assets/demo_train.jsonl"
GROUPS = {  # operator name fragments -> group; the first match wins
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "bmm"),
    "matmuls": ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear"),
    "copies": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous"),
    "elementwise": (
        "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow",
        "aten::rsqrt", "aten::mean", "aten::neg", "aten::cat", "aten::exp", "aten::where",
        "aten::sum", "aten::fill_", "aten::zero_", "aten::clone",
    ),
}  # fmt: skip


def group_of(name: str) -> str:
    for group, fragments in GROUPS.items():
        if any(name.startswith(f) or f in name for f in fragments):
            return group
    return "the rest"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="auto")
    p.add_argument("--examples-per-step", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            None,
            [
                f"data.train={DEMO}",
                f"output_dir={out}",
                "lora.dropout=0.0",
                f"training.precision={args.precision}",
                f"training.batch_size={args.micro_batch}",
                "eval.forgetting=false",
                "eval.samples=0",
                *args.set,
            ],
        )
        run = start(config)
        examples = [run.data.examples[i] for i in range(args.examples_per_step)]
        batches = [
            collate(examples[i : i + args.micro_batch], run.encoder.pad_id)
            for i in range(0, len(examples), args.micro_batch)
        ]

        def step():
            learner = run.learner
            with rounding_for_step(learner.rounding, seed=0):  # bf16: stochastic rounding
                accumulate_gradients(
                    learner.trainer, batches, learner.device, learner.amp, pad_id=run.encoder.pad_id
                )
            learner.optimizer.step()
            learner.optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()

    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        shares[group_of(e.key)] = shares.get(group_of(e.key), 0) + e.self_cpu_time_total
    tokens = sum(b.real_tokens for b in batches)
    print(f"one step: {seconds:.2f} s unprofiled, {tokens} tokens, precision {args.precision}")
    print("| group | share of self CPU time |\n|---|---:|")
    for group, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {t / total:.0%} |")
    print("\n| operator | share |\n|---|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / total:.1%} |")


if __name__ == "__main__":
    main()

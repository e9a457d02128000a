"""`make demo`: teach the embedded SmolLM2-135M a fixed JSON extraction format with LoRA and
show, on held-out prompts written in sentence forms, names and cities never seen in training,
the base model's answers beside the fine-tuned model's, with accuracy and forgetting."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .assessment import headline
from .config_file import load_config
from .forgetting import bundled
from .train import train

SHOWN = 5


def demo_config(output_dir: Path, overrides: list[str]):
    return load_config(
        None,
        overrides,
        model="smollm2-135m",
        method="lora",
        max_length=256,
        output_dir=str(output_dir),
        # `make demo` again replaces the last demo run, unless asked to resume it.
        overwrite_output_dir=not any(o.startswith("resume=") for o in overrides),
        data={"train": str(bundled("demo_train.jsonl"))},
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        training={"lr": 3e-4, "epochs": 3, "batch_size": 8, "warmup_ratio": 0.1},
        eval={
            "held_out": str(bundled("demo_eval.jsonl")),
            "every": 25,
            "scorer": {"kind": "json"},
            "max_prompts": 60,
            "max_new_tokens": 48,
            "samples": 60,
        },
    )


def run_demo(output_dir: Path, overrides: list[str]) -> None:
    started = time.perf_counter()
    train(demo_config(output_dir, overrides))
    summary = json.loads((output_dir / "summary.json").read_text())
    for sample in summary["samples"][:SHOWN]:
        print("\n" + "=" * 78)
        print("PROMPT    " + sample["prompt"].replace("\n", " "))
        print("EXPECTED  " + sample["reference"])
        for name in ("before", "after"):
            mark = "ok " if sample[f"score_{name}"] == 1.0 else "BAD"
            label = "BASE " if name == "before" else "TUNED"
            print(f"{label}     {mark} {sample[name].strip()[:160]!r}")
    print("\n" + "=" * 78)
    for line in headline(summary):
        print(line)
    print(f"demo took {time.perf_counter() - started:.0f} s; report: {output_dir / 'report.html'}")

"""`make demo`: teach the embedded SmolLM2-135M a fixed JSON extraction format with LoRA and
show, on held-out prompts written in sentence forms, names and cities never seen in training,
the base model's answers beside the fine-tuned model's, with accuracy and forgetting.
`sftforge demo --task tools` does the same for calling tools (exact tool-call match)."""

from __future__ import annotations

import time
from pathlib import Path

from sftforge.config.loading import load_config
from sftforge.console import say
from sftforge.evaluation.comparison import format_side_by_side
from sftforge.evaluation.forgetting import bundled
from sftforge.training.assessment import headline
from sftforge.training.loop import train
from sftforge.training.run import TrainResult

SHOWN = 5


# The bundled tasks: the demo's JSON extraction, and tool calling (four tools; held-out
# requests whose phrasings and argument values never occur in training; scored by whether
# the generated calls are the reference's).
TASKS = {
    "extraction": {
        "train": "demo_train.jsonl",
        "eval": "demo_eval.jsonl",
        "template": "auto",
        "max_length": 256,
        "scorer": {"kind": "json"},
        "max_new_tokens": 48,
    },
    "tools": {
        "train": "tools_train.jsonl",
        "eval": "tools_eval.jsonl",
        # SmolLM2's own template writes no tools; the chatml built-in writes them its way.
        "template": "chatml",
        "max_length": 1024,
        "scorer": {"kind": "tool_call"},
        "max_new_tokens": 128,  # two parallel calls take about 95 tokens
        # Prompts of about 600 tokens, the tools alone about 460: each row holds them once
        # for the examples it packs (share_prefixes), and no held-out loss between steps.
        "training": {"epochs": 2, "lr": 5e-4, "packing": True, "share_prefixes": True},
        "every": None,
    },
}


def demo_config(output_dir: Path, overrides: list[str], task: str = "extraction"):
    spec = TASKS[task]
    return load_config(
        None,
        overrides,
        model="smollm2-135m",
        method="lora",
        template=spec["template"],
        max_length=spec["max_length"],
        output_dir=str(output_dir),
        # `make demo` again replaces the last demo run, unless asked to resume it.
        overwrite_output_dir=not any(o.startswith("resume=") for o in overrides),
        data={"train": str(bundled(spec["train"]))},
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        training={"lr": 3e-4, "epochs": 3, "batch_size": 8, "warmup_ratio": 0.1}
        | spec.get("training", {}),
        eval={
            "held_out": str(bundled(spec["eval"])),
            "every": spec.get("every", 25),
            "scorer": spec["scorer"],
            "max_prompts": 60,
            "max_new_tokens": spec["max_new_tokens"],
            "samples": 60,
        },
    )


def run_demo(output_dir: str | None, overrides: list[str], task: str = "extraction") -> TrainResult:
    """Train on the task, then show answers before and after (output_dir default:
    runs/demo, or runs/demo-TASK)."""
    output_dir = Path(output_dir or ("runs/demo" if task == "extraction" else f"runs/demo-{task}"))
    started = time.perf_counter()
    result = train(demo_config(output_dir, overrides, task))
    summary = result.summary
    for line in format_side_by_side(summary["samples"][:SHOWN]):
        say(line)
    say("\n" + "=" * 78)
    for line in headline(summary):
        say(line)
    say(f"demo took {time.perf_counter() - started:.0f} s; report: {output_dir / 'report.html'}")
    return result

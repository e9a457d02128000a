"""`make demo`: teach the embedded SmolLM2-135M a fixed JSON extraction format with LoRA and
show, on held-out prompts, the base model's answers beside the fine-tuned model's."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from .config import load_config
from .conversation import Message
from .data import load_conversations
from .evaluate import generate_answers
from .model import default_cache_dir, load_model, load_tokenizer, resolve_model_path
from .templates import resolve_template
from .tokenize import Encoder
from .train import train

SHOWN = 5


def asset(name: str) -> Path:
    return Path(str(resources.files("sftforge").joinpath(f"assets/{name}")))


def demo_config(output_dir: Path, overrides: list[str]):
    return load_config(
        None,
        overrides,
        model="smollm2-135m",
        method="lora",
        max_length=256,
        output_dir=str(output_dir),
        data={"train": str(asset("demo_train.jsonl"))},
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        training={"lr": 3e-4, "epochs": 2, "batch_size": 8, "warmup_ratio": 0.1},
    )


def json_matches(answer: str, reference: str) -> bool:
    try:
        return json.loads(answer) == json.loads(reference)
    except (json.JSONDecodeError, TypeError):
        return False


def held_out_prompts() -> tuple[list[list[Message]], list[str]]:
    loaded = load_conversations(asset("demo_eval.jsonl"))
    prompts = [[m for m in c.messages if m.role != "assistant"] for c in loaded.conversations]
    references = [c.messages[-1].content for c in loaded.conversations]
    return prompts, references


def answers_of(model_dir_or_model, encoder: Encoder, prompts) -> list[str]:
    return generate_answers(model_dir_or_model, encoder, prompts, max_new_tokens=48, batch_size=16)


def run_demo(output_dir: Path, overrides: list[str]) -> None:
    started = time.perf_counter()
    config = demo_config(output_dir, overrides)
    prompts, references = held_out_prompts()

    base_path = resolve_model_path(config.model, default_cache_dir())
    tokenizer = load_tokenizer(base_path)
    encoder = Encoder(tokenizer, resolve_template(config.template, tokenizer))
    print(f"base model: answering {len(prompts)} held-out prompts")
    before = answers_of(load_model(base_path), encoder, prompts)

    train(config)

    from .export import load_base_with_adapter

    tuned, tuned_tokenizer = load_base_with_adapter(output_dir)
    tuned_encoder = Encoder(tuned_tokenizer, resolve_template("auto", tuned_tokenizer))
    after = answers_of(tuned, tuned_encoder, prompts)

    for prompt, ref, b, a in list(zip(prompts, references, before, after, strict=True))[:SHOWN]:
        print("\n" + "=" * 78)
        print("PROMPT    " + prompt[-1].content.replace("\n", " "))
        print("EXPECTED  " + ref)
        print(f"BASE      {'ok ' if json_matches(b, ref) else 'BAD'} {b.strip()[:200]!r}")
        print(f"TUNED     {'ok ' if json_matches(a, ref) else 'BAD'} {a.strip()[:200]!r}")
    acc_before = sum(map(json_matches, before, references)) / len(references)
    acc_after = sum(map(json_matches, after, references)) / len(references)
    print("\n" + "=" * 78)
    print(f"held-out exact JSON match: base {acc_before:.0%} -> fine-tuned {acc_after:.0%}")
    print(f"demo took {time.perf_counter() - started:.0f} s; model in {output_dir}")

"""Config -> everything a run needs: model, tokenizer, template, train and held-out examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config
from .conversation import Conversation, DataError
from .data import LoadResult, Rejects, load_conversations
from .model import (
    add_missing_special_tokens,
    attach_lora,
    attention_implementation,
    default_cache_dir,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from .preflight import check_max_length
from .split import split_held_out
from .templates import resolve_template
from .tokenize import Encoder, EncodingReport, Example, fit_to_length


@dataclass
class Prepared:
    model: torch.nn.Module
    tokenizer: object
    encoder: Encoder
    examples: list[Example]  # what is trained on
    report: EncodingReport
    base_model_path: str
    held_out: list[Conversation] = field(default_factory=list)  # never trained on
    held_out_examples: list[Example] = field(default_factory=list)
    loaded: LoadResult | None = None

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)


def encode_all(conversations, encoder: Encoder, on_invalid: str, rejects: Rejects) -> list[Example]:
    examples = []
    for conv in conversations:
        try:
            examples.append(encoder.encode(conv))
        except DataError as e:
            if on_invalid == "error":
                raise
            # The reason without the location: the rejects file has its own source column.
            reason = f"field '{e.field}': {e.reason}" if e.field else e.reason
            rejects.add(conv.source, reason, {"messages": [m.__dict__ for m in conv.messages]})
    return examples


def load_data(
    config: Config, rejects_path: Path
) -> tuple[LoadResult, list[Conversation], list[Conversation]]:
    """(all loaded, train conversations, held-out conversations), split before anything else."""
    data = config.data
    skip = data.on_invalid == "skip"
    loaded = load_conversations(
        data.train,
        format=data.format,
        columns=data.columns or None,
        on_invalid=data.on_invalid,
        rejects_path=rejects_path if skip else None,
    )
    print(loaded.summary())
    held_out_spec = config.eval.held_out
    if held_out_spec is None:
        return loaded, loaded.conversations, []
    if isinstance(held_out_spec, str):
        held = load_conversations(
            held_out_spec,
            format=data.format,
            columns=data.columns or None,
            on_invalid=data.on_invalid,
        )
        print(f"held-out file {held_out_spec}: {len(held.conversations)} examples")
        return loaded, loaded.conversations, held.conversations
    train, held = split_held_out(loaded.conversations, held_out_spec, config.training.seed)
    print(
        f"held out {len(held)} of {len(loaded.conversations)} examples (seed {config.training.seed})"
    )
    return loaded, train, held


def prepare(config: Config, output_dir: Path) -> Prepared:
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    base_path = resolve_model_path(config.model, cache)
    tokenizer = load_tokenizer(base_path, config.trust_remote_code)
    attention = attention_implementation(config.attention)
    # pure_bf16 stores the frozen weights in bf16 (peft keeps the adapters in fp32): half
    # the memory, and no fp32 -> bf16 casts of weights and activations at every layer.
    dtype = torch.bfloat16 if config.training.precision == "pure_bf16" else torch.float32
    model = load_model(
        base_path,
        config.trust_remote_code,
        dtype=dtype,
        attention=attention,
        allow_pickle=config.allow_pickle,
    )
    template = resolve_template(config.template, tokenizer)
    new_ids = add_missing_special_tokens(tokenizer, model, template.extra_tokens)
    if new_ids:
        print(f"added {len(new_ids)} special tokens the template needs: {template.extra_tokens}")

    encoder = Encoder(tokenizer, template, config.train_on)
    check_max_length(encoder, config.max_length)  # before reading data that could not fit

    rejects_path = Path(config.data.rejects or output_dir / "rejects.jsonl")
    loaded, train_convs, held_out = load_data(config, rejects_path)
    rejected_before = len(loaded.rejects)
    encoded = encode_all(train_convs, encoder, config.data.on_invalid, loaded.rejects)
    held_encoded = encode_all(held_out, encoder, config.data.on_invalid, loaded.rejects)
    if len(loaded.rejects) > rejected_before:
        loaded.rejects.write_jsonl(rejects_path)  # one file holds every reject, whatever stage
        print(
            f"rejected by the chat template: {len(loaded.rejects) - rejected_before} "
            f"(written to {rejects_path})"
        )
    report = EncodingReport()
    examples = fit_to_length(encoded, config.max_length, config.truncation, report)
    print(report.summary(config.max_length))
    if not examples:
        raise DataError(str(config.data.train), "no example is left to train on")
    held_examples = fit_to_length(held_encoded, config.max_length, "truncate", EncodingReport())
    kept = {e.source for e in held_examples}
    held_out = [c for c in held_out if str(c.source) in kept]

    tokenizer.chat_template = template.source  # saved with the model: inference renders alike
    if config.method == "lora":
        lora = config.lora
        model = attach_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules, new_ids)
    return Prepared(
        model,
        tokenizer,
        encoder,
        examples,
        report,
        base_path,
        held_out,
        held_examples,
        loaded,
    )

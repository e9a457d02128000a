"""The training run, top to bottom: data -> examples -> model -> loop -> saved model.

`train()` reads in one sitting: prepare everything, then the loop, then save. The loss of
each optimizer step is normalised by the number of trained tokens in the whole step.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .batches import collate, epoch_batches
from .config import Config, dump_config
from .conversation import DataError
from .data import Rejects, load_conversations
from .loss import summed_token_loss, trained_token_count
from .model import (
    add_missing_special_tokens,
    attach_lora,
    default_cache_dir,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model_path,
)
from .templates import resolve_template
from .tokenize import Encoder, EncodingReport, Example, fit_to_length


@dataclass
class Prepared:
    """Everything the loop needs, built from the config."""

    model: torch.nn.Module
    tokenizer: object
    encoder: Encoder
    examples: list[Example]
    report: EncodingReport
    base_model_path: str
    new_token_ids: list[int]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) where the hardware runs bf16 fast, else none."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def encode_all(conversations, encoder: Encoder, on_invalid: str, rejects: Rejects) -> list[Example]:
    examples = []
    for conv in conversations:
        try:
            examples.append(encoder.encode(conv))
        except DataError as e:
            if on_invalid == "error":
                raise
            rejects.add(conv.source, str(e), {"messages": [m.__dict__ for m in conv.messages]})
    return examples


def prepare(config: Config, output_dir: Path) -> Prepared:
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    base_path = resolve_model_path(config.model, cache)
    tokenizer = load_tokenizer(base_path, config.trust_remote_code)
    model = load_model(base_path, config.trust_remote_code)
    template = resolve_template(config.template, tokenizer)
    new_ids = add_missing_special_tokens(tokenizer, model, template.extra_tokens)
    if new_ids:
        print(f"added {len(new_ids)} special tokens the template needs: {template.extra_tokens}")

    rejects_path = Path(config.data.rejects or output_dir / "rejects.jsonl")
    loaded = load_conversations(
        config.data.train,
        format=config.data.format,
        columns=config.data.columns or None,
        on_invalid=config.data.on_invalid,
        rejects_path=rejects_path if config.data.on_invalid == "skip" else None,
    )
    print(loaded.summary())
    encoder = Encoder(tokenizer, template, config.train_on)
    rejected_before = len(loaded.rejects)
    encoded = encode_all(loaded.conversations, encoder, config.data.on_invalid, loaded.rejects)
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

    tokenizer.chat_template = template.source  # saved with the model: inference renders alike
    if config.method == "lora":
        lora = config.lora
        model = attach_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules, new_ids)
    return Prepared(model, tokenizer, encoder, examples, report, base_path, new_ids)


def learning_rate_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_steps(config: Config, n_examples: int) -> tuple[int, int]:
    """(micro-batches per epoch, total optimizer steps)."""
    t = config.training
    per_epoch = math.ceil(n_examples / t.batch_size)
    if t.max_steps:
        return per_epoch, t.max_steps
    return per_epoch, max(1, math.ceil(per_epoch * t.epochs / t.grad_accum))


def micro_batch_stream(examples: list[Example], batch_size: int, seed: int):
    """Endless (epoch, indices) stream, reshuffled every epoch."""
    epoch = 0
    while True:
        for indices in epoch_batches(examples, batch_size, seed, epoch):
            yield epoch, indices
        epoch += 1


def accumulate_gradients(model, batches, device, amp) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step.

    Each micro-batch contributes (sum of its token losses) / (trained tokens in the whole
    step), so the gradient is that of the mean over the step's trained tokens, however the
    step is split. Returns (that mean loss, trained tokens)."""
    step_trained = sum(trained_token_count(b.labels) for b in batches)
    total = 0.0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss_sum = summed_token_loss(model, batch.input_ids, batch.labels)
        (loss_sum / step_trained).backward()
        total += loss_sum.item()
    return total / step_trained, step_trained


def train(config: Config) -> Path:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.training.seed)
    t = config.training
    device = pick_device(t.device)
    prep = prepare(config, output_dir)
    model = prep.model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=t.weight_decay, foreach=True
    )
    amp = autocast_dtype(t.precision, device)
    per_epoch, total_steps = optimizer_steps(config, len(prep.examples))
    warmup = int(t.warmup_ratio * total_steps)
    pad_id = prep.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (prep.tokenizer.eos_token_id or 0)
    trainable = sum(p.numel() for p in params)
    print(
        f"training {config.method} on {device} ({'bf16 autocast' if amp else 'fp32'}): "
        f"{len(prep.examples)} examples, {total_steps} steps of {t.batch_size}x{t.grad_accum}, "
        f"{trainable:,} trainable parameters, lr {config.learning_rate:g}"
    )

    stream = micro_batch_stream(prep.examples, t.batch_size, t.seed)
    metrics = (output_dir / "metrics.jsonl").open("w")
    start = time.perf_counter()
    tokens_seen = trained_seen = 0
    bar = tqdm(range(total_steps), desc="train", dynamic_ncols=True)
    for step in bar:
        lr = learning_rate_at(step, total_steps, warmup, config.learning_rate, t.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(stream) for _ in range(t.grad_accum)]
        batches = [collate([prep.examples[i] for i in idx], pad_id) for _, idx in micro]
        step_loss, step_trained = accumulate_gradients(model, batches, device, amp)
        grad_norm = None
        if t.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += sum(b.real_tokens for b in batches)
        trained_seen += step_trained
        elapsed = time.perf_counter() - start
        record = {
            "step": step + 1,
            "epoch": round(micro[-1][0] + 1, 3),
            "loss": step_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens_seen,
            "trained_tokens": trained_seen,
            "tokens_per_s": tokens_seen / elapsed,
            "trained_tokens_per_s": trained_seen / elapsed,
            "elapsed_s": elapsed,
        }
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if (step + 1) % t.log_every == 0 or step + 1 == total_steps:
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
    bar.close()
    metrics.close()
    save(model, prep, config, output_dir)
    print(f"saved to {output_dir}")
    return output_dir


def save(model, prep: Prepared, config: Config, output_dir: Path) -> None:
    """Model (or adapter), tokenizer with its chat template, and the resolved config."""
    model.eval()
    end_ids = sorted(end_of_turn_ids(prep))
    if hasattr(model, "peft_config"):
        model.save_pretrained(output_dir, safe_serialization=True)
        base = model.get_base_model()
    else:
        base = model
    if base.generation_config is not None and end_ids:
        # Generation must stop at the template's end-of-turn token, whichever it is.
        base.generation_config.eos_token_id = end_ids
        base.generation_config.pad_token_id = prep.tokenizer.pad_token_id
    if not hasattr(model, "peft_config"):
        model.save_pretrained(output_dir, safe_serialization=True)
    else:
        base.generation_config.save_pretrained(output_dir)
    prep.tokenizer.save_pretrained(output_dir)
    dump_config(config, output_dir / "sftforge.yaml")
    (output_dir / "data_report.json").write_text(
        json.dumps(prep.report.__dict__ | {"base_model": prep.base_model_path}, indent=2)
    )


def end_of_turn_ids(prep: Prepared) -> set[int]:
    """Tokens that end a turn: the eos token and every special token that closed a trained
    assistant turn (e.g. <|im_end|> when a base model whose eos is </s> learns ChatML)."""
    eos = prep.tokenizer.eos_token_id
    return prep.encoder.end_of_turn_ids | ({eos} if eos is not None else set())

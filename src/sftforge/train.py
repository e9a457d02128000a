"""The training run, top to bottom: prepare -> measure before -> loop -> measure after -> save.

`train()` reads in one sitting. The loss of each optimizer step is normalised by the number
of trained tokens in the whole step, however it is split into micro-batches.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .assessment import build_assessment, finish_report
from .batches import Batch, epoch_steps, step_batches
from .checkpoint import (
    check_same_run,
    latest_checkpoint,
    load_checkpoint,
    publish_best,
    remove_unfinished,
    run_identity,
    save_best,
    save_checkpoint,
    save_final,
)
from .config import Config
from .export import save_run
from .flops import flop_model
from .guards import NonFiniteError, RunInterrupted, nonfinite_step, nonfinite_stop, stop_requests
from .loss import summed_token_loss
from .model import (
    compile_decoder_layers,
    enable_gradient_checkpointing,
    pick_device,
    verify_packing_isolation,
)
from .preflight import (
    check_data_files,
    check_free_disk,
    check_writable,
    checkpoint_bytes,
    resume_point,
)
from .prepare import prepare


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
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def learning_rate_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_steps(config: Config, n_examples: int) -> int:
    t = config.training
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(n_examples / (t.batch_size * t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def step_stream(n_examples: int, examples_per_step: int, seed: int):
    """Endless (epoch, example indices of one optimizer step), reshuffled every epoch."""
    epoch = 0
    while True:
        for indices in epoch_steps(n_examples, examples_per_step, seed, epoch):
            yield epoch, indices
        epoch += 1


@contextmanager
def adapter_input_casts(model, enabled: bool):
    """Switch peft's cast of adapter inputs to the adapter dtype on or off (its layers'
    documented `cast_input_dtype_enabled` flag), restoring it afterwards. (peft's own
    `disable_input_dtype_casting` fails on models with trainable-token layers.)"""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = enabled
    try:
        yield
    finally:
        for m, value in zip(layers, before, strict=True):
            m.cast_input_dtype_enabled = value


def accumulate_gradients(model, batches: list[Batch], device, amp) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step.

    Each micro-batch contributes (sum of its token losses) / (trained tokens in the whole
    step), so the gradient is that of the mean over the step's trained tokens, however the
    step is split. Returns (that mean loss, trained tokens)."""
    step_trained = sum(b.trained_tokens for b in batches)
    total = 0.0
    # Under autocast, peft's own cast of each adapter's input to fp32 only adds a copy per
    # adapter (kept for the backward): autocast runs those matmuls in bf16 anyway.
    with adapter_input_casts(model, enabled=amp is None):
        for batch in batches:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss_sum = summed_token_loss(
                    model, batch.input_ids, batch.labels, batch.position_ids
                )
            (loss_sum / step_trained).backward()
            total += loss_sum.item()
    return total / step_trained, step_trained


@dataclass
class Progress:
    """What the loop has counted so far; saved in every checkpoint and restored on resume."""

    tokens: int = 0
    trained_tokens: int = 0
    flops: float = 0.0
    elapsed_s: float = 0.0  # training time alone, evaluation excluded
    best_eval: float = math.inf
    skipped_steps: int = 0


def train(config: Config) -> Path:
    output_dir = Path(config.output_dir)
    t = config.training
    check_writable(output_dir)
    check_data_files(config)
    for leftover in remove_unfinished(output_dir):
        print(f"removed {leftover.name}, left unfinished by an interrupted run")
    resume_from = resume_point(config.resume, config.overwrite_output_dir, output_dir)
    set_seed(t.seed)
    device = pick_device(t.device)
    prep = prepare(config, output_dir)
    model = prep.model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=t.weight_decay, **_fast_adamw(device)
    )
    checkpoints = max(2, t.keep_checkpoints + 1)  # the newest K, and the one being written
    check_free_disk(
        output_dir,
        checkpoints * checkpoint_bytes(params) + sum(p.nbytes for p in params),
        f"{checkpoints} checkpoints and the final weights",
    )
    amp = autocast_dtype(t.precision, device)
    total_steps = optimizer_steps(config, len(prep.examples))
    warmup = int(t.warmup_ratio * total_steps)
    print(
        f"training {config.method} on {device} ({_precision_note(t.precision, amp)}): "
        f"{len(prep.examples)} examples, {total_steps} steps of {t.batch_size}x{t.grad_accum} "
        f"examples{_micro_batch_note(config)}, "
        f"{sum(p.numel() for p in params):,} trainable parameters, lr {config.learning_rate:g}"
    )
    assessment = build_assessment(
        config, prep.encoder, prep.held_out, prep.held_out_examples, prep.pad_id, device
    )
    identity = run_identity(config, prep)
    if resume_from is None:
        print("measuring the model before training")
        before = assessment.measure(model)

    if t.packing:
        verify_packing_isolation(model, device)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if t.compile:
        print(
            "warning: training.compile is experimental: on SmolLM2 LoRA bf16 its loss curve "
            "differs from eager bf16 after the first update, lying nearer to fp32 "
            "(docs/benchmarks.md)"
        )
        compile_decoder_layers(model)
    flops = flop_model(model, config.method)
    model.train()
    lengths = [len(ex.input_ids) for ex in prep.examples]
    stream = step_stream(len(lengths), t.batch_size * t.grad_accum, t.seed)
    pack_length = config.max_length if t.packing else None
    done, progress = 0, Progress()
    if resume_from is not None:
        # Last, after anything above that draws random numbers: the RNG states come back too.
        resumed = load_checkpoint(resume_from, model, optimizer)
        check_same_run(resumed.state["identity"], identity, resume_from)
        done, before = resumed.step, resumed.state["before"]
        progress = Progress(**resumed.state["progress"])
        for _ in range(done):
            next(stream)  # the data position: the next step drawn is the first unseen one
        print(f"resumed from {resume_from} after step {done} of {total_steps}")

    def save(step: int) -> Path:
        state = {"identity": identity, "before": before, "progress": asdict(progress)}
        return save_checkpoint(
            output_dir,
            step,
            model,
            optimizer,
            state,
            t.keep_checkpoints,
            save_model=lambda folder: save_run(model, prep, config, folder),
        )

    started = time.perf_counter() - progress.elapsed_s
    eval_seconds = 0.0  # excluded from throughput: tokens/s measures training alone
    record: dict = {}
    bar = tqdm(
        range(done, total_steps), desc="train", dynamic_ncols=True, initial=done, total=total_steps
    )
    with open_metrics(output_dir / "metrics.jsonl", done) as metrics, stop_requests() as stop:
        for step in bar:
            lr = learning_rate_at(step, total_steps, warmup, config.learning_rate, t.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            epoch, indices = next(stream)
            batches = step_batches(
                prep.examples,
                lengths,
                indices,
                prep.pad_id,
                t.batch_size,
                t.micro_batch_tokens,
                pack_length,
            )
            step_loss, step_trained = accumulate_gradients(model, batches, device, amp)
            grad_norm = gradient_norm(params, t.max_grad_norm)
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
            else:  # the update is not applied; stop, unless told to skip a few such steps
                progress.skipped_steps += 1
                what = nonfinite_step(step + 1, step_loss, grad_norm, indices, prep)
                if progress.skipped_steps > t.skip_nonfinite_steps:
                    raise NonFiniteError(nonfinite_stop(what, output_dir))
                print(
                    f"warning: {what}; skipped it ({progress.skipped_steps} of "
                    f"training.skip_nonfinite_steps={t.skip_nonfinite_steps})"
                )
            optimizer.zero_grad(set_to_none=True)

            progress.tokens += sum(b.real_tokens for b in batches)
            progress.trained_tokens += step_trained
            progress.flops += sum(
                flops.step_flops(b.example_lengths, b.trained_tokens) for b in batches
            )
            progress.elapsed_s = time.perf_counter() - started - eval_seconds
            record = step_record(step + 1, epoch + 1, step_loss, lr, grad_norm, progress, t)
            record["micro_batches"] = len(batches)
            record["rows"] = sum(len(b.input_ids) for b in batches)  # < examples when packed
            if not finite:
                record["skipped"] = True
            if assessment.held_out and _due(step + 1, total_steps, config.eval.every):
                eval_start = time.perf_counter()
                record["eval_loss"] = assessment.loss(model)
                if config.eval.save_best and record["eval_loss"] < progress.best_eval:
                    progress.best_eval = record["eval_loss"]
                    save_best(model, prep, config, output_dir)
                eval_seconds += time.perf_counter() - eval_start
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if (step + 1) % t.log_every == 0 or step + 1 == total_steps:
                bar.set_postfix(_progress(record), refresh=False)
            if _due(step + 1, total_steps, t.save_every) or stop.signal:
                save(step + 1)
            if stop.signal and step + 1 < total_steps:
                bar.close()
                raise RunInterrupted(
                    f"stopped by {stop.signal.name} after step {step + 1} of {total_steps}; "
                    f"checkpoint saved to {latest_checkpoint(output_dir)}. To go on, run the "
                    "same command with resume=auto",
                    stop.signal,
                )
    bar.close()

    print("measuring the model after training")
    # The loop already measured the final eval loss on these weights; do not repeat it.
    after = assessment.measure(model, eval_loss=record.get("eval_loss"))
    publish_best(output_dir)
    save_final(model, prep, config, output_dir)
    summary = assessment.compare(before, after, config.eval.samples)
    finish_report(config, prep, assessment, summary, output_dir)
    print(f"saved to {output_dir}")
    return output_dir


def gradient_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' total norm, clipping them to `max_norm` when set."""
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def step_record(step, epoch, loss, lr, grad_norm, progress: Progress, t) -> dict:
    elapsed = max(progress.elapsed_s, 1e-9)
    record = {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": progress.tokens,
        "trained_tokens": progress.trained_tokens,
        "tokens_per_s": progress.tokens / elapsed,
        "trained_tokens_per_s": progress.trained_tokens / elapsed,
        "tflops": progress.flops / elapsed / 1e12,
        "elapsed_s": progress.elapsed_s,
    }
    if t.peak_tflops:
        record["mfu"] = record["tflops"] / t.peak_tflops
    return record


def open_metrics(path: Path, done: int):
    """metrics.jsonl for writing, keeping the rows of the `done` steps resumed from (a killed
    run may have left later rows, the last one cut short)."""
    kept = []
    if done and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= done:
                    kept.append(line)
            except json.JSONDecodeError:
                break
    metrics = path.open("w")
    for line in kept:
        metrics.write(line + "\n")
    return metrics


def _fast_adamw(device: torch.device) -> dict:
    """The fused AdamW kernel where torch has one for the device, else the foreach one."""
    if device.type in ("cuda", "cpu", "mps"):
        return {"fused": True}
    return {"foreach": True}


def _precision_note(precision: str, amp: torch.dtype | None) -> str:
    if precision == "pure_bf16":
        return "bf16 frozen weights, fp32 adapters, bf16 autocast"
    return "bf16 autocast, fp32 master weights" if amp else "fp32"


def _micro_batch_note(config: Config) -> str:
    t = config.training
    parts = []
    if t.micro_batch_tokens:
        parts.append(f"micro-batches of <= {t.micro_batch_tokens} tokens")
    if t.packing:
        parts.append(f"packed into rows of {config.max_length}")
    return f" ({', '.join(parts)})" if parts else ""


def _progress(record: dict) -> dict:
    shown = {
        "loss": f"{record['loss']:.4f}",
        "lr": f"{record['lr']:.2e}",
        "tok/s": f"{record['tokens_per_s']:.0f}",
        "trained/s": f"{record['trained_tokens_per_s']:.0f}",
    }
    if "mfu" in record:
        shown["mfu"] = f"{record['mfu']:.0%}"
    return shown


def _due(step: int, total: int, every: int | None) -> bool:
    """Whether something done every `every` steps, and after the last, is due after `step`."""
    return step == total or (every is not None and step % every == 0)

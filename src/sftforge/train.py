"""The training run in three phases: `start` (checks, model, data, optimizer, resume),
`steps` (the loop), `finish` (measure after, save, report).

The loss of each optimizer step is normalised by the number of trained tokens in the whole
step, however it is split into micro-batches.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .assessment import Assessment, build_assessment, finish_report
from .batches import Batch, step_batches, step_stream
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
from .data import TrainingData, load_examples
from .export import save_run
from .flops import FlopModel, flop_model
from .guards import NonFiniteError, RunInterrupted, nonfinite_step, nonfinite_stop, stop_requests
from .loss import summed_token_loss
from .metrics import (
    Progress,
    TrainingClock,
    micro_batch_note,
    open_metrics,
    precision_note,
    progress_figures,
    step_record,
)
from .model import (
    adapter_input_casts,
    autocast_dtype,
    compile_decoder_layers,
    enable_gradient_checkpointing,
    fast_adamw_options,
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
from .tokenize import Encoder


def train(config: Config) -> Path:
    run = start(config)
    last_record = steps(run)
    return finish(run, last_record)


@dataclass
class Run:
    """Everything the steps need, set up by `start`."""

    config: Config
    output_dir: Path
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for fp32
    model: torch.nn.Module
    encoder: Encoder
    data: TrainingData
    base_model_path: str
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    assessment: Assessment
    flops: FlopModel
    identity: dict  # what a resume must find unchanged
    total_steps: int
    stream: Iterator[tuple[int, list[int]]]  # (epoch, example indices) of each step to come
    done: int = 0  # steps done before this process started (resumed)
    before: dict | None = None  # the measurements before training
    progress: Progress = field(default_factory=Progress)

    def save_model(self, folder: Path) -> None:
        """The loadable model or adapter, with everything inference needs."""
        encoder = self.encoder
        data_report = self.data.report.__dict__ | {"base_model": self.base_model_path}
        save_run(
            folder,
            self.model,
            encoder.tokenizer,
            encoder.stop_ids,
            encoder.pad_id,
            self.config,
            data_report,
        )

    def save_checkpoint(self, step: int) -> Path:
        state = {"identity": self.identity, "before": self.before}
        state["progress"] = asdict(self.progress)
        keep = self.config.training.keep_checkpoints
        return save_checkpoint(
            self.output_dir, step, self.model, self.optimizer, state, keep, self.save_model
        )


# ---- start ---------------------------------------------------------------------------------


def start(config: Config) -> Run:
    """Check what can be checked in seconds, load the model and the data, build the
    optimizer, measure the model before training (or restore a checkpoint)."""
    output_dir = Path(config.output_dir)
    t = config.training
    check_writable(output_dir)
    check_data_files(config)
    for leftover in remove_unfinished(output_dir):
        print(f"removed {leftover.name}, left unfinished by an interrupted run")
    resume_from = resume_point(config.resume, config.overwrite_output_dir, output_dir)
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    device = pick_device(t.device)
    prepared = prepare(config, device)
    data = load_examples(config, prepared.encoder, output_dir)
    model = prepared.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=t.weight_decay, **fast_adamw_options(device)
    )
    checkpoints = max(2, t.keep_checkpoints + 1)  # the newest K, and the one being written
    check_free_disk(
        output_dir,
        checkpoints * checkpoint_bytes(params) + sum(p.nbytes for p in params),
        f"{checkpoints} checkpoints and the final weights",
    )
    amp = autocast_dtype(t.precision, device)
    total_steps = optimizer_steps(config, len(data.examples))
    print(
        f"training {config.method} on {device} ({precision_note(t.precision, amp, config.method)}): "
        f"{len(data.examples)} examples, {total_steps} steps of {t.batch_size}x{t.grad_accum} "
        f"examples{micro_batch_note(config)}, "
        f"{sum(p.numel() for p in params):,} trainable parameters, lr {config.learning_rate:g}"
    )
    assessment = build_assessment(
        config, prepared.encoder, data.held_out, data.held_out_examples, device
    )
    before = None
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
    model.train()
    run = Run(
        config=config,
        output_dir=output_dir,
        device=device,
        amp=amp,
        model=model,
        encoder=prepared.encoder,
        data=data,
        base_model_path=prepared.base_model_path,
        params=params,
        optimizer=optimizer,
        assessment=assessment,
        flops=flop_model(model, config.method),
        identity=run_identity(config, data.examples),
        total_steps=total_steps,
        stream=step_stream(len(data.examples), t.batch_size * t.grad_accum, t.seed),
        before=before,
    )
    if resume_from is not None:
        _resume(run, resume_from)
    return run


def _resume(run: Run, path: Path) -> None:
    """Weights, optimizer, RNG states, counters and the data position from a checkpoint.
    Last, after anything in `start` that draws random numbers: the RNG states come back too."""
    resumed = load_checkpoint(path, run.model, run.optimizer)
    check_same_run(resumed.state["identity"], run.identity, path)
    run.done, run.before = resumed.step, resumed.state["before"]
    run.progress = Progress(**resumed.state["progress"])
    for _ in range(run.done):
        next(run.stream)  # the data position: the next step drawn is the first unseen one
    print(f"resumed from {path} after step {run.done} of {run.total_steps}")


# ---- steps ---------------------------------------------------------------------------------


def steps(run: Run) -> dict:
    """Run the optimizer steps from `run.done` to the last; returns the last step's record."""
    config, t, progress, total = run.config, run.config.training, run.progress, run.total_steps
    lengths = [len(ex.input_ids) for ex in run.data.examples]
    batching = {
        "batch_size": t.batch_size,
        "token_budget": t.micro_batch_tokens,
        "pack_length": config.max_length if t.packing else None,
    }
    warmup = int(t.warmup_ratio * total)
    clock = TrainingClock(progress.elapsed_s)
    record: dict = {}
    bar = tqdm(range(run.done, total), "train", initial=run.done, total=total, dynamic_ncols=True)
    metrics_path = run.output_dir / "metrics.jsonl"
    with open_metrics(metrics_path, run.done) as metrics, stop_requests() as stop:
        for step in bar:
            lr = learning_rate_at(step, total, warmup, config.learning_rate, t.schedule)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            epoch, indices = next(run.stream)
            batches = step_batches(
                run.data.examples, lengths, indices, run.encoder.pad_id, **batching
            )
            loss, trained = accumulate_gradients(run.model, batches, run.device, run.amp)
            grad_norm = gradient_norm(run.params, t.max_grad_norm)
            applied = _apply_or_skip(run, step + 1, loss, grad_norm, indices)
            _count(progress, batches, trained, run.flops, clock)
            record = step_record(step + 1, epoch + 1, loss, lr, grad_norm, progress, t)
            record["micro_batches"] = len(batches)
            record["rows"] = sum(len(b.input_ids) for b in batches)  # < examples when packed
            if not applied:
                record["skipped"] = True
            if run.assessment.held_out and _due(step + 1, total, config.eval.every):
                with clock.paused():
                    record["eval_loss"] = _eval_loss_keeping_the_best(run)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if (step + 1) % t.log_every == 0 or step + 1 == total:
                bar.set_postfix(progress_figures(record), refresh=False)
            if _due(step + 1, total, t.save_every) or stop.signal:
                run.save_checkpoint(step + 1)
            if stop.signal and step + 1 < total:
                bar.close()
                raise RunInterrupted(
                    f"stopped by {stop.signal.name} after step {step + 1} of {total}; "
                    f"checkpoint saved to {latest_checkpoint(run.output_dir)}. To go on, run "
                    "the same command with resume=auto",
                    stop.signal,
                )
    bar.close()
    return record


def _apply_or_skip(run: Run, step: int, loss: float, grad_norm: float, indices) -> bool:
    """Apply the update when loss and gradients are finite; otherwise skip it, or stop the
    run once more steps were skipped than training.skip_nonfinite_steps allows."""
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
    else:
        run.progress.skipped_steps += 1
        sources = [run.data.examples[i].source for i in indices]
        what = nonfinite_step(step, loss, grad_norm, sources)
        allowed = run.config.training.skip_nonfinite_steps
        if run.progress.skipped_steps > allowed:
            raise NonFiniteError(nonfinite_stop(what, run.output_dir))
        print(
            f"warning: {what}; skipped it ({run.progress.skipped_steps} of "
            f"training.skip_nonfinite_steps={allowed})"
        )
    run.optimizer.zero_grad(set_to_none=True)
    return finite


def _eval_loss_keeping_the_best(run: Run) -> float:
    eval_loss = run.assessment.loss(run.model)
    if run.config.eval.save_best and eval_loss < run.progress.best_eval:
        run.progress.best_eval = eval_loss
        save_best(run.output_dir, run.save_model)
    return eval_loss


def _count(progress: Progress, batches: list[Batch], trained: int, flops: FlopModel, clock):
    progress.tokens += sum(b.real_tokens for b in batches)
    progress.trained_tokens += trained
    progress.flops += sum(flops.step_flops(b.example_lengths, b.trained_tokens) for b in batches)
    progress.elapsed_s = clock.elapsed()


# ---- finish --------------------------------------------------------------------------------


def finish(run: Run, last_record: dict) -> Path:
    """Measure the trained model, save it, and write the report."""
    print("measuring the model after training")
    # The loop already measured the final eval loss on these weights; do not repeat it.
    after = run.assessment.measure(run.model, eval_loss=last_record.get("eval_loss"))
    publish_best(run.output_dir)
    save_final(run.output_dir, run.save_model)
    summary = run.assessment.compare(run.before, after, run.config.eval.samples)
    finish_report(run.config, run.data, summary, run.output_dir)
    print(f"saved to {run.output_dir}")
    return run.output_dir


# ---- the parts of a step -------------------------------------------------------------------


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


def gradient_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' total norm, clipping them to `max_norm` when set."""
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _due(step: int, total: int, every: int | None) -> bool:
    """Whether something done every `every` steps, and after the last, is due after `step`."""
    return step == total or (every is not None and step % every == 0)

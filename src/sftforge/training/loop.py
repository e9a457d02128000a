"""The training run in three phases: `start` (checks, model, data, optimizer, resume) hands a
Run to `steps` (the loop), whose metrics rows `finish` (measure after, save, report) returns
in the TrainResult. Each step's loss is normalised by the trained tokens of the whole step,
however it is split into micro-batches and processes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sftforge.config.schema import Config
from sftforge.console import say
from sftforge.encode.batches import Batch, made_ahead, step_stream
from sftforge.errors import RunInterrupted
from sftforge.models.devices import (
    autocast_dtype,
    check_attention_precision,
    deterministic_algorithms,
    fast_adamw_options,
    pick_device,
)
from sftforge.models.flops import flop_model
from sftforge.models.loading import causal_lm, enable_gradient_checkpointing
from sftforge.models.packing_check import verify_packing_isolation
from sftforge.models.prefix_sharing import verify_prefix_sharing
from sftforge.trackers import Trackers, check_installed
from sftforge.training.assessment import build_assessment, finish_report
from sftforge.training.checkpoint import (
    latest_checkpoint,
    publish_best,
    remove_unfinished,
    run_identity,
    save_final,
)
from sftforge.training.distributed import (
    ALONE,
    World,
    check_parallel_settings,
    device_of_rank,
    end_processes,
    from_main,
    max_over_ranks,
    offloads,
    on_sharded_model,
    processes_note,
    quiet_other_ranks,
    shared_note,
    start_processes,
    sum_over_ranks,
    wait_for_all,
    world_from_environment,
    wrap_for_training,
)
from sftforge.training.guards import (
    NonFiniteError,
    nonfinite_step,
    nonfinite_stop,
    stop_requests,
)
from sftforge.training.host_memory import hold_mmap_threshold
from sftforge.training.lr_probe import probe_learning_rate
from sftforge.training.metrics import (
    TrainingClock,
    micro_batch_note,
    objective_note,
    open_metrics,
    precision_note,
    progress_figures,
    step_record,
)
from sftforge.training.output import initial_adapter_of, save_initial_adapter
from sftforge.training.preflight import (
    check_data_files,
    check_free_disk,
    check_writable,
    checkpoint_bytes,
    resume_point,
)
from sftforge.training.prepare import (
    compile_with_fallback,
    prepare_model_for,
    prepare_text,
    training_loss,
)
from sftforge.training.run import Learner, Run, StepPlan, TrainResult
from sftforge.training.runlock import lock_output_dir
from sftforge.training.stochastic_rounding import weight_rounding
from sftforge.training.training_data import load_examples_once, step_batches_of
from sftforge.training.update import (
    learning_rate_at,
    optimizer_steps,
    parameter_groups,
    set_learning_rate,
    step_gradients,
)


def train(config: Config) -> TrainResult:
    """One training run, in as many processes as torchrun started (or this one alone)."""
    world = world_from_environment()
    deterministic = deterministic_algorithms(config.training.deterministic)
    with _one_run_per_output_dir(Path(config.output_dir), world), deterministic:
        run = start(config, world)
        # A compiler that failed: the compiled layers run eagerly, for this run only.
        eager = "force_eager" if run.learner.compile_failed else "default"
        with run.trackers, torch.compiler.set_stance(eager):
            metrics = steps(run)
            result = finish(run, metrics)
    end_processes()
    return result


def _one_run_per_output_dir(output_dir: Path, world: World):
    """The output dir's lock, held by rank 0 for the whole run: a second run started there
    is refused at once (training/runlock.py)."""
    if not world.is_main:
        return contextlib.nullcontext()
    check_writable(output_dir)
    return lock_output_dir(output_dir)


# ---- start ---------------------------------------------------------------------------------


def start(config: Config, world: World = ALONE) -> Run:
    """Check what can be checked in seconds, load the model and the data, build the
    optimizer, measure the model before training (or restore a checkpoint). Under torchrun
    every rank loads and prepares the same data itself, deterministically; rank 0 checks the
    output dir, measures and writes."""
    output_dir = Path(config.output_dir)
    t = config.training
    quiet_other_ranks(world)
    if t.mmap_threshold_kib is not None and (why := hold_mmap_threshold(t.mmap_threshold_kib)):
        say(f"training.mmap_threshold_kib: glibc's threshold left as it is ({why})")
    check_data_files(config)
    check_parallel_settings(config, world)
    resume_from = None
    if world.is_main:
        check_installed(config.report_to, output_dir)
        for leftover in remove_unfinished(output_dir):
            say(f"removed {leftover.name}, left unfinished by an interrupted run")
        resume_from = resume_point(config.resume, config.overwrite_output_dir, output_dir)
    start_processes(world, pick_device(t.device), t.collective_timeout_s)
    text = prepare_text(config)
    # The data is encoded (by forked workers) before CUDA or NCCL start in this process.
    data = load_examples_once(config, text.encoder, output_dir, world)
    device = device_of_rank(pick_device(t.device), world)
    resume_from = from_main(resume_from, world)
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    amp = autocast_dtype(t.precision, device)
    check_attention_precision(config.attention, amp)
    offload = offloads(config, device, world)
    model, base_model_path, trainer = prepare_model_for(config, device, text, world, amp, offload)
    if world.is_main and (initial_adapter := initial_adapter_of(config, output_dir)):
        save_initial_adapter(model, initial_adapter)  # pissa, olora: saved relative to it
    wait_for_all(world, "loading the model and the data")
    total_steps = optimizer_steps(config, len(data.examples))
    assessment = build_assessment(
        config, text.encoder, data.held_out, data.held_out_examples, device, amp
    )

    # A model built sharded is measured and checked by every rank together.
    def on_model(fn):
        return on_sharded_model(trainer, fn) if trainer is not None else fn(model)

    if t.share_prefixes:  # before any held-out loss is measured in shared rows
        on_model(lambda m: verify_prefix_sharing(m, device, config.max_length, amp))
    before = None
    if resume_from is None and (world.is_main or trainer is not None):
        say("measuring the model before training")
        measured = on_model(assessment.measure)
        before = measured if world.is_main else None
    wait_for_all(world, "measuring the model before training")
    if t.packing:
        on_model(lambda m: verify_packing_isolation(m, device, amp))
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    compile_failure = None
    if t.compile:
        compile_failure = compile_with_fallback(model, data, text.encoder, device, amp)
    if trainer is None:
        layers = causal_lm(model).get_decoder().layers
        loss_module = training_loss(config, model)
        trainer = wrap_for_training(loss_module, layers, world, t.parallelism, amp, offload)
    trainer.train()
    params = [p for p in trainer.parameters() if p.requires_grad]
    step_device = torch.device("cpu") if offload else device  # where the optimizer steps
    b_lr_ratio = config.lora.b_lr_ratio if config.uses_lora else 1.0

    def new_optimizer():  # each step sets its groups' rates (update.set_learning_rate)
        groups = parameter_groups(trainer, b_lr_ratio)
        options = fast_adamw_options(step_device)
        return torch.optim.AdamW(groups, weight_decay=t.weight_decay, **options)

    if world.is_main:
        checkpoints = max(2, t.keep_checkpoints + 1)  # the newest K, and the one being written
        check_free_disk(
            output_dir,
            checkpoints * checkpoint_bytes(params) + sum(p.nbytes for p in params),
            f"{checkpoints} checkpoints and the final weights",
        )
    learner = Learner(
        model, trainer, params, new_optimizer(), device, amp, flop_model(model, config.method)
    )
    learner.compile_failed = bool(compile_failure)
    learner.rounding = weight_rounding(params, amp, t.bf16_rounding)
    peak_lr, probed = config.learning_rate, None  # None: training.lr auto
    if peak_lr is None and resume_from is None:  # (a resumed run reads it from its checkpoint)
        probe = probe_learning_rate(
            learner, new_optimizer, config, data.examples, text.encoder, world,
            assessment.shared_rows_of, assessment.forgetting and assessment.forgetting.corpus,
            total_steps,
        )  # fmt: skip
        say(probe.note())
        peak_lr, probed = probe.chosen, probe.as_dict()
    say(
        f"training {config.method} on {device}{processes_note(world, t.parallelism)} "
        f"({precision_note(t.precision, amp, config.method, learner.rounding)}): "
        f"{len(data.examples)} examples, {total_steps} steps of {t.batch_size}x{t.grad_accum} "
        f"examples{micro_batch_note(config)}{shared_note(world)}, "
        f"{sum(p.numel() for p in params):,} trainable parameters, "
        f"lr {'auto, from the checkpoint' if peak_lr is None else f'{peak_lr:g}'}"
        f"{objective_note(config)}"
    )
    plan = StepPlan(
        total=total_steps,
        stream=step_stream(len(data.examples), t.batch_size * t.grad_accum, t.seed),
        identity=run_identity(config, data.examples),
        peak_lr=peak_lr,
    )
    run = Run(
        config, world, output_dir, text.encoder, data, base_model_path, learner, plan,
        assessment, Trackers.none(), before, lr_probe=probed,
    )  # fmt: skip
    if resume_from is not None:
        run.resume(resume_from)
    if world.is_main and config.report_to:
        config_values = config.model_dump(mode="json")
        run.trackers = Trackers.open(config.report_to, output_dir, output_dir.name, config_values)
    return run


# ---- steps ---------------------------------------------------------------------------------


def steps(run: Run) -> list[dict]:
    """Run the optimizer steps from `run.plan.done` to the last; returns every step's
    metrics.jsonl row, those of the steps resumed from included."""
    config, t, progress, total = run.config, run.config.training, run.progress, run.plan.total
    world = run.world
    warmup = int(t.warmup_ratio * total)
    clock = TrainingClock(progress.elapsed_s)
    bar = tqdm(
        range(run.plan.done, total),
        "train",
        initial=run.plan.done,
        total=total,
        dynamic_ncols=True,
        disable=not world.is_main,
    )
    metrics_path = run.output_dir / "metrics.jsonl"
    if world.is_main:
        metrics, records = open_metrics(metrics_path, run.plan.done)
    else:
        metrics, records = open(os.devnull, "w"), []  # noqa: SIM115

    my_batches = step_batches_of(config, run.data.examples, run.encoder, world)
    upcoming = made_ahead(run.plan.stream, my_batches, pin=run.learner.device.type == "cuda")
    with metrics, stop_requests() as stop, contextlib.closing(upcoming):
        for step in bar:
            lr = learning_rate_at(step, total, warmup, run.plan.peak_lr, t.schedule)
            set_learning_rate(run.learner.optimizer, lr)
            epoch, indices, batches = next(upcoming)
            loss, trained, grad_norm = step_gradients(
                run.learner, batches, world, run.encoder.pad_id, t.seed, step, t.max_grad_norm
            )
            applied = _apply_or_skip(run, step + 1, loss, grad_norm, indices)
            stopping, rows = _count(run, batches, trained, clock, stop.signal is not None)
            record = step_record(step + 1, epoch + 1, loss, lr, grad_norm, progress, t, world)
            record["micro_batches"] = max_over_ranks(len(batches), world, run.learner.device)
            record["rows"] = rows  # < examples when packed
            if not applied:
                record["skipped"] = True
            if run.assessment.held_out and _due(step + 1, total, config.eval.every):
                with clock.paused():
                    record["eval_loss"] = run.held_out_loss_keeping_the_best()
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            records.append(record)
            run.trackers.log_step(record, step + 1)
            if (step + 1) % t.log_every == 0 or step + 1 == total:
                bar.set_postfix(progress_figures(record), refresh=False)
            if _due(step + 1, total, t.save_every) or stopping:
                run.save_checkpoint(step + 1)
            if stopping and step + 1 < total:
                bar.close()
                signal_number = stop.signal or signal.SIGTERM
                raise RunInterrupted(
                    f"stopped by {signal.Signals(signal_number).name} after step {step + 1} of "
                    f"{total}; checkpoint saved to {latest_checkpoint(run.output_dir)}. To go "
                    "on, run the same command with resume=auto",
                    signal_number,
                )
    bar.close()
    return records


def _apply_or_skip(run: Run, step: int, loss: float, grad_norm: float, indices) -> bool:
    """Apply the update when loss and gradients are finite; otherwise skip it, or stop the
    run once more steps were skipped than training.skip_nonfinite_steps allows. (Loss and
    norm are the same on every rank, so every rank decides alike.)"""
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        run.learner.optimizer.step()
    else:
        run.progress.skipped_steps += 1
        sources = [run.data.examples.source(i) for i in indices]
        what = nonfinite_step(step, loss, grad_norm, sources)
        allowed = run.config.training.skip_nonfinite_steps
        if run.progress.skipped_steps > allowed:
            raise NonFiniteError(nonfinite_stop(what, run.output_dir))
        say(
            f"warning: {what}; skipped it ({run.progress.skipped_steps} of "
            f"training.skip_nonfinite_steps={allowed})"
        )
    run.learner.optimizer.zero_grad(set_to_none=True)
    return finite


def _count(run: Run, batches: list[Batch], trained: int, clock, stop_requested: bool):
    """Add the step's tokens and FLOPs (of every rank) to the progress; returns whether any
    rank was asked to stop (so that every rank stops after the same step), and the step's
    rows over all ranks."""
    flops = sum(
        run.learner.flops.step_flops(b.real_tokens, b.attended_pairs, b.trained_tokens)
        for b in batches
    )
    real = sum(b.real_tokens for b in batches)
    rows = sum(len(b.input_ids) for b in batches)
    totals = sum_over_ranks([real, flops, rows, stop_requested], run.world, run.learner.device)
    real, flops, rows, stops = totals
    progress = run.progress
    progress.tokens += int(real)
    progress.trained_tokens += trained
    progress.flops += flops
    progress.elapsed_s = clock.elapsed()
    return stops > 0, int(rows)


# ---- finish --------------------------------------------------------------------------------


def finish(run: Run, metrics: list[dict]) -> TrainResult:
    """Measure the trained model, save it, write the report and tell the trackers (rank 0;
    under FSDP every rank measures and gathers the weights with it, none holding them whole)."""
    summary = None
    if run.world.is_main or run.sharded:
        say("measuring the model after training")
        # The loop already measured the final eval loss on these weights; do not repeat it.
        last = metrics[-1] if metrics else {}
        after = run.on_model(lambda m: run.assessment.measure(m, last.get("eval_loss")))
    if run.world.is_main:
        publish_best(run.output_dir)
    run.save_model_via(lambda save_model: save_final(run.output_dir, save_model))
    if run.world.is_main:
        summary = run.assessment.compare(run.before, after, run.config.eval.samples)
        if run.lr_probe:
            summary["lr_probe"] = run.lr_probe
        finish_report(run.config, run.data, summary, run.output_dir)
        run.trackers.log_summary({"run": summary, "data": run.data_report()})
        say(f"saved to {run.output_dir}")
    wait_for_all(run.world, "measuring and saving the trained model")
    return TrainResult(run.output_dir, summary, metrics, run.data_report())


def _due(step: int, total: int, every: int | None) -> bool:
    """Whether something done every `every` steps, and after the last, is due after `step`."""
    return step == total or (every is not None and step % every == 0)

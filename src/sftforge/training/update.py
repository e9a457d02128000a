"""The parts of one optimizer step: its learning rate, its gradients accumulated over
micro-batches (and ranks), and their norm.

The loss of a step is the sum of token losses over every trained token of the step divided
by the number of those tokens, however the step is cut into micro-batches and ranks.
"""

from __future__ import annotations

import math

import torch

from sftforge.config.schema import Config
from sftforge.encode.batches import Batch, empty_batch
from sftforge.models.devices import autocast
from sftforge.models.loading import adapter_input_casts
from sftforge.models.loss import batch_loss
from sftforge.models.per_example import drawing_per_example
from sftforge.training.distributed import (
    ALONE,
    World,
    gradient_sync,
    max_over_ranks,
    sum_over_ranks,
)
from sftforge.training.stochastic_rounding import rounding_for_step


def learning_rate_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's rate `lr` on every group, times the group's `lr_scale` (LoRA+'s B)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # absent in older checkpoints


def optimizer_steps(config: Config, n_examples: int) -> int:
    t = config.training
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(n_examples / (t.batch_size * t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def parameter_groups(module: torch.nn.Module, b_lr_ratio: float = 1.0) -> list[dict]:
    """`module`'s trainable parameters as optimizer groups, each with its `lr_scale` (its
    learning rate over training.lr): LoRA+'s B matrices (peft's `lora_B`) at `b_lr_ratio`
    in a group of their own, everything else at 1. One group when the ratio is 1."""
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if b_lr_ratio == 1.0:
        return [{"params": [p for _, p in trained], "lr_scale": 1.0}]
    b_matrices = [p for name, p in trained if ".lora_B." in name]
    rest = [p for name, p in trained if ".lora_B." not in name]
    groups = [{"params": rest, "lr_scale": 1.0}, {"params": b_matrices, "lr_scale": b_lr_ratio}]
    return [group for group in groups if group["params"]]


def accumulate_gradients(
    loss_module,
    batches: list[Batch],
    device,
    amp,
    world: World = ALONE,
    pad_id: int = 0,
    draw_seed: int | None = None,
) -> tuple[float, int]:
    """Backward over this rank's micro-batches of one optimizer step (`loss_module`: a
    TokenLoss, maybe under DDP or FSDP).

    Each micro-batch contributes (sum of its token losses) x world size / (trained tokens in
    the whole step, over all ranks): DDP and FSDP average gradients over the ranks, so the
    gradient is that of the mean over the step's trained tokens, however the step is split.
    Every rank runs as many micro-batches as the rank with most (padding with empty ones),
    and only the last reduces gradients. Returns (that mean loss, the step's trained tokens),
    the same on every rank. With `draw_seed`, dropout and NEFTune draw per example
    (models/per_example.py), in the forward and in a recomputation in the backward alike."""
    counted = sum_over_ranks([sum(b.trained_tokens for b in batches)], world, device)
    step_trained = int(counted[0])
    micro_batches = max_over_ranks(len(batches), world, device)
    total = torch.zeros((), dtype=torch.float64, device=device)  # read once: no sync a batch
    # Under autocast, peft's own cast of each adapter's input to fp32 only adds a copy per
    # adapter (kept for the backward): autocast runs those matmuls in bf16 anyway.
    with adapter_input_casts(loss_module, enabled=amp is None):
        for k in range(micro_batches):
            batch = (batches[k] if k < len(batches) else empty_batch(pad_id)).to(device)
            row_length = batch.input_ids.shape[1]
            draws = drawing_per_example(draw_seed, batch.example_spans, row_length)
            with gradient_sync(loss_module, enabled=k == micro_batches - 1), draws:
                with autocast(device, amp):
                    loss_sum = batch_loss(loss_module, batch)
                (loss_sum * world.size / step_trained).backward()
            total += loss_sum.detach()
    (total,) = sum_over_ranks([float(total)], world, device)
    return total / step_trained, step_trained


def step_gradients(
    learner, batches: list[Batch], world: World, pad_id: int, seed: int, step: int,
    max_grad_norm: float | None,
) -> tuple[float, int, float]:  # fmt: skip
    """Step `step`'s gradients on `learner` (a training.run.Learner), taken as every step of
    a run takes them: the random draws seeded from (seed, step), the weights rounded as the
    run rounds them, the gradients accumulated over the micro-batches `batches` (and the
    ranks), then clipped. Returns (the step's mean loss, its trained tokens, the gradients'
    norm before clipping)."""
    torch.manual_seed(step_seed(seed, step, world.rank))
    with rounding_for_step(learner.rounding, step_seed(seed, step)):
        loss, trained = accumulate_gradients(
            learner.trainer,
            batches,
            learner.device,
            learner.amp,
            world,
            pad_id,
            draw_seed=step_seed(seed, step),  # the same on every rank: per example
        )
    return loss, trained, gradient_norm(learner.params, max_grad_norm)


def gradient_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' total norm (over every rank's shard, under FSDP), clipping them to
    `max_norm` when set."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor: FSDP's shards of the gradients
        norm = norm.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The random numbers of a step come from (seed, step) alone, so a resumed run draws
    them as the uninterrupted one did, whatever it saved: per example (dropout, NEFTune:
    rank 0's seed, on every rank), or from the default generator, seeded per rank."""
    return seed * 1_000_003 + step * 1009 + rank

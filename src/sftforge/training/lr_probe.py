"""`training.lr: auto`: the peak learning rate chosen by short trial runs before training.

Each trial starts from the run's starting weights and trains them for
`training.lr_probe_steps` optimizer steps at one peak rate, as the run would train (the
same micro-batches, precision, rounding, random draws and clipping, a fresh AdamW, the
run's schedule compressed to the trial's steps), then measures the mean token loss on a
validation slice of the training data that no trial trained on. The held-out set
(eval.held_out) is never used. The trials walk a grid of factors of 2 around the method's
default rate: its neighbours first, then outwards while the lowest loss lies at an edge of
the rates tried, up to MAX_TRIALS. The choice is the rate of the lowest validation loss; it
is *bracketed* when a rate tried on each side of it did worse, else it is the edge of the
search, and the result says so.

Afterwards the trainable weights and the random-number generators are as they were before
the probe: a run with `lr: auto` trains exactly as a run given the chosen rate. What it
costs: (trials x probe steps) optimizer steps and one validation pass per trial, and a copy
of the trainable weights (on the CPU) while it runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from sftforge.config.schema import Config
from sftforge.encode.encoder import Encoder
from sftforge.errors import InputError
from sftforge.training.distributed import World, local_part
from sftforge.training.run import Learner, mean_loss
from sftforge.training.training_data import step_batches_of
from sftforge.training.update import learning_rate_at, set_learning_rate, step_gradients

GRID_FACTOR = 2.0  # neighbouring rates of the search differ by this factor
MAX_TRIALS = 6
VALIDATION_SHARE = 0.1  # of the training examples, at most MAX_VALIDATION
MAX_VALIDATION = 64


@dataclass
class LrProbe:
    """What the probe found: the rate chosen, and each rate's validation loss."""

    chosen: float
    losses: dict[float, float]  # peak rate tried -> validation loss after its trial (inf: diverged)
    bracketed: bool  # a rate tried on each side of the choice did worse
    steps: int  # optimizer steps per trial
    trained_on: int  # distinct training examples the trials train on
    validated_on: int  # validation examples (of the training data), never trained on
    seconds: float

    def note(self) -> str:
        tried = ", ".join(f"{lr:.3g}: {loss:.4f}" for lr, loss in sorted(self.losses.items()))
        where = "" if self.bracketed else ", at the edge of the rates tried"
        return (
            f"training.lr auto: {self.chosen:.3g}{where} (validation loss after "
            f"{self.steps} steps on {self.validated_on} training examples kept aside: "
            f"{tried}; {self.seconds:.0f} s)"
        )

    def as_dict(self) -> dict:
        found = asdict(self)
        found["losses"] = [  # JSON has no infinity: a trial that diverged has loss None
            {"lr": lr, "loss": loss if math.isfinite(loss) else None}
            for lr, loss in sorted(self.losses.items())
        ]
        return found


def bracketed_minimum(
    loss_at: Callable[[float], float], centre: float, max_trials: int = MAX_TRIALS
) -> tuple[float, dict[float, float], bool]:
    """The rate of lowest `loss_at` on the grid centre x GRID_FACTOR^k: k = -1, 0, 1 first,
    then one step beyond the lower or upper edge while the best lies there. Ties go to the
    lower rate. Returns (the rate, every rate's loss, whether the rate is bracketed)."""
    losses: dict[int, float] = {}

    def best() -> int:
        return min(losses, key=lambda k: (losses[k], k))

    for k in (-1, 0, 1):
        losses[k] = loss_at(centre * GRID_FACTOR**k)
    while len(losses) < max_trials and best() in (min(losses), max(losses)):
        edge = best() - 1 if best() == min(losses) else best() + 1
        losses[edge] = loss_at(centre * GRID_FACTOR**edge)
    chosen = best()
    rates = {centre * GRID_FACTOR**k: loss for k, loss in sorted(losses.items())}
    return centre * GRID_FACTOR**chosen, rates, min(losses) < chosen < max(losses)


def probe_slices(
    n_examples: int, examples_per_step: int, steps: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """(each trial step's example indices, the validation indices): the validation slice is
    VALIDATION_SHARE of a seeded permutation of the examples (at least one, at most
    MAX_VALIDATION, and never all); the steps take the rest in order, from the start again
    when they run out."""
    if n_examples < 2:
        raise InputError(
            f"training.lr auto needs at least 2 training examples to probe on, not {n_examples}"
        )
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    kept = min(max(1, round(VALIDATION_SHARE * n_examples)), MAX_VALIDATION, n_examples - 1)
    validation, rest = order[:kept], order[kept:]
    wanted = steps * examples_per_step
    drawn = (rest * math.ceil(wanted / len(rest)))[:wanted]
    trial_steps = [drawn[s : s + examples_per_step] for s in range(0, wanted, examples_per_step)]
    return trial_steps, validation


def probe_learning_rate(
    learner: Learner,
    new_optimizer: Callable[[], torch.optim.Optimizer],
    config: Config,
    examples,
    encoder: Encoder,
    world: World,
    shared_rows_of: int | None,
) -> LrProbe:
    """Choose the peak rate for training `examples` by trials (module doc), around the
    method's default rate; `new_optimizer()` gives a fresh optimizer of the learner's
    parameters, as the run builds it."""
    started = time.perf_counter()
    training, pad_id = config.training, encoder.pad_id
    steps = training.lr_probe_steps
    trial_steps, validation = probe_slices(
        len(examples), training.batch_size * training.grad_accum, steps, training.seed
    )
    batches_of = step_batches_of(config, examples, encoder, world)
    step_batches = [batches_of(indices) for indices in trial_steps]
    validation_examples = [examples[i] for i in validation]
    warmup = int(training.warmup_ratio * steps)
    starting_weights = [local_part(p).detach().to("cpu", copy=True) for p in learner.params]

    def validation_loss_after_trial(peak: float) -> float:
        _restore(learner.params, starting_weights)
        optimizer = new_optimizer()
        for step, batches in enumerate(step_batches):
            set_learning_rate(
                optimizer, learning_rate_at(step, steps, warmup, peak, training.schedule)
            )
            loss, _, norm = step_gradients(
                learner, batches, world, pad_id, training.seed, step, training.max_grad_norm
            )
            if not (math.isfinite(loss) and math.isfinite(norm)):
                optimizer.zero_grad(set_to_none=True)
                return math.inf  # the same on every rank: loss and norm are reduced over ranks
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = mean_loss(learner, validation_examples, world, pad_id, shared_rows_of)
        return loss if math.isfinite(loss) else math.inf

    devices = [learner.device] if learner.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        chosen, losses, bracketed = bracketed_minimum(
            validation_loss_after_trial, config.default_learning_rate
        )
    _restore(learner.params, starting_weights)
    distinct = len({i for indices in trial_steps for i in indices})
    return LrProbe(
        chosen, losses, bracketed, steps, distinct, len(validation),
        time.perf_counter() - started,
    )  # fmt: skip


def _restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            local_part(param).copy_(value)

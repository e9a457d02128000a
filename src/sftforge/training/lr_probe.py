"""`training.lr: auto`: the peak learning rate chosen by short trial runs before training.

Each trial starts from the run's starting weights and trains them for
`training.lr_probe_steps` optimizer steps at one peak rate, as the run would train (the
same micro-batches, precision, rounding, random draws and clipping, a fresh AdamW, the
run's schedule compressed to the trial's steps), then measures the mean token loss on a
validation slice of the training data that no trial trained on, and (with eval.forgetting,
the default) the perplexity of the general-text corpus against the starting model's. The
held-out set (eval.held_out) is never used.

A short trial favours large rates: over a few steps the rate that moves farthest lowers the
loss most, while over a whole run it forgets the most (docs/benchmarks.md). So each trial's
forgetting is projected to the run's length: a trial of p steps may spend p/N of the run's
forgetting budget (N: the run's steps; the budget: a perplexity ratio of FORGETTING_LIMIT,
1.05), i.e. its projected ratio 1 + (ratio - 1) x N/p must stay within the limit, or the
rate is ruled out like one that diverged. A heuristic that catches only the rates that forget
early: on the extraction demo the trial at 16x the default forgot 1.047 in 8 steps (projected
1.35 over 60; the run forgot 1.263), the one at 4x 1.001 (projected 1.004; the run forgot
1.139): most forgetting comes late in a run (docs/benchmarks.md). The trials walk a grid
of factors of 2 around the method's default rate: its neighbours first, then outwards while
the best lies at an edge of the rates tried, up to MAX_TRIALS. The choice is the rate of the lowest validation loss among those not ruled out;
it is *bracketed* when a rate tried on each side of it did worse or was ruled out, else it
is the edge of the search, and the result says so.

Afterwards the trainable weights and the random-number generators are as they were before
the probe: a run with `lr: auto` trains exactly as a run given the chosen rate. What it
costs: (trials x probe steps) optimizer steps, a validation and a corpus pass per trial, and
a copy of the trainable weights (on the CPU) while it runs.
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
from sftforge.evaluation.forgetting import FORGETTING_LIMIT
from sftforge.training.distributed import World, local_part
from sftforge.training.run import Learner, mean_loss
from sftforge.training.training_data import step_batches_of
from sftforge.training.update import learning_rate_at, set_learning_rate, step_gradients

GRID_FACTOR = 2.0  # neighbouring rates of the search differ by this factor
MAX_TRIALS = 6
VALIDATION_SHARE = 0.1  # of the training examples, at most MAX_VALIDATION
MAX_VALIDATION = 64


@dataclass
class Trial:
    """One rate's trial: the validation loss after it (inf: diverged), its general-text
    perplexity over the starting model's (None: eval.forgetting off), and the run's steps
    per trial step (what the forgetting is projected by)."""

    validation_loss: float
    forgetting: float | None = None
    run_per_trial: float = 1.0

    @property
    def projected_forgetting(self) -> float | None:
        if self.forgetting is None:
            return None
        return 1 + max(0.0, self.forgetting - 1) * self.run_per_trial

    @property
    def score(self) -> float:
        """What the search minimises: the validation loss, inf when ruled out."""
        projected = self.projected_forgetting
        if projected is not None and not projected <= FORGETTING_LIMIT:
            return math.inf
        return self.validation_loss if math.isfinite(self.validation_loss) else math.inf


@dataclass
class LrProbe:
    """What the probe found: the rate chosen, and each rate's trial."""

    chosen: float
    trials: dict[float, Trial]  # by peak rate tried
    bracketed: bool  # a rate tried on each side of the choice did worse (or was ruled out)
    steps: int  # optimizer steps per trial
    trained_on: int  # distinct training examples the trials train on
    validated_on: int  # validation examples (of the training data), never trained on
    seconds: float

    def note(self) -> str:
        def shown(trial: Trial) -> str:
            loss = f"{trial.validation_loss:.4f}"
            if trial.forgetting is None:
                return loss
            return f"{loss} / {trial.forgetting:.3f} -> {trial.projected_forgetting:.3f}"

        tried = ", ".join(f"{lr:.3g}: {shown(t)}" for lr, t in sorted(self.trials.items()))
        forgetting = any(t.forgetting is not None for t in self.trials.values())
        measured = "validation loss / forgetting, projected" if forgetting else "validation loss"
        where = "" if self.bracketed else ", at the edge of the rates tried"
        if math.isinf(self.trials[self.chosen].score):
            where = f", the lowest tried: each would forget beyond {FORGETTING_LIMIT} over the run"
        return (
            f"training.lr auto: {self.chosen:.3g}{where} ({measured} after {self.steps} "
            f"steps, on {self.validated_on} training examples kept aside: {tried}; "
            f"{self.seconds:.0f} s)"
        )

    def as_dict(self) -> dict:
        found = asdict(self)
        found["trials"] = [  # JSON has no infinity: a trial that diverged has loss None
            {
                "lr": lr,
                "validation_loss": t.validation_loss if math.isfinite(t.validation_loss) else None,
                "forgetting": t.forgetting,
                "projected_forgetting": t.projected_forgetting,
                "ruled_out": math.isinf(t.score),
            }
            for lr, t in sorted(self.trials.items())
        ]
        return found


def bracketed_minimum(
    score_at: Callable[[float], float], centre: float, max_trials: int = MAX_TRIALS
) -> tuple[float, bool]:
    """The rate of lowest `score_at` on the grid centre x GRID_FACTOR^k: k = -1, 0, 1 first,
    then one step beyond the lower or upper edge while the best lies there. Ties go to the
    lower rate (so when every score is inf, the search walks down). Returns (the rate,
    whether it is bracketed)."""
    scores: dict[int, float] = {}

    def best() -> int:
        return min(scores, key=lambda k: (scores[k], k))

    for k in (-1, 0, 1):
        scores[k] = score_at(centre * GRID_FACTOR**k)
    while len(scores) < max_trials and best() in (min(scores), max(scores)):
        edge = best() - 1 if best() == min(scores) else best() + 1
        scores[edge] = score_at(centre * GRID_FACTOR**edge)
    chosen = best()
    return centre * GRID_FACTOR**chosen, min(scores) < chosen < max(scores)


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
    general_text: list | None,
    run_steps: int,
) -> LrProbe:
    """Choose the peak rate for training `examples` by trials (module doc), around the
    method's default rate; `new_optimizer()` gives a fresh optimizer of the learner's
    parameters, as the run builds it; `general_text`: the forgetting meter's corpus
    examples (None: forgetting not measured); `run_steps`: the run's optimizer steps."""
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

    def corpus_perplexity() -> float:
        return math.exp(mean_loss(learner, general_text, world, pad_id, None))

    starting_perplexity = corpus_perplexity() if general_text else None
    trials: dict[float, Trial] = {}

    def trained_for_a_trial(peak: float) -> bool:
        """Whether the trial's steps were all finite (the same on every rank: loss and
        norm are reduced over ranks)."""
        _restore(learner.params, starting_weights)
        optimizer = new_optimizer()
        for step, batches in enumerate(step_batches):
            set_learning_rate(
                optimizer, learning_rate_at(step, steps, warmup, peak, training.schedule)
            )
            loss, _, norm = step_gradients(
                learner, batches, world, pad_id, training.seed, step, training.max_grad_norm
            )
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not finite:
                return False
        return True

    def score_of_trial(peak: float) -> float:
        if not trained_for_a_trial(peak):
            trials[peak] = Trial(math.inf)
            return math.inf
        loss = mean_loss(learner, validation_examples, world, pad_id, shared_rows_of)
        trial = Trial(loss if math.isfinite(loss) else math.inf, None, run_steps / steps)
        if starting_perplexity is not None:
            trial.forgetting = corpus_perplexity() / starting_perplexity
        trials[peak] = trial
        return trial.score

    devices = [learner.device] if learner.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        chosen, bracketed = bracketed_minimum(score_of_trial, config.default_learning_rate)
    _restore(learner.params, starting_weights)
    distinct = len({i for indices in trial_steps for i in indices})
    return LrProbe(
        chosen, trials, bracketed, steps, distinct, len(validation),
        time.perf_counter() - started,
    )  # fmt: skip


def _restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            local_part(param).copy_(value)

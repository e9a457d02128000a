"""A training run between its phases: what `loop.start` hands to `loop.steps` and
`loop.finish` (the Run, with its Learner and StepPlan), what a run gives back (TrainResult),
and how a run saves itself (its model, its checkpoints: whole, or in shards under FSDP) and
restores itself from a checkpoint written by any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sftforge.config.schema import Config
from sftforge.console import say
from sftforge.encode.encoder import Encoder
from sftforge.evaluation.generation import summed_loss_and_count
from sftforge.models.devices import autocast
from sftforge.models.flops import FlopModel
from sftforge.trackers import Trackers
from sftforge.training.assessment import Assessment
from sftforge.training.checkpoint import (
    check_same_run,
    checkpoint_root,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from sftforge.training.distributed import (
    World,
    max_over_ranks,
    on_sharded_model,
    sum_over_ranks,
    wait_for_all,
)
from sftforge.training.metrics import Progress
from sftforge.training.output import initial_adapter_of, save_run
from sftforge.training.sharded import (
    is_sharded_checkpoint,
    load_any_checkpoint,
    save_sharded_checkpoint,
)
from sftforge.training.sharded_model import write_sharded_weights
from sftforge.training.stochastic_rounding import StochasticBf16Weights
from sftforge.training.training_data import TrainingData

EVAL_BATCH = 8  # held-out examples per forward pass


@dataclass
class Learner:
    """What trains: the model, its loss module (wrapped by DDP or FSDP under torchrun), the
    trainable parameters and their optimizer, on one device in one precision."""

    model: torch.nn.Module  # the model (sharded in place under FSDP)
    trainer: torch.nn.Module  # its TokenLoss, under DDP or FSDP when many processes
    params: list[torch.nn.Parameter]  # the trainable ones (this rank's shards under FSDP)
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for fp32
    flops: FlopModel
    compile_failed: bool = False  # training.compile was asked for, and torch.compile failed
    rounding: StochasticBf16Weights | None = None  # each step's bf16 weights, if stochastic


def mean_loss(
    learner: Learner, examples: list, world: World, pad_id: int, shared_rows_of: int | None
) -> float:
    """The mean token loss of `examples` on the learner's model as it trains (its precision,
    its loss module), each rank measuring its share of them; the same on every rank."""
    share = examples[world.rank :: world.size]
    passes = max_over_ranks(math.ceil(len(share) / EVAL_BATCH), world, learner.device)
    with autocast(learner.device, learner.amp):
        total, count = summed_loss_and_count(
            learner.trainer,
            share,
            learner.device,
            pad_id,
            EVAL_BATCH,
            passes,
            shared_rows_of=shared_rows_of,
        )
    total, count = sum_over_ranks([total, count], world, learner.device)
    return total / max(count, 1)


@dataclass
class StepPlan:
    """Which optimizer steps the run takes, and where it stands among them."""

    total: int
    stream: Iterator[tuple[int, list[int]]]  # (epoch, example indices) of each step to come
    identity: dict  # what a resume must find unchanged
    peak_lr: float | None  # training.lr, or the probe's choice; None until a resume reads it
    done: int = 0  # steps done before this process started (resumed)


@dataclass
class Run:
    """What `start` hands to `steps` and `finish`: the config and the processes, the text
    side and the data, the Learner, the StepPlan, what the model is judged on (and its
    measurements before training), where progress is reported, and the progress so far."""

    config: Config
    world: World
    output_dir: Path
    encoder: Encoder
    data: TrainingData
    base_model_path: str
    learner: Learner
    plan: StepPlan
    assessment: Assessment
    trackers: Trackers
    before: dict | None = None  # the measurements before training
    lr_probe: dict | None = None  # what training.lr auto's trials found (lr_probe.LrProbe)
    progress: Progress = field(default_factory=Progress)

    @property
    def sharded(self) -> bool:
        return self.world.is_distributed and self.config.training.parallelism == "fsdp"

    def save_model(self, folder: Path | None) -> None:
        """The loadable model or adapter, with everything inference needs, into `folder`
        (rank 0's). Under FSDP every rank calls it (the others with None): the weights are
        gathered one at a time (training/sharded_model.py)."""
        if self.sharded:
            write_sharded_weights(folder, self.learner.trainer, self.learner.model, self.world)
            if folder is None:
                return
        encoder = self.encoder
        save_run(
            folder,
            self.learner.model,
            encoder.tokenizer,
            encoder.stop_ids,
            encoder.pad_id,
            self.config,
            self.data_report(),
            weights_written=self.sharded,
            initial_adapter=initial_adapter_of(self.config, self.output_dir),
        )

    def save_model_via(self, save: Callable[[Callable[[Path], None]], None]) -> None:
        """`save(self.save_model)` on rank 0 (save_final, save_best: they choose the folder);
        under FSDP the other ranks take their part in gathering the weights meanwhile."""
        if self.world.is_main:
            save(self.save_model)
        elif self.sharded:
            self.save_model(None)

    def on_model(self, fn):
        """`fn(model)` for measuring: under FSDP on every rank together, through the loss
        module (which gathers the outermost weights around it); else on the model itself."""
        if self.sharded:
            return on_sharded_model(self.learner.trainer, fn)
        return fn(self.learner.model)

    def held_out_loss_keeping_the_best(self) -> float:
        """The held-out loss during training, each rank measuring its share of the held-out
        examples; with eval.save_best, a new best is saved (every rank gathering with rank 0
        under FSDP)."""
        eval_loss = mean_loss(
            self.learner,
            self.assessment.held_out,
            self.world,
            self.encoder.pad_id,
            self.assessment.shared_rows_of,
        )
        if self.config.eval.save_best and eval_loss < self.progress.best_eval:
            self.progress.best_eval = eval_loss
            self.save_model_via(lambda save_model: save_best(self.output_dir, save_model))
            wait_for_all(self.world)
        return eval_loss

    def data_report(self) -> dict:
        """What the data gave, as saved beside the model and returned in the TrainResult."""
        report = self.data.report.__dict__ | {"base_model": self.base_model_path}
        if self.data.loaded.contents:  # tool calls, reasoning: and what was done with reasoning
            report["contents"] = dict(self.data.loaded.contents)
            report["reasoning"] = self.config.reasoning
        if self.data.mix:
            report["mix"] = self.data.mix
        return report

    def save_checkpoint(self, step: int) -> Path:
        """Every rank calls it; rank 0 writes (with the others, under FSDP)."""
        state = {"identity": self.plan.identity, "before": self.before}
        state["peak_lr"] = self.plan.peak_lr  # training.lr auto's choice is not in the config
        state["lr_probe"] = self.lr_probe
        state["progress"] = asdict(self.progress)
        keep = self.config.training.keep_checkpoints
        if self.sharded:
            save_sharded_checkpoint(
                self.output_dir,
                step,
                self.learner.trainer,
                self.learner.optimizer,
                state,
                keep,
                self.world,
            )
        elif self.world.is_main:
            save_checkpoint(
                self.output_dir,
                step,
                self.learner.model,
                self.learner.optimizer,
                state,
                keep,
                self.save_model,
            )
        wait_for_all(self.world)
        return checkpoint_root(self.output_dir) / f"step-{step:06d}"

    def resume(self, path: Path) -> None:
        """Weights, optimizer, RNG states, counters and the data position from a checkpoint
        (written by any number of processes). Last, after anything in `start` that draws random
        numbers: the RNG states come back too."""
        if is_sharded_checkpoint(path) or self.sharded:
            resumed = load_any_checkpoint(path, self.learner.trainer, self.learner.optimizer)
        else:
            # Verified by resume_point (on rank 0) just before: not hashed again here.
            resumed = load_checkpoint(
                path, self.learner.model, self.learner.optimizer, verified=True
            )
        check_same_run(resumed.state["identity"], self.plan.identity, path)
        self.plan.done, self.before = resumed.step, resumed.state["before"]
        self.progress = Progress(**resumed.state["progress"])
        self.plan.peak_lr = resumed.state.get("peak_lr", self.plan.peak_lr)
        self.lr_probe = resumed.state.get("lr_probe")
        for _ in range(self.plan.done):
            next(self.plan.stream)  # the data position: the next step drawn is the first unseen one
        say(f"resumed from {path} after step {self.plan.done} of {self.plan.total}")


@dataclass
class TrainResult:
    """What a finished run gives back (on rank 0; other ranks get `summary` None): where it
    saved the model, its before/after figures (summary.json), every metrics.jsonl row, and
    what the data gave (examples, tokens, rejects, mix)."""

    output_dir: Path
    summary: dict | None
    metrics: list[dict]
    data_report: dict

    @property
    def final_loss(self) -> float | None:
        return self.metrics[-1]["loss"] if self.metrics else None

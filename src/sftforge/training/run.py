"""A training run between its phases: what `train.start` sets up and `train.steps` and
`train.finish` use, and how a run saves itself (its model, its checkpoints: whole, or in
shards under FSDP) and restores itself from a checkpoint written by any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sftforge.config.schema import Config
from sftforge.encode.encoder import Encoder
from sftforge.models.flops import FlopModel
from sftforge.training.assessment import Assessment
from sftforge.training.checkpoint import (
    check_same_run,
    checkpoint_root,
    load_checkpoint,
    save_checkpoint,
)
from sftforge.training.distributed import World, wait_for_all
from sftforge.training.metrics import Progress
from sftforge.training.output import save_run
from sftforge.training.sharded import (
    is_sharded_checkpoint,
    load_any_checkpoint,
    save_sharded_checkpoint,
)
from sftforge.training.training_data import TrainingData


@dataclass
class Run:
    """Everything the steps need, set up by `start`."""

    config: Config
    world: World
    output_dir: Path
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for fp32
    model: torch.nn.Module  # the model (sharded in place under FSDP)
    trainer: torch.nn.Module  # its TokenLoss, under DDP or FSDP when many processes
    encoder: Encoder
    data: TrainingData
    base_model_path: str
    params: list[torch.nn.Parameter]  # the trainable ones (this rank's shards under FSDP)
    optimizer: torch.optim.Optimizer
    assessment: Assessment
    flops: FlopModel
    identity: dict  # what a resume must find unchanged
    total_steps: int
    stream: Iterator[tuple[int, list[int]]]  # (epoch, example indices) of each step to come
    done: int = 0  # steps done before this process started (resumed)
    before: dict | None = None  # the measurements before training
    compile_failed: bool = False  # training.compile was asked for, and torch.compile failed
    progress: Progress = field(default_factory=Progress)

    @property
    def sharded(self) -> bool:
        return self.world.is_distributed and self.config.training.parallelism == "fsdp"

    def save_model(self, folder: Path, model: torch.nn.Module | None = None) -> None:
        """The loadable model or adapter, with everything inference needs (rank 0)."""
        encoder = self.encoder
        data_report = self.data.report.__dict__ | {"base_model": self.base_model_path}
        if self.data.loaded.contents:  # tool calls, reasoning: and what was done with reasoning
            data_report["contents"] = dict(self.data.loaded.contents)
            data_report["reasoning"] = self.config.reasoning
        if self.data.mix:
            data_report["mix"] = self.data.mix
        save_run(
            folder,
            model or self.model,
            encoder.tokenizer,
            encoder.stop_ids,
            encoder.pad_id,
            self.config,
            data_report,
        )

    def save_checkpoint(self, step: int) -> Path:
        """Every rank calls it; rank 0 writes (with the others, under FSDP)."""
        state = {"identity": self.identity, "before": self.before}
        state["progress"] = asdict(self.progress)
        keep = self.config.training.keep_checkpoints
        if self.sharded:
            save_sharded_checkpoint(
                self.output_dir, step, self.trainer, self.optimizer, state, keep, self.world
            )
        elif self.world.is_main:
            save_checkpoint(
                self.output_dir, step, self.model, self.optimizer, state, keep, self.save_model
            )
        wait_for_all(self.world)
        return checkpoint_root(self.output_dir) / f"step-{step:06d}"

    def resume(self, path: Path) -> None:
        """Weights, optimizer, RNG states, counters and the data position from a checkpoint
        (written by any number of processes). Last, after anything in `start` that draws random
        numbers: the RNG states come back too."""
        if is_sharded_checkpoint(path) or self.sharded:
            resumed = load_any_checkpoint(path, self.trainer, self.optimizer)
        else:
            # Verified by resume_point (on rank 0) just before: not hashed again here.
            resumed = load_checkpoint(path, self.model, self.optimizer, verified=True)
        check_same_run(resumed.state["identity"], self.identity, path)
        self.done, self.before = resumed.step, resumed.state["before"]
        self.progress = Progress(**resumed.state["progress"])
        for _ in range(self.done):
            next(self.stream)  # the data position: the next step drawn is the first unseen one
        print(f"resumed from {path} after step {self.done} of {self.total_steps}")

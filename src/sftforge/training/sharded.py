"""Checkpoints of a model sharded by FSDP, and checkpoints read by a run of another shape.

Under FSDP no rank holds a whole weight, so every rank writes its shards of the trainable
weights and of the optimizer state with torch.distributed.checkpoint (DCP), into one folder:

    <output_dir>/checkpoints/step-000120/
        sharded/        DCP's files: each rank's shards and the metadata that joins them
        state.json      step, counters, the run's identity (as in any checkpoint)

It is written into a hidden folder and renamed into place like any checkpoint (rank 0
renames once every rank has written). DCP reshards on load, so such a checkpoint resumes on
any number of processes, under FSDP, DDP or alone; and a checkpoint written by one process
or by DDP (whole weights) resumes under FSDP. `sftforge convert CHECKPOINT OUT` makes a
plain model or adapter of a sharded checkpoint.

State dicts go through torch's `get_state_dict` / `set_state_dict`, which name weights the
same way whatever wraps the model (DDP's prefix is dropped; FSDP keeps the names).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from sftforge.atomic import write_atomically
from sftforge.training.checkpoint import (
    CheckpointError,
    Resumed,
    checkpoint_root,
    prune_checkpoints,
)
from sftforge.training.distributed import World, from_main

SHARDED = "sharded"
TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def save_sharded_checkpoint(
    output_dir: Path,
    step: int,
    trainer: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int,
    world: World,
) -> None:
    """Every rank writes its shards into checkpoint `step`; rank 0 adds state.json, renames
    the folder into place and deletes all but the newest `keep`."""
    model_state, optimizer_state = get_state_dict(trainer, optimizer, options=TRAINABLE_ONLY)
    shards = {"model": model_state, "optimizer": optimizer_state}
    if not world.is_main:
        dcp.save(shards, checkpoint_id=from_main(None, world))
        return

    def write(folder: Path) -> None:
        dcp.save(shards, checkpoint_id=from_main(folder / SHARDED, world))
        full_state = state | {"step": step, "world_size": world.size}
        (folder / "state.json").write_text(json.dumps(full_state), "utf-8")

    write_atomically(checkpoint_root(output_dir) / f"step-{step:06d}", write)
    prune_checkpoints(output_dir, keep, written=step)


def load_any_checkpoint(
    path: Path, trainer: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> Resumed:
    """Restore the trainable weights and the optimizer of `trainer` (a TokenLoss, alone or
    under DDP or FSDP) from a checkpoint written by any number of processes."""
    state = json.loads((path / "state.json").read_text("utf-8"))
    model_state, optimizer_state = get_state_dict(trainer, optimizer, options=TRAINABLE_ONLY)
    if is_sharded_checkpoint(path):
        shards = {"model": model_state, "optimizer": optimizer_state}
        _load_shards(shards, path / SHARDED)
        set_state_dict(
            trainer,
            optimizer,
            model_state_dict=shards["model"],
            optim_state_dict=shards["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
    else:
        whole_weights, whole_optimizer = _whole_checkpoint_state(path, trainer, optimizer, state)
        set_state_dict(
            trainer,
            optimizer,
            model_state_dict=whole_weights,
            optim_state_dict=whole_optimizer,
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    return Resumed(step=state["step"], state=state)


def load_trained_weights(path: Path, trainer: torch.nn.Module) -> None:
    """The trained weights of checkpoint `path` (sharded or whole) into `trainer`, without
    the optimizer: for a plain model made of a checkpoint."""
    weights = get_model_state_dict(trainer, options=TRAINABLE_ONLY)
    if is_sharded_checkpoint(path):
        shards = {"model": weights}
        _load_shards(shards, path / SHARDED)
        weights = shards["model"]
    else:
        weights = {f"model.{n}": t for n, t in load_file(path / "trainable.safetensors").items()}
    set_model_state_dict(
        trainer, weights, options=StateDictOptions(ignore_frozen_params=True, strict=False)
    )


def _whole_checkpoint_state(path: Path, trainer, optimizer, state: dict) -> tuple[dict, dict]:
    """A one-process (or DDP) checkpoint as the state dicts `set_state_dict` takes: weights
    named as in the TokenLoss ("model." + the model's names), optimizer state by those names
    instead of by position."""
    weights = {f"model.{name}": t for name, t in load_file(path / "trainable.safetensors").items()}
    names = _names_in_optimizer_order(trainer, optimizer)
    if sorted(names) != sorted(weights):
        raise CheckpointError(
            f"{path}: its trainable weights do not match this model's; was it written with "
            "another model, method or LoRA config?"
        )
    tensors = load_file(path / "optimizer.safetensors")
    layout = state["optimizer"]
    per_param: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(layout["scalars"].items()):
        index, field = key.split(".", 1)
        per_param.setdefault(names[int(index)], {})[field] = value
    groups = []
    for group in layout["param_groups"]:
        groups.append(group | {"params": [names[i] for i in group["params"]]})
    return weights, {"state": per_param, "param_groups": groups}


def _names_in_optimizer_order(trainer, optimizer) -> list[str]:
    """The trainable parameters' names (without DDP's prefix) in the optimizer's order: its
    groups' one after the other (LoRA+'s B matrices are a group of their own)."""
    name_of = {id(p): name.removeprefix("module.") for name, p in trainer.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _load_shards(shards: dict, folder: Path) -> None:
    """`dcp.load`, which in one process (a resume or an export on one device) warns that it
    assumes one process even when told so (`no_dist`, torch 2.13): that is the intent, so
    that one warning is silenced here."""
    alone = not dist.is_initialized()
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(shards, checkpoint_id=folder, no_dist=alone)

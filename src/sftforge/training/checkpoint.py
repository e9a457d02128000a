"""Resumable checkpoints, written whole or not at all.

    <output_dir>/checkpoints/step-000120/
        (the model or adapter, tokenizer, chat template: loadable like the final model)
        trainable.safetensors   the trainable weights, bit for bit (adapters, or the whole model)
        optimizer.safetensors   the optimizer's per-parameter state (AdamW's moments and steps)
        rng.safetensors         torch's generator states (CPU, and the run's GPU)
        state.json              step, data position, python/numpy RNG, counters, the run's
                                config and data fingerprint, the "before" measurements
        checksums.json          each file's sha256 and size when written

A checkpoint is written into a hidden temporary folder, the sha256 and size of each of its
files are recorded in `checksums.json`, every file and the folder are fsynced, and only then
is the folder renamed to `step-NNNNNN`. A folder of that name is therefore complete; a
leftover temporary folder from a killed run is removed at the next start; a file damaged
later (a flipped bit, a truncation by a failing disk) is caught by `verify_checkpoint`
before anything is loaded from it. The data position is the number of optimizer steps done:
steps are a pure function of (seed, epoch), so the resumed run draws the very next unseen
step.

The best weights (eval.save_best) are kept under checkpoints/best until the run ends, and
the final model is moved into the output dir with its weights last, so a run that failed
leaves nothing that looks like a finished model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sftforge.atomic import (
    CHECKSUMS,
    TEMPORARY_PREFIX,
    delete_out_of_sight,
    publish_files,
    sha256_of,
    write_atomically,
)
from sftforge.config.schema import Config
from sftforge.encode.encoder import Example
from sftforge.encode.table import ExampleView
from sftforge.errors import InputError

CHECKPOINTS = "checkpoints"
STEP_NAME = re.compile(r"^step-(\d{6,})$")
RESUME_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class CheckpointError(InputError):
    pass


@dataclass
class Resumed:
    step: int  # optimizer steps already done
    state: dict  # the rest of state.json: counters, "before", fingerprints


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS


def step_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = step_checkpoints(output_dir)
    return found[-1] if found else None


def remove_unfinished(output_dir: Path) -> list[Path]:
    """Delete what a killed run left half-written or half-deleted; returns what was removed."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.name.startswith(TEMPORARY_PREFIX)]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return leftovers


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int,
    save_model: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`.
    `save_model(folder)` adds the loadable model or adapter (with tokenizer and template),
    so that a checkpoint can be evaluated or served as it is."""
    final = checkpoint_root(output_dir) / f"step-{step:06d}"

    def write(folder: Path) -> None:
        if save_model is not None:
            save_model(folder)
        save_file(trainable_state(model), folder / "trainable.safetensors")
        optimizer_tensors, optimizer_layout = flatten_optimizer_state(optimizer)
        save_file(optimizer_tensors, folder / "optimizer.safetensors")
        save_file(torch_rng_states(), folder / "rng.safetensors")
        full_state = state | {
            "step": step,
            "optimizer": optimizer_layout,
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            "checksummed": True,  # so a lost checksums.json is not taken for an old checkpoint
        }
        (folder / "state.json").write_text(json.dumps(full_state), "utf-8")

    write_atomically(final, write)
    prune_checkpoints(output_dir, keep, written=step)
    return final


def prune_checkpoints(output_dir: Path, keep: int, written: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints up to step `written` (the one just
    written; None: all). Later ones are there when the run resumed from an earlier one (named,
    or the newest intact one): the run replaces them as it gets there, and they must not push
    out the only intact ones."""
    found = step_checkpoints(output_dir)
    if written is not None:
        found = [p for p in found if int(STEP_NAME.match(p.name)[1]) <= written]
    for old in found[:-keep]:
        delete_out_of_sight(old)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, verified: bool = False
) -> Resumed:
    """Restore weights, optimizer and RNG states from `path`, once its files are verified
    against its checksums (unless the caller just did: `verified`, as a run's resume_point
    does, so that a large checkpoint is not hashed twice); returns the run's counters."""
    missing = [name for name in RESUME_FILES if not (path / name).is_file()]
    problem = _incomplete(missing) if missing else None
    if problem is None and not verified:
        problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(damaged_message(path, problem))
    state = json.loads((path / "state.json").read_text("utf-8"))
    load_trainable_state(model, load_file(path / "trainable.safetensors"), path)
    restore_optimizer_state(optimizer, load_file(path / "optimizer.safetensors"), state)
    restore_rng_states(load_file(path / "rng.safetensors"), state)
    return Resumed(step=state["step"], state=state)


def damaged_message(path: Path | str, problem: str) -> str:
    return (
        f"{path}: {problem}; restore what is named from a copy, or resume from another "
        "checkpoint (resume=auto falls back to the newest one that verifies)"
    )


# ---- the best and the final model, also never half-written ---


def save_best(output_dir: Path, save_model: Callable[[Path], None]) -> None:
    """The best weights so far (written by `save_model(folder)`), kept beside the checkpoints
    until the run finishes."""
    write_atomically(checkpoint_root(output_dir) / "best", save_model)


def publish_best(output_dir: Path) -> None:
    kept = checkpoint_root(output_dir) / "best"
    if kept.is_dir():
        if (output_dir / "best").exists():
            shutil.rmtree(output_dir / "best")
        os.rename(kept, output_dir / "best")


def save_final(output_dir: Path, save_model: Callable[[Path], None]) -> None:
    """The model (or adapter), written aside by `save_model(folder)` and moved into
    output_dir with its weights last: a folder whose weights are there holds a complete
    model."""
    staging = output_dir / ".final.writing"
    if staging.exists():
        shutil.rmtree(staging)
    save_model(staging)
    publish_files(staging, output_dir)


# ---- is it the same run? -------------------------------------------------------------------


def run_identity(config: Config, examples: list[Example] | ExampleView) -> dict:
    """What must not change between a checkpoint and its resume: the settings that shape the
    steps (every config field not marked resumable), and a fingerprint of the tokenized data."""
    if isinstance(examples, ExampleView):
        fingerprint = examples.fingerprint()
    else:
        digest = hashlib.sha256()
        for example in examples:
            digest.update(array("q", example.input_ids).tobytes())
            digest.update(array("q", example.labels).tobytes())
        fingerprint = digest.hexdigest()
    shaping = config.run_shaping_settings()
    return {"config": shaping, "data_sha256": fingerprint, "examples": len(examples)}


def check_same_run(saved: dict, current: dict, path: Path) -> None:
    if saved["data_sha256"] != current["data_sha256"]:
        raise CheckpointError(
            f"{path}: the training data differ from the run that wrote this checkpoint "
            f"({saved['examples']} examples then, {current['examples']} now, or their tokens "
            "changed); an exact resume needs the same data. Restore it, or start a new run"
        )
    changed = _changed_keys(saved["config"], current["config"])
    if changed:
        raise CheckpointError(
            f"{path}: the config differs from the run that wrote this checkpoint in "
            f"{', '.join(changed)}; an exact resume needs the same settings. Put them back, "
            "or start a new run in another output_dir"
        )


def _changed_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return changed


# ---- weights -------------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, saved: dict, path: Path) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing = sorted(set(params) - set(saved))[:3]
        extra = sorted(set(saved) - set(params))[:3]
        raise CheckpointError(
            f"{path}: its trainable weights do not match this model's (missing {missing}, "
            f"unexpected {extra}); was it written with another model, method or LoRA config?"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(
                    f"{path}: weight {name} has shape {tuple(saved[name].shape)}, "
                    f"this model's has {tuple(p.shape)}"
                )
            p.copy_(saved[name])


# ---- optimizer -----------------------------------------------------------------------------


def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors keyed "index.name", the JSON-able rest): safetensors holds tensors only."""
    saved = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in saved["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": saved["param_groups"], "scalars": scalars}


def restore_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, state: dict) -> None:
    layout = state["optimizer"]
    per_param: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(layout["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()["param_groups"]
    saved_groups = layout["param_groups"]
    if [len(g["params"]) for g in current] != [len(g["params"]) for g in saved_groups]:
        raise CheckpointError("the checkpoint's optimizer holds other parameters than this run's")
    optimizer.load_state_dict({"state": per_param, "param_groups": saved_groups})


# ---- random number generators --------------------------------------------------------------


def torch_rng_states() -> dict[str, torch.Tensor]:
    """The CPU generator's state, and the run's own GPU's (the current device, once CUDA is
    in use): never every visible GPU's, which would start a CUDA context on each. (Every
    step reseeds its generators from the seed and the step anyway: update.step_seed.)"""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(tensors: dict, state: dict) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])  # the current device: this run's GPU
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("numpy_rng") is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list | None:
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


# ---- checksums -----------------------------------------------------------------------------


def verify_checkpoint(path: Path) -> str | None:
    """None if every file in `path`'s checksums.json is there with the size and sha256 it
    had when written; otherwise why not, naming the first bad file. A folder written before
    sftforge kept checksums cannot be verified: it passes (None), so that a run upgraded
    mid-way still resumes; its caller may say so."""
    if not (path / CHECKSUMS).is_file():
        if _readable_state(path).get("checksummed"):
            return f"no {CHECKSUMS}, though state.json says it was written with one (deleted?)"
        return None
    try:
        manifest = json.loads((path / CHECKSUMS).read_text("utf-8"))
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in manifest.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"{CHECKSUMS}: unreadable (corrupted?)"
    missing = [name for name in expected if not (path / name).is_file()]
    if missing:
        return _incomplete(missing)
    for name, (size, _) in expected.items():  # sizes first: a stat is cheap, a hash is not
        actual = (path / name).stat().st_size
        if actual != size:
            why = "truncated?" if actual < size else "appended to?"
            return f"{name}: {actual:,} bytes, {size:,} when written ({why})"
    for name, (_, sha256) in expected.items():
        if sha256_of(path / name) != sha256:
            return f"{name}: sha256 differs from when it was written (corrupted)"
    return None


def _incomplete(missing: list[str]) -> str:
    return f"not a complete checkpoint (missing {', '.join(missing)})"


def _readable_state(path: Path) -> dict:
    try:
        state = json.loads((path / "state.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}

"""Checks made before the first step, so a run fails in seconds rather than after hours:
the output dir is writable and holds no other run, the checkpoint to resume from is intact,
the disk has room for the checkpoints, and `max_length` leaves room for content after the
template's own tokens."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from sftforge.atomic import CHECKSUMS
from sftforge.config.loading import ConfigError
from sftforge.console import say
from sftforge.data.messages import DataError, Message
from sftforge.data.readers import data_files
from sftforge.encode.templates import TemplateError
from sftforge.errors import InputError
from sftforge.training.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    damaged_message,
    step_checkpoints,
    verify_checkpoint,
)

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


class PreflightError(InputError):
    pass


def check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PreflightError(
            f"output_dir {output_dir} is not writable ({e.strerror}); choose another "
            "output_dir or fix its permissions"
        ) from None


def check_data_files(config) -> None:
    """Every data file and folder named exists and holds data files: a typo fails here, in
    a second, not after the model has loaded."""
    data_files(config.data.paths())
    held_out = config.eval.held_out
    if isinstance(held_out, str):
        data_files(held_out)


def previous_run(output_dir: Path) -> list[Path]:
    """What an earlier run left here that a new run would mix with: checkpoints, a model."""
    if not output_dir.is_dir():
        return []
    found = step_checkpoints(output_dir)
    found += [p for p in output_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    found += [
        output_dir / name for name in ("summary.json", "best") if (output_dir / name).exists()
    ]
    return found


def clear_previous_run(output_dir: Path) -> None:
    """Delete an earlier run's checkpoints and model (asked for with overwrite_output_dir)."""
    if (output_dir / CHECKPOINTS).is_dir():
        shutil.rmtree(output_dir / CHECKPOINTS)
    for path in previous_run(output_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def resume_point(resume: str | None, overwrite: bool, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start afresh), or an error saying what to do."""
    if resume is None:
        found = previous_run(output_dir)
        if found and not overwrite:
            shown = ", ".join(str(p.relative_to(output_dir)) for p in found[:4])
            raise PreflightError(
                f"output_dir {output_dir} holds a previous run ({shown}); continue it with "
                "resume=auto, start afresh there with overwrite_output_dir=true (deletes it), "
                "or choose another output_dir"
            )
        if found:
            clear_previous_run(output_dir)
        return None
    if resume == "auto":
        checkpoints = step_checkpoints(output_dir)
        found = previous_run(output_dir)
        if not checkpoints and found:
            shown = ", ".join(str(p.relative_to(output_dir)) for p in found[:4])
            raise PreflightError(
                f"resume=auto: output_dir {output_dir} holds a previous run ({shown}) but no "
                "checkpoint to go on from; choose another output_dir, or start afresh there "
                "with overwrite_output_dir=true (deletes it) instead of resume"
            )
        # None (no checkpoint): a fresh start, as a preempted job that never saved wants
        return newest_intact(checkpoints, output_dir)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise PreflightError(
            f"resume={resume}: not a checkpoint (no state.json); checkpoints are the "
            f"step-NNNNNN folders under {output_dir / CHECKPOINTS}, or use resume=auto"
        )
    problem = verify_checkpoint(path)  # here, before the model loads, whatever loads it
    if problem is not None:
        raise CheckpointError(damaged_message(f"resume={resume}", problem))
    _note_if_unverifiable(path, output_dir)
    return path


def newest_intact(checkpoints: list[Path], output_dir: Path) -> Path | None:
    """The newest of `checkpoints` (oldest first) whose files are all there and as written
    (`verify_checkpoint`), saying which newer ones were skipped and why; an error if there
    are some but none is."""
    damaged = []
    for checkpoint in reversed(checkpoints):
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            _note_if_unverifiable(checkpoint, output_dir)
            return checkpoint
        damaged.append(f"{_shown(checkpoint, output_dir)}: {problem}")
        say(f"skipped {damaged[-1]}")
    if damaged:
        raise PreflightError(
            f"resume=auto: no checkpoint in {output_dir / CHECKPOINTS} is intact "
            f"({'; '.join(damaged)}); restore the damaged files from a copy, or start afresh "
            "with overwrite_output_dir=true (deletes them) instead of resume"
        )
    return None


def _note_if_unverifiable(checkpoint: Path, output_dir: Path) -> None:
    if not (checkpoint / CHECKSUMS).is_file():
        say(
            f"note: {_shown(checkpoint, output_dir)} was written without {CHECKSUMS} (an "
            "older sftforge): resuming from it unverified"
        )


def _shown(path: Path, output_dir: Path) -> str:
    try:
        return str(path.relative_to(output_dir))
    except ValueError:
        return str(path)


def checkpoint_bytes(params: list[torch.nn.Parameter]) -> int:
    """The trainable weights twice (the loadable model or adapter, and the exact copy resume
    reads) plus the optimizer's per-parameter state (AdamW: two fp32 moments)."""
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = 2 * sum(p.numel() * 4 for p in params)
    return 2 * weights + moments


def check_free_disk(output_dir: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise PreflightError(
            f"output_dir {output_dir}: {free / 2**30:.2f} GiB free, but {what} need about "
            f"{needed / 2**30:.2f} GiB; free some space, choose another output_dir, or lower "
            "training.keep_checkpoints"
        )


def template_overhead(encoder) -> int:
    """Tokens the template spends on a one-turn conversation with empty content: its
    markers, role headers and any default system prompt."""
    messages = (Message("user", ""), Message("assistant", ""))
    try:
        return len(encoder.encode_prompt(messages[:1])) + 1
    except (TemplateError, DataError):  # a template may refuse empty content: nothing to check
        return 0


def check_max_length(encoder, max_length: int) -> None:
    overhead = template_overhead(encoder)
    if overhead >= max_length:
        raise ConfigError(
            f"config key 'max_length': {max_length} leaves no room for content: the template "
            f"'{encoder.template.name}' alone takes {overhead} tokens per exchange (markers, "
            f"headers, default system prompt); set max_length well above {overhead}"
        )

"""Training runs: `train`, `sweep`, `demo`."""

from __future__ import annotations

import filecmp
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftforge.config.loading import load_config
from sftforge.config.schema import Config
from sftforge.console import speaking
from sftforge.data.writers import write_jsonl
from sftforge.training.demo import run_demo
from sftforge.training.loop import train as run_training
from sftforge.training.preflight import PreflightError, previous_run
from sftforge.training.run import TrainResult
from sftforge.training.sweep import run_sweep

Records = Sequence[dict]  # demonstrations in memory, one dict a record, in any format read


def train(
    config: Config | str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    data: str | Path | Records | Any | None = None,
    verbose: bool = False,
    **fields,
) -> TrainResult:
    """Fine-tune a model; returns the TrainResult (output dir, before/after summary, every
    metrics row, the data report).

    `config`: a Config, a YAML file, or None (the defaults); then `fields` (keyword sections
    such as `training={"lr": 1e-4}`, merged key by key) and `overrides` ("training.lr=1e-4")
    on top. `data`: a file, folder or list of them, or records in memory (a list of dicts,
    a datasets.Dataset), which are written to OUTPUT_DIR/data/train.jsonl first, so that
    the run can be resumed and its errors name a line of that file."""
    in_memory = data is not None and not _are_paths(data)
    if data is not None:
        train_data = "(records in memory)" if in_memory else _paths(data)
        fields["data"] = {**fields.get("data", {}), "train": train_data}
    config = load_config(config, list(overrides), **fields)
    if in_memory:
        written = _write_records(data, config)
        config = load_config(config, data={"train": str(written)})
    with speaking(verbose):
        return run_training(config)


def _are_paths(data) -> bool:
    items = data if isinstance(data, (list, tuple)) else [data]
    return all(isinstance(item, (str, Path)) for item in items)


def _paths(data) -> str | list[str]:
    return [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)


def _write_records(records, config: Config) -> Path:
    """The records as OUTPUT_DIR/data/train.jsonl. Where a previous run in OUTPUT_DIR trained
    on that file, other records are refused before they replace its data (which a refused
    run would otherwise destroy), unless overwrite_output_dir starts afresh there."""
    output_dir = Path(config.output_dir)
    path = output_dir / "data" / "train.jsonl"
    new = path.with_name(f".{path.name}.new")
    write_jsonl(new, (dict(record) for record in records))
    try:
        trained_on = path.is_file() and previous_run(output_dir)
        if trained_on and not config.overwrite_output_dir and not filecmp.cmp(new, path, False):
            raise PreflightError(
                f"output_dir {output_dir} holds a previous run trained on the records in "
                f"{path}, and these records differ; pass the same records to resume it, "
                "start afresh there with overwrite_output_dir=true (deletes that run), or "
                "choose another output_dir"
            )
        new.replace(path)
    finally:
        new.unlink(missing_ok=True)
    return path


def sweep(
    config: str | Path | None,
    overrides: Sequence[str],
    steps: int = 30,
    *,
    verbose: bool = False,
) -> dict:
    """Short runs over the values of one key (`"training.lr=1e-5,3e-5,1e-4"` among the
    overrides), compared: {"key", "rows": [...], "recommended", "reason"}; the table and
    plots go under OUTPUT_DIR/sweep/."""
    with speaking(verbose):
        return run_sweep(str(config) if config else None, list(overrides), steps)


def demo(
    task: str = "extraction",
    output_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    verbose: bool = False,
) -> TrainResult:
    """Fine-tune the embedded SmolLM2-135M on a bundled task ("extraction" or "tools") and
    measure it before and after."""
    with speaking(verbose):
        return run_demo(str(output_dir) if output_dir else None, list(overrides), task)

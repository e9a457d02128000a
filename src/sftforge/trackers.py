"""Experiment trackers, one config key away: `report_to: [tensorboard, mlflow, trackio, wandb]`.

Each library is imported only when asked for. Each writes under the run's output directory,
offline, unless the user set that library's own environment variable:
  tensorboard  output_dir/tensorboard/events.out.tfevents.* (torch.utils.tensorboard)
  mlflow       output_dir/mlflow/mlflow.db (SQLite) and output_dir/mlflow/artifacts/, or
               MLFLOW_TRACKING_URI; its usage telemetry is off (MLFLOW_DISABLE_TELEMETRY=true
               unless set) when mlflow is first imported here
  trackio      output_dir/trackio/sftforge.db when this module first imports trackio (it reads
               TRACKIO_DIR once, at import), else the directory trackio already uses; with
               TRACKIO_SPACE_ID or TRACKIO_SERVER_URL, there. With a Hugging Face token and
               HF_HUB_OFFLINE unset, trackio.init asks the Hub for the token's user (whoami)
  wandb        output_dir/wandb/offline-run-*/run-*.wandb, or the mode WANDB_MODE names
`Trackers.locations` says where each went. Plain dicts in: it knows nothing of a run.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from sftforge.errors import InputError

# The allowed values of the config's report_to.
Tracker = Literal["tensorboard", "mlflow", "trackio", "wandb"]
TRACKERS = get_args(Tracker)
PROJECT = "sftforge"  # the mlflow experiment, the trackio project, the wandb project

# tracker -> the (module, pip package) pairs it needs. SQLAlchemy and Alembic: mlflow's local
# SQLite store (the full mlflow brings them, mlflow-skinny does not).
_NEEDS = {
    "tensorboard": [("tensorboard", "tensorboard")],  # written through torch.utils.tensorboard
    "mlflow": [("mlflow", "mlflow-skinny"), ("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")],
    "trackio": [("trackio", "trackio")],
    "wandb": [("wandb", "wandb")],
}
_MLFLOW_PARAM_KEY, _MLFLOW_PARAM_VALUE = 250, 6000  # MLflow's longest param key and value


class TrackerMissing(InputError, ImportError):
    """A tracker named in report_to whose library is not installed."""

    def __init__(self, missing: dict[str, list[str]]):
        self.packages = sorted({p for packages in missing.values() for p in packages})
        needs = ", ".join(f"{name} (needs {' and '.join(p)})" for name, p in missing.items())
        super().__init__(
            f"report_to names trackers whose libraries are not installed: {needs}. Install every "
            f"tracker with pip install 'sftforge[trackers]', or only these with "
            f"pip install {' '.join(self.packages)}"
        )


class _Tracker(Protocol):
    where: str

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def summary(self, numbers: dict[str, float], whole: dict, step: int) -> None: ...
    def close(self) -> None: ...


class Trackers:
    """Every tracker a run reports to. Only the main process (rank 0) constructs a real one;
    other ranks get Trackers.none(). Usable as a context manager that closes it."""

    def __init__(self, trackers: dict[str, _Tracker]):
        self._trackers = trackers
        self._step = 0
        # tracker name -> where its data goes (a directory, a file or a URI)
        self.locations = {name: t.where for name, t in trackers.items()}

    @classmethod
    def open(cls, names: Sequence[str], output_dir: Path, run_name: str, config: dict) -> Trackers:
        """Starts every tracker in `names` for one run. Raises ValueError for a name not in
        TRACKERS and, before starting any, one TrackerMissing for all the missing libraries."""
        names = check_installed(names, output_dir)
        output_dir = Path(output_dir)
        started: dict[str, _Tracker] = {}
        try:
            for name in names:
                started[name] = _START[name](output_dir, run_name, config)
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped it is the one to see
                cls(started).close()
            raise
        return cls(started)

    @classmethod
    def none(cls) -> Trackers:
        """Reports nowhere (the other ranks, or report_to empty)."""
        return cls({})

    def log_step(self, record: dict, step: int) -> None:
        """One metrics.jsonl row at `step`: its numbers (booleans, None and text are skipped)
        as "train/<key>", except that "eval_<rest>" keys go as "eval/<rest>". The row's "step"
        is each tracker's step, not a metric (an evaluation row would log it twice)."""
        names = {k: f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}" for k in record}
        numbers = {names[key]: _number(value) for key, value in record.items() if key != "step"}
        metrics = {name: number for name, number in numbers.items() if number is not None}
        self._step = max(self._step, step)
        if metrics:
            for tracker in self._trackers.values():
                tracker.log(metrics, step)

    def log_summary(self, summary: dict) -> None:
        """End-of-run figures: every number of the nested dict as "summary/<a.b.c>" (at the last
        step logged), and where the tracker keeps files or text, the whole dict as JSON."""
        flat = {f"summary/{key}": _number(value) for key, value in _flatten(summary).items()}
        numbers = {key: number for key, number in flat.items() if number is not None}
        for tracker in self._trackers.values():
            tracker.summary(numbers, summary, self._step)

    def close(self) -> None:
        """Flushes and finishes every tracker, all of them even when one fails (then raises
        that error). Closing again does nothing."""
        trackers, self._trackers = self._trackers, {}
        with contextlib.ExitStack() as stack:  # closes in reverse order, every one
            for tracker in trackers.values():
                stack.callback(tracker.close)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_installed(names: Sequence[str], output_dir: Path) -> list[str]:
    """The trackers `names` once each, their libraries imported; raises ValueError for a name
    not in TRACKERS and one TrackerMissing for all the missing libraries (a run checks this
    before loading anything, and opens the trackers once it is ready to train)."""
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise InputError(f"report_to: unknown tracker(s) {unknown}; expected any of {TRACKERS}")
    missing = {
        name: failed for name in names if (failed := _import_failures(name, Path(output_dir)))
    }
    if missing:
        raise TrackerMissing(missing)
    return names


def _number(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json(tree: dict) -> str:
    return json.dumps(tree, indent=2, default=str)


def _import_failures(name: str, output_dir: Path) -> list[str]:
    """Imports what tracker `name` needs; returns the pip packages of the modules that failed."""
    needs = _NEEDS[name]
    if name == "mlflow":
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
        if os.environ.get("MLFLOW_TRACKING_URI"):
            needs = needs[:1]  # a tracking server or the user's own store: no local SQLite store
    failed = []
    for module, package in needs:
        try:
            _import_trackio(output_dir / "trackio") if name == "trackio" else import_module(module)
        except ImportError:
            failed.append(package)
    return failed


def _import_trackio(directory: Path) -> Any:
    """trackio, with its data directory set to `directory` if this is its first import and the
    user did not set TRACKIO_DIR (trackio reads it at import; the variable is restored after)."""
    if "trackio" in sys.modules or os.environ.get("TRACKIO_DIR"):
        return import_module("trackio")
    os.environ["TRACKIO_DIR"] = str(directory.resolve())
    try:
        return import_module("trackio")
    finally:
        del os.environ["TRACKIO_DIR"]


class _TensorBoard:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.where = str(output_dir / "tensorboard")
        self._writer = SummaryWriter(log_dir=self.where)
        self._writer.add_text("config", _code(config), 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def summary(self, numbers: dict[str, float], whole: dict, step: int) -> None:
        self.log(numbers, step)
        self._writer.add_text("summary", _code(whole), step)

    def close(self) -> None:
        self._writer.close()


def _code(tree: dict) -> str:
    """JSON indented four spaces: a code block in TensorBoard's Markdown text view."""
    return "\n".join("    " + line for line in _json(tree).splitlines())


class _MLflow:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        store, uri = (output_dir / "mlflow").resolve(), os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            store.mkdir(parents=True, exist_ok=True)
        self.where = uri or f"sqlite:///{store / 'mlflow.db'}"
        client = self._client = MlflowClient(tracking_uri=self.where)
        found = client.get_experiment_by_name(PROJECT)
        artifacts = None if uri else (store / "artifacts").as_uri()  # next to the local database
        experiment = found.experiment_id if found else client.create_experiment(PROJECT, artifacts)
        self._run_id = client.create_run(experiment, run_name=run_name).info.run_id
        params = [Param(*_mlflow_param(k, v)) for k, v in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self._run_id, params=params[start : start + 100])
        client.log_dict(self._run_id, json.loads(_json(config)), "config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(name, value, now, step) for name, value in metrics.items()]
        for start in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics a batch
            self._client.log_batch(self._run_id, metrics=rows[start : start + 1000])

    def summary(self, numbers: dict[str, float], whole: dict, step: int) -> None:
        self.log(numbers, step)
        self._client.log_dict(self._run_id, json.loads(_json(whole)), "summary.json")

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def _mlflow_param(key: str, value: Any) -> tuple[str, str]:
    """A config entry as an MLflow param: a key of at most 250 of the characters MLflow allows
    (others become "_"), a value as text of at most 6000 characters (JSON for lists)."""
    key = re.sub(r"[^\w./\- ]", "_", key)[:_MLFLOW_PARAM_KEY]
    text = json.dumps(value, default=str) if isinstance(value, list) else str(value)
    return key, text[:_MLFLOW_PARAM_VALUE]


class _Trackio:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        trackio = _import_trackio(output_dir / "trackio")
        from trackio.utils import TRACKIO_DIR

        self.where = str(TRACKIO_DIR)
        self._run = trackio.init(  # embed=False: no dashboard server, even in a notebook
            project=PROJECT, name=run_name, config=json.loads(_json(config)), embed=False,
            auto_log_gpu=False, auto_log_cpu=False,
        )  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def summary(self, numbers: dict[str, float], whole: dict, step: int) -> None:
        if numbers:
            self._run.log(numbers, step=step)

    def close(self) -> None:
        self._run.finish()


class _WandB:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        import wandb

        output_dir.mkdir(parents=True, exist_ok=True)
        # wandb reads WANDB_MODE once per process (at its setup): read here, for every run.
        # reinit="create_new": a run of its own, whatever other wandb runs are active.
        self._run = wandb.init(
            project=PROJECT, name=run_name, dir=str(output_dir), config=json.loads(_json(config)),
            mode=os.environ.get("WANDB_MODE") or "offline", reinit="create_new",
        )  # fmt: skip
        self.where = str(Path(self._run.dir).parent)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def summary(self, numbers: dict[str, float], whole: dict, step: int) -> None:
        self._run.summary.update(numbers)
        # wandb uploads the files in the run's directory (run.dir) with the run.
        (Path(self._run.dir) / "sftforge_summary.json").write_text(_json(whole))

    def close(self) -> None:
        self._run.finish()


_START = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "trackio": _Trackio, "wandb": _WandB}

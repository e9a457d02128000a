"""Each tracker's data read back through that tracker's own reader: TensorBoard's
EventAccumulator, MLflow's MlflowClient, trackio's SQLiteStorage, and wandb's protobuf Record
parsed out of the offline run's transaction log."""

import collections
import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from sftforge.trackers import TRACKERS, TrackerMissing, Trackers

CONFIG = {"model": {"name": "tiny", "lr": 1e-4}, "tags": ["a", "b"], "max_length": 512}
STEPS = [
    ({"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-4, "grad_norm": None, "note": "x"}, 1),
    ({"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 5e-5, "skipped": True}, 2),
    ({"step": 2, "eval_loss": 1.7}, 2),
]
SUMMARY = {"eval_loss": {"before": 2.5, "after": 1.6}, "accuracy": 0.8, "verdict": "kept"}
# What the three rows become, as (name, step) -> value; the summary's numbers go at step 2.
EXPECTED = {
    ("train/epoch", 1): 0.5,
    ("train/loss", 1): 2.0,
    ("train/lr", 1): 1e-4,
    ("train/epoch", 2): 1.0,
    ("train/loss", 2): 1.5,
    ("train/lr", 2): 5e-5,
    ("eval/loss", 2): 1.7,
}
SUMMARY_NUMBERS = {
    "summary/eval_loss.before": 2.5,
    "summary/eval_loss.after": 1.6,
    "summary/accuracy": 0.8,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    for name in ("MLFLOW_TRACKING_URI", "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)


def run(names, out):
    with Trackers.open(names, out, "run1", CONFIG) as trackers:
        for record, step in STEPS:
            trackers.log_step(record, step)
        trackers.log_summary(SUMMARY)
    return trackers


def test_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = run(["tensorboard"], tmp_path / "out")
    events = EventAccumulator(trackers.locations["tensorboard"], {"scalars": 0, "tensors": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {name for name, _ in EXPECTED} | set(SUMMARY_NUMBERS)
    for (name, step), value in EXPECTED.items():
        assert [e.value for e in events.Scalars(name) if e.step == step] == [pytest.approx(value)]
    for name, value in SUMMARY_NUMBERS.items():
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(2, pytest.approx(value))]

    def text(tag):
        (event,) = events.Tensors(tag)
        return json.loads(event.tensor_proto.string_val[0].decode())

    assert text("config/text_summary") == CONFIG
    assert text("summary/text_summary") == SUMMARY


def test_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    trackers = run(["mlflow"], out)
    assert trackers.locations["mlflow"] == f"sqlite:///{out.resolve()}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=trackers.locations["mlflow"])
    experiment = client.get_experiment_by_name("sftforge")
    (found,) = client.search_runs([experiment.experiment_id])
    assert (found.info.run_name, found.info.status) == ("run1", "FINISHED")
    run_id = found.info.run_id
    for (name, step), value in EXPECTED.items():
        history = client.get_metric_history(run_id, name)
        assert [m.value for m in history if m.step == step] == [pytest.approx(value)]
    for name, value in SUMMARY_NUMBERS.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, name)] == [(2, value)]
    assert found.data.params == {
        "model.name": "tiny",
        "model.lr": "0.0001",
        "tags": '["a", "b"]',
        "max_length": "512",
    }
    for name, whole in (("config.json", CONFIG), ("summary.json", SUMMARY)):
        path = client.download_artifacts(run_id, name, str(tmp_path))
        assert json.loads(Path(path).read_text()) == whole
    assert str(out / "mlflow" / "artifacts") in experiment.artifact_location


def test_mlflow_tracking_uri_and_param_limits(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the store's default artifact root is relative to it
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = {"long": "x" * 7000, "odd key!": 1, **{f"k{i}": i for i in range(150)}}
    with Trackers.open(["mlflow"], tmp_path / "out", "run1", config) as trackers:
        pass
    assert trackers.locations["mlflow"] == uri and not (tmp_path / "out" / "mlflow").exists()
    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("sftforge").experiment_id])
    params = found.data.params
    assert len(params) == 152 and params["k149"] == "149"
    assert params["long"] == "x" * 6000 and params["odd key_"] == "1"


def test_trackio(tmp_path):
    fresh = "trackio" not in sys.modules  # trackio reads its data directory once, at import
    out = tmp_path / "out"
    trackers = run(["trackio"], out)
    import trackio.utils
    from trackio.sqlite_storage import SQLiteStorage

    assert "TRACKIO_DIR" not in os.environ  # set for trackio's import only
    expected_dir = (out / "trackio").resolve() if fresh else trackio.utils.TRACKIO_DIR
    assert trackers.locations["trackio"] == str(expected_dir)
    assert (expected_dir / "sftforge.db").is_file()
    logs = SQLiteStorage.get_logs("sftforge", run="run1")
    got = {(k, row["step"]): v for row in logs for k, v in row.items() if "/" in k}
    assert got == {**EXPECTED, **{(name, 2): value for name, value in SUMMARY_NUMBERS.items()}}
    config = SQLiteStorage.get_run_config("sftforge", "run1")
    assert {k: v for k, v in config.items() if not k.startswith("_")} == CONFIG


def wandb_records(path):
    """The protobuf Records of a .wandb transaction log. The file is a ":W&B" header, then
    LevelDB-log framing: 32 KiB blocks of chunks, each with a 7-byte header (CRC32C, length,
    type: 1 full, 2 first, 3 middle, 4 last). wandb 0.31 has no Python reader of its own."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    position, pieces, records = 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        if kind == 0:
            position += room - 7
            continue
        pieces += data[position : position + length]
        position += length
        if kind in (1, 4):
            records.append(Record.FromString(pieces))
            pieces = b""
    return records


def test_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # offline is the tracker's own default
    out = tmp_path / "out"
    trackers = run(["wandb"], out)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert trackers.locations["wandb"] == str(run_dir)
    (log,) = run_dir.glob("run-*.wandb")
    # finish() returns once the service has the exit record; the service writes and closes the
    # transaction log a moment later (at process exit at the latest: wandb's atexit teardown
    # waits for it). A test reading the log in the same process waits for the stream to close.
    service_log = run_dir / "logs" / "debug-internal.log"
    deadline = time.monotonic() + 60
    while "stream: all finished" not in service_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    history, summary, config = {}, {}, {}

    def name(item):
        return item.key or ".".join(item.nested_key)

    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                history[name(item), step] = json.loads(item.value_json)
        elif kind == "summary":
            summary.update({name(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({name(i): json.loads(i.value_json) for i in updates})
    kinds = collections.Counter(r.WhichOneof("record_type") for r in wandb_records(log))
    service_lines = service_log.read_text().splitlines()
    diagnosis = f"records {dict(kinds)}; wandb's service log ends:\n" + "\n".join(
        service_lines[-30:]
    )
    rows = {k: v for k, v in history.items() if "/" in k[0]}
    assert rows == pytest.approx(EXPECTED), diagnosis
    assert {k: summary[k] for k in SUMMARY_NUMBERS} == SUMMARY_NUMBERS
    assert summary["eval/loss"] == 1.7
    assert {k: v for k, v in config.items() if not k.startswith("_")} == CONFIG
    assert json.loads((run_dir / "files" / "sftforge_summary.json").read_text()) == SUMMARY


def test_all_four_together(tmp_path):
    trackers = run(list(TRACKERS), tmp_path / "out")
    assert list(trackers.locations) == list(TRACKERS)
    trackers.close()  # already closed by the with block: nothing happens


def test_missing_libraries_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackerMissing) as error:
        Trackers.open(["mlflow", "tensorboard", "wandb"], tmp_path / "out", "run1", CONFIG)
    message = str(error.value)
    assert "pip install 'sftforge[trackers]'" in message
    assert "pip install tensorboard wandb" in message
    assert isinstance(error.value, ImportError) and error.value.packages == ["tensorboard", "wandb"]
    assert not (tmp_path / "out").exists()  # nothing started, mlflow included


def test_unknown_tracker(tmp_path):
    with pytest.raises(ValueError, match="'neptune'.*tensorboard.*mlflow.*trackio.*wandb"):
        Trackers.open(["wandb", "neptune"], tmp_path / "out", "run1", CONFIG)


def test_none_reports_nowhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trackers = Trackers.none()
    for record, step in STEPS:
        trackers.log_step(record, step)
    trackers.log_summary(SUMMARY)
    trackers.close()
    trackers.close()
    assert trackers.locations == {} and list(tmp_path.iterdir()) == []

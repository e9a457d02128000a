"""One run per output dir: a second run on an output_dir in use is refused at once, naming
the run that holds it; a run killed with SIGKILL never leaves the output dir locked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftforge.training.runlock import RunLockedError, lock_output_dir

HOLD = """
import sys, time
from pathlib import Path
from sftforge.training.runlock import lock_output_dir
lock = lock_output_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock on tmp_path / "out"."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def test_a_second_run_is_refused_at_once_naming_the_holder(tmp_path, holder):
    started = time.monotonic()
    with pytest.raises(RunLockedError) as refused:
        lock_output_dir(tmp_path / "out")

    assert time.monotonic() - started < 1
    message = str(refused.value)
    assert f"output_dir {tmp_path / 'out'} is in use by another run (pid {holder.pid} " in message
    assert "on host " in message and "started " in message and "command: -c " in message
    assert message.endswith("wait for it to end or choose another output_dir")


def test_the_lock_file_says_who_holds_it(tmp_path, holder):
    recorded = json.loads((tmp_path / "out" / ".sftforge.lock").read_text())

    assert recorded["pid"] == holder.pid
    assert set(recorded) == {"pid", "host", "started", "command"}


def test_a_run_killed_with_sigkill_leaves_the_output_dir_free(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()

    lock = lock_output_dir(tmp_path / "out")

    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_released_lock_can_be_taken_again_and_a_held_one_cannot(tmp_path):
    lock = lock_output_dir(tmp_path / "out")
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} "):
        lock_output_dir(tmp_path / "out")

    lock.release()
    lock.release()  # a second release is harmless
    with lock_output_dir(tmp_path / "out") as again:
        assert json.loads(again.path.read_text())["pid"] == os.getpid()
    assert (tmp_path / "out" / ".sftforge.lock").read_text() == ""


def test_sftforge_train_on_an_output_dir_in_use_is_refused_before_loading_anything(
    tmp_path, holder
):
    from sftforge.config.loading import load_config
    from sftforge.training.loop import train

    demo = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"
    config = load_config(None, [f"data.train={demo}", f"output_dir={tmp_path / 'out'}"])
    started = time.monotonic()
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
        train(config)
    assert time.monotonic() - started < 2
    assert not (tmp_path / "out" / "checkpoints").exists()

"""Exact resume: a real training process, killed with SIGKILL (after a checkpoint, and in the
middle of writing one), resumes to the very weights of a run never interrupted."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 12
SAVE_EVERY = 3


def train_command(model_dir: str, data: Path, output_dir: Path, method: str, *extra: str):
    return [
        sys.executable,
        "-m",
        "sftforge",
        "train",
        f"model={model_dir}",
        f"data.train={data}",
        f"output_dir={output_dir}",
        f"method={method}",
        f"training.max_steps={STEPS}",
        f"training.save_every={SAVE_EVERY}",
        "training.keep_checkpoints=2",
        "training.batch_size=2",
        "training.grad_accum=2",
        "training.precision=fp32",
        "training.device=cpu",
        "training.lr=1e-3",
        "lora.dropout=0.1",  # draws random numbers every step: the RNG state must come back
        "max_length=128",
        "eval.forgetting=false",
        *extra,
    ]


def environment() -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def steps_logged(output_dir: Path) -> int:
    try:
        return len((output_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def checkpoint_being_written(output_dir: Path) -> bool:
    try:
        return any(".writing-" in entry.name for entry in os.scandir(output_dir / "checkpoints"))
    except FileNotFoundError:
        return False


def kill_when(command: list[str], ready, poll: float = 0.05, timeout: float = 240) -> None:
    """Start the run and SIGKILL it as soon as `ready()` holds, looking every `poll` seconds
    (a tight poll, to catch a checkpoint while it is written, costs the run CPU time)."""
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the run ended (code {process.returncode}) before the kill point")
            if time.monotonic() > deadline:
                pytest.fail("the kill point was never reached")
            time.sleep(poll)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL


def kill_while_writing_a_checkpoint(command: list[str], output_dir: Path, after_step: int) -> bool:
    """SIGKILL the run while it writes the first checkpoint after `after_step` steps; True if
    the kill landed inside the write. Polls gently up to that step, tightly from there."""
    steps_done = lambda: steps_logged(output_dir) >= after_step  # noqa: E731
    caught = lambda: steps_done() and checkpoint_being_written(output_dir)  # noqa: E731
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not steps_done() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        while not caught() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    return checkpoint_being_written(output_dir)


def final_weights(output_dir: Path, method: str) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    return load_file(output_dir / name)


def losses(output_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


@pytest.fixture(scope="module")
def data(demo_records_40) -> Path:
    return demo_records_40


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data):
    """The uninterrupted run of each method, made once."""
    runs = {}

    def run(method: str) -> Path:
        if method not in runs:
            runs[method] = tmp_path_factory.mktemp(f"reference-{method}")
            run_to_end(train_command(tiny_model_dir, data, runs[method], method))
        return runs[method]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_killed_runs_resume_to_bitwise_the_same_weights(
    tmp_path, tiny_model_dir, data, reference, method
):
    interrupted = tmp_path / "interrupted"
    command = train_command(tiny_model_dir, data, interrupted, method)
    resume = command + ["resume=auto"]
    # Kill points: inside the write of the second checkpoint (step 6; a later one if that
    # write was missed), so the run goes on from the first; then a random later step.
    killed_mid_write = kill_while_writing_a_checkpoint(command, interrupted, 2 * SAVE_EVERY - 1)
    if not killed_mid_write:
        killed_mid_write = kill_while_writing_a_checkpoint(
            resume, interrupted, steps_logged(interrupted)
        )
    resumed_at = steps_logged(interrupted)
    later = random.Random(5).randint(resumed_at + 1, STEPS - 1)
    kill_when(resume, lambda: steps_logged(interrupted) >= later)
    run_to_end(resume)

    assert killed_mid_write, "no kill landed inside a checkpoint write"
    assert not checkpoint_being_written(interrupted)
    assert_same_run(interrupted, reference(method), method)


def assert_same_run(resumed: Path, reference: Path, method: str) -> None:
    assert losses(resumed) == losses(reference)  # the same steps, in the same order
    expected, actual = final_weights(reference, method), final_weights(resumed, method)
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert different == []


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(
    tmp_path, tiny_model_dir, data, reference
):
    out = tmp_path / "run"
    command = train_command(tiny_model_dir, data, out, "lora")
    log = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(command, env=environment(), stdout=log, stderr=log)
    while steps_logged(out) < 4:
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    log.close()
    stderr = (tmp_path / "stderr.txt").read_text()

    assert process.returncode == 128 + signal.SIGTERM
    stopped_at = steps_logged(out)
    assert stopped_at < STEPS
    assert f"stopped by SIGTERM after step {stopped_at} of {STEPS}" in stderr
    assert "run the same command with resume=auto" in stderr
    assert "Traceback" not in stderr
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "state.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "summary.json").exists()
    run_to_end(command + ["resume=auto"])
    assert_same_run(out, reference("lora"), "lora")


def test_sigint_is_a_stop_request_like_sigterm_and_a_second_one_stops_at_once():
    # SIGTERM is tested end to end above; SIGINT goes through the same handler.
    from sftforge.cli.main import explain
    from sftforge.errors import RunInterrupted
    from sftforge.training.guards import stop_requests

    # Python's own handler first: an earlier test's library may have left another one.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_requests() as stop:
            signal.raise_signal(signal.SIGINT)  # the first: a request, no KeyboardInterrupt
            assert stop.signal == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # the second: the usual handler is back
    finally:
        signal.signal(signal.SIGINT, before)
    message, code = explain(RunInterrupted("stopped by SIGINT", signal.SIGINT))
    assert code == 130 and message == "stopped by SIGINT"

"""A checkpoint damaged after it was written (a flipped bit, a truncated or lost file) is
caught before anything is loaded from it: an explicit resume refuses it naming the file, and
resume=auto falls back to the newest checkpoint that is intact."""

import json
from pathlib import Path

import pytest
from test_checkpoint import tiny_optimizer_and_model

from sftforge.atomic import write_atomically
from sftforge.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
    verify_checkpoint,
)
from sftforge.training.preflight import PreflightError, resume_point


def checkpoints(output_dir: Path, *steps: int) -> list[Path]:
    model, optimizer = tiny_optimizer_and_model()
    for step in steps:
        save_checkpoint(output_dir, step, model, optimizer, {}, keep=len(steps))
    return step_checkpoints(output_dir)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_file_is_recorded_with_its_sha256_and_size_subfolders_included(tmp_path):
    target = tmp_path / "checkpoints" / "step-000001"

    def write(folder: Path) -> None:
        (folder / "state.json").write_text("{}")
        (folder / "shards").mkdir()
        (folder / "shards" / "rank-1.safetensors").write_bytes(b"\x00" * 10)

    write_atomically(target, write)

    manifest = json.loads((target / "checksums.json").read_text())
    assert set(manifest) == {"state.json", "shards/rank-1.safetensors"}
    assert manifest["shards/rank-1.safetensors"]["bytes"] == 10
    assert len(manifest["state.json"]["sha256"]) == 64
    assert verify_checkpoint(target) is None
    (target / "shards" / "rank-1.safetensors").write_bytes(b"\x00" * 9)
    assert verify_checkpoint(target).startswith("shards/rank-1.safetensors: 9 bytes, 10 ")


def test_resume_auto_checks_a_checkpoint_of_sharded_files_by_its_checksums_alone(tmp_path, capsys):
    def sharded(folder: Path) -> None:  # no one-process weight files: what FSDP ranks write
        (folder / "state.json").write_text("{}")
        (folder / "sharded").mkdir()
        (folder / "sharded" / "__0_0.distcp").write_bytes(b"\x01" * 64)

    for step in (2, 4):
        write_atomically(tmp_path / "checkpoints" / f"step-00000{step}", sharded)
    flip_a_byte(tmp_path / "checkpoints" / "step-000004" / "sharded" / "__0_0.distcp")

    assert resume_point("auto", False, tmp_path).name == "step-000002"
    assert capsys.readouterr().out == (
        "skipped checkpoints/step-000004: sharded/__0_0.distcp: sha256 differs from when it "
        "was written (corrupted)\n"
    )


def test_a_fresh_checkpoint_verifies(tmp_path):
    [checkpoint] = checkpoints(tmp_path, 2)

    assert verify_checkpoint(checkpoint) is None


def test_a_flipped_byte_is_detected_naming_the_file(tmp_path):
    [checkpoint] = checkpoints(tmp_path, 2)
    flip_a_byte(checkpoint / "trainable.safetensors")

    assert verify_checkpoint(checkpoint) == (
        "trainable.safetensors: sha256 differs from when it was written (corrupted)"
    )


def test_a_truncated_file_is_detected_with_both_sizes(tmp_path):
    [checkpoint] = checkpoints(tmp_path, 2)
    weights = checkpoint / "optimizer.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])

    assert verify_checkpoint(checkpoint) == (
        f"optimizer.safetensors: 100 bytes, {size:,} when written (truncated?)"
    )


def test_a_missing_file_is_detected(tmp_path):
    [checkpoint] = checkpoints(tmp_path, 2)
    (checkpoint / "rng.safetensors").unlink()

    assert verify_checkpoint(checkpoint) == "not a complete checkpoint (missing rng.safetensors)"


def test_a_lost_checksums_file_is_not_taken_for_an_older_checkpoint(tmp_path):
    [checkpoint] = checkpoints(tmp_path, 2)
    (checkpoint / "checksums.json").unlink()

    assert "no checksums.json" in verify_checkpoint(checkpoint)


def test_a_checkpoint_of_an_older_sftforge_without_checksums_resumes_with_a_note(tmp_path, capsys):
    [checkpoint] = checkpoints(tmp_path, 2)
    (checkpoint / "checksums.json").unlink()
    state = json.loads((checkpoint / "state.json").read_text())
    del state["checksummed"]
    (checkpoint / "state.json").write_text(json.dumps(state))

    assert verify_checkpoint(checkpoint) is None
    assert resume_point("auto", False, tmp_path) == checkpoint
    assert "checkpoints/step-000002 was written without checksums.json" in capsys.readouterr().out
    assert load_checkpoint(checkpoint, *tiny_optimizer_and_model()).step == 2


def test_load_checkpoint_refuses_a_damaged_one_naming_it_and_the_file(tmp_path):
    [checkpoint] = checkpoints(tmp_path, 2)
    flip_a_byte(checkpoint / "optimizer.safetensors")
    model, optimizer = tiny_optimizer_and_model()

    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(checkpoint, model, optimizer)

    message = str(refused.value)
    assert f"{checkpoint}: optimizer.safetensors: sha256 differs" in message
    assert "resume=auto falls back to the newest one that verifies" in message


def test_an_explicit_resume_of_a_damaged_checkpoint_fails_before_the_model_loads(tmp_path):
    [checkpoint] = checkpoints(tmp_path, 2)
    flip_a_byte(checkpoint / "trainable.safetensors")

    with pytest.raises(CheckpointError, match=r"resume=.*step-000002: trainable.safetensors: sha"):
        resume_point(str(checkpoint), False, tmp_path)


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint_saying_what_it_skipped(
    tmp_path, capsys
):
    first, second, third = checkpoints(tmp_path, 2, 4, 6)
    flip_a_byte(third / "optimizer.safetensors")
    (second / "state.json").write_text("{}")

    assert resume_point("auto", False, tmp_path) == first
    assert capsys.readouterr().out.splitlines() == [
        "skipped checkpoints/step-000006: optimizer.safetensors: sha256 differs from when it "
        "was written (corrupted)",
        "skipped checkpoints/step-000004: state.json: 2 bytes, "
        f"{json.loads((second / 'checksums.json').read_text())['state.json']['bytes']:,} "
        "when written (truncated?)",
    ]


def test_resume_auto_with_every_checkpoint_damaged_says_which_and_what_to_do(tmp_path):
    first, second = checkpoints(tmp_path, 2, 4)
    flip_a_byte(first / "trainable.safetensors")
    (second / "rng.safetensors").unlink()

    with pytest.raises(PreflightError) as refused:
        resume_point("auto", False, tmp_path)

    message = str(refused.value)
    assert "no checkpoint in" in message and "is intact" in message
    assert "checkpoints/step-000004: not a complete checkpoint (missing rng.safetensors)" in message
    assert "checkpoints/step-000002: trainable.safetensors: sha256 differs" in message
    assert "overwrite_output_dir=true" in message and "restore" in message


def test_checkpoints_after_the_resumed_one_never_push_out_the_newly_written_ones(tmp_path):
    # keep=1, resumed from step 2 because step 4 is damaged: writing step 3 must keep step 3
    # (the only intact one), not the damaged step 4.
    _, damaged = checkpoints(tmp_path, 2, 4)
    flip_a_byte(damaged / "trainable.safetensors")
    model, optimizer = tiny_optimizer_and_model()

    save_checkpoint(tmp_path, 3, model, optimizer, {}, keep=1)

    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert resume_point("auto", False, tmp_path).name == "step-000003"

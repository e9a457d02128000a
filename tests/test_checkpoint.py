"""Checkpoints are whole or absent, resume refuses a different run, and a run that fails
(non-finite loss, bad settings, no room) fails early and leaves no finished-looking model."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from sftforge.atomic import write_atomically
from sftforge.config.loading import ConfigError, load_config
from sftforge.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    remove_unfinished,
    save_checkpoint,
    step_checkpoints,
)
from sftforge.training.guards import NonFiniteError
from sftforge.training.loop import train
from sftforge.training.preflight import PreflightError, check_free_disk, resume_point

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"
FINISHED = ("adapter_model.safetensors", "model.safetensors", "summary.json")


def demo_subset(tmp_path, n=8) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:n]))
    return path


def run_config(tmp_path, model_dir, *overrides, data=None):
    return load_config(
        None,
        [
            f"model={model_dir}",
            f"data.train={data or demo_subset(tmp_path)}",
            f"output_dir={tmp_path / 'out'}",
            "training.max_steps=4",
            "training.batch_size=2",
            "training.save_every=2",
            "training.device=cpu",
            "training.precision=fp32",
            "max_length=128",
            "eval.forgetting=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    return demo_subset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, shared_data) -> Path:
    """One finished 4-step LoRA run with checkpoints at steps 2 and 4, for the tests that only
    read it (or a copy of it)."""
    root = tmp_path_factory.mktemp("finished")
    return train(
        run_config(root, tiny_model_dir, "training.keep_checkpoints=5", data=shared_data)
    ).output_dir


def copy_of(run: Path, tmp_path) -> Path:
    """A copy of a run to change; its config (and so its identity) is that of `run_config`
    with the same data, whatever output_dir it names."""
    copied = tmp_path / "out"
    shutil.copytree(run, copied)
    return copied


def tiny_optimizer_and_model():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_write_that_fails_midway_leaves_no_checkpoint_and_the_leftover_is_removed(tmp_path):
    target = tmp_path / "checkpoints" / "step-000002"

    def write_then_die(folder: Path) -> None:
        (folder / "trainable.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, write_then_die)

    assert not target.exists()
    assert latest_checkpoint(tmp_path) is None
    removed = remove_unfinished(tmp_path)
    assert [p.name for p in removed] == [f".step-000002.writing-{__import__('os').getpid()}"]
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_only_the_newest_k_checkpoints_are_kept(tmp_path):
    model, optimizer = tiny_optimizer_and_model()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, model, optimizer, {"identity": {}}, keep=2)

    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-000006", "step-000008"]
    assert latest_checkpoint(tmp_path).name == "step-000008"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000006",
        "step-000008",
    ]


def test_hidden_and_foreign_folders_are_never_taken_for_checkpoints(tmp_path):
    model, optimizer = tiny_optimizer_and_model()
    save_checkpoint(tmp_path, 3, model, optimizer, {}, keep=5)
    (tmp_path / "checkpoints" / ".step-000009.writing-1").mkdir()
    (tmp_path / "checkpoints" / "step-9-copy").mkdir()

    assert latest_checkpoint(tmp_path).name == "step-000003"


def test_a_checkpoint_with_a_file_missing_is_refused(
    tmp_path, tiny_model_dir, finished_run, shared_data
):
    checkpoint = latest_checkpoint(copy_of(finished_run, tmp_path))
    (checkpoint / "optimizer.safetensors").unlink()

    with pytest.raises(CheckpointError, match="not a complete checkpoint .missing optimizer"):
        train(run_config(tmp_path, tiny_model_dir, f"resume={checkpoint}", data=shared_data))


def test_checkpoints_hold_weights_optimizer_rng_and_data_position(finished_run):
    out = finished_run

    assert [p.name for p in step_checkpoints(out)] == ["step-000002", "step-000004"]
    checkpoint = step_checkpoints(out)[0]
    resume_files = {"optimizer.safetensors", "rng.safetensors", "state.json"}
    assert resume_files | {"trainable.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 2
    assert state["progress"]["tokens"] > 0
    assert {"python_rng", "numpy_rng", "optimizer", "identity", "before"} <= set(state)


def test_a_checkpoint_loads_for_inference_with_the_weights_it_resumes_from(finished_run):
    from safetensors.torch import load_file

    from sftforge.models.trained import load_for_inference

    checkpoint = step_checkpoints(finished_run)[0]

    model, tokenizer = load_for_inference(str(checkpoint))

    exact = load_file(checkpoint / "trainable.safetensors")
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert loaded and set(loaded) == set(exact)
    assert all(torch.equal(loaded[name], exact[name]) for name in loaded)
    assert tokenizer.chat_template


def test_a_new_run_refuses_an_output_dir_holding_a_previous_run(
    tmp_path, tiny_model_dir, finished_run
):
    copy_of(finished_run, tmp_path)

    with pytest.raises(PreflightError, match="holds a previous run .*resume=auto.*overwrite"):
        train(run_config(tmp_path, tiny_model_dir))

    train(run_config(tmp_path, tiny_model_dir, "overwrite_output_dir=true"))


def test_resume_auto_without_a_checkpoint_starts_afresh(tmp_path, tiny_model_dir):
    out = train(
        run_config(tmp_path, tiny_model_dir, "resume=auto", "training.max_steps=2")
    ).output_dir

    assert (out / "adapter_model.safetensors").is_file()


def test_resume_auto_never_starts_afresh_over_a_finished_run_without_checkpoints(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")

    with pytest.raises(PreflightError, match="holds a previous run .* but no checkpoint"):
        resume_point("auto", False, tmp_path)


def test_resume_refuses_changed_settings_or_data_naming_them(
    tmp_path, tiny_model_dir, finished_run, shared_data
):
    copy_of(finished_run, tmp_path)

    with pytest.raises(CheckpointError, match=r"training.lr \(None -> 0.001\)"):
        train(
            run_config(
                tmp_path, tiny_model_dir, "resume=auto", "training.lr=1e-3", data=shared_data
            )
        )
    (tmp_path / "other").mkdir()
    other_data = demo_subset(tmp_path / "other", n=10)
    with pytest.raises(CheckpointError, match="the training data differ"):
        train(run_config(tmp_path, tiny_model_dir, "resume=auto", data=other_data))


def test_resume_may_change_how_often_checkpoints_are_written_and_takes_the_same_steps(
    tmp_path, tiny_model_dir, finished_run, shared_data, caplog
):
    out = copy_of(finished_run, tmp_path)
    step_2 = step_checkpoints(out)[0]
    assert step_2.name == "step-000002"

    optimizer_steps = []
    counting = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: optimizer_steps.append(optimizer)
    )
    try:
        with caplog.at_level(logging.INFO, logger="sftforge"):
            train(
                run_config(
                    tmp_path,
                    tiny_model_dir,
                    f"resume={step_2}",
                    "training.save_every=1",
                    "training.keep_checkpoints=5",
                    data=shared_data,
                )
            )
    finally:
        counting.remove()

    # A resume, not a restart that reaches the same weights: it says so, and takes only the
    # two steps left.
    assert f"resumed from {step_2} after step 2 of 4" in caplog.text
    assert len(optimizer_steps) == 2
    # Steps 3 and 4 were taken again, each now followed by a checkpoint, to the same weights.
    assert [p.name for p in step_checkpoints(out)] == [f"step-00000{n}" for n in (2, 3, 4)]
    assert same_steps(out, finished_run)
    assert same_tensors(
        out / "adapter_model.safetensors", finished_run / "adapter_model.safetensors"
    )


def same_steps(run: Path, reference: Path) -> bool:
    """The same steps with the same results: every logged figure but the clock's."""
    timed = ("tokens_per_s", "trained_tokens_per_s", "tflops", "elapsed_s", "mfu")

    def rows(path: Path) -> list[dict]:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timed} for line in lines]

    return rows(run) == rows(reference)


def same_tensors(path: Path, reference: Path) -> bool:
    from safetensors.torch import load_file

    ours, theirs = load_file(path), load_file(reference)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# -- a run with everything on: packing, token budgets, held-out eval, save_best, bf16 --------

OFF_TOPIC = [
    ("What is the capital of France?", "Paris is the capital of France, on the Seine."),
    ("Name a large mammal.", "The blue whale is the largest mammal that ever lived."),
]


def diverging_config(root: Path, model_dir: str, *overrides, data: Path, held_out: Path):
    """Full fine-tuning at a learning rate high enough that the held-out loss is lowest after
    step 1 and higher at every later step: the best weights are not the last ones. (At 0.3
    the later losses wandered back near the first on some CPUs; at 3.0 they are 2-5x it.)"""
    return run_config(
        root,
        model_dir,
        "method=full",
        "training.precision=bf16",
        "training.packing=true",
        "training.micro_batch_tokens=256",
        "max_length=256",
        "training.lr=3.0",
        "training.schedule=constant",
        "training.warmup_ratio=0",
        "training.keep_checkpoints=5",
        f"eval.held_out={held_out}",
        "eval.every=1",
        "eval.save_best=true",
        "eval.samples=0",
        *overrides,
        data=data,
    )


@pytest.fixture(scope="module")
def diverging_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("diverging")
    held_out = root / "held_out.jsonl"
    held_out.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for u, a in OFF_TOPIC
        )
    )
    config = diverging_config(root, tiny_model_dir, data=demo_subset(root), held_out=held_out)
    return train(config).output_dir


def eval_losses(run: Path) -> list[float]:
    rows = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["eval_loss"] for line in rows]


def held_out_loss(model_dir: Path, held_out: Path) -> float:
    from sftforge.data.loading import load_conversations
    from sftforge.encode.encoder import Encoder
    from sftforge.encode.templates import resolve_template
    from sftforge.evaluation.generation import mean_token_loss
    from sftforge.models.trained import load_for_inference

    model, tokenizer = load_for_inference(str(model_dir))
    encoder = Encoder(tokenizer, resolve_template("auto", tokenizer))
    held = load_conversations(held_out).conversations
    # as the run measured it: under its autocast (training.precision=bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return mean_token_loss(model, [encoder.encode(c) for c in held], torch.device("cpu"), 0)


def test_save_best_keeps_the_weights_of_the_lowest_held_out_loss_not_the_last(diverging_run):
    losses = eval_losses(diverging_run)
    rows = [json.loads(line) for line in (diverging_run / "metrics.jsonl").read_text().splitlines()]

    assert losses.index(min(losses)) == 0 and len(losses) == 4  # best after step 1 of 4
    assert all(r["rows"] == 1 for r in rows), "each step's two examples share a row"
    held_out = diverging_run.parent / "held_out.jsonl"
    assert held_out_loss(diverging_run / "best", held_out) == pytest.approx(min(losses), rel=1e-3)
    assert held_out_loss(diverging_run, held_out) == pytest.approx(losses[-1], rel=1e-3)
    assert losses[-1] > 1.02 * min(losses)  # the final weights are measurably not the best


def test_resume_restores_the_best_held_out_loss_with_packing_budgets_and_bf16(
    tmp_path, tiny_model_dir, diverging_run
):
    # What a kill after step 3 leaves: the checkpoint of step 2, the best weights so far
    # (step 1's, kept beside the checkpoints), and metrics up to step 3.
    out = tmp_path / "out"
    shutil.copytree(
        diverging_run / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002"
    )
    shutil.copytree(diverging_run / "best", out / "checkpoints" / "best")
    rows = (diverging_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(rows[:3]))
    first = diverging_run.parent

    train(
        diverging_config(
            tmp_path,
            tiny_model_dir,
            "resume=auto",
            data=first / "data.jsonl",
            held_out=first / "held_out.jsonl",
        )
    )

    assert same_steps(out, diverging_run)
    assert same_tensors(out / "model.safetensors", diverging_run / "model.safetensors")
    # Steps 3 and 4 were worse than the best restored from the checkpoint: best/ is still
    # step 1's (a resume that forgot it would have saved step 3's).
    assert same_tensors(
        out / "best" / "model.safetensors", diverging_run / "best" / "model.safetensors"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((diverging_run / "summary.json").read_text())


def test_resume_of_a_path_that_is_not_a_checkpoint_says_where_they_are(tmp_path, tiny_model_dir):
    with pytest.raises(PreflightError, match="not a checkpoint .*step-NNNNNN"):
        train(run_config(tmp_path, tiny_model_dir, f"resume={tmp_path}"))


def test_an_output_dir_that_cannot_be_written_fails_before_loading_anything(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = load_config(None, ["data.train=x.jsonl", f"output_dir={blocker / 'out'}"])

    with pytest.raises(PreflightError, match="output_dir .*a-file/out is not writable"):
        train(config)


def test_too_little_free_disk_is_refused_with_the_sizes(tmp_path):
    with pytest.raises(PreflightError, match=r"GiB free, but 3 checkpoints need about .* GiB"):
        check_free_disk(tmp_path, 2**60, "3 checkpoints")


def test_max_length_below_the_templates_own_tokens_is_a_config_error(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="'max_length': 8 leaves no room for content"):
        train(run_config(tmp_path, tiny_model_dir, "max_length=8"))


# -- non-finite steps ------------------------------------------------------------------------

POISON = "Quetzalcoatl xylophone zugzwang"


def model_poisoned_with(value: float, tmp_path_factory, tiny_model_factory, tokenizer) -> str:
    """A tiny model whose (untied) input embeddings are `value` for the tokens of POISON:
    only the steps that hold the poisoned record see them."""
    clean = {i for line in DEMO.read_text().splitlines()[:8] for i in tokenizer.encode(line)}
    poisoned = [i for i in tokenizer.encode(" " + POISON) if i not in clean]
    assert poisoned
    model = tiny_model_factory(tie=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned] = value
    path = tmp_path_factory.mktemp("poisoned")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def poisoned_model_dir(tmp_path_factory, tiny_model_factory, shared_smollm2_tokenizer):
    """Any step holding the poisoned record has a NaN loss; every other step is finite."""
    return model_poisoned_with(
        float("nan"), tmp_path_factory, tiny_model_factory, shared_smollm2_tokenizer
    )


@pytest.fixture(scope="module")
def overflowing_model_dir(tmp_path_factory, tiny_model_factory, shared_smollm2_tokenizer):
    """Embeddings of 3e38 for the poisoned record's tokens: finite, but their square is not.
    RMSNorm scales them to 0 (1 / sqrt(inf)), so the forward and the loss stay finite; its
    backward meets inf * 0 and the gradient is NaN."""
    return model_poisoned_with(3e38, tmp_path_factory, tiny_model_factory, shared_smollm2_tokenizer)


def data_with_a_poisoned_record(tmp_path) -> Path:
    path = demo_subset(tmp_path, n=7)
    record = {
        "messages": [{"role": "user", "content": POISON}, {"role": "assistant", "content": "ok"}]
    }
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize(
    "model, stop",
    [
        ("poisoned_model_dir", "step 4: the loss (nan) is not finite"),
        (
            "overflowing_model_dir",
            "step 4: the gradient norm (nan) is not finite, though the loss (",
        ),
    ],
    ids=["nan-loss", "finite-loss-nan-gradient"],
)
def test_a_non_finite_step_stops_the_run_naming_it_its_records_and_the_last_checkpoint(
    tmp_path, request, model, stop
):
    data = data_with_a_poisoned_record(tmp_path)
    config = run_config(
        tmp_path,
        request.getfixturevalue(model),
        "training.batch_size=1",
        "training.max_steps=8",
        "training.save_every=1",
        "training.keep_checkpoints=5",
        "training.seed=1",
        data=data,
    )

    with pytest.raises(NonFiniteError) as stopped:
        train(config)

    message = str(stopped.value)
    assert f"{data}:8" in message  # the poisoned record, by file:line
    assert "the run stopped without applying it" in message
    out = tmp_path / "out"
    # With seed 1 the poisoned record is drawn fourth: steps 1-3 were good and saved.
    assert message.startswith(stop)
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000003'}" in message
    assert not any((out / name).exists() for name in FINISHED)


def test_skip_nonfinite_steps_skips_them_and_finishes_with_finite_weights(
    tmp_path, poisoned_model_dir
):
    config = run_config(
        tmp_path,
        poisoned_model_dir,
        "training.batch_size=1",
        "training.max_steps=8",
        "training.skip_nonfinite_steps=1",
        data=data_with_a_poisoned_record(tmp_path),
    )

    out = train(config).output_dir

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [
        r["step"] for r in rows if r["loss"] != r["loss"]
    ]
    assert len([r for r in rows if r.get("skipped")]) == 1
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_checkpoint_files_get_no_permission_the_umask_withholds(tmp_path, umask):
    import os

    model, optimizer = tiny_optimizer_and_model()
    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=1)
    finally:
        os.umask(previous)

    written = [tmp_path / "checkpoints", *(tmp_path / "checkpoints").rglob("*")]
    assert len(written) == 7  # checkpoints/, step-000001/, its 4 files, checksums.json
    widened = [(p.name, oct(p.stat().st_mode & 0o777)) for p in written if p.stat().st_mode & umask]
    assert widened == []


def test_resumed_metrics_keep_the_steps_done_and_drop_later_or_cut_rows(tmp_path):
    from sftforge.training.metrics import open_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, 6)]
    path.write_text("\n".join(rows) + '\n{"step": 6, "lo')

    metrics, kept = open_metrics(path, done=4)
    with metrics:
        metrics.write(json.dumps({"step": 5, "loss": 0.5}) + "\n")

    assert [row["step"] for row in kept] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]

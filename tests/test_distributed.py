"""Many processes, one update: torchrun with DDP and FSDP2 (gloo, 2 CPU processes of one
thread each) gives the same per-step losses and final weights as one process, at the default
settings (LoRA dropout on: drawn per example); a run resumes on another number of processes;
a failing rank ends the run; a slow rank's preparation does not time out the others."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from sftforge.config.loading import load_config
from sftforge.encode.batches import step_batches, step_stream
from sftforge.models.tokenizer import load_tokenizer, text_side
from sftforge.training.checkpoint import verify_checkpoint
from sftforge.training.distributed import (
    DistributedError,
    World,
    check_parallel_settings,
    offloads,
    share_of_step,
)
from sftforge.training.output import convert_checkpoint
from sftforge.training.training_data import load_examples

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"
FAULTY_RANK = Path(__file__).parent / "faulty_rank.py"
STEPS = 4


def settings(model_dir: str, data: Path, method: str) -> list[str]:
    return [
        f"model={model_dir}",
        f"data.train={data}",
        f"method={method}",
        f"training.max_steps={STEPS}",
        "training.save_every=2",
        "training.keep_checkpoints=2",
        "training.batch_size=1",
        "training.grad_accum=5",  # 5 examples a step: 3 on one rank, 2 on the other
        "training.packing=true",
        "training.micro_batch_tokens=256",  # one packed row per micro-batch
        "training.precision=fp32",
        "training.device=cpu",
        "training.lr=1e-3",  # LoRA's dropout left at its default: drawn per example
        "max_length=256",
        "eval.forgetting=false",
        "eval.held_out=4",
        "eval.every=2",
        "eval.max_new_tokens=16",  # the before/after samples: generated, and short
    ]


def command_for(processes: int, args: list[str], script: Path | None = None) -> list[str]:
    """`sftforge train ARGS` in one process, or under torchrun in `processes`."""
    program = [str(script)] if script else ["-m", "sftforge"]
    if processes == 1:
        return [sys.executable, *program, "train", *args]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [sys.executable, *torchrun, *program, "train", *args]


def environment(**extra) -> dict:
    quiet = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return os.environ | quiet | extra


def launch(processes: int, args: list[str], script: Path | None = None, timeout=300, **env):
    return subprocess.run(
        command_for(processes, args, script),
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_to_end(processes: int, args: list[str]) -> None:
    done = launch(processes, args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def metrics_rows(output_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, a dict a line (a step, or the held-out loss)."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics_rows(output_dir)]


def gradient_norms(output_dir: Path) -> list[float]:
    """Each step's gradient norm before clipping: a gradient scaled by the number of
    processes shows here, where clipping and Adam's scale invariance would hide it from the
    losses and weights for a few steps."""
    return [row["grad_norm"] for row in metrics_rows(output_dir)]


def eval_losses(output_dir: Path) -> list[float]:
    return [row["eval_loss"] for row in metrics_rows(output_dir) if "eval_loss" in row]


def final_weights(output_dir: Path, method: str) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    return load_file(output_dir / name)


def assert_same_training(actual: Path, expected: Path, method: str) -> None:
    assert losses(actual) == pytest.approx(losses(expected), rel=1e-5, abs=1e-5)
    assert gradient_norms(actual) == pytest.approx(gradient_norms(expected), rel=1e-4)
    assert eval_losses(actual) == pytest.approx(eval_losses(expected), rel=1e-5, abs=1e-5)
    want, got = final_weights(expected, method), final_weights(actual, method)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def data(demo_records_40) -> Path:
    return demo_records_40


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):
    """run(processes, parallelism, method): the output dir of that uninterrupted run, made
    once."""
    made = {}

    def run(processes: int, parallelism: str, method: str) -> Path:
        key = (processes, parallelism, method)
        if key not in made:
            made[key] = tmp_path_factory.mktemp(f"run-{processes}-{parallelism}-{method}")
            args = settings(tiny_model_dir, data, method)
            run_to_end(
                processes, args + [f"output_dir={made[key]}", f"training.parallelism={parallelism}"]
            )
        return made[key]

    return run


def test_the_ranks_shares_of_a_step_are_disjoint_cover_it_and_differ_in_trained_tokens(
    tiny_model_dir, data, tmp_path
):
    """What the equivalence test below runs: the steps' examples cut over 2 ranks, packed,
    with different numbers of trained tokens (and of micro-batches) on the two ranks."""
    config = load_config(None, settings(tiny_model_dir, data, "lora") + [f"output_dir={tmp_path}"])
    encoder, _ = text_side(load_tokenizer(tiny_model_dir), "auto")
    examples = load_examples(config, encoder, tmp_path).examples
    lengths = [len(e.input_ids) for e in examples]
    stream = step_stream(len(examples), 5, config.training.seed)
    trained_differ = micro_batches_differ = packed = False
    for _ in range(STEPS):
        _, step = next(stream)
        shares = [share_of_step(step, lengths, World(rank, 2, rank)) for rank in (0, 1)]
        assert sorted(shares[0] + shares[1]) == sorted(step)
        cut = [step_batches(examples, lengths, s, 0, 1, 256, 256) for s in shares]
        trained = [sum(b.trained_tokens for b in batches) for batches in cut]
        trained_differ |= trained[0] != trained[1]
        micro_batches_differ |= len(cut[0]) != len(cut[1])
        packed |= any(b.position_ids is not None for batches in cut for b in batches)
    assert trained_differ and micro_batches_differ and packed


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_ddp_and_fsdp_on_two_processes_train_as_one_process_does(runs, method):
    alone = runs(1, "ddp", method)
    assert_same_training(runs(2, "ddp", method), alone, method)
    assert_same_training(runs(2, "fsdp", method), alone, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_resumes_on_another_number_of_processes(runs, tiny_model_dir, data, tmp_path, method):
    """Stopped after step 2 on 2 FSDP processes, it goes on in 1; stopped on 1, it goes on
    in 2 (FSDP): the losses and final weights are those of the uninterrupted run."""
    args = settings(tiny_model_dir, data, method) + ["resume=auto"]
    for written_by, goes_on in ((runs(2, "fsdp", method), 1), (runs(1, "ddp", method), 2)):
        resumed = tmp_path / f"from-{written_by.name}"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(written_by / "checkpoints/step-000002", resumed / "checkpoints/step-000002")
        shutil.copy(written_by / "metrics.jsonl", resumed / "metrics.jsonl")
        run_to_end(goes_on, args + [f"output_dir={resumed}", "training.parallelism=fsdp"])
        assert_same_training(resumed, written_by, method)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("FAIL_AT_STEP", ["[rank 1]", "injected failure in step 3"]),  # a Python exception
        ("KILL_AT_STEP", ["SIGKILL"]),  # torchrun reports the signal that killed the rank
    ],
)
def test_one_rank_failing_ends_the_whole_run_with_its_message_and_the_checkpoint_intact(
    tiny_model_dir, data, tmp_path, fault, said
):
    out = tmp_path / "run"
    args = settings(tiny_model_dir, data, "lora") + [f"output_dir={out}"]
    started = time.monotonic()
    done = launch(2, args, FAULTY_RANK, timeout=240, FAULTY_RANK="1", **{fault: "3"})
    took = time.monotonic() - started

    assert done.returncode != 0
    assert took < 180
    assert all(words in done.stderr for words in said), done.stderr[-3000:]
    checkpoint = out / "checkpoints/step-000002"
    assert verify_checkpoint(checkpoint) is None
    assert not (out / "checkpoints/step-000004").exists()
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_run_after_the_collective_timeout(
    tiny_model_dir, data, tmp_path
):
    out, hang_mark = tmp_path / "run", tmp_path / "hang-began"
    args = settings(tiny_model_dir, data, "lora") + [
        f"output_dir={out}",
        "training.collective_timeout_s=6",
    ]
    done = launch(2, args, FAULTY_RANK, timeout=240, FAULTY_RANK="1", HANG_AT_STEP="3",
                  HANG_MARK=str(hang_mark))  # fmt: skip
    ended = time.time()

    assert done.returncode != 0
    assert hang_mark.is_file(), done.stderr[-3000:]
    # Rank 0 waited for rank 1 for the 6 s timeout and failed; torchrun then gives the hung
    # rank 30 s to exit after SIGTERM before it kills it (8x the timeout would be 78 s).
    waited = ended - float(hang_mark.read_text())
    assert 6 <= waited < 60, (waited, done.stderr[-3000:])
    assert verify_checkpoint(out / "checkpoints/step-000002") is None
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_first_run_encodes_the_data_once_not_once_per_rank(tiny_model_dir, data, tmp_path):
    """Rank 0 encodes into a fresh cache while rank 1 (on the same machine) waits, then reads
    it from there. (With every rank encoding, the log holds 0 and 1.)"""
    log = tmp_path / "encoded-by"
    args = settings(tiny_model_dir, data, "lora") + ["training.max_steps=1", "eval.held_out=null"]
    args += [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    done = launch(2, args, FAULTY_RANK, ENCODING_LOG=str(log))
    assert done.returncode == 0, done.stderr[-4000:]
    assert log.read_text().split() == ["0"]


@pytest.mark.slow
def test_a_slow_rank_preparing_its_data_does_not_time_out_the_others(
    tiny_model_dir, data, tmp_path
):
    """Rank 1 prepares 12 s longer than the collectives' 4 s timeout: the others wait for it
    without failing (that wait is not a training collective)."""
    out = tmp_path / "run"
    args = settings(tiny_model_dir, data, "lora") + [
        f"output_dir={out}",
        "training.collective_timeout_s=4",
        "training.max_steps=2",
    ]
    done = launch(2, args, FAULTY_RANK, FAULTY_RANK="1", SLOW_PREPARE_S="12")

    assert done.returncode == 0, done.stderr[-4000:]
    assert len(losses(out)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_sharded_checkpoint_converts_into_the_runs_plain_model(runs, tmp_path, method):
    """The last checkpoint of an FSDP run, written in shards, becomes the model (or adapter)
    the run itself saved at the end."""
    written = runs(2, "fsdp", method)
    checkpoint = written / "checkpoints/step-000004"
    assert (checkpoint / "sharded").is_dir() and not (checkpoint / "trainable.safetensors").exists()

    convert_checkpoint(checkpoint, tmp_path / "plain")

    want, got = final_weights(written, method), final_weights(tmp_path / "plain", method)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_lr_auto_under_fsdp_probes_as_one_process_does(tiny_model_dir, data, tmp_path):
    """The trials train and validate on every rank's shards together: the same rates tried,
    the same validation losses and choice as in one process, then the same training."""
    args = settings(tiny_model_dir, data, "lora") + [
        "training.lr=auto",
        "training.lr_probe_steps=2",
        "training.max_steps=2",
        "eval.forgetting=true",  # each trial's general-text perplexity, over the ranks
        "eval.held_out=null",
        "eval.samples=0",
    ]
    run_to_end(1, args + [f"output_dir={tmp_path / 'alone'}"])
    run_to_end(2, args + [f"output_dir={tmp_path / 'fsdp'}", "training.parallelism=fsdp"])
    alone, fsdp = tmp_path / "alone", tmp_path / "fsdp"
    probes = [json.loads((run / "summary.json").read_text())["lr_probe"] for run in (alone, fsdp)]
    alone_trials, fsdp_trials = probes[0]["trials"], probes[1]["trials"]
    assert [row["lr"] for row in fsdp_trials] == [row["lr"] for row in alone_trials]
    assert all(row["forgetting"] is not None for row in alone_trials)
    for measured in ("validation_loss", "forgetting"):
        assert [row[measured] for row in fsdp_trials] == pytest.approx(
            [row[measured] for row in alone_trials], rel=1e-5
        )
    assert probes[1]["chosen"] == probes[0]["chosen"]
    assert losses(fsdp) == pytest.approx(losses(alone), rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_qlora_under_ddp_trains_as_one_process_does(tiny_model_dir, data, tmp_path):
    """Each rank holds the whole 4-bit base; only the adapters' gradients are reduced."""
    args = [
        f"model={tiny_model_dir}",
        f"data.train={data}",
        "method=qlora",
        "training.max_steps=4",  # one step of Adam would hide most differences
        "training.batch_size=2",
        "training.grad_accum=2",
        "training.precision=fp32",
        "training.save_every=null",
        "max_length=128",
        "eval.forgetting=false",
        "eval.samples=0",
    ]
    run_to_end(1, args + [f"output_dir={tmp_path / 'alone'}"])
    run_to_end(2, args + [f"output_dir={tmp_path / 'ddp'}", "training.parallelism=ddp"])
    ddp, alone = tmp_path / "ddp", tmp_path / "alone"
    assert losses(ddp) == pytest.approx(losses(alone), rel=1e-4)
    assert gradient_norms(ddp) == pytest.approx(gradient_norms(alone), rel=1e-3)
    want, got = final_weights(alone, "lora"), final_weights(ddp, "lora")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


def test_what_fsdp_cannot_do_is_refused_before_anything_loads(tmp_path):
    config = load_config(
        None,
        [f"data.train={DEMO}", f"output_dir={tmp_path}", "training.parallelism=fsdp"]
        + ["method=qlora"],
    )
    check_parallel_settings(config, World(0, 1, 0))  # one process: nothing to refuse
    advice = "use training.parallelism=ddp"
    with pytest.raises(DistributedError, match=f"config key 'training.parallelism'.*{advice}"):
        check_parallel_settings(config, World(0, 2, 0))


@pytest.mark.slow
def test_fsdp_keeps_the_best_weights_gathered_from_the_shards(tiny_model_dir, data, tmp_path):
    """eval.save_best under FSDP: the ranks gather the weights rank 0 writes, at each new
    best held-out loss. Here the loss falls at both evaluations: the best is the last."""
    out = tmp_path / "run"
    args = settings(tiny_model_dir, data, "full") + [f"output_dir={out}", "eval.save_best=true"]
    run_to_end(2, args + ["training.parallelism=fsdp"])
    assert eval_losses(out)[1] < eval_losses(out)[0]
    best, final = final_weights(out / "best", "full"), final_weights(out, "full")
    assert best.keys() == final.keys()
    assert all(torch.equal(best[name], final[name]) for name in final)


def start_a_long_run(model_dir: str, data: Path, tmp_path: Path, parallelism: str = "fsdp"):
    """torchrun with 2 ranks on a 1000-step run, once its 3rd step is logged: (the torchrun
    process, the output dir, the log file)."""
    out = tmp_path / "run"
    args = settings(model_dir, data, "lora") + [
        f"output_dir={out}",
        "training.max_steps=1000",
        "training.save_every=null",
        f"training.parallelism={parallelism}",
        "eval.every=null",
    ]
    log = tmp_path / "log.txt"
    with log.open("w") as written:
        process = subprocess.Popen(
            command_for(2, args), env=environment(), stdout=written, stderr=written
        )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    return process, out, log


def assert_stopped_after_a_step_and_checkpointed(
    out: Path, log: Path, parallelism: str = "fsdp"
) -> None:
    stopped = len(losses(out))
    assert 3 <= stopped < 1000
    said = log.read_text()
    for rank in (0, 1):
        assert f"[rank {rank}] stopped by SIGTERM after step {stopped} of 1000" in said
    assert verify_checkpoint(out / f"checkpoints/step-{stopped:06d}") is None
    sharded = (out / f"checkpoints/step-{stopped:06d}/sharded").is_dir()
    assert sharded == (parallelism == "fsdp")


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_step_and_checkpoints_it(
    tiny_model_dir, data, tmp_path
):
    """A preempted job: SIGTERM reaches every rank, maybe in different steps; the ranks agree
    on the step to stop after, write its (sharded) checkpoint together, and exit."""
    process, out, log = start_a_long_run(tiny_model_dir, data, tmp_path)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)

    assert process.returncode != 0
    assert_stopped_after_a_step_and_checkpointed(out, log)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_ranks_whose_torchrun_is_killed_stop_instead_of_training_on_orphaned(
    tiny_model_dir, data, tmp_path, parallelism
):
    """kill -9 of torchrun: its ranks see it gone and stop as a SIGTERM to it would stop
    them, with the stop step's checkpoint, instead of training on, orphaned, to step 1000 (as
    they did)."""
    process, out, log = start_a_long_run(tiny_model_dir, data, tmp_path, parallelism)
    ranks = [psutil.Process(pid) for pid in children(process.pid)]
    assert len(ranks) == 2
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    for rank in alive:
        rank.kill()

    assert not alive, log.read_text()[-3000:]
    # Rank 0 says it; rank 1 may too (its console is rank 0's stream or none, by timing). A
    # second SIGTERM to a rank would end it at once, without the checkpoint asserted below.
    assert 1 <= log.read_text().count("send it again to stop at once") <= 2
    assert_stopped_after_a_step_and_checkpointed(out, log, parallelism)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_fsdp_cpu_offload_is_for_gpus_and_says_so_on_a_cpu(tmp_path, capsys):
    def config(*more):
        base = [f"data.train={DEMO}", f"output_dir={tmp_path}", "training.fsdp_cpu_offload=true"]
        return load_config(None, base + list(more))

    two = World(0, 2, 0)
    fsdp = config("training.parallelism=fsdp")
    assert offloads(fsdp, torch.device("cuda", 0), two) is True
    assert offloads(fsdp, torch.device("cuda", 0), World()) is False  # one process: no FSDP
    assert offloads(fsdp, torch.device("cpu"), two) is False
    assert "fsdp_cpu_offload has no effect on cpu" in capsys.readouterr().out
    with pytest.raises(DistributedError, match="'training.fsdp_cpu_offload'.*parallelism=fsdp"):
        offloads(config("training.parallelism=ddp"), torch.device("cuda", 0), two)

"""Many machines, run for real on one: the README's Slurm and Kubernetes torchrun lines, as
written there, launched twice on this machine as two "nodes" of one process each (gloo, one
thread each). A rank killed mid-run ends both nodes promptly with the last checkpoint
whole; the other launch line resumes it, and the run ends as one uninterrupted process's."""

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import (
    FAULTY_RANK,
    assert_same_training,
    environment,
    losses,
    run_to_end,
    settings,
)

from sftforge.config.loading import dump_config, load_config
from sftforge.training.checkpoint import verify_checkpoint

README = Path(__file__).parent.parent / "README.md"


def readme_command(marker: str) -> str:
    """The README's shell command (continuation lines joined) that contains `marker`."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    found = [" ".join(line.split()) for line in lines if marker in line]
    assert len(found) == 1, f"{marker!r} in {len(found)} README commands"
    return found[0]


def as_launched_here(command: str, config_file: Path, *replaced: tuple[str, str]) -> str:
    """The README's line for a machine of 8 GPUs, for a "node" of one CPU process here: the
    launcher's options as written, running `faulty_rank.py` (the package, with a fault
    injected on request) on our config file."""
    command = command[command.index("torchrun") :]  # Slurm's `srun` starts it on each node
    for written, here in (("--nproc_per_node 8", "--nproc_per_node 1"),
                          ("-m sftforge", str(FAULTY_RANK)), ("config.yaml", str(config_file)),
                          *replaced):  # fmt: skip
        assert written in command, (written, command)
        command = command.replace(written, here)
    return command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(command: str, node_environments: list[dict], timeout: float = 240):
    """The command in bash on each "node" at once; (return codes, seconds, output)."""
    started = time.monotonic()
    bin_dir = str(Path(sys.executable).parent)  # torchrun of this environment
    nodes = [
        subprocess.Popen(
            ["bash", "-c", command],
            env=environment(**extra, PATH=bin_dir + ":" + environment()["PATH"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in node_environments
    ]
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    return [node.returncode for node in nodes], time.monotonic() - started, "\n".join(outputs)


def config_file(path: Path, overrides: list[str]) -> Path:
    dump_config(load_config(None, overrides), path)
    return path


@pytest.mark.slow
def test_two_nodes_lose_a_rank_then_resume_and_train_as_one_process(
    tiny_model_dir, demo_records_40, tmp_path
):
    run = settings(tiny_model_dir, demo_records_40, "lora")
    alone = tmp_path / "alone"
    run_to_end(1, run + [f"output_dir={alone}"])

    out = tmp_path / "two-nodes"
    on_two_nodes = run + [f"output_dir={out}", "training.parallelism=fsdp",
                          f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    first = config_file(tmp_path / "first.yaml", on_two_nodes)
    slurm = as_launched_here(readme_command("srun torchrun"), first, ("29500", str(free_port())))
    node = {"HEAD": "127.0.0.1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "sftforge-test",
            "FAULTY_RANK": "1", "KILL_AT_STEP": "3"}  # fmt: skip
    codes, took, said = launch_nodes(slurm, [node, node])

    assert all(code != 0 for code in codes), said[-3000:]
    assert took < 90, said[-3000:]  # startup, 2 steps, and the end: seconds after the kill
    assert "SIGKILL" in said, said[-3000:]
    assert verify_checkpoint(out / "checkpoints/step-000002") is None
    assert not (out / "checkpoints/step-000004").exists()
    assert len(losses(out)) == 2

    resumed = config_file(tmp_path / "resume.yaml", on_two_nodes + ["resume=auto"])
    kubernetes = as_launched_here(readme_command("--node_rank"), resumed)
    port = str(free_port())
    pods = [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
             "RANK": str(rank)} for rank in (0, 1)]  # fmt: skip
    codes, _, said = launch_nodes(kubernetes, pods)

    assert codes == [0, 0], said[-4000:]
    assert "resumed from" in said
    assert_same_training(out, alone, "lora")

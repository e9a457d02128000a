"""Per-rank memory of full fine-tuning under FSDP at several world sizes, phase by phase.

A randomly initialised Llama-architecture model (--hidden, --layers; SmolLM2's 49,152-token
vocabulary; about 0.53B parameters at the defaults) is built once and saved as safetensors.
Then, for each world size (1: one plain process; N > 1: torchrun, FSDP, gloo), `sftforge
train` runs full fine-tuning for 4 steps (checkpoints at 2 and 4), and a second launch
resumes the step-2 checkpoint to the end. Each rank records, for each phase (`start`: data,
model, optimizer, resume; `steps`; `finish`: measuring and saving), its peak resident memory
(VmHWM, reset at the phase's start) and its time. The table gives the largest rank's peak per
phase, its ratio to one process's, and the largest relative gap between each step's loss and
one process's.

    .venv/bin/python bench/fsdp_memory.py [--worlds 1 2 4] [--hidden 1536] [--layers 16]
        [--src OTHER/src]   # import sftforge from another tree (an older commit), to compare
        [--glibc-default]    # keep glibc's dynamic mmap threshold (see launch)

Each rank gets cores / world threads (at least one). On a CPU the peak is resident memory;
with --device cuda it is the GPU's allocated memory (torch.cuda.max_memory_allocated), the
host's kept beside it. Times are not the point here (4 ranks on 2 cores share them); memory
is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src/sftforge/assets/demo_train.jsonl"
PHASES = ("start", "steps", "finish")  # training/loop.py's; checkpoints measured apart


# ---- inside each rank: sftforge train, its phases measured ---------------------------------


def resident(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measured_worker(record_dir: str, cli_args: list[str]) -> None:
    """`sftforge train ARGS`, each phase of training/loop.py timed and its peak memory read."""
    import torch

    import sftforge.training.loop as loop
    from sftforge.cli.main import main
    from sftforge.training.run import Run

    gpu = "training.device=cuda" in cli_args

    rank = os.environ.get("RANK", "0")
    log = Path(record_dir) / f"rank{rank}.jsonl"

    def record(name: str, began: float) -> None:
        row = {"phase": name, "peak": resident("VmHWM"), "rss": resident("VmRSS"),
               "s": time.perf_counter() - began}  # fmt: skip
        if gpu:  # on a GPU, the GPU's memory is the peak that matters
            row["host_peak"], row["peak"] = row["peak"], torch.cuda.max_memory_allocated()
        with log.open("a") as out:
            out.write(json.dumps(row) + "\n")

    def reset_peak() -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
        if gpu:
            torch.cuda.reset_peak_memory_stats()

    def measured(name, original):
        def phase(*args, **kwargs):
            reset_peak()
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record(name, began)

        return phase

    def checkpoint_measured(original):
        """A checkpoint within the steps: the steps' peak so far, then the checkpoint's own."""

        def save_checkpoint(self, step):
            record("steps", time.perf_counter())
            reset_peak()
            began = time.perf_counter()
            try:
                return original(self, step)
            finally:
                record("checkpoint", began)
                reset_peak()

        return save_checkpoint

    for name in PHASES:
        setattr(loop, name, measured(name, getattr(loop, name)))
    Run.save_checkpoint = checkpoint_measured(Run.save_checkpoint)
    sys.argv = ["sftforge", "train", *cli_args]
    main()


# ---- the driver ----------------------------------------------------------------------------


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    if (folder / "model.safetensors").exists() or (
        folder / "model.safetensors.index.json"
    ).exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftforge.models.source import resolve_model_path
    from sftforge.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {folder}")
    return folder


def launch(
    world: int, settings: list[str], record_dir: Path, src: str | None, keep_malloc: bool
) -> float:
    record_dir.mkdir(parents=True, exist_ok=True)
    worker = [str(Path(__file__).resolve()), "--worker", str(record_dir), "--", *settings]
    if world == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", *worker]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 2) // world))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads,
                        "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    if src:
        env["PYTHONPATH"] = src
    if not keep_malloc:
        # glibc raises its mmap threshold each time a large block is freed, after which freed
        # gradients and gather buffers stay in the heap, counted in RSS (seen here: +1.8 GB a
        # rank after one backward). A fixed threshold returns them, for every world size.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"world {world} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - began


def phases(record_dir: Path) -> dict[str, dict]:
    """{phase: {"peak": largest rank's peak, "peaks": each rank's, "s": slowest rank's}}
    for the loop's phases and the checkpoints written during the steps."""
    rows = [json.loads(line) for f in sorted(record_dir.glob("rank*.jsonl"))
            for line in f.read_text().splitlines()]  # fmt: skip
    found = {}
    for name in (*PHASES, "checkpoint"):
        mine = [r for r in rows if r["phase"] == name]
        if mine:
            found[name] = {"peak": max(r["peak"] for r in mine),
                           "peaks": [r["peak"] for r in mine], "s": max(r["s"] for r in mine)}  # fmt: skip
    return found


def losses(output_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()
    ]


def main() -> None:
    if "--worker" in sys.argv:
        at = sys.argv.index("--worker")
        measured_worker(sys.argv[at + 1], sys.argv[sys.argv.index("--") + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--src", help="import sftforge from this source folder instead")
    parser.add_argument("--model-dir", default="/tmp/sftforge-bench/llama-random")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--glibc-default", action="store_true", help="leave glibc's mmap threshold dynamic"
    )
    args = parser.parse_args()
    model = build_model(
        Path(f"{args.model_dir}-{args.hidden}x{args.layers}"), args.hidden, args.layers
    )
    work = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    results = {}
    for world in args.worlds:
        out = work / f"world{world}"
        settings = [
            f"model={model}", "method=full", f"data.train={DATA}", f"output_dir={out}",
            "training.max_steps=4", "training.save_every=2", "training.keep_checkpoints=2",
            "training.batch_size=1", f"training.grad_accum={4}", "training.precision=fp32",
            f"training.device={args.device}", "training.parallelism=fsdp", "training.lr=1e-4",
            "max_length=128", "eval.forgetting=false", "eval.samples=0", "eval.held_out=4",
            f"cache_dir={work / 'cache'}",
        ]  # fmt: skip
        wall = launch(world, settings, work / f"record{world}", args.src, args.glibc_default)
        resumed = work / f"resumed{world}"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(out / "checkpoints/step-000002", resumed / "checkpoints/step-000002")
        shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
        resume_settings = [s for s in settings if not s.startswith("output_dir=")]
        resume_settings += [f"output_dir={resumed}", "resume=auto"]
        launch(world, resume_settings, work / f"record{world}-resume", args.src, args.glibc_default)
        results[world] = {
            "run": phases(work / f"record{world}"),
            "resume": phases(work / f"record{world}-resume"),
            "losses": losses(out),
            "resumed_losses": losses(resumed),
            "wall_s": wall,
        }
        print(json.dumps({world: results[world]}), flush=True)
        shutil.rmtree(out)  # checkpoints with the optimizer state: GBs a world size
        shutil.rmtree(resumed)
    report(results)
    shutil.rmtree(work)


def loss_gap(got: list[float], want: list[float]) -> float:
    """The largest relative gap between two runs' per-step losses."""
    return max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))


def report(results: dict) -> None:
    one = results.get(1)
    columns = ("start", "steps", "checkpoint", "finish")
    print("\n| processes | start | steps | checkpoint | finish | resume: start | resume: rest "
          "| largest / 1 process's | step loss gap to 1 process | resumed run's gap |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    top_one = max(p["peak"] for part in ("run", "resume") for p in one[part].values()) if one else 0
    for world, r in sorted(results.items()):
        run, resume = r["run"], r["resume"]
        cells = [f"{run[p]['peak'] / 2**30:.2f}" if p in run else "-" for p in columns]
        cells.append(f"{resume['start']['peak'] / 2**30:.2f}")
        rest = max(p["peak"] for name, p in resume.items() if name != "start")
        cells.append(f"{rest / 2**30:.2f}")
        top = max(p["peak"] for part in ("run", "resume") for p in r[part].values())
        ratio = f"{top / top_one:.2f}" if top_one else "-"
        gap = f"{loss_gap(r['losses'], one['losses']):.1e}" if one else "-"
        resumed_gap = loss_gap(r["resumed_losses"], r["losses"])
        print(f"| {world} | " + " | ".join(cells) + f" | {ratio} | {gap} | {resumed_gap:.1e} |")
    print("\n(GiB, the largest rank's peak in each phase: VmHWM on a CPU, allocated GPU memory "
          "on a GPU)")  # fmt: skip
    for world, r in sorted(results.items()):
        times = ", ".join(f"{p} {r['run'][p]['s']:.1f} s" for p in PHASES)
        print(f"{world} processes: {times}; resume start {r['resume']['start']['s']:.1f} s")


if __name__ == "__main__":
    main()

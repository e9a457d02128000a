"""The GPU check (issue 26): cases that fail on wrong results, each in its own process under
its own time limit, every result recorded in a JSON file. About 8 minutes on one H200.

    python bench/gpu_check.py [--dry-run] [--cases a,b] [--model smollm2-135m]
        [--device cuda] [--output bench/results/gpu_check-<UTC>.json] [--keep]
        [--budget-s 600]

--dry-run lists the cases (what each checks, and when it passes) without a GPU. Each case
runs in a fresh Python process (a crash or a hang ends that case alone) and trains through
the project's public path: sftforge.train.train on a config of key=value overrides, each run
in a process of its own. A case passes, fails (a wrong result: its figures say how far), is
skipped (why), or errs (the last lines of its traceback and output); the exit status is 1
when any case failed or erred. No case runs past --budget-s seconds from the start (0: no
budget): a case left without time is an error. bench/gpu_check.sh installs what is
missing, then runs this.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEMO = ROOT / "src/sftforge/assets/demo_train.jsonl"
CORPUS = ROOT / "src/sftforge/assets/reference_corpus.txt"
ONE_GPU = "one GPU: NCCL, DDP, FSDP2 and sharded checkpoints not tested"
LOSS_GAP = 1e-3  # largest relative gap of per-step losses that count as equal (fp32)
BF16_LOSS_GAP = 2e-2  # the same for an example's summed loss in bf16 autocast


class Fail(Exception):
    """A wrong result: the message says what, `figures` what was measured."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


class Skip(Exception):
    """A case that cannot run on this machine; the message says why."""


@dataclass
class Settings:
    model: str = "smollm2-135m"
    device: str = "cuda"
    workdir: str = ""  # the case's own folder, removed after it unless --keep


@dataclass
class Case:
    name: str
    run: Callable[[Settings], dict]  # returns the figures; raises Fail or Skip
    checks: str  # one line: what it checks
    passes: str  # one line: when it passes
    timeout_s: int


# ---- running the cases -------------------------------------------------------------------

# A case's process: gpu_check imported from bench/, then run_child(source, function, ...).
CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); import gpu_check as g; g.run_child(*sys.argv[2:])"
)


def run_cases(
    cases: list[Case],
    settings: Settings,
    output: Path,
    environment: dict | None = None,
    keep: bool = False,
    budget_s: float | None = None,
) -> int:
    """Run each case in its own process, writing every result to `output` as soon as it is
    known; returns the exit status: 1 when any case failed or erred, else 0. With `budget_s`,
    no case runs past that many seconds from the start (one the budget leaves no time for
    is an error: it was not checked)."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    report = {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "environment": environment or {},
        "cases": [],
    }
    for case in cases:
        limit = case.timeout_s
        if deadline is not None:
            limit = min(limit, int(deadline - time.monotonic()))
        print(f"\n== {case.name} (at most {limit} s): {case.checks}", flush=True)
        if limit <= 0:
            record = {"name": case.name, "status": "error", "seconds": 0.0}
            record["reason"] = f"not run: the budget of {budget_s:g} s was spent"
        else:
            record = run_case(replace(case, timeout_s=limit), settings, keep)
        report["cases"].append(record)
        write_json(output, report)
        print(describe(record), flush=True)
    bad = [r["name"] for r in report["cases"] if r["status"] in ("fail", "error")]
    report["exit_status"] = 1 if bad else 0
    write_json(output, report)
    counts = {
        s: sum(r["status"] == s for r in report["cases"])
        for s in ("pass", "fail", "skipped", "error")
    }
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; results in {output}")
    return report["exit_status"]


def run_case(case: Case, settings: Settings, keep: bool = False) -> dict:
    """One case in a fresh process (a new session, so that a timeout ends everything it
    started): its result as the case wrote it, or an error saying how the process ended."""
    folder = Path(settings.workdir) / case.name
    folder.mkdir(parents=True, exist_ok=True)
    result_path, log_path = folder / "result.json", folder / "output.log"
    mine = json.dumps(asdict(replace(settings, workdir=str(folder))))
    source = inspect.getsourcefile(case.run)
    command = [
        sys.executable,
        "-c",
        CHILD,
        str(BENCH),
        source,
        case.run.__name__,
        mine,
        str(result_path),
    ]
    environment = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )
        try:
            code = process.wait(timeout=case.timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):  # it, or what it left running
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    record = {"name": case.name, "status": "error"}
    if code is None:
        record["reason"] = f"timed out after {case.timeout_s} s"
    elif result_path.is_file():
        record |= json.loads(result_path.read_text())
    else:
        ended = f"signal {-code}" if code < 0 else f"exit status {code}"
        record["reason"] = f"its process ended ({ended}) without a result"
    record["seconds"] = round(time.monotonic() - started, 1)
    if record["status"] in ("fail", "error"):
        record["output_tail"] = log_path.read_text(errors="replace").splitlines()[-40:]
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return record


def run_child(source: str, function: str, settings: str, result_path: str) -> None:
    """In a case's own process: run the case function and write its result."""
    here = Path(source).resolve() == Path(__file__).resolve()
    module = sys.modules[__name__] if here else _load(Path(source))
    try:
        figures = getattr(module, function)(Settings(**json.loads(settings)))
        result = {"status": "pass", "figures": figures or {}}
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except Fail as e:
        result = {"status": "fail", "reason": str(e), "figures": e.figures}
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: record them
        lines = traceback.format_exc().rstrip().splitlines()
        result = {
            "status": "error",
            "reason": f"{type(e).__name__}: {e}"[-2000:],
            "traceback": lines[-20:],
        }
        traceback.print_exc()
    Path(result_path).write_text(json.dumps(result, indent=1, default=str) + "\n")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_gpu_check_cases_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)


def describe(record: dict) -> str:
    line = f"{record['name']}: {record['status'].upper()} in {record['seconds']:.0f} s"
    if record.get("reason"):
        line += f": {record['reason']}"
    if record.get("figures"):
        line += "\n  " + json.dumps(record["figures"], default=str)[:3000]
    if record["status"] == "error":
        line += "\n  " + "\n  ".join(record.get("traceback") or record.get("output_tail", [])[-15:])
    return line


# ---- training runs, as the cases start them ----------------------------------------------

TRAIN = r"""
import json, sys, torch
from sftforge.config.loading import load_config
from sftforge.training.loop import train
train(load_config(None, sys.argv[1:]))
cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
gib = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
print("RESERVED_GIB " + json.dumps(gib))
"""


def train_overrides(s: Settings, name: str, *overrides: str) -> list[str]:
    """A training run's settings: the demo data (unless overridden) into <workdir>/<name>, no
    forgetting measure, no generations, a checkpoint only at the end; then `overrides`."""
    return [
        f"model={s.model}",
        f"data.train={DEMO}",
        f"output_dir={Path(s.workdir) / name}",
        f"training.device={s.device}",
        "max_length=256",
        "training.batch_size=4",
        "eval.forgetting=false",
        "eval.samples=0",
        "training.save_every=null",
        *overrides,
    ]


@dataclass
class Started:
    name: str
    process: subprocess.Popen
    log: Path


def start_training(s: Settings, name: str, *overrides: str) -> Started:
    """A training run (sftforge.train.train) in a process of its own, its output in a log."""
    print(f"start {name}: {' '.join(overrides)}", flush=True)
    log = Path(s.workdir) / f"{name}.log"
    with log.open("a") as out:
        command = [sys.executable, "-c", TRAIN, *train_overrides(s, name, *overrides)]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    return Started(name, process, log)


def finish_training(s: Settings, run: Started) -> dict:
    """The run's metrics rows, peak reserved GPU memory (GiB) and output, once it ended;
    raises when it failed."""
    code = run.process.wait()
    output = run.log.read_text(errors="replace")
    tail = "\n".join(line.rsplit("\r", 1)[-1] for line in output.splitlines()[-25:])
    print(f"--- {run.name} (exit {code}) ---\n{tail}", flush=True)
    if code:
        raise RuntimeError(f"the run {run.name} failed (exit {code}):\n{tail[-1500:]}")
    reserved = [x for x in output.splitlines() if x.startswith("RESERVED_GIB ")]
    return {
        "rows": metrics_rows(Path(s.workdir) / run.name),
        "reserved_gib": json.loads(reserved[-1].split(" ", 1)[1]) if reserved else None,
        "output": output,
    }


def training_run(s: Settings, name: str, *overrides: str) -> dict:
    return finish_training(s, start_training(s, name, *overrides))


def metrics_rows(output_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run: dict) -> list[float]:
    return [row["loss"] for row in run["rows"]]


def largest_relative_gap(got: list[float], want: list[float]) -> float:
    if len(got) != len(want):
        return math.inf
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want, strict=True))


def speed(run: dict) -> dict:
    """Tokens/s, trained tokens/s and TFLOP/s over steps 2..N (the first one warms up),
    with the peak reserved memory."""
    first, last = run["rows"][0], run["rows"][-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    if len(run["rows"]) < 2 or seconds <= 0:
        first, seconds = (
            {"tokens": 0, "trained_tokens": 0, "tflops": 0, "elapsed_s": 0},
            last["elapsed_s"],
        )
    flops = last["tflops"] * last["elapsed_s"] - first["tflops"] * first["elapsed_s"]
    return {
        "tokens_per_s": round((last["tokens"] - first["tokens"]) / seconds),
        "trained_tokens_per_s": round((last["trained_tokens"] - first["trained_tokens"]) / seconds),
        "tflops": round(flops / seconds, 3),
        "reserved_gib": None if run["reserved_gib"] is None else round(run["reserved_gib"], 2),
    }


def verdict(figures: dict, failures: list[str]) -> dict:
    if failures:
        raise Fail("; ".join(failures), figures)
    return figures


# ---- the cases ---------------------------------------------------------------------------


def fp32_matches_cpu(s: Settings) -> dict:
    figures, failures = {}, []
    same = ["training.precision=fp32", "attention=sdpa", "lora.dropout=0", "training.max_steps=4"]
    for method in ("full", "lora"):
        cpu = start_training(s, f"{method}-cpu", f"method={method}", *same, "training.device=cpu")
        on_device = losses(training_run(s, f"{method}-device", f"method={method}", *same))
        reference = losses(finish_training(s, cpu))
        gap = largest_relative_gap(on_device, reference)
        figures[method] = {"losses": on_device, "cpu_losses": reference, "largest_gap": gap}
        if gap > LOSS_GAP:
            failures.append(
                f"{method}: per-step losses differ from the CPU's by {gap:.2e} (> {LOSS_GAP:g})"
            )
    return verdict(figures, failures)


def packing_isolation(s: Settings) -> dict:
    import torch

    figures, failures = {}, []
    for attention in ("sdpa", "flash_attention_2"):
        if attention == "flash_attention_2" and (problem := flash_attn_problem()):
            figures[attention] = f"skipped: {problem}"
            continue
        found = packed_against_alone(s, attention, torch.bfloat16)
        figures[attention] = found
        if found["largest_gap"] > BF16_LOSS_GAP:
            failures.append(
                f"{attention}: an example's packed loss differs from its loss alone by "
                f"{found['largest_gap']:.2e} (> {BF16_LOSS_GAP:g})"
            )
        if found["leak_gap"] <= BF16_LOSS_GAP:
            failures.append(
                f"{attention}: even a deliberate leak changes no loss; the check sees nothing"
            )
    return verdict(figures, failures)


def flash_attn_problem() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # not installed, or built for another torch
        return f"flash_attn does not import ({type(e).__name__}: {e})"[:300]
    return None


def packed_against_alone(s: Settings, attention: str, amp) -> dict:
    """Per-example summed losses (TokenLoss, as training calls it) of 16 demo examples, each
    alone in a row, and packed as training packs them (rows of 256 tokens, micro-batches of
    two rows), each read from its packed micro-batch with the other examples' labels masked.
    `leak_gap`: the same packed rows without their restarting positions (a leak)."""
    import torch

    from sftforge.config.loading import load_config
    from sftforge.encode.batches import collate, collate_rows, plan_micro_batches
    from sftforge.encode.encoder import IGNORE_INDEX
    from sftforge.models.devices import autocast
    from sftforge.models.loss import TokenLoss, batch_loss
    from sftforge.training.prepare import prepare_model, prepare_text
    from sftforge.training.training_data import load_examples

    config = load_config(
        None, train_overrides(s, attention, f"attention={attention}", "training.packing=true")
    )
    text = prepare_text(config)  # as train.start: the data is encoded before CUDA starts
    examples = list(load_examples(config, text.encoder, Path(config.output_dir)).examples)[:16]
    device = torch.device(s.device)
    model, _ = prepare_model(config, device, text)
    lengths, pad = [len(ex.input_ids) for ex in examples], text.encoder.pad_id
    plan = plan_micro_batches(lengths, list(range(len(examples))), 2, pack_length=config.max_length)
    loss = TokenLoss(model).eval()

    def summed(batch) -> float:
        return float(batch_loss(loss, batch.to(device)))

    alone, packed, leaked = {}, {}, {}
    with torch.no_grad(), autocast(device, amp):
        for i, ex in enumerate(examples):
            alone[i] = summed(collate([ex], pad))
        for micro in plan:
            batch = collate_rows([[examples[i] for i in row] for row in micro], pad)
            leaky = replace(batch, position_ids=None, cu_seq_lens=None, longest_segment=0)
            for r, row in enumerate(micro):
                start = 0
                for i in row:
                    labels = torch.full_like(batch.labels, IGNORE_INDEX)
                    end = start + lengths[i]
                    labels[r, start:end] = batch.labels[r, start:end]
                    packed[i] = summed(replace(batch, labels=labels, trained_positions=None))
                    leaked[i] = summed(replace(leaky, labels=labels, trained_positions=None))
                    start = end
    rows = [row for micro in plan for row in micro]
    if max(len(m) for m in plan) < 2 or max(len(row) for row in rows) < 2:
        raise RuntimeError(
            f"the plan {plan} packs no micro-batch of several rows of several examples"
        )

    def gap(got: dict) -> float:
        return max(abs(got[i] - alone[i]) / abs(alone[i]) for i in alone)

    return {
        "examples": len(examples),
        "rows": len(rows),
        "micro_batches": len(plan),
        "largest_gap": gap(packed),
        "leak_gap": gap(leaked),
    }


def interrupted_run_resumes(s: Settings) -> dict:
    from safetensors.torch import load_file

    run = [
        "method=lora",
        "training.max_steps=8",
        "training.save_every=2",
        "training.deterministic=true",
        "eval.held_out=16",
        "eval.every=2",
        "eval.forgetting=true",
    ]
    whole, cut = Path(s.workdir) / "uninterrupted", Path(s.workdir) / "interrupted"
    training_run(s, whole.name, *run)
    started = start_training(s, cut.name, *run)
    checkpoint = cut / "checkpoints" / "step-000004"
    while not checkpoint.is_dir() and started.process.poll() is None:
        time.sleep(0.005)
    started.process.kill()  # SIGKILL
    code = started.process.wait()
    if code != -signal.SIGKILL or (cut / "checkpoints" / "step-000008").exists():
        output = started.log.read_text(errors="replace")
        raise RuntimeError(
            f"the run was not killed between steps 4 and 8 (exit {code}):\n{output[-1500:]}"
        )
    # Lines, not rows: the kill may have cut the last one short.
    killed_after = len((cut / "metrics.jsonl").read_text().splitlines())
    training_run(s, cut.name, *run, "resume=auto")
    want, got = (
        load_file(whole / "adapter_model.safetensors"),
        load_file(cut / "adapter_model.safetensors"),
    )
    if want.keys() != got.keys():
        raise Fail("the resumed adapter has other tensors than the uninterrupted one's")
    diff = max(float((want[k].float() - got[k].float()).abs().max()) for k in want)

    def logged(folder: Path) -> list:
        return [(r["step"], r["loss"], r.get("eval_loss")) for r in metrics_rows(folder)]

    figures = {"killed_after_step": killed_after, "largest_weight_difference": diff}
    figures["losses"], figures["resumed_losses"] = logged(whole), logged(cut)
    failures = [] if diff == 0 else [f"final adapter weights differ by up to {diff:.3g} (want 0)"]
    if logged(whole) != logged(cut):
        failures.append("metrics.jsonl losses differ from the uninterrupted run's")
    return verdict(figures, failures)


SHORT_RUNS = {
    "compile": ["training.compile=true", "training.precision=bf16"],
    "gradient_checkpointing": ["training.gradient_checkpointing=true", "training.precision=bf16"],
    "pure_bf16": ["training.precision=pure_bf16"],
    "qlora": ["method=qlora", "training.precision=bf16"],
}


def short_runs(s: Settings) -> dict:
    figures, failures = {}, []
    for name, extra in SHORT_RUNS.items():
        try:
            run = training_run(
                s, name, "training.max_steps=4", "training.batch_size=8", "max_length=512", *extra
            )
        except RuntimeError as e:
            figures[name] = {"error": str(e)[-800:]}
            failures.append(f"{name} failed")
            continue
        figures[name] = {"losses": losses(run), **speed(run)}
        if not all(math.isfinite(x) for x in losses(run)):
            failures.append(f"{name}: a loss is not finite")
        if name == "compile" and "torch.compile failed" in run["output"]:
            failures.append("compile: torch.compile failed and the run trained without it")
    return verdict(figures, failures)


def throughput(s: Settings) -> dict:
    peak = matmul_peak(s.device)
    figures, failures = {"matmul_peak_tflops": peak}, []
    data = long_examples(Path(s.workdir) / "long.jsonl")
    long_rows = [
        f"data.train={data}",
        "max_length=2048",
        "training.packing=true",
        "training.batch_size=32",
        "training.micro_batch_tokens=32768",
        "training.max_steps=20",
        "training.precision=bf16",
        f"training.peak_tflops={peak['bf16_tflops']}",
    ]
    for method in ("lora", "full"):
        try:
            run = training_run(s, method, f"method={method}", *long_rows)
        except RuntimeError as e:
            figures[method] = {"error": str(e)[-800:]}
            failures.append(f"{method} failed")
            continue
        measured = speed(run)  # over steps 2..20
        measured["mfu"] = round(measured["tflops"] / peak["bf16_tflops"], 3)
        measured["mfu_all_steps"] = round(run["rows"][-1]["mfu"], 3)  # the run's own figure
        measured["loss"] = losses(run)[-1]
        figures[method] = measured
        if not all(math.isfinite(x) for x in losses(run)):
            failures.append(f"{method}: a loss is not finite")
    return verdict(figures, failures)


def matmul_peak(device: str) -> dict:
    """bench/matmul_peak.py's RESULT on `device`."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "matmul_peak.py"), "--device", device],
        capture_output=True,
        text=True,
    )
    print(done.stdout + done.stderr[-2000:], flush=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"bench/matmul_peak.py failed (exit {done.returncode})")
    result = json.loads(lines[-1][len("RESULT ") :])
    keys = ("fp32_tflops", "tf32_tflops", "fp16_tflops", "bf16_tflops", "gpu")
    return {k: result[k] for k in keys if k in result}


def long_examples(path: Path, count: int = 256) -> Path:
    """Prompt/completion records of 4,000-7,000 characters of the bundled general text,
    continued by 500-1,000 more (about 1,000 to 1,900 tokens with SmolLM2's template)."""
    text, rng = CORPUS.read_text(), random.Random(0)
    with path.open("w") as f:
        for _ in range(count):
            start = rng.randrange(len(text) - 8000)
            cut = start + rng.randint(4000, 7000)
            end = cut + rng.randint(500, 1000)
            record = {
                "prompt": f"Continue this text:\n\n{text[start:cut]}",
                "completion": text[cut:end],
            }
            f.write(json.dumps(record) + "\n")
    return path


def distributed(s: Settings) -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        raise Skip(ONE_GPU)
    import data_parallel  # bench/data_parallel.py

    args = argparse.Namespace(model=s.model, method="lora", steps=8, examples=8, device="cuda")
    extra = ("training.precision=fp32",)  # LoRA dropout at its default: drawn per example
    alone = data_parallel.train_once(1, "ddp", 4, args, extra)
    figures = {
        "1 process": {"losses": alone["losses"], "tokens_per_s": round(alone["tokens_per_s"])}
    }
    failures = []
    for name, parallelism in [("DDP", "ddp"), ("FSDP2", "fsdp")]:
        try:
            run = data_parallel.train_once(2, parallelism, 4, args, extra)
        except (Exception, SystemExit) as e:  # train_once exits with the run's output
            figures[name] = {"error": str(e)[-800:]}
            failures.append(f"{name} failed")
            continue
        gap = largest_relative_gap(run["losses"], alone["losses"])
        figures[name] = {
            "losses": run["losses"],
            "tokens_per_s": round(run["tokens_per_s"]),
            "largest_gap": gap,
        }
        if gap > LOSS_GAP:
            failures.append(
                f"{name}: per-step losses differ from 1 process's by {gap:.2e} (> {LOSS_GAP:g})"
            )
    return verdict(figures, failures)


def fsdp_memory(s: Settings) -> dict:
    """bench/fsdp_memory.py on the GPUs: full fine-tuning of a random 0.53B Llama under FSDP
    on 1, 2 and (when there are more) all GPUs, and a resume of each."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise Skip(ONE_GPU)
    worlds = ["1", "2"] + ([str(gpus)] if gpus > 2 else [])
    command = [sys.executable, str(BENCH / "fsdp_memory.py"), "--device", "cuda",
               "--model-dir", str(Path(s.workdir) / "llama-random"), "--worlds", *worlds]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout[-3000:], flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench/fsdp_memory.py failed:\n{done.stderr[-2000:]}")
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            results |= {int(k): v for k, v in json.loads(line).items()}
    one = max(phase["peak"] for phase in results[1]["run"].values())
    figures, failures = {}, []
    for world, r in results.items():
        peaks = [p["peak"] for part in ("run", "resume") for p in r[part].values()]
        gap = largest_relative_gap(r["losses"], results[1]["losses"])
        figures[f"{world} GPUs"] = {
            "peak_gib_by_phase": {
                name: round(p["peak"] / 2**30, 2) for name, p in r["run"].items()
            },
            "peak_over_1_gpu": round(max(peaks) / one, 3),
            "loss_gap_to_1_gpu": gap,
        }
        if world > 1 and max(peaks) > 0.75 * one:
            failures.append(f"{world} GPUs: a rank's peak is {max(peaks) / one:.2f} of 1 GPU's")
        if gap > LOSS_GAP:
            failures.append(f"{world} GPUs: per-step losses differ from 1 GPU's by {gap:.2e}")
    return verdict(figures, failures)


CASES = [
    Case(
        "fp32_matches_cpu",
        fp32_matches_cpu,
        "full and LoRA fine-tuning of 4 steps in fp32 (SDPA, dropout 0) on the GPU and on the CPU",
        f"the per-step losses differ from the CPU's by at most {LOSS_GAP:g} (relative)",
        300,
    ),
    Case(
        "packing_isolation",
        packing_isolation,
        "per-example summed losses (TokenLoss) unpacked, and packed in micro-batches of two "
        "rows, in bf16 autocast, with SDPA and flash_attention_2 (skipped where flash_attn "
        "does not import)",
        f"every example's packed loss is within {BF16_LOSS_GAP:g} (relative) of its loss alone, "
        "and a deliberate leak (no restarting positions) exceeds that",
        180,
    ),
    Case(
        "interrupted_run_resumes",
        interrupted_run_resumes,
        "a LoRA run (held-out eval every 2 steps, forgetting on, checkpoints every 2, "
        "training.deterministic) SIGKILLed after step 4's checkpoint and resumed with "
        "resume=auto, against the same run uninterrupted",
        "the final adapter weights are equal (largest difference 0) and so are metrics.jsonl's "
        "losses and eval losses",
        240,
    ),
    Case(
        "short_runs",
        short_runs,
        "4-step LoRA runs with training.compile, gradient_checkpointing, precision=pure_bf16, "
        "and method=qlora (bitsandbytes): tokens/s and peak reserved memory of each",
        "every run finishes with finite losses, and torch.compile does not fall back to eager",
        360,
    ),
    Case(
        "throughput",
        throughput,
        "the GPU's matmul peak (bench/matmul_peak.py), then 20 steps of LoRA and full in bf16 "
        "on packed 2,048-token rows (micro-batches of 32,768 tokens): tokens/s, trained "
        "tokens/s, MFU against the measured bf16 peak, reserved memory",
        "both runs finish with finite losses (the figures are what matters)",
        240,
    ),
    Case(
        "distributed",
        distributed,
        "the same 8 LoRA steps (fp32, LoRA dropout on: drawn per example) in 1 process and in "
        "2 under torchrun with NCCL: DDP, then FSDP2 (bench/data_parallel.py); skipped on one "
        "GPU",
        f"the per-step losses of 2 processes differ from 1 process's by at most {LOSS_GAP:g} "
        "(relative)",
        300,
    ),
    Case(
        "fsdp_memory",
        fsdp_memory,
        "full fine-tuning of a random 0.53B Llama under FSDP, built sharded on the meta device, "
        "on 1, 2 and all GPUs, 4 steps and a resume from step 2 (bench/fsdp_memory.py): each "
        "phase's peak allocated memory on the largest rank; skipped on one GPU",
        "every rank's peak on 2 or more GPUs stays under 0.75x one GPU's, and the per-step "
        f"losses differ from one GPU's by at most {LOSS_GAP:g} (relative)",
        420,
    ),
]


# ---- the command -------------------------------------------------------------------------

PROBE = r"""
import importlib, importlib.metadata, importlib.util, json, platform, torch
def version(module):
    if importlib.util.find_spec(module) is None:
        return None
    try:
        found = getattr(importlib.import_module(module), "__version__", None)
    except Exception as e:
        return f"does not import: {type(e).__name__}: {e}"[:300]
    try:
        return found or importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "?"
cuda = torch.cuda.is_available()
gpus = [{"name": torch.cuda.get_device_name(i),
         "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
        for i in range(torch.cuda.device_count())] if cuda else []
found = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "cuda_available": cuda, "gpus": gpus}
modules = ("transformers", "peft", "bitsandbytes", "flash_attn", "sftforge")
print(json.dumps(found | {m: version(m) for m in modules}))
"""


def environment() -> dict:
    """Versions, and the GPUs torch sees (found in a process of its own: this one stays light)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    if done.returncode:
        return {"cuda_available": False, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def show_environment(env: dict) -> None:
    if "error" in env:
        print(f"could not read versions: {env['error']}")
        return
    names = ("torch", "transformers", "peft", "bitsandbytes", "flash_attn", "sftforge")
    print(", ".join(f"{n} {env[n] or 'not installed'}" for n in names) + f"; CUDA {env['cuda']}")
    for i, gpu in enumerate(env["gpus"]):
        capability, memory = gpu["capability"], gpu["memory_gib"]
        print(f"GPU {i}: {gpu['name']}, compute capability {capability}, {memory} GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    parser.add_argument("--cases", help="comma-separated names (default: all)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", help="default: bench/results/gpu_check-<UTC time>.json")
    parser.add_argument("--keep", action="store_true", help="keep the cases' folders and logs")
    parser.add_argument(
        "--budget-s", type=float, default=600, help="seconds for all cases together (0: none)"
    )
    args = parser.parse_args(argv)
    cases = CASES
    if args.cases:
        by_name = {case.name: case for case in CASES}
        unknown = [n for n in args.cases.split(",") if n not in by_name]
        if unknown:
            parser.error(f"unknown case {', '.join(unknown)}; the cases: {', '.join(by_name)}")
        cases = [by_name[n] for n in args.cases.split(",")]
    if args.dry_run:
        for case in cases:
            print(f"{case.name} (at most {case.timeout_s} s)")
            print(f"  checks: {case.checks}\n  passes: {case.passes}")
        return 0
    env = environment()
    show_environment(env)
    if args.device.startswith("cuda") and not env.get("cuda_available"):
        print(
            f"gpu_check: --device {args.device}, but torch sees no CUDA device (torch "
            f"{env.get('torch', '?')}, built for CUDA {env.get('cuda')}). Run it on a machine "
            "with an NVIDIA GPU, or list the cases with --dry-run",
            file=sys.stderr,
        )
        return 1
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output or BENCH / "results" / f"gpu_check-{stamp}.json")
    workdir = tempfile.mkdtemp(prefix="gpu_check-")
    try:
        settings = Settings(args.model, args.device, workdir)
        budget = args.budget_s or None
        return run_cases(cases, settings, output, env, args.keep, budget)
    finally:
        if args.keep:
            print(f"the cases' folders and logs are in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

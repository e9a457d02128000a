"""What a run records and shows: the counters of its progress, one metrics.jsonl row per
optimizer step, the progress bar's figures, and the clock that times training alone."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sftforge.config.schema import Config


@dataclass
class Progress:
    """What the loop has counted so far; saved in every checkpoint and restored on resume."""

    tokens: int = 0
    trained_tokens: int = 0
    flops: float = 0.0
    elapsed_s: float = 0.0  # training time alone, evaluation excluded
    best_eval: float = math.inf
    skipped_steps: int = 0


class TrainingClock:
    """Seconds of training, evaluation excluded (tokens/s measures training alone), going on
    from the `already` seconds of the steps resumed from."""

    def __init__(self, already: float):
        self._started = time.perf_counter() - already
        self._paused = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self._started - self._paused

    @contextmanager
    def paused(self):
        since = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - since


def step_record(step, epoch, loss, lr, grad_norm, progress: Progress, t, world=None) -> dict:
    """One metrics.jsonl row. Tokens and FLOPs are every process's, so MFU divides by the
    peak of all their devices (`peak_tflops` is one device's)."""
    elapsed = max(progress.elapsed_s, 1e-9)
    record = {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": progress.tokens,
        "trained_tokens": progress.trained_tokens,
        "tokens_per_s": progress.tokens / elapsed,
        "trained_tokens_per_s": progress.trained_tokens / elapsed,
        "tflops": progress.flops / elapsed / 1e12,
        "elapsed_s": progress.elapsed_s,
    }
    if t.peak_tflops:
        devices = world.size if world is not None else 1
        record["mfu"] = record["tflops"] / (t.peak_tflops * devices)
    return record


def open_metrics(path: Path, done: int):
    """metrics.jsonl for writing, and the rows of the `done` steps resumed from, which it keeps
    (a killed run may have left later rows, the last one cut short)."""
    kept = []
    if done and path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row["step"] <= done:
                kept.append(row)
    metrics = path.open("w")
    for row in kept:
        metrics.write(json.dumps(row) + "\n")
    return metrics, kept


def precision_note(precision: str, amp: torch.dtype | None, method: str, rounding=None) -> str:
    rounded = ", stochastically rounded to bf16 each step" if rounding is not None else ""
    if method == "qlora":
        return f"4-bit NF4 frozen base, fp32 adapters{rounded}, {'bf16' if amp else 'fp32'} compute"
    if precision == "pure_bf16":
        return f"bf16 frozen weights, fp32 adapters{rounded}, bf16 autocast"
    return f"bf16 autocast, fp32 master weights{rounded}" if amp else "fp32"


def micro_batch_note(config: Config) -> str:
    t = config.training
    parts = []
    if t.micro_batch_tokens:
        parts.append(f"micro-batches of <= {t.micro_batch_tokens} tokens")
    if t.packing:
        shared = ", sharing common prefixes" if t.share_prefixes else ""
        parts.append(f"packed into rows of {config.max_length}{shared}")
    return f" ({', '.join(parts)})" if parts else ""


def objective_note(config: Config) -> str:
    """The training loss when it is more than plain cross-entropy on clean inputs."""
    t = config.training
    parts = ["DFT: token losses weighted by their probability"] if t.loss == "dft" else []
    if t.neftune_alpha is not None:
        parts.append(f"NEFTune noise, alpha {t.neftune_alpha:g}")
    return f"; {', '.join(parts)}" if parts else ""


def progress_figures(record: dict) -> dict:
    shown = {
        "loss": f"{record['loss']:.4f}",
        "lr": f"{record['lr']:.2e}",
        "tok/s": f"{record['tokens_per_s']:.0f}",
        "trained/s": f"{record['trained_tokens_per_s']:.0f}",
    }
    if "mfu" in record:
        shown["mfu"] = f"{record['mfu']:.0%}"
    return shown

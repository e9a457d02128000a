"""How a run computes on its device: the autocast it runs under (training, evaluation and
generation alike), what that precision allows, and deterministic algorithms."""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Literal

import torch

from sftforge.console import warn
from sftforge.errors import InputError

Precision = Literal["auto", "fp32", "bf16", "pure_bf16"]


def autocast(device: torch.device, amp: torch.dtype | None):
    """The run's autocast (`amp` from autocast_dtype; None: off) on `device`. Training,
    evaluation and generation all run under it, so a measured loss is the trained one's."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def check_attention_precision(attention: str, amp: torch.dtype | None) -> None:
    """flash-attention computes in bf16 or fp16 only: refuse it for a run in fp32."""
    from transformers.utils.generic import is_flash_attention_requested

    if amp is None and is_flash_attention_requested(requested_attention_implementation=attention):
        raise InputError(
            f"config key 'attention': {attention} computes in bf16 or fp16 only, and this run "
            "computes in fp32 (training.precision, or auto on a device without fast bf16). Set "
            "training.precision=bf16 on a GPU with bf16 (compute capability 8.0 or later), "
            "or attention=sdpa"
        )


@contextmanager
def deterministic_algorithms(enabled: bool):
    """training.deterministic: torch's deterministic mode (an op without a deterministic
    kernel raises, naming itself), cuBLAS's fixed workspace and deterministic
    flash-attention backward, for this run only. (The environment variables are read when
    cuBLAS and flash-attention first run: set before the model loads.)"""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    names = ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")
    environment = {name: os.environ.get(name) for name in names}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def pick_device(choice: str = "auto") -> torch.device:
    """'auto' takes cuda, then mps, then cpu; anything else is passed to torch as is."""
    if choice != "auto":
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) where the hardware runs bf16 fast, else none: on
    CUDA, compute capability >= 8.0 of `device` (no index: the current one); below, bf16 is
    emulated and auto computes in fp32 (fp16 autocast would need a gradient scaler)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device.index)
        if precision in ("bf16", "pure_bf16") and capability < (8, 0):
            warn_emulated_bf16(precision, device, capability)
        return torch.bfloat16 if precision != "auto" or capability >= (8, 0) else None
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


@cache
def warn_emulated_bf16(precision: str, device: torch.device, capability: tuple) -> None:
    warn(
        f"warning: training.precision={precision} on {device}, compute capability "
        f"{capability[0]}.{capability[1]}: bf16 runs natively from 8.0 (Ampere) on, and is "
        "emulated here, slowly (training.precision=auto computes in fp32 on this GPU)"
    )


def fast_adamw_options(device: torch.device) -> dict:
    """The fused AdamW kernel where torch has one for the device, else the foreach one."""
    if device.type in ("cuda", "cpu", "mps"):
        return {"fused": True}
    return {"foreach": True}

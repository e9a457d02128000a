"""How a run computes on its device: the autocast it runs under (training, evaluation and
generation alike), what that precision allows, and deterministic algorithms."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def autocast(device: torch.device, amp: torch.dtype | None):
    """The run's autocast (`amp` from autocast_dtype; None: off) on `device`. Training,
    evaluation and generation all run under it, so a measured loss is the trained one's."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def check_attention_precision(attention: str, amp: torch.dtype | None) -> None:
    """flash-attention computes in bf16 or fp16 only: refuse it for a run in fp32."""
    from transformers.utils.generic import is_flash_attention_requested

    if amp is None and is_flash_attention_requested(requested_attention_implementation=attention):
        raise ValueError(
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

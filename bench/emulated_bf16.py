"""bf16 matmul numerics at fp32 speed, for measuring how bf16 training *learns* on a CPU
without fast bf16 (no avx512_bf16 / AMX: there torch's bf16 matmuls run about 100x slower
than fp32, so a 16-step bf16 run takes most of an hour).

A bf16 matmul on hardware with bf16 units (oneDNN on avx512_bf16, tensor cores) multiplies
bf16 inputs, accumulates in fp32 and rounds the result to bf16. The same numbers come from
an fp32 matmul of the (exactly representable) bf16 inputs, rounded to bf16 at the end: only
the order of the fp32 additions differs. `EmulatedBf16Matmuls` is a dispatch mode that does
that for the matmul ops and the CPU attention kernel whenever their inputs are bf16;
everything else (autocast's casts, elementwise ops, reductions) runs as it is.

Speed figures from a run under it mean nothing; its losses are bf16 training's.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


def _is_bf16(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


def _fp32(value):
    return value.float() if _is_bf16(value) else value


def _bf16(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.bfloat16()
    return value


class EmulatedBf16Matmuls(TorchDispatchMode):
    """Within it, a matmul or CPU attention call with bf16 inputs computes in fp32 on those
    inputs and rounds its outputs to bf16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS | ATTENTION and any(_is_bf16(a) for a in args):
            args = [_fp32(a) for a in args]
            kwargs = {k: _fp32(v) for k, v in kwargs.items()}
            out = func(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(_bf16(o) for o in out)
            return _bf16(out)
        return func(*args, **kwargs)

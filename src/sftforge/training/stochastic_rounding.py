"""The bf16 weights a training step computes with, rounded stochastically from the fp32
master weights, so that updates far below bf16's resolution still reach the forward pass.

Under bf16 autocast every matmul casts its fp32 weight to bf16, rounding to nearest. bf16
keeps 8 significant bits: a weight of 0.02 moves in steps of about 1e-4, while full
fine-tuning at lr 2e-5 moves it by about 2e-5 a step. The fp32 master keeps the update, but
the bf16 copy changes only once enough updates have added up to cross a rounding step, and
until then the forward pass computes with a weight that did not learn. Rounded
stochastically (up with a probability equal to how far the value lies towards the next bf16
number), the copy equals the master on average, every step: what a step learned reaches the
next step's forward pass in expectation.

`StochasticBf16Weights.rounded(seed)` does it for the duration of one step's forward and
backward passes. Each trained matrix (a parameter of two or more dimensions: what autocast
casts for a matmul; norms and biases are not cast and are left alone) is replaced in place
by its stochastically rounded value, stored in fp32, so autocast's cast is exact. The
difference to the master is kept as an exact integer residual of the bit patterns, and added
back when the context ends: the optimizer, the checkpoints, evaluation and the saved model
see the fp32 master weights, bit for bit. The random bits come from `seed` alone (one step's,
the same on every rank), so a resumed run and every rank of a DDP run round alike. Under
FSDP each rank rounds its own shards, drawing from that same stream: as unbiased, but not the
very numbers one process would draw for those elements.

What it costs, while a step runs: one 4-byte residual per trained matrix element, and one
random 16-bit number per element a step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

LOW_BITS = 1 << 16  # an fp32 bit pattern's bits below the bf16 ones
HIGH_BITS = -LOW_BITS  # 0xFFFF0000: the bf16 part of an fp32 bit pattern


def stochastically_rounded_bits(
    bits: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The fp32 bit patterns `bits` (int32) rounded to bf16 stochastically: a random number
    below 2^16 is added to each and the low 16 bits are cleared. The magnitude goes up to the
    next bf16 number with probability (low bits) / 2^16, else down, so the expected value is
    the input's (for either sign: the sign bit is untouched and the magnitude is rounded)."""
    noise = torch.randint(
        0, LOW_BITS, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    return noise.add_(bits).bitwise_and_(HIGH_BITS)


def stochastic_bf16(values: torch.Tensor, generator: torch.Generator | None = None):
    """fp32 `values` rounded to bf16 stochastically (as fp32 tensor holding bf16 numbers)."""
    return stochastically_rounded_bits(values.view(torch.int32), generator).view(torch.float32)


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory this process holds: a DTensor's (FSDP's) local shard."""
    return param.to_local() if hasattr(param, "to_local") else param


class StochasticBf16Weights:
    """The trained fp32 matrices among `params`, rounded stochastically to bf16 values for
    each step that computes under bf16 autocast."""

    def __init__(self, params: list[torch.nn.Parameter]):
        unique = {id(p): p for p in params}.values()  # tied weights once
        self.matrices = [p for p in unique if p.dim() >= 2 and p.dtype == torch.float32]

    @contextlib.contextmanager
    def rounded(self, seed: int) -> Iterator[None]:
        """Within: each matrix holds its stochastically rounded value; after: its master."""
        generators: dict[torch.device, torch.Generator] = {}
        residuals = []
        try:
            with torch.no_grad():
                for param in self.matrices:
                    bits = _local(param).view(torch.int32)
                    if bits.device not in generators:
                        generator = torch.Generator(bits.device).manual_seed(_own_stream(seed))
                        generators[bits.device] = generator
                    # residual = master - rounded, then the parameter becomes master - residual
                    residual = stochastically_rounded_bits(bits, generators[bits.device])
                    residual.sub_(bits).neg_()
                    bits.sub_(residual)
                    residuals.append(residual)
            yield
        finally:
            with torch.no_grad():
                for param, residual in zip(self.matrices, residuals, strict=False):
                    _local(param).view(torch.int32).add_(residual)


def _own_stream(seed: int) -> int:
    """A generator seed of its own for a step's seed (which seeds dropout's draws too)."""
    return (seed * 1_000_000_007 + 0x5EED) % (2**63 - 1)


def weight_rounding(params: list[torch.nn.Parameter], amp: torch.dtype | None, how: str):
    """What each step's weights are rounded by: stochastic rounding to bf16 under bf16
    autocast when `how` (training.bf16_rounding) asks for it; otherwise autocast's own cast
    (round to nearest) or none, and nothing is done here."""
    if amp == torch.bfloat16 and how == "stochastic":
        return StochasticBf16Weights(params)
    return None


def rounding_for_step(rounding: StochasticBf16Weights | None, seed: int):
    """The context one step computes in: its weights rounded, or as they are."""
    return contextlib.nullcontext() if rounding is None else rounding.rounded(seed)

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

The random numbers: drawing one per element every step costs more than the rounding itself
on a CPU (its generator is serial: 0.8 s a step for SmolLM2-135M's 134.5M elements on a
2-core CPU). So a pool of random 16-bit numbers is drawn once, and each step reads every
matrix's numbers from the pool at offsets drawn from the step's seed, a chunk of the pool's
length at a time. Each element's number is then, from step to step, a fresh draw from the
pool's values (which are uniform to within their count), so the rounding stays unbiased
step after step; within a step, elements a pool offset apart in different matrices may share
a number, which changes no expectation.

What it costs, while a step runs: one 4-byte residual per trained matrix element, the pool
(32 MiB per device), and four elementwise passes over the trained matrices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sftforge.training.distributed import local_part

LOW_BITS = 1 << 16  # an fp32 bit pattern's bits below the bf16 ones
HIGH_BITS = -LOW_BITS  # 0xFFFF0000: the bf16 part of an fp32 bit pattern
POOL_SIZE = 1 << 22  # random numbers drawn once, read at each step's offsets
POOL_SEED = 0x5EED_B16


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


class StochasticBf16Weights:
    """The trained fp32 matrices among `params`, rounded stochastically to bf16 values for
    each step that computes under bf16 autocast."""

    def __init__(self, params: list[torch.nn.Parameter], pool_size: int = POOL_SIZE):
        unique = {id(p): p for p in params}.values()  # tied weights once
        self.matrices = [p for p in unique if p.dim() >= 2 and p.dtype == torch.float32]
        self.pool_size = pool_size
        self._pools: dict[torch.device, torch.Tensor] = {}

    def _pool(self, device: torch.device) -> torch.Tensor:
        """The pool twice over, so that a pool's length read from any offset below it is one
        slice."""
        if device not in self._pools:
            generator = torch.Generator(device).manual_seed(POOL_SEED)
            pool = torch.randint(
                0, LOW_BITS, (self.pool_size,), dtype=torch.int32, device=device,
                generator=generator,
            )  # fmt: skip
            self._pools[device] = torch.cat([pool, pool])
        return self._pools[device]

    @contextlib.contextmanager
    def rounded(self, seed: int) -> Iterator[None]:
        """Within: each matrix holds its stochastically rounded value; after: its master."""
        offsets = torch.Generator().manual_seed(_own_stream(seed))  # on the CPU: a few numbers
        residuals = []
        try:
            with torch.no_grad():
                for param in self.matrices:
                    residuals.append(self._round(local_part(param), offsets))
            yield
        finally:
            with torch.no_grad():
                for param, residual in zip(self.matrices, residuals, strict=False):
                    local_part(param).view(torch.int32).add_(residual.view_as(param))

    def _round(self, matrix: torch.Tensor, offsets: torch.Generator) -> torch.Tensor:
        """Round `matrix` in place; return its residual (master - rounded) as int32 bits."""
        bits = matrix.view(torch.int32).view(-1)  # parameters are contiguous
        residual = torch.empty_like(bits)
        pool = self._pool(bits.device)
        chunks = range(0, bits.numel(), self.pool_size)
        starts = torch.randint(0, self.pool_size, (len(chunks),), generator=offsets).tolist()
        for begin, start in zip(chunks, starts, strict=True):
            part = bits[begin : begin + self.pool_size]
            rounded = residual[begin : begin + self.pool_size]
            torch.add(part, pool[start : start + part.numel()], out=rounded)
            rounded.bitwise_and_(HIGH_BITS)
            torch.sub(part, rounded, out=rounded)  # now the residual
            part.sub_(rounded)  # master - residual: the rounded value
        return residual


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

"""Random numbers drawn per example, not per process: LoRA dropout and NEFTune noise.

Dropped into a default generator, a dropout mask depends on which process an example
trains in, where in its micro-batch it sits and what was drawn before it: one process and
two would train different runs, and a run resumed on another number of processes would go
on differently. Here each example's tokens get their numbers from a generator of their
own, seeded by (the step's seed, the layer, the example's index in the data): the same
whatever the number of processes, the micro-batches, the packing, or a recomputation under
gradient checkpointing.

The training loop says which examples a micro-batch holds (`drawing_per_example`, with the
Batch's `example_spans`); where it does not (batches that share prefixes, evaluation)
dropout draws from the default generator as torch's does.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

NEFTUNE_STREAM = 0  # the input embeddings' noise; LoRA layers draw from streams of their own


@dataclass
class Draws:
    seed: int  # of the optimizer step
    spans: tuple  # (row, first token, tokens, example index) of each example in the batch
    row_length: int  # tokens per row of the batch
    generators: dict = field(default_factory=dict)  # one per device, re-seeded per example

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
        return self.generators[device]


_current: ContextVar[Draws | None] = ContextVar("per_example_draws", default=None)


@contextmanager
def drawing_per_example(seed: int | None, spans, row_length: int):
    """Within it, `uniform_like` draws each example's numbers from its own generator (for
    the forward and the backward of one micro-batch). No seed or no spans: torch's default."""
    draws = Draws(seed, tuple(spans), row_length) if seed is not None and spans else None
    token = _current.set(draws)
    try:
        yield
    finally:
        _current.reset(token)


def stream_of(name: str) -> int:
    """A stable number for a layer's name: its draws differ from every other layer's."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little") + 1


def uniform_like(x: torch.Tensor, stream: int) -> torch.Tensor | None:
    """Uniform [0, 1) numbers in float32, shaped as `x` (rows x tokens x features, or the
    rows read as one), each example's tokens drawn from (step seed, `stream`, example);
    padding gets 0. None outside `drawing_per_example`."""
    draws = _current.get()
    if draws is None:
        return None
    features = x.shape[-1]
    numbers = torch.zeros(x.numel() // features, features, dtype=torch.float32, device=x.device)
    generator = draws.generator(x.device)
    for row, first, tokens, example in draws.spans:
        start = row * draws.row_length + first
        if start + tokens > numbers.shape[0]:
            raise ValueError(
                f"per-example draws: a tensor of {numbers.shape[0]} tokens is not the batch "
                f"it was told of (rows of {draws.row_length} tokens)"
            )
        generator.manual_seed(_seed(draws.seed, stream, example))
        torch.rand((tokens, features), generator=generator, out=numbers[start : start + tokens])
    return numbers.view(x.shape)


def _seed(step_seed: int, stream: int, example: int) -> int:
    return ((step_seed * 1_000_000_007 + stream) * 998_244_353 + example) % (2**63 - 1)


class ExampleDropout(torch.nn.Module):
    """Dropout whose mask is drawn per example (`uniform_like`), in training only; torch's
    own dropout where the batch's examples are not known."""

    def __init__(self, p: float, stream: int):
        super().__init__()
        self.p = p
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        numbers = uniform_like(x, self.stream)
        if numbers is None:
            return torch.nn.functional.dropout(x, self.p, training=True)
        return x.masked_fill(numbers < self.p, 0) * (1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, per example"


def drop_per_example(model) -> int:
    """Give each LoRA layer of `model` (peft) an ExampleDropout in place of its nn.Dropout
    (peft keeps them in the layer's `lora_dropout`, by adapter). Returns the layers changed."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, dropout in module.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout):
                module.lora_dropout[adapter] = ExampleDropout(dropout.p, stream_of(name))
                changed += 1
    return changed

"""Examples -> micro-batches: length-grouped, right-padded tensors.

Right padding needs no attention mask for a causal model: every real token sits before the
padding, so it never attends to it, and padded positions carry no label. Passing no mask also
keeps SDPA on its fastest path.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .tokenize import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, length]
    labels: torch.Tensor  # [batch, length], IGNORE_INDEX on prompt and padding
    real_tokens: int  # tokens that are not padding

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.real_tokens)


def collate(examples: list[Example], pad_id: int) -> Batch:
    length = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
    return Batch(input_ids, labels, sum(len(ex.input_ids) for ex in examples))


def epoch_batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Indices of each micro-batch for one epoch: shuffled, then grouped by length within
    windows of 64 batches so padding stays small while the order stays random."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(examples[i].input_ids))
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches

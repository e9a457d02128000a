"""The proof, on the model as loaded and in the run's precision, that packed examples cannot
see each other: checked before a packed run trains, since a leak would train silently on
the wrong context."""

from __future__ import annotations

import torch

from sftforge.encode.batches import collate_rows
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.models.devices import autocast
from sftforge.models.loading import PackingError, causal_lm
from sftforge.models.loss import last_hidden_states

# Largest change of a token's hidden state (relative to its norm) that packing may cause:
# kernels for lone and packed sequences round differently, by far more in bf16 than in
# fp32. A leak changes the first tokens of an example by tens of percent.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@torch.no_grad()
def verify_packing_isolation(model, device: torch.device, amp: torch.dtype | None = None):
    """Two rows of two random examples each (the second row padded), collated as training
    collates them and run through the same attention path as the loss (flash-attention
    reads a packed micro-batch as one row), must give each example the hidden states it has
    alone, under the run's autocast `amp`. Raises PackingError otherwise."""
    lm = causal_lm(model)
    vocab = lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    lengths = [[5, 7], [4, 6]]
    rows = [
        [
            Example(torch.randint(0, vocab, (n,), generator=g).tolist(), [IGNORE_INDEX] * n, "")
            for n in row
        ]
        for row in lengths
    ]
    batch = collate_rows(rows, pad_id=0).to(device)
    segments = None if batch.cu_seq_lens is None else (batch.cu_seq_lens, batch.longest_segment)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, amp):
            packed = last_hidden_states(
                lm, {"input_ids": batch.input_ids}, batch.position_ids, None, segments
            ).reshape(*batch.input_ids.shape, -1)
            alone = [
                last_hidden_states(lm, {"input_ids": torch.tensor([ex.input_ids], device=device)})[
                    0
                ]
                for row in rows
                for ex in row
            ]
    finally:
        model.train(was_training)
    together = [
        packed[r, start : start + n] for r, row in enumerate(lengths) for start, n in _spans(row)
    ]
    gap = max(_relative_gap(got, want) for got, want in zip(together, alone, strict=True))
    dtype = amp or lm.get_input_embeddings().weight.dtype
    tolerance = TOLERANCE.get(dtype, 5e-2)
    if gap > tolerance:
        implementation = getattr(lm.config, "_attn_implementation", "?")
        raise PackingError(
            f"packing would let examples attend to each other with this model's attention "
            f"({implementation}): packed and separate hidden states differ by {gap:.3g} of a "
            f"token's norm (at most {tolerance:g} in {str(dtype).removeprefix('torch.')}). "
            "Set training.packing=false, or attention=sdpa / flash_attention_2."
        )


def _spans(lengths: list[int]):
    start = 0
    for n in lengths:
        yield start, n
        start += n


def _relative_gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest change of a token's state, as a share of that token's norm."""
    got, want = got.float(), want.float()
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)).max())

"""Token-normalised cross-entropy, computing the output head only where a label is trained.

The loss of an optimizer step is the sum of token losses over every trained token in that
step divided by the number of those tokens, however the step is split into micro-batches
(and, later, ranks). So each micro-batch returns a *sum*, and the loop divides by the step's
total count: averaging per micro-batch would weight a short example's tokens more.

The head (hidden -> vocabulary) is the largest matmul of a small model and its logits the
largest tensor: [tokens x vocab], 49k wide for SmolLM2 and 150k-262k for current families.
So it runs only on the hidden states whose next token is trained, and in chunks of rows:
each chunk's logits are made, reduced to a loss and dropped, and remade one chunk at a time
in the backward pass. A full [trained tokens x vocab] tensor never exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .tokenize import IGNORE_INDEX

# Configs whose head is more than a linear layer: use the model's own forward for them.
_HEAD_EXTRAS = ("final_logit_softcapping", "logits_scaling", "logit_scale")

# Rows of logits alive at once: 1024 x 49k x 4 bytes is 200 MB in fp32.
CHUNK_LOGIT_ELEMENTS = 1024 * 49152


def trained_token_count(labels: torch.Tensor) -> int:
    """Tokens whose next-token prediction is trained (labels shifted by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_is_plain_linear(lm) -> bool:
    return all(getattr(lm.config, name, None) in (None, 1.0) for name in _HEAD_EXTRAS)


def summed_token_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions (not averaged).

    `position_ids` restarting inside a row mark packed examples; the model then keeps each
    example's attention to itself."""
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    lm = _causal_lm(model)
    if not _head_is_plain_linear(lm):
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        logits = out.logits[:, :-1][trained]
        return F.cross_entropy(logits.float(), targets[trained], reduction="sum")
    decoder = lm.get_decoder()
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
    return chunked_head_loss(lm.get_output_embeddings(), hidden[:, :-1][trained], targets[trained])


def chunked_head_loss(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) against targets, `chunk_rows` rows at a time.

    Each chunk is checkpointed: its logits are freed after the forward and recomputed in the
    backward, so at most one chunk of logits (and its gradient) is alive."""
    if chunk_rows is None:
        vocab = getattr(head, "out_features", None) or 262_144  # a wrapped head: assume wide
        chunk_rows = max(1, CHUNK_LOGIT_ELEMENTS // vocab)
    if hidden.shape[0] <= chunk_rows:
        return _head_loss(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        total = total + checkpoint(
            _head_loss, head, hidden[rows], targets[rows], use_reentrant=False
        )
    return total


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")

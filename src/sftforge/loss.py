"""Token-normalised cross-entropy, computing the output head only where a label is trained.

The loss of an optimizer step is the sum of token losses over every trained token in that
step divided by the number of those tokens, however the step is split into micro-batches
(and, later, ranks). So each micro-batch returns a *sum*, and the loop divides by the step's
total count: averaging per micro-batch would weight a short example's tokens more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tokenize import IGNORE_INDEX

# Configs whose head is more than a linear layer: use the model's own forward for them.
_HEAD_EXTRAS = ("final_logit_softcapping", "logits_scaling", "logit_scale")


def trained_token_count(labels: torch.Tensor) -> int:
    """Tokens whose next-token prediction is trained (labels shifted by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_is_plain_linear(lm) -> bool:
    return all(getattr(lm.config, name, None) in (None, 1.0) for name in _HEAD_EXTRAS)


def summed_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions (not averaged)."""
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    lm = _causal_lm(model)
    if _head_is_plain_linear(lm):
        hidden = lm.get_decoder()(input_ids=input_ids).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[:, :-1][trained])
    else:
        logits = model(input_ids=input_ids).logits[:, :-1][trained]
    return F.cross_entropy(logits.float(), targets[trained], reduction="sum")

"""Generate answers with a model, rendering prompts exactly as training did."""

from __future__ import annotations

import torch

from .conversation import Message
from .tokenize import Encoder


@torch.no_grad()
def generate_answers(
    model,
    encoder: Encoder,
    prompts: list[list[Message]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding and the KV cache."""
    tokenizer = encoder.tokenizer
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    stops = stop_ids or sorted(encoder.end_of_turn_ids | {tokenizer.eos_token_id})
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for b in range(0, len(prompts), batch_size):
        encoded = [encoder.encode_prompt(p) for p in prompts[b : b + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad_id,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=False))
    model.train(was_training)
    return answers

"""The held-out split: decided before training, deterministic, never trained on."""

from __future__ import annotations

import random

from .conversation import Conversation


def split_held_out(
    conversations: list[Conversation], held_out: float | int, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held_out). A float in (0, 1) is a fraction, an int a count.

    The same conversations and seed always give the same split; the held-out records keep
    their file order so reports are easy to read against the data."""
    n = len(conversations)
    if isinstance(held_out, float):
        if not 0 < held_out < 1:
            raise ValueError(f"eval.held_out as a fraction must be in (0, 1), not {held_out}")
        count = max(1, round(held_out * n))
    else:
        count = held_out
    if not 0 < count < n:
        raise ValueError(
            f"eval.held_out={held_out} would hold out {count} of {n} examples; "
            "leave at least one to train on and hold out at least one"
        )
    chosen = set(random.Random(f"held-out/{seed}").sample(range(n), count))
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    held = [c for i, c in enumerate(conversations) if i in chosen]
    return train, held

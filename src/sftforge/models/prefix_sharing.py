"""Packed rows that hold a prefix shared by several examples once.

Tool-calling and system-prompted data repeat one long prefix in every example: the system
prompt and the tool definitions, often hundreds of tokens before a short exchange. With
`training.share_prefixes`, the examples of a step that begin with the same untrained tokens
go into one row that holds those tokens once, then the rest of each example:

    [shared prefix][rest of example 1][rest of example 2] ...

The rest of each example keeps its own positions (continuing from the prefix's end) and
attends to the prefix and to itself only (a [rows, 1, length, length] mask), so each token
sees exactly the context it has alone, and the loss and the gradient are those of the
examples unpacked: the prefix is computed once, and its gradient is the sum of what each
example's copy would have received.

A prefix ends before the first trained token of each example in its row: the token right
after the prefix is predicted from the prefix's last position, which holds one label only.
Rows are filled in the order of their token ids, so examples that begin alike are neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftforge.encode.batches import Batch, causal_pairs, cut_micro_batches, trained_token_count
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.models.devices import autocast
from sftforge.models.loading import PackingError, attends_in_sliding_windows, causal_lm
from sftforge.models.loss import as_model_mask


@dataclass(frozen=True)
class SharedRow:
    members: tuple[int, ...]  # example indices
    shared: int  # leading tokens the members have in common, written once

    def cost(self, lengths: list[int]) -> int:
        return self.shared + sum(lengths[i] - self.shared for i in self.members)


def shareable_length(example: Example) -> int:
    """Leading tokens that may be shared: up to the token before the first trained one (the
    first token's label is never trained: nothing comes before it)."""
    first_trained = next(
        (i for i, label in enumerate(example.labels) if i > 0 and label != IGNORE_INDEX),
        len(example.input_ids),
    )
    return first_trained - 1


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def pack_sharing_prefixes(
    examples: list[Example], indices: list[int], capacity: int
) -> list[SharedRow]:
    """Rows of at most `capacity` tokens (prefix once, then each member's rest). Examples in
    token order join the current row while it fits and while sharing with it costs no more
    than a row of their own would."""
    lengths = {i: len(examples[i].input_ids) for i in indices}
    rows: list[SharedRow] = []
    members: list[int] = []
    shared = cost = 0
    for i in sorted(indices, key=lambda i: examples[i].input_ids):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a row of {capacity}")
        own = shareable_length(examples[i])
        if members:
            prev = examples[members[-1]].input_ids
            joint = min(shared, own, common_prefix_length(prev, examples[i].input_ids))
            k = len(members)
            joined = cost + k * (shared - joint) + n - joint  # the row's tokens with i in it
            # Lowering the shared prefix costs the k members already in the row; joining is
            # worth it while that is no more than a row of its own (n tokens) would take.
            if joined <= capacity and joined - cost <= n:
                members.append(i)
                shared, cost = joint, joined
                continue
            rows.append(SharedRow(tuple(members), shared))
        members, shared, cost = [i], own, n
    if members:
        rows.append(SharedRow(tuple(members), shared))
    return rows


def collate_shared_rows(rows: list[tuple[int, list[Example]]], pad_id: int) -> Batch:
    """Rows of (shared prefix length, members) as tensors, right-padded, with the attention
    mask that keeps each member to the prefix and itself."""
    width = max(s + sum(len(ex.input_ids) - s for ex in members) for s, members in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    # 0: the shared prefix, k: the rest of member k, len(members) + 1: padding.
    segment = torch.zeros(shape, dtype=torch.long)
    length_per_token = torch.zeros(shape, dtype=torch.long)
    real = pairs = 0
    for r, (s, members) in enumerate(rows):
        head = members[0].input_ids[:s]
        if any(ex.input_ids[:s] != head for ex in members):
            raise ValueError("the members of a shared row do not begin with the shared prefix")
        input_ids[r, :s] = torch.tensor(head, dtype=torch.long)
        positions[r, :s] = torch.arange(s)
        length_per_token[r, :s] = len(members[0].input_ids)
        start, pairs = s, pairs + causal_pairs(s)
        for k, ex in enumerate(members, 1):
            n = len(ex.input_ids) - s
            # The first member's rest follows the prefix, as in the example itself; any
            # other's first token is predicted from the member before it: never trained.
            untrained = ex.labels[1:s] if k == 1 else ex.labels[1 : s + 1]
            if any(label != IGNORE_INDEX for label in untrained):
                raise ValueError(f"{ex.source}: a trained token inside the shared prefix")
            input_ids[r, start : start + n] = torch.tensor(ex.input_ids[s:])
            labels[r, start : start + n] = torch.tensor(ex.labels[s:])
            if k > 1 or s == 0:
                labels[r, start] = IGNORE_INDEX
            positions[r, start : start + n] = torch.arange(s, s + n)
            segment[r, start : start + n] = k
            length_per_token[r, start : start + n] = len(ex.input_ids)
            start, pairs = start + n, pairs + causal_pairs(n, before=s)
        real += start
        segment[r, start:] = len(members) + 1
        positions[r, start:] = torch.arange(width - start)
        length_per_token[r, start:] = width - start
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    sees_prefix = (segment == 0)[:, None, :].expand(-1, width, -1)
    mask = (causal & (same | sees_prefix))[:, None]
    trained = trained_token_count(labels)
    return Batch(
        input_ids,
        labels,
        real,
        positions,
        trained,
        length_per_token,
        attended_pairs=pairs,
        attention_mask=mask,
    )


def shared_step_batches(
    examples: list[Example],
    lengths: list[int],
    step: list[int],
    pad_id: int,
    batch_size: int,
    token_budget: int | None = None,
    pack_length: int | None = None,
) -> list[Batch]:
    """`batches.step_batches`, with rows that share their members' common prefix."""
    if not pack_length:
        raise ValueError("sharing prefixes packs rows: it needs a row length")
    rows = pack_sharing_prefixes(examples, step, pack_length)
    plan = cut_micro_batches(rows, [row.cost(lengths) for row in rows], batch_size, token_budget)
    return [
        collate_shared_rows(
            [(row.shared, [examples[i] for i in row.members]) for row in mb], pad_id
        )
        for mb in plan
    ]


@torch.no_grad()
def verify_prefix_sharing(
    model, device: torch.device, row_length: int, amp: torch.dtype | None = None
) -> None:
    """Prove, on this model as loaded, that a shared row gives each member the hidden states
    it has alone (a prefix and two continuations), under the run's autocast `amp` (the
    model's frozen matrices may be stored in its dtype), and refuse a model whose layers also
    attend within a sliding window shorter than the rows: the row's own mask would replace
    that window."""
    lm = causal_lm(model)
    config = lm.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    if window and window < row_length and attends_in_sliding_windows(config):
        raise PackingError(
            f"training.share_prefixes: this model's layers attend within a sliding window of "
            f"{window} tokens, and a shared row's mask replaces it in rows of up to "
            f"{row_length}. Set training.share_prefixes=false, or max_length <= {window}."
        )
    decoder = lm.get_decoder()
    vocab = lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    head, a, b = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (4, 3, 5))
    members = [
        Example(head + a, [IGNORE_INDEX] * 7, "a"),
        Example(head + b, [IGNORE_INDEX] * 9, "b"),
    ]
    row = collate_shared_rows([(4, members)], pad_id=0).to(device)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, amp):
            shared = decoder(
                input_ids=row.input_ids,
                position_ids=row.position_ids,
                attention_mask=as_model_mask(lm, row.attention_mask),
                use_cache=False,
            )[0][0]
            alone = [
                decoder(input_ids=torch.tensor([ex.input_ids], device=device), use_cache=False)[0][
                    0
                ]
                for ex in members
            ]
    finally:
        model.train(was_training)
    expected = torch.cat([alone[0], alone[1][4:]])
    gap = float((shared.float() - expected.float()).abs().max())
    tolerance = 1e-3 if amp is None else 5e-2  # bf16 keeps 8 significant bits
    if gap > tolerance * max(1.0, float(expected.float().abs().max())):
        implementation = getattr(lm.config, "_attn_implementation", "?")
        raise PackingError(
            f"training.share_prefixes: with this model's attention ({implementation}) a "
            f"shared row's hidden states differ from the examples' own by {gap:.3g}. Set "
            "training.share_prefixes=false, or attention=sdpa."
        )

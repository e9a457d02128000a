"""Examples -> optimizer steps -> micro-batches of rows (padded, or packed).

An optimizer step is a random set of examples (`batch_size` x `grad_accum`), decided by the
seed and the epoch alone. How that set is cut into micro-batches is a matter of speed and
memory only: the loss is normalised by the step's trained tokens (see models/loss.py), so any cut
gives the same update. Two choices:

- **Rows.** One example per row, right-padded; or, with packing, several examples per row
  (best-fit decreasing), their `position_ids` restarting at 0 so that the attention of each
  example sees only itself (transformers turns restarting positions into a block-diagonal
  causal mask for SDPA and eager attention). Flash-attention keeps examples apart only
  within a batch of one row, so for it the loss reads a packed micro-batch as one row, with
  the lengths of its segments (`cu_seq_lens`, found here on the host).
- **Micro-batches.** `batch_size` examples each, or as many rows as fit a token budget
  (rows x longest row <= `micro_batch_tokens`), so short and long examples cost alike.

Right padding needs no attention mask for a causal model: every real token sits before the
padding, so it never attends to it, and padded positions carry no label. Passing no mask
keeps SDPA on its fastest path.
"""

from __future__ import annotations

import bisect
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

import torch

from sftforge.encode.encoder import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, length]
    labels: torch.Tensor  # [rows, length], IGNORE_INDEX on prompt and padding
    real_tokens: int  # tokens that are not padding
    position_ids: torch.Tensor | None = None  # set for packed rows: restarts at each example
    trained_tokens: int = 0  # labels that are trained, after the shift
    # [rows, length]: the length of the example each token belongs to (of its run, for
    # padding); NEFTune scales its noise by it.
    example_length_per_token: torch.Tensor | None = None
    # Query-key pairs the attention computes (each token and the positions it sees), for
    # FLOP counting.
    attended_pairs: int = 0
    # [rows, 1, length, length], True where a token may attend: set for rows that share a
    # prefix (models/prefix_sharing.py); None leaves the mask to the model (causal, or restarting
    # positions).
    attention_mask: torch.Tensor | None = None
    # Flat indices (row x length + position) of the positions whose next token is trained,
    # found on the host when the batch is made: the loss gathers them without a device sync.
    trained_positions: torch.Tensor | None = None
    # Packed rows, for flash-attention: the micro-batch read as one row, its segments (each
    # example, each row's padding) as cumulative lengths, and the longest segment.
    cu_seq_lens: torch.Tensor | None = None
    longest_segment: int = 0
    # (row, first token, tokens, index in the data) of each example: training draws its
    # random numbers (dropout, NEFTune) per example (models/per_example.py).
    example_spans: tuple[tuple[int, int, int, int], ...] | None = None

    def __post_init__(self):
        if self.trained_positions is None:
            self.trained_positions = trained_positions_of(self.labels)

    def to(self, device: torch.device) -> Batch:
        """On `device`; copies from pinned memory (`pinned`) do not wait for the device."""
        return self._each_tensor(lambda t: t.to(device, non_blocking=t.is_pinned()))

    def pinned(self) -> Batch:
        """The batch in page-locked host memory, from which a GPU copies asynchronously."""
        return self._each_tensor(lambda t: t.pin_memory())

    def _each_tensor(self, change) -> Batch:
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        return replace(self, **{name: change(getattr(self, name)) for name in names})


def trained_positions_of(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (row x length + position) of the positions whose next token's label is
    trained."""
    rows, length = labels.shape
    row, position = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return row * length + position


def packed_segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative lengths, longest) of the segments of packed rows read as one row: a
    segment starts wherever a position restarts at 0 (an example, or a row's padding)."""
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten()
    bounds = torch.cat([starts, torch.tensor([position_ids.numel()])])
    return bounds.to(torch.int32), int(bounds.diff().max())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest."""
    return collate_rows([[ex] for ex in examples], pad_id)


def collate_rows(rows: list[list[Example]], pad_id: int, indices=None) -> Batch:
    """Rows of one or more examples each, right-padded to the longest row; `indices`, the
    examples' indices in the data row by row, gives the batch its example_spans.

    In a row of several examples the first token of each is unlabelled: it would otherwise
    be predicted from the end of the example before it."""
    length = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    packed = any(len(row) > 1 for row in rows)
    positions = torch.zeros((len(rows), length), dtype=torch.long) if packed else None
    length_per_token = torch.zeros((len(rows), length), dtype=torch.long)
    lengths, spans = [], []
    for r, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row):
            n = len(ex.input_ids)
            if indices is not None:
                spans.append((r, start, n, indices[r][k]))
            input_ids[r, start : start + n] = torch.tensor(ex.input_ids)
            labels[r, start : start + n] = torch.tensor(ex.labels)
            labels[r, start] = IGNORE_INDEX
            if positions is not None:
                positions[r, start : start + n] = torch.arange(n)
            length_per_token[r, start : start + n] = n
            start += n
            lengths.append(n)
        length_per_token[r, start:] = length - start
        if positions is not None:
            # Padding restarts at 0 too: it forms its own segment, seen by no real token.
            positions[r, start:] = torch.arange(length - start)
    trained = trained_token_count(labels)
    cu_seq_lens, longest = packed_segments(positions) if packed else (None, 0)
    return Batch(
        input_ids,
        labels,
        sum(lengths),
        positions,
        trained,
        length_per_token,
        attended_pairs=sum(causal_pairs(n) for n in lengths),
        cu_seq_lens=cu_seq_lens,
        longest_segment=longest,
        example_spans=tuple(spans) if indices is not None else None,
    )


def causal_pairs(n: int, before: int = 0) -> int:
    """Query-key pairs of `n` tokens attending causally, after `before` tokens they all see."""
    return n * before + n * (n + 1) // 2


def empty_batch(pad_id: int) -> Batch:
    """A micro-batch that trains nothing: one row of two pad tokens, no labels. A rank with
    fewer micro-batches in a step than another runs these, because every rank must take part
    in every forward and backward (FSDP gathers weights in each; DDP reduces in the last)."""
    return Batch(
        torch.full((1, 2), pad_id, dtype=torch.long),
        torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        real_tokens=0,
        example_length_per_token=torch.full((1, 2), 2, dtype=torch.long),
    )


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens: longest first, each into the
    fullest bin it still fits (best fit), a new bin when none has room."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a row of {capacity}")
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    return bins


def epoch_steps(n_examples: int, examples_per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each optimizer step of one epoch: a fresh random order, cut in steps.

    Steps are random samples, never grouped by length: examples of like length are often of
    like kind, and steps of one kind make a noisier, slower descent. Padding is kept small
    inside the step instead, where micro-batches are formed by length."""
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[s : s + examples_per_step] for s in range(0, n_examples, examples_per_step)]


def step_stream(n_examples: int, examples_per_step: int, seed: int):
    """Endless (epoch, example indices of one optimizer step), reshuffled every epoch."""
    epoch = 0
    while True:
        for indices in epoch_steps(n_examples, examples_per_step, seed, epoch):
            yield epoch, indices
        epoch += 1


def plan_micro_batches(
    lengths: list[int],
    step: list[int],
    batch_size: int,
    token_budget: int | None = None,
    pack_length: int | None = None,
) -> list[list[list[int]]]:
    """Cut one step's examples into micro-batches of rows of example indices.

    `pack_length` packs examples into rows of at most that many tokens; otherwise each row
    holds one example."""
    if pack_length:
        bins = pack_best_fit_decreasing([lengths[i] for i in step], pack_length)
        rows = [[step[j] for j in b] for b in bins]
    else:
        rows = [[i] for i in step]
    return cut_micro_batches(
        rows, [sum(lengths[i] for i in row) for row in rows], batch_size, token_budget
    )


def cut_micro_batches(
    rows: list, row_lengths: list[int], batch_size: int, token_budget: int | None
):
    """Rows into micro-batches, longest rows first so that rows of like length share one.
    `token_budget` caps rows x longest row; without one a micro-batch holds `batch_size`
    rows."""
    order = sorted(range(len(rows)), key=lambda r: -row_lengths[r])
    micro, start = [], 0
    while start < len(order):
        count = max(1, token_budget // row_lengths[order[start]]) if token_budget else batch_size
        micro.append([rows[r] for r in order[start : start + count]])
        start += count
    return micro


def step_batches(
    examples: list[Example],
    lengths: list[int],
    step: list[int],
    pad_id: int,
    batch_size: int,
    token_budget: int | None = None,
    pack_length: int | None = None,
) -> list[Batch]:
    """The micro-batches of one optimizer step, as tensors (`lengths`: of every example)."""
    plan = plan_micro_batches(lengths, step, batch_size, token_budget, pack_length)
    return [
        collate_rows([[examples[i] for i in row] for row in mb], pad_id, indices=mb) for mb in plan
    ]


def made_ahead(stream, make, pin: bool = False):
    """(epoch, example indices, micro-batches) of each optimizer step of `stream`, the
    micro-batches made by `make(indices)`. The next step's are made by a background thread
    while this one trains (in pinned memory for `pin`, from which the GPU copies without
    waiting), so the device never waits for collation."""

    def next_step():
        epoch, indices = next(stream)
        batches = make(indices)
        return epoch, indices, [b.pinned() for b in batches] if pin else batches

    with ThreadPoolExecutor(1, thread_name_prefix="sftforge-batches") as pool:
        upcoming = pool.submit(next_step)
        while True:
            step = upcoming.result()
            upcoming = pool.submit(next_step)
            yield step


def trained_token_count(labels: torch.Tensor) -> int:
    """Tokens whose next-token prediction is trained (labels shifted by one): the count the
    loss divides by, as Example.trained_token_count counts one example's."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

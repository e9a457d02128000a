"""Choosing a run's rows of its encoded table: the held-out split, each source's share of a
mix (by count or weight, drawn by the seed), and the max_length policy; each says what it
gave. Only rows are chosen: the table's columns stay where they are (on disk when cached).

A weight w takes floor(w) copies of a source's training conversations and a seeded sample of
the fraction left; a count c does the same for c / size. The held-out split is made first,
on every conversation read, so a conversation taken twice is never also held out.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sftforge.console import say
from sftforge.data.loading import (
    LoadResult,
    Reading,
    Rejects,
    held_out_indices,
    iter_readings,
    load_conversations,
)
from sftforge.data.messages import Conversation
from sftforge.data.writers import conversation_as_json, conversation_from_json, write_jsonl
from sftforge.encode.encoder import Encoder, Example
from sftforge.encode.parallel import EncodingReport, encode_all, fit_rows, fit_to_length
from sftforge.encode.table import ExampleTable, ExampleView


def split_note(table: ExampleTable) -> str | None:
    """What splitting conversations into several examples cost, when a template made any."""
    several, made, once, tokens = table.split_cost()
    if not several:
        return None
    return (
        f"split by the chat template (it rewrites history, so each trained turn is learned in "
        f"the context inference gives it): {several} conversations into {made} examples, "
        f"{once} tokens into {tokens} ({tokens / once:.2f}x)"
    )


@dataclass
class HeldOut:
    """The conversations held out of training (a fraction or a number of those read, or a
    file of their own), and where their examples are."""

    conversations: list[Conversation] = field(default_factory=list)
    rows: np.ndarray | None = None  # their examples' rows in the table; None: a file's
    indices: set[int] = field(default_factory=set)  # held out of the conversations read

    @classmethod
    def split(
        cls,
        table: ExampleTable,
        spec: float | int | str | None,
        seed: int,
        readings: list[Reading],
        file_reading: Reading | None,
        entry: Path | None,
        rejects: Rejects,
    ) -> HeldOut:
        """`rejects` gains the records of a held-out file that its reading rejected."""
        if spec is None:
            return cls()
        if file_reading is not None:
            read = load_conversations(file_reading.path, **file_reading.options())
            for reject in read.rejects:
                rejects.add(reject.source, reject.reason, reject.record)
            say(f"held-out file {spec}: {len(read.conversations)} examples")
            return cls(read.conversations)
        n = len(table.row_of)
        chosen = held_out_indices(n, spec, seed)
        say(f"held out {len(chosen)} of {n} examples (seed {seed})")
        saved = entry / f"held_out-{seed}-{spec}.jsonl" if entry else None
        held = _conversations_at(chosen, readings, saved)
        return cls(held, table.rows_of(chosen), set(chosen))

    def examples(
        self,
        table: ExampleTable,
        encoder: Encoder,
        on_invalid: str,
        rejects: Rejects,
        max_length: int,
    ) -> list[Example]:
        """Their examples, cut to max_length (a held-out file's encoded here, its rejects
        added to `rejects`)."""
        if self.rows is None:
            encoded = encode_all(self.conversations, encoder, on_invalid, rejects)
            return fit_to_length(encoded, max_length, "truncate", EncodingReport())
        return list(fit_rows(table, self.rows, max_length, "truncate", EncodingReport()))


def _conversations_at(chosen: list[int], readings: list[Reading], saved: Path | None):
    """The conversations at `chosen` (for generating answers): kept beside the cache entry
    (`saved`) once read, else read again up to the last one chosen (a second pass)."""
    if saved is not None and saved.is_file():
        try:
            with open(saved, encoding="utf-8") as f:
                return [conversation_from_json(json.loads(line)) for line in f]
        except (OSError, ValueError, KeyError, TypeError) as err:
            say(f"note: {saved} could not be read ({err}); reading the data again")
    wanted, last = set(chosen), max(chosen)
    held = []
    for index, conversation in enumerate(iter_readings(readings, LoadResult(), [])):
        if index in wanted:
            held.append(conversation)
        if index == last:
            break
    if saved is not None:
        try:
            write_jsonl(saved, (conversation_as_json(c) for c in held))
        except OSError as err:
            say(f"note: the held-out conversations were not cached ({err})")
    return held


@dataclass
class SourceShare:
    """What one source of a mix gave the run."""

    name: str
    loaded: int  # conversations read
    training: int  # of those, not held out
    taken: int  # in the mix, after weight or count
    examples: int = 0  # trained on, after the max_length policy
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class Chosen:
    """The rows trained on, source by source, and what the max_length policy did."""

    views: list[ExampleView]
    report: EncodingReport
    shares: list[SourceShare]  # a mix's sources; empty without a mix

    def mix_report(self) -> list[dict]:
        return [asdict(s) for s in self.shares]


@dataclass(frozen=True)
class MixSource:
    """One source of a mix as the selection needs it: its name and amount."""

    name: str
    count: int | None = None
    weight: float | None = None


def choose_rows(
    table: ExampleTable,
    sizes: list[int],
    held_out: set[int],
    mix: list[MixSource] | None,
    seed: int,
    max_length: int,
    truncation: str,
) -> Chosen:
    """Each source's conversations (`sizes` of them, in order) not held out, taken by the
    mix's amounts, their rows fitted to max_length."""
    report, views, shares, first = EncodingReport(), [], [], 0
    for k, size in enumerate(sizes):
        mine = [i for i in range(first, first + size) if i not in held_out]
        taken = take(mine, mix[k].count, mix[k].weight, seed, k) if mix else mine
        first += size
        fitted = fit_rows(table, table.rows_of(taken), max_length, truncation, report)
        views.append(fitted)
        if mix:
            trained = int(table.trained_counts[fitted.rows].sum()) if len(fitted) else 0
            share = SourceShare(mix[k].name, size, len(mine), len(taken), len(fitted))
            share.tokens, share.trained_tokens = int(fitted.cuts.sum()), trained
            shares.append(share)
    say(report.summary(max_length))
    if shares:
        say(mix_table(shares))
    return Chosen(views, report, shares)


def take(items: list, count: int | None, weight: float | None, seed: int, index: int) -> list:
    """What the mix takes of one source's items (see the module's docstring)."""
    n = len(items)
    if count is not None:
        wanted = count
    elif weight is not None:
        wanted = round(weight * n)
    else:
        return list(items)
    if n == 0:
        return []
    copies, rest = divmod(wanted, n)
    drawn = sorted(random.Random(f"mix/{seed}/{index}").sample(range(n), rest))
    return list(items) * copies + [items[i] for i in drawn]


def mix_table(shares: list[SourceShare]) -> str:
    lines = ["mix: source  conversations read / training / taken  examples  tokens (trained)"]
    for s in shares:
        lines.append(
            f"  {s.name}  {s.loaded:,} / {s.training:,} / {s.taken:,}  {s.examples:,}  "
            f"{s.tokens:,} ({s.trained_tokens:,})"
        )
    return "\n".join(lines)

"""Encoded examples in columns, so that a million of them fit in memory (or stay on disk).

An Example as Python lists costs about 72 bytes a token (two lists of int objects); here a
token costs 5 bytes: its id (int32) and whether it is trained (one byte), in two flat arrays
for all examples, with each example's length, trained-token count and source beside them.
Written to a folder, the arrays are memory-mapped when read back: the encoded data of a
run stays in the page cache, not in the process.

- `ExampleTable`: the encoded examples of a run's conversations, in the order encoded;
  `row_of`: for each conversation, its first row (-1 where the chat template rejected it),
  and `examples_of`: how many rows it has (more than one where its template rewrites
  history: encode/render.py).
- `TableWriter`: appends encoded chunks, to a folder or to memory.
- `ExampleView`: the rows a run trains on (a subset, some repeated, some cut to max_length),
  read like a list of Examples: `len(view)`, `view[i]`, `view.lengths`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from sftforge.encode.encoder import IGNORE_INDEX, Example

COLUMNS = (
    "ids",
    "trained",
    "lengths",
    "trained_counts",
    "row_of",
    "examples_of",
    "source_text",
    "source_ends",
)
_DTYPES = {
    "ids": np.int32,
    "trained": np.bool_,
    "lengths": np.int64,
    "trained_counts": np.int64,
    "row_of": np.int64,
    "examples_of": np.int64,
    "source_text": np.uint8,
    "source_ends": np.int64,
}


@dataclass
class EncodedChunk:
    """What a worker sends back for a chunk of conversations: the encoded ones in columns,
    and (position in the chunk, error) for each the chat template rejected."""

    ids: np.ndarray  # int32, the chunk's encoded examples one after another
    trained: np.ndarray  # bool, per token
    lengths: np.ndarray  # int64, per example
    trained_counts: np.ndarray  # int64, per example: trained tokens after the first token
    sources: list[str]
    errors: list  # [(position in the chunk, DataError)]
    counts: list[int]  # per conversation encoded: how many examples it made

    @classmethod
    def of(cls, encoded: list[list[Example]], errors: list) -> EncodedChunk:
        """From the examples of each conversation encoded (in order), and the errors."""
        examples = [e for group in encoded for e in group]
        lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
        count = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(e.input_ids for e in examples), np.int32, count)
        labels = np.fromiter(chain.from_iterable(e.labels for e in examples), np.int32, count)
        trained = labels != IGNORE_INDEX
        counts = _trained_after_first(trained, lengths)
        sources = [e.source for e in examples]
        return cls(ids, trained, lengths, counts, sources, errors, [len(g) for g in encoded])


def _trained_after_first(trained: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each example's Example.trained_token_count (trained tokens after its first), from
    the flags of all the examples one after another."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    running = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
    first = running[np.minimum(starts + 1, ends)] - running[starts]
    return running[ends] - running[starts] - first


class ExampleTable:
    """Every encoded example of a run's data, in columns (see the module's docstring)."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.ids = columns["ids"]
        self.trained = columns["trained"]
        self.lengths = columns["lengths"]
        self.trained_counts = columns["trained_counts"]
        self.row_of = columns["row_of"]  # per conversation: its first row, or -1 (rejected)
        self.examples_of = columns["examples_of"]  # per conversation: its rows' count
        self._source_text = columns["source_text"]
        self._source_ends = columns["source_ends"]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows_of(self, conversations) -> np.ndarray:
        """Every row of these conversations, in order (none for one the template rejected)."""
        conversations = np.asarray(conversations, dtype=np.int64)
        firsts, counts = self.row_of[conversations], self.examples_of[conversations]
        kept = firsts >= 0
        firsts, counts = firsts[kept], counts[kept]
        if not len(firsts) or (counts == 1).all():
            return np.asarray(firsts, dtype=np.int64)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(firsts, counts) + offsets

    def split_cost(self) -> tuple[int, int, int, int]:
        """(conversations made into several examples, their examples, their tokens as one
        example each, their tokens as all those examples): the cost of templates that
        rewrite history (the last example of each holds the whole conversation)."""
        several = np.flatnonzero(self.examples_of > 1)
        if not len(several):
            return 0, 0, 0, 0
        rows = self.rows_of(several)
        last = self.row_of[several] + self.examples_of[several] - 1
        made = int(self.examples_of[several].sum())
        return len(several), made, int(self.lengths[last].sum()), int(self.lengths[rows].sum())

    def source(self, row: int) -> str:
        start = int(self._source_ends[row - 1]) if row else 0
        return bytes(self._source_text[start : self._source_ends[row]]).decode("utf-8")

    def example(self, row: int, cut: int | None = None) -> Example:
        """Row `row` as an Example, its first `cut` tokens when given."""
        start = int(self.starts[row])
        end = start + int(self.lengths[row] if cut is None else cut)
        ids = np.asarray(self.ids[start:end], dtype=np.int64)
        labels = np.where(self.trained[start:end], ids, IGNORE_INDEX)
        return Example(ids.tolist(), labels.tolist(), self.source(row))

    def trained_within(self, row: int, cut: int) -> int:
        """Trained tokens (after the first) among the row's first `cut` tokens."""
        start = int(self.starts[row])
        return int(np.count_nonzero(self.trained[start + 1 : start + cut]))

    @classmethod
    def read(cls, folder: Path) -> ExampleTable:
        columns = {}
        for name in COLUMNS:
            path = folder / f"{name}.bin"
            if path.stat().st_size == 0:  # numpy cannot map an empty file
                columns[name] = np.zeros(0, dtype=_DTYPES[name])
            else:
                columns[name] = np.memmap(path, dtype=_DTYPES[name], mode="r")
        table = cls(columns)
        if len(table.lengths) != len(table.trained_counts) or len(table.ids) != len(table.trained):
            raise ValueError(f"{folder}: its columns disagree in length (damaged)")
        if int(table.lengths.sum()) != len(table.ids):
            raise ValueError(f"{folder}: its lengths do not add up to its tokens (damaged)")
        return table


class TableWriter:
    """Builds an ExampleTable chunk by chunk: into `folder` (one file a column, appended to)
    when given, else in memory."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
        self._files = {}
        if folder is not None:
            self._files = {name: open(folder / f"{name}.bin", "wb") for name in COLUMNS}  # noqa: SIM115
        self.rows = 0
        self._source_bytes = 0

    def add(self, chunk: EncodedChunk, rejected_positions: set[int], count: int) -> None:
        """Append a chunk of `count` conversations, those at `rejected_positions` rejected."""
        row_of = np.full(count, -1, dtype=np.int64)
        examples_of = np.zeros(count, dtype=np.int64)
        encoded = [p for p in range(count) if p not in rejected_positions]
        made = np.asarray(chunk.counts, dtype=np.int64)
        row_of[encoded] = self.rows + np.cumsum(made) - made
        examples_of[encoded] = made
        self.rows += int(made.sum())
        text = "".join(chunk.sources).encode("utf-8")
        sizes = np.array([len(s.encode("utf-8")) for s in chunk.sources], dtype=np.int64)
        ends = self._source_bytes + np.cumsum(sizes)
        self._source_bytes += len(text)
        columns = {
            "ids": chunk.ids,
            "trained": chunk.trained,
            "lengths": chunk.lengths,
            "trained_counts": chunk.trained_counts,
            "row_of": row_of,
            "examples_of": examples_of,
            "source_text": np.frombuffer(text, dtype=np.uint8),
            "source_ends": ends,
        }
        for name, values in columns.items():
            values = np.ascontiguousarray(values, dtype=_DTYPES[name])
            if self.folder is not None:
                self._files[name].write(values.tobytes())
            else:
                self._parts[name].append(values)

    def finish(self) -> ExampleTable:
        if self.folder is not None:
            self.close()
            return ExampleTable.read(self.folder)
        return ExampleTable(
            {
                name: np.concatenate(parts) if parts else np.zeros(0, dtype=_DTYPES[name])
                for name, parts in self._parts.items()
            }
        )

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class ExampleView:
    """The examples a run trains on: rows of an ExampleTable (repeats allowed), each cut to
    its length in `cuts`; indexed and iterated like a list of Examples."""

    def __init__(self, table: ExampleTable, rows: np.ndarray, cuts: np.ndarray) -> None:
        self.table = table
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cuts = np.asarray(cuts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        return self.table.example(int(self.rows[i]), int(self.cuts[i]))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        return self.cuts.tolist()

    def source(self, i: int) -> str:
        return self.table.source(int(self.rows[i]))

    @staticmethod
    def joined(views: list[ExampleView]) -> ExampleView:
        """Views of one table, one after another."""
        table = views[0].table
        return ExampleView(
            table,
            np.concatenate([v.rows for v in views]),
            np.concatenate([v.cuts for v in views]),
        )

    def fingerprint(self) -> str:
        """sha256 over every example's ids and labels as int64, in order: what
        `checkpoint.run_identity` computes for a list of Examples, without building them."""
        digest = hashlib.sha256()
        for row, cut in zip(self.rows.tolist(), self.cuts.tolist(), strict=True):
            start = int(self.table.starts[row])
            ids = np.asarray(self.table.ids[start : start + cut], dtype=np.int64)
            digest.update(ids.tobytes())
            digest.update(
                np.where(self.table.trained[start : start + cut], ids, IGNORE_INDEX).tobytes()
            )
        return digest.hexdigest()

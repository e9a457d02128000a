"""Conversations -> encoded examples at scale: streamed, in parallel, and cacheable.

Encoding renders each conversation with the chat template, tokenizes it, builds the labels
and proves the mask (tokenize.py). That is the slow part of preparing data, so:

- **Streamed.** Conversations are read one chunk at a time and encoded into an
  ExampleTable (table.py: columns of int32 ids and trained flags, on disk when cached), so
  preparing a million conversations holds a few chunks, never the data.
- **In parallel.** With `num_proc` > 1 the chunks are encoded by that many worker processes
  (forked, so they share the loaded tokenizer), in order, a few chunks queued each.
- **Cacheable.** `cached_entry`/`write_entry` keep tables under `<cache_dir>/examples/<key>/`;
  examples.py makes the key from everything the examples depend on (the data files'
  bytes, how they are read, and `code_and_encoder_digest`: the tokenizer's full
  definition, the chat template, the masking options and the encoder's source code).

Then the max_length policy (`fit_rows` for a table, `fit_to_length` for a list): drop or
truncate the examples too long, and drop those left with no trained token, naming each in
the EncodingReport.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from sftforge.atomic import staging_folder, write_atomically
from sftforge.console import say
from sftforge.data.messages import Conversation, DataError
from sftforge.data.writers import conversation_record
from sftforge.encode.encoder import Encoder, Example
from sftforge.encode.table import EncodedChunk, ExampleTable, ExampleView, TableWriter
from sftforge.errors import InputError

Truncation = Literal["drop", "truncate"]


PARALLEL_FROM = 2000  # fewer conversations than this are encoded in this process
CHUNK = 500  # conversations per task handed to a worker
IN_FLIGHT = 4  # chunks queued per worker: bounds what is held while the reader runs ahead
KEEP_ENTRIES = 5  # cached datasets kept; older ones are deleted when a new one is written
# The stages whose code the examples depend on: every module of them (found on disk, not
# listed by hand) goes into the cache key, so a change or a move there is a new key.
ENCODING_PACKAGES = ("data", "encode")


def encoded_chunks(
    conversations: Iterable[Conversation], encoder: Encoder, num_proc: int = 1
) -> Iterator[tuple[list[Conversation], EncodedChunk]]:
    """(chunk of conversations, its EncodedChunk), in order, reading `conversations` as it
    goes: with `num_proc` > 1, by that many forked workers (sharing the loaded tokenizer),
    with at most IN_FLIGHT chunks each queued, so memory holds a few chunks, never the data.

    Objects alive when it starts (the caller's conversations, a whole dataset maybe) are
    left out of garbage collection meanwhile: every collection would go through each of them
    (in a forked worker, a copy-on-write fault a page). 1.6x faster in 2 workers, 2x in this
    process, on a held dataset."""
    gc.freeze()
    try:
        yield from _encoded_chunks(conversations, encoder, num_proc)
    finally:
        gc.unfreeze()


def _encoded_chunks(conversations, encoder: Encoder, num_proc: int):
    chunks = _chunked(iter(conversations))
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    small = second is None or len(first) + len(second) < PARALLEL_FROM and len(second) < CHUNK
    if num_proc <= 1 or small or not _can_fork():
        for chunk in _prepend([first, second], chunks):
            yield chunk, _encode_chunk_with(encoder, chunk)
        return
    global _worker_encoder
    _worker_encoder = encoder  # inherited by the forked workers
    try:
        with multiprocessing.get_context("fork").Pool(num_proc, _one_thread_each) as pool:
            pending: deque = deque()
            for chunk in _prepend([first, second], chunks):
                pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
                if len(pending) >= IN_FLIGHT * num_proc:
                    chunk, result = pending.popleft()
                    yield chunk, result.get()
            while pending:
                chunk, result = pending.popleft()
                yield chunk, result.get()
    finally:
        _worker_encoder = None


def _chunked(conversations: Iterator[Conversation]) -> Iterator[list[Conversation]]:
    while chunk := list(itertools.islice(conversations, CHUNK)):
        yield chunk


def _prepend(first: list, rest: Iterator) -> Iterator:
    yield from (x for x in first if x is not None)
    yield from rest


_worker_encoder: Encoder | None = None


def _one_thread_each() -> None:
    """A worker tokenizes in its own thread only: the workers already fill the cores, and a
    tokenizer's thread pool in each would only make them contend (about 5 % slower)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_chunk(chunk: list[Conversation]) -> EncodedChunk:
    try:
        return _encode_chunk_with(_worker_encoder, chunk)
    except Exception as err:  # noqa: BLE001 - sent back as text: an exception that does not
        # unpickle would leave the pool waiting forever
        raise RuntimeError(f"encoding worker failed: {type(err).__name__}: {err}") from None


def _encode_chunk_with(encoder: Encoder, chunk: list[Conversation]) -> EncodedChunk:
    examples, errors = [], []
    for position, result in enumerate(encoder.encode_many(chunk)):
        if isinstance(result, DataError):
            errors.append((position, result))
        else:
            examples.append(result)
    return EncodedChunk.of(examples, errors)


@dataclass
class Encoded:
    """Conversations encoded into a table: `table.rows_of([i])` are conversation i's rows, and
    `rejected` lists (i, error, the conversation as a record) for each the template refused."""

    table: ExampleTable
    rejected: list[tuple[int, DataError, dict]]

    @property
    def conversations(self) -> int:
        return len(self.table.row_of)


def encode_stream(
    conversations: Iterable[Conversation],
    encoder: Encoder,
    on_invalid: str = "error",
    num_proc: int = 1,
    folder: Path | None = None,
) -> Encoded:
    """Encode `conversations` (read one chunk at a time) into an ExampleTable, written to
    `folder` when given, else in memory. With on_invalid="error" the first conversation the
    template rejects (in order) raises its DataError."""
    writer = TableWriter(folder)
    rejected = []
    index = 0
    try:
        for chunk, encoded in encoded_chunks(conversations, encoder, num_proc):
            for position, err in encoded.errors:
                if on_invalid == "error":
                    raise err
                rejected.append((index + position, err, conversation_record(chunk[position])))
            writer.add(encoded, {p for p, _ in encoded.errors}, len(chunk))
            index += len(chunk)
    finally:
        writer.close()
    return Encoded(writer.finish(), rejected)


def _can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def default_num_proc() -> int:
    """Every core this process may use, up to 8 (beyond that, reading and hashing dominate)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


# ---- the cache ----------------------------------------------------------------------------


def code_and_encoder_digest(encoder: Encoder):
    """A sha256 started with the code that reads, renders and encodes records (every module of
    ENCODING_PACKAGES, by its path in the package and its bytes) and the encoder's definition
    (`encoder_fingerprint`: tokenizer, template, masking options)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for stage in ENCODING_PACKAGES:
        for module in sorted((package / stage).rglob("*.py")):
            digest.update(module.relative_to(package).as_posix().encode() + b"\x00")
            digest.update(module.read_bytes())
    digest.update(encoder_fingerprint(encoder).encode())
    return digest


def encoder_fingerprint(encoder: Encoder) -> str:
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    template = encoder.template
    return json.dumps(
        {
            "tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest(),
            "special": sorted(encoder.special_ids.items()),
            "template": [template.name, template.source, template.expects_bos],
            "train_on": encoder.train_on,
            "reasoning": encoder.reasoning,
            "template_options": encoder.template_options,
            "bos": encoder.bos_id,
            "stop": list(encoder.stop_ids),
        },
        sort_keys=True,
        default=str,
    )


def cached_entry(cache_root: Path, key: str) -> Path | None:
    """The entry for `key` when one was written whole, marked as recently used."""
    entry = cache_root / key
    if not (entry / "meta.json").is_file():
        return None
    os.utime(entry)  # recently used: pruned last
    return entry


def write_entry(cache_root: Path, key: str, write) -> Path | None:
    """`write(folder)` as the entry for `key`, written whole or not at all, and the oldest
    entries beyond KEEP_ENTRIES pruned; None when it could not be written (another process
    wrote it first, the disk is full: not fatal, the caller has what `write` made)."""
    entry = cache_root / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(entry, write)
    except OSError as err:  # another process wrote it first, or the disk is full
        say(f"note: the encoded examples were not cached ({err})")
        return None
    finally:
        shutil.rmtree(staging_folder(entry), ignore_errors=True)  # what a failure left
    _prune(cache_root, keep=entry)
    return entry


def _prune(cache_root: Path, keep: Path) -> None:
    entries = [p for p in cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in entries if p != keep][KEEP_ENTRIES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


# ---- the max_length policy -----------------------------------------------------------------


@dataclass
class EncodingReport:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: list[str] = field(default_factory=list)  # sources of examples cut to max_length
    dropped_too_long: list[str] = field(default_factory=list)
    dropped_nothing_trained: list[str] = field(default_factory=list)
    max_tokens: int = 0

    def summary(self, max_length: int) -> str:
        lines = [
            f"examples: {self.examples}, tokens: {self.tokens}, trained tokens: "
            f"{self.trained_tokens}, longest: {self.max_tokens} (max_length {max_length})"
        ]
        for label, sources in (
            ("truncated to max_length", self.truncated),
            ("dropped: longer than max_length", self.dropped_too_long),
            ("dropped: no trained token left", self.dropped_nothing_trained),
        ):
            if sources:
                shown = ", ".join(sources[:5]) + (" ..." if len(sources) > 5 else "")
                lines.append(f"{label}: {len(sources)} ({shown})")
        return "\n".join(lines)


def fit_to_length(
    examples: list[Example], max_length: int, truncation: str, report: EncodingReport
) -> list[Example]:
    """Apply the max_length policy; every example cut or dropped is named in the report."""
    if truncation not in get_args(Truncation):
        allowed = ", ".join(get_args(Truncation))
        raise InputError(f"truncation must be one of {allowed}, not {truncation!r}")
    kept = []
    for ex in examples:
        report.max_tokens = max(report.max_tokens, len(ex.input_ids))
        if len(ex.input_ids) > max_length:
            if truncation == "drop":
                report.dropped_too_long.append(ex.source)
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.source)
            report.truncated.append(ex.source)
        if ex.trained_token_count == 0:
            report.dropped_nothing_trained.append(ex.source)
            continue
        kept.append(ex)
        report.examples += 1
        report.tokens += len(ex.input_ids)
        report.trained_tokens += ex.trained_token_count
    return kept


def fit_rows(
    table: ExampleTable, rows: np.ndarray, max_length: int, truncation: str, report: EncodingReport
) -> ExampleView:
    """`fit_to_length` for rows of a table: the view of those kept, each cut to max_length
    where truncated; every row cut or dropped is named in the report."""
    if truncation not in get_args(Truncation):
        allowed = ", ".join(get_args(Truncation))
        raise InputError(f"truncation must be one of {allowed}, not {truncation!r}")
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.asarray(table.lengths[rows])
    counts = np.asarray(table.trained_counts[rows]).copy()
    if len(rows):
        report.max_tokens = max(report.max_tokens, int(lengths.max()))
    over = np.flatnonzero(lengths > max_length)
    keep = np.ones(len(rows), dtype=bool)
    if truncation == "drop":
        keep[over] = False
        report.dropped_too_long += [table.source(int(rows[i])) for i in over]
    else:
        for i in over:
            counts[i] = table.trained_within(int(rows[i]), max_length)
        report.truncated += [table.source(int(rows[i])) for i in over]
    cuts = np.minimum(lengths, max_length)
    nothing = np.flatnonzero(keep & (counts == 0))
    keep[nothing] = False
    report.dropped_nothing_trained += [table.source(int(rows[i])) for i in nothing]
    report.examples += int(keep.sum())
    report.tokens += int(cuts[keep].sum())
    report.trained_tokens += int(counts[keep].sum())
    return ExampleView(table, rows[keep], cuts[keep])

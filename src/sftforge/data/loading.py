"""Records in -> validated Conversations out: the data stage of a run.

`load_conversations` reads files, folders, a `datasets.Dataset` or records in memory (see `data/readers.py`), works
out each file's format from its first valid record (the table in `data/formats.py`), converts
every record and validates it. Every problem is a `DataError` naming the record's file:line
(or file[row N]) and field. By default the first one is raised; with `on_invalid="skip"`
every rejected record is kept in `Rejects` (and optionally written as JSONL) so nothing is
ever dropped silently.

training/training_data.py makes a run's examples from these conversations: one dataset or
a mix, the held-out split, encoding (encode/parallel.py) and the max_length policy.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from sftforge.data.formats import FIELDS, FORMATS, META_RECORD, DataFormat
from sftforge.data.messages import Conversation, DataError, Source, keys_of, type_name
from sftforge.data.oasst import TREE_FORMATS, conversations_from_trees
from sftforge.data.readers import RawRecord, read_sources
from sftforge.data.writers import JsonlWriter, write_jsonl
from sftforge.errors import InputError

OnInvalid = Literal["error", "skip"]


if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str
    record: Any  # the raw record, the raw line text when it did not parse, or the start
    # of a line too long to read (readers.MAX_RECORD_BYTES)


class Rejects:
    """Collects rejected records with their reason; never lose a record silently. By default
    every one is held; with `sink` (an open writers.JsonlWriter) each is written as it comes
    instead, and only the first `held` are kept to show, so a stream of bad records takes no
    memory. `len` counts them all."""

    def __init__(self, sink: JsonlWriter | None = None, held: int | None = None) -> None:
        self._items: list[Reject] = []
        self._sink, self._held, self._count = sink, held, 0

    def add(self, source: Source | str, reason: str, record: object) -> None:
        self._count += 1
        reject = Reject(str(source), reason, record)
        if self._sink is not None:
            self._sink.write(_as_line(reject))
        if self._held is None or len(self._items) < self._held:
            self._items.append(reject)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Reject]:
        """The rejects held: all of them, or the first `held`."""
        return iter(self._items)

    def write_jsonl(self, path: str | Path) -> None:
        """One line a reject: {"source", "reason", "record"}."""
        if self._held is not None and self._count > len(self._items):
            raise ValueError("these rejects were streamed to their sink; not all are held")
        write_jsonl(path, (_as_line(r) for r in self))


def _as_line(reject: Reject) -> dict:
    return {"source": reject.source, "reason": reject.reason, "record": reject.record}


@dataclass
class LoadResult:
    """What reading data gave: the conversations (when kept), the rejects, and the counts.
    `LoadResult()` is the empty one that `iter_conversations` fills as it reads."""

    conversations: list[Conversation] = field(default_factory=list)
    rejects: Rejects = field(default_factory=Rejects)
    formats: dict[str, int] = field(default_factory=dict)  # format -> files/datasets of it
    # conversations exactly repeating an earlier one (kept, only counted); None: not counted
    duplicates: int | None = 0
    files: list[str] = field(default_factory=list)  # every file or dataset read, in order
    rejects_path: Path | None = None  # where the rejects were written, if anywhere
    records: int = 0  # records read: in OpenAssistant files, messages (fewer conversations)
    valid: int = 0  # conversations read and valid (all of them, even when not kept here)
    left_out: Counter = field(default_factory=Counter)  # valid records in no conversation, by why
    contents: Counter = field(default_factory=Counter)  # tool calls, reasoning...: `count_contents`

    def summary(self) -> str:
        valid, rejected = self.valid, len(self.rejects)
        written = f" -> written to {self.rejects_path}" if self.rejects_path else ""
        formats = ", ".join(f"{name}: {count}" for name, count in self.formats.items())
        lines = [
            f"files read:   {len(self.files)}",
            f"records read: {self.records}",
            f"valid:        {valid}",
            f"rejected:     {rejected}{written}",
        ]
        if rejected:
            first = next(iter(self.rejects))
            lines.append(f"  first:      {first.source}: {first.reason}")
        for why, count in self.left_out.items():
            lines.append(f"left out:     {count} ({why})")
        if self.duplicates is not None:
            lines.append(f"duplicates:   {self.duplicates} (kept; exact repeats of an earlier one)")
        lines.append(f"formats:      {formats or 'none detected'}")
        if self.contents:
            held = ", ".join(f"{what}: {count}" for what, count in self.contents.items())
            lines.append(f"holding:      {held}")
        return "\n".join(lines)


def count_contents(counts: Counter, conversation: Conversation) -> None:
    """What a conversation holds beyond plain turns, added to `counts`: records offering
    tools, tool calls, tool results, assistant turns with reasoning."""
    if conversation.tools:
        counts["records offering tools"] += 1
    for m in conversation.messages:
        counts["tool calls"] += len(m.tool_calls)
        counts["tool results"] += m.role == "tool"
        counts["reasoning turns"] += m.reasoning is not None
    for key in [k for k, v in counts.items() if not v]:
        del counts[key]


def load_conversations(
    data: str | Path | list[str | Path] | datasets.Dataset,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    on_invalid: str = "error",
    rejects_path: str | Path | None = None,
    keep_records: bool = False,
) -> LoadResult:
    """Read `data` (a .json/.jsonl/.parquet/.csv file, a folder of them, a list, or a Dataset)
    whole: `iter_conversations`, with every conversation kept in the LoadResult.

    on_invalid="skip" writes the rejects to `rejects_path` (always, even when empty, so an old
    file never misleads)."""
    result = LoadResult()
    options = {"format": format, "columns": columns, "on_invalid": on_invalid}
    options["keep_records"] = keep_records
    result.conversations.extend(iter_conversations(data, result, **options))
    if on_invalid == "skip" and rejects_path is not None:
        result.rejects.write_jsonl(rejects_path)
        result.rejects_path = Path(rejects_path)
    return result


@dataclass(frozen=True)
class Reading:
    """One source of a run's data and how it is read."""

    path: str | list[str]
    format: str = "auto"
    columns: dict[str, str] | None = None
    on_invalid: str = "error"

    def options(self) -> dict:
        return {"format": self.format, "columns": self.columns, "on_invalid": self.on_invalid}


def iter_readings(
    readings: list[Reading], result: LoadResult, sizes: list[int]
) -> Iterator[Conversation]:
    """Every reading's valid conversations in order (exact repeats counted across all of
    them), counted into `result`, and each reading's number of them appended to `sizes`."""
    repeats = RepeatCounter()
    for reading in readings:
        before = result.valid
        yield from iter_conversations(reading.path, result, repeats=repeats, **reading.options())
        sizes.append(result.valid - before)


def iter_conversations(
    data: str | Path | list[str | Path] | datasets.Dataset,
    result: LoadResult,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    on_invalid: str = "error",
    repeats: RepeatCounter | None = None,
    count_repeats: bool = True,
    keep_records: bool = False,
) -> Iterator[Conversation]:
    """The valid conversations of `data`, one at a time, in order; what was read, rejected,
    detected and repeated is counted into `result` as they go (its `conversations` is left
    alone). Nothing but the record being read is held, except an OpenAssistant file.

    With format="auto" each file's format is detected from its first valid record and then
    holds for the whole file. An OpenAssistant file (oasst, oasst_all) holds one message a
    record: it is read whole, and data/oasst.py assembles its trees into conversations.
    `columns` maps our field names to the dataset's column names.
    on_invalid="error" raises the first DataError; "skip" rejects bad records into
    `result.rejects` and goes on. A file that holds no record to reject (empty, a broken
    JSON array, UTF-16) raises a DataError either way; a JSON line over
    readers.MAX_RECORD_BYTES is a rejected record. Exact repeats are counted by `repeats`
    (pass one to count them across several calls), which holds a digest per conversation:
    `count_repeats=False` leaves them uncounted (`result.duplicates` None) so that nothing
    grows with the number of records. `keep_records=True` keeps each record,
    as the file had it, in the conversation's meta (`formats.META_RECORD`), for `dedup` and
    `filter` to write back whole (an OpenAssistant conversation, made of several records,
    has none).
    """
    _check_choice("format", format, get_args(DataFormat))
    _check_choice("on_invalid", on_invalid, get_args(OnInvalid))
    _check_columns(columns)
    repeats = repeats or RepeatCounter()
    if not count_repeats:
        result.duplicates = None
    for name, raw_records in read_sources(data):
        result.files.append(name)
        file_format = None if format == "auto" else format
        tree_messages = []  # an OpenAssistant file's records: its trees are assembled at its end
        for raw in raw_records:
            result.records += 1
            try:
                record = _record_from(raw, columns)
                file_format = file_format or _detect_format(record, raw.source)
                if file_format in TREE_FORMATS:
                    tree_messages.append((raw, record))
                    continue
                conversation = _convert(record, raw.source, file_format, columns)
                if keep_records:
                    conversation.meta[META_RECORD] = raw.record
            except DataError as err:
                if on_invalid == "error":
                    raise
                result.rejects.add(raw.source, reject_reason(err), raw.record)
                continue
            result.valid += 1
            if count_repeats:
                result.duplicates += repeats.seen(conversation)
            count_contents(result.contents, conversation)
            yield conversation
        if tree_messages:
            trees = conversations_from_trees(tree_messages, TREE_FORMATS[file_format])
            for err, raw in trees.rejected:
                if columns and err.field:
                    err = DataError(err.source, err.reason, _dataset_field(err.field, columns))
                if on_invalid == "error":
                    raise err
                result.rejects.add(raw.source, reject_reason(err), raw.record)
            result.left_out.update(trees.left_out)
            for conversation in trees.conversations:
                result.valid += 1
                if count_repeats:
                    result.duplicates += repeats.seen(conversation)
                yield conversation
        if file_format:
            result.formats[file_format] = result.formats.get(file_format, 0) + 1


class RepeatCounter:
    """Tells whether a conversation exactly repeats an earlier one, by what would be trained
    on (not its source), holding a 16-byte digest of each: 1M conversations take ~100 MB."""

    def __init__(self) -> None:
        self._digests: set[bytes] = set()

    def seen(self, conversation: Conversation) -> bool:
        digest = hashlib.blake2b(digest_size=16)
        if conversation.text is not None:
            digest.update(b"\x01" + conversation.text.encode())
        for m in conversation.messages:
            trained = b"1" if m.trained else b"0"
            digest.update(b"\x02" + m.role.encode() + trained + m.content.encode() + b"\x03")
            if m.reasoning is not None or m.tool_calls:  # as JSON values: key order aside
                calls = [(c.name, c.arguments) for c in m.tool_calls]
                digest.update(
                    json.dumps([m.reasoning, calls], sort_keys=True, default=str).encode()
                )
        if conversation.tools or conversation.template_options:
            tools = [conversation.tools, conversation.template_options]
            digest.update(b"\x04" + json.dumps(tools, sort_keys=True, default=str).encode())
        key = digest.digest()
        if key in self._digests:
            return True
        self._digests.add(key)
        return False


def conversation_from_record(
    record: dict, source: Source, format: str, columns: dict[str, str] | None = None
) -> Conversation:
    """Convert and validate one record; raises DataError naming `source` and the field."""
    _check_choice("format", format, get_args(DataFormat))
    _check_columns(columns)
    record = _record_from(RawRecord(source, record), columns)
    if format == "auto":
        format = _detect_format(record, source)
    return _convert(record, source, format, columns)


def detect_format(record: dict, columns: dict[str, str] | None = None) -> str:
    """Name the format whose keys `record` has; raises DataError when none fits."""
    _check_columns(columns)
    source = Source("record")
    return _detect_format(_record_from(RawRecord(source, record), columns), source)


def _detect_format(record: dict, source: Source) -> str:
    for name, format in FORMATS.items():
        if all(key in record for key in format.keys):
            return name
    known = ", ".join(f"{name} ({', '.join(f.keys)})" for name, f in FORMATS.items())
    raise DataError(
        source,
        f"cannot detect the format from keys {keys_of(record)}; known formats: {known}; "
        "pass format=... or map your column names with columns={'output': 'response', ...}",
    )


def held_out_indices(n: int, held_out: float | int, seed: int) -> list[int]:
    """The indices, in order, of the conversations of `n` held out: a float in (0, 1) is a
    fraction, an int a count. The same n and seed always choose the same; the held-out
    records keep their file order so reports are easy to read against the data."""
    if isinstance(held_out, float):
        if not 0 < held_out < 1:
            raise InputError(f"eval.held_out as a fraction must be in (0, 1), not {held_out}")
        count = max(1, round(held_out * n))
    else:
        count = held_out
    if not 0 < count < n:
        raise InputError(
            f"eval.held_out={held_out} would hold out {count} of {n} examples; "
            "leave at least one to train on and hold out at least one"
        )
    return sorted(random.Random(f"held-out/{seed}").sample(range(n), count))


def _record_from(raw: RawRecord, columns: dict[str, str] | None) -> dict:
    """The parsed record with the `columns` mapping applied, or a DataError saying why not."""
    if raw.error:
        raise DataError(raw.source, raw.error)
    if not isinstance(raw.record, dict):
        found = type_name(raw.record)
        raise DataError(raw.source, f"expected a JSON object (a record), found {found}")
    if not columns:
        return raw.record
    renamed = {k: v for k, v in raw.record.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs not in raw.record:
            reason = f"missing (mapped to '{ours}' by columns); found keys {keys_of(raw.record)}"
            raise DataError(raw.source, reason, theirs)
        renamed[ours] = raw.record[theirs]
    return renamed


def _convert(
    record: dict, source: Source, format: str, columns: dict[str, str] | None
) -> Conversation:
    try:
        return FORMATS[format].read(record, source)
    except DataError as err:
        # Name the field as the user's dataset spells it, not as we renamed it.
        if columns and err.field:
            raise DataError(err.source, err.reason, _dataset_field(err.field, columns)) from None
        raise


def _dataset_field(field_path: str, columns: dict[str, str]) -> str:
    for ours, theirs in columns.items():
        if field_path == ours or field_path.startswith((f"{ours}[", f"{ours}.")):
            return theirs + field_path[len(ours) :]
    return field_path


def reject_reason(err: DataError) -> str:
    return f"field '{err.field}': {err.reason}" if err.field else err.reason


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _check_columns(columns: dict[str, str] | None) -> None:
    # The mapping goes ours -> theirs; the reverse ({'response': 'output'}) is an easy slip.
    unknown = [ours for ours in columns or {} if ours not in FIELDS]
    if unknown:
        raise InputError(
            f"columns maps our field names to your column names, e.g. {{'output': 'response'}}; "
            f"{', '.join(map(repr, unknown))} is not one of our fields: {', '.join(FIELDS)}"
        )

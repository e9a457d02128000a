"""Files in -> raw records out, each with the Source (file:line or file[row N]) it came from.

`data/loading.py` turns these records into Conversations; this module only reads. A record that
cannot even be parsed (a malformed JSON line, a short CSV row, invalid UTF-8, a JSON object
naming a key twice) is still yielded, with the raw text and the parse error, so the caller
can reject it by line number instead of losing it.

A problem that leaves no record to reject is a DataError for the whole file, raised even
with on_invalid="skip": an empty file (an empty data file is almost always a mistake), a
broken JSON array, a UTF-16 file, a CSV header naming a column twice, a folder without data.

A JSON line longer than MAX_RECORD_BYTES is rejected (read past in chunks, never held
whole), and so is one nested too deeply to parse (TOO_DEEP).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sftforge.data.duplicate_keys import (
    ObjectsNotingDuplicateKeys,
    duplicate_key,
    duplicate_key_reason,
)
from sftforge.data.messages import DataError, Source
from sftforge.errors import InputError, MissingFileError

EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet")
RECORDS = "records"  # the name of records given in memory (a list of dicts): records[row N]

# 16 MiB is about four million tokens, beyond any model's context, so no trainable record is
# lost; a longer line is a binary file, a missing newline or a runaway field, and reading it
# whole could exhaust memory. Applies to JSON lines (.jsonl, and .json files holding lines);
# whole-file formats (a JSON array, CSV, Parquet) are parsed by their own libraries.
MAX_RECORD_BYTES = 16 * 2**20
_PREVIEW_BYTES = 200  # how much of an over-long line the rejects file keeps
_CHUNK_BYTES = 2**20
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class RawRecord:
    source: Source
    record: Any  # the parsed record, or the raw text/cells when it did not parse
    error: str | None = None  # why it did not parse; None when `record` parsed


def read_sources(data: Any) -> Iterator[tuple[str, Iterator[RawRecord]]]:
    """Yield (source name, records) for each file in `data` (a file, a folder, a list of
    them), for a `datasets` dataset, or for records in memory (a list of dicts), in a
    stable order."""
    dataset = _as_dataset(data)
    if dataset is not None:
        yield _dataset_name(dataset), _read_dataset(dataset)
        return
    if _are_records(data):
        yield RECORDS, (RawRecord(Source(RECORDS, row=row), r) for row, r in enumerate(data))
        return
    for path in data_files(data):
        yield str(path), _at_least_one_record(str(path), _read_file(path))


def _at_least_one_record(name: str, records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise DataError(
            name,
            "no records: the file is empty (or holds only blank lines, a CSV header or an "
            "empty JSON array); an empty data file is almost always a mistake: fill it or "
            "leave it out",
        )


def data_files(data: Any) -> list[Path]:
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise InputError("no data given: pass a file, a folder, a list of them, or a Dataset")
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(_files_in_folder(path))
        elif path.is_file():
            _check_extension(path)
            paths.append(path)
        else:
            raise MissingFileError(
                f"{path}: no such file or folder; expected a {_extensions_text()} file, "
                "a folder of them, or a datasets.Dataset (for a Hugging Face hub dataset, "
                "call datasets.load_dataset(...) and pass one split)"
            )
    return paths


def _files_in_folder(folder: Path) -> list[Path]:
    # Sorted so that the order of examples (and so every later shuffle seed) is reproducible.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        reason = f"folder holds no {_extensions_text()} files"
        if folder.suffix.lower() in EXTENSIONS:  # named like a data file: say what it really is
            reason = f"is a folder, not a {folder.suffix} file, and the {reason}"
        raise DataError(str(folder), reason)
    return files


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(
            str(path), f"unsupported file type '{path.suffix}'; supported: {_extensions_text()}"
        )


def _extensions_text() -> str:
    return ", ".join(EXTENSIONS)


TOO_DEEP = (
    "nested too deeply to parse (over about a thousand levels of lists or objects); no "
    "demonstration is shaped like that: fix or drop the record"
)


def _read_file(path: Path) -> Iterator[RawRecord]:
    readers = {
        ".csv": _read_csv,
        ".json": _read_json,
        ".jsonl": _read_jsonl,
        ".parquet": _read_parquet,
    }
    return readers[path.suffix.lower()](path)


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    # Read bytes line by line (not json.load on the file) so a bad line is reported by
    # its own number and the lines around it still load.
    objects = ObjectsNotingDuplicateKeys()
    with open(path, "rb") as f:
        _check_not_utf16(path, f.read(2))
        f.seek(0)
        for number, raw_line in enumerate(_bounded_lines(f), start=1):
            source = Source(str(path), line=number)
            if isinstance(raw_line, _LongLine):
                yield RawRecord(source, raw_line.preview, raw_line.reason())
                continue
            if number == 1:
                raw_line = raw_line.removeprefix(b"\xef\xbb\xbf")  # BOM written by some editors
            if raw_line.strip():
                yield _parse_json_line(raw_line, source, objects)


def _parse_json_line(
    raw_line: bytes, source: Source, objects: ObjectsNotingDuplicateKeys
) -> RawRecord:
    try:
        text = raw_line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        text = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
        reason = f"not valid UTF-8: {err.reason} at byte {err.start}; save the file as UTF-8"
        return RawRecord(source, text, reason)
    duplicates_before = objects.count
    try:
        record = json.loads(text, object_pairs_hook=objects)
    except json.JSONDecodeError as err:
        reason = f"malformed JSON: {err.msg} (column {err.colno})"
        if not raw_line.endswith(b"\n"):  # only the last line can lack its newline
            reason += "; the file ends mid-line, as if cut off while being written or copied"
        return RawRecord(source, text, reason)
    except RecursionError:
        return RawRecord(source, text, TOO_DEEP)
    if objects.count > duplicates_before:
        try:
            return RawRecord(source, text, duplicate_key_reason(duplicate_key(record)))
        except RecursionError:
            return RawRecord(source, text, TOO_DEEP)
    return RawRecord(source, record)


@dataclass(frozen=True)
class _LongLine:
    """A line over MAX_RECORD_BYTES, read past in chunks and never held whole."""

    size: int  # bytes, with the line ending
    preview: str  # its start, for the rejects file

    def reason(self) -> str:
        return (
            f"line is {self.size:,} bytes, over the limit of {MAX_RECORD_BYTES:,} bytes per "
            "record (sftforge.readers.MAX_RECORD_BYTES), far beyond any context window; "
            "split the record or drop it"
        )


def _bounded_lines(f: BinaryIO) -> Iterator[bytes | _LongLine]:
    """The lines of `f`, except that a line over MAX_RECORD_BYTES comes as a _LongLine.

    Read in chunks so that such a line is never held whole: memory stays near the limit."""
    while line := f.readline(_CHUNK_BYTES):
        parts, size = [line], len(line)
        while not line.endswith(b"\n") and (line := f.readline(_CHUNK_BYTES)):
            size += len(line)
            if size <= MAX_RECORD_BYTES:
                parts.append(line)
            else:
                del parts[1:]  # too long to keep: only its start is needed, for the preview
        if size > MAX_RECORD_BYTES:
            preview = parts[0][:_PREVIEW_BYTES].decode("utf-8", errors="replace") + "..."
            yield _LongLine(size, preview)
        else:
            yield parts[0] if len(parts) == 1 else b"".join(parts)


def _check_not_utf16(path: Path, start: bytes) -> None:
    # PowerShell's `>` and Excel's "Unicode text" write UTF-16: every line would be rejected
    # as invalid UTF-8, which hides the one cause they share.
    if start.startswith(_UTF16_BOMS):
        raise DataError(
            str(path), "file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8"
        )


def _read_json(path: Path) -> Iterator[RawRecord]:
    """A .json file is either one JSON array of records or, as often in the wild, JSON lines."""
    raw = path.read_bytes()
    _check_not_utf16(path, raw[:2])
    is_array = raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if is_array:
            line = raw.count(b"\n", 0, err.start) + 1
            reason = f"not valid UTF-8: {err.reason}; the file cannot be read; save it as UTF-8"
            raise DataError(Source(str(path), line=line), reason) from None
        yield from _read_jsonl(path)  # JSON lines: reject only the lines that do not decode
        return
    objects = ObjectsNotingDuplicateKeys()
    try:
        parsed = json.loads(text, object_pairs_hook=objects)
    except RecursionError:
        if is_array:
            raise DataError(Source(str(path)), f"{TOO_DEEP}; the file cannot be read") from None
        yield from _read_jsonl(path)  # JSON lines: reject only the lines nested too deep
        return
    except json.JSONDecodeError as err:
        if is_array:
            # One broken array makes every record in it unreadable: a file-level error,
            # raised even with on_invalid="skip", since no single record can be rejected.
            raise DataError(
                Source(str(path), line=err.lineno),
                f"malformed JSON array: {err.msg} (column {err.colno}); the file cannot be read",
            ) from err
        yield from _read_jsonl(path)
        return
    if isinstance(parsed, list):
        for row, record in enumerate(parsed):
            yield _json_row(Source(str(path), row=row), record, objects.count > 0)
    else:
        yield _json_row(Source(str(path), line=1), parsed, objects.count > 0)


def _json_row(source: Source, record: Any, may_repeat_keys: bool) -> RawRecord:
    # Only search the rows when the parser saw a repeated key somewhere: it rarely does.
    key = duplicate_key(record) if may_repeat_keys else None
    return RawRecord(source, record, duplicate_key_reason(key) if key is not None else None)


def _read_csv(path: Path) -> Iterator[RawRecord]:
    # Cells holding whole conversations as JSON easily pass csv's default 128 KiB limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(path, "rb") as f:
        _check_not_utf16(path, f.read(2))
    # surrogateescape: an undecodable byte costs only its own row, not the rest of the file.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        _check_header(path, header, reader.line_num)
        last_line = reader.line_num
        for cells in reader:
            # A quoted cell may span lines, so the record starts right after the previous one.
            source = Source(str(path), line=last_line + 1)
            last_line = reader.line_num
            if not cells:
                continue
            yield _csv_record(source, header, cells)


def _csv_record(source: Source, header: list[str], cells: list[str]) -> RawRecord:
    bad = _first_undecodable(cells)
    if bad is not None:
        column = f"column '{header[bad]}'" if bad < len(header) else f"cell {bad + 1}"
        cells = [_replace_undecodable(cell) for cell in cells]
        return RawRecord(source, cells, f"not valid UTF-8 in {column}; save the file as UTF-8")
    if len(cells) != len(header):
        reason = f"CSV row has {len(cells)} cells but the header has {len(header)}"
        return RawRecord(source, cells, reason)
    return RawRecord(source, dict(zip(header, cells, strict=True)))


def _check_header(path: Path, header: list[str], line: int) -> None:
    source = Source(str(path), line=line)
    if _first_undecodable(header) is not None:
        raise DataError(source, "CSV header is not valid UTF-8; save the file as UTF-8")
    for i, name in enumerate(header):
        if name in header[:i]:
            first = header.index(name) + 1
            reason = (
                f"CSV header names column '{name}' twice (columns {first} and {i + 1}); "
                "each row would silently keep only the last: rename or drop one"
            )
            raise DataError(source, reason)


def _first_undecodable(cells: list[str]) -> int | None:
    # Bytes that are not UTF-8 were decoded to lone surrogates, which cannot be encoded back.
    for i, cell in enumerate(cells):
        try:
            cell.encode("utf-8")
        except UnicodeEncodeError:
            return i
    return None


def _replace_undecodable(cell: str) -> str:
    return cell.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise DataError(str(path), f"cannot read Parquet file: {err}") from err
    row = 0
    for batch in parquet_file.iter_batches():
        for record in batch.to_pylist():
            yield RawRecord(Source(str(path), row=row), record)
            row += 1


def _are_records(data: Any) -> bool:
    """Whether `data` is records held in memory: a non-empty list of dicts."""
    return isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], Mapping)


def _as_dataset(data: Any) -> Any:
    """Return `data` if it is a `datasets` dataset, without importing `datasets` (slow) otherwise."""
    datasets = sys.modules.get("datasets")
    if datasets is None:
        return None
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = ", ".join(data)
        raise InputError(
            f"got a DatasetDict with splits {splits}; pass one split, e.g. ds['train']"
        )
    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return data
    return None


def _dataset_name(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "dataset"


def _read_dataset(dataset: Any) -> Iterator[RawRecord]:
    name = _dataset_name(dataset)
    for row, record in enumerate(dataset):
        yield RawRecord(Source(name, row=row), record)

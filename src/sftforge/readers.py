"""Files in -> raw records out, each with the Source (file:line or file[row N]) it came from.

`data.py` turns these records into Conversations; this module only reads. A record that
cannot even be parsed (a malformed JSON line, a short CSV row) is still yielded, with the
raw text and the parse error, so the caller can reject it by line number instead of losing it.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftforge.conversation import DataError, Source

EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    source: Source
    record: Any  # the parsed record, or the raw text/cells when it did not parse
    error: str | None = None  # why it did not parse; None when `record` parsed


def read_sources(data: Any) -> Iterator[tuple[str, Iterator[RawRecord]]]:
    """Yield (source name, records) for each file or dataset in `data`, in a stable order."""
    dataset = _as_dataset(data)
    if dataset is not None:
        yield _dataset_name(dataset), _read_dataset(dataset)
        return
    for path in _expand_paths(data):
        yield str(path), _read_file(path)


def _expand_paths(data: Any) -> list[Path]:
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise ValueError("no data given: pass a file, a folder, a list of them, or a Dataset")
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(_files_in_folder(path))
        elif path.is_file():
            _check_extension(path)
            paths.append(path)
        else:
            raise FileNotFoundError(
                f"{path}: no such file or folder; expected a {_extensions_text()} file, "
                "a folder of them, or a datasets.Dataset (for a Hugging Face hub dataset, "
                "call datasets.load_dataset(...) and pass one split)"
            )
    return paths


def _files_in_folder(folder: Path) -> list[Path]:
    # Sorted so that the order of examples (and so every later shuffle seed) is reproducible.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DataError(str(folder), f"folder holds no {_extensions_text()} files")
    return files


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(
            str(path), f"unsupported file type '{path.suffix}'; supported: {_extensions_text()}"
        )


def _extensions_text() -> str:
    return ", ".join(EXTENSIONS)


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
    with open(path, "rb") as f:
        for number, raw_line in enumerate(f, start=1):
            if number == 1:
                raw_line = raw_line.removeprefix(b"\xef\xbb\xbf")  # BOM written by some editors
            source = Source(str(path), line=number)
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                text = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
                yield RawRecord(source, text, f"not valid UTF-8: {err.reason} at byte {err.start}")
                continue
            if not line.strip():
                continue
            try:
                yield RawRecord(source, json.loads(line))
            except json.JSONDecodeError as err:
                reason = f"malformed JSON: {err.msg} (column {err.colno})"
                yield RawRecord(source, line.rstrip("\r\n"), reason)


def _read_json(path: Path) -> Iterator[RawRecord]:
    """A .json file is either one JSON array of records or, as often in the wild, JSON lines."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
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
            yield RawRecord(Source(str(path), row=row), record)
    else:
        yield RawRecord(Source(str(path), line=1), parsed)


def _read_csv(path: Path) -> Iterator[RawRecord]:
    # Cells holding whole conversations as JSON easily pass csv's default 128 KiB limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        last_line = reader.line_num
        for cells in reader:
            # A quoted cell may span lines, so the record starts right after the previous one.
            source = Source(str(path), line=last_line + 1)
            last_line = reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                reason = f"CSV row has {len(cells)} cells but the header has {len(header)}"
                yield RawRecord(source, cells, reason)
                continue
            yield RawRecord(source, dict(zip(header, cells, strict=True)))


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


def _as_dataset(data: Any) -> Any:
    """Return `data` if it is a `datasets` dataset, without importing `datasets` (slow) otherwise."""
    datasets = sys.modules.get("datasets")
    if datasets is None:
        return None
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = ", ".join(data)
        raise ValueError(
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

"""Encoded examples cached on disk, so that a second run over the same data starts training at
once: `encode_readings` reads and encodes a run's data, or reads the table it made before.

An entry is `<cache_dir>/examples/<key>/`: the table's columns (table.py), what reading found
(meta.json, loader_rejects.jsonl), written whole or not at all, the newest KEEP_ENTRIES kept.
The key hashes everything the examples depend on: each data file's path and bytes, how it is
read, the code that reads, renders and encodes (every module of ENCODING_PACKAGES, found on
disk), and the encoder's definition (tokenizer, template, masking options).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from sftforge.atomic import staging_folder, write_atomically
from sftforge.console import say
from sftforge.data.loading import LoadResult, Reading, iter_readings
from sftforge.data.messages import DataError
from sftforge.data.readers import data_files
from sftforge.encode.encoder import Encoder
from sftforge.encode.parallel import Encoded, encode_stream
from sftforge.encode.table import ExampleTable

KEEP_ENTRIES = 5  # cached datasets kept; older ones are deleted when a new one is written
# The stages whose code the examples depend on: every module of them (found on disk, not
# listed by hand) goes into the key, so a change or a move there is a new key.
ENCODING_PACKAGES = ("data", "encode")


def encode_readings(
    readings: list[Reading],
    encoder: Encoder,
    on_invalid: str,
    num_proc: int,
    cache_root: Path | None,
):
    """(what reading found, the table of every reading's conversations in order, the number
    of valid conversations of each reading, the cache entry or None): from the cache when
    these files were read and encoded so before, else streamed and (with a `cache_root`)
    written there."""
    started = time.perf_counter()
    key = data_key(readings, encoder) if cache_root is not None else None
    entry = cached_entry(cache_root, key) if key else None
    if entry is not None:
        try:
            found = read_entry(entry)
        except (OSError, ValueError, KeyError) as err:
            # Replaced or pruned by another process while being read, or damaged: encode.
            say(f"note: the cached examples in {entry} could not be read ({err}); encoding")
        else:
            took = time.perf_counter() - started
            say(f"encoded examples read from the cache {entry} ({took:.1f} s)")
            return (*found, entry)
    made = {}

    def encode_into(folder: Path | None) -> None:
        loaded, sizes = LoadResult(), []
        stream = iter_readings(readings, loaded, sizes)
        encoded = encode_stream(stream, encoder, on_invalid, num_proc, folder)
        made.update(loaded=loaded, encoded=encoded, sizes=sizes)
        if folder is not None:
            _write_meta(folder, loaded, encoded, sizes)

    written = write_entry(cache_root, key, encode_into) if key else None
    if not made:  # no cache, or the entry could not be started
        encode_into(None)
    took = time.perf_counter() - started
    count = made["encoded"].conversations
    where = f"; cached in {written}" if written else ""
    say(f"encoded {count:,} conversations in {took:.1f} s ({num_proc} processes){where}")
    return made["loaded"], made["encoded"], made["sizes"], written


def data_key(readings: list[Reading], encoder: Encoder) -> str:
    """A hash of everything the encoded table depends on: each data file's path and bytes, how
    it is read (format, columns, on_invalid), the reading and encoding code, and the encoder
    (`code_and_encoder_digest`)."""
    digest = code_and_encoder_digest(encoder)
    for reading in readings:
        digest.update(json.dumps(reading.options(), sort_keys=True).encode())
        for path in data_files(reading.path):
            digest.update(str(path).encode() + b"\x00")
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:32]


def encoding_sources() -> list[Path]:
    """Every module of ENCODING_PACKAGES, in a fixed order."""
    package = Path(__file__).resolve().parents[1]
    return sorted(p for stage in ENCODING_PACKAGES for p in (package / stage).rglob("*.py"))


def code_and_encoder_digest(encoder: Encoder):
    """A sha256 started with the code that reads, renders and encodes records (each module of
    `encoding_sources`, by its path in the package and its bytes) and the encoder's
    definition (`encoder_fingerprint`: tokenizer, template, masking options)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for module in encoding_sources():
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


def _write_meta(folder: Path, loaded: LoadResult, encoded: Encoded, sizes: list[int]) -> None:
    loaded.rejects.write_jsonl(folder / "loader_rejects.jsonl")
    meta = {
        "files": loaded.files,
        "records": loaded.records,
        "valid": loaded.valid,
        "formats": loaded.formats,
        "duplicates": loaded.duplicates,
        "left_out": dict(loaded.left_out),
        "contents": dict(loaded.contents),
        "sizes": sizes,
        "rejected": [
            [index, str(err.source), err.reason, err.field, record]
            for index, err, record in encoded.rejected
        ],
    }
    (folder / "meta.json").write_text(json.dumps(meta), "utf-8")


def read_entry(entry: Path):
    """(what reading found, the Encoded table, the sizes) of a cache entry."""
    meta = json.loads((entry / "meta.json").read_text("utf-8"))
    loaded = LoadResult(formats=meta["formats"])
    loaded.files, loaded.records, loaded.valid = meta["files"], meta["records"], meta["valid"]
    loaded.duplicates, loaded.left_out = meta["duplicates"], Counter(meta["left_out"])
    loaded.contents = Counter(meta.get("contents", {}))
    with open(entry / "loader_rejects.jsonl", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            loaded.rejects.add(item["source"], item["reason"], item["record"])
    rejected = [
        (index, DataError(source, reason, field), record)
        for index, source, reason, field, record in meta["rejected"]
    ]
    table = ExampleTable.read(entry)
    if len(table.row_of) != sum(meta["sizes"]):
        raise ValueError(f"{entry}: {len(table.row_of)} conversations, not {sum(meta['sizes'])}")
    return loaded, Encoded(table, rejected), meta["sizes"]

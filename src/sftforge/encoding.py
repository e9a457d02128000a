"""Conversations -> Examples at scale: encoded in parallel, and cached by what makes them.

Encoding renders each conversation with the chat template, tokenizes it, builds the labels
and proves the mask (tokenize.py). That is the slow part of preparing data, so:

- **In parallel.** With `num_proc` > 1 the conversations are cut into chunks encoded by that
  many worker processes (forked, so they share the loaded tokenizer), in order.
- **Cached.** The result is stored under `<cache_dir>/examples/<key>/`, where the key is a
  hash of everything the examples depend on: the conversations themselves (so the data's
  content, format, column mapping and held-out split), the tokenizer's full definition, the
  chat template, the masking options (train_on, BOS), and the source code of the encoder.
  Change any of them and the key changes. The cache holds examples before the max_length
  policy, which is applied after reading it, so changing max_length or truncation reuses it.
  A second run over the same data reads it in seconds; so do the other ranks of a torchrun
  run, once one has written it.

Then the max_length policy (`fit_to_length`): drop or truncate the examples too long, and
drop those left with no trained token, naming each in the EncodingReport.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .config import Truncation, choices
from .formats import Conversation, DataError
from .tokenize import IGNORE_INDEX, Encoder, Example

PARALLEL_FROM = 2000  # fewer conversations than this are encoded in this process
CHUNK = 500  # conversations per task handed to a worker
KEEP_ENTRIES = 5  # cached datasets kept; older ones are deleted when a new one is written
# The code whose behaviour the examples depend on: a change to any of it is a new key.
ENCODER_SOURCES = ("tokenize.py", "render.py", "templates.py", "encoding.py")


def encode_all(
    conversations: list[Conversation],
    encoder: Encoder,
    on_invalid: str = "error",
    num_proc: int = 1,
) -> tuple[list[Example | None], list[tuple[int, DataError]]]:
    """(an Example per conversation, None where it was rejected; the rejected ones'
    (index, error)). With on_invalid="error" the first DataError (in order) is raised."""
    if num_proc > 1 and len(conversations) >= PARALLEL_FROM and _can_fork():
        chunks = [conversations[s : s + CHUNK] for s in range(0, len(conversations), CHUNK)]
        global _worker_encoder
        _worker_encoder = encoder  # inherited by the forked workers
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            results = [r for chunk in pool.imap(_encode_chunk, chunks) for r in chunk]
        _worker_encoder = None
    else:
        results = [_encode_one(encoder, c) for c in conversations]
    examples, rejected = [], []
    for index, result in enumerate(results):
        if isinstance(result, DataError):
            if on_invalid == "error":
                raise result
            rejected.append((index, result))
            examples.append(None)
        else:
            examples.append(result)
    return examples, rejected


_worker_encoder: Encoder | None = None


def _encode_chunk(chunk: list[Conversation]) -> list[Example | DataError]:
    try:
        return [_encode_one(_worker_encoder, c) for c in chunk]
    except Exception as err:  # noqa: BLE001 - sent back as text: an exception that does not
        # unpickle would leave the pool waiting forever
        raise RuntimeError(f"encoding worker failed: {type(err).__name__}: {err}") from None


def _encode_one(encoder: Encoder, conversation: Conversation) -> Example | DataError:
    try:
        return encoder.encode(conversation)
    except DataError as err:
        return err


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


def cache_key(conversations: list[Conversation], encoder: Encoder) -> str:
    """A hash of everything the encoded examples depend on (see the module's docstring)."""
    digest = hashlib.sha256()
    for name in ENCODER_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    digest.update(encoder_fingerprint(encoder).encode())
    for c in conversations:
        digest.update(b"\x00" + str(c.source).encode())
        if c.is_raw_text:
            digest.update(b"\x01" + c.text.encode())
        for m in c.messages:
            trained = b"1" if getattr(m, "trained", True) else b"0"
            digest.update(b"\x02" + m.role.encode() + trained + m.content.encode())
    return digest.hexdigest()[:32]


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
            "bos": encoder.bos_id,
            "stop": list(encoder.stop_ids),
        },
        sort_keys=True,
        default=str,
    )


def cached_encode_all(
    conversations: list[Conversation],
    encoder: Encoder,
    on_invalid: str,
    num_proc: int,
    cache_root: Path | None,
) -> tuple[list[Example | None], list[tuple[int, DataError]]]:
    """`encode_all`, read from `cache_root` when these conversations were encoded with this
    encoder before, and written there otherwise (no cache when `cache_root` is None)."""
    if cache_root is None:
        return encode_all(conversations, encoder, on_invalid, num_proc)
    started = time.perf_counter()
    key = cache_key(conversations, encoder)
    entry = cache_root / key
    if (entry / "meta.json").is_file():
        try:
            examples, rejected = _read_entry(entry, conversations)
        except (OSError, ValueError, KeyError, IndexError) as err:
            # Replaced or pruned by another process while being read, or damaged: encode.
            print(f"note: the cached examples in {entry} could not be read ({err}); encoding")
        else:
            if rejected and on_invalid == "error":
                raise rejected[0][1]
            took = time.perf_counter() - started
            print(f"encoded examples read from the cache {entry} ({took:.1f} s)")
            return examples, rejected
    examples, rejected = encode_all(conversations, encoder, on_invalid, num_proc)
    took = time.perf_counter() - started
    processes = num_proc if len(conversations) >= PARALLEL_FROM and num_proc > 1 else 1
    print(
        f"encoded {len(conversations):,} conversations in {took:.1f} s "
        f"({processes} process{'es' if processes > 1 else ''}); cached in {entry}"
    )
    _write_entry(entry, examples, rejected)
    _prune(cache_root, keep=entry)
    return examples, rejected


def _write_entry(entry: Path, examples: list[Example | None], rejected) -> None:
    kept = [e for e in examples if e is not None]
    lengths = np.array([len(e.input_ids) for e in kept], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for e in kept for t in e.input_ids), dtype=np.int32, count=offsets[-1])
    trained = np.fromiter(
        (label != IGNORE_INDEX for e in kept for label in e.labels), dtype=bool, count=offsets[-1]
    )

    def write(folder: Path) -> None:
        np.save(folder / "ids.npy", ids)
        np.save(folder / "trained.npy", trained)
        np.save(folder / "offsets.npy", offsets)
        meta = {
            "sources": [e.source for e in kept],
            "rejected": [[i, str(err.source), err.reason, err.field] for i, err in rejected],
            "count": len(examples),
        }
        (folder / "meta.json").write_text(json.dumps(meta), "utf-8")

    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(entry, write)
    except OSError as err:  # another process wrote it first, or the disk is full: not fatal
        print(f"note: the encoded examples were not cached ({err})")


def _read_entry(entry: Path, conversations: list[Conversation]):
    meta = json.loads((entry / "meta.json").read_text("utf-8"))
    ids = np.load(entry / "ids.npy", mmap_mode="r")
    trained = np.load(entry / "trained.npy", mmap_mode="r")
    offsets = np.load(entry / "offsets.npy")
    rejected_at = {
        i: DataError(conversations[i].source, reason, field)
        for i, _, reason, field in meta["rejected"]
    }
    examples: list[Example | None] = []
    k = 0
    for index in range(meta["count"]):
        if index in rejected_at:
            examples.append(None)
            continue
        a, b = offsets[k], offsets[k + 1]
        chunk = np.asarray(ids[a:b], dtype=np.int64)
        labels = np.where(trained[a:b], chunk, IGNORE_INDEX)
        examples.append(Example(chunk.tolist(), labels.tolist(), meta["sources"][k]))
        k += 1
    os.utime(entry)  # recently used: pruned last
    return examples, sorted(rejected_at.items())


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
    if truncation not in choices(Truncation):
        allowed = ", ".join(choices(Truncation))
        raise ValueError(f"truncation must be one of {allowed}, not {truncation!r}")
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

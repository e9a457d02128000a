"""A run's examples: its data (one dataset, or a mix of several), split into training and
held-out conversations, encoded (encoding.py: in parallel, cached) and fitted to max_length.

A mix names its sources in `data.train`, each read with its own format and column mapping,
its training conversations taken by weight or count, deterministically by the seed:

    data:
      train:
        - {path: chat.jsonl, weight: 2}          # each of its examples twice
        - {path: dolly.jsonl, count: 500}        # 500 of them, drawn by the seed
        - {path: qa.csv, columns: {instruction: question, output: answer}}

The held-out split is made first, on every loaded conversation (as without a mix), so a
conversation taken twice is never also held out. A weight w takes floor(w) copies of the
source's training conversations and a seeded sample of the fraction left; a count c does the
same for c / size. The mix (conversations, examples and tokens per source) is printed and
kept in the run's data report.

Every source is read once, streamed into one encoded table (encoding.py, table.py), and the
split, the mix and the max_length policy then choose rows of it: a run over a million
conversations holds their per-example numbers, not their text or token lists.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftforge.config.schema import Config, DataSource
from sftforge.console import say
from sftforge.data.loading import (
    LoadResult,
    Rejects,
    RepeatCounter,
    held_out_indices,
    iter_conversations,
    load_conversations,
    reject_reason,
)
from sftforge.data.messages import Conversation, DataError
from sftforge.data.readers import data_files
from sftforge.data.writers import conversation_as_json, conversation_from_json, write_jsonl
from sftforge.encode.encoder import Encoder, Example
from sftforge.encode.parallel import (
    Encoded,
    EncodingReport,
    cached_entry,
    code_and_encoder_digest,
    default_num_proc,
    encode_stream,
    fit_rows,
    fit_to_length,
    write_entry,
)
from sftforge.encode.table import ExampleTable, ExampleView


@dataclass
class TrainingData:
    """A run's examples: what is trained on, what is held out, and how they were obtained."""

    examples: ExampleView  # what is trained on, read like a list of Examples
    report: EncodingReport
    loaded: LoadResult  # what reading found (its conversations are not kept)
    held_out: list[Conversation] = field(default_factory=list)  # never trained on
    held_out_examples: list[Example] = field(default_factory=list)
    mix: list[dict] = field(default_factory=list)  # per source of a mix: what it gave


def load_examples(
    config: Config, encoder: Encoder, output_dir: Path, write_rejects: bool = True
) -> TrainingData:
    """Read, encode, split and fit every example of a run; rejected records (with
    on_invalid=skip) go to one file, whatever stage rejected them (when `write_rejects`:
    under torchrun every rank prepares the same examples, and rank 0 writes).

    The conversations stream: every source is read once, one chunk at a time, into one
    ExampleTable (cached, and memory-mapped, under <cache_dir>/examples), and only the rows
    to train on are chosen after, so memory holds the table's small per-example columns,
    not the data. Held-out conversations are read again by index (a second pass)."""
    data = config.data
    sources = data.sources() if data.is_mix else [DataSource(path=data.train)]
    loaded, encoded, sizes, entry = _read_and_encode(config, sources, encoder)
    table = encoded.table
    for _, err, record in encoded.rejected:
        loaded.rejects.add(err.source, reject_reason(err), record)
    rejects_path = Path(data.rejects or output_dir / "rejects.jsonl")
    if data.on_invalid == "skip" and write_rejects:
        loaded.rejects.write_jsonl(rejects_path)
        loaded.rejects_path = rejects_path
    say(loaded.summary())
    if encoded.rejected and write_rejects:
        say(f"rejected by the chat template: {len(encoded.rejected)} (written to {rejects_path})")

    several, made, once, tokens = table.split_cost()
    if several:
        say(
            f"split by the chat template (it rewrites history, so each trained turn is "
            f"learned in the context inference gives it): {several} conversations into {made} "
            f"examples, {once} tokens into {tokens} ({tokens / once:.2f}x)"
        )
    held_out, held_rows, held_indices = _split(config, sources, table, entry)
    report = EncodingReport()
    views, shares = [], []
    first = 0
    for k, (source, size) in enumerate(zip(sources, sizes, strict=True)):
        mine = [i for i in range(first, first + size) if i not in held_indices]
        taken = take(mine, source, config.training.seed, k) if data.is_mix else mine
        first += size
        rows = table.rows_of(taken)
        fitted = fit_rows(table, rows, config.max_length, config.truncation, report)
        views.append(fitted)
        if data.is_mix:
            trained = int(table.trained_counts[fitted.rows].sum()) if len(fitted) else 0
            share = SourceShare(source_name(source), size, len(mine), len(taken), len(fitted))
            share.tokens, share.trained_tokens = int(fitted.cuts.sum()), trained
            shares.append(share)
    say(report.summary(config.max_length))
    if shares:
        say(mix_table(shares))
    examples = ExampleView.joined(views)
    if not len(examples):
        raise DataError(str(data.train), "no example is left to train on")
    if held_rows is None:  # a held-out file
        held_rows = encode_all(held_out, encoder, data.on_invalid, loaded.rejects)
        held_examples = fit_to_length(held_rows, config.max_length, "truncate", EncodingReport())
    else:
        held = fit_rows(table, held_rows, config.max_length, "truncate", EncodingReport())
        held_examples = list(held)
    kept = {e.source for e in held_examples}
    held_out = [c for c in held_out if str(c.source) in kept]
    return TrainingData(examples, report, loaded, held_out, held_examples, mix_report(shares))


def examples_cache(config: Config) -> Path | None:
    """Where encoded examples are cached (data.cache), under the run's cache_dir."""
    if not config.data.cache:
        return None
    from sftforge.models.source import default_cache_dir

    return Path(config.cache_dir or default_cache_dir()) / "examples"


def _read_and_encode(config: Config, sources: list[DataSource], encoder: Encoder):
    """(what reading found, the encoded table of every source's conversations in order, the
    number of valid conversations of each source, the cache entry or None): from the cache
    when these files were read and encoded so before, else streamed and (with data.cache)
    written there."""
    num_proc = config.data.num_proc or default_num_proc()
    cache_root = examples_cache(config)
    started = time.perf_counter()
    key = data_key(config, sources, encoder) if cache_root is not None else None
    entry = cached_entry(cache_root, key) if key else None
    if entry is not None:
        try:
            found = _read_entry(entry)
        except (OSError, ValueError, KeyError) as err:
            # Replaced or pruned by another process while being read, or damaged: encode.
            say(f"note: the cached examples in {entry} could not be read ({err}); encoding")
        else:
            took = time.perf_counter() - started
            say(f"encoded examples read from the cache {entry} ({took:.1f} s)")
            return (*found, entry)
    made = {}

    def encode_into(folder: Path | None) -> None:
        loaded = LoadResult()
        sizes: list[int] = []
        stream = _conversations(config, sources, loaded, sizes)
        encoded = encode_stream(stream, encoder, config.data.on_invalid, num_proc, folder)
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


def _conversations(config: Config, sources: list[DataSource], loaded: LoadResult, sizes: list):
    """Every source's valid conversations in order, counted into `loaded` and `sizes`."""
    repeats = RepeatCounter()
    for source in sources:
        before = loaded.valid
        yield from iter_conversations(
            source.path, loaded, repeats=repeats, **read_options(config, source)
        )
        sizes.append(loaded.valid - before)


def data_key(config: Config, sources: list[DataSource], encoder: Encoder) -> str:
    """A hash of everything a run's table depends on: each data file's path and bytes, how
    it is read (format, columns, on_invalid), the reading and encoding code, and the
    encoder (`code_and_encoder_digest`)."""
    digest = code_and_encoder_digest(encoder)
    for source in sources:
        digest.update(json.dumps(read_options(config, source), sort_keys=True).encode())
        for path in data_files(source.path):
            digest.update(str(path).encode() + b"\x00")
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:32]


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


def _read_entry(entry: Path):
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


def _split(config: Config, sources: list[DataSource], table: ExampleTable, entry: Path | None):
    """(held-out conversations, their examples' table rows (None for a held-out file), the
    indices of the conversations held out of training)."""
    spec, seed = config.eval.held_out, config.training.seed
    if spec is None:
        return [], None, set()
    if isinstance(spec, str):
        options = read_options(config, DataSource(path=spec))
        held = load_conversations(spec, **options).conversations
        say(f"held-out file {spec}: {len(held)} examples")
        return held, None, set()
    n = len(table.row_of)
    chosen = held_out_indices(n, spec, seed)
    say(f"held out {len(chosen)} of {n} examples (seed {seed})")
    held = _held_out_conversations(config, sources, chosen, entry)
    return held, table.rows_of(chosen), set(chosen)


def _held_out_conversations(config, sources, chosen: list[int], entry: Path | None):
    """The conversations at `chosen` (for generating answers): kept beside the cache entry
    once read, else read again up to the last one chosen (a second pass over the data)."""
    saved = (
        entry / f"held_out-{config.training.seed}-{config.eval.held_out}.jsonl" if entry else None
    )
    if saved is not None and saved.is_file():
        try:
            with open(saved, encoding="utf-8") as f:
                return [conversation_from_json(json.loads(line)) for line in f]
        except (OSError, ValueError, KeyError, TypeError) as err:
            say(f"note: {saved} could not be read ({err}); reading the data again")
    wanted, last = set(chosen), max(chosen)
    scratch = LoadResult()
    held = []
    for index, conversation in enumerate(_conversations(config, sources, scratch, [])):
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


def encode_all(
    conversations: list[Conversation],
    encoder: Encoder,
    on_invalid: str,
    rejects: Rejects,
    num_proc: int = 1,
) -> list[Example]:
    """The examples of `conversations` (in parallel with `num_proc` > 1); with
    on_invalid="skip" the rejected ones go to `rejects`."""
    encoded = encode_stream(conversations, encoder, on_invalid, num_proc)
    for _, err, record in encoded.rejected:
        # The reason without the location: the rejects file has its own source column.
        rejects.add(err.source, reject_reason(err), record)
    table = encoded.table
    return [table.example(row) for row in range(len(table))]


@dataclass
class SourceShare:
    """What one source gave the run."""

    name: str
    loaded: int  # conversations read
    training: int  # of those, not held out
    taken: int  # in the mix, after weight or count
    examples: int = 0  # trained on, after the max_length policy
    tokens: int = 0
    trained_tokens: int = 0


def source_name(source: DataSource) -> str:
    return ", ".join(source.path) if isinstance(source.path, list) else source.path


def take(conversations: list[Conversation], source: DataSource, seed: int, index: int):
    """The conversations the mix takes from one source (see the module's docstring)."""
    n = len(conversations)
    if source.count is not None:
        wanted = source.count
    elif source.weight is not None:
        wanted = round(source.weight * n)
    else:
        return list(conversations)
    if n == 0:
        return []
    copies, rest = divmod(wanted, n)
    drawn = sorted(random.Random(f"mix/{seed}/{index}").sample(range(n), rest))
    return list(conversations) * copies + [conversations[i] for i in drawn]


def mix_table(shares: list[SourceShare]) -> str:
    lines = ["mix: source  conversations read / training / taken  examples  tokens (trained)"]
    for s in shares:
        lines.append(
            f"  {s.name}  {s.loaded:,} / {s.training:,} / {s.taken:,}  {s.examples:,}  "
            f"{s.tokens:,} ({s.trained_tokens:,})"
        )
    return "\n".join(lines)


def mix_report(shares: list[SourceShare]) -> list[dict]:
    return [asdict(s) for s in shares]


def read_options(config: Config, source: DataSource) -> dict:
    data = config.data
    return {
        "format": source.format or data.format,
        "columns": (source.columns if source.columns is not None else data.columns) or None,
        "on_invalid": data.on_invalid,
    }

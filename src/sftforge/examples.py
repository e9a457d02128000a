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
same for c / size. Each source is encoded on its own, and the mix (conversations, examples
and tokens per source) is printed and kept in the run's data report.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Config, DataSource
from .data import (
    LoadResult,
    Rejects,
    count_duplicates,
    load_conversations,
    reject_reason,
    split_held_out,
)
from .encoding import EncodingReport, cached_encode_all, default_num_proc, fit_to_length
from .formats import Conversation, DataError
from .tokenize import Encoder, Example


@dataclass
class TrainingData:
    """A run's examples: what is trained on, what is held out, and how they were obtained."""

    examples: list[Example]  # what is trained on
    report: EncodingReport
    loaded: LoadResult
    held_out: list[Conversation] = field(default_factory=list)  # never trained on
    held_out_examples: list[Example] = field(default_factory=list)
    mix: list[dict] = field(default_factory=list)  # per source of a mix: what it gave


def load_examples(
    config: Config, encoder: Encoder, output_dir: Path, write_rejects: bool = True
) -> TrainingData:
    """Load, split, encode and fit every example of a run; rejected records (with
    on_invalid=skip) go to one file, whatever stage rejected them (when `write_rejects`:
    under torchrun every rank prepares the same examples, and rank 0 writes). A mix of
    sources (mix.py) is encoded source by source, each counted in the report."""
    rejects_path = Path(config.data.rejects or output_dir / "rejects.jsonl")
    loaded, parts, held_out, shares = _load_and_split(
        config, rejects_path if write_rejects else None
    )
    on_invalid = config.data.on_invalid
    rejected_before = len(loaded.rejects)
    num_proc = config.data.num_proc or default_num_proc()
    cache_root = examples_cache(config)
    report = EncodingReport()
    examples = []
    for k, part in enumerate(parts):
        encoded = encode_all(part, encoder, on_invalid, loaded.rejects, num_proc, cache_root)
        fitted = fit_to_length(encoded, config.max_length, config.truncation, report)
        examples += fitted
        if shares:
            shares[k].examples = len(fitted)
            shares[k].tokens = sum(len(e.input_ids) for e in fitted)
            shares[k].trained_tokens = sum(e.trained_token_count for e in fitted)
    held_encoded = encode_all(held_out, encoder, on_invalid, loaded.rejects, num_proc, cache_root)
    if len(loaded.rejects) > rejected_before and write_rejects:
        loaded.rejects.write_jsonl(rejects_path)
        print(
            f"rejected by the chat template: {len(loaded.rejects) - rejected_before} "
            f"(written to {rejects_path})"
        )
    print(report.summary(config.max_length))
    if shares:
        print(mix_table(shares))
    if not examples:
        raise DataError(str(config.data.train), "no example is left to train on")
    held_examples = fit_to_length(held_encoded, config.max_length, "truncate", EncodingReport())
    kept = {e.source for e in held_examples}
    held_out = [c for c in held_out if str(c.source) in kept]
    return TrainingData(examples, report, loaded, held_out, held_examples, mix_report(shares))


def examples_cache(config: Config) -> Path | None:
    """Where encoded examples are cached (data.cache), under the run's cache_dir."""
    if not config.data.cache:
        return None
    from sftforge.model import default_cache_dir

    return Path(config.cache_dir or default_cache_dir()) / "examples"


def encode_all(
    conversations: list[Conversation],
    encoder: Encoder,
    on_invalid: str,
    rejects: Rejects,
    num_proc: int = 1,
    cache_root: Path | None = None,
) -> list[Example]:
    """The examples of `conversations` (encoding.py: in parallel, and cached when
    `cache_root` is given); with on_invalid="skip" the rejected ones go to `rejects`."""
    examples, rejected = cached_encode_all(conversations, encoder, on_invalid, num_proc, cache_root)
    for index, err in rejected:
        conversation = conversations[index]
        # The reason without the location: the rejects file has its own source column.
        record = {"messages": [m.__dict__ for m in conversation.messages]}
        rejects.add(conversation.source, reject_reason(err), record)
    return [e for e in examples if e is not None]


def _load_and_split(config: Config, rejects_path: Path | None):
    """(all loaded, the training conversations in parts (one per source of a mix, else
    one), held-out conversations, the mix's shares), split before anything else."""
    data = config.data
    options = {
        "format": data.format,
        "columns": data.columns or None,
        "on_invalid": data.on_invalid,
    }
    written = rejects_path if data.on_invalid == "skip" else None
    if data.is_mix:
        by_source = [load_conversations(s.path, **read_options(config, s)) for s in data.sources()]
        loaded = _merged(by_source, written)
    else:
        loaded = load_conversations(data.train, rejects_path=written, **options)
        by_source = [loaded]
    print(loaded.summary())
    held_out_spec = config.eval.held_out
    train, held = loaded.conversations, []
    if isinstance(held_out_spec, str):
        held = load_conversations(held_out_spec, **options).conversations
        print(f"held-out file {held_out_spec}: {len(held)} examples")
    elif held_out_spec is not None:
        seed = config.training.seed
        train, held = split_held_out(loaded.conversations, held_out_spec, seed)
        print(f"held out {len(held)} of {len(loaded.conversations)} examples (seed {seed})")
    if not data.is_mix:
        return loaded, [train], held, []
    training = {id(c) for c in train}
    parts, shares = [], []
    for k, (source, part) in enumerate(zip(data.sources(), by_source, strict=True)):
        mine = [c for c in part.conversations if id(c) in training]
        parts.append(take(mine, source, config.training.seed, k))
        shares.append(
            SourceShare(source_name(source), len(part.conversations), len(mine), len(parts[-1]))
        )
    return loaded, parts, held, shares


def _merged(results: list[LoadResult], rejects_path: Path | None) -> LoadResult:
    """The LoadResults of a mix's sources as one (files, conversations, rejects, formats)."""
    merged = LoadResult(conversations=[], rejects=Rejects(), formats={}, duplicates=0)
    for result in results:
        merged.files += result.files
        merged.conversations += result.conversations
        merged.records += result.records
        merged.left_out.update(result.left_out)
        for reject in result.rejects:
            merged.rejects.add(reject.source, reject.reason, reject.record)
        for name, count in result.formats.items():
            merged.formats[name] = merged.formats.get(name, 0) + count
    merged.duplicates = count_duplicates(merged.conversations)
    if rejects_path is not None:
        merged.rejects.write_jsonl(rejects_path)
        merged.rejects_path = Path(rejects_path)
    return merged


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

"""Looking at data and cleaning it: `load_conversations`, `inspect`, `data_stats`, `dedup`,
`filter_data`, `convert_data`. Data is a file, a folder, a list of them, a datasets.Dataset
or records in memory (a list of dicts); every record that is not used is counted, never
dropped silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftforge.console import say, speaking
from sftforge.curate.dedup import DedupResult, DuplicateFinder, report_line
from sftforge.curate.filters import FilterResult, FilterRules, filter_to_files
from sftforge.curate.stats import (
    EXAMPLES_SHOWN,
    DataStats,
    collect_stats,
    format_stats,
    write_plots,
)
from sftforge.data.loading import LoadResult, Rejects, iter_conversations, load_conversations
from sftforge.data.writers import JsonlWriter, Written, write_conversations, write_records
from sftforge.encode.inspection import Inspection
from sftforge.encode.parallel import default_num_proc
from sftforge.encode.reference import compare, reference_for
from sftforge.encode.render import ReasoningMode, TrainOn
from sftforge.models.source import resolve_model_source
from sftforge.models.tokenizer import load_tokenizer, text_side

__all__ = ["load_conversations", "inspect", "data_stats", "dedup", "filter_data", "convert_data"]

Data = Any  # str | Path | list[str | Path] | datasets.Dataset | list[dict]
REJECTS_SHOWN = EXAMPLES_SHOWN  # rejected records named on screen; all are counted


def _encoder(model: str, template: str, train_on: TrainOn = "all_assistant_turns", **options):
    """The Encoder training would use with `model`'s tokenizer (a tokenizer-only folder will
    do) and `template`."""
    source = resolve_model_source(model)
    tokenizer = load_tokenizer(source.tokenizer)
    encoder, _ = text_side(tokenizer, template, train_on, model_type=source.model_type, **options)
    return encoder


def inspect(
    data: Data,
    model: str = "smollm2-135m",
    *,
    template: str = "auto",
    data_format: str = "auto",
    train_on: TrainOn = "all_assistant_turns",
    reasoning: ReasoningMode = "train",
    template_options: dict | None = None,
    reference: str | None = None,
    verbose: bool = False,
) -> Inspection:
    """Every conversation of `data` rendered and tokenized exactly as training would with
    `model`'s tokenizer, each mask proven: the examples (input_ids, labels), each one's
    trained text, the token view (`.text()`) and JSON lines (`.write_json()`). Raises the
    DataError of the first record that cannot be encoded. `reference`: a published Jinja
    template file, or a Mistral tokenizer file (mistral-common), to check each example
    against token for token (`.comparisons`; the text shows the first differing token)."""
    with speaking(verbose):
        encoder = _encoder(
            model, template, train_on, reasoning=reasoning, template_options=template_options
        )
        loaded = load_conversations(data, format=data_format, on_invalid="error")
        examples = [encoder.encode_examples(c) for c in loaded.conversations]
        comparisons = None
        if reference is not None:
            checked = reference_for(reference, encoder.tokenizer)
            comparisons = [
                [] if c.is_raw_text else compare(encoder, checked, c) for c in loaded.conversations
            ]
    return Inspection(encoder, loaded, examples, comparisons)


def data_stats(
    data: Data,
    model: str = "smollm2-135m",
    *,
    template: str = "auto",
    data_format: str = "auto",
    train_on: TrainOn = "all_assistant_turns",
    max_length: int = 1024,
    near: float = 0.85,
    num_perm: int = 128,
    exact_only: bool = False,
    num_proc: int | None = None,
    plots: str | Path | None = None,
    verbose: bool = False,
) -> DataStats:
    """What is in `data` before a GPU-hour is spent on it: counts, lengths in `model`'s
    tokens, what the template trains, duplicates, findings (very short, refusing or echoing
    answers), rejected records; `plots`: a folder for the charts. Streamed: memory holds a
    few chunks of records, counters and the duplicate index, not the data."""
    with speaking(verbose):
        encoder = _encoder(model, template, train_on)
        loaded = LoadResult(rejects=Rejects(held=REJECTS_SHOWN))
        conversations = iter_conversations(
            data, loaded, format=data_format, on_invalid="skip", count_repeats=False
        )
        finder = DuplicateFinder(threshold=near, num_perm=num_perm, near=not exact_only)
        processes = num_proc or default_num_proc()
        stats = collect_stats(conversations, encoder, max_length, processes, finder)
        stats.template, stats.rejected = encoder.template.name, len(loaded.rejects)
        for reject in loaded.rejects:
            say(f"rejected: {reject.source}: {reject.reason}")
        say(f"template: {encoder.template.name}")
        say(format_stats(stats, rejected=len(loaded.rejects)))
        if plots:
            stats.charts = write_plots(stats, Path(plots))
            for written in stats.charts:
                say(f"chart: {written}")
    return stats


def dedup(
    data: Data,
    output: str | Path,
    *,
    report: str | Path | None = None,
    data_format: str = "auto",
    threshold: float = 0.85,
    num_perm: int = 128,
    exact_only: bool = False,
    verbose: bool = False,
) -> DedupResult:
    """Write the records of `data` that repeat no earlier one (exactly, or nearly: MinHash
    Jaccard >= `threshold`) to `output`, each as the input had it; each dropped record and
    the kept one it repeats go to `report` (default OUTPUT.duplicates.jsonl), in input order.
    Streamed: memory holds the duplicate index, not the records."""
    loaded = LoadResult()
    conversations = iter_conversations(
        data, loaded, format=data_format, keep_records=True, count_repeats=False
    )
    report = Path(report or f"{output}.duplicates.jsonl")
    with JsonlWriter(report) as report_out:
        finder = DuplicateFinder(
            threshold=threshold,
            num_perm=num_perm,
            near=not exact_only,
            on_duplicate=lambda duplicate, kept: report_out.write(report_line(duplicate, kept)),
        )
        # Each record is written as soon as it is known to be kept.
        write_conversations(output, (c for c in conversations if finder.keeps(c)))
    found = finder.result([])
    with speaking(verbose):
        say(found.summary())
        say(f"kept records: {output}; each dropped one, with the one it repeats: {report}")
    return found


def filter_data(
    data: Data,
    output: str | Path,
    rules: FilterRules,
    *,
    rejected: str | Path | None = None,
    model: str | None = None,
    data_format: str = "auto",
    verbose: bool = False,
) -> FilterResult:
    """Write the records of `data` that pass `rules` to `output` and the others, each with
    its reason, to `rejected` (default OUTPUT.rejected.jsonl). Token limits count `model`'s
    tokens (words without a model). Streamed: the result has the counts, the files the
    records."""
    token_count = None  # without a model, lengths are counted in words
    if model is not None and (rules.min_tokens or rules.max_tokens):
        tokenizer = load_tokenizer(resolve_model_source(model).tokenizer)
        token_count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    loaded = LoadResult()
    conversations = iter_conversations(
        data, loaded, format=data_format, keep_records=True, count_repeats=False
    )
    rejected = Path(rejected or f"{output}.rejected.jsonl")
    result = filter_to_files(conversations, rules, output, rejected, token_count)
    with speaking(verbose):
        say(result.summary())
        say(f"kept records: {output}; rejected ones, each with its reason: {rejected}")
    return result


def convert_data(
    data: Data,
    output: str | Path,
    to: str,
    *,
    data_format: str = "auto",
    on_invalid: str = "error",
    rejected: str | Path | None = None,
    verbose: bool = False,
) -> tuple[LoadResult, Written]:
    """Write the conversations of `data` to `output` in the format `to` (writers.WRITERS),
    streamed; every record not written (unreadable, with on_invalid="skip", or one the format
    cannot hold) goes with its reason to `rejected` (default OUTPUT.rejected.jsonl). Returns
    what was read (the counts and the first rejects) and what was written (with the first
    records the format refused)."""
    rejected = Path(rejected or f"{output}.rejected.jsonl")
    with JsonlWriter(rejected) as rejected_out:
        loaded = LoadResult(rejects=Rejects(sink=rejected_out, held=REJECTS_SHOWN))
        conversations = iter_conversations(
            data, loaded, format=data_format, on_invalid=on_invalid, count_repeats=False
        )
        refused = Rejects(sink=rejected_out, held=0)
        written = write_records(conversations, to, Path(output), rejects=refused)
    with speaking(verbose):
        say(f"{written.count:,} records written to {written.path} as {to}")
        for source, reason in written.refused:
            say(f"not written: {source}: {reason}")
        if written.refused_count > len(written.refused):
            say(f"... {written.refused_count - len(written.refused):,} more not written")
        if loaded.rejects:
            say(loaded.summary())
        if written.refused_count or loaded.rejects:
            say(f"each record not written, with its reason: {rejected}")
    return loaded, written

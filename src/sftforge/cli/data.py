"""`sftforge data stats | dedup | filter | convert`: see, clean and convert demonstrations
before training on them. The work is done in stats.py, dedup.py, filters.py and writers.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from sftforge.data.formats import DataFormat
from sftforge.encode.render import TrainOn


def _stats(args) -> None:
    from sftforge.curate.dedup import DuplicateFinder
    from sftforge.curate.stats import add_duplicates, collect_stats, format_stats, write_plots
    from sftforge.data.loading import LoadResult, Rejects, iter_conversations
    from sftforge.encode.parallel import default_num_proc
    from sftforge.models.source import resolve_model_source
    from sftforge.models.tokenizer import load_tokenizer, text_side

    source = resolve_model_source(args.model)  # a tokenizer-only folder will do
    tokenizer = load_tokenizer(source.tokenizer)
    encoder, _ = text_side(tokenizer, args.template, args.train_on, model_type=source.model_type)
    loaded = LoadResult(conversations=[], rejects=Rejects(), formats={}, duplicates=0)
    conversations = iter_conversations(args.files, loaded, format=args.format, on_invalid="skip")
    finder = DuplicateFinder(threshold=args.near, num_perm=args.num_perm, near=not args.exact_only)
    num_proc = args.num_proc or default_num_proc()
    stats = collect_stats(conversations, encoder, args.max_length, num_proc, finder.keeps)
    add_duplicates(stats, finder.result([]))
    for reject in list(loaded.rejects)[:5]:
        print(f"rejected: {reject.source}: {reject.reason}")
    print(f"template: {encoder.template.name}")
    print(format_stats(stats, rejected=len(loaded.rejects)))
    if args.plots:
        for written in write_plots(stats, Path(args.plots)):
            print(f"chart: {written}")


def _convert(args) -> None:
    from sftforge.data.loading import load_conversations
    from sftforge.data.writers import write_records

    loaded = load_conversations(args.files, format=args.format, on_invalid=args.on_invalid)
    written = write_records(loaded.conversations, args.to, Path(args.output))
    print(f"{written.count:,} records written to {written.path} as {args.to}")
    for source, reason in written.refused:
        print(f"not written: {source}: {reason}")
    if loaded.rejects:
        print(loaded.summary())
    if written.refused or loaded.rejects:
        raise SystemExit(1)


def _dedup(args) -> None:
    from sftforge.curate.dedup import DuplicateFinder, write_dedup_report
    from sftforge.data.loading import LoadResult, Rejects, iter_conversations
    from sftforge.data.writers import write_conversations

    loaded = LoadResult(conversations=[], rejects=Rejects(), formats={}, duplicates=0)
    # Each kept record is written as the input had it, every field kept (writers.py).
    conversations = iter_conversations(args.files, loaded, format=args.format, keep_records=True)
    near = not args.exact_only
    finder = DuplicateFinder(threshold=args.threshold, num_perm=args.num_perm, near=near)
    # Streamed: each record is written as soon as it is known to be kept.
    write_conversations(args.output, (c for c in conversations if finder.keeps(c)))
    found = finder.result([])
    report = Path(args.report or f"{args.output}.duplicates.jsonl")
    write_dedup_report(found, report)
    print(found.summary())
    print(f"kept records: {args.output}; each dropped one, with the one it repeats: {report}")


def _filter(args) -> None:
    from sftforge.curate.filters import FilterRules, filter_conversations, write_filter
    from sftforge.data.loading import load_conversations

    # Each kept (and rejected) record is written as the input had it, every field kept.
    loaded = load_conversations(args.files, format=args.format, keep_records=True)
    rules = FilterRules(
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        prompt_blocklist=args.prompt_blocklist,
        response_blocklist=args.response_blocklist,
        min_response_chars=args.min_response_chars,
        predicate=args.predicate,
    )
    token_count = None
    if args.model and (args.min_tokens or args.max_tokens):
        from sftforge.models.source import resolve_model_source
        from sftforge.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_model_source(args.model).tokenizer)
        token_count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    result = filter_conversations(loaded.conversations, rules, token_count)
    rejected = Path(args.rejected or f"{args.output}.rejected.jsonl")
    write_filter(result, args.output, rejected)
    print(result.summary())
    print(f"kept records: {args.output}; rejected ones, each with its reason: {rejected}")


EXACT_ONLY = (
    "exact duplicates only: no near-duplicate index (about 0.2 KB a record instead of 5 KB; "
    "for millions of records)"
)


def add_data_commands(sub, common: argparse.ArgumentParser) -> None:
    """The `data` command and its subcommands, on the main parser's subparsers `sub`."""
    from sftforge.data.writers import WRITERS

    data = sub.add_parser("data", help="see, clean and convert demonstrations")
    commands = data.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser(
        "stats", parents=[common], help="formats, token lengths, duplicates, suspect records"
    )
    p.add_argument("files", nargs="+", help="data files or folders")
    p.add_argument("--model", default="smollm2-135m", help="model whose tokenizer to count with")
    p.add_argument("--template", default="auto")
    p.add_argument("--train-on", default="all_assistant_turns", choices=get_args(TrainOn))
    p.add_argument("--format", default="auto", choices=get_args(DataFormat))
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--plots", help="folder for SVG histograms of the token lengths")
    p.add_argument(
        "--near", type=float, default=0.85, help="near duplicates: MinHash Jaccard at least this"
    )
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--exact-only", action="store_true", help=EXACT_ONLY)
    p.add_argument("--num-proc", type=int, help="processes that encode (default: every core)")
    p.set_defaults(run=_stats)

    p = commands.add_parser(
        "dedup", parents=[common], help="drop exact and near duplicates (MinHash LSH)"
    )
    p.add_argument("files", nargs="+", help="data files or folders")
    p.add_argument("-o", "--output", required=True, help="the JSONL file of kept records")
    p.add_argument("--report", help="one line per dropped record; default OUTPUT.duplicates.jsonl")
    p.add_argument("--threshold", type=float, default=0.85, help="near: MinHash Jaccard >= this")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--exact-only", action="store_true", help=EXACT_ONLY)
    p.add_argument("--format", default="auto", choices=get_args(DataFormat))
    p.set_defaults(run=_dedup)

    p = commands.add_parser(
        "filter", parents=[common], help="drop records by length, blocklist or predicate"
    )
    p.add_argument("files", nargs="+", help="data files or folders")
    p.add_argument("-o", "--output", required=True, help="the JSONL file of kept records")
    p.add_argument(
        "--rejected", help="rejected records with reasons; default OUTPUT.rejected.jsonl"
    )
    p.add_argument("--min-tokens", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--model", default="smollm2-135m", help="tokenizer that counts the tokens")
    p.add_argument("--prompt-blocklist", action="append", default=[], metavar="REGEX")
    p.add_argument("--response-blocklist", action="append", default=[], metavar="REGEX")
    p.add_argument("--min-response-chars", type=int)
    p.add_argument("--predicate", help="package.module:function; True keeps a record")
    p.add_argument("--format", default="auto", choices=get_args(DataFormat))
    p.set_defaults(run=_filter)

    p = commands.add_parser(
        "convert", parents=[common], help="rewrite records in another format (JSONL)"
    )
    p.add_argument("files", nargs="+", help="data files or folders")
    p.add_argument("--to", required=True, choices=list(WRITERS))
    p.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    p.add_argument("--format", default="auto", choices=get_args(DataFormat))
    p.add_argument("--on-invalid", default="error", choices=("error", "skip"))
    p.set_defaults(run=_convert)

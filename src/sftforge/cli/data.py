"""`sftforge data stats | dedup | filter | convert`: see, clean and convert demonstrations
before training on them, through the API's data functions (api/curating.py)."""

from __future__ import annotations

import argparse
from typing import get_args

import sftforge as api
from sftforge.data.formats import DataFormat
from sftforge.data.writers import WRITERS
from sftforge.encode.render import TrainOn


def _stats(args) -> None:
    api.data_stats(
        args.files,
        args.model,
        template=args.template,
        data_format=args.format,
        train_on=args.train_on,
        max_length=args.max_length,
        near=args.near,
        num_perm=args.num_perm,
        exact_only=args.exact_only,
        num_proc=args.num_proc,
        plots=args.plots,
        verbose=True,
    )


def _convert(args) -> None:
    loaded, written = api.convert_data(
        args.files,
        args.output,
        args.to,
        data_format=args.format,
        on_invalid=args.on_invalid,
        rejected=args.rejected,
        verbose=True,
    )
    if written.refused_count or loaded.rejects:
        raise SystemExit(1)


def _dedup(args) -> None:
    api.dedup(
        args.files,
        args.output,
        report=args.report,
        data_format=args.format,
        threshold=args.threshold,
        num_perm=args.num_perm,
        exact_only=args.exact_only,
        verbose=True,
    )


def _filter(args) -> None:
    rules = api.FilterRules(
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        prompt_blocklist=args.prompt_blocklist,
        response_blocklist=args.response_blocklist,
        min_response_chars=args.min_response_chars,
        predicate=args.predicate,
    )
    api.filter_data(
        args.files,
        args.output,
        rules,
        rejected=args.rejected,
        model=args.model,
        data_format=args.format,
        verbose=True,
    )


EXACT_ONLY = (
    "exact duplicates only: no near-duplicate index (about 0.2 KB a record instead of 5 KB; "
    "for millions of records)"
)


def add_data_commands(sub, common: argparse.ArgumentParser) -> None:
    """The `data` command and its subcommands, on the main parser's subparsers `sub`."""
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
    p.add_argument(
        "--rejected", help="records not written, with reasons; default OUTPUT.rejected.jsonl"
    )
    p.set_defaults(run=_convert)

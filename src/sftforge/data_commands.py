"""`sftforge data stats | convert`: see and convert demonstrations before training on them."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import DataFormat, TrainOn, choices


def _stats(args) -> None:
    from .data import load_conversations
    from .model import load_tokenizer, resolve_model_path
    from .prepare import text_side
    from .stats import collect_stats, format_stats, write_plots

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    encoder, _ = text_side(tokenizer, args.template, args.train_on)
    loaded = load_conversations(args.files, format=args.format, on_invalid="skip")
    for reject in list(loaded.rejects)[:5]:
        print(f"rejected: {reject.source}: {reject.reason}")
    stats = collect_stats(loaded.conversations, encoder, args.max_length)
    print(f"template: {encoder.template.name}")
    print(format_stats(stats, rejected=len(loaded.rejects)))
    if args.plots:
        for written in write_plots(stats, Path(args.plots)):
            print(f"chart: {written}")


def _convert(args) -> None:
    from .data import load_conversations
    from .writers import write_records

    loaded = load_conversations(args.files, format=args.format, on_invalid=args.on_invalid)
    written = write_records(loaded.conversations, args.to, Path(args.output))
    print(f"{written.count:,} records written to {written.path} as {args.to}")
    for source, reason in written.refused:
        print(f"not written: {source}: {reason}")
    if loaded.rejects:
        print(loaded.summary())
    if written.refused or loaded.rejects:
        raise SystemExit(1)


def add_data_commands(sub, common: argparse.ArgumentParser) -> None:
    """The `data` command and its subcommands, on the main parser's subparsers `sub`."""
    from .writers import WRITERS

    data = sub.add_parser("data", help="see, clean and convert demonstrations")
    commands = data.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser(
        "stats", parents=[common], help="formats, token lengths, duplicates, suspect records"
    )
    p.add_argument("files", nargs="+", help="data files or folders")
    p.add_argument("--model", default="smollm2-135m", help="model whose tokenizer to count with")
    p.add_argument("--template", default="auto")
    p.add_argument("--train-on", default="all_assistant_turns", choices=choices(TrainOn))
    p.add_argument("--format", default="auto", choices=choices(DataFormat))
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--plots", help="folder for SVG histograms of the token lengths")
    p.set_defaults(run=_stats)

    p = commands.add_parser(
        "convert", parents=[common], help="rewrite records in another format (JSONL)"
    )
    p.add_argument("files", nargs="+", help="data files or folders")
    p.add_argument("--to", required=True, choices=list(WRITERS))
    p.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    p.add_argument("--format", default="auto", choices=choices(DataFormat))
    p.add_argument("--on-invalid", default="error", choices=("error", "skip"))
    p.set_defaults(run=_convert)

"""`sftforge train | inspect | merge | demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .conversation import DataError
from .templates import TemplateError


def _train(args) -> None:
    from .train import train

    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)  # `sftforge train key=value` without a file
        args.config = None
    fields = {}
    if args.model:
        fields["model"] = args.model
    if args.data:
        fields["data"] = {"train": args.data}
    if args.output:
        fields["output_dir"] = args.output
    if args.method:
        fields["method"] = args.method
    config = load_config(args.config, args.overrides, **fields)
    train(config)


def _inspect(args) -> None:
    from .data import load_conversations
    from .model import add_missing_special_tokens, load_tokenizer, resolve_model_path
    from .show import example_counts, format_example
    from .templates import resolve_template
    from .tokenize import Encoder, EncodingReport, fit_to_length

    tokenizer = load_tokenizer(resolve_model_path(args.model))
    template = resolve_template(args.template, tokenizer)
    add_missing_special_tokens(tokenizer, None, template.extra_tokens)
    loaded = load_conversations(args.data, format=args.format, on_invalid="error")
    encoder = Encoder(tokenizer, template, args.train_on)
    color = sys.stdout.isatty() and not args.plain
    report = EncodingReport()
    print(f"template: {template.name}; trained tokens shown {'in green' if color else 'in [[ ]]'}")
    for conv in loaded.conversations[: args.n]:
        example = encoder.encode(conv)
        print(f"\n--- {conv.source}  ({example_counts(example)})")
        print(format_example(tokenizer, example, color))
        if len(example.input_ids) > args.max_length:
            policy = "truncated" if args.truncation == "truncate" else "dropped"
            print(f"(longer than max_length {args.max_length}: would be {policy})")
    examples = [encoder.encode(c) for c in loaded.conversations]
    fit_to_length(examples, args.max_length, args.truncation, report)
    print("\n" + loaded.summary())
    print(report.summary(args.max_length))


def _merge(args) -> None:
    from .export import merge_adapter

    merge_adapter(Path(args.adapter), Path(args.output))
    print(f"merged model written to {args.output}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.output), args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model on demonstrations")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")
    p.add_argument("--model", help="embedded name, HF directory, hub id or .gguf file")
    p.add_argument("--data", help="data file or folder")
    p.add_argument("--output", help="output directory")
    p.add_argument("--method", choices=["full", "lora"])
    p.set_defaults(run=_train)

    p = sub.add_parser("inspect", help="show rendered examples token by token with the mask")
    p.add_argument("data", help="data file or folder")
    p.add_argument("--model", default="smollm2-135m", help="model whose tokenizer to use")
    p.add_argument("--template", default="auto")
    p.add_argument("--format", default="auto")
    p.add_argument(
        "--train-on",
        default="all_assistant_turns",
        choices=["all_assistant_turns", "last_assistant_turn", "all_tokens"],
    )
    p.add_argument("-n", type=int, default=3, help="examples to show")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--truncation", default="drop", choices=["drop", "truncate"])
    p.add_argument("--plain", action="store_true", help="no colour, even on a terminal")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    p.add_argument("adapter", help="directory written by a LoRA training run")
    p.add_argument("output", help="where to write the merged model")
    p.set_defaults(run=_merge)

    p = sub.add_parser("demo", help="fine-tune the embedded model on the bundled task")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, DataError, TemplateError, FileNotFoundError) as e:
        print(f"sftforge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`sftforge train | inspect | eval | compare | chat | sweep | merge | convert | export | data |
demo`."""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import get_args

import sftforge as api
from sftforge.cli.data import add_data_commands
from sftforge.config.loading import parse_option
from sftforge.data.formats import DataFormat
from sftforge.encode.parallel import Truncation
from sftforge.encode.render import ReasoningMode, TrainOn
from sftforge.errors import RunFailed, RunInterrupted
from sftforge.evaluation.scoring import ScorerKind
from sftforge.export.gguf_file import QUANT_TYPES
from sftforge.models.loading import Method


def _train(args) -> None:
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)  # `sftforge train key=value` without a file
        args.config = None
    fields = {"model": args.model, "output_dir": args.output, "method": args.method}
    fields = {key: value for key, value in fields.items() if value}
    api.train(args.config, args.overrides, data=args.data, verbose=True, **fields)


def _inspect(args) -> None:
    # --json: stdout holds the examples' lines alone; what is said about them goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        inspected = api.inspect(
            args.data,
            args.model,
            template=args.template,
            data_format=args.format,
            train_on=args.train_on,
            reasoning=args.reasoning,
            template_options=dict(
                parse_option(o, "--template-option") for o in args.template_option
            ),
            reference=args.reference,
            verbose=True,
        )
    if args.json:
        inspected.write_json(sys.stdout, args.n)
        return
    color = sys.stdout.isatty() and not args.plain
    n = args.n if args.n is not None else 3
    print(inspected.text(n, color, args.max_length, args.truncation))


def _merge(args) -> None:
    api.merge(args.adapter, args.output, allow_pickle=args.allow_pickle, verbose=True)


def _convert(args) -> None:
    api.convert(args.checkpoint, args.output, verbose=True)


def _export(args) -> None:
    api.export(
        args.source,
        to=args.to,
        quant=args.quant,
        output=args.output,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        prompts=args.prompts,
        allow_pickle=args.allow_pickle,
        verbose=True,
    )


def _scorer(args) -> dict | None:
    """The scorer spec the options describe (checked by make_scorer)."""
    if not args.scorer:
        return None
    spec = {"kind": args.scorer}
    if args.fields:
        spec["fields"] = [f.strip() for f in args.fields.split(",")]
    if args.pattern:
        spec["pattern"] = args.pattern
    if args.function:
        spec["function"] = args.function
    return spec


def _generation_options(args) -> dict:
    return {
        "scorer": _scorer(args),
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "device": args.device,
        "output": args.output,
        "allow_pickle": args.allow_pickle,
        "verbose": True,
    }


def _eval(args) -> None:
    api.evaluate(args.model, args.data, **_generation_options(args))


def _compare(args) -> None:
    api.compare(args.base, args.tuned, args.data, show=args.show, **_generation_options(args))


def _chat(args) -> None:
    model = api.load_model(
        args.model,
        template=args.template,
        device=args.device,
        allow_pickle=args.allow_pickle,
        verbose=True,
    )
    tools = args.tools or ()
    api.chat(model, system=args.system, tools=tools, max_new_tokens=args.max_new_tokens)


def _sweep(args) -> None:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    api.sweep(config, overrides, args.steps, verbose=True)


def _demo(args) -> None:
    api.demo(args.task, args.output, args.overrides, verbose=True)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load .bin/.pt (pickle) weights; unpickling can run code hidden in the file",
    )
    parser = argparse.ArgumentParser(prog="sftforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", parents=[common], help="fine-tune a model on demonstrations")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")
    p.add_argument("--model", help="embedded name, model or run folder, hub id or .gguf file")
    p.add_argument("--data", help="data file or folder")
    p.add_argument("--output", help="output directory")
    p.add_argument("--method", choices=get_args(Method))
    p.set_defaults(run=_train)

    p = sub.add_parser(
        "inspect", parents=[common], help="show rendered examples token by token with the mask"
    )
    p.add_argument("data", help="data file or folder")
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="model, run or tokenizer-only folder, embedded name, .gguf file or hub id",
    )
    p.add_argument("--template", default="auto")
    p.add_argument("--format", default="auto", choices=get_args(DataFormat))
    p.add_argument("--train-on", default="all_assistant_turns", choices=get_args(TrainOn))
    p.add_argument("--reasoning", default="train", choices=get_args(ReasoningMode))
    p.add_argument(
        "--template-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a chat template variable, e.g. enable_thinking=false (value read as YAML)",
    )
    p.add_argument(
        "-n", type=int, default=None, help="conversations to show (3), or examples to write (all)"
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--truncation", default="drop", choices=get_args(Truncation))
    p.add_argument(
        "--reference",
        metavar="FILE",
        help="check every example token for token against the family's reference: its "
        "published Jinja template (.jinja), or a Mistral tokenizer file (tekken.json, "
        "tokenizer.model.vN) for mistral-common; shows the first token that differs",
    )
    p.add_argument("--plain", action="store_true", help="no colour, even on a terminal")
    p.add_argument(
        "--json",
        action="store_true",
        help='one line per training example: {"source", "input_ids", "labels"} (-100: not '
        "trained), every example unless -n is given",
    )
    p.set_defaults(run=_inspect)

    p = sub.add_parser(
        "merge", parents=[common, loading], help="fold a LoRA adapter into its base model"
    )
    p.add_argument("adapter", help="directory written by a LoRA training run")
    p.add_argument("output", help="where to write the merged model")
    p.set_defaults(run=_merge)

    p = sub.add_parser(
        "convert",
        parents=[common],
        help="make a plain model or adapter of a checkpoint (also FSDP's sharded ones)",
    )
    p.add_argument("checkpoint", help="a checkpoints/step-NNNNNN folder")
    p.add_argument("output", help="where to write the model or adapter")
    p.set_defaults(run=_convert)

    p = sub.add_parser(
        "export",
        parents=[common, loading],
        help="write a run as a GGUF file for llama.cpp / Ollama, with an Ollama Modelfile",
    )
    p.add_argument(
        "source", metavar="RUN", help="a run's output folder or a checkpoints/step-NNNNNN folder"
    )
    p.add_argument("--to", default="gguf", choices=["gguf"])
    p.add_argument(
        "--quant",
        default="q8_0",
        choices=QUANT_TYPES,
        help="f16, bf16, q8_0 (written here); k-quants through llama.cpp's own quantizer",
    )
    p.add_argument("--output", help="the .gguf file (default RUN/model-QUANT.gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--prompts", help="a data file whose prompts the export is checked on too")
    p.add_argument(
        "--no-verify", action="store_true", help="skip reading the file back to check it"
    )
    p.set_defaults(run=_export)

    def add_generation_options(p, default_output: str) -> None:
        p.add_argument("--data", required=True, help="held-out file: prompt + reference answer")
        p.add_argument("--scorer", choices=get_args(ScorerKind))
        p.add_argument("--fields", help="json scorer: comma-separated fields that must match")
        p.add_argument("--pattern", help="regex scorer: pattern (default: the reference)")
        p.add_argument("--function", help="python scorer: module:function")
        p.add_argument("--output", default=default_output, help="per-example results (JSONL)")
        p.add_argument("--limit", type=int, default=None, help="first N examples only")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--template", default="auto")
        p.add_argument("--device", default="auto")

    p = sub.add_parser(
        "eval",
        parents=[common, loading],
        help="generate answers for held-out prompts and score them",
    )
    p.add_argument("model", help="run dir (adapter or model), model dir, embedded name or .gguf")
    add_generation_options(p, "eval_results.jsonl")
    p.set_defaults(run=_eval)

    p = sub.add_parser(
        "compare", parents=[common, loading], help="base and fine-tuned answers side by side"
    )
    p.add_argument("base")
    p.add_argument("tuned")
    add_generation_options(p, "compare.jsonl")
    p.add_argument("--show", type=int, default=5, help="examples to print")
    p.set_defaults(run=_compare)

    p = sub.add_parser(
        "chat", parents=[common, loading], help="chat with a model (interactive, or lines piped in)"
    )
    p.add_argument("model")
    p.add_argument("--system", help="system message")
    p.add_argument("--tools", help="JSON file: a list of function definitions to offer")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--template", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_chat)

    p = sub.add_parser(
        "sweep", parents=[common], help="short runs over values of one key, compared"
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="one key=v1,v2,... plus fixed overrides")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.set_defaults(run=_sweep)

    add_data_commands(sub, common)

    p = sub.add_parser(
        "demo", parents=[common], help="fine-tune the embedded model on the bundled task"
    )
    p.add_argument("--output", default=None, help="default: runs/demo, runs/demo-tools")
    p.add_argument("--task", default="extraction", choices=("extraction", "tools"))
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    p.set_defaults(run=_demo)
    return parser


# Exit codes: 2 for bad input (config, data, template, files), 1 for a run that failed,
# 128 + the signal number for a run stopped by SIGINT/SIGTERM after saving a checkpoint.
INPUT_ERROR, RUN_FAILED = 2, 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Exception as error:  # noqa: BLE001 - every failure becomes one paragraph and a code
        if args.debug:
            raise
        message, code = explain(error)
        print(f"sftforge: {_rank_prefix()}{message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("sftforge: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def _rank_prefix() -> str:
    """Which process failed, in a run of many (torchrun sets RANK and WORLD_SIZE)."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return ""
    return f"[rank {os.environ.get('RANK', '?')}] "


def explain(error: Exception) -> tuple[str, int]:
    """One paragraph (what, where, what to do) and the exit code for a failure."""
    if isinstance(error, RunInterrupted):
        return str(error), 128 + error.signal_number
    if isinstance(error, RunFailed):
        return f"error: {error}", RUN_FAILED
    # Our InputErrors, and a ValueError or missing file a library raised over the input.
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return f"error: {error}", INPUT_ERROR
    if isinstance(error, pickle.UnpicklingError):
        return (
            f"error: a pickle weights file was refused by torch's restricted unpickler ({error}); "
            "it holds more than tensors. Do not load it; ask for safetensors weights",
            INPUT_ERROR,
        )
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return (
            f"error: out of memory ({error}). Lower training.batch_size, set "
            "training.micro_batch_tokens, or turn on training.gradient_checkpointing; a run "
            "that wrote checkpoints goes on from the last one with resume=auto",
            RUN_FAILED,
        )
    if isinstance(error, OSError):
        return (
            f"error: {error}. If the disk is full, free space and go on with resume=auto",
            RUN_FAILED,
        )
    return (
        f"internal error: {type(error).__name__}: {error}. This is a bug in sftforge or an "
        "input it does not foresee; run the same command with --debug for the traceback and "
        "report it",
        RUN_FAILED,
    )


if __name__ == "__main__":
    sys.exit(main())

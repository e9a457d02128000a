"""`sftforge train | inspect | eval | compare | chat | sweep | merge | convert | data | demo`."""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import get_args

from sftforge.cli.data import add_data_commands
from sftforge.config.loading import load_config, parse_option
from sftforge.data.formats import DataFormat
from sftforge.encode.parallel import Truncation
from sftforge.encode.render import ReasoningMode, TrainOn
from sftforge.evaluation.scoring import ScorerKind
from sftforge.models.loading import Method


def _train(args) -> None:
    from sftforge.training.loop import train

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
    from sftforge.encode.inspection import inspect_data

    # --json: stdout holds the examples' lines alone; what is said about them goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        inspected = inspect_data(
            args.data,
            model=args.model,
            template=args.template,
            data_format=args.format,
            train_on=args.train_on,
            reasoning=args.reasoning,
            template_options=dict(
                parse_option(o, "--template-option") for o in args.template_option
            ),
        )
    if args.json:
        inspected.write_json(sys.stdout, args.n)
        return
    color = sys.stdout.isatty() and not args.plain
    inspected.show(args.n if args.n is not None else 3, color, args.max_length, args.truncation)


def _merge(args) -> None:
    from sftforge.models.trained import merge_adapter

    adapter = Path(args.adapter)
    base = merge_adapter(adapter, Path(args.output), allow_pickle=args.allow_pickle)
    print(f"merged model written to {args.output}: the adapter folded into {base}")
    run_config = adapter / "sftforge.yaml"
    if run_config.is_file() and "method: qlora" in run_config.read_text():
        print(
            "(a qlora run: its adapter was trained on a 4-bit copy of that base, and is "
            "merged into the full-precision base itself, not into the 4-bit copy)"
        )


def _convert(args) -> None:
    from sftforge.training.output import convert_checkpoint

    output = convert_checkpoint(Path(args.checkpoint), Path(args.output))
    print(f"plain model written to {output} from {args.checkpoint}")


def _scorer_from(args):
    from sftforge.evaluation.scoring import make_scorer

    if not args.scorer:
        return None
    spec = {"kind": args.scorer}
    if args.fields:
        spec["fields"] = [f.strip() for f in args.fields.split(",")]
    if args.pattern:
        spec["pattern"] = args.pattern
    if args.function:
        spec["function"] = args.function
    return make_scorer(spec)


def _answers(model_spec: str, template, args, scorer):
    """(results, the encoder used) for `model_spec`'s answers to the prompts of args.data,
    rendered with `template` (a choice, or another model's ChatTemplate)."""
    from sftforge.data.loading import load_conversations
    from sftforge.evaluation.generation import answer_and_score
    from sftforge.models.devices import pick_device
    from sftforge.models.tokenizer import text_side
    from sftforge.models.trained import load_for_inference

    model, tokenizer = load_for_inference(model_spec, allow_pickle=args.allow_pickle)
    encoder, _ = text_side(tokenizer, template, model=model)
    model.to(pick_device(args.device))
    conversations = load_conversations(args.data).conversations[: args.limit]
    results = answer_and_score(model, encoder, conversations, scorer, args.max_new_tokens)
    return results, encoder


def _write_jsonl(path: str, rows: list[dict]) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _eval(args) -> None:
    from sftforge.evaluation.generation import mean_score

    results, _ = _answers(args.model, args.template, args, _scorer_from(args))
    _write_jsonl(args.output, results)
    score = mean_score(results)
    print(f"{len(results)} answers written to {args.output}")
    if score is not None:
        correct = sum(1 for r in results if r["score"] == 1.0)
        print(f"{args.scorer}: mean score {score:.1%} ({correct}/{len(results)} fully correct)")


def _compare(args) -> None:
    from sftforge.evaluation.generation import mean_score

    scorer = _scorer_from(args)
    tuned, tuned_encoder = _answers(args.tuned, args.template, args, scorer)
    # A fair comparison renders both alike: by default with the tuned model's own template.
    template = tuned_encoder.template if args.template == "auto" else args.template
    base, _ = _answers(args.base, template, args, scorer)
    which = f"the tuned model's own template (from {args.tuned})"
    print(f"both models rendered with {which if args.template == 'auto' else args.template}")
    rows = [
        {
            "source": b["source"],
            "prompt": b["prompt"],
            "reference": b["reference"],
            "base": b["answer"],
            "base_score": b["score"],
            "tuned": t["answer"],
            "tuned_score": t["score"],
        }
        for b, t in zip(base, tuned, strict=True)
    ]
    _write_jsonl(args.output, rows)
    for row in rows[: args.show]:
        print("\n" + "=" * 78)
        print("PROMPT     " + row["prompt"].replace("\n", " ")[:300])
        print("REFERENCE  " + row["reference"][:300])
        print(f"BASE  {_mark(row['base_score'])}  {row['base'].strip()[:300]!r}")
        print(f"TUNED {_mark(row['tuned_score'])}  {row['tuned'].strip()[:300]!r}")
    if scorer is not None:
        print(f"\n{args.scorer}: base {mean_score(base):.1%} -> tuned {mean_score(tuned):.1%}")
    print(f"side by side: {args.output}")


def _mark(score) -> str:
    return "   " if score is None else ("ok " if score == 1.0 else "BAD")


def _chat(args) -> None:
    from sftforge.evaluation.chat import chat, tools_from_file
    from sftforge.models.devices import pick_device
    from sftforge.models.tokenizer import text_side
    from sftforge.models.trained import load_for_inference

    model, tokenizer = load_for_inference(args.model, allow_pickle=args.allow_pickle)
    encoder, _ = text_side(tokenizer, args.template, model=model)
    model.to(pick_device(args.device))
    tools = tools_from_file(args.tools) if args.tools else ()
    chat(model, encoder, system=args.system, max_new_tokens=args.max_new_tokens, tools=tools)


def _sweep(args) -> None:
    from sftforge.training.sweep import run_sweep

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    run_sweep(config, overrides, args.steps)


def _demo(args) -> None:
    from sftforge.training.demo import run_demo

    run_demo(args.output, args.overrides, args.task)


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
    from sftforge.training.guards import NonFiniteError, RunInterrupted

    if isinstance(error, RunInterrupted):
        return str(error), 128 + error.signal_number
    if isinstance(error, NonFiniteError):
        return f"error: {error}", RUN_FAILED
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

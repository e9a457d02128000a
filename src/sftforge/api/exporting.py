"""Deploying what was trained: `export` a run (or a checkpoint, or any model sftforge loads)
as a GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it,
carrying the template the run trained with and every token it was taught to stop at, and
checked by reading it back before it is called done."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sftforge.config.loading import load_config
from sftforge.config.schema import Config
from sftforge.console import say, speaking
from sftforge.data.loading import load_conversations
from sftforge.data.messages import Message
from sftforge.errors import InputError, MissingFileError
from sftforge.evaluation.generation import prompt_and_reference
from sftforge.export.architectures import architecture_of
from sftforge.export.gguf_file import LLAMA_CPP_TYPES, check_quant_type, write_gguf
from sftforge.export.modelfile import modelfile_for
from sftforge.export.verify import ExportCheckFailed, Verification, verify_export
from sftforge.export.vocabulary import vocabulary_of
from sftforge.models.tokenizer import text_side
from sftforge.models.trained import load_for_inference
from sftforge.training.output import convert_checkpoint

__all__ = ["Export", "export"]

EXPORT_FORMATS = ("gguf",)
HELD_OUT_PROMPTS_CHECKED = 8


@dataclass
class Export:
    """A written, checked export: the file, its Modelfile, and what the check showed."""

    path: Path
    modelfile: Path
    quant: str
    architecture: str
    size_bytes: int
    seconds: float  # writing the file (and quantizing), not checking it
    verification: Verification | None
    modelfile_notes: list[str]


def export(
    run: str | Path,
    *,
    to: str = "gguf",
    quant: str = "q8_0",
    output: str | Path | None = None,
    overwrite: bool = False,
    verify: bool = True,
    prompts: str | Path | None = None,
    allow_pickle: bool = False,
    verbose: bool = False,
) -> Export:
    """Write `run` (a run's output folder, a checkpoint folder, or any model sftforge loads)
    as a GGUF file of type `quant` at `output` (default RUN/model-QUANT.gguf), with
    OUTPUT.Modelfile for Ollama beside it. A LoRA run is merged into its full-precision
    base in memory. Unless verify=False, the file is read back by transformers' GGUF loader
    and compared with the source model on test conversations, the run's held-out prompts
    and `prompts` (a data file): a file that does not reproduce the run is renamed to
    OUTPUT.failed and ExportCheckFailed raised."""
    if to not in EXPORT_FORMATS:
        raise InputError(f"--to {to!r}: sftforge exports {', '.join(EXPORT_FORMATS)}")
    check_quant_type(quant)
    run = Path(run)
    if not run.exists():
        raise MissingFileError(f"{run} does not exist: give a run's output folder or a checkpoint")
    target = Path(output) if output is not None else run / f"model-{quant}.gguf"
    modelfile_path = target.with_name(target.stem + ".Modelfile")
    for path in (target, modelfile_path):
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists: give another --output, or --overwrite to replace it")
    if not target.parent.is_dir():
        raise MissingFileError(f"--output {target}: the folder {target.parent} does not exist")
    with speaking(verbose), _plain_model_folder(run) as source:
        model, tokenizer = load_for_inference(str(source), allow_pickle=allow_pickle)
        if hasattr(model, "merge_and_unload"):
            say("merging the LoRA adapter into its full-precision base (in memory)")
            model = model.merge_and_unload()
        model = model.float().eval()
        encoder, _ = text_side(tokenizer, "auto", model=model)
        architecture = architecture_of(model.config)
        vocabulary = vocabulary_of(encoder, model.get_input_embeddings().weight.shape[0])
        config = _run_config(run)
        checked = _held_out_prompts(config, prompts)
        started = time.perf_counter()
        write_gguf(model, architecture, vocabulary, target, quant, name=run.resolve().name)
        seconds = time.perf_counter() - started
        size = target.stat().st_size
        say(f"wrote {target} ({size / 2**20:.1f} MiB, {quant}) in {seconds:.1f} s")
        verification = None
        if verify:
            verification = verify_export(target, model, encoder, vocabulary, quant, checked)
            if not verification.passed:
                failed = target.with_name(target.name + ".failed")
                target.replace(failed)
                raise ExportCheckFailed(
                    f"{target}: the written file does not reproduce the run, kept as {failed} "
                    "for inspection: " + "; ".join(verification.problems) + _hint(config, quant),
                    verification,
                )
            say(f"checked by reading it back: {verification.summary()}")
        modelfile = modelfile_for(encoder, vocabulary, target.name, _generation_defaults(config))
        _write_text(modelfile_path, modelfile.text)
        for note in modelfile.notes:
            say(f"Modelfile: {note}")
    return Export(
        target, modelfile_path, quant, architecture.name, size, seconds, verification,
        modelfile.notes,
    )  # fmt: skip


@contextlib.contextmanager
def _plain_model_folder(run: Path):
    """The folder to load: the run itself, or a checkpoint converted to a plain one."""
    if not (run / "state.json").is_file():
        yield run
        return
    with tempfile.TemporaryDirectory(prefix="sftforge-export-") as scratch:
        say(f"{run} is a checkpoint: converting it to a plain model first")
        yield convert_checkpoint(run, Path(scratch) / "model")


def _hint(config: Config | None, quant: str) -> str:
    """What to do when a k-quant does not reproduce the run."""
    if quant not in LLAMA_CPP_TYPES:
        return ""
    hint = f". {quant} rounds away small weight changes, and fine-tuning makes small changes"
    if config is not None and config.model.endswith(".gguf"):
        hint += (
            f"; this run's base came quantized ({config.model}), and a type like its own "
            "puts the weights back on the grid they came from, undoing the fine-tune"
        )
    return hint + ": export q8_0 (or f16), or a larger k-quant (q6_k)"


def _run_config(run: Path) -> Config | None:
    """The run's resolved config (sftforge.yaml), or None for a plain model folder."""
    config_file = run / "sftforge.yaml"
    return load_config(config_file) if config_file.is_file() else None


def _held_out_prompts(
    config: Config | None, prompts: str | Path | None
) -> list[tuple[Message, ...]]:
    """The prompts of `prompts` (all) and of the run's held-out file (the first few); a
    record with no assistant turn has no prompt to check, and is counted aloud."""
    files: list[tuple[str | Path, int | None]] = []
    if prompts is not None:
        files.append((prompts, None))
    held_out = config.eval.held_out if config is not None else None
    if isinstance(held_out, str) and Path(held_out).is_file():
        files.append((held_out, HELD_OUT_PROMPTS_CHECKED))
    elif isinstance(held_out, str):
        say(f"the run's held-out file {held_out} is not here: checking on test conversations")
    checked = []
    for path, limit in files:
        conversations = load_conversations(path).conversations
        usable = [c for c in conversations if c.assistant_indices()]
        if len(usable) < len(conversations):
            say(f"{path}: {len(conversations) - len(usable)} records with no assistant turn, "
                "so no prompt to check, left out of the check")  # fmt: skip
        for conversation in usable[:limit]:
            checked.append(tuple(prompt_and_reference(conversation)[0].messages))
    return checked


def _generation_defaults(config: Config | None) -> dict:
    """How the run generated its answers: greedy, up to eval.max_new_tokens."""
    max_new_tokens = config.eval.max_new_tokens if config is not None else None
    return {"temperature": 0.0, "num_predict": max_new_tokens}


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, "utf-8")
    shutil.move(str(partial), path)

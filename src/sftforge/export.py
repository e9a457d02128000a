"""Fold a LoRA adapter into its base model, giving a plain transformers model directory."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from .model import load_source_model, load_tokenizer
from .model_source import ModelSource, resolve_model_source


def load_from_source(source: ModelSource, purpose: str, allow_pickle: bool = False):
    """(model, tokenizer) of `source`: a LoRA run's base with its adapter attached and the
    run's tokenizer, or a model and its tokenizer. Weights load from safetensors only,
    unless allow_pickle; a tokenizer-only folder is refused, naming `purpose`."""
    source.require_weights(purpose)  # before the tokenizer: refuse early
    tokenizer = load_tokenizer(source.tokenizer)
    return load_source_model(source, len(tokenizer), purpose, allow_pickle), tokenizer


def load_base_with_adapter(adapter_dir: Path, allow_pickle: bool = False):
    """(base with the adapter attached, the run's tokenizer) of a LoRA run folder."""
    source = resolve_model_source(str(adapter_dir))
    source.require_weights("merging a LoRA adapter")
    if source.adapter is None:
        raise FileNotFoundError(
            f"{adapter_dir} holds no adapter_config.json: not a LoRA run, so there is no "
            "adapter to fold in. Give the folder a LoRA training run wrote"
        )
    return load_from_source(source, "merging a LoRA adapter", allow_pickle)


def load_for_inference(spec: str, allow_pickle: bool = False):
    """(model, tokenizer) from a run directory (adapter or full model), a model directory,
    an embedded name, a .gguf file or a hub id."""
    return load_from_source(resolve_model_source(spec), "generating text", allow_pickle)


def merge_adapter(adapter_dir: Path, output_dir: Path, allow_pickle: bool = False) -> str:
    """Fold the adapter into its full-precision base; returns the base's path."""
    model, tokenizer = load_base_with_adapter(adapter_dir, allow_pickle)
    merged = model.merge_and_unload()
    generation_config = adapter_dir / "generation_config.json"
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    if generation_config.is_file():
        # copyfile, not copy: the new file takes the user's umask, not the old file's mode.
        shutil.copyfile(generation_config, output_dir / "generation_config.json")
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def save_run(
    folder: Path,
    model,
    tokenizer,
    stop_ids: tuple[int, ...],
    pad_id: int,
    config,
    data_report: dict,
) -> None:
    """Model (or adapter), tokenizer with its chat template, generation stop tokens, the
    resolved config and the data report: everything inference needs to render and stop
    exactly as in training. The live model is left as it was: the generation config is
    written from a copy."""
    from .config_file import dump_config

    folder.mkdir(parents=True, exist_ok=True)
    is_adapter = hasattr(model, "peft_config")
    base = model.get_base_model() if is_adapter else model
    if is_adapter:
        # The rows of tokens the template added are saved as the adapter's trainable-token
        # rows; peft would otherwise save the whole resized embedding (and a tied head).
        model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if base.generation_config is not None:
        generation = copy.deepcopy(base.generation_config)
        # Generation must stop at the template's end-of-turn token, whichever it is.
        generation.eos_token_id = list(stop_ids)
        generation.pad_token_id = pad_id
        generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dump_config(config, folder / "sftforge.yaml")
    (folder / "data_report.json").write_text(json.dumps(data_report, indent=2))


def convert_checkpoint(checkpoint: Path, output_dir: Path) -> Path:
    """A checkpoint written by any number of processes (FSDP's sharded ones included) ->
    a plain model or adapter directory, loadable with transformers/peft like a run's final
    model. The base and its adapters are built from the run's settings recorded in the
    checkpoint, on the CPU, and the trained weights loaded into them."""
    import torch

    from .checkpoint import CheckpointError, verify_checkpoint
    from .config import Config
    from .loss import TokenLoss
    from .prepare import prepare
    from .sharded import load_trained_weights

    state_file = checkpoint / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{checkpoint}: not a checkpoint (no state.json)")
    problem = verify_checkpoint(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint}: {problem}")
    state = json.loads(state_file.read_text("utf-8"))
    config = Config.model_validate(state["identity"]["config"])
    prepared = prepare(config, torch.device("cpu"))
    load_trained_weights(checkpoint, TokenLoss(prepared.model))
    encoder = prepared.encoder
    report = {"base_model": prepared.base_model_path, "converted_from": str(checkpoint)}
    save_run(
        output_dir,
        prepared.model,
        encoder.tokenizer,
        encoder.stop_ids,
        encoder.pad_id,
        config,
        report,
    )
    return output_dir

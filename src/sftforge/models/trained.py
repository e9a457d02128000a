"""A trained model loaded back: a run's output (its base with the LoRA adapter attached, or
its full model) with the run's tokenizer, for inference; and a LoRA adapter folded into its
full-precision base, giving a plain transformers model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sftforge.errors import MissingFileError
from sftforge.models.loading import load_source_model
from sftforge.models.source import ModelSource, resolve_model_source
from sftforge.models.tokenizer import load_tokenizer


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
        raise MissingFileError(
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

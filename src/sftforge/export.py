"""Fold a LoRA adapter into its base model, giving a plain transformers model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .model import load_model, load_tokenizer


def load_base_with_adapter(adapter_dir: Path):
    """Base model (embeddings resized to the adapter's tokenizer) with the adapter attached."""
    from peft import PeftModel

    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a LoRA run")
    base_path = json.loads(config_path.read_text())["base_model_name_or_path"]
    tokenizer = load_tokenizer(str(adapter_dir))
    base = load_model(base_path)
    if base.get_input_embeddings().num_embeddings != len(tokenizer):
        # The run added template tokens: the adapter's trained rows expect them.
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def merge_adapter(adapter_dir: Path, output_dir: Path) -> None:
    model, tokenizer = load_base_with_adapter(adapter_dir)
    merged = model.merge_and_unload()
    generation_config = adapter_dir / "generation_config.json"
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    if generation_config.is_file():
        shutil.copy(generation_config, output_dir / "generation_config.json")

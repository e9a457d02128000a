"""Fold a LoRA adapter into its base model, giving a plain transformers model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .model import adapter_pickle_weights, check_pickle_weights, load_model, load_tokenizer


def load_base_with_adapter(adapter_dir: Path, allow_pickle: bool = False):
    """Base model (embeddings resized to the adapter's tokenizer) with the adapter attached.
    Adapter and base weights load from safetensors only, unless allow_pickle."""
    from peft import PeftModel

    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a LoRA run")
    # peft falls back to adapter_model.bin (pickle) when there is no adapter_model.safetensors.
    check_pickle_weights(
        f"LoRA adapter {adapter_dir}", adapter_pickle_weights(adapter_dir), allow_pickle
    )
    base_path = json.loads(config_path.read_text())["base_model_name_or_path"]
    tokenizer = load_tokenizer(str(adapter_dir))
    base = load_model(base_path, allow_pickle=allow_pickle)
    if base.get_input_embeddings().num_embeddings != len(tokenizer):
        # The run added template tokens: the adapter's trained rows expect them.
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def load_for_inference(spec: str, allow_pickle: bool = False):
    """(model, tokenizer) from a run directory (adapter or full model), a model directory,
    an embedded name, a .gguf file or a hub id."""
    from .model import resolve_model_path

    path = Path(spec)
    if (path / "adapter_config.json").is_file():
        return load_base_with_adapter(path, allow_pickle)
    resolved = str(path) if (path / "config.json").is_file() else resolve_model_path(spec)
    return load_model(resolved, allow_pickle=allow_pickle), load_tokenizer(resolved)


def merge_adapter(adapter_dir: Path, output_dir: Path, allow_pickle: bool = False) -> None:
    model, tokenizer = load_base_with_adapter(adapter_dir, allow_pickle)
    merged = model.merge_and_unload()
    generation_config = adapter_dir / "generation_config.json"
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    if generation_config.is_file():
        # copyfile, not copy: the new file takes the user's umask, not the old file's mode.
        shutil.copyfile(generation_config, output_dir / "generation_config.json")


def save_run(model, prep, config, output_dir: Path) -> None:
    """Model (or adapter), tokenizer with its chat template, generation stop tokens, and the
    resolved config: everything inference needs to render and stop exactly as in training."""
    from .config import dump_config

    output_dir.mkdir(parents=True, exist_ok=True)
    is_adapter = hasattr(model, "peft_config")
    base = model.get_base_model() if is_adapter else model
    end_ids = sorted(end_of_turn_ids(prep))
    if base.generation_config is not None and end_ids:
        # Generation must stop at the template's end-of-turn token, whichever it is.
        base.generation_config.eos_token_id = end_ids
        base.generation_config.pad_token_id = prep.pad_id
    model.save_pretrained(output_dir, safe_serialization=True)
    if is_adapter and base.generation_config is not None:
        base.generation_config.save_pretrained(output_dir)
    prep.tokenizer.save_pretrained(output_dir)
    dump_config(config, output_dir / "sftforge.yaml")
    (output_dir / "data_report.json").write_text(
        json.dumps(prep.report.__dict__ | {"base_model": prep.base_model_path}, indent=2)
    )


def end_of_turn_ids(prep) -> set[int]:
    """Tokens that end a turn: the eos token and every special token that closed a trained
    assistant turn (e.g. <|im_end|> when a base model whose eos is </s> learns ChatML)."""
    eos = prep.tokenizer.eos_token_id
    return prep.encoder.end_of_turn_ids | ({eos} if eos is not None else set())

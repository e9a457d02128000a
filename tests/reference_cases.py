"""The conversations, tokenizers and references that tests/test_reference_templates.py
checks every built-in template against (and `bench`-free: all built in under a second or read
from packages `make test` installs)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from sftforge.data.messages import Conversation, Message, Source, ToolCall

REFERENCE_TEMPLATES = Path(__file__).parent / "reference_templates"
_S = Source("shapes.jsonl", 1)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

SHAPES: dict[str, Conversation] = {
    "one turn": Conversation(
        _S, (Message("user", "What is the capital of France?"), Message("assistant", "Paris"))
    ),
    "system, one turn": Conversation(
        _S,
        (
            Message("system", "Be brief."),
            Message("user", "What is the capital of France?"),
            Message("assistant", "Paris"),
        ),
    ),
    "several turns": Conversation(
        _S,
        (
            Message("user", "What is the capital of France?"),
            Message("assistant", "Paris is.\nIt is large."),
            Message("user", "And of Spain?"),
            Message("assistant", "Madrid."),
        ),
    ),
    "system, several turns": Conversation(
        _S,
        (
            Message("system", "Be brief."),
            Message("user", "What is the capital of France?"),
            Message("assistant", "Paris"),
            Message("user", "And of Spain?"),
            Message("assistant", "Madrid, I think."),
        ),
    ),
    "reasoning": Conversation(
        _S,
        (
            Message("user", "What is 2+2?"),
            Message("assistant", "4", reasoning="Two and two make four."),
        ),
    ),
    "tool call and result": Conversation(
        _S,
        (
            Message("user", "Weather in Paris?"),
            Message("assistant", "", tool_calls=(ToolCall("get_weather", {"city": "Paris"}),)),
            Message("tool", '{"temperature": 21}'),
            Message("assistant", "It is 21 degrees."),
        ),
        tools=(WEATHER_TOOL,),
    ),
}
SHAPES["tool call"] = Conversation(
    _S, SHAPES["tool call and result"].messages[:2], tools=(WEATHER_TOOL,)
)
# Mistral's v3 and later name each call with a 9-character id, which the result repeats.
SHAPES["tool call with an id and result"] = Conversation(
    _S,
    (
        Message("user", "Weather in Paris?"),
        Message(
            "assistant",
            "",
            tool_calls=(ToolCall("get_weather", {"city": "Paris"}, id="call00001"),),
        ),
        Message("tool", '{"temperature": 21}', tool_call_id="call00001", name="get_weather"),
        Message("assistant", "It is 21 degrees."),
    ),
    tools=(WEATHER_TOOL,),
)
SHAPES["system, tool call and result"] = Conversation(
    _S,
    (Message("system", "Be brief."), *SHAPES["tool call and result"].messages),
    tools=(WEATHER_TOOL,),
)
PLAIN = ("one turn", "system, one turn", "several turns", "system, several turns")


def package_folder(module: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise RuntimeError(f"{module} is not installed: make test installs it")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def mistral_file(name: str) -> Path:
    return package_folder("mistral_common", "data", name)


def v7_tekken_file(folder: Path) -> Path:
    """A tekken.json of version v7 (as Mistral Small 3.1 ships), built from mistral-common's
    v3 one: the same vocabulary, its config saying v7."""
    path = folder / "tekken.json"
    if not path.exists():
        raw = json.loads(mistral_file("tekken_240911.json").read_text("utf-8"))
        raw["config"]["version"] = "v7"
        raw.pop("image", None)
        path.write_text(json.dumps(raw), "utf-8")
    return path


def phi3_like_tokenizer(folder: Path, sentencepiece_folder: Path):
    """The SentencePiece stand-in with Phi-3's turn tokens added, as Phi-3's vocabulary holds
    them, and eos <|endoftext|>."""
    from transformers import AutoTokenizer

    target = folder / "phi3"
    if not target.exists():
        shutil.copytree(sentencepiece_folder, target)
        tokenizer = AutoTokenizer.from_pretrained(target)
        tokens = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
        tokenizer.eos_token = "<|endoftext|>"
        tokenizer.chat_template = None
        tokenizer.save_pretrained(target)
        config = json.loads((target / "tokenizer_config.json").read_text("utf-8"))
        config["add_bos_token"] = False  # Phi-3's tokenizer adds none
        config.pop("chat_template", None)  # a base model's: no template of its own
        (target / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
        (target / "chat_template.jinja").unlink(missing_ok=True)
    return target

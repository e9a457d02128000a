"""The one shape every demonstration takes: a Conversation of Messages, each knowing where it
came from. data/formats.py (and data/tools.py for tool calls and reasoning) turn records into it.

A Message carries what models are trained on today: the text of a turn, an assistant's
reasoning and tool calls, a tool's result and the call it answers. A Conversation may carry
the tool definitions its prompt shows and options for the chat template (`enable_thinking`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sftforge.errors import InputError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)  # slots: indexes hold one per record
class Source:
    """Where a record came from: a file and a 1-based line (JSONL/CSV) or 0-based row index."""

    path: str
    line: int | None = None  # 1-based line number in a text file (JSON lines, CSV)
    row: int | None = None  # 0-based index in a JSON array, Parquet file or `datasets` dataset

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path}[row {self.row}]"
        return self.path


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant makes: its name and its arguments, a JSON object
    parsed once (key order kept), never a string of JSON."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None

    def as_template_dict(self) -> dict:
        """The call as transformers' chat templates read it (OpenAI's shape)."""
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"id": self.id, **call} if self.id is not None else call

    def as_json(self) -> dict:
        """The call as OpenAI's chat files write it: arguments as a JSON string."""
        call = {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}
        out = {"type": "function", "function": call}
        return {"id": self.id, **out} if self.id is not None else out


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    trained: bool = True  # False: an assistant turn kept as context only (weight 0)
    reasoning: str | None = None  # assistant only: the thinking before its answer
    tool_calls: tuple[ToolCall, ...] = ()  # assistant only
    tool_call_id: str | None = None  # tool only: the id of the call this result answers
    name: str | None = None  # a tool result's function; else OpenAI's participant name

    def as_template_dict(self) -> dict:
        """The message as transformers passes it to a chat template: role and content, and
        `reasoning_content`, `tool_calls`, `tool_call_id`, `name` where given."""
        return self._as_dict([call.as_template_dict() for call in self.tool_calls])

    def as_json(self) -> dict:
        """The message as an OpenAI-style chat record writes it (what `data convert` and the
        rejects file write): only the fields that are set, calls' arguments as JSON text."""
        out = self._as_dict([call.as_json() for call in self.tool_calls])
        if self.role == "assistant" and not self.trained:
            out["weight"] = 0
        return out

    def _as_dict(self, calls: list[dict]) -> dict:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if calls:
            out["tool_calls"] = calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Conversation:
    """A validated demonstration.

    `messages` is a chat (system?, user, assistant, tool results, ...). `tools` are the
    function definitions its prompt shows (JSON schema, as OpenAI and transformers write
    them); `template_options` are passed to the chat template (`enable_thinking`: False).
    `text` is set instead for raw-text records, which are trained on every token and not
    rendered through a chat template.
    """

    source: Source
    messages: tuple[Message, ...] = ()
    text: str | None = None
    meta: dict = field(default_factory=dict, compare=False)
    tools: tuple[dict, ...] = ()
    template_options: dict = field(default_factory=dict)

    @property
    def is_raw_text(self) -> bool:
        return self.text is not None

    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]


class DataError(InputError):
    """A record that cannot become a valid Conversation. Names its source and field."""

    def __init__(self, source: Source | str, reason: str, field: str | None = None):
        self.source = source
        self.reason = reason
        self.field = field
        where = f"{source}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {reason}")

    def __reduce__(self):  # rebuilt from its parts when it comes back from a worker process
        return (type(self), (self.source, self.reason, self.field))


def require(record: dict, key: str, source: Source, field_path: str | None = None) -> None:
    if key not in record:
        raise DataError(source, f"missing; found keys {keys_of(record)}", field_path or key)


def require_str(record: dict, key: str, source: Source, field_path: str | None = None) -> str:
    require(record, key, source, field_path)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(source, f"expected a string, found {type_name(value)}", field_path or key)
    return value


def type_name(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"number ({value})"
    names = {type(None): "null", bool: "boolean", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def keys_of(record: dict) -> str:
    return "(" + ", ".join(map(str, record)) + ")" if record else "(none)"

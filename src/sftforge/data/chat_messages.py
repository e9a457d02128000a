"""One message of a chat record -> a Message: its text (a string, text parts, or null beside
tool calls), and by role its reasoning and tool calls, or the call its result answers.
data/formats.py reads the records; data/tools.py parses the tool-calling fields."""

from __future__ import annotations

from sftforge.data.messages import (
    DataError,
    Message,
    Source,
    ToolCall,
    keys_of,
    require,
    require_str,
    type_name,
)
from sftforge.data.tools import parse_tool_calls, reasoning_of, split_hermes_calls, split_reasoning


def message_of(item: dict, role: str, role_name: str, where: str, content_key: str, source):
    """One message of a chat record: its text (a string, text parts, or null beside tool
    calls), and by role its reasoning and tool calls, or the call its result answers."""
    content_field = f"{where}.{content_key}"
    reasoning, key = reasoning_of(item, source, where)
    if reasoning is not None and role != "assistant":
        reason = f"only assistant messages have reasoning, found it on a {role} message"
        raise DataError(source, reason, f"{where}.{key}")
    if role_name == "function_call":  # LLaMA-Factory: the turn's value is the call(s)
        calls = parse_tool_calls(item.get(content_key), source, content_field)
        return Message("assistant", "", reasoning=reasoning, tool_calls=calls)
    for name, owner in (("tool_calls", "assistant"), ("function_call", "assistant")) + (
        ("tool_call_id", "tool"),
    ):
        if item.get(name) is not None and role != owner:
            reason = f"only {owner} messages have {name}, found it on a {role} message"
            raise DataError(source, reason, f"{where}.{name}")
    calls = _structured_calls(item, where, source) if role == "assistant" else ()
    content = _content(item, content_key, content_field, source, may_be_null=bool(calls))
    if role == "tool":
        return Message(
            "tool", _unwrapped_result(content), **_tool_result_fields(item, where, source)
        )
    speaker = _speaker_name(item, where, source)
    if role != "assistant":
        return Message(role, content, name=speaker)
    thought, content = split_reasoning(content, source, content_field)
    if thought is not None and reasoning is not None:
        reason = f"reasoning given twice ({key} and a <think> block in the content); keep one"
        raise DataError(source, reason, content_field)
    if not calls:
        content, calls = split_hermes_calls(content, source, content_field)
    reasoning = reasoning if reasoning is not None else thought  # "": thought nothing
    return Message("assistant", content, reasoning=reasoning, tool_calls=calls, name=speaker)


def _speaker_name(item: dict, where: str, source: Source) -> str | None:
    """OpenAI's participant `name` on a system, user or assistant message: carried to the
    template as transformers passes it, never dropped."""
    value = item.get("name")
    if value is not None and not isinstance(value, str):
        raise DataError(source, f"expected a string, found {type_name(value)}", f"{where}.name")
    return value


def _structured_calls(item: dict, where: str, source: Source) -> tuple[ToolCall, ...]:
    calls = parse_tool_calls(item.get("tool_calls") or [], source, f"{where}.tool_calls")
    if item.get("function_call") is not None:  # OpenAI's older single call
        if calls:
            reason = "tool_calls and function_call both given; keep tool_calls"
            raise DataError(source, reason, f"{where}.function_call")
        calls = parse_tool_calls(item["function_call"], source, f"{where}.function_call")
    return calls


def _tool_result_fields(item: dict, where: str, source: Source) -> dict:
    fields = {}
    for key in ("tool_call_id", "name"):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            reason = f"expected a string, found {type_name(value)}"
            raise DataError(source, reason, f"{where}.{key}")
        fields[key] = value
    return fields


def _unwrapped_result(content: str) -> str:
    """A tool result without the <tool_response> tags Hermes-style data writes around it:
    the template writes its own."""
    inner = content.strip()
    if inner.startswith("<tool_response>") and inner.endswith("</tool_response>"):
        return inner[len("<tool_response>") : -len("</tool_response>")].strip("\n")
    return content


def _content(item: dict, key: str, where: str, source: Source, may_be_null: bool) -> str:
    """A message's text: a string; a list of text parts (OpenAI's {"type": "text", "text":
    ...}, Bedrock's {"text": ...}) joined with no separator; null only beside tool calls."""
    value = item.get(key)
    if value is None and may_be_null:
        return ""
    if isinstance(value, (list, tuple)):
        return "".join(text_parts(value, source, where))
    require(item, key, source, where)
    if not isinstance(value, str):
        raise DataError(source, f"expected a string, found {type_name(value)}", where)
    return value


def text_parts(value: list | tuple, source: Source, field_path: str) -> list[str]:
    texts = []
    for j, part in enumerate(value):
        where = f"{field_path}[{j}]"
        if not isinstance(part, dict):
            raise DataError(source, f"expected a text part, found {type_name(part)}", where)
        kind = part.get("type", "text")  # Bedrock's blocks have no type: {"text": ...}
        if kind != "text" or "text" not in part:
            found = f"type {kind!r}" if kind != "text" else f"keys {keys_of(part)}"
            reason = f"only text parts are supported, found a part with {found}; leave it out"
            raise DataError(source, reason, where)
        texts.append(require_str(part, "text", source, f"{where}.text"))
    return texts

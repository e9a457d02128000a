"""Tool calls, tool definitions and reasoning, as the field's formats write them, read into
Messages once: arguments parsed to a JSON object (never left as a string, never encoded
twice), tool definitions in OpenAI's shape, reasoning taken from `reasoning_content`,
`reasoning`, `thinking` or a `<think>...</think>` block opening the content, and Hermes-style
`<tool_call>{json}</tool_call>` blocks in an assistant's text read as its calls.

Every problem is a DataError naming the record's source and the field.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

from sftforge.data.messages import DataError, Message, Source, ToolCall, type_name

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_THINK = re.compile(r"\A\s*<think>(.*?)</think>", re.DOTALL)
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_json_text(value: Any, source: Source, where: str, expected: str) -> Any:
    """`value`, parsed first when it is a string of JSON (CSV cells, ShareGPT's `tools`)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        reason = f"expected {expected}, found a string that is not JSON ({err.msg})"
        raise DataError(source, reason, where) from None
    except RecursionError:
        raise DataError(source, "nested too deeply to parse", where) from None


def parse_arguments(value: Any, source: Source, where: str) -> dict:
    """A call's arguments: a JSON object, or a string holding one (OpenAI's way)."""
    if value is None:
        return {}
    parsed = parse_json_text(value, source, where, "a JSON object of arguments")
    if not isinstance(parsed, dict):
        reason = f"expected a JSON object of arguments, found {type_name(parsed)}"
        raise DataError(source, reason, where)
    return parsed


def parse_tool_call(item: Any, source: Source, where: str) -> ToolCall:
    """One call: OpenAI's {"id", "type": "function", "function": {"name", "arguments"}}, or
    the flat {"name", "arguments"} (transformers', ShareGPT's, xLAM's)."""
    item = parse_json_text(item, source, where, "a tool call object")
    if not isinstance(item, dict):
        raise DataError(source, f"expected a tool call object, found {type_name(item)}", where)
    call, inner = item, where
    if "function" in item:
        call, inner = item["function"], f"{where}.function"
        if not isinstance(call, dict):
            reason = f"expected an object with 'name' and 'arguments', found {type_name(call)}"
            raise DataError(source, reason, inner)
    name = call.get("name")
    if not isinstance(name, str) or not name:
        reason = f"expected the function's name as a string, found {type_name(name)}"
        raise DataError(source, reason, f"{inner}.name")
    key = "arguments" if "arguments" in call else "parameters"  # some dumps say parameters
    arguments = parse_arguments(call.get(key), source, f"{inner}.{key}")
    call_id = item.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise DataError(source, f"expected a string, found {type_name(call_id)}", f"{where}.id")
    return ToolCall(name, arguments, call_id)


def parse_tool_calls(value: Any, source: Source, where: str) -> tuple[ToolCall, ...]:
    """A list of calls (parallel calls), or one call alone."""
    value = parse_json_text(value, source, where, "a list of tool calls")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(source, f"expected a list of tool calls, found {type_name(value)}", where)
    return tuple(parse_tool_call(item, source, f"{where}[{k}]") for k, item in enumerate(value))


def parse_tools(value: Any, source: Source, where: str = "tools") -> tuple[dict, ...]:
    """Function definitions, in OpenAI's shape {"type": "function", "function": {"name",
    "description", "parameters"}}; a bare {"name", ...} (ShareGPT's, xLAM's) is wrapped so,
    as the model sees tools at inference."""
    if value is None:
        return ()
    value = parse_json_text(value, source, where, "a list of function definitions")
    if not isinstance(value, (list, tuple)):
        reason = f"expected a list of function definitions, found {type_name(value)}"
        raise DataError(source, reason, where)
    tools = []
    for k, tool in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(tool, dict):
            reason = f"expected a function definition object, found {type_name(tool)}"
            raise DataError(source, reason, at)
        function = tool.get("function") if "function" in tool else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            expected = '{"type": "function", "function": {"name", ...}} or {"name", ...}'
            reason = f"expected a function definition {expected}; found keys {_keys(tool)}"
            raise DataError(source, reason, at)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            reason = f"expected a JSON schema object, found {type_name(parameters)}"
            raise DataError(source, reason, f"{at}.parameters")
        tools.append(tool if "function" in tool else {"type": "function", "function": tool})
    return tuple(tools)


def split_reasoning(content: str, source: Source, where: str) -> tuple[str | None, str]:
    """(reasoning, answer) from a content that may open with <think>...</think>: the
    reasoning without the newlines around it, the answer without those after </think>
    (how Qwen3's and DeepSeek-R1's templates read it)."""
    if "<think>" not in content and "</think>" not in content:
        return None, content
    found = _THINK.match(content)
    if found is None or "<think>" in content[found.end() :] or "</think>" in found.group(1):
        reason = (
            "a <think> block must open the content and be closed once by </think>; found "
            "one elsewhere or unclosed: put the reasoning in 'reasoning_content' instead"
        )
        raise DataError(source, reason, where)
    return found.group(1).strip("\n"), content[found.end() :].lstrip("\n")


def split_hermes_calls(content: str, source: Source, where: str) -> tuple[str, tuple]:
    """(text, calls) from an assistant text holding Hermes-style <tool_call>{json}</tool_call>
    blocks after its text; the text without them (trailing newlines taken off)."""
    if "<tool_call>" not in content:
        return content, ()
    first = content.index("<tool_call>")
    calls = []
    rest = content[first:]
    for k, found in enumerate(_HERMES_CALL.finditer(rest)):
        calls.append(parse_tool_call(found.group(1), source, f"{where} <tool_call> {k + 1}"))
    leftover = _HERMES_CALL.sub("", rest).strip()
    if leftover or not calls:
        reason = (
            "<tool_call> blocks must come after the text, each a JSON object closed by "
            f"</tool_call>; found {leftover[:40]!r} among them"
        )
        raise DataError(source, reason, where)
    return content[:first].rstrip("\n"), tuple(calls)


def reasoning_of(item: dict, source: Source, where: str) -> tuple[str | None, str]:
    """Which key holds an item's reasoning, if any (one at most)."""
    present = [key for key in REASONING_KEYS if item.get(key) is not None]
    if len(present) > 1:
        reason = f"reasoning given twice ({', '.join(present)}); keep one"
        raise DataError(source, reason, f"{where}.{present[1]}")
    if not present:
        return None, ""
    value = item[present[0]]
    if not isinstance(value, str):
        reason = f"expected a string, found {type_name(value)}"
        raise DataError(source, reason, f"{where}.{present[0]}")
    return value, present[0]


def check_tool_flow(messages: Sequence[Message], fields: Sequence[str], source: Source) -> None:
    """Each tool result follows a call: a tool message comes after an assistant turn with
    tool calls (or after another result of that turn), and its `tool_call_id`, when given,
    names one of that turn's calls. `fields` names each message's role field."""
    calls: dict[str | None, ToolCall] | None = None
    for message, where in zip(messages, fields, strict=True):
        if message.role == "assistant":
            calls = {call.id: call for call in message.tool_calls} or None
        elif message.role == "tool":
            if calls is None:
                reason = "a tool result with no tool call before it (an assistant's tool_calls)"
                raise DataError(source, reason, where)
            call_id = message.tool_call_id
            if call_id is not None and call_id not in calls:
                known = ", ".join(repr(k) for k in calls if k is not None) or "none"
                reason = (
                    f"tool_call_id {call_id!r} answers no call of the turn before (ids: {known})"
                )
                raise DataError(source, reason, where.rsplit(".", 1)[0] + ".tool_call_id")
        else:
            calls = None


def _keys(value: dict) -> str:
    return "(" + ", ".join(map(str, value)) + ")" if value else "(none)"


# ---- generated text read back -------------------------------------------------------------


def generated_turn(text: str) -> tuple[str | None, str, tuple[ToolCall, ...] | None]:
    """(reasoning, text, calls) of a generated assistant turn, read by the Hermes convention
    that the chatml built-in and Qwen's templates write (<think> first, <tool_call>{json}
    </tool_call> blocks after the text); a bare JSON call ({"name", "arguments"}) or list of
    calls (Llama 3's way) is read too. `calls` is None when the text holds a call that does
    not parse: a model's mistake, not the data's."""
    source = Source("generated")
    reasoning, rest = None, text
    with contextlib.suppress(DataError):
        reasoning, rest = split_reasoning(text, source, "answer")
    try:
        content, calls = split_hermes_calls(rest, source, "answer")
    except DataError:
        return reasoning, rest, None
    if not calls and rest.strip()[:1] in ("{", "["):
        try:
            return reasoning, "", parse_tool_calls(rest.strip(), source, "answer")
        except DataError:
            return reasoning, rest, ()
    return reasoning, content, calls


def calls_as_text(content: str, calls: tuple[ToolCall, ...]) -> str:
    """A turn's text and calls written the Hermes way, as `generated_turn` reads them: the
    reference an answer is scored against."""
    blocks = [
        "<tool_call>\n"
        + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    ]
    return "\n".join([content, *blocks] if content else blocks)

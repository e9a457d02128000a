"""Which text of a rendered conversation came from the data: every string a template may
write from a message (its content, reasoning, tool calls' names, ids and argument values; a
tool result's content and call id) is a *slot*.

encode/render.py renders a conversation twice: once with each slot replaced by a unique sentinel,
once for real. The sentinel render cuts the text into template markup and slots; the real
render must equal that markup with each slot's text put back: verbatim, trimmed as some
official templates do, or JSON-escaped where the template writes it with `tojson` (a
call's arguments). Tool definitions and argument names are not slots: templates read
their structure (`tool.function.name`, `tool.type == "function"`), and encode/encoder.py refuses
special-token text in them instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sftforge.data.messages import Message

SENTINEL = re.compile("\ue000(\\d+)\ue001")


def sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"


@dataclass(frozen=True)
class Slot:
    """A string of the data as a template receives it: whose it is and which field."""

    text: str
    message: int  # the message it belongs to
    field: str  # e.g. "content", "reasoning_content", "tool_calls[0].function.arguments.city"


def template_messages(messages: tuple[Message, ...]) -> list[dict]:
    return [m.as_template_dict() for m in messages]


def with_sentinels(messages: tuple[Message, ...]) -> tuple[list[dict], list[Slot]]:
    """The messages as a template receives them, each slot's string replaced by its
    sentinel (empty strings stay empty: a template may test for an empty system prompt),
    and the slots in sentinel order."""
    slots: list[Slot] = []

    def slotted(value: Any, message: int, field: str, keep_type: bool = False) -> Any:
        if isinstance(value, str):
            if not value:
                return value
            slots.append(Slot(value, message, field))
            return sentinel(len(slots) - 1)
        if isinstance(value, dict):
            return {
                k: v if keep_type and k == "type" else slotted(v, message, f"{field}.{k}")
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [slotted(v, message, f"{field}[{k}]") for k, v in enumerate(value)]
        return value  # numbers, booleans, null: the same in both renders

    rendered = []
    for i, message in enumerate(messages):
        item = {}
        for key, value in message.as_template_dict().items():
            if key == "role":
                item[key] = value
            elif key == "tool_calls":
                item[key] = [
                    slotted(call, i, f"tool_calls[{k}]", True) for k, call in enumerate(value)
                ]
            else:
                item[key] = slotted(value, i, key)
        rendered.append(item)
    return rendered, slots


def shape_key(sentinel_messages: list[dict], tools: tuple, options: dict) -> str:
    """What the sentinel renders depend on: the messages' structure (roles, which fields,
    argument names and non-string values), the tools and the template's options."""
    return json.dumps([sentinel_messages, tools, options], sort_keys=False, default=str)


def candidates(text: str) -> list[str]:
    """What a template may have made of a slot's text: verbatim, trimmed (of whitespace or of
    newlines, at either end or both), or JSON-escaped (written with tojson)."""
    seen: list[str] = []
    options = (
        text,
        text.strip(),
        text.rstrip(),
        text.lstrip(),
        text.strip("\n"),
        text.rstrip("\n"),
        text.lstrip("\n"),
        json.dumps(text, ensure_ascii=False)[1:-1],
    )
    for option in options:
        if option not in seen:
            seen.append(option)
    return seen


@dataclass
class Element:
    """A run of the sentinel render: template markup, or one slot; and where it lies in the
    real render once aligned."""

    text_in_sentinel_render: str
    slot: int | None  # the slot's index when this element is one
    sentinel_start: int
    real_start: int = -1
    real_text: str = ""


def split_sentinel_render(rendered: str) -> list[Element]:
    elements, pos = [], 0
    for m in SENTINEL.finditer(rendered):
        if m.start() > pos:
            elements.append(Element(rendered[pos : m.start()], None, pos))
        elements.append(Element(m.group(0), int(m.group(1)), m.start()))
        pos = m.end()
    if pos < len(rendered):
        elements.append(Element(rendered[pos:], None, pos))
    return elements


def align(elements: list[Element], real: str, slots: list[Slot]) -> Slot | str | None:
    """Fill in each element's real text and offset. None when they rebuild `real` exactly;
    else the slot whose text the template changed (or the markup that differs)."""
    pos = 0
    for k, el in enumerate(elements):
        el.real_start = pos
        if el.slot is None:
            if not real.startswith(el.text_in_sentinel_render, pos):
                return el.text_in_sentinel_render
            el.real_text = el.text_in_sentinel_render
        else:
            following = elements[k + 1] if k + 1 < len(elements) else None
            for candidate in candidates(slots[el.slot].text):
                end = pos + len(candidate)
                if not real.startswith(candidate, pos):
                    continue
                if following is None:
                    if end == len(real):
                        break
                elif following.slot is not None or real.startswith(
                    following.text_in_sentinel_render, end
                ):
                    break
            else:
                return slots[el.slot]
            el.real_text = candidate
        pos += len(el.real_text)
    return None if pos == len(real) else real[pos : pos + 40]


def to_real_offset(elements: list[Element], p: int) -> int:
    for el in elements:
        end = el.sentinel_start + len(el.text_in_sentinel_render)
        if el.slot is None and el.sentinel_start <= p <= end:
            return el.real_start + (p - el.sentinel_start)
        if el.slot is not None and p == el.sentinel_start:
            return el.real_start
        if el.slot is not None and p == end:
            return el.real_start + len(el.real_text)
    raise ValueError(f"offset {p} falls inside a slot")

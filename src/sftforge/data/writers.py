"""Conversations -> records of a chosen format: the way back from data/formats.py, for
`sftforge data convert`; and the records that `dedup` and `filter` keep, written as the input
had them.

Each writer is the inverse of a reader, and `to_record` proves it per record: the record is
read back through its format's reader and must give the same conversation (messages with
their reasoning, tool calls and results, weights; tools; template options; id). A
conversation a format cannot hold (several turns for Alpaca, an untrained turn where the
format has no way to say so, text beside tool calls in ShareGPT) is refused with its reason,
never written half or dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from sftforge.data.formats import FORMATS, META_RECORD
from sftforge.data.messages import Conversation, DataError, Message, Source, ToolCall
from sftforge.errors import InputError


def _to_messages(conversation: Conversation) -> dict:
    """sftforge's messages format, which is also the chat fine-tuning JSONL hosted services
    take (OpenAI's): `weight: 0` marks an assistant turn that is not trained; reasoning,
    tool calls (arguments as JSON strings), tool results, the tools offered and the
    template's options are kept."""
    record: dict = {"messages": [m.as_json() for m in conversation.messages]}
    return record | _beside_messages(conversation)


def _beside_messages(conversation: Conversation, tools_as_text: bool = False) -> dict:
    """What a record holds beside its turns: its id, tools and template options (the
    tools as a JSON string where LLaMA-Factory's ShareGPT wants them so)."""
    extra: dict = {}
    if "id" in conversation.meta:
        extra["id"] = conversation.meta["id"]
    if conversation.tools:
        tools = list(conversation.tools)
        if tools_as_text:
            tools = json.dumps([_flat(tool) for tool in tools], ensure_ascii=False)
        extra["tools"] = tools
    if conversation.template_options:
        extra["chat_template_kwargs"] = conversation.template_options
    return extra


def _to_sharegpt(conversation: Conversation) -> dict:
    """ShareGPT as LLaMA-Factory writes it: human/gpt turns; an assistant turn that only
    calls tools as a `function_call` turn whose value is the JSON of its call(s) ({"name",
    "arguments"}, a list for parallel calls; a call's `id` beside them); a tool result as
    an `observation` turn (its `tool_call_id` and `name` beside its value); reasoning as a
    <think> block opening the gpt value (as LLaMA-Factory's reasoning templates read it);
    `tools` as a JSON string column."""
    _all_trained(conversation, "sharegpt")
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    turns = []
    for i, m in enumerate(conversation.messages):
        before = conversation.messages[i - 1] if i else None
        turn = {"from": names[m.role], "value": m.content}
        if m.tool_calls:
            if m.content or m.reasoning is not None:
                what = "text" if m.content else "reasoning"
                _refuse(
                    conversation,
                    f"messages[{i}]: an assistant turn with {what} beside its tool calls, which "
                    "sharegpt cannot hold (LLaMA-Factory's function_call turn holds calls "
                    "alone): convert to messages instead",
                )
            calls = [_flat_call(call) for call in m.tool_calls]
            value = calls[0] if len(calls) == 1 else calls
            turn = {"from": "function_call", "value": json.dumps(value, ensure_ascii=False)}
        elif m.role == "assistant" and m.reasoning is not None:
            turn["value"] = f"<think>\n{m.reasoning}\n</think>\n\n{m.content}"
        elif m.role == "tool":
            if before is not None and before.role == "tool":
                _refuse(
                    conversation,
                    f"messages[{i}]: a second tool result in a row (parallel calls), which "
                    "sharegpt cannot hold (LLaMA-Factory takes one observation per "
                    "function_call turn): convert to messages instead",
                )
            beside = {"tool_call_id": m.tool_call_id, "name": m.name}
            turn |= {key: value for key, value in beside.items() if value is not None}
        turns.append(turn)
    return {"conversations": turns} | _beside_messages(conversation, tools_as_text=True)


def _flat_call(call: ToolCall) -> dict:
    flat = {"name": call.name, "arguments": call.arguments}
    return flat | {"id": call.id} if call.id is not None else flat


def _flat(tool: dict) -> dict:
    """A function definition as LLaMA-Factory lists it ({"name", "description",
    "parameters"}) when it is OpenAI's {"type": "function", "function": {...}} and no more."""
    if set(tool) == {"type", "function"} and tool["type"] == "function":
        return tool["function"]
    return tool


def _to_prompt_completion(conversation: Conversation) -> dict:
    """The last assistant turn is the completion; everything before it, the prompt: a string
    when it is one user message (the completion too, when it is text alone), else lists of
    messages (TRL's conversational prompt-completion), with tools and options beside."""
    _all_trained(conversation, "prompt_completion")
    *before, last = conversation.messages
    if last.role != "assistant":
        raise DataError(conversation.source, "does not end with an assistant turn", "messages")
    if len(before) == 1 and before[0].role == "user":
        prompt = before[0].content
    else:
        prompt = [m.as_json() for m in before]
    plain = last.as_json() == {"role": "assistant", "content": last.content}
    completion = last.content if plain else [last.as_json()]
    return {"prompt": prompt, "completion": completion} | _beside_messages(conversation)


def _to_alpaca(conversation: Conversation) -> dict:
    """[system,] user, assistant: the user turn becomes the instruction (input left empty,
    which reads back as the same user turn)."""
    _all_trained(conversation, "alpaca")
    _no_tools_or_reasoning(conversation, "alpaca")
    roles = [m.role for m in conversation.messages]
    system = None
    messages = conversation.messages
    if roles[:1] == ["system"]:
        system, messages, roles = messages[0].content, messages[1:], roles[1:]
    if roles != ["user", "assistant"]:
        raise DataError(
            conversation.source,
            f"{len(roles)} turns ({', '.join(roles)}); alpaca holds one user turn and one "
            "assistant turn: convert to messages or sharegpt instead",
            "messages",
        )
    record = {"instruction": messages[0].content, "input": "", "output": messages[1].content}
    if system is not None:
        record["system"] = system
    return record | _beside_messages(conversation)


def _to_text(conversation: Conversation) -> dict:
    if not conversation.is_raw_text:
        raise DataError(conversation.source, "a chat, not raw text", "messages")
    return {"text": conversation.text} | _beside_messages(conversation)


def _all_trained(conversation: Conversation, format: str) -> None:
    for i, m in enumerate(conversation.messages):
        if m.role == "assistant" and not m.trained:
            raise DataError(
                conversation.source,
                f"an assistant turn that is not trained (weight 0), which {format} cannot "
                "express: convert to messages (or openai) instead",
                f"messages[{i}]",
            )


def _no_tools_or_reasoning(conversation: Conversation, format: str) -> None:
    found = [("the tools offered", "tools")] if conversation.tools else []
    if conversation.template_options:
        found.append(("template options", "chat_template_kwargs"))
    for i, m in enumerate(conversation.messages):
        if m.tool_calls or m.role == "tool":
            found.append(("tool calls" if m.tool_calls else "a tool result", f"messages[{i}]"))
        if m.reasoning is not None:
            found.append(("reasoning", f"messages[{i}]"))
    if found:
        what, where = found[0]
        reason = f"{what} ({where}), which {format} cannot hold: convert to messages instead"
        _refuse(conversation, reason)


def _refuse(conversation: Conversation, reason: str) -> NoReturn:
    raise DataError(conversation.source, reason)


WRITERS: dict[str, Callable[[Conversation], dict]] = {
    "messages": _to_messages,
    "openai": _to_messages,  # the same records: OpenAI's chat fine-tuning JSONL
    "sharegpt": _to_sharegpt,
    "prompt_completion": _to_prompt_completion,
    "alpaca": _to_alpaca,
    "text": _to_text,
}
READ_AS = {"openai": "messages"}  # the reader of each writer's records, where named otherwise


def to_record(conversation: Conversation, format: str) -> dict:
    """`conversation` as a record of `format`, proven to read back as the same conversation
    (else a DataError saying what the format cannot hold). A raw-text conversation stays
    text whatever the format, since it has no turns to lay out."""
    if format not in WRITERS:
        raise InputError(f"unknown output format '{format}'; expected one of {', '.join(WRITERS)}")
    if conversation.is_raw_text:
        format = "text"
    record = WRITERS[format](conversation)
    _check_reads_back(conversation, record, format)
    return record


def _check_reads_back(conversation: Conversation, record: dict, format: str) -> None:
    """Read `record` as a file would give it back and compare it with `conversation`."""
    again = json.loads(json.dumps(record, ensure_ascii=False, default=str))
    try:
        again = FORMATS[READ_AS.get(format, format)].read(again, conversation.source)
    except DataError as err:
        where = f"{err.field}: " if err.field else ""
        reason = f"written as {format}, it would not read back ({where}{err.reason})"
        raise DataError(conversation.source, reason) from None
    changed = _first_difference(conversation, again)
    if changed:
        reason = f"{changed}: {format} would read it back changed; it cannot hold it exactly"
        raise DataError(conversation.source, reason)


def _first_difference(a: Conversation, b: Conversation) -> str | None:
    """Where `b` first differs from `a` ("messages[2].tool_calls", "tools", ...), or None."""
    if a.text != b.text:
        return "text"
    if len(a.messages) != len(b.messages):
        return f"messages ({len(b.messages)} instead of {len(a.messages)})"
    for i, (x, y) in enumerate(zip(a.messages, b.messages, strict=True)):
        for name in (f.name for f in dataclasses.fields(Message)):
            if getattr(x, name) != getattr(y, name):
                return f"messages[{i}].{name}"
    for name in ("tools", "template_options"):
        if getattr(a, name) != getattr(b, name):
            return name
    if a.meta.get("id") != b.meta.get("id"):
        return "id"
    return None


def conversation_record(conversation: Conversation) -> dict:
    """The record sftforge reads back as `conversation`: its messages record (`weight: 0` on
    an assistant turn kept as context only; reasoning, tool calls and results, tools, template
    options and id kept), or {"text": ...}. What the rejects of encoding show."""
    return _to_text(conversation) if conversation.is_raw_text else _to_messages(conversation)


def record_as_read(conversation: Conversation) -> tuple[str, dict]:
    """(format, record): the record `conversation` was read from, every field as the input
    had it (known to sftforge or not), when the loader kept it (`keep_records=True`); else
    its `conversation_record`."""
    record = conversation.meta.get(META_RECORD)
    if record is not None:
        return conversation.meta.get("format", "?"), record
    return ("text" if conversation.is_raw_text else "messages"), conversation_record(conversation)


def write_conversations(path: str | Path, conversations: Iterable[Conversation]) -> None:
    """Each conversation's `record_as_read`, one per line, in the given order: what `dedup`
    and `filter` write for the records they keep. A file holds records of one format, since
    a reader detects the format from its first record: one of another format is a DataError
    (and nothing is written); convert the inputs to one format first."""
    first: list = []

    def records():
        for conversation in conversations:
            format, record = record_as_read(conversation)
            if not first:
                first.extend((format, conversation.source))
            elif format != first[0]:
                reason = (
                    f"a {format} record after {first[0]} ones ({first[1]}); one output file "
                    "holds one format: convert the inputs to one first (sftforge data "
                    "convert FILES --to messages -o all.jsonl)"
                )
                raise DataError(conversation.source, reason)
            yield record

    write_jsonl(path, records())


def conversation_as_json(conversation: Conversation) -> dict:
    """A Conversation whole, source and all, as JSON (`conversation_from_json` reads it)."""
    return {
        "source": dataclasses.asdict(conversation.source),
        "messages": [dataclasses.asdict(m) for m in conversation.messages],
        "text": conversation.text,
        "meta": conversation.meta,
        "tools": list(conversation.tools),
        "template_options": conversation.template_options,
    }


def conversation_from_json(record: dict) -> Conversation:
    messages = tuple(
        Message(**{**m, "tool_calls": tuple(ToolCall(**c) for c in m.get("tool_calls", ()))})
        for m in record["messages"]
    )
    return Conversation(
        Source(**record["source"]),
        messages,
        record["text"],
        record["meta"],
        tuple(record.get("tools", ())),
        record.get("template_options", {}),
    )


def write_jsonl(path: str | Path, lines: Iterable[dict]) -> None:
    """One JSON object per line, written whole or not at all (see `JsonlWriter`)."""
    with JsonlWriter(path) as out:
        for line in lines:
            out.write(line)


class JsonlWriter:
    """Writes one JSON object per line as they come, holding none, and whole or not at all:
    into a hidden file beside `path` that replaces it when the `with` block ends without an
    error, so a failed write leaves no half file, and an input may be rewritten in place (it
    was read already). Several may be open at once (kept and rejected records)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._temporary = self.path.with_name(f".{self.path.name}.writing-{os.getpid()}")

    def __enter__(self) -> JsonlWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._temporary, "w", encoding="utf-8")
        return self

    def write(self, line: dict) -> None:
        # default=str: Parquet and datasets rows may hold dates or bytes.
        self._file.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def __exit__(self, error_type, error, traceback) -> None:
        self._file.close()
        try:
            if error_type is None:
                os.replace(self._temporary, self.path)
        finally:
            self._temporary.unlink(missing_ok=True)


REFUSED_HELD = 20  # refused records a Written names; every one is counted (and written, if asked)


@dataclass
class Written:
    path: Path
    count: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (source, reason), the first ones
    refused_count: int = 0  # every record the format could not hold


def write_records(
    conversations: Iterable[Conversation], format: str, path: Path, rejects=None
) -> Written:
    """Write each conversation as one JSON line of `format`, in order, as they come; those
    the format cannot hold are left out, counted, the first REFUSED_HELD named with their
    reasons, and each added to `rejects` (a loading.Rejects) with its record when given."""
    if format not in WRITERS:
        raise InputError(f"unknown output format '{format}'; expected one of {', '.join(WRITERS)}")
    written = Written(Path(path))
    with JsonlWriter(path) as out:
        for conversation in conversations:
            try:
                record = to_record(conversation, format)
            except DataError as err:
                written.refused_count += 1
                if len(written.refused) < REFUSED_HELD:
                    written.refused.append((str(conversation.source), err.reason))
                if rejects is not None:
                    rejects.add(conversation.source, err.reason, record_as_read(conversation)[1])
                continue
            out.write(record)
        written.count = out.count
    return written

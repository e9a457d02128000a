"""Conversations -> records of a chosen format: the way back from formats.py, for
`sftforge data convert` and for the records that `dedup` and `filter` keep.

Each writer is the inverse of a reader: a conversation written in a format and read back is
the same conversation. A conversation a format cannot hold (several turns for Alpaca, an
untrained turn where the format has no way to say so) is refused with its reason, never
written half or dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .messages import Conversation, DataError, Message, Source, ToolCall


def _trained(message) -> bool:
    return getattr(message, "trained", True)


def _to_messages(conversation: Conversation) -> dict:
    """sftforge's messages format, which is also the chat fine-tuning JSONL hosted services
    take (OpenAI's): `weight: 0` marks an assistant turn that is not trained; reasoning,
    tool calls (arguments as JSON strings), tool results, the tools offered and the
    template's options are kept."""
    record: dict = {"messages": [m.as_json() for m in conversation.messages]}
    return record | _beside_messages(conversation)


def _beside_messages(conversation: Conversation) -> dict:
    """What a chat record holds beside its turns: its id, tools and template options."""
    extra: dict = {}
    if "id" in conversation.meta:
        extra["id"] = conversation.meta["id"]
    if conversation.tools:
        extra["tools"] = list(conversation.tools)
    if conversation.template_options:
        extra["chat_template_kwargs"] = conversation.template_options
    return extra


def _to_sharegpt(conversation: Conversation) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    _all_trained(conversation, "sharegpt")
    return {
        "conversations": [
            {"from": names[m.role], "value": m.content} for m in conversation.messages
        ]
    }


def _to_prompt_completion(conversation: Conversation) -> dict:
    """The last assistant turn is the completion; everything before it, the prompt (a string
    when it is one user message, else a list of messages)."""
    _all_trained(conversation, "prompt_completion")
    *before, last = conversation.messages
    if last.role != "assistant":
        raise DataError(conversation.source, "does not end with an assistant turn", "messages")
    if len(before) == 1 and before[0].role == "user":
        prompt = before[0].content
    else:
        prompt = [{"role": m.role, "content": m.content} for m in before]
    return {"prompt": prompt, "completion": last.content}


def _to_alpaca(conversation: Conversation) -> dict:
    """[system,] user, assistant: the user turn becomes the instruction (input left empty,
    which reads back as the same user turn)."""
    _all_trained(conversation, "alpaca")
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
    return record


def _to_text(conversation: Conversation) -> dict:
    if not conversation.is_raw_text:
        raise DataError(conversation.source, "a chat, not raw text", "messages")
    return {"text": conversation.text}


def _all_trained(conversation: Conversation, format: str) -> None:
    for i, m in enumerate(conversation.messages):
        if m.role == "assistant" and not _trained(m):
            raise DataError(
                conversation.source,
                f"an assistant turn that is not trained (weight 0), which {format} cannot "
                "express: convert to messages (or openai) instead",
                f"messages[{i}]",
            )


WRITERS: dict[str, Callable[[Conversation], dict]] = {
    "messages": _to_messages,
    "openai": _to_messages,  # the same records: OpenAI's chat fine-tuning JSONL
    "sharegpt": _to_sharegpt,
    "prompt_completion": _to_prompt_completion,
    "alpaca": _to_alpaca,
    "text": _to_text,
}


def to_record(conversation: Conversation, format: str) -> dict:
    """`conversation` as a record of `format`; a raw-text conversation stays text whatever
    the format, since it has no turns to lay out."""
    if conversation.is_raw_text:
        return _to_text(conversation)
    return WRITERS[format](conversation)


def conversation_record(conversation: Conversation) -> dict:
    """The record sftforge reads back as `conversation`: {"messages": [...]} (with `weight: 0`
    on an assistant turn kept as context only), or {"text": ...}. What `dedup` and `filter`
    write for the records they keep."""
    return to_record(conversation, "messages")


def write_conversations(path: str | Path, conversations: Iterable[Conversation]) -> None:
    """One `conversation_record` per line, in the given order. (A file mixing chat and
    raw-text records reads back only with the format given, since detection is per file.)"""
    write_jsonl(path, (conversation_record(c) for c in conversations))


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
    """One JSON object per line, written whole or not at all: into a hidden file beside
    `path` that then replaces it, so a failed write leaves no half file, and an input may be
    rewritten in place (it was read already)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.writing-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            for line in lines:
                # default=str: Parquet and datasets rows may hold dates or bytes.
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@dataclass
class Written:
    path: Path
    count: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


def write_records(conversations: Iterable[Conversation], format: str, path: Path) -> Written:
    """Write each conversation as one JSON line of `format`, in order; those the format
    cannot hold are left out and returned with their reasons."""
    if format not in WRITERS:
        raise ValueError(f"unknown output format '{format}'; expected one of {', '.join(WRITERS)}")
    written = Written(Path(path))

    def records():
        for conversation in conversations:
            try:
                record = to_record(conversation, format)
            except DataError as err:
                written.refused.append((str(conversation.source), err.reason))
                continue
            written.count += 1
            yield record

    write_jsonl(path, records())
    return written

"""The pieces encode/encoder.py builds an example from: Atoms (a run of text, or one special
token, with its trained flag and, once tokenized, its ids' range), how neighbouring text
runs join, and the checks on a conversation's data before it is rendered."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sftforge.data.messages import Conversation, DataError

SPLITS_KEPT = 65536  # template texts whose split at special tokens (or ids) is remembered


@dataclass(slots=True)
class Atom:
    text: str
    special: bool
    trained: bool
    segment: int  # index of the stretch between two cuts that this text lies in
    from_template: bool  # template text only, no message's: the same in many conversations
    tokens: tuple[int, int] = (0, 0)  # [start, end) of its ids, once tokenized
    string_start: bool = False  # tokenized as a string of its own, prefix space and all


def refuse_special_text_in_structure(conversation: Conversation, special_pattern) -> None:
    """Data never becomes special tokens. Message text cannot (it is never read for
    them); tool definitions and argument names reach the template as structure, not
    slots (encode/slots.py), so special-token text in them is refused here."""
    structure = [conversation.tools] if conversation.tools else []
    for m in conversation.messages:
        structure += [_keys_within(call.arguments) for call in m.tool_calls]
    if not structure:
        return
    found = special_pattern.search(json.dumps(structure, ensure_ascii=False))
    if found:
        raise DataError(
            conversation.source,
            f"holds the text {found.group(0)!r}, a special token of this tokenizer, in a "
            "tool definition or an argument's name; it would become that token. Remove it",
            "tools",
        )


def field_of(conversation: Conversation) -> str:
    """The record field a chat came from, for errors: `conversations` for ShareGPT."""
    return "conversations" if conversation.meta.get("format") == "sharegpt" else "messages"


def _keys_within(value) -> list:
    """Every key of the dicts nested in `value` (arguments' names at any depth)."""
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in _keys_within(v))]
    if isinstance(value, list):
        return [k for v in value for k in _keys_within(v)]
    return []


def remember(memory: dict, key, value) -> None:
    """Keep `value` under `key`; a memory grown to SPLITS_KEPT entries starts over (the texts
    of a template are few: more means text that differs each time, not worth keeping)."""
    if len(memory) >= SPLITS_KEPT:
        memory.clear()
    memory[key] = value


def merge_text_runs(atoms: list[Atom]) -> list[Atom]:
    """Join neighbouring plain-text atoms between the same two cuts, so text between two
    special tokens is tokenized as one run (as a tokenizer does with a whole prompt), but
    never across the start or end of an assistant turn. (Joined in place: the atoms are
    made afresh for each conversation.)"""
    merged: list[Atom] = []
    prev = None
    for atom in atoms:
        if prev and not prev.special and not atom.special and prev.segment == atom.segment:
            prev.text += atom.text
            prev.from_template = prev.from_template and atom.from_template
        else:
            merged.append(atom)
            prev = atom
    return merged

"""Records in -> validated Conversations out.

`load_conversations` reads files, folders or a `datasets.Dataset` (see `readers.py`), works
out each file's format from its first valid record, converts every record and validates it.
Every problem is a `DataError` naming the record's file:line (or file[row N]) and field.
By default the first one is raised; with `on_invalid="skip"` every rejected record is kept
in `Rejects` (and optionally written as JSONL) so nothing is ever dropped silently.

To support a new format: add a `_from_<format>` converter, list it in `_CONVERTERS` and
`FORMATS`, and add the keys that identify it to `KEYS_OF_FORMAT`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sftforge.conversation import Conversation, DataError, Message, Source
from sftforge.readers import RawRecord, read_sources

if TYPE_CHECKING:
    import datasets

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
ON_INVALID = ("error", "skip")

# The keys that identify each format, tried in this order because real datasets carry extra
# columns: Alpaca ships a pre-rendered `text` next to instruction/output, chat sets often too.
KEYS_OF_FORMAT = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
# The fields a `columns` mapping may rename a dataset's columns to.
FIELDS = ("instruction", "input", "output", "system", "messages", "conversations", "prompt")
FIELDS += ("completion", "text")

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# ShareGPT dumps often mix the chat names into the ShareGPT ones, so both are accepted.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
SHAREGPT_ROLES |= {"user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str
    record: Any  # the raw record, or the raw line text when it did not parse


class Rejects:
    """Collects rejected records with their reason; never lose a record silently."""

    def __init__(self) -> None:
        self._items: list[Reject] = []

    def add(self, source: Source | str, reason: str, record: object) -> None:
        self._items.append(Reject(str(source), reason, record))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Reject]:
        return iter(self._items)

    def write_jsonl(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for item in self._items:
                line = {"source": item.source, "reason": item.reason, "record": item.record}
                # default=str: Parquet and datasets rows may hold dates or bytes.
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


@dataclass
class LoadResult:
    conversations: list[Conversation]
    rejects: Rejects
    formats: dict[str, int]  # detected format -> number of files/datasets of that format
    duplicates: int  # conversations exactly repeating an earlier one (kept, only counted)
    files: list[str] = field(default_factory=list)  # every file or dataset read, in order
    rejects_path: Path | None = None  # where the rejects were written, if anywhere

    def summary(self) -> str:
        valid, rejected = len(self.conversations), len(self.rejects)
        written = f" -> written to {self.rejects_path}" if self.rejects_path else ""
        formats = ", ".join(f"{name}: {count}" for name, count in self.formats.items())
        lines = [
            f"files read:   {len(self.files)}",
            f"records read: {valid + rejected}",
            f"valid:        {valid}",
            f"rejected:     {rejected}{written}",
        ]
        if rejected:
            first = next(iter(self.rejects))
            lines.append(f"  first:      {first.source}: {first.reason}")
        lines.append(f"duplicates:   {self.duplicates} (kept; exact repeats of an earlier one)")
        lines.append(f"formats:      {formats or 'none detected'}")
        return "\n".join(lines)


def load_conversations(
    data: str | Path | list[str | Path] | datasets.Dataset,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    on_invalid: str = "error",
    rejects_path: str | Path | None = None,
) -> LoadResult:
    """Read `data` (a .json/.jsonl/.parquet/.csv file, a folder of them, a list, or a Dataset).

    With format="auto" each file's format is detected from its first valid record and then
    holds for the whole file. `columns` maps our field names to the dataset's column names.
    on_invalid="error" raises the first DataError; "skip" rejects bad records and goes on,
    writing them to `rejects_path` (always, even when empty, so an old file never misleads).
    """
    _check_choice("format", format, FORMATS)
    _check_choice("on_invalid", on_invalid, ON_INVALID)
    _check_columns(columns)
    result = LoadResult(conversations=[], rejects=Rejects(), formats={}, duplicates=0)
    for name, raw_records in read_sources(data):
        result.files.append(name)
        file_format = None if format == "auto" else format
        for raw in raw_records:
            try:
                record = _record_from(raw, columns)
                file_format = file_format or _detect_format(record, raw.source)
                result.conversations.append(_convert(record, raw.source, file_format, columns))
            except DataError as err:
                if on_invalid == "error":
                    raise
                result.rejects.add(raw.source, _reason(err), raw.record)
        if file_format:
            result.formats[file_format] = result.formats.get(file_format, 0) + 1
    result.duplicates = _count_duplicates(result.conversations)
    if on_invalid == "skip" and rejects_path is not None:
        result.rejects.write_jsonl(rejects_path)
        result.rejects_path = Path(rejects_path)
    return result


def conversation_from_record(
    record: dict, source: Source, format: str, columns: dict[str, str] | None = None
) -> Conversation:
    """Convert and validate one record; raises DataError naming `source` and the field."""
    _check_choice("format", format, FORMATS)
    _check_columns(columns)
    record = _record_from(RawRecord(source, record), columns)
    if format == "auto":
        format = _detect_format(record, source)
    return _convert(record, source, format, columns)


def detect_format(record: dict, columns: dict[str, str] | None = None) -> str:
    """Name the format whose keys `record` has; raises DataError when none fits."""
    _check_columns(columns)
    source = Source("record")
    return _detect_format(_record_from(RawRecord(source, record), columns), source)


def _detect_format(record: dict, source: Source) -> str:
    for format, keys in KEYS_OF_FORMAT.items():
        if all(key in record for key in keys):
            return format
    known = ", ".join(f"{format} ({', '.join(keys)})" for format, keys in KEYS_OF_FORMAT.items())
    raise DataError(
        source,
        f"cannot detect the format from keys {_keys(record)}; known formats: {known}; "
        "pass format=... or map your column names with columns={'output': 'response', ...}",
    )


def _record_from(raw: RawRecord, columns: dict[str, str] | None) -> dict:
    """The parsed record with the `columns` mapping applied, or a DataError saying why not."""
    if raw.error:
        raise DataError(raw.source, raw.error)
    if not isinstance(raw.record, dict):
        found = _type_name(raw.record)
        raise DataError(raw.source, f"expected a JSON object (a record), found {found}")
    if not columns:
        return raw.record
    renamed = {k: v for k, v in raw.record.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs not in raw.record:
            reason = f"missing (mapped to '{ours}' by columns); found keys {_keys(raw.record)}"
            raise DataError(raw.source, reason, theirs)
        renamed[ours] = raw.record[theirs]
    return renamed


def _convert(
    record: dict, source: Source, format: str, columns: dict[str, str] | None
) -> Conversation:
    try:
        return _CONVERTERS[format](record, source)
    except DataError as err:
        # Name the field as the user's dataset spells it, not as we renamed it.
        if columns and err.field:
            raise DataError(err.source, err.reason, _dataset_field(err.field, columns)) from None
        raise


def _dataset_field(field_path: str, columns: dict[str, str]) -> str:
    for ours, theirs in columns.items():
        if field_path == ours or field_path.startswith((f"{ours}[", f"{ours}.")):
            return theirs + field_path[len(ours) :]
    return field_path


# -- one converter per format -------------------------------------------------------------


class Turn(NamedTuple):
    """A message plus the record fields it came from, so order errors can point at them."""

    message: Message
    role_field: str
    content_field: str


def _from_alpaca(record: dict, source: Source) -> Conversation:
    """[system?], user, assistant.

    The user turn is the instruction, then a blank line ("\\n\\n"), then the input when the
    input is not empty: the layout of the original Alpaca prompt, without its preamble.
    An empty system column is left out rather than rendered as an empty system turn.
    """
    instruction = _require_str(record, "instruction", source)
    extra_input = _optional_str(record, "input", source)
    output = _require_str(record, "output", source)
    system = _optional_str(record, "system", source)
    turns = []
    if system.strip():
        turns.append(Turn(Message("system", system), "system", "system"))
    user = "\n\n".join(part for part in (instruction, extra_input) if part.strip())
    turns.append(Turn(Message("user", user), "instruction", "instruction"))
    turns.append(Turn(Message("assistant", output), "output", "output"))
    return _conversation(turns, source, "instruction", "alpaca")


def _from_messages(record: dict, source: Source) -> Conversation:
    value = _message_list(record, "messages", source)
    turns = _turns(value, "messages", source, "role", "content", CHAT_ROLES)
    return _conversation(turns, source, "messages", "messages")


def _from_sharegpt(record: dict, source: Source) -> Conversation:
    value = _message_list(record, "conversations", source)
    turns = _turns(value, "conversations", source, "from", "value", SHAREGPT_ROLES)
    return _conversation(turns, source, "conversations", "sharegpt")


def _from_prompt_completion(record: dict, source: Source) -> Conversation:
    """A string prompt/completion is one user/assistant message; a list is its messages."""
    turns = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        _require(record, name, source)
        value = record[name]
        if isinstance(value, str):
            turns.append(Turn(Message(role, value), name, name))
        elif isinstance(value, (list, tuple)):
            turns.extend(_turns(value, name, source, "role", "content", CHAT_ROLES))
        else:
            reason = f"expected a string or a list of messages, found {_type_name(value)}"
            raise DataError(source, reason, name)
    return _conversation(turns, source, "completion", "prompt_completion")


def _from_text(record: dict, source: Source) -> Conversation:
    text = _require_str(record, "text", source)
    if not text.strip():
        raise DataError(source, "empty text: nothing to train on", "text")
    return Conversation(source=source, text=text, meta={"format": "text"})


_CONVERTERS = {
    "alpaca": _from_alpaca,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}


def _turns(
    value: Any, name: str, source: Source, role_key: str, content_key: str, roles: dict[str, str]
) -> list[Turn]:
    """Parse a list of {role_key, content_key} objects, mapping role names through `roles`."""
    turns = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            found = _type_name(item)
            reason = f"expected an object with '{role_key}' and '{content_key}', found {found}"
            raise DataError(source, reason, where)
        role_field, content_field = f"{where}.{role_key}", f"{where}.{content_key}"
        role_name = _require_str(item, role_key, source, role_field)
        if role_name not in roles:
            reason = f"unknown role '{role_name}'; expected one of {', '.join(roles)}"
            raise DataError(source, reason, role_field)
        content = _require_str(item, content_key, source, content_field)
        turns.append(Turn(Message(roles[role_name], content), role_field, content_field))
    return turns


def _message_list(record: dict, name: str, source: Source) -> list | tuple:
    """The list of messages under `name`, parsed first if it is a JSON string (CSV cells)."""
    _require(record, name, source)
    value = record[name]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            reason = f"expected a list of messages, found a string that is not JSON ({err.msg})"
            raise DataError(source, reason, name) from None
    if not isinstance(value, (list, tuple)):
        raise DataError(source, f"expected a list of messages, found {_type_name(value)}", name)
    return value


def _conversation(turns: list[Turn], source: Source, name: str, format: str) -> Conversation:
    _check_turn_order(turns, source, name)
    messages = tuple(turn.message for turn in turns)
    return Conversation(source=source, messages=messages, meta={"format": format})


def _check_turn_order(turns: list[Turn], source: Source, name: str) -> None:
    """Reject what no chat template can render or nothing can be learned from."""
    if not turns:
        raise DataError(source, "empty conversation: no messages", name)
    for i, turn in enumerate(turns):
        if turn.message.role == "system" and i > 0:
            reason = "a second system message; only one is allowed, and it must come first"
            if turns[0].message.role != "system":
                reason = f"system message at position {i}; the system message must come first"
            raise DataError(source, reason, turn.role_field)
    dialogue = turns[1:] if turns[0].message.role == "system" else turns
    if not any(turn.message.role == "assistant" for turn in dialogue):
        raise DataError(source, "no assistant turn: nothing to train on", name)
    first = dialogue[0]
    if first.message.role != "user":
        reason = f"the first non-system message must be from the user, found '{first.message.role}'"
        raise DataError(source, reason, first.role_field)
    for previous, turn in pairwise(dialogue):
        if turn.message.role == previous.message.role:
            role = turn.message.role
            reason = f"'{role}' follows '{role}'; user and assistant turns must alternate"
            raise DataError(source, reason, turn.role_field)
    if dialogue[-1].message.role == "user":
        reason = (
            "conversation ends on a user turn, so nothing is learned from it; "
            "end with an assistant reply or drop the trailing user message"
        )
        raise DataError(source, reason, dialogue[-1].role_field)
    for turn in dialogue:
        if turn.message.role == "assistant" and not turn.message.content.strip():
            raise DataError(source, "empty assistant turn: nothing to learn", turn.content_field)


# -- small helpers --------------------------------------------------------------------------


def _require(record: dict, key: str, source: Source, field_path: str | None = None) -> None:
    if key not in record:
        raise DataError(source, f"missing; found keys {_keys(record)}", field_path or key)


def _require_str(record: dict, key: str, source: Source, field_path: str | None = None) -> str:
    _require(record, key, source, field_path)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(source, f"expected a string, found {_type_name(value)}", field_path or key)
    return value


def _optional_str(record: dict, key: str, source: Source) -> str:
    # Missing and null mean "not given": Parquet and datasets fill absent columns with null.
    if record.get(key) is None:
        return ""
    return _require_str(record, key, source)


def _type_name(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"number ({value})"
    names = {type(None): "null", bool: "boolean", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _keys(record: dict) -> str:
    return "(" + ", ".join(map(str, record)) + ")" if record else "(none)"


def _reason(err: DataError) -> str:
    return f"field '{err.field}': {err.reason}" if err.field else err.reason


def _count_duplicates(conversations: list[Conversation]) -> int:
    # Source is part of Conversation equality, so compare only what would be trained on.
    contents = [(conversation.messages, conversation.text) for conversation in conversations]
    return len(contents) - len(set(contents))


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _check_columns(columns: dict[str, str] | None) -> None:
    # The mapping goes ours -> theirs; the reverse ({'response': 'output'}) is an easy slip.
    unknown = [ours for ours in columns or {} if ours not in FIELDS]
    if unknown:
        raise ValueError(
            f"columns maps our field names to your column names, e.g. {{'output': 'response'}}; "
            f"{', '.join(map(repr, unknown))} is not one of our fields: {', '.join(FIELDS)}"
        )

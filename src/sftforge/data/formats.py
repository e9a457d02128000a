"""Records -> Conversations: the one shape every demonstration takes, and the table of data
formats that become it.

A Conversation always knows where it came from (its Source: file and line, or row), so any
later error can name the record that caused it. Every problem with a record is a DataError
naming that source and the field.

To support a new format, write a `_from_<format>` converter and add one entry to `FORMATS`:
the keys that detect it, any optional keys it reads, and the converter. The config, the
detection and the `columns` mapping all read that table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

from sftforge.data.chat_messages import message_of, text_parts
from sftforge.data.messages import (
    Conversation,
    DataError,
    Message,
    Source,
    ToolCall,
    keys_of,
    type_name,
)
from sftforge.data.messages import require as _require
from sftforge.data.messages import require_str as _require_str
from sftforge.data.tools import check_tool_flow, parse_json_text, parse_tool_calls, parse_tools

# The allowed values of the config's fixed-choice keys.


# The types live in data/messages.py; they are named here too, beside the formats that make them.
__all__ = [
    "FIELDS",
    "FORMATS",
    "Conversation",
    "DataError",
    "Message",
    "Source",
    "ToolCall",
    "keys_of",
    "type_name",
]


# -- the formats ----------------------------------------------------------------------

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
CHAT_ROLES |= {"function": "tool"}  # OpenAI's older name for a function's result
# ShareGPT dumps often mix the chat names into the ShareGPT ones, so both are accepted;
# LLaMA-Factory writes an assistant's calls as `function_call` turns, results as `observation`.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
SHAREGPT_ROLES |= {"function_call": "assistant", "observation": "tool"} | CHAT_ROLES


class Turn(NamedTuple):
    """A message plus the record fields it came from, so order errors can point at them."""

    message: Message
    role_field: str
    content_field: str


def _instruction_turns(record: dict, source: Source, input_key: str, output_key: str) -> list[Turn]:
    """[system?], user, assistant, from an instruction, an input and an output.

    The user turn is the instruction, then a blank line ("\\n\\n"), then the input when the
    input is not empty: the layout of the original Alpaca prompt, without its preamble.
    An empty system column is left out rather than rendered as an empty system turn.
    """
    instruction = _require_str(record, "instruction", source)
    extra_input = _optional_str(record, input_key, source)
    output = _require_str(record, output_key, source)
    system = _optional_str(record, "system", source)
    turns = []
    if system.strip():
        turns.append(Turn(Message("system", system), "system", "system"))
    user = "\n\n".join(part for part in (instruction, extra_input) if part.strip())
    turns.append(Turn(Message("user", user), "instruction", "instruction"))
    turns.append(Turn(Message("assistant", output), output_key, output_key))
    return turns


def _from_alpaca(record: dict, source: Source) -> Conversation:
    turns = _instruction_turns(record, source, "input", "output")
    return _conversation(turns, source, "instruction", "alpaca")


def _from_dolly(record: dict, source: Source) -> Conversation:
    """Databricks Dolly: Alpaca's layout, with `context` as the input and `response` as the
    output; the category (open_qa, summarization, ...) goes into meta."""
    turns = _instruction_turns(record, source, "context", "response")
    conversation = _conversation(turns, source, "instruction", "dolly")
    if category := _optional_str(record, "category", source):
        conversation.meta["category"] = category
    return conversation


def _from_flan(record: dict, source: Source) -> Conversation:
    """FLAN-style records: `inputs` is the user turn, `targets` the assistant's."""
    turns = [
        Turn(Message("user", _require_str(record, "inputs", source)), "inputs", "inputs"),
        Turn(Message("assistant", _require_str(record, "targets", source)), "targets", "targets"),
    ]
    return _conversation(turns, source, "inputs", "flan")


def _from_messages(record: dict, source: Source) -> Conversation:
    """Chat messages, as OpenAI's chat fine-tuning files (tools and tool calls included) and
    Amazon Bedrock's conversation records write them: a content may be a list of text parts
    or null beside tool calls, an assistant message may carry a `weight` (0: context only,
    not trained), and a top-level `system` (a string or Bedrock's [{"text": ...}]) may hold
    the system prompt."""
    items = _message_list(record, "messages", source)
    turns = _turns(items, "messages", source, "role", "content", CHAT_ROLES)
    turns = _weighted(turns, items, source)
    return _chat_conversation(record, turns, source, "messages", "messages")


def _from_sharegpt(record: dict, source: Source) -> Conversation:
    """ShareGPT conversations, with LLaMA-Factory's `function_call` / `observation` turns, a
    `tools` column and a `system` column; Hermes' `tool` turns and <tool_call> blocks."""
    value = _message_list(record, "conversations", source)
    turns = _turns(value, "conversations", source, "from", "value", SHAREGPT_ROLES)
    return _chat_conversation(record, turns, source, "conversations", "sharegpt")


def _from_xlam(record: dict, source: Source) -> Conversation:
    """xLAM function-calling records: a `query`, the `tools` offered and the `answers` (the
    calls that answer it), the last two as JSON strings or lists."""
    query = _require_str(record, "query", source)
    _require(record, "answers", source)
    calls = parse_tool_calls(record["answers"], source, "answers")
    turns = [
        Turn(Message("user", query), "query", "query"),
        Turn(Message("assistant", "", tool_calls=calls), "answers", "answers"),
    ]
    return _chat_conversation(record, turns, source, "answers", "xlam")


def _chat_conversation(
    record: dict, turns: list[Turn], source: Source, name: str, format: str
) -> Conversation:
    """The conversation of a chat record's turns, with what the record holds beside them:
    a top-level system prompt, the tools its prompt shows, the chat template's options."""
    system = _top_level_system(record, source)
    if system.strip():
        inner = next((turn for turn in turns if turn.message.role == "system"), None)
        if inner:
            reason = f"a system prompt here and a system message ({inner.role_field}); keep one"
            raise DataError(source, reason, "system")
        turns.insert(0, Turn(Message("system", system), "system", "system"))
    conversation = _conversation(turns, source, name, format)
    options = parse_json_text(record.get(OPTIONS_KEY), source, OPTIONS_KEY, "an object")
    if options is not None and not isinstance(options, dict):
        raise DataError(source, f"expected an object, found {type_name(options)}", OPTIONS_KEY)
    tools = parse_tools(record.get("tools"), source)
    return replace(conversation, tools=tools, template_options=options or {})


def _from_prompt_completion(record: dict, source: Source) -> Conversation:
    """A string prompt/completion is one user/assistant message; a list is its messages
    (tool calls and results included). As in TRL, `tools` and `chat_template_kwargs`
    columns may go with them."""
    turns = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        _require(record, name, source)
        value = record[name]
        if isinstance(value, str):
            turns.append(Turn(Message(role, value), name, name))
        elif isinstance(value, (list, tuple)):
            turns.extend(_turns(value, name, source, "role", "content", CHAT_ROLES))
        else:
            reason = f"expected a string or a list of messages, found {type_name(value)}"
            raise DataError(source, reason, name)
    return _chat_conversation(record, turns, source, "completion", "prompt_completion")


def _from_oasst_message(record: dict, source: Source) -> Conversation:
    raise DataError(
        source,
        "an OpenAssistant record is one message of a tree, not a conversation: load the whole "
        "file with load_conversations (format oasst or oasst_all), which assembles its trees",
    )


def _from_text(record: dict, source: Source) -> Conversation:
    text = _require_str(record, "text", source)
    if not text.strip():
        raise DataError(source, "empty text: nothing to train on", "text")
    return Conversation(source=source, text=text, meta={"format": "text"})


@dataclass(frozen=True)
class Format:
    keys: tuple[str, ...]  # a record holding all of these keys is of this format
    convert: Callable[[dict, Source], Conversation]
    optional: tuple[str, ...] = ()  # other keys the converter reads when present

    def read(self, record: dict, source: Source) -> Conversation:
        """The record's conversation, with its `id` (any format may have one) in meta."""
        conversation = self.convert(record, source)
        if record.get(ID_KEY) is not None:
            conversation.meta["id"] = record[ID_KEY]
        return conversation


# Per record, options for the chat template (`enable_thinking`), as vLLM and TRL name them.
OPTIONS_KEY = "chat_template_kwargs"
ID_KEY = "id"  # a record's id, kept in meta["id"] and written back by `data convert`
META_RECORD = "record"  # meta key of the record itself, when the loader keeps it (dedup, filter)
CHAT_OPTIONAL = ("system", "tools", OPTIONS_KEY, ID_KEY)
OASST_KEYS = ("message_id", "parent_id", "role", "text")
OASST_OPTIONAL = ("rank", "lang", "deleted")

# The data formats, tried in this order when detecting one, because real datasets carry extra
# columns: Alpaca ships a pre-rendered `text` next to instruction/output, chat sets often too.
FORMATS: dict[str, Format] = {
    "messages": Format(("messages",), _from_messages, optional=CHAT_OPTIONAL),
    "sharegpt": Format(("conversations",), _from_sharegpt, optional=CHAT_OPTIONAL),
    "xlam": Format(("query", "answers"), _from_xlam, optional=CHAT_OPTIONAL),
    "prompt_completion": Format(("prompt", "completion"), _from_prompt_completion, CHAT_OPTIONAL),
    "alpaca": Format(("instruction", "output"), _from_alpaca, ("input", "system", ID_KEY)),
    # Dolly has no `output` and Alpaca no `response`, so each is detected as itself.
    "dolly": Format(("instruction", "response"), _from_dolly, ("context", "category", "system")),
    "flan": Format(("inputs", "targets"), _from_flan),
    # One record per message (with a `text`, so before text): load_conversations assembles a
    # file's trees (data/oasst.py), along each tree's best-ranked path, or every path (oasst_all).
    "oasst": Format(OASST_KEYS, _from_oasst_message, OASST_OPTIONAL),
    "oasst_all": Format(OASST_KEYS, _from_oasst_message, OASST_OPTIONAL),
    "text": Format(("text",), _from_text),
}

DataFormat = Literal[
    ("auto", *sorted(FORMATS))
]  # the config's data.format; auto: detected from each file's keys
# The fields a `columns` mapping may rename a dataset's columns to.
FIELDS = tuple(dict.fromkeys(key for f in FORMATS.values() for key in (*f.keys, *f.optional)))


def _turns(
    value: Any, name: str, source: Source, role_key: str, content_key: str, roles: dict[str, str]
) -> list[Turn]:
    """Parse a list of {role_key, content_key, ...} objects, mapping role names through
    `roles`, with each message's reasoning, tool calls and tool-result fields."""
    turns = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            found = type_name(item)
            reason = f"expected an object with '{role_key}' and '{content_key}', found {found}"
            raise DataError(source, reason, where)
        role_field, content_field = f"{where}.{role_key}", f"{where}.{content_key}"
        role_name = _require_str(item, role_key, source, role_field)
        if role_name not in roles:
            reason = f"unknown role '{role_name}'; expected one of {', '.join(roles)}"
            raise DataError(source, reason, role_field)
        message = message_of(item, roles[role_name], role_name, where, content_key, source)
        turns.append(Turn(message, role_field, content_field))
    return turns


def _weighted(turns: list[Turn], items: list | tuple, source: Source) -> list[Turn]:
    """OpenAI's `weight` on an assistant message: 1 (or none) trains the turn, 0 keeps it in
    the conversation as context only."""
    weighted = []
    for i, (turn, item) in enumerate(zip(turns, items, strict=True)):
        weight, where = item.get("weight"), f"messages[{i}].weight"
        if weight is not None:  # null: none given (Parquet fills a column other rows have)
            if (role := turn.message.role) != "assistant":
                reason = f"only assistant messages have a weight, found one on a {role} message"
                raise DataError(source, reason, where)
            if isinstance(weight, bool) or weight not in (0, 1):
                reason = f"expected 0 (not trained) or 1 (trained), found {type_name(weight)}"
                raise DataError(source, reason, where)
            turn = turn._replace(message=replace(turn.message, trained=weight == 1))
        weighted.append(turn)
    return weighted


def _top_level_system(record: dict, source: Source) -> str:
    """A system prompt beside the messages (Bedrock's): a string, or a list of {"text": ...}
    blocks joined by newlines; "" when there is none."""
    value = record.get("system")
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, (list, tuple)):
        return "\n".join(text_parts(value, source, "system"))
    reason = f'expected a string or a list of {{"text": ...}} blocks, found {type_name(value)}'
    raise DataError(source, reason, "system")


def _message_list(record: dict, name: str, source: Source) -> list | tuple:
    """The list of messages under `name`, parsed first if it is a JSON string (CSV cells)."""
    _require(record, name, source)
    value = parse_json_text(record[name], source, name, "a list of messages")
    if not isinstance(value, (list, tuple)):
        raise DataError(source, f"expected a list of messages, found {type_name(value)}", name)
    return value


def _conversation(turns: list[Turn], source: Source, name: str, format: str) -> Conversation:
    _check_turn_order(turns, source, name)
    messages = tuple(turn.message for turn in turns)
    return Conversation(source=source, messages=messages, meta={"format": format})


def _check_turn_order(turns: list[Turn], source: Source, name: str) -> None:
    """Reject what no chat template can render or nothing can be learned from.

    Two turns of one role in a row are left to the template: role-tagged ones (ChatML,
    Llama 3) render them, strictly alternating ones (Mistral, Llama 2, Gemma) raise, and
    encoding then rejects that record by its source like any other.
    """
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
    if not any(turn.message.role == "assistant" and turn.message.trained for turn in dialogue):
        reason = "no trained assistant turn: nothing to learn (every one has weight 0)"
        raise DataError(source, reason, name)
    first = dialogue[0]
    if first.message.role != "user":
        reason = f"the first non-system message must be from the user, found '{first.message.role}'"
        raise DataError(source, reason, first.role_field)
    if (last := dialogue[-1].message.role) in ("user", "tool"):
        what = "a user turn" if last == "user" else "a tool result"
        reason = (
            f"conversation ends on {what}, so nothing is learned from it; "
            f"end with an assistant reply or drop the trailing {last} message"
        )
        raise DataError(source, reason, dialogue[-1].role_field)
    for turn in dialogue:
        message = turn.message
        if message.role == "assistant" and not (message.content.strip() or message.tool_calls):
            raise DataError(source, "empty assistant turn: nothing to learn", turn.content_field)
    check_tool_flow([t.message for t in turns], [t.role_field for t in turns], source)


# -- small helpers --------------------------------------------------------------------------


def _optional_str(record: dict, key: str, source: Source) -> str:
    # Missing and null mean "not given": Parquet and datasets fill absent columns with null.
    if record.get(key) is None:
        return ""
    return _require_str(record, key, source)

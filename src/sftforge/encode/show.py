"""Show examples token by token with trained tokens marked, to see the mask with your eyes;
and what each conversation holds (reasoning, tool definitions, calls and results) apart."""

from __future__ import annotations

import json

from sftforge.data.messages import Conversation, Message
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.encode.proof import texts_in_place

_TRAINED = "\x1b[30;42m"  # black on green
_PROMPT = "\x1b[2m"  # dim
_ALT = "\x1b[4m"  # underline every other token so token boundaries show
_RESET = "\x1b[0m"


def visible(text: str) -> str:
    return text.replace("\n", "\\n\n").replace("\t", "\\t")


def format_example(tokenizer, example: Example, color: bool) -> str:
    """Colour: trained tokens on green, prompt dimmed, alternate tokens underlined.
    Plain: tokens separated by '|', trained runs wrapped in [[ ]]."""
    pieces = []
    in_trained = False
    texts = token_texts(tokenizer, example.input_ids)
    for k, label in enumerate(example.labels):
        text = visible(texts[k])
        trained = label != IGNORE_INDEX
        if color:
            style = (_TRAINED if trained else _PROMPT) + (_ALT if k % 2 else "")
            pieces.append(f"{style}{text}{_RESET}")
            continue
        if trained and not in_trained:
            pieces.append("[[")
        if not trained and in_trained:
            pieces.append("]]")
        pieces.append(text + "|")
        in_trained = trained
    if in_trained and not color:
        pieces.append("]]")
    return "".join(pieces)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token where it stands (a SentencePiece token keeps its space)."""
    return texts_in_place(tokenizer, ids, [(k, k + 1) for k in range(len(ids))])


def example_counts(example: Example) -> str:
    return f"tokens: {len(example.input_ids)}, trained tokens: {example.trained_token_count}"


def describe_conversation(conversation: Conversation, width: int = 70) -> str:
    """One line for the tools offered and one per message, each part of a message named:
    its reasoning, text, tool calls (name and arguments) and the call a result answers."""
    lines = []
    if conversation.tools:
        names = ", ".join(tool["function"]["name"] for tool in conversation.tools)
        lines.append(f"tools offered ({len(conversation.tools)}): {names}")
    if conversation.template_options:
        lines.append(f"template options: {json.dumps(conversation.template_options)}")
    for i, message in enumerate(conversation.messages):
        lines.append(f"[{i}] {_role_label(message)}: {' | '.join(_parts(message, width))}")
    return "\n".join(lines)


def _role_label(message: Message) -> str:
    if message.role == "tool":
        answers = message.tool_call_id or message.name
        return f"tool result (answers {answers})" if answers else "tool result"
    if message.role == "assistant" and not message.trained:
        return "assistant (weight 0: context)"
    return message.role


def _parts(message: Message, width: int) -> list[str]:
    parts = []
    if message.reasoning is not None:
        parts.append(f"reasoning {_short(message.reasoning, width)}")
    if message.content or not message.tool_calls:
        parts.append(f"text {_short(message.content, width)}")
    for call in message.tool_calls:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        parts.append(f"call {call.name}({_short(arguments, width, quote=False)})")
    return parts


def _short(text: str, width: int, quote: bool = True) -> str:
    cut = text if len(text) <= width else text[: width - 3] + "..."
    return repr(cut) if quote else cut

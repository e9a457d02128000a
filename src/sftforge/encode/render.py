"""Conversation -> rendered text, cut into pieces at every assistant turn's start and end,
each piece marked trained or not; one conversation may give several examples.

We never guess where the assistant's answer starts: the span of assistant turn i begins
where the template's *generation prompt* for messages[:i] ends (the text a model is given at
inference) and ends after the turn's end-of-turn marker (`<|im_end|>`, `</s>`, `<|eot_id|>`
...), the token that teaches the model to stop. The turn holds all the assistant wrote:
its reasoning, text and tool calls. Anything the template does that breaks these
guarantees is an error, not a warning.

Templates that rewrite history (Qwen3 drops the reasoning of turns before the last user
query) write an earlier turn one way when it is the turn being generated and another way
once later turns follow. Each trained turn is learned as inference sees it: the turns that
one sequence holds as at inference are trained in it, and the rest in the conversation cut
after the last of them, and so on: the fewest examples, each proven alike.

To tell template text from data we render twice: once with each slot of data (encode/slots.py)
replaced by a sentinel, once for real. The hand-off to encode/encoder.py is a list of Pieces:
template markup (which may hold special tokens) or data text (which never does), cut at
every assistant span's edges, each knowing whether it is trained and which stretch between
two cuts it lies in.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from sftforge.data.messages import Conversation, Message
from sftforge.encode.slots import (
    SENTINEL,
    Element,
    Slot,
    align,
    sentinel,
    shape_key,
    split_sentinel_render,
    template_messages,
    to_real_offset,
    with_sentinels,
)
from sftforge.encode.templates import (
    BUILTIN_TEMPLATES,
    TOOL_TEMPLATES,
    ChatTemplate,
    TemplateError,
)

TrainOn = Literal["all_assistant_turns", "last_assistant_turn", "all_tokens"]

# An assistant's reasoning: trained with its answer, shown but not trained, or left out.
ReasoningMode = Literal["train", "context", "drop"]


class Part(NamedTuple):  # NamedTuples: made by the dozen for every conversation
    """A run of rendered text: template markup, or (part of) a message's content."""

    text: str
    is_content: bool
    start: int  # character offset in the rendered text


class Piece(NamedTuple):
    """Rendered text between two cuts (the edges of assistant spans), as tokenize takes it."""

    text: str
    is_content: bool  # message text (never read for special tokens), or template markup
    trained: bool
    segment: int  # the stretch between two cuts it lies in: never tokenized across a cut


@dataclass
class RenderedConversation:
    text: str
    pieces: list[Piece]  # cover `text` exactly, in order
    assistant_spans: list[tuple[int, int]]  # [start, end) per assistant turn: answer + end marker
    trained_spans: list[tuple[int, int]]  # the spans whose text is trained


class _Span(NamedTuple):
    start: int  # where the generation prompt ends
    end: int  # after the end-of-turn marker
    answer: int  # where the turn's first slot after its reasoning starts
    missing: tuple[str, ...]  # fields of the turn's data the template did not write in it


@dataclass(frozen=True)
class _Layout:
    """What the sentinel renders tell of a conversation's shape: the render with sentinels,
    its elements, and the span of each assistant turn that this render writes as inference
    does (by message index); or the TemplateError the shape meets."""

    full: str
    elements: tuple[tuple[str, int | None, int], ...]  # (text, slot, sentinel_start)
    spans: dict[int, _Span]
    error: str | None = None


LAYOUTS_KEPT = 4096  # shapes remembered per template; beyond that the memory starts over


def _assistant_span(
    template: ChatTemplate,
    sentinel_msgs: list[dict],
    slots: list[Slot],
    i: int,
    full: str,
    end_markers: set[str],
    tools,
    options: dict,
) -> _Span | None:
    """Turn i's span in `full`; None where `full` writes the turn otherwise than inference
    does (a template that rewrites history)."""
    prompt = template.render(sentinel_msgs[:i], True, tools, options)
    through_turn = template.render(sentinel_msgs[: i + 1], False, tools, options)
    if not through_turn.startswith(prompt):
        at = len(os.path.commonprefix([prompt, through_turn]))
        raise TemplateError(
            f"chat template '{template.name}' is not prefix-consistent at message {i}: it "
            "writes the turn otherwise than its generation prompt begins: the prompt has {prompt[at : at + 30]!r} where the turn "
            f"has {through_turn[at : at + 30]!r}, so what training sees would differ from "
            "inference (a template option such as enable_thinking=false with reasoning in "
            "the data?)"
        )
    if not full.startswith(through_turn):
        return None
    mine = [m for m in SENTINEL.finditer(through_turn) if slots[int(m.group(1))].message == i]
    if mine and mine[0].start() < len(prompt):
        raise TemplateError(f"chat template '{template.name}' renders message {i} early")
    content_end = mine[-1].end() if mine else len(prompt)
    answers = [m.start() for m in mine if slots[int(m.group(1))].field != "reasoning_content"]
    written = {int(m.group(1)) for m in mine}
    missing = tuple(
        slot.field
        for k, slot in enumerate(slots)
        if slot.message == i and k not in written and not slot.field.endswith(".id")
    )
    marker = through_turn[content_end:].rstrip()
    if not any(marker.endswith(t) for t in end_markers):
        eos = f" (its eos is {template.eos_token!r})" if template.eos_token else ""
        raise TemplateError(
            f"chat template '{template.name}' ends assistant turns with {marker!r}, which does "
            "not end with a special token of this tokenizer (an end-of-turn token), so the "
            f"model would never learn to stop; end them with one of its special tokens{eos}"
        )
    answer = answers[0] if answers else content_end
    return _Span(len(prompt), content_end + len(marker), answer, missing)


def _layout(
    template: ChatTemplate,
    messages: tuple[Message, ...],
    tools: tuple,
    options: dict,
    end_markers: set[str],
    add_generation_prompt: bool,
    cached: bool = True,
) -> tuple[_Layout, list[Slot]]:
    """The layout of `messages`' shape, and their slots. The sentinel renders (one, and two
    per assistant turn) depend on nothing but the shape, so the layout is kept per template
    and shape: a dataset of a few shapes renders each with sentinels once."""
    sentinel_msgs, slots = with_sentinels(messages)
    key = (shape_key(sentinel_msgs, tools, options), add_generation_prompt, frozenset(end_markers))
    layouts = template.layouts
    if cached and key in layouts:
        return layouts[key], slots
    tool_list = list(tools) or None
    try:
        full = template.render(sentinel_msgs, add_generation_prompt, tool_list, options)
        _check_everything_written(template, full, slots, messages, tools)
        spans = {}
        for i, message in enumerate(messages):
            if message.role == "assistant":
                args = (sentinel_msgs, slots, i, full, end_markers, tool_list, options)
                if (span := _assistant_span(template, *args)) is not None:
                    spans[i] = span
        elements = tuple(
            (e.text_in_sentinel_render, e.slot, e.sentinel_start)
            for e in split_sentinel_render(full)
        )
        layout = _Layout(full, elements, spans)
    except TemplateError as e:
        layout = _Layout("", (), {}, str(e) + _no_tool_format(template, messages, tools))
    if len(layouts) >= LAYOUTS_KEPT:
        layouts.clear()
    layouts[key] = layout
    return layout, slots


def _no_tool_format(template: ChatTemplate, messages, tools) -> str:
    """A hint for tool data refused by a built-in that has no tool format."""
    uses_tools = tools or any(m.role == "tool" or m.tool_calls for m in messages)
    if not uses_tools or template.name not in BUILTIN_TEMPLATES or template.name in TOOL_TEMPLATES:
        return ""
    return (
        f" (the {template.name} built-in has no tool format: use the model's own template, "
        f"a built-in that writes tools ({', '.join(TOOL_TEMPLATES)}), or a Jinja file that "
        "writes them)"
    )


def _check_everything_written(template, full: str, slots, messages, tools) -> None:
    """Nothing the model is shown is dropped: every non-assistant message's text and every
    tool offered appear in the render (ids and names that answer a call may not: many
    templates match results to calls by order). (An assistant turn's own data is checked where it is
    trained: a template may leave an earlier turn's reasoning out of later prompts.)"""
    for k, slot in enumerate(slots):
        role = messages[slot.message].role
        if role != "assistant" and slot.field == "content" and sentinel(k) not in full:
            raise TemplateError(
                f"chat template '{template.name}' does not write the {slot.field} of message "
                f"{slot.message} (a {role} message): the model would never see it"
            )
    for tool in tools:
        name = tool["function"]["name"]
        if name not in full:
            raise TemplateError(
                f"chat template '{template.name}' does not show the tools offered (the "
                f"function {name!r} is nowhere in its render): the model would learn to call "
                "tools it was never shown. Use a template that writes tools: the built-in "
                "chatml (template=chatml), the model family's own, or a Jinja file"
            )


def _render(
    messages: tuple[Message, ...],
    template: ChatTemplate,
    end_markers: set[str],
    add_generation_prompt: bool,
    tools: tuple = (),
    options: dict | None = None,
) -> tuple[str, list[Part], dict[int, _Span]]:
    """The rendered text, its parts, and the span of each assistant turn written as at
    inference. Should the real render not fit a remembered layout (a template that reads
    the clock), the layout is rendered afresh before that counts as the template's fault."""
    options = options or {}
    real = template.render(
        template_messages(messages), add_generation_prompt, list(tools) or None, options
    )
    for cached in (True, False):
        layout, slots = _layout(
            template, messages, tools, options, end_markers, add_generation_prompt, cached
        )
        if layout.error:
            raise TemplateError(layout.error)
        elements = [Element(text, slot, start) for text, slot, start in layout.elements]
        changed = align(elements, real, slots)
        if changed is None:
            break
        if not cached:
            raise TemplateError(_unaligned(template.name, changed))
    spans = {
        i: span._replace(
            start=to_real_offset(elements, span.start),
            end=to_real_offset(elements, span.end),
            answer=to_real_offset(elements, span.answer),
        )
        for i, span in layout.spans.items()
    }
    parts = [
        Part(el.real_text, el.slot is not None, el.real_start) for el in elements if el.real_text
    ]
    return real, parts, spans


def _unaligned(name: str, changed: Slot | str) -> str:
    if isinstance(changed, Slot):
        what = f"the {changed.field} of message {changed.message}"
        hint = ""
        if "<think>" in changed.text or "</think>" in changed.text:
            hint = (
                ": it holds <think>/</think>, which this template splits out of the text; give "
                "the reasoning in 'reasoning_content' (or as one <think> block opening an "
                "assistant's content, which sftforge reads as its reasoning)"
            )
        return (
            f"chat template '{name}' changes {what}, and sftforge cannot align text other than "
            f"verbatim, trimmed or JSON-escaped, so the loss mask cannot be proven{hint}"
        )
    return (
        f"chat template '{name}' renders differently with the real text than with "
        f"placeholders (near {changed!r}): it reads the text itself, and sftforge cannot "
        "align what it writes, so the loss mask cannot be proven"
    )


def _cut(parts: list[Part], assistant_spans, trained_spans) -> list[Piece]:
    """The parts cut at every span edge, each piece marked trained when a trained span holds
    it. Every assistant turn is cut from its prompt, trained or not: at inference the prompt
    ends at the generation prompt and is tokenized alone."""
    cuts = sorted({p for span in [*assistant_spans, *trained_spans] for p in span})
    trained_starts = [s for s, _ in trained_spans]  # sorted, the spans being disjoint
    pieces = []
    for part in parts:
        start, end = part.start, part.start + len(part.text)
        first = bisect.bisect_right(cuts, start)
        inner = cuts[first : bisect.bisect_left(cuts, end)]
        for k, (a, b) in enumerate(zip([start, *inner], [*inner, end], strict=True)):
            holder = bisect.bisect_right(trained_starts, a) - 1  # the span starting last by a
            trained = holder >= 0 and b <= trained_spans[holder][1]
            text = part.text if not inner else part.text[a - start : b - start]
            pieces.append(Piece(text, part.is_content, trained, first + k))
    return pieces


def without_reasoning(conversation: Conversation) -> Conversation:
    """The conversation with every assistant's reasoning left out (reasoning=drop)."""
    messages = tuple(replace(m, reasoning=None) for m in conversation.messages)
    return replace(conversation, messages=messages)


def render_examples(
    conversation: Conversation,
    template: ChatTemplate,
    end_markers: set[str],
    train_on: TrainOn = "all_assistant_turns",
    reasoning: ReasoningMode = "train",
    options: dict | None = None,
) -> list[RenderedConversation]:
    """The examples a chat trains, in order: usually one. Each trained assistant turn is
    trained in the first of the conversation and its cuts (after a later trained turn) that
    writes it as inference does; every turn in one, and the fewest examples that can.

    `end_markers` are the strings that count as an end-of-turn token (the tokenizer's
    special tokens); `options` the chat template's (the record's own take precedence);
    reasoning "context" trains each turn's text and calls, its reasoning shown but not
    trained; "drop" leaves reasoning out."""
    if reasoning == "drop":
        conversation = without_reasoning(conversation)
    messages, tools = conversation.messages, conversation.tools
    options = {**(options or {}), **conversation.template_options}
    if train_on == "all_tokens":
        text, parts, spans = _render(messages, template, end_markers, False, tools, options)
        edges = [(s.start, s.end) for s in spans.values()]
        trained = [(0, len(text))]
        pieces = _cut(parts, edges, trained)
        return [RenderedConversation(text, pieces, edges, trained)]
    turns = [i for i, m in enumerate(messages) if m.role == "assistant" and m.trained]
    if train_on == "last_assistant_turn":
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        turns = [last] if last in turns else []
    examples, end = [], len(messages)
    while True:
        text, parts, spans = _render(messages[:end], template, end_markers, False, tools, options)
        here = [i for i in turns if i in spans]
        if turns and not here:
            raise TemplateError(
                f"chat template '{template.name}' is not prefix-consistent at message "
                f"{turns[-1]}: it does not write that turn as its own generation prompt and "
                "turn do, even in the conversation cut after it, so what training sees would "
                "differ from inference"
            )
        for i in here:
            _check_turn_written(template.name, i, spans[i], reasoning)
        trained = [
            (spans[i].answer if reasoning == "context" else spans[i].start, spans[i].end)
            for i in here
        ]
        edges = [(s.start, s.end) for s in spans.values()]
        pieces = _cut(parts, edges, trained)
        examples.append(RenderedConversation(text, pieces, edges, trained))
        turns = [i for i in turns if i not in here]
        if not turns:
            return examples[::-1]
        end = turns[-1] + 1


def _check_turn_written(name: str, i: int, span: _Span, reasoning: str) -> None:
    if not span.missing:
        return
    field = span.missing[0]
    hint = (
        "; set reasoning=drop to train the answers without it"
        if field == "reasoning_content"
        else "; use the model's own template or one that writes tool calls (chatml)"
        if field.startswith("tool_calls")
        else ""
    )
    raise TemplateError(
        f"chat template '{name}' does not write the {field} of assistant message {i}: "
        f"the model would be trained without it{hint}"
    )


def render_prompt(
    messages: list[Message] | tuple[Message, ...],
    template: ChatTemplate,
    end_markers: set[str],
    tools: tuple = (),
    options: dict | None = None,
) -> RenderedConversation:
    """The text a model is given at inference: the history plus the generation prompt, with
    the spans of the history's assistant turns (tokenized as the model generated them);
    nothing trained."""
    text, parts, spans = _render(tuple(messages), template, end_markers, True, tools, options)
    edges = [(s.start, s.end) for s in spans.values()]
    return RenderedConversation(text, _cut(parts, edges, []), edges, [])

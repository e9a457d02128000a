"""Conversation -> rendered text, cut into pieces at every assistant turn's start and end,
each piece marked trained or not.

We never guess where the assistant's answer starts: the span of assistant turn i begins
where the template's *generation prompt* for messages[:i] ends (the text a model is given at
inference) and ends after the turn's end-of-turn marker (`<|im_end|>`, `</s>`, `<|eot_id|>`
...), the token that teaches the model to stop. Anything the template does that breaks these
guarantees is an error, not a warning.

To tell template text from message text we render the conversation twice: once with each
message's content replaced by a unique sentinel, once for real. The sentinel render cuts the
text into template pieces and content slots; the real render must equal those pieces with
each content inserted (verbatim, or trimmed as some official templates do).

The hand-off to tokenize.py is a list of Pieces: template markup (which may hold special
tokens) or message text (which never does), cut at every assistant span's edges, each
knowing whether it is trained and which stretch between two cuts it lies in.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import NamedTuple

from .config import TrainOn
from .formats import Conversation, Message
from .templates import ChatTemplate, TemplateError

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"


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


def _as_dicts(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _with_sentinels(messages: tuple[Message, ...]) -> list[dict]:
    # Empty contents stay empty: a template may test for an empty system prompt.
    return [
        {"role": m.role, "content": _sentinel(i) if m.content else ""}
        for i, m in enumerate(messages)
    ]


def _content_candidates(content: str) -> list[str]:
    """What a template may have made of a message's content: verbatim, or trimmed."""
    seen: list[str] = []
    for c in (content, content.strip(), content.rstrip(), content.lstrip()):
        if c not in seen:
            seen.append(c)
    return seen


@dataclass
class _Element:
    text_in_sentinel_render: str
    slot: int | None  # message index when this element is a content slot
    sentinel_start: int
    real_start: int = -1
    real_text: str = ""


def _split_sentinel_render(rendered: str) -> list[_Element]:
    elements, pos = [], 0
    for m in _SENTINEL.finditer(rendered):
        if m.start() > pos:
            elements.append(_Element(rendered[pos : m.start()], None, pos))
        elements.append(_Element(m.group(0), int(m.group(1)), m.start()))
        pos = m.end()
    if pos < len(rendered):
        elements.append(_Element(rendered[pos:], None, pos))
    return elements


def _align(elements: list[_Element], real: str, messages: tuple[Message, ...], name: str):
    """Fill in each element's real text and offset; fail unless they rebuild `real` exactly."""
    pos = 0
    for k, el in enumerate(elements):
        el.real_start = pos
        if el.slot is None:
            if not real.startswith(el.text_in_sentinel_render, pos):
                break
            el.real_text = el.text_in_sentinel_render
        else:
            following = elements[k + 1] if k + 1 < len(elements) else None
            for candidate in _content_candidates(messages[el.slot].content):
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
                break
            el.real_text = candidate
        pos += len(el.real_text)
    else:
        if pos == len(real):
            return
    raise TemplateError(
        f"chat template '{name}' transforms message text in a way sftforge cannot align "
        "(only verbatim or trimmed content is supported), so the loss mask cannot be proven"
    )


def _to_real_offset(elements: list[_Element], p: int) -> int:
    for el in elements:
        end = el.sentinel_start + len(el.text_in_sentinel_render)
        if el.slot is None and el.sentinel_start <= p <= end:
            return el.real_start + (p - el.sentinel_start)
        if el.slot is not None and p == el.sentinel_start:
            return el.real_start
        if el.slot is not None and p == end:
            return el.real_start + len(el.real_text)
    raise TemplateError(f"offset {p} falls inside a message's content")


def _assistant_span_in_sentinel_render(
    template: ChatTemplate, sentinel_msgs: list[dict], i: int, full: str, end_markers: set[str]
) -> tuple[int, int]:
    prompt = template.render(sentinel_msgs[:i], add_generation_prompt=True)
    through_turn = template.render(sentinel_msgs[: i + 1], add_generation_prompt=False)
    if not (full.startswith(through_turn) and through_turn.startswith(prompt)):
        raise TemplateError(
            f"chat template '{template.name}' is not prefix-consistent at message {i}: "
            "the generation prompt (or the conversation up to this turn) is not how the full "
            "conversation begins, so what training sees would differ from inference"
        )
    content_end = len(prompt)
    slots = [m for m in _SENTINEL.finditer(through_turn) if int(m.group(1)) == i]
    if slots:
        if slots[0].start() < len(prompt):
            raise TemplateError(f"chat template '{template.name}' renders message {i} early")
        content_end = slots[-1].end()
    marker = through_turn[content_end:].rstrip()
    if not any(marker.endswith(t) for t in end_markers):
        eos = f" (its eos is {template.eos_token!r})" if template.eos_token else ""
        raise TemplateError(
            f"chat template '{template.name}' ends assistant turns with {marker!r}, which does "
            "not end with a special token of this tokenizer (an end-of-turn token), so the "
            f"model would never learn to stop; end them with one of its special tokens{eos}"
        )
    return len(prompt), content_end + len(marker)


@dataclass(frozen=True)
class _Layout:
    """What the sentinel renders tell of a conversation's shape (its roles, and which
    contents are empty): the render with sentinels, its elements, and each assistant turn's
    span in it; or the TemplateError the shape meets."""

    full: str
    elements: tuple[tuple[str, int | None, int], ...]  # (text, slot, sentinel_start)
    spans: tuple[tuple[int, int], ...]
    error: str | None = None


LAYOUTS_KEPT = 4096  # shapes remembered per template; beyond that the memory starts over


def _layout(
    template: ChatTemplate,
    messages: tuple[Message, ...],
    end_markers: set[str],
    add_generation_prompt: bool,
    cached: bool = True,
) -> _Layout:
    """The layout of `messages`' shape. The sentinel renders (one, and two per assistant
    turn) depend on nothing but the shape, so the layout is kept per template and shape: a
    dataset of a few shapes renders each with sentinels once."""
    shape = tuple((m.role, bool(m.content)) for m in messages)
    key = (shape, add_generation_prompt, frozenset(end_markers))
    layouts = template.layouts
    if cached and key in layouts:
        return layouts[key]
    sentinel_msgs = _with_sentinels(messages)
    try:
        full = template.render(sentinel_msgs, add_generation_prompt=add_generation_prompt)
        spans = tuple(
            _assistant_span_in_sentinel_render(template, sentinel_msgs, i, full, end_markers)
            for i, message in enumerate(messages)
            if message.role == "assistant"
        )
        elements = tuple(
            (e.text_in_sentinel_render, e.slot, e.sentinel_start)
            for e in _split_sentinel_render(full)
        )
        layout = _Layout(full, elements, spans)
    except TemplateError as e:
        layout = _Layout("", (), (), str(e))
    if len(layouts) >= LAYOUTS_KEPT:
        layouts.clear()
    layouts[key] = layout
    return layout


def _render(
    messages: tuple[Message, ...],
    template: ChatTemplate,
    end_markers: set[str],
    add_generation_prompt: bool,
) -> tuple[str, list[Part], list[tuple[int, int]]]:
    """The rendered text, its parts, and the span of each assistant turn. Should the real
    render not fit a remembered layout (a template that reads the clock), the layout is
    rendered afresh before that counts as the template's fault."""
    real = template.render(_as_dicts(messages), add_generation_prompt=add_generation_prompt)
    for cached in (True, False):
        layout = _layout(template, messages, end_markers, add_generation_prompt, cached)
        if layout.error:
            raise TemplateError(layout.error)
        elements = [_Element(text, slot, start) for text, slot, start in layout.elements]
        try:
            _align(elements, real, messages, template.name)
        except TemplateError:
            if not cached:
                raise
            continue
        break
    spans = [(_to_real_offset(elements, a), _to_real_offset(elements, b)) for a, b in layout.spans]
    parts = [
        Part(el.real_text, el.slot is not None, el.real_start) for el in elements if el.real_text
    ]
    return real, parts, spans


def _trained_spans(
    text: str, assistant_spans: list[tuple[int, int]], train_on: str, trained: list[bool]
):
    """The spans `train_on` trains. `trained` says, per assistant turn, whether its data lets
    it be trained (False: weight 0, context only). A turn that is not is never trained, not
    even as the last turn with last_assistant_turn (that conversation then trains nothing and
    is dropped as such); all_tokens trains every token whatever the flags."""
    if train_on == "all_tokens":
        return [(0, len(text))]
    if train_on == "last_assistant_turn":
        return assistant_spans[-1:] if trained[-1:] == [True] else []
    return [span for span, flag in zip(assistant_spans, trained, strict=True) if flag]


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


def render_conversation(
    conversation: Conversation,
    template: ChatTemplate,
    end_markers: set[str],
    train_on: TrainOn = "all_assistant_turns",
) -> RenderedConversation:
    """Render a chat cut into pieces, with the exact span of each assistant turn (answer +
    end marker) and the spans `train_on` trains.

    `end_markers` are the strings that count as an end-of-turn token (the tokenizer's special
    tokens)."""
    text, parts, spans = _render(conversation.messages, template, end_markers, False)
    flags = [m.trained for m in conversation.messages if m.role == "assistant"]
    trained = _trained_spans(text, spans, train_on, flags)
    return RenderedConversation(text, _cut(parts, spans, trained), spans, trained)


def render_prompt(
    messages: list[Message] | tuple[Message, ...], template: ChatTemplate, end_markers: set[str]
) -> RenderedConversation:
    """The text a model is given at inference: the history plus the generation prompt, with
    the spans of the history's assistant turns (tokenized as the model generated them);
    nothing trained."""
    text, parts, spans = _render(tuple(messages), template, end_markers, True)
    return RenderedConversation(text, _cut(parts, spans, []), spans, [])

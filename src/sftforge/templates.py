"""Conversation -> rendered text, cut into pieces at every assistant turn's start and end,
each piece marked trained or not.

A chat template is Jinja. We render it in a sandbox and never guess where the assistant's
answer starts: the span of assistant turn i begins where the template's *generation prompt*
for messages[:i] ends (the text a model is given at inference) and ends after the turn's
end-of-turn marker (`<|im_end|>`, `</s>`, `<|eot_id|>` ...), the token that teaches the model
to stop. Anything the template does that breaks these guarantees is an error, not a warning.

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
from datetime import datetime
from importlib import resources
from pathlib import Path

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import TrainOn
from .formats import Conversation, Message

BUILTIN_TEMPLATES = (
    "chatml",
    "llama2",
    "llama3",
    "mistral",
    "alpaca",
    "gemma",
    "phi3",
    "zephyr",
    "vicuna",
)

# Special tokens each built-in template writes literally. A tokenizer that lacks them gets
# them added (and the model's embeddings resized) so that each becomes one token, not a
# string of characters the model has never seen as a unit.
BUILTIN_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}

# How control tokens are spelled in chat templates: <|im_start|>, <|eot_id|>, or snake-case
# tags such as <start_of_turn>. A custom template's tokens of these forms that the tokenizer
# lacks are added like a built-in template's, so each is one token, not characters.
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>|<[a-z]+(?:_[a-z]+)+>")

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"


class TemplateError(ValueError):
    """The template cannot render this conversation, or cannot be proven to mask it right."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _refuse_file_access(name: str):
    raise SecurityError(f"a chat template may not include, import or extend files ({name!r})")


class _StrictSandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute: str):
        # Jinja's sandbox answers an unsafe attribute with an undefined value, which renders
        # as "": the escape fails, but silently. A template that tries one is hostile or
        # broken, so stop it with an error that says which attribute it reached for.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )


def sandboxed_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment every template runs in: no attribute access to Python internals,
    no mutation of passed objects, no files; otherwise the settings transformers uses for
    chat templates."""
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, loader=jinja2.FunctionLoader(_refuse_file_access)
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": False}
    return env


@dataclass
class ChatTemplate:
    name: str  # "chatml", "tokenizer", or a file path
    source: str  # the Jinja text
    bos_token: str = ""
    eos_token: str = ""
    extra_tokens: tuple[str, ...] = ()  # special tokens the template writes literally
    reason: str = ""  # why this template: shown when a run starts
    expects_bos: bool = False  # the model expects its BOS token first in every text

    def __post_init__(self):
        try:
            self._compiled = sandboxed_environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template '{self.name}' is not valid Jinja: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:  # the template's own raise_exception(...)
            raise TemplateError(f"chat template '{self.name}' refused: {e}") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template '{self.name}' failed: {e}") from e
        except Exception as e:  # e.g. {{ 1 / 0 }}: still the template's fault, not ours
            raise TemplateError(
                f"chat template '{self.name}' failed: {type(e).__name__}: {e}"
            ) from e


def control_tokens_written(source: str) -> tuple[str, ...]:
    """The control tokens (<|name|>, <snake_case>) a template's source writes, in order."""
    return tuple(dict.fromkeys(_CONTROL_TOKEN.findall(source)))


def builtin_template_source(name: str) -> str:
    return resources.files("sftforge").joinpath(f"chat_templates/{name}.jinja").read_text("utf-8")


# `template: auto` for a tokenizer without a template of its own: the family's built-in
# template, known from the model's type when its vocabulary holds no turn tokens.
FAMILY_OF_MODEL_TYPE = {"llama": "llama2", "mistral": "mistral", "mixtral": "mistral"}


def resolve_template(
    choice: str | ChatTemplate, tokenizer, model_type: str | None = None
) -> ChatTemplate:
    """`choice` is "auto", a built-in name, a path to a Jinja file, or another tokenizer's
    ChatTemplate (to render alike). "auto" takes the tokenizer's own template; else the
    built-in template whose turn tokens the vocabulary already holds; else the family's
    (from `model_type`); ChatML last. Where the model expects a BOS token and the template
    does not write one first, the template writes it (so inference renders alike)."""
    template = _chosen_template(choice, tokenizer, model_type)
    if not tokenizer_wants_bos(tokenizer):
        return template
    source, reason = template.source, template.reason
    if not _writes_first(template, template.bos_token):
        source = "{{ bos_token }}" + source
        reason = f"{reason}; BOS {template.bos_token} first, as the model expects".lstrip("; ")
    args = (template.name, source, template.bos_token, template.eos_token)
    return ChatTemplate(*args, template.extra_tokens, reason, expects_bos=True)


def _chosen_template(choice, tokenizer, model_type: str | None) -> ChatTemplate:
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if isinstance(choice, ChatTemplate):
        extra = dict.fromkeys([*choice.extra_tokens, *control_tokens_written(choice.source)])
        return ChatTemplate(choice.name, choice.source, bos, eos, tuple(extra), choice.reason)
    reason = ""
    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own.strip():
            return ChatTemplate("tokenizer", own, bos, eos, reason="the tokenizer's own")
        choice, reason = _family_template(tokenizer, model_type)
    if choice in BUILTIN_TEMPLATES:
        extra = BUILTIN_SPECIAL_TOKENS.get(choice, ())
        return ChatTemplate(choice, builtin_template_source(choice), bos, eos, extra, reason)
    path = Path(choice)
    if path.is_file():
        source = path.read_text("utf-8")
        return ChatTemplate(str(path), source, bos, eos, control_tokens_written(source))
    raise TemplateError(
        f"unknown chat template '{choice}': expected 'auto', one of "
        f"{', '.join(BUILTIN_TEMPLATES)}, or the path of a Jinja file"
    )


def _family_template(tokenizer, model_type: str | None) -> tuple[str, str]:
    """(built-in template, why) for a tokenizer without a template of its own."""
    vocab = tokenizer.get_vocab()
    for name, tokens in BUILTIN_SPECIAL_TOKENS.items():
        if all(token in vocab for token in tokens):
            return name, f"the tokenizer has no template; its vocabulary holds {', '.join(tokens)}"
    if model_type in FAMILY_OF_MODEL_TYPE:
        name = FAMILY_OF_MODEL_TYPE[model_type]
        return name, f"the tokenizer has no template; the model is a {model_type}"
    return "chatml", "the tokenizer has no template, nor its vocabulary turn tokens: ChatML"


def tokenizer_wants_bos(tokenizer) -> bool:
    """Whether the model expects a BOS token at the start of every text: its tokenizer adds
    one when it encodes, or its own chat template writes one."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if tokenizer("a").input_ids[:1] == [bos]:
        return True
    own = getattr(tokenizer, "chat_template", None)
    if not (isinstance(own, str) and own.strip()):
        return False
    # Its `bos_token` variable, not the same text typed in: SmolLM2's bos is <|im_start|>,
    # which its template writes as a turn marker, not as a BOS.
    marker = "\ue002bos\ue003"
    return _writes_first(ChatTemplate("tokenizer", own, marker, tokenizer.eos_token or ""), marker)


def _writes_first(template: ChatTemplate, token: str) -> bool:
    """Whether the template's rendering starts with `token` (a one-turn prompt, or one with a
    system message for a template that wants one)."""
    for messages in ([{"role": "user", "content": "Hi"}],) + (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ):
        try:
            return template.render(messages, add_generation_prompt=True).startswith(token)
        except TemplateError:
            continue
    return False


@dataclass(frozen=True)
class Part:
    """A run of rendered text: template markup, or (part of) a message's content."""

    text: str
    is_content: bool
    start: int  # character offset in the rendered text


@dataclass(frozen=True)
class Piece:
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


def _render(
    messages: tuple[Message, ...],
    template: ChatTemplate,
    end_markers: set[str],
    add_generation_prompt: bool,
) -> tuple[str, list[Part], list[tuple[int, int]]]:
    """The rendered text, its parts, and the span of each assistant turn."""
    sentinel_msgs = _with_sentinels(messages)
    full = template.render(sentinel_msgs, add_generation_prompt=add_generation_prompt)
    real = template.render(_as_dicts(messages), add_generation_prompt=add_generation_prompt)
    elements = _split_sentinel_render(full)
    _align(elements, real, messages, template.name)
    spans = []
    for i, message in enumerate(messages):
        if message.role == "assistant":
            start, end = _assistant_span_in_sentinel_render(
                template, sentinel_msgs, i, full, end_markers
            )
            spans.append((_to_real_offset(elements, start), _to_real_offset(elements, end)))
    parts = [
        Part(el.real_text, el.slot is not None, el.real_start) for el in elements if el.real_text
    ]
    return real, parts, spans


def _trained_spans(text: str, assistant_spans: list[tuple[int, int]], train_on: str):
    if train_on == "all_tokens":
        return [(0, len(text))]
    if train_on == "last_assistant_turn":
        return assistant_spans[-1:]
    return assistant_spans


def _cut(parts: list[Part], assistant_spans, trained_spans) -> list[Piece]:
    """The parts cut at every span edge, each piece marked trained when a trained span holds
    it. Every assistant turn is cut from its prompt, trained or not: at inference the prompt
    ends at the generation prompt and is tokenized alone."""
    cuts = sorted({p for span in [*assistant_spans, *trained_spans] for p in span})
    pieces = []
    for part in parts:
        start, end = part.start, part.start + len(part.text)
        inner = [c for c in cuts if start < c < end]
        for a, b in zip([start, *inner], [*inner, end], strict=True):
            trained = any(s <= a and b <= e for s, e in trained_spans)
            segment = bisect.bisect_right(cuts, a)
            pieces.append(
                Piece(part.text[a - start : b - start], part.is_content, trained, segment)
            )
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
    trained = _trained_spans(text, spans, train_on)
    return RenderedConversation(text, _cut(parts, spans, trained), spans, trained)


def render_prompt(
    messages: list[Message] | tuple[Message, ...], template: ChatTemplate, end_markers: set[str]
) -> RenderedConversation:
    """The text a model is given at inference: the history plus the generation prompt, with
    the spans of the history's assistant turns (tokenized as the model generated them);
    nothing trained."""
    text, parts, spans = _render(tuple(messages), template, end_markers, True)
    return RenderedConversation(text, _cut(parts, spans, []), spans, [])

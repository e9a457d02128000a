"""Which chat template, and the sandbox it runs in.

A chat template is Jinja, run in a sandbox (no attribute access to Python internals, no
files). `resolve_template` picks one: the tokenizer's own, the built-in of the model's family,
a built-in by name, or a file; and makes it write the model's BOS first where the model
expects one. encode/render.py renders conversations with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sftforge.encode.families import (
    MISTRAL_VERSIONS,
    TURN_TOKENS,
    family_template,
    mistral_version,
)
from sftforge.errors import InputError

BUILTIN_TEMPLATES = (
    "chatml",
    "llama2",
    "llama3",
    "llama3.1",
    *MISTRAL_VERSIONS,
    "alpaca",
    "gemma",
    "phi3",
    "zephyr",
    "vicuna",
    "deepseek",
)
# Names that stand for one built-in, chosen from the tokenizer: `mistral` is the layout of
# the tokenizer's Mistral version (encode/families.py).
TEMPLATE_ALIASES = ("mistral",)

# Special tokens each built-in template writes literally. A tokenizer that lacks them gets
# them added (and the model's embeddings resized) so that each becomes one token, not a
# string of characters the model has never seen as a unit.
BUILTIN_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    **{name: tokens for name, tokens in TURN_TOKENS.items() if name != "llama3.1"},
    "llama3.1": TURN_TOKENS["llama3"],  # <|eom_id|> tells the family; the template writes none
}
_MISTRAL_TOKENS = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]")
_MISTRAL_TOKENS += ("[TOOL_RESULTS]", "[/TOOL_RESULTS]")
for _name in ("mistral-v3", "mistral-v3-tekken"):
    BUILTIN_SPECIAL_TOKENS[_name] = _MISTRAL_TOKENS
for _name in ("mistral-v7", "mistral-v7-tekken"):
    BUILTIN_SPECIAL_TOKENS[_name] = (*_MISTRAL_TOKENS, "[TOOL_CONTENT]")
    BUILTIN_SPECIAL_TOKENS[_name] += ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
# The built-ins that write tools offered, calls and results.
TOOL_TEMPLATES = ("chatml", "llama3.1", *MISTRAL_VERSIONS[1:])

# How control tokens are spelled in chat templates: <|im_start|>, <|eot_id|>, or snake-case
# tags such as <start_of_turn>. A custom template's tokens of these forms that the tokenizer
# lacks are added like a built-in template's, so each is one token, not characters.
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>|<[a-z]+(?:_[a-z]+)+>")


class TemplateError(InputError):
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
    env.filters["tojson"] = _tojson
    return env


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """`tojson` as transformers defines it for chat templates: plain JSON, no HTML escaping
    (Jinja's own writes < > & ' as \\u003c ..., which no model was trained on)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@dataclass
class ChatTemplate:
    name: str  # "chatml", "tokenizer", or a file path
    source: str  # the Jinja text
    bos_token: str = ""
    eos_token: str = ""
    extra_tokens: tuple[str, ...] = ()  # special tokens the template writes literally
    reason: str = ""  # why this template: shown when a run starts
    expects_bos: bool = False  # the model expects its BOS token first in every text
    # encode/render.py's sentinel layouts by conversation shape: a cache, not part of the template
    layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        try:
            self._compiled = sandboxed_environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template '{self.name}' is not valid Jinja: {e}") from e

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        options: dict | None = None,
    ) -> str:
        """The template's text, given what transformers' apply_chat_template gives it: the
        messages, the tools (None when there are none), the generation prompt flag, BOS and
        EOS, and the template's options (`enable_thinking`) as variables."""
        try:
            return self._compiled.render(
                **(options or {}),
                messages=messages,
                tools=tools,
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
    return (
        resources.files("sftforge")
        .joinpath(f"encode/chat_templates/{name}.jinja")
        .read_text("utf-8")
    )


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
        choice, reason = family_template(tokenizer, model_type)
    elif choice == "mistral":
        choice, reason = mistral_version(tokenizer)
    if choice in BUILTIN_TEMPLATES:
        extra = BUILTIN_SPECIAL_TOKENS.get(choice, ())
        return ChatTemplate(choice, builtin_template_source(choice), bos, eos, extra, reason)
    path = Path(choice)
    if path.is_file():
        source = path.read_text("utf-8")
        return ChatTemplate(str(path), source, bos, eos, control_tokens_written(source))
    raise TemplateError(
        f"unknown chat template '{choice}': expected 'auto', one of "
        f"{', '.join(BUILTIN_TEMPLATES + TEMPLATE_ALIASES)}, or the path of a Jinja file"
    )


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

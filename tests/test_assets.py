"""The forgetting meter's bundled assets: a general prose corpus and general prompts.

Both must stay out of domain for the demo task (a person's name, age and city into JSON),
so that a rise in perplexity after fine-tuning measures lost general ability.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent.parent / "src/sftforge/assets"
CORPUS = ASSETS / "reference_corpus.txt"
PROMPTS = ASSETS / "general_prompts.jsonl"


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return CORPUS.read_bytes().decode("utf-8")  # raises on invalid UTF-8


@pytest.fixture(scope="module")
def paragraphs(corpus_text) -> list[str]:
    # Same split as sftforge.forgetting.corpus_examples.
    return [p.strip() for p in corpus_text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def prompt_lines() -> list[str]:
    return PROMPTS.read_bytes().decode("utf-8").splitlines()


def test_files_exist():
    assert CORPUS.is_file()
    assert PROMPTS.is_file()
    assert (ASSETS / "ASSETS.md").is_file()


def test_corpus_is_utf8_and_ends_with_newline(corpus_text):
    assert corpus_text.endswith("\n")
    assert "\r" not in corpus_text
    assert "\ufffd" not in corpus_text


def test_corpus_word_count(corpus_text):
    assert 2500 <= len(corpus_text.split()) <= 3500


def test_corpus_paragraphs(paragraphs):
    assert len(paragraphs) >= 20
    short = [p[:60] for p in paragraphs if len(p.split()) < 40]
    assert not short, f"paragraphs under 40 words: {short}"
    assert len(set(paragraphs)) == len(paragraphs), "duplicate paragraphs"


def test_corpus_has_no_json_like_braces(corpus_text):
    assert "{" not in corpus_text
    assert "}" not in corpus_text


def test_corpus_is_out_of_domain(corpus_text):
    lowered = corpus_text.lower()
    for word in ("json", "extract"):
        assert word not in lowered


def test_corpus_line_length(corpus_text):
    longest = max(len(line) for line in corpus_text.splitlines())
    assert longest <= 1000


def test_prompts_count(prompt_lines):
    assert len(prompt_lines) == 30
    assert all(line.strip() for line in prompt_lines)


def test_prompts_are_user_then_assistant(prompt_lines):
    for n, line in enumerate(prompt_lines, 1):
        record = json.loads(line)
        assert list(record) == ["messages"], f"line {n}"
        messages = record["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"], f"line {n}"
        for m in messages:
            assert set(m) == {"role", "content"}, f"line {n}"
            assert isinstance(m["content"], str), f"line {n}"
            assert m["content"].strip(), f"line {n}"


def test_prompts_have_no_duplicates(prompt_lines):
    records = [json.loads(line) for line in prompt_lines]
    users = [r["messages"][0]["content"].strip().lower() for r in records]
    answers = [r["messages"][1]["content"].strip().lower() for r in records]
    assert len(set(users)) == len(users)
    assert len(set(answers)) == len(answers)


def test_prompts_are_out_of_domain(prompt_lines):
    for n, line in enumerate(prompt_lines, 1):
        for m in json.loads(line)["messages"]:
            lowered = m["content"].lower()
            assert "json" not in lowered, f"line {n}"
            assert "extract" not in lowered, f"line {n}"

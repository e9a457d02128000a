"""The demo dataset: deterministic, checkable answers, and an eval split disjoint from train."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_demo_data.py"
ASSETS = ROOT / "src" / "sftforge" / "assets"


def _load():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load()


@pytest.fixture(scope="module")
def examples():
    return {
        "train": gen.make_examples(gen.DEFAULT_TRAIN, "train", gen.DEFAULT_SEED),
        "eval": gen.make_examples(gen.DEFAULT_EVAL, "eval", gen.DEFAULT_SEED),
    }


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _text(ex: dict) -> str:
    """The sentence part of the user message (after the instruction)."""
    return ex["messages"][0]["content"].split("\n\n", 1)[1]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


# --- determinism and shipped files ------------------------------------------------------


def test_make_examples_is_deterministic():
    for split, n in (("train", 50), ("eval", 20)):
        assert gen.make_examples(n, split, 5) == gen.make_examples(n, split, 5)
    assert gen.make_examples(20, "train", 5) != gen.make_examples(20, "train", 6)


def test_script_writes_byte_identical_files_twice(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert gen.main(["--out-dir", str(a)]) == 0
    assert gen.main(["--out-dir", str(b)]) == 0
    for name in (gen.TRAIN_FILE, gen.EVAL_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_cli_options(tmp_path):
    assert (
        gen.main(["--out-dir", str(tmp_path), "--train", "7", "--eval", "3", "--seed", "11"]) == 0
    )
    train = (tmp_path / gen.TRAIN_FILE).read_text(encoding="utf-8")
    evals = (tmp_path / gen.EVAL_FILE).read_text(encoding="utf-8")
    assert train == gen.render_jsonl(gen.make_examples(7, "train", 11))
    assert evals == gen.render_jsonl(gen.make_examples(3, "eval", 11))
    assert len(train.splitlines()) == 7 and len(evals.splitlines()) == 3


def test_shipped_files_equal_generator_output():
    """The assets are generated, never hand-edited: rerun the script if this fails."""
    for name, text in gen.build_files().items():
        assert (ASSETS / name).read_bytes() == text.encode("utf-8"), (
            f"{name} differs from the generator; run: python scripts/make_demo_data.py"
        )


def test_counts():
    assert len(_read_jsonl(ASSETS / gen.TRAIN_FILE)) == 200
    assert len(_read_jsonl(ASSETS / gen.EVAL_FILE)) == 60


def test_written_records_have_only_messages_and_reference():
    for rec in _read_jsonl(ASSETS / gen.TRAIN_FILE):
        assert list(rec) == ["messages"]
    for rec in _read_jsonl(ASSETS / gen.EVAL_FILE):
        assert list(rec) == ["messages", "reference"]
        assert rec["reference"] == rec["messages"][1]["content"]
    for name in (gen.TRAIN_FILE, gen.EVAL_FILE):
        for rec in _read_jsonl(ASSETS / name):
            assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
            assert set(rec["messages"][0]) == {"role", "content"}


# --- answers are checkable against the text ---------------------------------------------


@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_parse_and_come_from_the_text(examples, split):
    for ex in examples[split]:
        user, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
        assert user.startswith(gen.INSTRUCTION + "\n\n")
        text = _text(ex)
        assert "\n" not in answer
        obj = json.loads(answer)
        assert list(obj) == list(gen.KEYS) == ["person", "age_years", "home_city"]
        assert answer == json.dumps(obj, ensure_ascii=False)  # compact, fixed order, raw UTF-8
        assert isinstance(obj["person"], str) and isinstance(obj["home_city"], str)
        assert type(obj["age_years"]) is int
        assert obj["person"] in text
        assert _has_word(text, obj["home_city"])
        # the age is in the text exactly once as a number; distractor numbers differ from it
        assert re.findall(r"\d+", text).count(str(obj["age_years"])) == 1
        assert obj == {k: ex["meta"][k] for k in gen.KEYS}
        if split == "eval":
            assert ex["reference"] == answer


DISTRACTORS = ("{year}", "{count}", "{bigcount}", "{job}", "{a_job}", "{weekday}")


@pytest.mark.parametrize("split", ["train", "eval"])
def test_texts_carry_distractors(examples, split):
    forms = gen.TRAIN_FORMS if split == "train" else gen.EVAL_FORMS
    for _, template in forms:
        assert any(d in template for d in DISTRACTORS), template
    # most texts hold another number besides the age (a year or a count)
    with_other_number = [ex for ex in examples[split] if len(re.findall(r"\d+", _text(ex))) >= 2]
    assert len(with_other_number) >= 0.6 * len(examples[split])


@pytest.mark.parametrize("split", ["train", "eval"])
def test_examples_are_short_unique_and_balanced(examples, split):
    exs = examples[split]
    assert all(len(ex["messages"][0]["content"].split()) < 60 for ex in exs)
    texts = [_text(ex) for ex in exs]
    assert len(set(texts)) == len(texts)
    forms = gen.TRAIN_FORMS if split == "train" else gen.EVAL_FORMS
    counts = Counter(ex["meta"]["form"] for ex in exs)
    assert set(counts) == {fid for fid, _ in forms}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_field_order_varies_in_text(examples):
    """The name, the age and the city do not always come in the same order in the text."""
    orders = set()
    for ex in examples["train"] + examples["eval"]:
        text, m = _text(ex), ex["meta"]
        pos = {
            "name": text.index(m["person"]),
            "age": re.search(rf"(?<!\d){m['age_years']}(?!\d)", text).start(),
            "city": text.index(m["home_city"]),
        }
        orders.add(tuple(sorted(pos, key=pos.get)))
    assert len(orders) >= 4


# --- eval is disjoint from train ---------------------------------------------------------


def test_pools_are_disjoint():
    assert not set(gen.TRAIN_FIRST) & set(gen.EVAL_FIRST)
    assert not set(gen.TRAIN_LAST) & set(gen.EVAL_LAST)
    assert not set(gen.TRAIN_CITIES) & set(gen.EVAL_CITIES)
    assert not set(gen.TRAIN_JOBS) & set(gen.EVAL_JOBS)
    assert not {f for f, _ in gen.TRAIN_FORMS} & {f for f, _ in gen.EVAL_FORMS}
    assert not {t for _, t in gen.TRAIN_FORMS} & {t for _, t in gen.EVAL_FORMS}
    # no word of an eval pool entry is a word of a train pool entry ("San Diego" vs "Diego")
    train_words = {
        w for e in gen.TRAIN_FIRST + gen.TRAIN_LAST + gen.TRAIN_CITIES for w in e.split()
    }
    eval_words = {w for e in gen.EVAL_FIRST + gen.EVAL_LAST + gen.EVAL_CITIES for w in e.split()}
    assert not train_words & eval_words


def test_generated_names_cities_forms_are_disjoint(examples):
    tr, ev = examples["train"], examples["eval"]
    for key in ("person", "first", "last", "home_city", "job", "form", "template"):
        assert not {ex["meta"][key] for ex in tr} & {ex["meta"][key] for ex in ev}, key
    # no eval name part or city appears anywhere in a train text, and vice versa
    train_texts = [_text(ex) for ex in tr]
    eval_texts = [_text(ex) for ex in ev]
    for words, texts in (
        (
            {
                w
                for ex in ev
                for w in (ex["meta"]["first"], ex["meta"]["last"], ex["meta"]["home_city"])
            },
            train_texts,
        ),
        (
            {
                w
                for ex in tr
                for w in (ex["meta"]["first"], ex["meta"]["last"], ex["meta"]["home_city"])
            },
            eval_texts,
        ),
    ):
        for w in sorted(words):
            assert not any(_has_word(t, w) for t in texts), w


def _literal_trigrams(template: str) -> set[tuple[str, ...]]:
    grams = set()
    for chunk in re.split(r"\{[a-z_]+\}", template.lower()):
        words = re.findall(r"[a-z']+", chunk)
        grams |= {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
    return grams


def test_eval_sentence_forms_share_no_wording_with_train():
    train = set().union(*(_literal_trigrams(t) for _, t in gen.TRAIN_FORMS))
    evals = set().union(*(_literal_trigrams(t) for _, t in gen.EVAL_FORMS))
    assert not train & evals
    assert len(gen.TRAIN_FORMS) >= 10 and len(gen.EVAL_FORMS) >= 6

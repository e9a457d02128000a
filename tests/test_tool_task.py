"""The bundled tool-calling task: generated, never hand-edited; held-out phrasings and values
never seen in training; arguments read off the prompt; every record loads and encodes."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from sftforge.data.loading import load_conversations
from sftforge.models.tokenizer import text_side

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_tool_task.py"
ASSETS = ROOT / "src" / "sftforge" / "assets"


def _load():
    spec = importlib.util.spec_from_file_location("make_tool_task", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load()
TRAIN, EVAL = ASSETS / gen.TRAIN_FILE, ASSETS / gen.EVAL_FILE


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _calls(record: dict) -> list[dict]:
    """Every call a record's assistant turns make: {"id", "name", "args" (parsed)}."""
    return [
        {
            "id": c["id"],
            "name": c["function"]["name"],
            "args": json.loads(c["function"]["arguments"]),
        }
        for m in record["messages"]
        if m["role"] == "assistant"
        for c in m.get("tool_calls") or []
    ]


@pytest.fixture(scope="module")
def files() -> dict[str, list[dict]]:
    return {"train": _records(TRAIN), "eval": _records(EVAL)}


@pytest.fixture(scope="module")
def examples() -> dict[str, list[dict]]:
    return {
        "train": gen.make_examples(gen.DEFAULT_TRAIN, "train", gen.DEFAULT_SEED),
        "eval": gen.make_examples(gen.DEFAULT_EVAL, "eval", gen.DEFAULT_SEED),
    }


# --- generated, deterministic ----------------------------------------------------------------


def test_bundled_files_are_what_the_script_writes(tmp_path):
    """Rerun `python scripts/make_tool_task.py` if this fails."""
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    for name in (gen.TRAIN_FILE, gen.EVAL_FILE):
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name


def test_generator_is_deterministic_in_its_seed():
    for split, n in (("train", 40), ("eval", 20)):
        assert gen.make_examples(n, split, 5) == gen.make_examples(n, split, 5)
    assert gen.make_examples(20, "train", 5) != gen.make_examples(20, "train", 6)


def test_counts_and_record_keys(files):
    assert len(files["train"]) == 200 and len(files["eval"]) == 60
    for record in files["train"] + files["eval"]:
        assert list(record) == ["tools", "messages"]


def test_every_record_offers_the_same_tools_in_order(files):
    names = [t["function"]["name"] for t in gen.TOOLS]
    assert names == ["get_weather", "convert_currency", "search_flights", "add_calendar_event"]
    for record in files["train"] + files["eval"]:
        assert record["tools"] == gen.TOOLS


# --- shape of the conversations --------------------------------------------------------------


def test_training_holds_every_kind(examples, files):
    kinds = Counter(ex["meta"]["kind"] for ex in examples["train"])
    assert kinds == {"single": 94, "parallel": 30, "loop": 44, "followup": 20, "no_tool": 12}
    for record, ex in zip(files["train"], examples["train"], strict=True):
        turns = [m for m in record["messages"] if m["role"] == "assistant"]
        calls_per_turn = [len(m.get("tool_calls") or []) for m in turns]
        assert turns[-1]["content"] and not turns[-1].get("tool_calls")  # ends in text
        expected = {
            "single": [1, 0],
            "parallel": [2, 0],
            "loop": [1, 1, 0],
            "followup": [1, 0, 1, 0],
            "no_tool": [0],
        }[ex["meta"]["kind"]]
        assert calls_per_turn == expected


def test_every_held_out_record_ends_with_the_calls_to_predict(files, examples):
    last_step = 0
    for record, ex in zip(files["eval"], examples["eval"], strict=True):
        last = record["messages"][-1]
        assert last["role"] == "assistant" and last["content"] is None and last["tool_calls"]
        before = record["messages"][-2]
        if before["role"] == "tool":  # the second step of a tool loop: history has call+result
            last_step += 1
            assert ex["meta"]["kind"] == "loop"
    assert last_step >= 10
    kinds = {ex["meta"]["kind"] for ex in examples["eval"]}
    assert kinds == {"single", "parallel", "loop", "followup"}


def test_tool_results_answer_the_calls_before_them(files):
    for record in files["train"] + files["eval"]:
        ids, pending = [], set()
        for m in record["messages"]:
            if m["role"] == "assistant":
                assert not pending, "every call gets its result before the next turn"
                new = [c["id"] for c in m.get("tool_calls") or []]
                pending = set(new)
                ids += new
            elif m["role"] == "tool":
                pending.remove(m["tool_call_id"])
                json.loads(m["content"])
        assert ids == [f"call_{k + 1}" for k in range(len(ids))]


_TYPES = {"string": str, "integer": int, "number": (int, float)}


def test_calls_follow_the_tools_schemas(files):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in gen.TOOLS}
    for record in files["train"] + files["eval"]:
        for call in _calls(record):
            schema = schemas[call["name"]]
            assert list(call["args"]) == schema["required"] == list(schema["properties"])
            for key, value in call["args"].items():
                prop = schema["properties"][key]
                assert isinstance(value, _TYPES[prop["type"]]) and not isinstance(value, bool)
                assert value in prop.get("enum", [value])
                if key == "date":
                    assert re.fullmatch(r"2025-\d\d-\d\d", value)
                if key == "time":
                    assert re.fullmatch(r"[0-2]\d:[0-5]\d", value)
                if key.endswith("_currency"):
                    assert value in gen.CURRENCIES


def test_arguments_are_read_off_the_conversation(files):
    """Each argument is written, as the call holds it, in a user message or in a tool result
    before the call (the unit as its capitalised word): nothing is left to guess."""
    for record in files["train"] + files["eval"]:
        seen = ""
        for m in record["messages"]:
            if m["role"] in ("user", "tool"):
                seen += "\n" + m["content"]
            for call in m.get("tool_calls") or []:
                for key, value in json.loads(call["function"]["arguments"]).items():
                    written = value.title() if key == "unit" else str(value)
                    assert re.search(rf"(?<![\w.]){re.escape(written)}(?![\w]|\.\d)", seen), (
                        f"{key}={value!r} not in {seen!r}"
                    )


# --- held-out never in training --------------------------------------------------------------


def test_held_out_templates_are_not_training_templates():
    train, held_out = gen.TEMPLATES["train"], gen.TEMPLATES["eval"]
    for kind in ("single", "parallel", "loop", "no_tool"):
        assert not {t[0] for t in train[kind]} & {t[0] for t in held_out[kind]}
    assert not set(gen.templates_of("train")) & set(gen.templates_of("eval"))
    shared = set().union(*map(gen._phrases, gen.templates_of("train")))
    for text in gen.templates_of("eval"):
        assert not gen._phrases(text) & shared, text


def test_held_out_pools_are_disjoint_from_training():
    train, held_out = gen.pools_of("train"), gen.pools_of("eval")
    for key in ("cities", "amounts", "titles", "pairs", "dates", "times"):
        assert not set(train[key]) & set(held_out[key]), key
    words = {w.lower() for k in ("cities", "titles") for v in train[k] for w in v.split()}
    for value in held_out["cities"]:  # no "San Diego" beside "Diego"
        assert not {w.lower() for w in value.split()} & words, value


def test_held_out_values_and_phrasings_never_occur_in_training(files):
    """Read from the files themselves: no held-out user message, argument value (beside units
    and currency codes, whose pairs differ) or template occurs in training."""
    train_users = {
        m["content"] for r in files["train"] for m in r["messages"] if m["role"] == "user"
    }
    train_text = TRAIN.read_text(encoding="utf-8")
    train_pairs = {
        (c["args"]["from_currency"], c["args"]["to_currency"])
        for r in files["train"]
        for c in _calls(r)
        if c["name"] == "convert_currency"
    }
    train_args = {(k, v) for r in files["train"] for c in _calls(r) for k, v in c["args"].items()}
    for record in files["eval"]:
        for m in record["messages"]:
            assert m["role"] != "user" or m["content"] not in train_users
        for call in _calls(record):
            for key, value in call["args"].items():
                if key in ("unit", "from_currency", "to_currency"):
                    continue
                assert (key, value) not in train_args, (key, value)
                if isinstance(value, str):
                    pattern = rf"(?<![\w:-]){re.escape(value)}(?![\w:-])"
                    assert not re.search(pattern, train_text), value
            if call["name"] == "convert_currency":
                pair = (call["args"]["from_currency"], call["args"]["to_currency"])
                assert pair not in train_pairs


def test_check_held_out_catches_a_leak(examples):
    gen.check_held_out(examples["train"], examples["eval"])
    leaked = [ex for ex in examples["train"] if ex["meta"]["kind"] == "single"][:1]
    with pytest.raises(AssertionError, match="held-out"):
        gen.check_held_out(examples["train"], examples["eval"] + leaked)


# --- sftforge reads and encodes them ---------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    return {"train": load_conversations(TRAIN), "eval": load_conversations(EVAL)}


def test_every_record_loads(loaded):
    for split, n in (("train", 200), ("eval", 60)):
        result = loaded[split]
        assert len(result.conversations) == n and len(result.rejects) == 0
        assert result.formats == {"messages": 1}
        for conversation in result.conversations:
            assert [t["function"]["name"] for t in conversation.tools] == [
                t["function"]["name"] for t in gen.TOOLS
            ]
    for conversation in loaded["eval"].conversations:
        assert conversation.messages[-1].tool_calls


def test_every_record_encodes_well_under_1024_tokens(loaded, smollm2_tokenizer):
    encoder, _ = text_side(smollm2_tokenizer, "chatml")
    lengths = {}
    for split in ("train", "eval"):
        lengths[split] = [
            len(example.input_ids)
            for conversation in loaded[split].conversations
            for example in encoder.encode_examples(conversation)
        ]
        values = lengths[split]
        print(
            f"{split}: {len(values)} examples, tokens max {max(values)}, "
            f"mean {statistics.mean(values):.1f}, median {statistics.median(values)}"
        )
    everything = lengths["train"] + lengths["eval"]
    assert max(everything) < 1024
    assert statistics.mean(everything) < 700  # a compact tool list: about 490 tokens of it

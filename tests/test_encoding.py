"""Encoding at scale: in parallel it gives the very examples of one process, in order, with
the same rejects; cached, a second preparation reads them back, and any change to what they
depend on (data, tokenizer, template, masking) makes a new entry."""

import json
from pathlib import Path

import pytest

import sftforge.encoding as encoding
from sftforge.data import Rejects
from sftforge.encoding import cache_key, cached_encode_all
from sftforge.examples import encode_all
from sftforge.formats import Conversation, Message, Source
from sftforge.prepare import text_side

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


def conversations(n: int = 40) -> list[Conversation]:
    chats = []
    for i, line in enumerate(DEMO.read_text().splitlines()[:n]):
        record = json.loads(line)
        messages = tuple(Message(m["role"], m["content"]) for m in record["messages"])
        chats.append(Conversation(Source("demo.jsonl", line=i + 1), messages))
    return chats


def same(a, b) -> bool:
    return [(e.input_ids, e.labels, e.source) for e in a] == [
        (e.input_ids, e.labels, e.source) for e in b
    ]


@pytest.fixture()
def encoder(smollm2_tokenizer):
    return text_side(smollm2_tokenizer, "auto")[0]


@pytest.fixture()
def strict_encoder(smollm2_tokenizer):
    """The built-in Alpaca template, which refuses two user turns in a row."""
    return text_side(smollm2_tokenizer, "alpaca")[0]


def unrenderable() -> Conversation:
    return Conversation(
        Source("bad.jsonl", line=7),
        (Message("user", "a"), Message("user", "b"), Message("assistant", "c")),
    )


def test_parallel_encoding_gives_the_examples_and_rejects_of_one_process(
    strict_encoder, monkeypatch
):
    encoder = strict_encoder
    monkeypatch.setattr(encoding, "PARALLEL_FROM", 10)
    monkeypatch.setattr(encoding, "CHUNK", 7)
    chats = conversations(40)
    chats.insert(13, unrenderable())

    one_rejects, two_rejects = Rejects(), Rejects()
    one = encode_all(chats, encoder, "skip", one_rejects, num_proc=1)
    two = encode_all(chats, encoder, "skip", two_rejects, num_proc=2)

    assert same(one, two) and len(two) == 40
    assert [(r.source, r.reason) for r in one_rejects] == [
        (r.source, r.reason) for r in two_rejects
    ]
    assert len(two_rejects) == 1


def test_the_cache_gives_back_the_examples_it_was_given(strict_encoder, tmp_path, capsys):
    encoder = strict_encoder
    chats = conversations(30)
    chats.insert(4, unrenderable())
    fresh, fresh_rejected = cached_encode_all(chats, encoder, "skip", 1, tmp_path)
    assert "cached in" in capsys.readouterr().out

    read, read_rejected = cached_encode_all(chats, encoder, "skip", 1, tmp_path)

    assert "read from the cache" in capsys.readouterr().out
    assert same([e for e in read if e], [e for e in fresh if e])
    assert [e is None for e in read] == [e is None for e in fresh]
    assert [(i, str(err)) for i, err in read_rejected] == [
        (i, str(err)) for i, err in fresh_rejected
    ]
    with pytest.raises(Exception, match="bad.jsonl:7"):
        cached_encode_all(chats, encoder, "error", 1, tmp_path)  # a cached reject still errs


def test_the_key_changes_with_what_the_examples_depend_on(smollm2_tokenizer, encoder):
    chats = conversations(10)
    key = cache_key(chats, encoder)
    edited = list(chats)
    edited[3] = Conversation(
        chats[3].source, (*chats[3].messages[:-1], Message("assistant", "Another answer."))
    )
    untrained = list(chats)
    first = chats[0].messages
    untrained[0] = (
        Conversation(
            chats[0].source, (first[0], Message("assistant", first[1].content, trained=False))
        )
        if "trained" in Message.__dataclass_fields__
        else chats[1]
    )

    assert cache_key(chats, encoder) == key  # the same inputs: the same key
    assert cache_key(edited, encoder) != key  # the data's content
    assert cache_key(chats[:-1], encoder) != key  # a record fewer (another split)
    assert cache_key(untrained, encoder) != key  # an untrained turn, or another record
    assert cache_key(chats, text_side(smollm2_tokenizer, "zephyr")[0]) != key  # template
    last_only = text_side(smollm2_tokenizer, "auto", "last_assistant_turn")[0]
    assert cache_key(chats, last_only) != key  # masking
    smollm2_tokenizer.add_tokens(["<|a_new_word|>"], special_tokens=True)
    assert cache_key(chats, text_side(smollm2_tokenizer, "auto")[0]) != key  # tokenizer


def test_the_cache_is_kept_before_the_max_length_policy(tmp_path, smollm2_tokenizer, capsys):
    """A run with another max_length reuses the entry and fits the examples itself."""
    from sftforge.config import load_config
    from sftforge.examples import load_examples

    encoder = text_side(smollm2_tokenizer, "auto")[0]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(DEMO.read_text().splitlines()[:20]) + "\n")
    settings = [f"data.train={data}", f"cache_dir={tmp_path / 'cache'}"]
    long = load_examples(load_config(None, settings + ["max_length=1024"]), encoder, tmp_path)
    short = load_examples(
        load_config(None, settings + ["max_length=90", "truncation=truncate"]), encoder, tmp_path
    )

    assert "read from the cache" in capsys.readouterr().out
    assert [e.input_ids[:90] for e in long.examples] == [e.input_ids for e in short.examples]


def test_a_damaged_cache_entry_is_encoded_again_not_trusted(encoder, tmp_path, capsys):
    chats = conversations(12)
    fresh, _ = cached_encode_all(chats, encoder, "error", 1, tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (entry / "ids.npy").write_bytes(b"not an array")
    capsys.readouterr()

    again, _ = cached_encode_all(chats, encoder, "error", 1, tmp_path)

    assert "could not be read" in capsys.readouterr().out
    assert same(again, fresh)

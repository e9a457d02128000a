"""Encoding at scale: streamed a few chunks ahead; in parallel it gives the very examples of
one process, in order, with the same rejects; cached, a second preparation reads them back,
and any change to what they depend on (data, how it is read, tokenizer, template, masking)
makes a new entry."""

import json
from pathlib import Path

import pytest

import sftforge
import sftforge.encode.parallel as encoding
from sftforge.data.loading import Rejects
from sftforge.data.messages import Conversation, DataError, Message, Source
from sftforge.encode.cache import data_key
from sftforge.encode.parallel import encode_all
from sftforge.models.tokenizer import text_side
from sftforge.training.training_data import load_examples, reading_of

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


def write_data(path: Path, n: int, bad_at: int | None = None) -> Path:
    """The first `n` demo conversations as JSONL, with one the Alpaca template refuses (two
    user turns in a row) inserted at line `bad_at`."""
    lines = DEMO.read_text().splitlines()[:n]
    if bad_at is not None:
        bad = {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        }
        lines.insert(bad_at - 1, json.dumps(bad))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(tmp_path: Path, data: Path, *more: str):
    from sftforge.config.loading import load_config

    settings = [f"data.train={data}", f"cache_dir={tmp_path / 'cache'}", "max_length=1024"]
    return load_config(None, settings + list(more))


def test_the_cache_gives_back_the_examples_held_out_and_rejects_it_was_given(
    strict_encoder, tmp_path, capsys
):
    data = write_data(tmp_path / "data.jsonl", 30, bad_at=5)
    config = run_config(tmp_path, data, "data.on_invalid=skip", "eval.held_out=4")
    fresh = load_examples(config, strict_encoder, tmp_path / "one")
    assert "cached in" in capsys.readouterr().out

    read = load_examples(config, strict_encoder, tmp_path / "two")

    assert "read from the cache" in capsys.readouterr().out
    assert same(read.examples, fresh.examples) and len(read.examples) == 26
    assert same(read.held_out_examples, fresh.held_out_examples)
    assert read.held_out == fresh.held_out and len(read.held_out) == 4
    rejects = [(tmp_path / run / "rejects.jsonl").read_text() for run in ("one", "two")]
    assert rejects[0] == rejects[1] and "data.jsonl:5" in rejects[0]
    summaries = [
        data.loaded.summary().replace(f"/{run}/", "/")
        for data, run in ((fresh, "one"), (read, "two"))
    ]
    assert summaries[0] == summaries[1]
    with pytest.raises(DataError, match="data.jsonl:5"):  # with on_invalid=error it errs
        load_examples(run_config(tmp_path, data), strict_encoder, tmp_path / "three")


def test_a_cached_run_parses_no_record_held_out_ones_included(encoder, tmp_path, monkeypatch):
    import sftforge.encode.cache as cache
    import sftforge.encode.selection as selection

    data = write_data(tmp_path / "data.jsonl", 30)
    config = run_config(tmp_path, data, "eval.held_out=0.2")
    fresh = load_examples(config, encoder, tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read again")

    monkeypatch.setattr(cache, "iter_readings", no_reading)
    monkeypatch.setattr(selection, "iter_readings", no_reading)
    again = load_examples(config, encoder, tmp_path)

    assert again.held_out == fresh.held_out and len(again.held_out) == 6
    assert [c.source for c in again.held_out] == [c.source for c in fresh.held_out]
    assert same(again.examples, fresh.examples)


def test_the_key_changes_with_what_the_examples_depend_on(smollm2_tokenizer, encoder, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 10)
    config = run_config(tmp_path, data)

    def key(config=config, encoder=encoder) -> str:
        readings = [reading_of(config, source) for source in config.data.sources()]
        return data_key(readings, encoder)

    first = key()
    assert key() == first  # the same inputs: the same key
    assert key(run_config(tmp_path, data, "eval.held_out=3")) == first  # rows chosen after
    assert key(run_config(tmp_path, data, "max_length=64")) == first
    assert key(run_config(tmp_path, data, "data.format=messages")) != first  # how it is read
    assert key(run_config(tmp_path, data, "data.on_invalid=skip")) != first
    assert key(encoder=text_side(smollm2_tokenizer, "zephyr")[0]) != first  # template
    last_only = text_side(smollm2_tokenizer, "auto", "last_assistant_turn")[0]
    assert key(encoder=last_only) != first  # masking
    lines = data.read_text().splitlines()
    lines[3] = lines[3].replace('"assistant", "content": "', '"assistant", "content": "Well, ')
    data.write_text("\n".join(lines) + "\n")
    assert key() != first  # the data's content
    smollm2_tokenizer.add_tokens(["<|a_new_word|>"], special_tokens=True)
    assert key(encoder=text_side(smollm2_tokenizer, "auto")[0]) != first  # tokenizer


def test_the_key_hashes_every_module_that_reads_renders_or_encodes_found_on_disk():
    """No hand-kept list: each module of data/ and encode/ (a new or moved one too) is in the
    key, and so is every one of them that encoding imports."""
    import sys

    from sftforge.encode.cache import ENCODING_PACKAGES, encoding_sources

    package = Path(sftforge.__file__).parent
    on_disk = {p for stage in ENCODING_PACKAGES for p in (package / stage).rglob("*.py")}
    assert set(encoding_sources()) == on_disk
    imported = {
        Path(module.__file__)
        for name, module in sys.modules.items()
        if name.startswith(("sftforge.data.", "sftforge.encode.")) and module.__file__
    }
    assert imported and imported <= on_disk


def test_encoding_reads_the_conversations_a_few_chunks_ahead_not_all(encoder, monkeypatch):
    """Streaming: while the first chunk comes back, at most IN_FLIGHT chunks per worker (and
    the two looked at first) have been read, so memory never holds the whole data."""
    monkeypatch.setattr(encoding, "PARALLEL_FROM", 10)
    monkeypatch.setattr(encoding, "CHUNK", 5)
    chats = conversations(200)
    read = []

    def stream():
        for c in chats:
            read.append(c)
            yield c

    chunks = encoding.encoded_chunks(stream(), encoder, num_proc=2)
    first, encoded = next(chunks)
    ahead = len(read)
    rest = list(chunks)

    assert first == chats[:5] and len(encoded.lengths) == 5
    assert ahead <= (encoding.IN_FLIGHT * 2 + 2) * 5 < len(chats)
    assert sum(len(c) for c, _ in rest) == 195


def test_the_cache_is_kept_before_the_max_length_policy(tmp_path, smollm2_tokenizer, capsys):
    """A run with another max_length reuses the entry and fits the examples itself."""
    from sftforge.config.loading import load_config

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


@pytest.mark.parametrize("damage", ["ids.bin", "lengths.bin", "meta.json"])
def test_a_damaged_cache_entry_is_encoded_again_not_trusted(encoder, tmp_path, capsys, damage):
    config = run_config(tmp_path, write_data(tmp_path / "data.jsonl", 12))
    fresh = list(load_examples(config, encoder, tmp_path).examples)
    (entry,) = [p for p in (tmp_path / "cache/examples").iterdir() if p.is_dir()]
    (entry / damage).unlink()  # a new file: the examples read above still map the old one
    (entry / damage).write_bytes(b"not an array")
    capsys.readouterr()

    again = load_examples(config, encoder, tmp_path)

    assert "could not be read" in capsys.readouterr().out
    assert same(again.examples, fresh)


def test_a_chunk_counts_trained_tokens_as_each_example_does():
    from sftforge.encode.encoder import IGNORE_INDEX, Example
    from sftforge.encode.table import EncodedChunk

    ignored = IGNORE_INDEX
    examples = [
        Example([1, 2, 3, 4], [1, 2, ignored, 4], "a"),  # first token trained: not counted
        Example([5], [5], "b"),  # one token: nothing predicts it
        Example([6, 7, 8], [ignored, 7, 8], "c"),
        Example([9, 10], [ignored, ignored], "d"),
    ]
    chunk = EncodedChunk.of([[e] for e in examples], [])
    assert (
        chunk.trained_counts.tolist() == [e.trained_token_count for e in examples] == [2, 0, 2, 0]
    )


@pytest.mark.parametrize("family", ["smollm2", "sentencepiece"])
def test_template_text_tokenized_once_and_remembered_gives_what_a_fresh_encoder_gives(
    family, smollm2_tokenizer, sentencepiece_tokenizer
):
    # SmolLM2's template writes a default system prompt, and ChatML a "\n" after each turn's
    # end: text of the template's own, which SentencePiece tokenizes behind an anchor.
    tokenizer = smollm2_tokenizer if family == "smollm2" else sentencepiece_tokenizer
    template = "auto" if family == "smollm2" else "chatml"
    chats = conversations(30)
    warm = text_side(tokenizer, template)[0]
    first = [example for (example,) in warm.encode_many(chats)]
    again = [example for (example,) in warm.encode_many(chats)]  # every text remembered
    assert warm._template_ids  # the texts were remembered
    fresh = [text_side(tokenizer, template)[0].encode(c) for c in chats]
    assert same(first, fresh) and same(again, fresh)

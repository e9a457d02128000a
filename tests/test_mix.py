"""Several datasets in one run: each read its own way, taken by weight or count,
deterministically by the seed, never holding out what it trains on, and reported."""

import json
from pathlib import Path

import pytest

from sftforge.config.loading import ConfigError, load_config
from sftforge.models.tokenizer import text_side
from sftforge.training.training_data import load_examples

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


@pytest.fixture()
def sources(tmp_path) -> dict[str, Path]:
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(DEMO.read_text().splitlines()[:10]) + "\n")
    dolly = tmp_path / "dolly.jsonl"
    rows = [
        {
            "instruction": f"Name a number above {i}.",
            "context": "",
            "response": str(i + 1),
            "category": "open_qa",
        }
        for i in range(6)
    ]
    dolly.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = tmp_path / "qa.csv"
    qa.write_text("question,answer\nWhat is red?,A colour.\nWhat is two?,A number.\n")
    return {"chat": chat, "dolly": dolly, "qa": qa}


def mix_config(tmp_path, sources, seed=42, held_out=None):
    train = [
        {"path": str(sources["chat"]), "weight": 2},
        {"path": str(sources["dolly"]), "count": 3},
        {"path": str(sources["qa"]), "columns": {"instruction": "question", "output": "answer"}},
    ]
    extra = [f"eval.held_out={held_out}"] if held_out else []
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
            f"training.seed={seed}",
        ]
        + extra,
        data={"train": train},
    )


def test_each_source_gives_its_weight_or_count_and_is_reported(
    tmp_path, sources, smollm2_tokenizer
):
    encoder = text_side(smollm2_tokenizer, "auto")[0]
    data = load_examples(mix_config(tmp_path, sources), encoder, tmp_path)

    taken = [(s["name"], s["loaded"], s["training"], s["taken"], s["examples"]) for s in data.mix]
    assert taken == [
        (str(sources["chat"]), 10, 10, 20, 20),  # weight 2: each twice
        (str(sources["dolly"]), 6, 6, 3, 3),  # count 3 of 6
        (str(sources["qa"]), 2, 2, 2, 2),  # its own column mapping, all of it
    ]
    assert len(data.examples) == 25
    assert sum(s["tokens"] for s in data.mix) == sum(len(e.input_ids) for e in data.examples)
    from_chat = [e.source for e in data.examples if e.source.startswith(str(sources["chat"]))]
    assert sorted(set(from_chat)) == sorted(f"{sources['chat']}:{n}" for n in range(1, 11))


def test_the_draw_is_fixed_by_the_seed(tmp_path, sources, smollm2_tokenizer):
    encoder = text_side(smollm2_tokenizer, "auto")[0]

    def drawn(seed):
        data = load_examples(mix_config(tmp_path, sources, seed), encoder, tmp_path)
        return [e.source for e in data.examples if "dolly" in e.source]

    assert drawn(1) == drawn(1)
    assert {tuple(drawn(seed)) for seed in range(6)} != {tuple(drawn(1))}


def test_what_is_held_out_is_never_trained_on_even_when_a_source_repeats(
    tmp_path, sources, smollm2_tokenizer
):
    encoder = text_side(smollm2_tokenizer, "auto")[0]
    data = load_examples(mix_config(tmp_path, sources, held_out=4), encoder, tmp_path)

    held = {str(c.source) for c in data.held_out}
    assert len(held) == 4
    assert held.isdisjoint(e.source for e in data.examples)
    assert sum(s["training"] for s in data.mix) == 18 - 4


def test_a_source_given_both_a_weight_and_a_count_is_refused_by_key(tmp_path):
    with pytest.raises(ConfigError, match="config key 'data.train'.*weight or count, not both"):
        load_config(None, data={"train": [{"path": "a.jsonl", "weight": 2, "count": 3}]})

"""`sftforge data stats` and `sftforge data convert`: what a dataset holds, with known
answers on planted records; and conversions that read back as the same conversations."""

import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sftforge.curate.dedup import DuplicateFinder, find_duplicates
from sftforge.curate.stats import Distribution, collect_stats, format_stats, histogram_bins
from sftforge.data.loading import load_conversations
from sftforge.data.writers import WRITERS, write_records
from sftforge.models.tokenizer import text_side

PLANTED = Path(__file__).parent / "data" / "data_tools" / "planted.jsonl"
DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


@pytest.fixture()
def encoder(smollm2_tokenizer):
    return text_side(smollm2_tokenizer, "auto")[0]


def line(n: int) -> str:
    return f"{PLANTED}:{n}"


def test_stats_find_the_planted_problems_by_their_lines(encoder):
    conversations = load_conversations(PLANTED).conversations
    stats = collect_stats(conversations, encoder, max_length=60, duplicates=DuplicateFinder())

    assert stats.conversations == 6
    assert stats.exact_duplicates.sources == [line(2)]  # case and spacing aside, line 1 again
    assert stats.short_responses.sources == [line(3)]  # "Yes."
    assert stats.echoed_prompts.sources == [line(4)]
    assert stats.refusals.sources == [line(5)]
    assert stats.over_max_length.sources == [line(6)]
    assert stats.roles == {"user": 7, "assistant": 7, "system": 1}
    assert stats.turns.counts == {2: 5, 5: 1}


def test_token_counts_are_those_training_would_see(encoder):
    conversations = load_conversations(PLANTED).conversations
    stats = collect_stats(conversations, encoder, max_length=60)
    examples = [encoder.encode(c) for c in conversations]

    assert stats.example_tokens.counts == Counter(len(e.input_ids) for e in examples)
    assert stats.response_tokens.counts == Counter(e.trained_token_count for e in examples)
    assert stats.trained_tokens == sum(e.trained_token_count for e in examples)
    long = examples[5]
    assert stats.trained_lost_by_drop == long.trained_token_count
    kept = sum(1 for x in long.labels[1:60] if x != -100)
    assert stats.trained_lost_by_truncate == long.trained_token_count - kept
    assert 0 < stats.trained_lost_by_truncate < stats.trained_lost_by_drop


def test_the_report_names_each_finding(encoder):
    conversations = load_conversations(PLANTED).conversations
    stats = collect_stats(conversations, encoder, max_length=60, duplicates=DuplicateFinder())
    text = format_stats(stats)
    assert f"exact duplicates                   1 (16.7%): {line(2)}" in text
    assert "dropping them (truncation: drop) loses" in text
    assert "near duplicates                    0 (0.0%)" in text
    assert f"refusal-like boilerplate           1 (16.7%): {line(5)}" in text


@pytest.mark.parametrize("values", [[5], [1, 2, 3, 100], list(range(37)), [7, 7, 7, 8]])
def test_histogram_ranges_cover_every_value_once(values):
    bins = histogram_bins(Distribution(values), bins=10)
    assert sum(count for _, _, count in bins) == len(values)
    assert bins[0][0] == min(values) and bins[-1][0] <= max(values) <= bins[-1][1]
    assert all(a[1] + 1 == b[0] for a, b in zip(bins, bins[1:], strict=False))


@pytest.mark.parametrize("values", [[5], [1, 2], [3, 1, 2], [7, 7, 7, 8], list(range(37)) * 3])
def test_a_distribution_held_as_counts_gives_the_median_and_mean_of_its_values(values):
    held = Distribution(values)
    assert len(held) == len(values) and held.total == sum(values)
    assert held.quantile(0.5) == statistics.median(values)
    ordered = sorted(values)
    assert [held.at_rank(k) for k in range(len(values))] == ordered


CHATS = """\
{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]}
{"messages": [{"role": "user", "content": "Say  two\\nlines"}, {"role": "assistant", "content": " one\\ntwo "}]}
"""


@pytest.mark.parametrize("format", ["messages", "openai", "sharegpt", "prompt_completion"])
def test_a_conversion_reads_back_as_the_same_conversations(tmp_path, format):
    source = tmp_path / "chats.jsonl"
    source.write_text(CHATS)
    before = load_conversations(source).conversations

    written = write_records(before, format, tmp_path / "out.jsonl")
    after = load_conversations(tmp_path / "out.jsonl").conversations

    assert written.count == 3 and written.refused == []
    assert [c.messages for c in after] == [c.messages for c in before]


def test_alpaca_takes_one_exchange_and_refuses_longer_chats_by_name(tmp_path):
    source = tmp_path / "chats.jsonl"
    source.write_text(CHATS)
    before = load_conversations(source).conversations

    written = write_records(before, "alpaca", tmp_path / "out.jsonl")
    after = load_conversations(tmp_path / "out.jsonl").conversations

    assert [c.messages for c in after] == [before[0].messages, before[2].messages]
    assert written.refused == [
        (
            f"{source}:2",
            "4 turns (user, assistant, user, assistant); alpaca holds one user turn and one "
            "assistant turn: convert to messages or sharegpt instead",
        )
    ]


def test_the_demo_data_survives_every_round_trip(tmp_path):
    before = load_conversations(DEMO).conversations
    for format in WRITERS:
        if format == "text":
            continue
        write_records(before, format, tmp_path / f"{format}.jsonl")
        after = load_conversations(tmp_path / f"{format}.jsonl").conversations
        assert [c.messages for c in after] == [c.messages for c in before], format


def test_data_convert_command_says_what_it_could_not_write_and_fails(tmp_path):
    source = tmp_path / "chats.jsonl"
    source.write_text(CHATS)
    out = tmp_path / "alpaca.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftforge",
            "data",
            "convert",
            str(source),
            "--to",
            "alpaca",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "2 records written" in done.stdout
    assert f"not written: {source}:2: 4 turns" in done.stdout
    assert len(out.read_text().splitlines()) == 2
    assert json.loads(out.read_text().splitlines()[0])["system"] == "Be brief."


def test_the_dedup_command_streams_the_kept_records_and_reports_each_dropped_one(tmp_path):
    from sftforge.cli.main import main

    out = tmp_path / "kept.jsonl"
    assert main(["data", "dedup", str(PLANTED), "-o", str(out)]) == 0

    expected = find_duplicates(load_conversations(PLANTED).conversations)
    kept = load_conversations(out).conversations
    assert [c.messages for c in kept] == [c.messages for c in expected.kept]
    report = [json.loads(x) for x in (tmp_path / "kept.jsonl.duplicates.jsonl").open()]
    assert [(r["kept"], r["dropped"]) for r in report] == [(line(1), line(2))]


def test_the_stats_command_prints_the_findings_exact_only_too(tmp_path, capsys):
    from sftforge.cli.main import main

    assert main(["data", "stats", str(PLANTED), "--max-length", "60", "--exact-only"]) == 0
    text = capsys.readouterr().out
    assert f"exact duplicates                   1 (16.7%): {line(2)}" in text
    assert "near duplicates" not in text  # not sought
    assert "conversations: 6" in text

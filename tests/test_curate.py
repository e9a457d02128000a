"""Curating data before training: curate/dedup.py finds the planted exact and near duplicates (and
nothing else), curate/filters.py rejects each planted record by its rule; both name every dropped
record by file:line and write what they keep so that load_conversations reads it back."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from sftforge.curate.dedup import DuplicateFinder, find_duplicates, shingles, write_dedup_report
from sftforge.curate.filters import FilterError, FilterRules, filter_conversations, write_filter
from sftforge.data.loading import conversation_from_record, load_conversations
from sftforge.data.messages import Conversation, Message, Source
from sftforge.data.writers import conversation_record, write_conversations

DATA = Path(__file__).parent / "data" / "curate"
# chats.jsonl: 1 coffee question (A); 2 sorting in Python (B); 3 A in other case and
# whitespace; 4 capital of Australia, A's system prompt; 5 A with three words changed;
# 6 photosynthesis; 7 A's system prompt and question with another answer.
# more_chats.jsonl: 1 a haiku; 2 B in other case.
CHATS, MORE_CHATS = DATA / "chats.jsonl", DATA / "more_chats.jsonl"
# filter.jsonl: one record per rule (see FILTER_CASES), and lines 1 and 8 break none.
FILTER_DATA = DATA / "filter.jsonl"


def load(*paths: Path) -> list[Conversation]:
    return load_conversations(list(paths)).conversations


def chat(source: str, *pairs: tuple[str, str]) -> Conversation:
    path, line = source.split(":")
    messages = tuple(Message(role, content) for role, content in pairs)
    return Conversation(Source(path, int(line)), messages)


def text(source: str, content: str) -> Conversation:
    path, line = source.split(":")
    return Conversation(Source(path, int(line)), text=content)


def jaccard(a: Conversation, b: Conversation) -> float:
    """The true Jaccard similarity of two records' shingle sets, which MinHash estimates."""
    first, second = shingles(a), shingles(b)
    return len(first & second) / len(first | second)


def pairs(result) -> set[tuple[str, str, str]]:
    """(kept, dropped, kind) of every dropped record."""
    return {
        (str(cluster.kept), str(duplicate.source), duplicate.kind)
        for cluster in result.clusters
        for duplicate in cluster.dropped
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- dedup ------------------------------------------------------------------------------------


def test_exact_duplicates_differing_in_case_and_whitespace_are_dropped():
    result = find_duplicates(load(CHATS, MORE_CHATS))
    assert pairs(result) == {
        (f"{CHATS}:1", f"{CHATS}:3", "exact"),
        (f"{CHATS}:2", f"{MORE_CHATS}:2", "exact"),
    }
    assert all(d.similarity == 1.0 for d in result.dropped)
    assert result.counts == {
        "records": 9,
        "kept": 7,
        "dropped": 2,
        "exact": 2,
        "near": 0,
        "clusters": 2,
    }


def test_near_duplicate_is_found_below_its_jaccard_and_not_above():
    conversations = load(CHATS)
    original, changed = conversations[0], conversations[4]
    true_jaccard = jaccard(original, changed)
    assert 0.75 < true_jaccard < 0.85  # three words changed in a 60-word answer

    below = find_duplicates(conversations, threshold=round(true_jaccard - 0.1, 2))
    assert (f"{CHATS}:1", f"{CHATS}:5", "near") in pairs(below)
    (near,) = [d for d in below.dropped if d.kind == "near"]
    assert near.similarity == pytest.approx(true_jaccard, abs=0.1)

    above = find_duplicates(conversations, threshold=round(true_jaccard + 0.1, 2))
    assert pairs(above) == {(f"{CHATS}:1", f"{CHATS}:3", "exact")}
    assert f"{CHATS}:5" in {str(c.source) for c in above.kept}


def near_pair(rng, k: int) -> tuple[Conversation, Conversation]:
    """Two chats of 220 distinct random words, the second with its first k words replaced."""
    words = [f"w{rng.getrandbits(40):x}" for _ in range(220)]
    changed_words = [f"v{rng.getrandbits(40):x}" for _ in range(k)] + words[k:]
    return (
        chat("a.jsonl:1", ("user", " ".join(words)), ("assistant", "ok")),
        chat("a.jsonl:2", ("user", " ".join(changed_words)), ("assistant", "ok")),
    )


@pytest.mark.parametrize(
    ("target", "low", "high"),
    [(0.80, 0.0, 0.15), (0.85, 0.35, 0.65), (0.90, 0.85, 1.0), (0.95, 0.97, 1.0)],
)
def test_near_duplicate_recall_at_threshold_085_is_what_dedup_py_states(target, low, high):
    """dedup.py: a pair of true Jaccard 0.80 / 0.85 / 0.90 / 0.95 is found 7 / 51 / 93 /
    100 % of the time at threshold 0.85 (300 random pairs each; the bounds leave about four
    standard deviations; datasketch's default band weights fail the 0.85 and 0.90 cases)."""
    import random

    rng = random.Random(target)
    k = min(range(1, 40), key=lambda k: abs(jaccard(*near_pair(rng, k)) - target))
    assert abs(jaccard(*near_pair(rng, k)) - target) < 0.01
    finder = DuplicateFinder(threshold=0.85)  # one for all: unrelated pairs never cluster
    found = 0
    for _ in range(300):
        original, changed = near_pair(rng, k)
        assert finder.keeps(original)
        found += not finder.keeps(changed)
    assert low <= found / 300 <= high


def test_exact_only_finds_the_exact_duplicates_and_leaves_the_near_one():
    conversations = load(CHATS)
    finder = DuplicateFinder(threshold=0.5, near=False)
    kept = [c for c in conversations if finder.keeps(c)]

    assert pairs(finder.result(kept)) == {(f"{CHATS}:1", f"{CHATS}:3", "exact")}
    assert f"{CHATS}:5" in {str(c.source) for c in kept}  # near line 1, kept
    assert finder.result(kept).threshold == 1.0


# (0.3, 16): one band per MinHash value, so LSH proposes many unrelated candidates and only
# the similarity check keeps them apart.
@pytest.mark.parametrize(
    ("threshold", "num_perm"), [(0.3, 16), (0.5, 128), (0.7, 128), (0.85, 128), (0.95, 128)]
)
def test_unrelated_records_are_never_clustered(threshold, num_perm):
    conversations = load(CHATS, MORE_CHATS)
    planted = {
        (f"{CHATS}:1", f"{CHATS}:3", "exact"),
        (f"{CHATS}:1", f"{CHATS}:5", "near"),
        (f"{CHATS}:2", f"{MORE_CHATS}:2", "exact"),
    }
    # Line 7 shares A's system prompt and question: related, but far below every threshold.
    assert jaccard(conversations[0], conversations[6]) < 0.2
    result = find_duplicates(conversations, threshold=threshold, num_perm=num_perm)
    assert pairs(result) <= planted
    assert {pair for pair in planted if pair[2] == "exact"} <= pairs(result)
    assert len(result.kept) + len(result.dropped) == len(conversations)


def test_the_first_record_of_a_cluster_is_kept_whatever_the_order():
    conversations = load(CHATS)
    forward = find_duplicates(conversations, threshold=0.6)
    backward = find_duplicates(conversations[::-1], threshold=0.6)
    assert [str(c.kept) for c in forward.clusters] == [f"{CHATS}:1"]
    assert [str(c.kept) for c in backward.clusters] == [f"{CHATS}:5"]
    assert pairs(find_duplicates(conversations, threshold=0.6)) == pairs(forward)  # same seed


def test_report_names_the_kept_and_the_dropped_record_by_file_and_line(tmp_path):
    result = find_duplicates(load(CHATS, MORE_CHATS), threshold=0.6)
    write_conversations(tmp_path / "kept.jsonl", result.kept)
    write_dedup_report(result, tmp_path / "report.jsonl")
    report = read_jsonl(tmp_path / "report.jsonl")
    assert [(line["dropped"], line["kept"], line["kind"]) for line in report] == [
        (f"{CHATS}:3", f"{CHATS}:1", "exact"),
        (f"{CHATS}:5", f"{CHATS}:1", "near"),
        (f"{MORE_CHATS}:2", f"{CHATS}:2", "exact"),
    ]
    assert report[0]["similarity"] == 1.0
    assert 0.6 <= report[1]["similarity"] < 1.0


def test_kept_records_read_back_as_the_kept_conversations(tmp_path):
    result = find_duplicates(load(CHATS, MORE_CHATS), threshold=0.6)
    write_conversations(tmp_path / "kept.jsonl", result.kept)
    write_dedup_report(result, tmp_path / "report.jsonl")
    back = load(tmp_path / "kept.jsonl")
    assert [c.messages for c in back] == [c.messages for c in result.kept]
    assert [c.source.line for c in back] == list(range(1, len(result.kept) + 1))


def test_an_exact_repeat_of_a_near_duplicate_joins_the_kept_record_of_that_one():
    original, changed = load(CHATS)[0], load(CHATS)[4]
    repeat = Conversation(Source("other.jsonl", 9), changed.messages)
    result = find_duplicates([original, changed, repeat], threshold=0.6)
    (cluster,) = result.clusters
    assert str(cluster.kept) == f"{CHATS}:1"
    assert [(str(d.source), d.kind) for d in cluster.dropped] == [
        (f"{CHATS}:5", "near"),
        ("other.jsonl:9", "near"),
    ]
    assert cluster.dropped[0].similarity == cluster.dropped[1].similarity


def test_raw_text_records_are_compared_too_but_never_equal_a_chat():
    records = [
        text("t.jsonl:1", "Once upon a time there was a tokenizer."),
        text("t.jsonl:2", "ONCE upon a time   there was a tokenizer."),
        chat("c.jsonl:1", ("user", "Once upon a time"), ("assistant", "there was a tokenizer.")),
    ]
    assert pairs(find_duplicates(records)) == {("t.jsonl:1", "t.jsonl:2", "exact")}


def test_roles_and_the_system_prompt_count_in_an_exact_duplicate():
    first = chat("c.jsonl:1", ("user", "a question"), ("assistant", "an answer"))
    swapped = chat("c.jsonl:2", ("system", "a question"), ("assistant", "an answer"))
    with_system = chat(
        "c.jsonl:3", ("system", "Be brief."), *[(m.role, m.content) for m in first.messages]
    )
    assert find_duplicates([first, swapped, with_system], threshold=0.95).dropped == []


def test_a_record_near_two_kept_ones_joins_the_more_similar():
    def words(first: int, last: int) -> str:
        return " ".join(f"w{i}" for i in range(first, last + 1))

    early, late = text("t.jsonl:1", words(1, 60)), text("t.jsonl:2", words(31, 90))
    between = text("t.jsonl:3", words(11, 90))  # Jaccard about 0.53 with early, 0.74 with late
    assert jaccard(early, late) < 0.5 < jaccard(between, early) < jaccard(between, late)
    result = find_duplicates([early, late, between], threshold=0.5)
    assert pairs(result) == {("t.jsonl:2", "t.jsonl:3", "near")}


def test_shingles_are_normalised_words_with_roles_and_a_short_text_is_one_shingle():
    conversation = chat("c.jsonl:1", ("user", "A  b\nC"), ("assistant", "d"))
    assert shingles(conversation, 5) == {b"<user> a b c <assistant>", b"a b c <assistant> d"}
    assert shingles(conversation, 6) == {b"<user> a b c <assistant> d"}
    assert shingles(text("t.jsonl:1", "Hello World"), 5) == {b"<text> hello world"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 0}, r"threshold.*\(0, 1\]"),
        ({"threshold": 1.5}, r"threshold.*\(0, 1\]"),
        ({"shingle": 0}, "shingle.*at least 1"),
        ({"num_perm": 1}, "num_perm.*at least 2"),
        ({"threshold": 0.999, "num_perm": 16}, "raise num_perm or lower the threshold"),
    ],
)
def test_bad_dedup_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        find_duplicates([], **options)


# -- filter -----------------------------------------------------------------------------------

FILTER_CASES = {
    # rule: (rules setting it, planted line, reason)
    "min_tokens": (
        FilterRules(min_tokens=5),
        6,
        "too short: 4 words < min_tokens 5",
    ),
    "max_tokens": (
        FilterRules(max_tokens=80),
        5,
        "too long: 106 words > max_tokens 80",
    ),
    "min_response_chars": (
        FilterRules(min_response_chars=10),
        4,
        "response too short: 4 characters in messages[1] < min_response_chars 10",
    ),
    "prompt_blocklist": (
        FilterRules(prompt_blocklist=[r"ignore (all )?previous instructions", "jailbreak"]),
        3,
        "prompt matches blocklist pattern 'ignore (all )?previous instructions' in messages[0]",
    ),
    "response_blocklist": (
        FilterRules(response_blocklist=["as an ai language model"]),
        2,
        "response matches blocklist pattern 'as an ai language model' in messages[3]",
    ),
    "predicate": (
        FilterRules(predicate="curate_predicates:no_placeholder"),
        7,
        "predicate 'curate_predicates:no_placeholder': placeholder left in the prompt",
    ),
}


@pytest.fixture()
def predicates_on_path(monkeypatch):
    """tests/data/curate is not a package, so put it on sys.path for curate_predicates.py."""
    monkeypatch.syspath_prepend(str(DATA))


@pytest.mark.parametrize("rule", list(FILTER_CASES))
def test_each_rule_rejects_its_planted_record_and_keeps_the_others(rule, predicates_on_path):
    rules, line, reason = FILTER_CASES[rule]
    conversations = load(FILTER_DATA)
    result = filter_conversations(conversations, rules)
    assert [(str(r.source), r.rule, r.reason) for r in result.rejected] == [
        (f"{FILTER_DATA}:{line}", rule, reason)
    ]
    assert [c.source.line for c in result.kept] == [n for n in range(1, 9) if n != line]
    assert result.counts == {rule: 1}


def test_all_rules_together_reject_each_planted_record_and_drop_nothing_silently(
    predicates_on_path,
):
    rules = FilterRules(
        min_tokens=5,
        max_tokens=80,
        min_response_chars=10,
        prompt_blocklist=FILTER_CASES["prompt_blocklist"][0].prompt_blocklist,
        response_blocklist=["as an ai language model"],
        predicate="curate_predicates:no_placeholder",
    )
    conversations = load(FILTER_DATA)
    result = filter_conversations(conversations, rules)
    expected = sorted((line, reason) for _, line, reason in FILTER_CASES.values())
    assert [(r.source.line, r.reason) for r in result.rejected] == expected
    assert [c.source.line for c in result.kept] == [1, 8]
    assert len(result.kept) + len(result.rejected) == len(conversations)
    everything = result.kept + [r.conversation for r in result.rejected]
    assert sorted(c.source.line for c in everything) == list(range(1, 9))
    assert result.counts == dict.fromkeys(
        [
            "min_tokens",
            "max_tokens",
            "min_response_chars",
            "prompt_blocklist",
            "response_blocklist",
            "predicate",
        ],
        1,
    )


def test_lengths_are_counted_by_the_token_count_given_or_else_in_words():
    conversations = load(FILTER_DATA)
    in_words = filter_conversations(conversations, FilterRules(min_tokens=5))
    assert in_words.length_unit == "words"
    assert "counted in words" in in_words.summary()

    counted = []

    def characters(text: str) -> int:
        counted.append(text)
        return len(text)

    rules = FilterRules(min_tokens=30)
    in_tokens = filter_conversations(conversations, rules, token_count=characters)
    assert in_tokens.length_unit == "tokens"
    # "Hi" + blank line + "Hello there, friend!": the contents, joined by blank lines
    assert counted[5] == "Hi\n\nHello there, friend!"
    assert [(r.source.line, r.reason) for r in in_tokens.rejected] == [
        (6, "too short: 24 tokens < min_tokens 30"),
    ]
    assert filter_conversations(conversations, FilterRules()).length_unit == "tokens"


def test_blocklists_ignore_case_and_each_searches_only_its_own_turns():
    record = chat(
        "c.jsonl:1",
        ("system", "Never say ACME."),
        ("user", "What do you sell?"),
        ("assistant", "Widgets, made by Acme."),
    )
    prompt_only = filter_conversations([record], FilterRules(prompt_blocklist=["acme"]))
    assert [r.reason for r in prompt_only.rejected] == [
        "prompt matches blocklist pattern 'acme' in messages[0]"
    ]
    response_only = filter_conversations([record], FilterRules(response_blocklist=["sell"]))
    assert response_only.rejected == []


def test_a_raw_text_record_is_all_response_and_has_no_prompt():
    record = text("t.jsonl:3", "As an AI language model, I cannot.")
    rules = FilterRules(prompt_blocklist=["as an ai"], response_blocklist=["language model"])
    (rejected,) = filter_conversations([record], rules).rejected
    assert rejected.reason == "response matches blocklist pattern 'language model' in text"
    short = filter_conversations([text("t.jsonl:4", " Hi ")], FilterRules(min_response_chars=3))
    assert [r.reason for r in short.rejected] == [
        "response too short: 2 characters in text < min_response_chars 3"
    ]


def test_a_predicate_returning_false_rejects_with_its_name(predicates_on_path):
    rules = FilterRules(predicate="curate_predicates:reject_everything")
    result = filter_conversations(load(FILTER_DATA)[:2], rules)
    assert result.kept == []
    assert {r.reason for r in result.rejected} == {
        "rejected by predicate 'curate_predicates:reject_everything'"
    }


@pytest.mark.parametrize(
    ("predicate", "message"),
    [
        ("no_such_module_for_sftforge:keep", "could not be loaded.*PYTHONPATH"),
        ("curate_predicates:no_such_function", "could not be loaded.*no_such_function"),
        ("curate_predicates.no_placeholder", "want 'package.module:function'"),
        ("curate_predicates:", "want 'package.module:function'"),
        ("curate_predicates:NOT_A_FUNCTION", "is a int, not a function"),
    ],
)
def test_a_predicate_that_cannot_load_fails_before_any_record(
    predicates_on_path, predicate, message
):
    with pytest.raises(FilterError, match=message):
        filter_conversations([], FilterRules(predicate=predicate))


@pytest.mark.parametrize(
    ("predicate", "message"),
    [
        ("curate_predicates:returns_none", r"filter.jsonl:1: .*returned None; expected True"),
        ("curate_predicates:raises", r"filter.jsonl:1: .*raised KeyError: 'no such field'"),
    ],
)
def test_a_predicate_that_misbehaves_is_an_error_naming_the_record(
    predicates_on_path, predicate, message
):
    with pytest.raises(FilterError, match=message):
        filter_conversations(load(FILTER_DATA), FilterRules(predicate=predicate))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (FilterRules(prompt_blocklist=["(unclosed"]), "prompt_blocklist pattern '\\(unclosed'"),
        (FilterRules(response_blocklist="as an ai"), "must be a list of regexes"),
        (FilterRules(min_tokens=10, max_tokens=5), "min_tokens 10 > max_tokens 5"),
        (FilterRules(min_response_chars=-1), "min_response_chars must be at least 0"),
        (FilterRules(max_tokens=2.5), "max_tokens must be a whole number"),
    ],
)
def test_bad_rules_fail_before_any_record(rules, message):
    with pytest.raises(FilterError, match=message):
        filter_conversations([], rules)


def test_written_kept_records_read_back_and_rejected_ones_carry_source_reason_and_record(
    tmp_path, predicates_on_path
):
    rules, line, reason = FILTER_CASES["response_blocklist"]
    conversations = load(FILTER_DATA)
    result = filter_conversations(conversations, rules)
    write_filter(result, tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl")
    assert [c.messages for c in load(tmp_path / "kept.jsonl")] == [c.messages for c in result.kept]
    (rejected,) = read_jsonl(tmp_path / "rejected.jsonl")
    assert rejected["source"] == f"{FILTER_DATA}:{line}"
    assert rejected["reason"] == reason
    again = conversation_from_record(rejected["record"], Source("x"), "messages")
    assert again.messages == conversations[line - 1].messages


# -- writing records --------------------------------------------------------------------------


def test_conversation_record_is_the_messages_format_or_text():
    conversation = chat("c.jsonl:1", ("system", "s"), ("user", "u"), ("assistant", "a"))
    assert conversation_record(conversation) == {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert conversation_record(text("t.jsonl:1", "raw")) == {"text": "raw"}


@pytest.mark.skipif(
    "trained" not in {f.name for f in fields(Message)}, reason="data/formats.py without weight"
)
def test_an_assistant_turn_kept_as_context_is_written_with_weight_0(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1", "weight": 0},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    conversations = load(tmp_path / "in.jsonl")
    assert conversation_record(conversations[0]) == record
    write_conversations(tmp_path / "out.jsonl", conversations)
    assert load(tmp_path / "out.jsonl")[0].messages == conversations[0].messages


def test_written_text_records_read_back(tmp_path):
    records = [text("t.jsonl:1", "first text"), text("t.jsonl:2", "second\ntext")]
    write_conversations(tmp_path / "out.jsonl", records)
    assert [c.text for c in load(tmp_path / "out.jsonl")] == ["first text", "second\ntext"]


def test_writing_over_the_input_replaces_it_whole(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(CHATS.read_text(encoding="utf-8"), encoding="utf-8")
    result = find_duplicates(load(path))
    write_conversations(path, result.kept)
    write_dedup_report(result, tmp_path / "report.jsonl")
    assert len(load(path)) == len(result.kept) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "report.jsonl"]

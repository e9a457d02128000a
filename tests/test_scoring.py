"""Scorers for `sftforge eval`: each kind passes the answers it should and fails the rest."""

from pathlib import Path

import pytest

from sftforge.data.text import normalize
from sftforge.evaluation.scoring import (
    SCORER_KINDS,
    ScorerConfig,
    ScoringError,
    json_field_scores,
    make_scorer,
)


def score(spec, answer: str, reference: str, record: dict | None = None) -> float:
    return make_scorer(spec)(answer, reference, record or {})


@pytest.fixture()
def plugins_on_path(monkeypatch):
    """tests/ is not a package, so put it on sys.path to import tests/scorer_plugins.py."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


# exact and normalized


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("Paris", 1.0), ("  Paris\n", 1.0), ("paris", 0.0), ("Par is", 0.0), ("Paris.", 0.0)],
)
def test_exact_ignores_only_surrounding_whitespace(answer, expected):
    assert score(ScorerConfig(kind="exact"), answer, " Paris ") == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("new  york\tcity", 1.0),
        ("NEW YORK\nCITY ", 1.0),
        ("New York City.", 0.0),
        ("NewYork City", 0.0),
    ],
)
def test_normalized_ignores_case_and_whitespace_runs_but_not_punctuation(answer, expected):
    assert score(ScorerConfig(kind="normalized"), answer, "New York City") == expected


def test_normalize_casefolds_unicode():
    assert normalize("  Straße\u00a0 ist\n\nLANG ") == "strasse ist lang"
    assert score(ScorerConfig(kind="normalized"), "STRASSE", "Straße") == 1.0
    assert score(ScorerConfig(kind="exact"), "STRASSE", "Straße") == 0.0


# json


def test_json_objects_with_different_key_order_are_equal():
    assert (
        score(
            ScorerConfig(kind="json"),
            '{"b": [1, 2], "a": {"y": 1, "x": 2}}',
            '{"a": {"x": 2, "y": 1}, "b": [1, 2]}',
        )
        == 1.0
    )


@pytest.mark.parametrize(
    "answer",
    [
        '{"age": "30"}',  # a string is not a number
        '{"age": 30, "extra": 1}',  # without fields the whole object must match
        '```json\n{"age": 30}\n```',  # fences: emitting bare JSON is the point
        'The answer is {"age": 30}',
        "not json",
        "",
    ],
)
def test_json_without_fields_fails_anything_but_the_same_value(answer):
    assert score(ScorerConfig(kind="json"), answer, '{"age": 30}') == 0.0


def test_json_accepts_surrounding_whitespace_and_non_object_values():
    assert score(ScorerConfig(kind="json"), '\n {"age": 30}\n', '{"age": 30}') == 1.0
    assert score(ScorerConfig(kind="json"), "[1, 2.0]", "[1, 2]") == 1.0
    assert score(ScorerConfig(kind="json"), "null", "null") == 1.0
    assert score(ScorerConfig(kind="json"), "[2, 1]", "[1, 2]") == 0.0


def test_json_true_is_not_one():
    # Python has True == 1; JSON does not.
    assert score(ScorerConfig(kind="json"), '{"ok": 1}', '{"ok": true}') == 0.0
    assert score(ScorerConfig(kind="json"), "[0]", "[false]") == 0.0


def test_json_fields_compare_only_the_listed_keys():
    spec = ScorerConfig(kind="json", fields=("name", "age"))
    reference = '{"name": "Ada", "age": 36, "city": "London"}'
    assert score(spec, '{"age": 36, "name": "Ada", "mood": "fine"}', reference) == 1.0
    assert score(spec, '{"name": "Ada", "age": "36"}', reference) == 0.0
    assert score(spec, '{"name": "Ada"}', reference) == 0.0
    assert score(spec, '["Ada", 36]', reference) == 0.0


def test_json_field_scores_reports_each_field():
    reference = '{"name": "Ada", "age": 36}'
    assert json_field_scores('{"name": "Ada", "age": 37}', reference, ("name", "age")) == {
        "name": True,
        "age": False,
    }
    assert json_field_scores('{"name": "Ada"}', reference, ("name", "age")) == {
        "name": True,
        "age": False,
    }
    assert json_field_scores("```{}```", reference, ("name",)) == {"name": False}


@pytest.mark.parametrize(
    ("spec", "reference", "message"),
    [
        (ScorerConfig(kind="json"), "{'age': 30}", "reference is not valid JSON"),
        (ScorerConfig(kind="json", fields=("age",)), "[30]", "not an object"),
        (
            ScorerConfig(kind="json", fields=("age", "name")),
            '{"age": 30}',
            r"lacks fields \['name'\]",
        ),
    ],
)
def test_json_reference_that_cannot_be_scored_against_is_an_error(spec, reference, message):
    with pytest.raises(ScoringError, match=message):
        score(spec, '{"age": 30}', reference)


# contains


def test_contains_finds_the_stripped_reference_in_the_answer():
    assert (
        score(ScorerConfig(kind="contains"), "The capital is Paris, of course.", " Paris\n") == 1.0
    )
    assert score(ScorerConfig(kind="contains"), "The capital is PARIS.", "Paris") == 0.0
    assert score(ScorerConfig(kind="contains"), "The capital is Lyon.", "Paris") == 0.0


def test_contains_ignore_case():
    spec = ScorerConfig(kind="contains", ignore_case=True)
    assert score(spec, "The capital is PARIS.", "paris") == 1.0
    assert score(spec, "DIE GROSSE STRASSE", "Straße") == 1.0
    assert score(spec, "The capital is Lyon.", "paris") == 0.0


def test_contains_with_an_empty_reference_is_an_error_not_a_pass():
    with pytest.raises(ScoringError, match="reference is empty"):
        score(ScorerConfig(kind="contains"), "anything", "  ")


# regex


def test_regex_uses_the_reference_as_the_pattern_when_none_is_given():
    assert score(ScorerConfig(kind="regex"), "It costs 42 dollars", r"\b42\b") == 1.0
    assert score(ScorerConfig(kind="regex"), "It costs 420 dollars", r"\b42\b") == 0.0


def test_regex_pattern_replaces_the_reference():
    spec = ScorerConfig(kind="regex", pattern=r"^\d{4}-\d{2}-\d{2}$")
    assert score(spec, "2024-05-01", "unused reference") == 1.0
    assert score(spec, "May 1st 2024", "2024-05-01") == 0.0


def test_bad_regex_is_an_error_naming_the_pattern():
    with pytest.raises(ScoringError, match=r"'\(unclosed'"):
        make_scorer(ScorerConfig(kind="regex", pattern="(unclosed"))
    with pytest.raises(ScoringError, match=r"'\[a-'"):
        score(ScorerConfig(kind="regex"), "answer", "[a-")


# python


def test_python_scorer_may_return_bool_or_partial_credit(plugins_on_path):
    starts = make_scorer({"kind": "python", "function": "scorer_plugins:starts_with_reference"})
    assert starts("Yes, because...", "Yes", {}) == 1.0
    assert starts("No.", "Yes", {}) == 0.0
    overlap = make_scorer(ScorerConfig(kind="python", function="scorer_plugins:word_overlap"))
    assert overlap("red green", "red green blue yellow", {}) == 0.5


def test_python_scorer_receives_the_eval_record(plugins_on_path):
    spec = ScorerConfig(kind="python", function="scorer_plugins:mentions_record_keyword")
    assert score(spec, "it is photosynthesis", "ignored", {"keyword": "photosynthesis"}) == 1.0
    assert score(spec, "it is respiration", "ignored", {"keyword": "photosynthesis"}) == 0.0


def test_python_scorer_out_of_range_is_an_error_naming_function_and_value(plugins_on_path):
    scorer = make_scorer(ScorerConfig(kind="python", function="scorer_plugins:out_of_range"))
    with pytest.raises(ScoringError, match=r"scorer_plugins:out_of_range.*2\.0"):
        scorer("answer", "reference", {})


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_such_module_for_sftforge:fn", "could not be loaded.*PYTHONPATH"),
        ("scorer_plugins:no_such_function", "could not be loaded.*no_such_function"),
        ("scorer_plugins.word_overlap", "package.module:function"),
        (None, "package.module:function"),
    ],
)
def test_python_scorer_that_cannot_load_fails_when_built(plugins_on_path, function, message):
    with pytest.raises(ScoringError, match=message):
        make_scorer(ScorerConfig(kind="python", function=function))


# specs


def test_unknown_kind_lists_the_allowed_kinds():
    with pytest.raises(ScoringError) as error:
        make_scorer({"kind": "fuzzy"})
    assert "'fuzzy'" in str(error.value)
    assert all(kind in str(error.value) for kind in SCORER_KINDS)


def test_unknown_option_lists_the_allowed_options():
    with pytest.raises(ScoringError, match=r"\['feilds'\].*'fields'.*'ignore_case'"):
        make_scorer({"kind": "json", "feilds": ["age"]})


def test_option_for_another_kind_is_an_error():
    with pytest.raises(ScoringError, match="'pattern' is for kind 'regex', not 'exact'"):
        make_scorer({"kind": "exact", "pattern": "x"})
    with pytest.raises(ScoringError, match="'ignore_case' is for kind 'contains'"):
        make_scorer(ScorerConfig(kind="normalized", ignore_case=True))


def test_dict_spec_works_like_scorer_spec_and_takes_a_list_of_fields():
    scorer = make_scorer({"kind": "json", "fields": ["age"]})
    assert scorer('{"age": 30, "x": 1}', '{"age": 30, "y": 2}', {}) == 1.0
    assert make_scorer({})("  a ", "a", {}) == 1.0  # the default kind is exact


def test_fields_given_as_a_string_is_an_error_not_a_list_of_letters():
    with pytest.raises(ScoringError, match="list of key names"):
        make_scorer({"kind": "json", "fields": "age"})

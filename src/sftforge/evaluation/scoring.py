"""Scorers for `sftforge eval`: how well one generated answer matches its reference.

A scorer is a plain function `(answer, reference, record) -> score in [0, 1]`; `record` is the
eval record (a dict) the prompt came from. `make_scorer` builds one from the config's
`ScorerConfig` (`eval.scorer`) or a dict with the same keys. Built-in kinds score 1.0 or 0.0; only a python scorer gives partial credit.

A bad spec or a bad reference raises `ScoringError`: both are bugs in the eval set, not mistakes
of the model, so they stop the run instead of quietly scoring 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from sftforge.data.text import normalize
from sftforge.errors import InputError
from sftforge.user_code import import_user_function

ScorerKind = Literal["exact", "normalized", "json", "contains", "regex", "python", "tool_call"]


class ScorerConfig(BaseModel):
    """How a generated answer is scored against its reference (evaluation/scoring.py builds the scorer;
    an option the kind does not read is an error there)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: ScorerKind = "exact"
    fields: list[str] = Field(
        default_factory=list, description="json: keys that must equal the reference's"
    )
    pattern: str | None = Field(default=None, description="regex: default is the reference")
    function: str | None = Field(default=None, description="python: package.module:function")
    ignore_case: bool = Field(default=False, description="contains: compare casefolded")


SCORER_KINDS = get_args(ScorerKind)

# The options each kind reads. Setting one the kind ignores is an error, so a slip such as
# {"kind": "exact", "pattern": ...} cannot silently score by the wrong rule.
OPTIONS_BY_KIND = {
    "exact": (),
    "normalized": (),
    "json": ("fields",),
    "contains": ("ignore_case",),
    "regex": ("pattern",),
    "python": ("function",),
    "tool_call": (),
}

Score = float  # in [0, 1]
Scorer = Callable[[str, str, dict], Score]


class ScoringError(InputError):
    """A scorer spec, or an eval-set reference, that cannot be scored against."""


def json_field_scores(answer: str, reference: str, fields: list[str]) -> dict[str, bool]:
    """Per field: is it in the answer's JSON object, with the reference's value?

    An answer that is not a JSON object (or not JSON at all) gets False for every field.
    """
    expected = _parse_reference_json(reference)
    if not isinstance(expected, dict):
        raise ScoringError(f"json scorer with fields: reference is not an object: {reference!r}")
    missing = [name for name in fields if name not in expected]
    if missing:
        raise ScoringError(f"json scorer: reference lacks fields {missing}: {reference!r}")
    got = _parse_answer_json(answer)
    if not isinstance(got, dict):
        return {name: False for name in fields}
    return {name: name in got and _same_json(got[name], expected[name]) for name in fields}


def make_scorer(spec: ScorerConfig | dict) -> Scorer:
    """Build the scorer a spec describes. A bad spec fails here, before any generation runs.

    - exact: answer and reference equal once surrounding whitespace is stripped (it never counts).
    - normalized: equal after `normalize` (case and inner whitespace do not count).
    - json: see `json_field_scores`; without fields the whole JSON values must be equal.
    - contains: the stripped reference occurs in the answer.
    - regex: `pattern` (or, if None, the reference) is found by re.search in the answer.
    - python: `fn(answer, reference, record)` from "package.module:function".
    - tool_call: the answer's tool calls equal the reference's (`tool_call_score`).
    """
    spec = _spec_from_dict(spec) if isinstance(spec, dict) else spec
    _check_spec(spec)
    if spec.kind == "exact":
        return lambda answer, reference, record: float(answer.strip() == reference.strip())
    if spec.kind == "normalized":
        return lambda answer, reference, record: float(normalize(answer) == normalize(reference))
    if spec.kind == "json":
        return _json_scorer(spec.fields)
    if spec.kind == "contains":
        return _contains_scorer(spec.ignore_case)
    if spec.kind == "regex":
        return _regex_scorer(spec.pattern)
    if spec.kind == "tool_call":
        return tool_call_score
    return _python_scorer(spec.function)


def _spec_from_dict(options: dict) -> ScorerConfig:
    allowed = list(ScorerConfig.model_fields)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ScoringError(f"unknown scorer option(s) {unknown}; allowed: {allowed}")
    kind = options.get("kind", "exact")
    if kind not in SCORER_KINDS:
        raise ScoringError(f"unknown scorer kind {kind!r}; allowed: {', '.join(SCORER_KINDS)}")
    names = options.get("fields", [])
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ScoringError(f"scorer option 'fields' must be a list of key names, got {names!r}")
    return ScorerConfig.model_validate(options)


def _check_spec(spec: ScorerConfig) -> None:
    for option, info in ScorerConfig.model_fields.items():
        is_set = option != "kind" and getattr(spec, option) != info.get_default(
            call_default_factory=True
        )
        if is_set and option not in OPTIONS_BY_KIND[spec.kind]:
            users = [kind for kind, options in OPTIONS_BY_KIND.items() if option in options]
            raise ScoringError(f"option {option!r} is for kind {users[0]!r}, not {spec.kind!r}")


_NOT_JSON = object()  # not None: `null` is a valid JSON answer


def _parse_answer_json(answer: str) -> object:
    # No fence stripping, no "find the JSON in the text": emitting bare JSON is what is scored.
    try:
        return json.loads(answer.strip())
    except json.JSONDecodeError:
        return _NOT_JSON


def _parse_reference_json(reference: str) -> object:
    try:
        return json.loads(reference.strip())
    except json.JSONDecodeError as e:
        raise ScoringError(f"json scorer: reference is not valid JSON ({e}): {reference!r}") from e


def _same_json(a: object, b: object) -> bool:
    """JSON equality: Python's ==, except that true/false never equal 1/0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _json_scorer(field_names: list[str]) -> Scorer:
    def score(answer: str, reference: str, record: dict) -> Score:
        if field_names:
            return float(all(json_field_scores(answer, reference, field_names).values()))
        expected = _parse_reference_json(reference)
        got = _parse_answer_json(answer)
        return float(got is not _NOT_JSON and _same_json(got, expected))

    return score


def _contains_scorer(ignore_case: bool) -> Scorer:
    def score(answer: str, reference: str, record: dict) -> Score:
        needle = reference.strip()
        if not needle:  # "" is in every answer: a scorer that always passes hides the bug
            raise ScoringError("contains scorer: the reference is empty")
        if ignore_case:
            return float(needle.casefold() in answer.casefold())
        return float(needle in answer)

    return score


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ScoringError(f"regex scorer: pattern {pattern!r} does not compile: {e}") from e


def _regex_scorer(pattern: str | None) -> Scorer:
    fixed = None if pattern is None else _compile(pattern)

    def score(answer: str, reference: str, record: dict) -> Score:
        if fixed is not None:
            return float(fixed.search(answer) is not None)
        if not reference:  # an empty pattern matches every answer
            raise ScoringError("regex scorer: the reference, used as the pattern, is empty")
        return float(_compile(reference).search(answer) is not None)

    return score


def _python_scorer(function: str | None) -> Scorer:
    """A user's scorer, imported only when this kind is set."""
    fn = import_user_function(function, "python scorer", "answer, reference, record", ScoringError)

    def score(answer: str, reference: str, record: dict) -> Score:
        result = fn(answer, reference, record)
        # bool is an int, so True/False pass as 1/0; NaN fails the range check.
        if isinstance(result, (int, float)) and 0 <= result <= 1:
            return float(result)
        raise ScoringError(f"python scorer {function!r} returned {result!r}, not a bool or [0, 1]")

    return score


def tool_call_score(answer: str, reference: str, record: dict) -> Score:
    """1 when the answer makes the reference's tool calls: the same functions with equal
    arguments as JSON values (key order ignored; parallel calls in any order), read by the
    template's convention (tools.generated_turn); 0 otherwise, and for a call that does not
    parse. A reference with no call is a bug in the eval set."""
    from sftforge.data.tools import generated_turn

    *_, expected = generated_turn(reference)
    if not expected:
        raise ScoringError(f"{record.get('source', 'reference')}: the reference makes no tool call")
    *_, made = generated_turn(answer)
    if made is None:
        return 0.0
    return float(_call_keys(made) == _call_keys(expected))


def _call_keys(calls) -> list[str]:
    return sorted(json.dumps([c.name, c.arguments], sort_keys=True) for c in calls)

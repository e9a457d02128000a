"""Rules that drop records before training: length, blocklists, response length, a predicate.

`filter_conversations` applies `FilterRules` to each Conversation and keeps it or rejects it
with the first rule it breaks, in this order: min_tokens/max_tokens, min_response_chars,
prompt_blocklist, response_blocklist, predicate. Every record is kept or rejected with its
source and reason; none is dropped silently.

A raw-text record is trained on every token, so its text counts as a response
(min_response_chars and response_blocklist apply to it) and it has no prompt.

Rules are checked before the first record is: a bad number, a pattern that does not compile or
a predicate that cannot be imported raises `FilterError` at once.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sftforge.data.loading import Rejects
from sftforge.data.messages import Conversation, Source
from sftforge.data.writers import JsonlWriter, record_as_read, write_conversations
from sftforge.errors import InputError
from sftforge.user_code import import_user_function

RULES = (
    "min_tokens",
    "max_tokens",
    "min_response_chars",
    "prompt_blocklist",
    "response_blocklist",
    "predicate",
)
PROMPT_ROLES = ("system", "user")

Predicate = Callable[[Conversation], bool | str]


class FilterError(InputError):
    """Filter rules that cannot be applied, or a predicate that misbehaves."""


@dataclass
class FilterRules:
    min_tokens: int | None = None  # the whole conversation (every content) in tokens
    max_tokens: int | None = None
    prompt_blocklist: list[str] = field(default_factory=list)  # regexes: system and user turns
    response_blocklist: list[str] = field(default_factory=list)  # regexes: assistant turns
    min_response_chars: int | None = None  # every assistant turn, after strip
    # "package.module:function" taking a Conversation; True keeps it, False or a reason rejects
    predicate: str | None = None


@dataclass(frozen=True)
class Rejected:
    conversation: Conversation
    rule: str  # one of RULES
    reason: str  # e.g. "response matches blocklist pattern 'as an ai' in messages[3]"

    @property
    def source(self) -> Source:
        return self.conversation.source


@dataclass
class FilterResult:
    kept: list[Conversation]  # in input order (empty when written as they came: filter_to_files)
    rejected: list[Rejected]  # in input order (likewise)
    rules: FilterRules
    length_unit: str = "tokens"  # "words" when length bounds were set without a token_count
    kept_count: int = 0
    rejected_per_rule: Counter = field(default_factory=Counter)

    @property
    def counts(self) -> dict[str, int]:
        """Rejected records per rule, for every rule that was set (0 included)."""
        return dict.fromkeys(_rules_set(self.rules), 0) | dict(self.rejected_per_rule)

    def summary(self) -> str:
        rejected = self.rejected_per_rule.total()
        lines = [f"records read: {self.kept_count + rejected}", f"kept:         {self.kept_count}"]
        lines.append(f"rejected:     {rejected}")
        lines += [f"  {rule + ':':20}{count}" for rule, count in self.counts.items()]
        if self.length_unit == "words":
            lines.append("lengths counted in words: no tokenizer was given")
        return "\n".join(lines)


def filter_conversations(
    conversations: Iterable[Conversation],
    rules: FilterRules,
    token_count: Callable[[str], int] | None = None,
) -> FilterResult:
    """Keep or reject each conversation by `rules` (see the module doc).

    `token_count` measures a text in tokens (e.g. `lambda text: len(tokenizer.encode(text))`)
    for min_tokens/max_tokens, applied to the contents joined by blank lines. Without it,
    whitespace-separated words are counted and the result's `length_unit` says "words".
    """
    check = _Checker(rules, token_count)
    result = FilterResult([], [], rules, length_unit=check.length_unit)
    for conversation in conversations:
        broken = check(conversation)
        if broken is None:
            result.kept_count += 1
            result.kept.append(conversation)
        else:
            result.rejected_per_rule[broken[0]] += 1
            result.rejected.append(Rejected(conversation, *broken))
    return result


def filter_to_files(
    conversations: Iterable[Conversation],
    rules: FilterRules,
    kept_path: str | Path,
    rejected_path: str | Path,
    token_count: Callable[[str], int] | None = None,
) -> FilterResult:
    """`filter_conversations` and `write_filter` in one pass that holds no record: each is
    written to its file as it is judged; the result has the counts, not the records."""
    check = _Checker(rules, token_count)
    result = FilterResult([], [], rules, length_unit=check.length_unit)
    with JsonlWriter(rejected_path) as rejected_out:
        rejects = Rejects(sink=rejected_out, held=0)

        def kept():
            for conversation in conversations:
                broken = check(conversation)
                if broken is None:
                    result.kept_count += 1
                    yield conversation
                else:
                    result.rejected_per_rule[broken[0]] += 1
                    record = record_as_read(conversation)[1]
                    rejects.add(conversation.source, broken[1], record)

        write_conversations(kept_path, kept())
    return result


def write_filter(result: FilterResult, kept_path: str | Path, rejected_path: str | Path) -> None:
    """The kept records as JSONL, and the rejected ones as {"source": "file:line", "reason":
    ..., "record": {...}} lines, like a load's rejects: each record as the input had it when
    it was loaded with `keep_records=True` (see `writers.write_conversations`)."""
    write_conversations(kept_path, result.kept)
    rejects = Rejects()
    for rejected in result.rejected:
        record = record_as_read(rejected.conversation)[1]
        rejects.add(rejected.source, rejected.reason, record)
    rejects.write_jsonl(rejected_path)


def load_predicate(spec: str | None) -> Predicate:
    """Import "package.module:function". It is user code, so it is imported only when named;
    the rules and messages are those of the `python` scorer (evaluation/scoring.py)."""
    function = import_user_function(spec, "predicate", "conversation", FilterError)
    attribute = spec.partition(":")[2]
    if not callable(function):
        raise FilterError(
            f"predicate {spec!r} is a {type(function).__name__}, not a function; define "
            f"{attribute}(conversation) returning True to keep, or False or a reason to reject"
        )
    return function


class _Checker:
    """The rules, checked and compiled once; called on a conversation, it gives the first
    (rule, reason) it breaks, or None."""

    def __init__(self, rules: FilterRules, token_count: Callable[[str], int] | None):
        _check_numbers(rules)
        self.rules = rules
        self.prompt_patterns = _compile("prompt_blocklist", rules.prompt_blocklist)
        self.response_patterns = _compile("response_blocklist", rules.response_blocklist)
        self.predicate = load_predicate(rules.predicate) if rules.predicate else None
        bounded = rules.min_tokens is not None or rules.max_tokens is not None
        self.length_unit = "words" if bounded and token_count is None else "tokens"
        self.count = token_count or (lambda text: len(text.split()))

    def __call__(self, conversation: Conversation) -> tuple[str, str] | None:
        for check in (self._length, self._response_chars, self._blocklists, self._predicate):
            broken = check(conversation)
            if broken is not None:
                return broken
        return None

    def _length(self, conversation: Conversation) -> tuple[str, str] | None:
        low, high = self.rules.min_tokens, self.rules.max_tokens
        if low is None and high is None:
            return None
        length, unit = self.count(_text(conversation)), self.length_unit
        if low is not None and length < low:
            return "min_tokens", f"too short: {length} {unit} < min_tokens {low}"
        if high is not None and length > high:
            return "max_tokens", f"too long: {length} {unit} > max_tokens {high}"
        return None

    def _response_chars(self, conversation: Conversation) -> tuple[str, str] | None:
        least = self.rules.min_response_chars
        if least is None:
            return None
        for where, text in _responses(conversation):
            if len(text.strip()) < least and where not in _calls_alone(conversation):
                reason = (
                    f"response too short: {len(text.strip())} characters in {where} "
                    f"< min_response_chars {least}"
                )
                return "min_response_chars", reason
        return None

    def _blocklists(self, conversation: Conversation) -> tuple[str, str] | None:
        if self.prompt_patterns:
            found = _first_match(self.prompt_patterns, _prompts(conversation))
            if found:
                return "prompt_blocklist", f"prompt matches blocklist pattern {found}"
        if self.response_patterns:
            found = _first_match(self.response_patterns, _responses(conversation))
            if found:
                return "response_blocklist", f"response matches blocklist pattern {found}"
        return None

    def _predicate(self, conversation: Conversation) -> tuple[str, str] | None:
        if self.predicate is None:
            return None
        spec = self.rules.predicate
        try:
            verdict = self.predicate(conversation)
        except Exception as e:
            raise FilterError(
                f"{conversation.source}: predicate {spec!r} raised {type(e).__name__}: {e}"
            ) from e
        if verdict is True:
            return None
        if verdict is False:
            return "predicate", f"rejected by predicate '{spec}'"
        if isinstance(verdict, str):
            return "predicate", f"predicate '{spec}': {verdict or 'rejected'}"
        raise FilterError(
            f"{conversation.source}: predicate {spec!r} returned {verdict!r}; expected True "
            "to keep the record, or False or a reason (a string) to reject it"
        )


def _rules_set(rules: FilterRules) -> list[str]:
    return [rule for rule in RULES if getattr(rules, rule) not in (None, [], ())]


def _check_numbers(rules: FilterRules) -> None:
    for name in ("min_tokens", "max_tokens", "min_response_chars"):
        value = getattr(rules, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise FilterError(f"{name} must be a whole number or None, not {value!r}")
        if value is not None and value < 0:
            raise FilterError(f"{name} must be at least 0, not {value}")
    low, high = rules.min_tokens, rules.max_tokens
    if low is not None and high is not None and low > high:
        raise FilterError(f"min_tokens {low} > max_tokens {high}: every record would be rejected")


def _compile(rule: str, patterns: list[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):  # a lone string would be read as one pattern per character
        raise FilterError(f"{rule} must be a list of regexes, not the string {patterns!r}")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as e:
            raise FilterError(f"{rule} pattern '{pattern}' does not compile: {e}") from e
    return compiled


def _first_match(patterns: list[re.Pattern], turns: list[tuple[str, str]]) -> str | None:
    """ "'pattern' in where" for the first turn any pattern is found in, or None."""
    for where, text in turns:
        for pattern in patterns:
            if pattern.search(text):
                return f"'{pattern.pattern}' in {where}"
    return None


def _text(conversation: Conversation) -> str:
    if conversation.is_raw_text:
        return conversation.text
    return "\n\n".join(message.content for message in conversation.messages)


def _calls_alone(conversation: Conversation) -> set[str]:
    """Where an assistant turn only calls tools: a response with no text, not a short one."""
    return {
        f"messages[{i}]"
        for i, message in enumerate(conversation.messages)
        if message.tool_calls and not message.content.strip()
    }


def _prompts(conversation: Conversation) -> list[tuple[str, str]]:
    """(where, text) of each system and user turn."""
    return [
        (f"messages[{i}]", message.content)
        for i, message in enumerate(conversation.messages)
        if message.role in PROMPT_ROLES
    ]


def _responses(conversation: Conversation) -> list[tuple[str, str]]:
    """(where, text) of each assistant turn; a raw-text record's text is one response."""
    if conversation.is_raw_text:
        return [("text", conversation.text)]
    return [
        (f"messages[{i}]", conversation.messages[i].content)
        for i in conversation.assistant_indices()
    ]

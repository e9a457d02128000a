"""What is in a dataset, before a GPU-hour is spent on it: `sftforge data stats`.

One streamed pass over the conversations, each rendered and tokenized exactly as training
would (the same Encoder, template and mask; in parallel, encode/parallel.py), keeping counters, not
lists: a length distribution is a count per distinct value (exact medians and percentiles in
memory that does not grow with the number of conversations):
- records per format, turns per conversation, messages per role;
- tools: records offering tools and how many each, tool calls, tool results, and assistant
  turns with reasoning;
- token lengths of prompts (untrained tokens), responses (trained tokens) and whole
  examples, as terminal histograms (and SVG charts);
- examples over `max_length`, and the trained tokens dropping or truncating them costs;
- responses that are very short (empty ones never load), that repeat the prompt, or that
  are refusal boilerplate ("As an AI language model ..."), each with the records that show it;
- exact and near duplicates, as curate/dedup.py's DuplicateFinder finds them, each counted as
  it is found;
- the share of tokens that are trained.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sftforge.curate.dedup import Duplicate, DuplicateFinder
from sftforge.data.messages import Conversation
from sftforge.data.text import normalize
from sftforge.encode.encoder import Encoder
from sftforge.encode.parallel import encoded_chunks

SHORT_RESPONSE_CHARS = 8  # a response shorter than this (after strip) is listed as very short
EXAMPLES_SHOWN = 5  # records named per finding

# Boilerplate a model learns to say instead of answering, when a dataset is full of it.
REFUSAL_PATTERNS = [
    r"\bas an ai\b",
    r"\bas a (large )?language model\b",
    r"\bi(?: am|'m) (?:just |only )?an ai\b",
    r"\bi(?: am|'m) (?:sorry|afraid),? but i (?:can(?:not|'t)|am unable|'m unable)\b",
    r"\bi (?:cannot|can't|am unable to|'m unable to) (?:help|assist|provide|comply)\b",
    r"\bi do(?: not|n't) have (?:personal )?(?:opinions|feelings|beliefs)\b",
]
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)


@dataclass
class Finding:
    """Records showing one kind of problem: how many, and the first few by file:line."""

    count: int = 0
    sources: list[str] = field(default_factory=list)

    def add(self, source) -> None:
        self.count += 1
        if len(self.sources) < EXAMPLES_SHOWN:
            self.sources.append(str(source))


class Distribution:
    """Whole numbers (lengths), counted per distinct value: exact order statistics in memory
    bounded by the range of values, not by how many were added."""

    def __init__(self, values=()) -> None:
        self.counts: Counter = Counter()
        for value in values:
            self.append(value)

    def append(self, value: int) -> None:
        self.counts[value] += 1

    def __len__(self) -> int:
        return self.counts.total()

    @property
    def total(self) -> int:
        return sum(value * count for value, count in self.counts.items())

    def quantile(self, q: float) -> float:
        """The value at rank q * (n - 1) of the sorted values (the median is the mean of the
        two middle ones when n is even)."""
        n = len(self)
        rank = q * (n - 1)
        low, high = self.at_rank(int(rank)), self.at_rank(min(n - 1, int(rank) + 1))
        return low + (high - low) * (rank - int(rank))

    def at_rank(self, rank: int) -> int:
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen > rank:
                return value
        raise IndexError(rank)


@dataclass
class DataStats:
    max_length: int
    conversations: int = 0
    formats: Counter = field(default_factory=Counter)
    turns: Distribution = field(default_factory=Distribution)  # messages each
    roles: Counter = field(default_factory=Counter)
    records_with_tools: int = 0  # records offering the model tools
    tools_offered: int = 0  # tool definitions, summed over those records
    most_tools: int = 0  # the most one record offers
    tool_calls: int = 0
    calling_turns: int = 0  # assistant turns with at least one tool call
    tool_results: int = 0  # tool messages
    reasoning_turns: int = 0  # assistant turns with reasoning
    prompt_tokens: Distribution = field(default_factory=Distribution)  # untrained, each
    response_tokens: Distribution = field(default_factory=Distribution)  # trained, each
    example_tokens: Distribution = field(default_factory=Distribution)
    over_max_length: Finding = field(default_factory=Finding)
    trained_lost_by_drop: int = 0  # trained tokens of the examples over max_length
    trained_lost_by_truncate: int = 0  # trained tokens past max_length
    not_encoded: Counter = field(default_factory=Counter)  # reason -> count (template refused)
    not_encoded_sources: list[str] = field(default_factory=list)
    short_responses: Finding = field(default_factory=Finding)
    echoed_prompts: Finding = field(default_factory=Finding)
    refusals: Finding = field(default_factory=Finding)
    exact_duplicates: Finding = field(default_factory=Finding)  # when duplicates were sought
    near_duplicates: Finding | None = None  # when near ones were sought
    template: str = ""  # the chat template the lengths were counted with
    rejected: int = 0  # records that could not be read as conversations
    charts: list[Path] = field(default_factory=list)  # the SVG charts written, if asked

    @property
    def tokens(self) -> int:
        return self.example_tokens.total

    @property
    def trained_tokens(self) -> int:
        return self.response_tokens.total


def collect_stats(
    conversations: Iterable[Conversation],
    encoder: Encoder,
    max_length: int,
    num_proc: int = 1,
    duplicates: DuplicateFinder | None = None,
) -> DataStats:
    """One streamed pass (encoded in `num_proc` processes, a few chunks ahead: encode/parallel.py),
    each conversation also going through `duplicates`, whose finds are counted as they come."""
    stats = DataStats(max_length)
    if duplicates is not None:
        stats.near_duplicates = Finding() if duplicates.near else None
        duplicates.on_duplicate = lambda duplicate, kept: _count_duplicate(stats, duplicate)
    for chunk, encoded in encoded_chunks(conversations, encoder, num_proc):
        refused = dict(encoded.errors)
        row = 0
        for position, conversation in enumerate(chunk):
            _count_conversation(stats, conversation)
            if duplicates is not None:
                duplicates.keeps(conversation)
            if position in refused:
                err = refused[position]
                stats.not_encoded[err.reason] += 1
                if len(stats.not_encoded_sources) < EXAMPLES_SHOWN:
                    stats.not_encoded_sources.append(str(conversation.source))
                continue
            _count_example(stats, encoded, row, conversation)
            row += 1
    return stats


def _count_conversation(stats: DataStats, conversation: Conversation) -> None:
    stats.conversations += 1
    stats.formats[conversation.meta.get("format", "?")] += 1
    stats.turns.append(len(conversation.messages))
    stats.roles.update(m.role for m in conversation.messages)
    _count_tools(stats, conversation)
    _check_responses(stats, conversation)


def _count_tools(stats: DataStats, conversation: Conversation) -> None:
    if conversation.tools:
        stats.records_with_tools += 1
        stats.tools_offered += len(conversation.tools)
        stats.most_tools = max(stats.most_tools, len(conversation.tools))
    for message in conversation.messages:
        stats.tool_calls += len(message.tool_calls)
        stats.calling_turns += bool(message.tool_calls)
        stats.tool_results += message.role == "tool"
        stats.reasoning_turns += message.role == "assistant" and message.reasoning is not None


def _count_example(stats: DataStats, encoded, row: int, conversation: Conversation) -> None:
    length, trained = int(encoded.lengths[row]), int(encoded.trained_counts[row])
    stats.example_tokens.append(length)
    stats.response_tokens.append(trained)
    stats.prompt_tokens.append(length - trained)
    if length > stats.max_length:
        stats.over_max_length.add(conversation.source)
        stats.trained_lost_by_drop += trained
        start = int(encoded.lengths[:row].sum())
        kept = int(encoded.trained[start + 1 : start + stats.max_length].sum())
        stats.trained_lost_by_truncate += trained - kept


def _check_responses(stats: DataStats, conversation: Conversation) -> None:
    prompt = ""
    for message in conversation.messages:
        if message.role != "assistant":
            prompt = message.content
            continue
        answer = message.content.strip()
        if len(answer) < SHORT_RESPONSE_CHARS:
            stats.short_responses.add(conversation.source)
        if _echoes(prompt, answer):
            stats.echoed_prompts.add(conversation.source)
        if _REFUSAL.search(answer):
            stats.refusals.add(conversation.source)


def _echoes(prompt: str, answer: str) -> bool:
    """The answer is the prompt, or starts by repeating a prompt of some length."""
    p, a = normalize(prompt), normalize(answer)
    return bool(p) and (a == p or (len(p) >= 20 and a.startswith(p)))


def _count_duplicate(stats: DataStats, duplicate: Duplicate) -> None:
    finding = stats.exact_duplicates if duplicate.kind == "exact" else stats.near_duplicates
    finding.add(duplicate.source)


# ---- showing it ---------------------------------------------------------------------------


def histogram_bins(values: Distribution, bins: int = 10) -> list[tuple[int, int, int]]:
    """(first, last, count) of `bins` equal ranges of whole numbers covering `values`."""
    counts = values.counts
    if not counts:
        return []
    lo, hi = min(counts), max(counts)
    step = max(1, -(-(hi - lo + 1) // bins))
    binned = Counter()
    for value, count in counts.items():
        binned[(value - lo) // step] += count
    return [
        (lo + b * step, lo + b * step + step - 1, binned[b]) for b in range((hi - lo) // step + 1)
    ]


def histogram(values: Distribution, bins: int = 10, width: int = 40) -> list[str]:
    """A terminal histogram: one line per range, with a bar scaled to the largest count."""
    found = histogram_bins(values, bins)
    if not found:
        return ["  (none)"]
    most = max(count for _, _, count in found)
    lines = []
    for first, last, count in found:
        bar = "#" * max(1 if count else 0, round(count / most * width))
        lines.append(f"  {first:>7,}-{last:<7,} {count:>8,} {bar}")
    return lines


def _spread(values: Distribution) -> str:
    if not len(values):
        return "none"
    counts = values.counts
    p95 = values.at_rank(min(len(values) - 1, int(0.95 * len(values))))
    return (
        f"min {min(counts):,}, median {values.quantile(0.5):,.0f}, p95 {p95:,}, "
        f"max {max(counts):,}, mean {values.total / len(values):,.1f}"
    )


def _finding(name: str, finding: Finding, of: int) -> str:
    share = f" ({finding.count / of:.1%})" if of else ""
    shown = f": {', '.join(finding.sources)}" if finding.sources else ""
    more = " ..." if finding.count > len(finding.sources) else ""
    return f"  {name:<28}{finding.count:>8,}{share}{shown}{more}"


def _tool_lines(stats: DataStats) -> list[str]:
    n, offering = stats.conversations, stats.records_with_tools
    share = f" ({offering / n:.1%})" if n else ""
    tools = f"records offering tools: {offering:,}{share}"
    if offering:
        tools += f"; tools per such record: mean {stats.tools_offered / offering:,.1f}, "
        tools += f"max {stats.most_tools:,}"
    return [
        tools,
        f"tool calls: {stats.tool_calls:,} (in {stats.calling_turns:,} assistant turns), "
        f"tool results: {stats.tool_results:,}, assistant turns with reasoning: "
        f"{stats.reasoning_turns:,}",
    ]


def format_stats(
    stats: DataStats, rejected: int = 0, near_duplicates: Finding | None = None
) -> str:
    n = stats.conversations
    lines = [f"conversations: {n:,} (rejected by the loader: {rejected:,})"]
    lines.append("formats: " + ", ".join(f"{k} {v:,}" for k, v in stats.formats.most_common()))
    lines.append("messages per role: " + ", ".join(f"{k} {v:,}" for k, v in stats.roles.items()))
    lines.append(f"turns per conversation: {_spread(stats.turns)}")
    lines += _tool_lines(stats)
    for name, values in (
        ("prompt tokens (not trained)", stats.prompt_tokens),
        ("response tokens (trained)", stats.response_tokens),
        ("whole examples, tokens", stats.example_tokens),
    ):
        lines += [f"\n{name}: {_spread(values)}", *histogram(values)]
    tokens, trained = stats.tokens, stats.trained_tokens
    lines.append(
        f"\ntokens: {tokens:,}, trained: {trained:,} ({trained / tokens:.1%} of all)"
        if tokens
        else "\ntokens: 0"
    )
    over = stats.over_max_length
    lines.append(f"over max_length {stats.max_length:,}:")
    lines.append(_finding("examples", over, len(stats.example_tokens)))
    if over.count:
        lines.append(
            f"  dropping them (truncation: drop) loses {stats.trained_lost_by_drop:,} trained "
            f"tokens; truncating them loses {stats.trained_lost_by_truncate:,}"
        )
    if stats.not_encoded:
        lines.append(f"refused by the chat template: {sum(stats.not_encoded.values()):,}")
        for reason, count in stats.not_encoded.most_common(3):
            lines.append(f"  {count:>8,}  {reason}")
        lines.append(f"  e.g. {', '.join(stats.not_encoded_sources)}")
    lines.append("quality:")
    lines.append(
        _finding(f"responses < {SHORT_RESPONSE_CHARS} characters", stats.short_responses, n)
    )
    lines.append(_finding("responses repeating prompt", stats.echoed_prompts, n))
    lines.append(_finding("refusal-like boilerplate", stats.refusals, n))
    lines.append(_finding("exact duplicates", stats.exact_duplicates, n))
    if stats.near_duplicates is not None:
        lines.append(_finding("near duplicates", stats.near_duplicates, n))
    return "\n".join(lines)


def write_plots(stats: DataStats, folder: Path) -> list[Path]:
    """One SVG histogram per token-length distribution."""
    from sftforge.plots import bar_chart

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, values in (
        ("prompt_tokens.svg", "prompt tokens (not trained)", stats.prompt_tokens),
        ("response_tokens.svg", "response tokens (trained)", stats.response_tokens),
        ("example_tokens.svg", "whole example tokens", stats.example_tokens),
    ):
        bars = [(f"{first}-{last}", count) for first, last, count in histogram_bins(values, 12)]
        svg = bar_chart(bars, title=title, y_label="examples", width=720)
        (folder / name).write_text(svg, "utf-8")
        written.append(folder / name)
    return written

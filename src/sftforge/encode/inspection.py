"""What `sftforge inspect` shows, as values: data rendered and tokenized exactly as training
would, each conversation with its examples (several where the template rewrites history),
each example's trained text (what the mask proof checked), the token view as text (`text`),
and JSON lines (`write_json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

from sftforge.data.loading import LoadResult
from sftforge.data.messages import Conversation
from sftforge.encode.encoder import IGNORE_INDEX, Encoder, Example
from sftforge.encode.parallel import EncodingReport, fit_to_length
from sftforge.encode.proof import texts_in_place, trained_runs
from sftforge.encode.reference import ExampleComparison, side_by_side
from sftforge.encode.show import describe_conversation, example_counts, format_example


@dataclass
class Inspection:
    encoder: Encoder
    loaded: LoadResult
    examples: list[list[Example]]  # per conversation, its examples in order
    # per conversation, each example beside the reference's (inspect's `reference`), or None
    comparisons: list[list[ExampleComparison]] | None = None

    @property
    def all_examples(self) -> list[Example]:
        return [example for group in self.examples for example in group]

    def write_json(self, stream: TextIO, n: int | None = None) -> None:
        """One line per training example (the first `n`, or all): {"source": "FILE:LINE",
        "input_ids": [...], "labels": [...]}, labels -100 where a token is not trained."""
        for example in self.all_examples[:n]:
            record = {
                "source": example.source,
                "input_ids": example.input_ids,
                "labels": example.labels,
            }
            stream.write(json.dumps(record) + "\n")

    def trained_texts(self, example: Example) -> list[str]:
        """The text of each run of trained tokens of `example`, as the tokenizer decodes it in
        place: what the mask proof checked against the assistant turns and end-of-turn
        markers."""
        runs = trained_runs(example.labels, IGNORE_INDEX)
        return texts_in_place(self.encoder.tokenizer, example.input_ids, runs)

    def text(
        self, n: int = 3, color: bool = False, max_length: int = 1024, truncation: str = "drop"
    ) -> str:
        """The first `n` conversations, what each holds and each example token by token
        (trained tokens green, or in [[ ]]), then what the whole data gives."""
        tokenizer = self.encoder.tokenizer
        shown = "in green" if color else "in [[ ]]"
        lines = [f"template: {self.encoder.template.name}; trained tokens shown {shown}"]
        conversations = self.loaded.conversations
        for index, (conversation, examples) in enumerate(
            zip(conversations[:n], self.examples, strict=False)
        ):
            lines.append(f"\n--- {conversation.source}")
            if not conversation.is_raw_text:
                lines.append(describe_conversation(conversation))
            for k, example in enumerate(examples):
                of = f"example {k + 1} of {len(examples)}, " if len(examples) > 1 else ""
                lines.append(f"-- {of}{example_counts(example)}")
                lines.append(format_example(tokenizer, example, color))
                if self.comparisons is not None and self.comparisons[index]:
                    lines.append(side_by_side(tokenizer, self.comparisons[index][k]))
                if len(example.input_ids) > max_length:
                    policy = "truncated" if truncation == "truncate" else "dropped"
                    lines.append(f"(longer than max_length {max_length}: would be {policy})")
        report = EncodingReport()
        fit_to_length(self.all_examples, max_length, truncation, report)
        lines.append("\n" + self.loaded.summary())
        lines.append(split_summary(conversations, self.examples))
        lines.append(report.summary(max_length))
        if self.comparisons is not None:
            lines.append(self.reference_summary())
        return "\n".join(lines)

    def reference_summary(self) -> str:
        """How many examples the reference writes with the same ids and the same mask."""
        compared = [c for group in self.comparisons or [] for c in group]
        equal = sum(c.equal for c in compared)
        return f"the same ids and mask as the reference: {equal} of {len(compared)} examples"


def split_summary(conversations: list[Conversation], examples: list[list[Example]]) -> str:
    """How many conversations became several examples, and what that costs in tokens."""
    split = [(c, g) for c, g in zip(conversations, examples, strict=True) if len(g) > 1]
    if not split:
        return "conversations split into several examples: none"
    made = sum(len(g) for _, g in split)
    tokens = sum(len(e.input_ids) for _, g in split for e in g)
    once = sum(len(g[-1].input_ids) for _, g in split)  # the last holds the whole conversation
    return (
        f"conversations split into several examples (their template rewrites history): "
        f"{len(split)}, into {made} examples; their tokens {once} -> {tokens} "
        f"({tokens / max(once, 1):.2f}x)"
    )

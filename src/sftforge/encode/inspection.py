"""`sftforge inspect` as a function: a data file rendered and tokenized exactly as training
would, each conversation with its examples (several where the template rewrites history),
to look at (`show`) or to read as JSON lines (`write_json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

from sftforge.data.loading import LoadResult, load_conversations
from sftforge.data.messages import Conversation
from sftforge.encode.encoder import Encoder, Example
from sftforge.encode.parallel import EncodingReport, fit_to_length
from sftforge.encode.render import ReasoningMode, TrainOn


@dataclass
class Inspection:
    encoder: Encoder
    loaded: LoadResult
    examples: list[list[Example]]  # per conversation, its examples in order

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

    def show(self, n: int, color: bool, max_length: int, truncation: str) -> None:
        """The first `n` conversations, what each holds and each example token by token
        (trained tokens green, or in [[ ]]), then what the whole data gives."""
        from sftforge.encode.show import describe_conversation, example_counts, format_example

        tokenizer = self.encoder.tokenizer
        shown = "in green" if color else "in [[ ]]"
        print(f"template: {self.encoder.template.name}; trained tokens shown {shown}")
        conversations = self.loaded.conversations
        for conversation, examples in zip(conversations[:n], self.examples, strict=False):
            print(f"\n--- {conversation.source}")
            if not conversation.is_raw_text:
                print(describe_conversation(conversation))
            for k, example in enumerate(examples):
                of = f"example {k + 1} of {len(examples)}, " if len(examples) > 1 else ""
                print(f"-- {of}{example_counts(example)}")
                print(format_example(tokenizer, example, color))
                if len(example.input_ids) > max_length:
                    policy = "truncated" if truncation == "truncate" else "dropped"
                    print(f"(longer than max_length {max_length}: would be {policy})")
        report = EncodingReport()
        fit_to_length(self.all_examples, max_length, truncation, report)
        print("\n" + self.loaded.summary())
        print(split_summary(conversations, self.examples))
        print(report.summary(max_length))


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


def inspect_data(
    data: str,
    model: str = "smollm2-135m",
    template: str = "auto",
    data_format: str = "auto",
    train_on: TrainOn = "all_assistant_turns",
    reasoning: ReasoningMode = "train",
    template_options: dict | None = None,
) -> Inspection:
    """Read `data` and encode every conversation as training would with `model`'s tokenizer
    (a model, run or tokenizer-only folder, an embedded name, a .gguf file). Raises the
    first record's DataError that cannot be encoded."""
    from sftforge.models.source import resolve_model_source
    from sftforge.models.tokenizer import load_tokenizer, text_side

    source = resolve_model_source(model)  # a tokenizer-only folder will do
    tokenizer = load_tokenizer(source.tokenizer)
    encoder, _ = text_side(
        tokenizer,
        template,
        train_on,
        model_type=source.model_type,
        reasoning=reasoning,
        template_options=template_options,
    )
    loaded = load_conversations(data, format=data_format, on_invalid="error")
    examples = [encoder.encode_examples(c) for c in loaded.conversations]
    return Inspection(encoder, loaded, examples)

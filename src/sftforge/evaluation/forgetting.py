"""The forgetting meter: how much worse the model got at general text.

Perplexity on a reference corpus of general prose, and the loss on reference answers to
general prompts, each measured before and after fine-tuning and reported as after / before.
A ratio above 1 means general ability was lost: the classic sign of too high a learning
rate or too narrow data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sftforge.data.loading import load_conversations
from sftforge.encode.encoder import Encoder, Example
from sftforge.evaluation.generation import mean_token_loss

# The forgetting ratio (general-text perplexity after / before) above which general ability
# has measurably dropped: the report warns, the run's notes say so, a sweep avoids the value.
FORGETTING_LIMIT = 1.05

DEFAULT_CORPUS = "reference_corpus.txt"
DEFAULT_GENERAL_PROMPTS = "general_prompts.jsonl"


def bundled(name: str) -> Path:
    return Path(str(resources.files("sftforge").joinpath(f"assets/{name}")))


def corpus_examples(encoder: Encoder, path: str | Path | None, max_length: int) -> list[Example]:
    """One example per paragraph (blank-line separated), every token scored, read as the
    model reads plain text (BOS first where it expects one)."""
    text = Path(path or bundled(DEFAULT_CORPUS)).read_text("utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    examples = []
    for k, paragraph in enumerate(paragraphs):
        ids = encoder.text_ids(paragraph)[:max_length]
        examples.append(Example(ids, list(ids), f"{path or DEFAULT_CORPUS}[paragraph {k}]"))
    return examples


def general_prompt_examples(encoder: Encoder, path: str | Path | None) -> list[Example]:
    """General prompts with reference answers, trained tokens = the answers."""
    loaded = load_conversations(path or bundled(DEFAULT_GENERAL_PROMPTS))
    return [encoder.encode(c) for c in loaded.conversations]


def perplexity(model, examples: list[Example], device, pad_id: int) -> float:
    return math.exp(mean_token_loss(model, examples, device, pad_id, description="corpus"))


@dataclass
class ForgettingMeter:
    corpus: list[Example]
    general_prompts: list[Example]
    corpus_name: str

    def measure(self, model, device, pad_id: int) -> dict:
        return {
            "corpus_ppl": perplexity(model, self.corpus, device, pad_id),
            "prompts_loss": mean_token_loss(
                model, self.general_prompts, device, pad_id, description="general prompts"
            ),
        }

    @staticmethod
    def compare(before: dict, after: dict, corpus_name: str) -> dict:
        return {
            "corpus_name": corpus_name,
            "corpus_ppl_before": before["corpus_ppl"],
            "corpus_ppl_after": after["corpus_ppl"],
            "corpus_ratio": after["corpus_ppl"] / before["corpus_ppl"],
            "prompts_loss_before": before["prompts_loss"],
            "prompts_loss_after": after["prompts_loss"],
            # Loss ratio as perplexity ratio: exp(after - before), comparable with the corpus.
            "prompts_ratio": math.exp(after["prompts_loss"] - before["prompts_loss"]),
        }

"""Measuring trained models on held-out prompts: `evaluate` one, `compare` two side by side,
with a scorer (exact, normalized, json, contains, regex, python, tool_call)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftforge.api.inference import LoadedModel, load_model
from sftforge.console import say, speaking
from sftforge.data.loading import load_conversations
from sftforge.data.writers import write_jsonl
from sftforge.evaluation.comparison import format_side_by_side, side_by_side
from sftforge.evaluation.generation import answer_and_score, mean_score
from sftforge.evaluation.scoring import Scorer, ScorerConfig, make_scorer

__all__ = ["Evaluation", "Comparison", "evaluate", "compare"]


@dataclass
class Evaluation:
    """One model's answers: a row a prompt {source, prompt, reference, answer, score}."""

    results: list[dict]
    scorer: str | None

    @property
    def mean_score(self) -> float | None:
        return mean_score(self.results)

    @property
    def fully_correct(self) -> int:
        return sum(1 for r in self.results if r["score"] == 1.0)


@dataclass
class Comparison:
    """Two models' answers to the same prompts, rendered alike: a row a prompt {source,
    prompt, reference, base, base_score, tuned, tuned_score}, and their mean scores."""

    rows: list[dict]
    template: str  # the template both were rendered with
    base_score: float | None
    tuned_score: float | None


def _scorer(scorer: str | dict | ScorerConfig | None) -> Scorer | None:
    if scorer is None:
        return None
    return make_scorer({"kind": scorer} if isinstance(scorer, str) else scorer)


def _scorer_name(scorer) -> str | None:
    if scorer is None or isinstance(scorer, str):
        return scorer
    return scorer["kind"] if isinstance(scorer, dict) else scorer.kind


def _answers(model: LoadedModel, data: Any, scorer, limit, max_new_tokens) -> list[dict]:
    conversations = load_conversations(data).conversations[:limit]
    return answer_and_score(model.model, model.encoder, conversations, scorer, max_new_tokens)


def evaluate(
    model: LoadedModel | str | Path,
    data: Any,
    *,
    scorer: str | dict | ScorerConfig | None = None,
    limit: int | None = None,
    max_new_tokens: int = 128,
    template: str = "auto",
    device: str = "auto",
    output: str | Path | None = None,
    allow_pickle: bool = False,
    verbose: bool = False,
) -> Evaluation:
    """Answer the held-out prompts of `data` (each record's last assistant turn is its
    reference) with `model` (a LoadedModel, or anything `load_model` takes) and score each
    answer; `output`: also write the rows as JSON lines."""
    with speaking(verbose):
        if not isinstance(model, LoadedModel):
            model = load_model(model, template=template, device=device, allow_pickle=allow_pickle)
        evaluation = Evaluation(
            _answers(model, data, _scorer(scorer), limit, max_new_tokens), _scorer_name(scorer)
        )
        if output is not None:
            write_jsonl(output, evaluation.results)
            say(f"{len(evaluation.results)} answers written to {output}")
        if evaluation.mean_score is not None:
            say(
                f"{evaluation.scorer}: mean score {evaluation.mean_score:.1%} "
                f"({evaluation.fully_correct}/{len(evaluation.results)} fully correct)"
            )
    return evaluation


def compare(
    base: str | Path,
    tuned: str | Path,
    data: Any,
    *,
    scorer: str | dict | ScorerConfig | None = None,
    limit: int | None = None,
    max_new_tokens: int = 128,
    template: str = "auto",
    device: str = "auto",
    output: str | Path | None = None,
    show: int = 5,
    allow_pickle: bool = False,
    verbose: bool = False,
) -> Comparison:
    """`base` and `tuned` answering the same prompts, side by side. A fair comparison renders
    both alike: by default (template "auto") with the tuned model's own template."""
    check = _scorer(scorer)
    with speaking(verbose):
        tuned_model = load_model(tuned, template=template, device=device, allow_pickle=allow_pickle)
        tuned_answers = _answers(tuned_model, data, check, limit, max_new_tokens)
        shared = tuned_model.template if template == "auto" else template
        del tuned_model  # one model in memory at a time
        base_model = load_model(base, template=shared, device=device, allow_pickle=allow_pickle)
        base_answers = _answers(base_model, data, check, limit, max_new_tokens)
        which = f"the tuned model's own template (from {tuned})" if template == "auto" else template
        say(f"both models rendered with {which}")
        comparison = Comparison(
            side_by_side(base_answers, tuned_answers),
            which,
            mean_score(base_answers),
            mean_score(tuned_answers),
        )
        if output is not None:
            write_jsonl(output, comparison.rows)
        for line in format_side_by_side(comparison.rows[:show]):
            say(line)
        if check is not None:
            name = _scorer_name(scorer)
            say(f"\n{name}: base {comparison.base_score:.1%} -> tuned {comparison.tuned_score:.1%}")
        if output is not None:
            say(f"side by side: {output}")
    return comparison

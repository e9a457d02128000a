"""What a run is judged on, measured before and after training: held-out loss, task accuracy
on generated answers, and forgetting of general ability."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sftforge.config.schema import Config
from sftforge.console import say
from sftforge.data.messages import Conversation
from sftforge.encode.encoder import Encoder, Example
from sftforge.evaluation.forgetting import (
    FORGETTING_LIMIT,
    ForgettingMeter,
    corpus_examples,
    general_prompt_examples,
)
from sftforge.evaluation.generation import (
    Prompt,
    generate_answers,
    mean_token_loss,
    prompt_and_reference,
)
from sftforge.evaluation.scoring import make_scorer
from sftforge.models.devices import autocast
from sftforge.training.training_data import TrainingData


@dataclass
class Assessment:
    held_out: list[Example]  # encoded held-out examples: eval loss
    prompts: list[Prompt]  # held-out prompts to answer (at most eval.max_prompts)
    references: list[str]
    sources: list[str]
    encoder: Encoder
    device: object
    scorer: object | None = None
    scorer_kind: str | None = None
    forgetting: ForgettingMeter | None = None
    max_new_tokens: int = 128
    shared_rows_of: int | None = None  # rows' length, when training shares prefixes
    amp: object | None = None  # the run's autocast dtype: measured as trained

    def loss(self, model) -> float | None:
        if not self.held_out:
            return None
        return mean_token_loss(
            model,
            self.held_out,
            self.device,
            self.encoder.pad_id,
            shared_rows_of=self.shared_rows_of,
        )

    def measure(self, model, eval_loss: float | None = None) -> dict:
        """Eval loss (unless already measured on this model), answers, scores, forgetting,
        under the run's autocast (flash-attention runs in bf16 or fp16 only, and a loss
        measured in another precision than training's is not the loss training saw)."""
        with autocast(self.device, self.amp):
            return self._measure(model, eval_loss)

    def _measure(self, model, eval_loss: float | None) -> dict:
        result: dict = {"eval_loss": eval_loss if eval_loss is not None else self.loss(model)}
        if self.prompts:
            answers = generate_answers(model, self.encoder, self.prompts, self.max_new_tokens)
            result["answers"] = answers
            if self.scorer is not None:
                result["scores"] = [
                    float(self.scorer(a, r, {"source": s}))
                    for a, r, s in zip(answers, self.references, self.sources, strict=True)
                ]
                result["accuracy"] = sum(result["scores"]) / len(result["scores"])
        if self.forgetting is not None:
            result["forgetting"] = self.forgetting.measure(model, self.device, self.encoder.pad_id)
        return result

    def compare(self, before: dict, after: dict, samples: int) -> dict:
        """The before/after summary that the report and the console show."""
        summary: dict = {
            "eval_loss_before": before["eval_loss"],
            "eval_loss_after": after["eval_loss"],
        }
        if "accuracy" in after:
            summary["accuracy"] = {
                "scorer": self.scorer_kind,
                "before": before["accuracy"],
                "after": after["accuracy"],
                "count": len(self.prompts),
            }
        if self.forgetting is not None:
            summary["forgetting"] = ForgettingMeter.compare(
                before["forgetting"], after["forgetting"], self.forgetting.corpus_name
            )
        # The base model's answers and the tuned one's, side by side as `compare` writes them.
        summary["samples"] = [
            {
                "prompt": prompt.last_text,
                "reference": ref,
                "base": before["answers"][k],
                "base_score": before.get("scores", [None] * (k + 1))[k],
                "tuned": after["answers"][k],
                "tuned_score": after.get("scores", [None] * (k + 1))[k],
            }
            for k, (prompt, ref) in enumerate(zip(self.prompts, self.references, strict=True))
        ][:samples]
        return summary


def build_assessment(
    config: Config,
    encoder: Encoder,
    held_out: list[Conversation],
    held_out_examples: list[Example],
    device,
    amp=None,
) -> Assessment:
    ev = config.eval
    # Answers are generated for scoring (up to max_prompts) or only for the report's samples.
    answered = held_out[: ev.max_prompts if ev.scorer is not None else ev.samples]
    pairs = [prompt_and_reference(c) for c in answered]
    forgetting = None
    if ev.forgetting:
        forgetting = ForgettingMeter(
            corpus_examples(encoder, ev.corpus, config.max_length),
            general_prompt_examples(encoder, ev.general_prompts),
            ev.corpus or "bundled reference corpus",
        )
    scorer = make_scorer(ev.scorer) if ev.scorer is not None else None
    return Assessment(
        held_out=held_out_examples,
        prompts=[p for p, _ in pairs],
        references=[r for _, r in pairs],
        sources=[str(c.source) for c in answered],
        encoder=encoder,
        device=device,
        scorer=scorer,
        scorer_kind=ev.scorer.kind if ev.scorer is not None else None,
        forgetting=forgetting,
        max_new_tokens=ev.max_new_tokens,
        shared_rows_of=config.max_length if config.training.share_prefixes else None,
        amp=amp,
    )


def finish_report(config: Config, data: TrainingData, summary: dict, output_dir: Path) -> None:
    """Write summary.json and report.html, and print the headline figures."""
    from sftforge.evaluation.report import RunReport, write_report

    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    data_stats = dict(data.report.__dict__) | {
        "held_out": len(data.held_out),
        "rejected": len(data.loaded.rejects),
        "duplicates": data.loaded.duplicates,
    }
    mix = {"mix": data.mix} if data.mix else {}
    (output_dir / "summary.json").write_text(
        json.dumps(summary | {"data": data_stats | mix}, indent=2)
    )
    notes = []
    forgetting = summary.get("forgetting")
    if forgetting and forgetting["corpus_ratio"] > FORGETTING_LIMIT:
        notes.append(
            f"forgetting ratio {forgetting['corpus_ratio']:.3f} > {FORGETTING_LIMIT}: the model got worse at "
            "general text; try a lower learning rate, fewer epochs, or more varied data"
        )
    report = RunReport(
        title=f"sftforge run: {config.model} ({config.method})",
        output_dir=str(output_dir),
        train_metrics=rows,
        eval_metrics=[
            {"step": r["step"], "eval_loss": r["eval_loss"]} for r in rows if "eval_loss" in r
        ],
        data_stats=data_stats,
        accuracy=summary.get("accuracy"),
        forgetting=forgetting,
        samples=summary.get("samples", []),
        config=config.model_dump(),
        notes=notes,
    )
    path = write_report(report, output_dir / "report.html")
    for line in headline(summary):
        say(line)
    for note in notes:
        say("note: " + note)
    say(f"report: {path}")


def headline(summary: dict) -> list[str]:
    lines = []
    if summary.get("eval_loss_after") is not None:
        lines.append(
            f"held-out loss: {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}"
        )
    if acc := summary.get("accuracy"):
        lines.append(
            f"held-out accuracy ({acc['scorer']}, {acc['count']} prompts): "
            f"{acc['before']:.1%} -> {acc['after']:.1%}"
        )
    if f := summary.get("forgetting"):
        lines.append(
            f"forgetting: general-text perplexity {f['corpus_ppl_before']:.2f} -> "
            f"{f['corpus_ppl_after']:.2f} (ratio {f['corpus_ratio']:.3f}); "
            f"general prompts ratio {f['prompts_ratio']:.3f}"
        )
    return lines

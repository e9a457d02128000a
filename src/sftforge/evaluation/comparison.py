"""Answers side by side: the base model's and the tuned one's to the same prompts, as rows
(written by `compare`, kept in a run's summary.json as its samples) and as text to read."""

from __future__ import annotations

WIDTH = 300  # characters of a prompt, reference or answer shown


def side_by_side(base: list[dict], tuned: list[dict]) -> list[dict]:
    """One row a prompt from two lists of `answer_and_score` results for the same prompts."""
    return [
        {
            "source": b["source"],
            "prompt": b["prompt"],
            "reference": b["reference"],
            "base": b["answer"],
            "base_score": b["score"],
            "tuned": t["answer"],
            "tuned_score": t["score"],
        }
        for b, t in zip(base, tuned, strict=True)
    ]


def format_side_by_side(rows: list[dict], width: int = WIDTH) -> list[str]:
    """Each row as a block of lines: prompt, reference, then the base and tuned answers,
    each marked ok or BAD when it was scored."""
    lines = []
    for row in rows:
        lines.append("\n" + "=" * 78)
        lines.append("PROMPT     " + row["prompt"].replace("\n", " ")[:width])
        lines.append("REFERENCE  " + row["reference"].replace("\n", " ")[:width])
        lines.append(f"BASE  {_mark(row['base_score'])}  {row['base'].strip()[:width]!r}")
        lines.append(f"TUNED {_mark(row['tuned_score'])}  {row['tuned'].strip()[:width]!r}")
    return lines


def _mark(score: float | None) -> str:
    return "   " if score is None else ("ok " if score == 1.0 else "BAD")

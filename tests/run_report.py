"""Checks that a finished run's report.html shows that run's own figures: what its
summary.json, metrics.jsonl and data report hold, not merely that the sections exist."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html import escape
from pathlib import Path

SVG = "{http://www.w3.org/2000/svg}"


def section(html: str, section_id: str) -> str:
    """The HTML from a section's heading up to the next section."""
    start = html.index(f'id="{section_id}"')
    end = html.find("<section>", start)
    return html[start : end if end != -1 else len(html)]


def charts(html: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


def pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def assert_report_shows_the_run(out: Path) -> None:
    html = (out / "report.html").read_text("utf-8")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]

    # Summary cards: the final train loss, the final eval loss, the examples trained on.
    cards = section(html, "summary")
    assert f"{rows[-1]['loss']:.4g}" in cards and f"{len(rows)} steps" in cards
    if evals:
        assert f"{evals[-1]['eval_loss']:.4g}" in cards
    assert f"{summary['data']['examples']:,}" in cards

    # The loss curve has a point per step, and each eval is marked with its step and value.
    (loss_chart,) = charts(section(html, "loss"))
    train_line = loss_chart.findall(f".//{SVG}polyline")[0]
    assert len(train_line.get("points").split()) == len(rows)
    marked = [t.text for t in loss_chart.iter(f"{SVG}title") if t.text.startswith("eval loss:")]
    assert marked == [f"eval loss: {r['step']}, {r['eval_loss']:.4g}" for r in evals]

    accuracy = section(html, "accuracy")
    if "accuracy" in summary:
        acc = summary["accuracy"]
        shown = f"<strong>{pct(acc['before'])} → {pct(acc['after'])}</strong>"
        assert shown in accuracy and f"{acc['count']} held-out prompts" in accuracy
        assert f"{pct(acc['before'])} → {pct(acc['after'])}" in cards
    else:
        assert "No scorer was configured" in accuracy

    forgetting = section(html, "forgetting")
    if "forgetting" in summary:
        f = summary["forgetting"]
        assert f"{f['corpus_ratio']:.4g}" in forgetting
        assert f"{f['corpus_ppl_before']:.4g}" in forgetting
        assert f"{f['corpus_ppl_after']:.4g}" in forgetting
    else:
        assert "Forgetting was not measured" in forgetting

    # Every sample's answers, before and after, as generated (escaped).
    samples = section(html, "samples")
    assert samples.count("<tr><td class='num'>") == len(summary["samples"])
    for sample in summary["samples"]:
        assert f"<pre>{escape(sample['base'])}</pre>" in samples
        assert f"<pre>{escape(sample['tuned'])}</pre>" in samples

    data = section(html, "data")
    for key in ("examples", "held_out"):
        assert f"<td>{summary['data'][key]:,}" in data

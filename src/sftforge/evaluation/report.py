"""The run report: one self-contained `report.html` per training run.

Everything is inline (CSS in a <style> block, charts as SVG from `plots.py`), so the file opens
offline, can be mailed or attached to a ticket, and needs no JavaScript. Every section is always
present; when its data is missing it says so, and what to configure to get it. Everything that
came from the user (data sources, prompts, answers, config values) is HTML-escaped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path

from sftforge.evaluation.forgetting import FORGETTING_LIMIT
from sftforge.plots import bar_chart, format_number, line_chart

MAX_SAMPLES = 50  # rows in the samples table; the rest are counted, not shown
LIST_PREVIEW = 5  # sources shown for truncated / dropped examples

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  color: #222; background: #f6f7f9; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 60px; background: #fff;
  min-height: 100vh; box-shadow: 0 0 0 1px #e4e6ea; }
h1 { font-size: 24px; margin: 0 0 2px; } h2 { font-size: 19px; margin: 36px 0 10px;
  padding-bottom: 4px; border-bottom: 2px solid #e4e6ea; }
.meta { color: #667; font-size: 13px; } nav { margin: 12px 0 4px; font-size: 13px; }
nav a { color: #3a6ea5; margin-right: 14px; text-decoration: none; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(185px, 1fr)); gap: 12px; }
.card { border: 1px solid #e1e4e8; border-left: 4px solid #b8bfc8; border-radius: 6px;
  padding: 10px 12px; } .card .label { font-size: 12px; color: #667; text-transform: uppercase;
  letter-spacing: .04em; } .card .value { font-size: 22px; font-weight: 600; }
.card .detail { font-size: 12px; color: #667; }
.card.ok { border-left-color: #2f9e44; } .card.bad { border-left-color: #d9480f; }
.notes { background: #fff8e6; border: 1px solid #f0d68a; border-radius: 6px; padding: 8px 14px;
  margin-top: 14px; } .notes ul { margin: 4px 0; padding-left: 20px; }
.missing { color: #666; font-style: italic; } code { font-size: 13px; background: #f1f3f5;
  padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; margin: 8px 0; }
th, td { border: 1px solid #e1e4e8; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; font-weight: 600; } tr:nth-child(even) td { background: #fbfbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 12.5px;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table.samples td { width: 22%; } table.samples td:first-child { width: 3%; }
table.samples td.ok { background: #ebfbee; } table.samples td.bad { background: #fff0f0; }
table.samples td.partial { background: #fff9db; }
.score { display: inline-block; margin-top: 4px; font-size: 12px; font-weight: 600; }
.ok .score, span.ok { color: #2b8a3e; } .bad .score, span.bad { color: #c92a2a; }
.partial .score { color: #a06a00; } figure { margin: 8px 0; } svg { max-width: 100%; height: auto; }
details { border: 1px solid #e1e4e8; border-radius: 6px; padding: 8px 12px; }
summary { cursor: pointer; font-weight: 600; } details pre { margin-top: 8px; }
"""


@dataclass
class RunReport:
    title: str
    output_dir: str
    train_metrics: list[dict]  # metrics.jsonl rows: "step", "loss", "lr", maybe "tokens_per_s"
    eval_metrics: list[dict]  # rows with "step", "eval_loss"
    data_stats: dict  # EncodingReport fields plus "held_out", "rejected", "duplicates"
    accuracy: dict | None = None  # {"scorer", "before", "after", "count"}
    forgetting: dict | None = None  # ForgettingMeter.compare(...)
    samples: list[dict] = field(default_factory=list)  # prompt, reference, before, after, scores
    config: dict | None = None  # the resolved config
    notes: list[str] = field(default_factory=list)  # warnings worth showing at the top


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if _finite(v) else "n/a"


def _pct(v) -> str:
    return f"{v * 100:.1f}%" if _finite(v) else "n/a"


def _missing(text: str) -> str:
    return f'<p class="missing">{text}</p>'


def _points(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if _finite(r.get("step")) and _finite(r.get(key))]


def _ratio_class(ratio) -> str:
    return "" if not _finite(ratio) else "bad" if ratio > FORGETTING_LIMIT else "ok"


def _card(label: str, value: str, detail: str, status: str = "") -> str:
    return (
        f'<div class="card {status}"><div class="label">{label}</div>'
        f'<div class="value">{value}</div><div class="detail">{detail}</div></div>'
    )


def _summary(r: RunReport) -> str:
    cards = []
    acc = r.accuracy or {}
    before, after = acc.get("before"), acc.get("after")
    if r.accuracy is None:
        cards.append(_card("Accuracy", "—", "no scorer configured"))
    else:
        status = ""
        if _finite(before) and _finite(after) and after != before:
            status = "ok" if after > before else "bad"
        scorer, count = escape(str(acc.get("scorer", "?"))), escape(str(acc.get("count", "?")))
        detail = f"{scorer} scorer, {count} prompts"
        cards.append(_card("Accuracy", f"{_pct(before)} → {_pct(after)}", detail, status))
    ratio = (r.forgetting or {}).get("corpus_ratio")
    detail = "general-text perplexity after / before" if _finite(ratio) else "not measured"
    value = f"{ratio:.3f}" if _finite(ratio) else "—"
    cards.append(_card("Forgetting ratio", value, detail, _ratio_class(ratio)))
    train = _points(r.train_metrics, "loss")
    if train:
        detail = f"from {_num(train[0][1])}, {len(train)} steps"
        cards.append(_card("Final train loss", _num(train[-1][1]), detail))
    else:
        cards.append(_card("Final train loss", "—", "no training metrics"))
    evals = _points(r.eval_metrics, "eval_loss")
    if evals:
        best = min(evals, key=lambda p: p[1])
        detail = f"best {_num(best[1])} at step {format_number(best[0])}"
        cards.append(_card("Final eval loss", _num(evals[-1][1]), detail))
    else:
        cards.append(_card("Final eval loss", "—", "no held-out eval"))
    stats = r.data_stats or {}
    examples = stats.get("examples")
    trained, tokens = stats.get("trained_tokens"), stats.get("tokens")
    detail = (
        f"{trained:,} of {tokens:,} tokens trained" if _finite(trained) and _finite(tokens) else ""
    )
    cards.append(_card("Examples", f"{examples:,}" if _finite(examples) else "—", detail))
    speed = _points(r.train_metrics, "tokens_per_s")
    if speed:
        cards.append(_card("Throughput", f"{speed[-1][1]:,.0f}", "tokens / s (whole run)"))
    html = f'<div class="cards">{"".join(cards)}</div>'
    if r.notes:
        items = "".join(f"<li>{escape(str(n))}</li>" for n in r.notes)
        html += f'<div class="notes"><strong>Worth a look</strong><ul>{items}</ul></div>'
    return html


def _loss(r: RunReport) -> str:
    train, evals = _points(r.train_metrics, "loss"), _points(r.eval_metrics, "eval_loss")
    if not train and not evals:
        return _missing("No loss was recorded (metrics.jsonl has no rows), so there is no curve.")
    series = {"train loss": train, "eval loss": evals} if evals else {"train loss": train}
    chart = line_chart(series, title="Loss", x_label="optimizer step", y_label="loss")
    html = f"<figure>{chart}</figure>"
    if not evals:
        html += _missing(
            "No eval loss: set <code>eval.held_out</code> and <code>eval.every</code> to track "
            "the loss on examples the model never trains on."
        )
    return html


def _lr(r: RunReport) -> str:
    lr = _points(r.train_metrics, "lr")
    if not lr:
        return _missing("No learning rate was recorded.")
    peak = max(lr, key=lambda p: p[1])
    chart = line_chart({"lr": lr}, title="Learning rate", x_label="optimizer step", y_label="lr")
    return (
        f"<figure>{chart}</figure><p>Peak {_num(peak[1], 3)} at step {format_number(peak[0])}, "
        f"final {_num(lr[-1][1], 3)}.</p>"
    )


def _accuracy(r: RunReport) -> str:
    if r.accuracy is None:
        return _missing(
            "No scorer was configured, so task accuracy was not measured. Set "
            "<code>eval.scorer</code> (for example <code>kind: json</code>) to score the "
            "generated answers before and after training."
        )
    acc = r.accuracy
    before, after = acc.get("before"), acc.get("after")
    change = ""
    if _finite(before) and _finite(after):
        change = f" ({(after - before) * 100:+.1f} points)"
    chart = bar_chart(
        [("before", before), ("after", after)],
        title="Task accuracy",
        y_label="accuracy",
        y_max=1.0,
        colors=["#9aa5b1", "#4e79a7"],
    )
    return (
        f"<p>Scorer <code>{escape(str(acc.get('scorer', '?')))}</code> on "
        f"{escape(str(acc.get('count', '?')))} held-out prompts: <strong>{_pct(before)} → "
        f"{_pct(after)}</strong>{change}.</p><figure>{chart}</figure>"
    )


def _forgetting(r: RunReport) -> str:
    if r.forgetting is None:
        return _missing(
            "Forgetting was not measured (<code>eval.forgetting</code> is off), so there is no "
            "check that the model kept its general ability."
        )
    f = r.forgetting
    corpus = escape(str(f.get("corpus_name", "reference corpus")))
    rows = [
        (f"General text perplexity (<code>{corpus}</code>)", "corpus_ppl", "corpus_ratio"),
        ("General prompts, loss on reference answers", "prompts_loss", "prompts_ratio"),
    ]
    body = ""
    for label, key, ratio_key in rows:
        ratio = f.get(ratio_key)
        body += (
            f"<tr><td>{label}</td><td class='num'>{_num(f.get(key + '_before'))}</td>"
            f"<td class='num'>{_num(f.get(key + '_after'))}</td>"
            f"<td class='num'><span class='{_ratio_class(ratio)}'>{_num(ratio, 4)}</span></td></tr>"
        )
    ratios = [("general text", f.get("corpus_ratio")), ("general prompts", f.get("prompts_ratio"))]
    colours = ["#d9480f" if _ratio_class(v) == "bad" else "#59a14f" for _, v in ratios]
    chart = bar_chart(
        ratios,
        title="Forgetting ratio (after / before)",
        y_label="ratio",
        reference_line=1.0,
        colors=colours,
    )
    return (
        "<p>Ratio = perplexity after / before on general text the run never trained on. "
        "1.0 means unchanged; above 1 the model got worse at general text (above "
        f"{FORGETTING_LIMIT} is worth acting on: lower the learning rate, train fewer steps, or "
        "mix in general data). The prompts ratio is exp(loss after − loss before), so it reads "
        "the same way.</p>"
        "<table><tr><th>Measure</th><th>Before</th><th>After</th><th>Ratio</th></tr>"
        f"{body}</table><figure>{chart}</figure>"
    )


def _text(value) -> str:
    """A prompt or answer as plain text: a string, or a list of chat messages."""
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"[{m.get('role', '?')}] {m['content']}" for m in value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _score_cell(answer, score) -> str:
    if isinstance(score, bool):
        score = float(score)
    cls = (
        "" if not _finite(score) else "ok" if score >= 0.999 else "bad" if score <= 0 else "partial"
    )
    badge = f'<span class="score">score {_num(score, 3)}</span>' if _finite(score) else ""
    return f'<td class="{cls}"><pre>{escape(_text(answer))}</pre>{badge}</td>'


def _samples(r: RunReport) -> str:
    if not r.samples:
        return _missing(
            "No samples were generated (<code>eval.samples</code> is 0 or there were no prompts)."
        )
    rows = ""
    for i, s in enumerate(r.samples[:MAX_SAMPLES], 1):
        rows += (
            f"<tr><td class='num'>{i}</td><td><pre>{escape(_text(s.get('prompt')))}</pre></td>"
            f"<td><pre>{escape(_text(s.get('reference')))}</pre></td>"
            f"{_score_cell(s.get('base'), s.get('base_score'))}"
            f"{_score_cell(s.get('tuned'), s.get('tuned_score'))}</tr>"
        )
    more = len(r.samples) - MAX_SAMPLES
    note = f"<p>Showing {MAX_SAMPLES} of {len(r.samples)} samples.</p>" if more > 0 else ""
    return (
        '<table class="samples"><tr><th>#</th><th>Prompt</th><th>Reference</th>'
        f"<th>Before training</th><th>After training</th></tr>{rows}</table>{note}"
    )


DATA_LABELS = {
    "examples": "Training examples",
    "tokens": "Tokens",
    "trained_tokens": "Trained tokens (the loss is computed on these)",
    "max_tokens": "Longest example (tokens)",
    "held_out": "Held-out examples (never trained on)",
    "rejected": "Rejected records",
    "duplicates": "Duplicates removed",
    "truncated": "Truncated to max_length",
    "dropped_too_long": "Dropped: longer than max_length",
    "dropped_nothing_trained": "Dropped: no trained token left",
}


def _stat_value(key: str, value, stats: dict) -> str:
    if isinstance(value, (list, tuple)):
        shown = ", ".join(f"<code>{escape(str(v))}</code>" for v in value[:LIST_PREVIEW])
        rest = f" and {len(value) - LIST_PREVIEW} more" if len(value) > LIST_PREVIEW else ""
        return f"{len(value):,}" + (f": {shown}{rest}" if value else "")
    tokens = stats.get("tokens")
    if key == "trained_tokens" and _finite(value) and _finite(tokens) and tokens > 0:
        return f"{value:,} ({value / tokens:.1%} of tokens)"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return escape(text)


def _data(r: RunReport) -> str:
    stats = r.data_stats or {}
    if not stats:
        return _missing("No data statistics were recorded.")
    keys = [k for k in DATA_LABELS if k in stats] + [k for k in stats if k not in DATA_LABELS]
    rows = "".join(
        f"<tr><th>{escape(DATA_LABELS.get(k, str(k)))}</th><td>{_stat_value(k, stats[k], stats)}</td></tr>"
        for k in keys
    )
    return f"<table>{rows}</table>"


def _config(r: RunReport) -> str:
    if not r.config:
        return _missing("The resolved config was not recorded.")
    # JSON is also valid YAML, so this can be pasted back into a config file.
    text = json.dumps(r.config, indent=2, ensure_ascii=False, default=str)
    return (
        f"<details><summary>Resolved config ({len(r.config)} top-level keys; click to open)"
        f"</summary><pre>{escape(text)}</pre></details>"
    )


SECTIONS = (
    ("summary", "Summary", _summary),
    ("loss", "Loss", _loss),
    ("lr", "Learning rate", _lr),
    ("accuracy", "Task accuracy", _accuracy),
    ("forgetting", "Forgetting", _forgetting),
    ("samples", "Samples before / after", _samples),
    ("data", "Data", _data),
    ("config", "Config", _config),
)


def render_report(report: RunReport) -> str:
    """The report as one self-contained HTML page."""
    nav = "".join(f'<a href="#{key}">{name}</a>' for key, name, _ in SECTIONS)
    body = "".join(
        f'<section><h2 id="{key}">{name}</h2>{build(report)}</section>'
        for key, name, build in SECTIONS
    )
    title = escape(report.title)
    generated = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{title}</h1><div class="meta">Run in <code>{escape(str(report.output_dir))}</code>'
        f" · report generated {generated} by sftforge</div><nav>{nav}</nav>{body}"
        "</main></body></html>\n"
    )


def write_report(report: RunReport, path: str | Path) -> Path:
    """Write the report to `path` (a directory gets `report.html` inside it); return the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(report), encoding="utf-8")
    return path

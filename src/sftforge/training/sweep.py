"""`sftforge sweep config.yaml lr=1e-5,3e-5,1e-4`: short runs, one per value, compared.

Each run gets the same budget of optimizer steps (or the swept epochs), the same held-out
split and the same measurements: eval loss, task accuracy if a scorer is set, and the
forgetting ratio. The recommendation prefers runs that did not forget (ratio <= FORGETTING_LIMIT, 1.05), then
the best accuracy, then the lowest eval loss, and says which rule decided.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sftforge.config.loading import ConfigError, load_config
from sftforge.console import say
from sftforge.evaluation.forgetting import FORGETTING_LIMIT

ALIASES = {
    "lr": "training.lr",
    "epochs": "training.epochs",
    "rank": "lora.r",
    "r": "lora.r",
    "alpha": "lora.alpha",
    "batch_size": "training.batch_size",
    "max_steps": "training.max_steps",
}


def parse_sweep(overrides: list[str]) -> tuple[str, list[float], list[str]]:
    """Split out the one `key=v1,v2,...` override; the rest apply to every run."""
    swept = [o for o in overrides if "=" in o and "," in o.partition("=")[2]]
    if len(swept) != 1:
        raise ConfigError(
            "sweep needs exactly one key with several values, e.g. lr=1e-5,3e-5,1e-4 "
            f"(got {len(swept)}: {swept})"
        )
    key, _, raw = swept[0].partition("=")
    key = ALIASES.get(key, key)
    try:
        values = [float(v) if any(c in v for c in ".eE") else int(v) for v in raw.split(",")]
    except ValueError:
        raise ConfigError(f"sweep values for {key} must be numbers: {raw}") from None
    return key, values, [o for o in overrides if o != swept[0]]


def run_sweep(config_path: str | None, overrides: list[str], steps: int) -> dict:
    from sftforge.training.loop import train

    key, values, rest = parse_sweep(overrides)
    base = load_config(config_path, rest)
    budget = (
        [] if key in ("training.epochs", "training.max_steps") else [f"training.max_steps={steps}"]
    )
    held = [] if base.eval.held_out is not None else ["eval.held_out=0.1"]
    sweep_dir = Path(base.output_dir) / "sweep"
    rows = []
    for value in values:
        out = sweep_dir / f"{key}={value}"
        config = load_config(
            config_path, [*rest, *budget, *held, f"{key}={value}", f"output_dir={out}"]
        )
        say(f"\n=== sweep {key}={value} ===")
        rows.append(sweep_row(value, train(config).summary, out))
    choice, reason = recommend(rows)
    result = {"key": key, "rows": rows, "recommended": choice, "reason": reason}
    (sweep_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    write_sweep_report(result, sweep_dir / "sweep.html")
    say(format_table(result))
    say(f"\nrecommended {key}={choice}: {reason}")
    say(f"plots: {sweep_dir / 'sweep.html'}")
    return result


def sweep_row(value, summary: dict, out: Path) -> dict:
    accuracy = summary.get("accuracy") or {}
    forgetting = summary.get("forgetting") or {}
    return {
        "value": value,
        "eval_loss": summary.get("eval_loss_after"),
        "accuracy": accuracy.get("after"),
        "forgetting_ratio": forgetting.get("corpus_ratio"),
        "output_dir": str(out),
    }


def recommend(rows: list[dict]) -> tuple[object, str]:
    measured = [r for r in rows if r["eval_loss"] is not None and math.isfinite(r["eval_loss"])]
    if not measured:
        return None, "no run produced an eval loss"
    safe = [r for r in measured if (r["forgetting_ratio"] or 1.0) <= FORGETTING_LIMIT]
    pool = safe or measured
    why = []
    if safe and len(safe) < len(measured):
        dropped = [str(r["value"]) for r in measured if r not in safe]
        why.append(f"{', '.join(dropped)} forgot too much (ratio > {FORGETTING_LIMIT})")
    elif not safe:
        why.append(f"every value forgot (ratio > {FORGETTING_LIMIT}); the least bad is shown")
        pool = sorted(measured, key=lambda r: r["forgetting_ratio"])[:1]
    if all(r["accuracy"] is not None for r in pool):
        best = max(pool, key=lambda r: (r["accuracy"], -r["eval_loss"]))
        why.append(f"highest held-out accuracy {best['accuracy']:.1%}")
        ties = [r for r in pool if r["accuracy"] == best["accuracy"]]
        if len(ties) > 1:
            why.append(f"lowest eval loss {best['eval_loss']:.4f} among the ties")
    else:
        best = min(pool, key=lambda r: r["eval_loss"])
        why.append(f"lowest held-out loss {best['eval_loss']:.4f}")
    return best["value"], "; ".join(why)


def format_table(result: dict) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"{result['key']:>16}  {'eval loss':>9}  {'accuracy':>8}  {'forgetting':>10}"]
    for r in result["rows"]:
        lines.append(
            f"{r['value']!s:>16}  {fmt(r['eval_loss'], '.4f'):>9}  "
            f"{fmt(r['accuracy'], '.1%'):>8}  {fmt(r['forgetting_ratio'], '.3f'):>10}"
        )
    return "\n".join(lines)


def write_sweep_report(result: dict, path: Path) -> None:
    from html import escape

    from sftforge.plots import line_chart

    key = result["key"]
    log_x = all(isinstance(r["value"], float) and r["value"] > 0 for r in result["rows"])
    x_label = f"log10 {key}" if log_x else key

    def x(r):
        return math.log10(r["value"]) if log_x else float(r["value"])

    charts = []
    for metric, title in (
        ("eval_loss", "held-out loss"),
        ("accuracy", "held-out accuracy"),
        ("forgetting_ratio", "forgetting ratio (after / before perplexity)"),
    ):
        points = [(x(r), r[metric]) for r in result["rows"] if r[metric] is not None]
        charts.append(line_chart({title: points}, title=title, x_label=x_label, y_label=metric))
    body = "\n".join(f"<div>{c}</div>" for c in charts)
    html = (
        f"<!doctype html><meta charset='utf-8'><title>sftforge sweep {escape(key)}</title>"
        f"<body style='font-family:sans-serif;max-width:900px;margin:2em auto'>"
        f"<h1>Sweep of {escape(key)}</h1><pre>{escape(format_table(result))}</pre>"
        f"<p><b>Recommended {escape(key)}={escape(str(result['recommended']))}</b>: "
        f"{escape(result['reason'])}</p>{body}</body>"
    )
    path.write_text(html, "utf-8")

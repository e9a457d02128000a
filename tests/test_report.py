"""The run report: every section present, charts that parse, user text escaped, gaps explained."""

import math
import re
import xml.etree.ElementTree as ET

import pytest

from sftforge.evaluation.report import RunReport, render_report, write_report
from sftforge.plots import bar_chart, format_number, line_chart, nice_ticks

SECTION_IDS = ("summary", "loss", "lr", "accuracy", "forgetting", "samples", "data", "config")
SVG = "{http://www.w3.org/2000/svg}"


def realistic_report(**overrides) -> RunReport:
    steps = 120
    train = [
        {
            "step": s,
            "loss": 0.4 + 2.0 * math.exp(-s / 25) + 0.05 * math.sin(s),
            "lr": 2e-4 * min(1.0, s / 12) * (0.5 + 0.5 * math.cos(math.pi * s / steps)),
            "tokens_per_s": 5200.0 + s,
        }
        for s in range(1, steps + 1)
    ]
    fields = dict(
        title="SmolLM2-135M LoRA on support tickets",
        output_dir="runs/tickets",
        train_metrics=train,
        eval_metrics=[
            {"step": s, "eval_loss": 0.55 + 1.6 * math.exp(-s / 30)} for s in range(20, 121, 20)
        ],
        data_stats={
            "examples": 200,
            "tokens": 18398,
            "trained_tokens": 5756,
            "truncated": [f"train.jsonl:{n}" for n in (3, 17, 40, 41, 90, 101, 150)],
            "dropped_too_long": ["train.jsonl:12"],
            "dropped_nothing_trained": [],
            "rejected": 3,
            "held_out": 40,
            "duplicates": 0,
        },
        accuracy={"scorer": "json", "before": 0.05, "after": 0.93, "count": 60},
        forgetting={
            "corpus_ratio": 1.02,
            "corpus_ppl_before": 12.3,
            "corpus_ppl_after": 12.6,
            "prompts_ratio": 1.01,
            "prompts_loss_before": 1.2,
            "prompts_loss_after": 1.21,
            "corpus_name": "reference_corpus.txt",
        },
        samples=[
            {
                "prompt": "Extract the order as JSON: two lamps to Oslo",
                "reference": '{"item": "lamp", "qty": 2, "city": "Oslo"}',
                "base": "Sure! Here is the order: two lamps.",
                "tuned": '{"item": "lamp", "qty": 2, "city": "Oslo"}',
                "base_score": 0.0,
                "tuned_score": 1.0,
            },
            {
                "prompt": "<script>alert(1)</script>",
                "reference": "a & b",
                "base": "<b>bold</b>",
                "tuned": "plain",
                "base_score": 0.5,
                "tuned_score": None,
            },
        ],
        config={"model": "smollm2-135m", "method": "lora", "lora": {"r": 16, "alpha": 32}},
        notes=["forgetting ratio 1.20 > 1.05: lower the learning rate"],
    )
    fields.update(overrides)
    return RunReport(**fields)


def svgs(html: str) -> list[ET.Element]:
    """Every inline chart, parsed as standalone XML (which fails on any unescaped text)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


def section(html: str, section_id: str) -> str:
    """The HTML from a section's heading up to the next section."""
    start = html.index(f'id="{section_id}"')
    end = html.find("<section>", start)
    return html[start : end if end != -1 else len(html)]


def test_report_is_written_with_every_section_and_nothing_external(tmp_path):
    path = write_report(realistic_report(), tmp_path / "run" / "report.html")
    html = path.read_text("utf-8")
    assert path == tmp_path / "run" / "report.html"
    for section_id in SECTION_IDS:
        assert f'<h2 id="{section_id}">' in html
    assert "<style>" in html
    assert not re.search(r"<script|<link|src=|@import|url\(", html)  # offline, no JS
    assert write_report(realistic_report(), tmp_path / "run") == path  # a directory works too


def test_report_charts_are_valid_svg():
    charts = svgs(render_report(realistic_report()))
    # loss, lr, accuracy, forgetting
    assert len(charts) == 4
    loss = charts[0]
    assert len(loss.findall(f".//{SVG}polyline")) == 2  # train and eval lines
    assert len(loss.findall(f".//{SVG}circle")) == 6  # markers: eval every 20 steps only


def test_headline_numbers_are_in_the_summary():
    report = realistic_report()
    summary = section(render_report(report), "summary")
    assert "5.0% → 93.0%" in summary
    assert "1.020" in summary  # forgetting ratio
    assert f"{report.train_metrics[-1]['loss']:.4g}" in summary
    assert f"{report.eval_metrics[-1]['eval_loss']:.4g}" in summary
    assert "200" in summary and "5,756 of 18,398" in summary
    assert "forgetting ratio 1.20 &gt; 1.05" in summary  # notes are shown (escaped)


def test_user_text_is_escaped():
    html = render_report(
        realistic_report(title="<i>run</i>", config={"model": "</pre><script>x</script>"})
    )
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section(html, "samples")
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "a &amp; b" in html
    assert "<i>run</i>" not in html


def test_sample_scores_colour_the_answers():
    samples = section(render_report(realistic_report()), "samples")
    assert '<td class="bad"><pre>Sure! Here is the order' in samples
    assert '<td class="ok"><pre>{&quot;item&quot;' in samples
    assert '<td class="partial">' in samples


def test_missing_sections_are_explained_not_omitted():
    report = realistic_report(
        accuracy=None,
        forgetting=None,
        samples=[],
        eval_metrics=[],
        train_metrics=[],
        data_stats={},
        config=None,
        notes=[],
    )
    html = render_report(report)
    for section_id in SECTION_IDS:
        assert f'<h2 id="{section_id}">' in html
    assert "No scorer was configured" in section(html, "accuracy")
    assert "Forgetting was not measured" in section(html, "forgetting")
    assert "No loss was recorded" in section(html, "loss")
    assert "No learning rate was recorded" in section(html, "lr")
    assert "No samples were generated" in section(html, "samples")
    assert "No data statistics" in section(html, "data")
    assert "config was not recorded" in section(html, "config")
    assert svgs(html) == []


def test_forgetting_section_explains_and_flags_a_high_ratio():
    report = realistic_report(forgetting={"corpus_ratio": 1.2, "corpus_name": "wiki.txt"})
    forgetting = section(render_report(report), "forgetting")
    assert "perplexity after / before" in forgetting
    assert "wiki.txt" in forgetting and "n/a" in forgetting  # partial data is fine
    assert "<span class='bad'>1.2</span>" in forgetting
    assert "stroke-dasharray" in forgetting  # the reference line at 1.0


def test_data_lists_show_a_count_and_the_first_few():
    data = section(render_report(realistic_report()), "data")
    assert "7: <code>train.jsonl:3</code>" in data and "and 2 more" in data
    assert "train.jsonl:150" not in data
    assert "31.3% of tokens" in data


@pytest.mark.parametrize(
    "series",
    [
        {},
        {"train": []},
        {"train": [(1, 2.0)]},
        {"train": [(1, 2.0), (2, 2.0), (3, 2.0)]},
        {"train": [(1, float("nan")), (2, None), (3, 1.5), (4, float("inf")), (5, 1.0)]},
        {"train": [(None, 1.0), (float("nan"), 2.0)]},
        {"train": [(0, 1.0), (0, 1.0)], "eval": [(1, 1.0 + 1e-16)]},
    ],
)
@pytest.mark.parametrize("log_y", [False, True])
def test_line_chart_survives_awkward_data(series, log_y):
    svg = line_chart(series, title="t & <t>", x_label="step", y_label="loss", log_y=log_y)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    if not any(
        y is not None and math.isfinite(y) and x is not None and math.isfinite(x)
        for pts in series.values()
        for x, y in pts
    ):
        assert "no data" in svg


def test_line_chart_marks_sparse_series_and_has_a_legend():
    dense = [(s, 1 / s) for s in range(1, 201)]
    root = ET.fromstring(
        line_chart({"train": dense, "eval": dense[::50]}, title="t", x_label="x", y_label="y")
    )
    assert len(root.findall(f".//{SVG}circle")) == 4  # only the sparse series gets markers
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "train" in texts and "eval" in texts


def test_log_axis_skips_non_positive_points():
    root = ET.fromstring(
        line_chart(
            {"a": [(1, 0.0), (2, -1.0), (3, 10.0), (4, 0.1)]},
            title="t",
            x_label="x",
            y_label="y",
            log_y=True,
        )
    )
    assert len(root.findall(f".//{SVG}circle")) == 2
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "0.1" in labels and "10" in labels


def is_round(step: float) -> bool:
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m) for m in (1, 2, 5))


@pytest.mark.parametrize(
    "lo, hi",
    [(0, 1), (1, 120), (0.37, 2.91), (2e-6, 2e-4), (1000, 18398), (-3.2, 4.7), (5, 5), (0, 0)],
)
def test_ticks_are_round_and_cover_the_range(lo, hi):
    ticks = nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    assert 3 <= len(ticks) <= 11
    assert is_round(step)
    assert all(math.isclose(t / step, round(t / step), abs_tol=1e-6) for t in ticks)
    assert ticks[0] <= lo and ticks[-1] >= hi
    assert all(len(format_number(t)) <= 8 for t in ticks)  # no 0.30000000000000004


def test_bar_chart_with_reference_line_and_odd_values():
    root = ET.fromstring(
        bar_chart(
            [("before", 0.05), ("after", None), ("x" * 80, float("nan"))],
            title="acc",
            y_label="acc",
            y_max=1.0,
            reference_line=1.0,
        )
    )
    assert len(root.findall(f".//{SVG}rect[@rx='2']")) == 1  # only the finite bar is drawn
    assert [t.text for t in root.iter(f"{SVG}text")].count("n/a") == 2
    assert "no data" in bar_chart([], title="t", y_label="y")
    ET.fromstring(bar_chart([("a", 0.0), ("b", 0.0)], title="t", y_label="y"))
    ET.fromstring(bar_chart([("a", -2.0)], title="t", y_label="y", y_max=-5))

"""Tiny SVG charts for the run report: pure functions from numbers to an SVG string.

No plotting library: the report must open offline, and a line chart of a loss curve needs
nothing more than axes with round tick values, a polyline per series and a legend.
Points that are None, NaN or infinite (or not positive on a log axis) are skipped.
"""

from __future__ import annotations

import math
from html import escape

# Colour-blind friendly (Tableau 10); series and bars take them in order.
PALETTE = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948")
MARKERS_UP_TO = 40  # a series with this few points gets a dot per point (e.g. eval every N steps)
FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
LEFT, RIGHT, TOP, BOTTOM = 62, 18, 34, 46  # plot margins in pixels


def format_number(value: float) -> str:
    """Short text for a tick or value: 0.25, 1200, 3e-4 (never 0.30000000000000004)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{round(value, 6):g}"


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About `count` round ticks (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi)):  # a constant series still needs a range
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    power = 10 ** math.floor(math.log10((hi - lo) / max(count - 1, 1)))

    def covering(step: float) -> tuple[int, int]:
        return math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)

    def badness(step: float) -> tuple[int, float]:  # tick count off target, then range wasted
        first, last = covering(step)
        return abs(last - first + 1 - count), step * (last - first)

    step = min((m * p for p in (power / 10, power, power * 10) for m in (1, 2, 5)), key=badness)
    digits = max(0, -math.floor(math.log10(step)))
    first, last = covering(step)
    return [round(k * step, digits) + 0.0 for k in range(first, last + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Round ticks inside positive [lo, hi] for a log axis: 1-2-5 per decade, or decades only."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    inside = [m * 10.0**k for k in decades for m in (1, 2, 5)]
    ticks = [t for t in inside if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    if len(ticks) > 8:  # many decades: label powers of ten only, at most about six of them
        ticks = [t for t in ticks if math.log10(t) % 1 == 0]
        ticks = ticks[:: math.ceil(len(ticks) / 6)]
    if len(ticks) < 3:  # less than a decade: linear round ticks read better
        ticks = [t for t in nice_ticks(lo, hi) if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return [float(f"{t:.12g}") for t in ticks]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _svg(width: int, height: int, title: str, body: list[str]) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="{FONT}" font-size="11" '
            f'role="img" aria-label="{escape(title)}">',
            f"<title>{escape(title)}</title>",
            f'<rect width="{width}" height="{height}" fill="#fff"/>',
            f'<text x="{LEFT}" y="20" font-size="14" font-weight="600" fill="#222">'
            f"{escape(title)}</text>",
            *body,
            "</svg>",
        ]
    )


def _no_data(width: int, height: int, title: str) -> str:
    cx, cy = (LEFT + width - RIGHT) / 2, (TOP + height - BOTTOM) / 2
    return _svg(
        width,
        height,
        title,
        [
            f'<rect x="{LEFT}" y="{TOP}" width="{width - LEFT - RIGHT}" '
            f'height="{height - TOP - BOTTOM}" fill="#fafafa" stroke="#ddd"/>',
            f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle" fill="#888" font-size="13">'
            "no data</text>",
        ],
    )


def _y_axis(ticks: list[float], to_y, x0: float, x1: float, label: str, mid_y: float) -> list[str]:
    """Horizontal grid lines with tick labels, and the rotated axis label."""
    parts = []
    for t in ticks:
        y = to_y(t)
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e6e6e6"/>')
        parts.append(
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">'
            f"{format_number(t)}</text>"
        )
    parts.append(
        f'<text x="14" y="{mid_y:.1f}" text-anchor="middle" fill="#333" '
        f'transform="rotate(-90 14 {mid_y:.1f})">{escape(label)}</text>'
    )
    return parts


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 320,
    log_y: bool = False,
) -> str:
    """One line per named series of (x, y) points; a legend when there are several."""
    clean = {
        name: sorted(
            (float(x), float(y))
            for x, y in points
            if _finite(x) and _finite(y) and (y > 0 or not log_y)
        )
        for name, points in series.items()
    }
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    if not xs:
        return _no_data(width, height, title)

    x_ticks = nice_ticks(min(xs), max(xs))
    if log_y:  # the axis spans the data (padded if constant), with round ticks inside it
        spread = 1.05 if max(ys) > min(ys) else 2.0  # a little air above and below the line
        y_min, y_max = min(ys) / spread, max(ys) * spread
        y_ticks = _log_ticks(y_min, y_max)
    else:
        y_ticks = nice_ticks(min(ys), max(ys))
    scale = math.log10 if log_y else (lambda v: v)
    x0, x1, y0, y1 = LEFT, width - RIGHT, height - BOTTOM, TOP  # pixel box; y grows downward
    x_lo, x_hi = x_ticks[0], x_ticks[-1]
    y_lo = scale(min([*y_ticks[:1], *([y_min] if log_y else []), min(ys)]))
    y_hi = scale(max([*y_ticks[-1:], *([y_max] if log_y else []), max(ys)]))

    def to_x(v: float) -> float:
        return x0 + (v - x_lo) / (x_hi - x_lo) * (x1 - x0)

    def to_y(v: float) -> float:
        return y0 - (scale(v) - y_lo) / (y_hi - y_lo) * (y0 - y1)

    body = _y_axis(y_ticks, to_y, x0, x1, y_label, (y0 + y1) / 2)
    for t in x_ticks:
        body.append(
            f'<line x1="{to_x(t):.1f}" y1="{y0}" x2="{to_x(t):.1f}" y2="{y0 + 4}" stroke="#888"/>'
        )
        body.append(
            f'<text x="{to_x(t):.1f}" y="{y0 + 16}" text-anchor="middle" fill="#555">'
            f"{format_number(t)}</text>"
        )
    body.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#888"/>')
    body.append(
        f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 8}" text-anchor="middle" fill="#333">'
        f"{escape(x_label)}</text>"
    )

    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = [(to_x(x), to_y(y)) for x, y in pts]
        if len(coords) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in coords)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8" '
                'stroke-linejoin="round" stroke-linecap="round"/>'
            )
        if len(coords) <= MARKERS_UP_TO:
            for (x, y), (px, py) in zip(pts, coords, strict=True):
                body.append(
                    f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.2" fill="{colour}" stroke="#fff">'
                    f"<title>{escape(name)}: {format_number(x)}, {y:.4g}</title></circle>"
                )

    if len(clean) > 1:  # legend in the top-right corner of the plot, where loss curves are not
        names = [n if clean[n] else f"{n} (no data)" for n in clean]
        box_w = 30 + 6.5 * max(len(n) for n in names)
        bx, by = x1 - box_w - 6, y1 + 6
        body.append(
            f'<rect x="{bx:.1f}" y="{by}" width="{box_w:.1f}" height="{8 + 16 * len(names)}" '
            'fill="#fff" fill-opacity="0.9" stroke="#ddd" rx="3"/>'
        )
        for i, name in enumerate(names):
            ly = by + 14 + 16 * i
            body.append(
                f'<line x1="{bx + 6:.1f}" y1="{ly - 4}" x2="{bx + 22:.1f}" y2="{ly - 4}" '
                f'stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="3"/>'
            )
            body.append(f'<text x="{bx + 27:.1f}" y="{ly}" fill="#333">{escape(name)}</text>')
    return _svg(width, height, title, body)


def bar_chart(
    bars: list[tuple[str, float]],
    *,
    title: str,
    y_label: str,
    width: int = 480,
    height: int = 280,
    y_max: float | None = None,
    reference_line: float | None = None,
    colors: list[str] | None = None,
) -> str:
    """Labelled vertical bars with their values on top; an optional dashed reference line."""
    if not bars:
        return _no_data(width, height, title)
    values = [float(v) for _, v in bars if _finite(v)]
    extra = [reference_line] if _finite(reference_line) else []
    lo = min([0.0, *values, *extra])
    if not _finite(y_max) or y_max <= lo:
        y_max = None
    hi = y_max if y_max is not None else max([0.0, *values, *extra]) * 1.1
    hi = hi if hi > lo else lo + 1.0  # all bars zero: still a readable 0..1 axis
    y_ticks = [t for t in nice_ticks(lo, hi) if y_max is None or t <= y_max]
    x0, x1, y0, y1 = LEFT, width - RIGHT, height - BOTTOM, TOP
    y_lo, y_hi = min(y_ticks[0], lo), max(y_ticks[-1], hi)

    def to_y(v: float) -> float:
        return y0 - (min(max(v, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * (y0 - y1)

    body = _y_axis(y_ticks, to_y, x0, x1, y_label, (y0 + y1) / 2)
    slot = (x1 - x0) / len(bars)
    bar_w = min(90.0, slot * 0.6)
    for i, (label, value) in enumerate(bars):
        cx = x0 + slot * (i + 0.5)
        colour = (colors or PALETTE)[i % len(colors or PALETTE)]
        if _finite(value):
            top, base = to_y(max(value, 0.0)), to_y(min(value, 0.0))
            body.append(
                f'<rect x="{cx - bar_w / 2:.1f}" y="{top:.1f}" width="{bar_w:.1f}" '
                f'height="{max(base - top, 0.5):.1f}" fill="{colour}" rx="2">'
                f"<title>{escape(label)}: {value:.4g}</title></rect>"
            )
            text = f"{value:.3g}"
        else:
            top, text = to_y(0.0), "n/a"
        body.append(
            f'<text x="{cx:.1f}" y="{top - 5:.1f}" text-anchor="middle" fill="#222" '
            f'font-weight="600">{text}</text>'
        )
        max_chars = max(int(slot / 6.5), 4)
        shown = label if len(label) <= max_chars else label[: max_chars - 1] + "…"
        body.append(
            f'<text x="{cx:.1f}" y="{y0 + 16}" text-anchor="middle" fill="#333">'
            f"<title>{escape(label)}</title>{escape(shown)}</text>"
        )
    body.append(
        f'<line x1="{x0}" y1="{to_y(0.0):.1f}" x2="{x1}" y2="{to_y(0.0):.1f}" stroke="#888"/>'
    )
    if extra:
        ry = to_y(reference_line)
        body.append(
            f'<line x1="{x0}" y1="{ry:.1f}" x2="{x1}" y2="{ry:.1f}" stroke="#333" '
            'stroke-width="1.2" stroke-dasharray="5 4"/>'
        )
        body.append(
            f'<text x="{x1}" y="{ry - 4:.1f}" text-anchor="end" fill="#333">'
            f"{format_number(reference_line)}</text>"
        )
    return _svg(width, height, title, body)

"""The console's HTML: a page frame, tables, forms and server-drawn SVG charts.

Plain functions from values to escaped strings. Nothing here runs in the
browser: no script, no inline style (the Content-Security-Policy forbids
both); charts are SVG drawn here with presentation attributes, so every
page, charts included, works with JavaScript off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from html import escape
from typing import Any
from urllib.parse import urlencode

import orjson

NAV = (
    ("/ui", "Overview"),
    ("/ui/report", "Report"),
    ("/ui/failed", "Manual queue"),
    ("/ui/jobs", "Jobs"),
    ("/ui/task", "Task lookup"),
    ("/docs", "API reference"),
)


ON = ' class="on"'


def e(value: Any) -> str:
    """Escaped text of any value; None reads as an em dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, datetime):
        return escape(value.strftime("%Y-%m-%d %H:%M:%S UTC"))
    return escape(str(value))


def url(path: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return escape(f"{path}?{query}" if query else path)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2014"
    s = int(abs(seconds))
    if s < 120:
        text = f"{s} s"
    elif s < 7200:
        text = f"{s // 60} min"
    elif s < 172800:
        text = f"{s // 3600} h {s % 3600 // 60:02d} min"
    else:
        text = f"{s // 86400} d {s % 86400 // 3600} h"
    return ("-" if seconds < 0 else "") + text


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(token)}">'


def frame(
    title: str,
    body: str,
    *,
    viewer: str | None = None,
    csrf: str | None = None,
    active: str = "",
    jobs: bool = True,
) -> str:
    links = "".join(
        f'<a href="{href}"{ON if href == active else ""}>{escape(name)}</a>'
        for href, name in NAV
        if jobs or href != "/ui/jobs"
    )
    who = ""
    if viewer is not None:
        who = f'<span class="who">{e(viewer)}</span>'
        if csrf is not None:
            who += (
                f'<form method="post" action="/ui/logout" class="inline">{csrf_field(csrf)}'
                '<button type="submit">Log out</button></form>'
            )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>batchd \u00b7 {escape(title)}</title>"
        '<link rel="stylesheet" href="/ui/static/console.css">'
        '<link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml">'
        "</head><body>"
        f"<header><strong>batchd</strong><nav>{links}</nav>{who}</header>"
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def table(
    heads: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    cls: str = "",
    empty: str = "nothing here",
) -> str:
    """Cells are HTML already (escape with ``e``)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(heads)}" class="empty">{escape(empty)}</td></tr>'
    head = "".join(f"<th>{escape(h)}</th>" for h in heads)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def pairs(items: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are HTML already."""
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def json_block(value: Any) -> str:
    if value is None:
        return "\u2014"
    return f"<pre>{escape(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())}</pre>"


def money(value: Any) -> str:
    if value is None:
        return "\u2014"
    return e(f"${Decimal(value).quantize(Decimal('0.000001'))}")


def percent(ratio: float) -> str:
    return f"{ratio * 100:.2f}%"


def error_code(last_error: Any) -> str:
    if isinstance(last_error, dict):
        return str(last_error.get("code") or last_error.get("type") or "")
    return ""


def error_message(last_error: Any) -> str:
    if isinstance(last_error, dict):
        return str(last_error.get("message") or "")[:300]
    return ""


# -------------------------------------------------------------------- charts

_W, _H, _L, _R, _T, _B = 760, 220, 64, 16, 28, 34
_COLORS = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#dc2626")


def _scale(top: float) -> float:
    return top if top > 0 else 1.0


def _frame_svg(title: str, labels: Sequence[str], top: float, fmt: str) -> list[str]:
    inner_h = _H - _T - _B
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" role="img" '
        f'class="chart" aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<text x="{_L}" y="16" font-size="13" font-weight="bold" fill="#111">'
        f"{escape(title)}</text>",
    ]
    for i in range(5):
        value = top * i / 4
        y = _T + inner_h - inner_h * i / 4
        out.append(f'<line x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(
            f'<text x="{_L - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end" '
            f'fill="#555">{escape(axis_label(fmt, value, top))}</text>'
        )
    step = max(1, len(labels) // 6)
    for i, label in enumerate(labels):
        if i % step == 0 or i == len(labels) - 1:
            x = _x(i, len(labels))
            out.append(
                f'<text x="{x:.1f}" y="{_H - 12}" font-size="10" text-anchor="middle" '
                f'fill="#555">{escape(label[5:])}</text>'
            )
    return out


def axis_label(fmt: str, value: float, top: float) -> str:
    """``fmt`` of the value; dollars get as many decimals as the scale needs,
    so a day of cents does not read $0.00 on every line."""
    if fmt.startswith("$"):
        decimals = 2 if top >= 1 else 4 if top >= 0.01 else 6
        return f"${value:.{decimals}f}"
    return fmt.format(value)


def _x(i: int, n: int) -> float:
    inner_w = _W - _L - _R
    return _L + inner_w * (i + 0.5) / max(n, 1)


def _y(value: float, top: float) -> float:
    inner_h = _H - _T - _B
    return _T + inner_h - inner_h * min(value, top) / top


def _legend(names: Sequence[str], colors: Sequence[str]) -> str:
    out, x = [], _W - _R
    for name, color in reversed(list(zip(names, colors, strict=True))):
        x -= 24 + 7 * len(name)
        out.append(
            f'<rect x="{x}" y="7" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14}" y="16" font-size="11" fill="#333">{escape(name)}</text>'
        )
    return "".join(out)


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    fmt: str = "{:.2f}",
    threshold: tuple[float, str] | None = None,
) -> str:
    """One polyline per series over the days, optionally a dashed threshold."""
    top = max([v for _, vals in series for v in vals] + [threshold[0] * 1.25 if threshold else 0])
    top = _scale(top * 1.1)
    out = _frame_svg(title, labels, top, fmt)
    colors = _COLORS[: len(series)]
    if threshold is not None:
        y = _y(threshold[0], top)
        out.append(
            f'<line x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#dc2626" '
            'stroke-dasharray="6 4" class="threshold"/>'
        )
        out.append(
            f'<text x="{_W - _R - 4}" y="{y - 4:.1f}" font-size="10" text-anchor="end" '
            f'fill="#dc2626">{escape(threshold[1])}</text>'
        )
    for (name, values), color in zip(series, colors, strict=True):
        points = " ".join(
            f"{_x(i, len(values)):.1f},{_y(v, top):.1f}" for i, v in enumerate(values)
        )
        out.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}">'
            f"<title>{escape(name)}</title></polyline>"
        )
        for i, v in enumerate(values):
            out.append(
                f'<circle cx="{_x(i, len(values)):.1f}" cy="{_y(v, top):.1f}" r="2.5" '
                f'fill="{color}"><title>{escape(labels[i])} {escape(name)}: '
                f"{escape(axis_label(fmt, v, 0))}</title></circle>"
            )
    out.append(_legend([n for n, _ in series], colors))
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    fmt: str = "{:.0f}",
) -> str:
    """Stacked bars per day, one colour per series."""
    totals = [sum(vals[i] for _, vals in series) for i in range(len(labels))]
    top = _scale(max([*totals, 0]) * 1.1)
    out = _frame_svg(title, labels, top, fmt)
    colors = _COLORS[: len(series)]
    width = max(2.0, (_W - _L - _R) / max(len(labels), 1) * 0.7)
    for i, label in enumerate(labels):
        base = 0.0
        for (name, values), color in zip(series, colors, strict=True):
            v = values[i]
            if v <= 0:
                continue
            y_top, y_base = _y(base + v, top), _y(base, top)
            out.append(
                f'<rect x="{_x(i, len(labels)) - width / 2:.1f}" y="{y_top:.1f}" '
                f'width="{width:.1f}" height="{max(y_base - y_top, 0.5):.1f}" '
                f'fill="{color}"><title>{escape(label)} {escape(name)}: '
                f"{escape(axis_label(fmt, v, 0))}</title></rect>"
            )
            base += v
    out.append(_legend([n for n, _ in series], colors))
    out.append("</svg>")
    return "".join(out)

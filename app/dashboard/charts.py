"""Server-side SVG charts: stacked daily bars and budget gauges.

Drawn as markup on the server so the pages need no JavaScript and no charting library; every
bar carries a ``<title>`` with its exact amount, and every label is an amount formatted from
integer micro-dollars (never a float that could drift). Colours are SVG attributes, not inline
styles, so the pages keep a strict Content-Security-Policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from markupsafe import Markup, escape

from app.money import format_usd

# Colour-blind friendly (Okabe-Ito), then a grey for "other".
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
OTHER_COLOUR = "#999999"
OTHER = "other"

_WIDTH, _HEIGHT = 760, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 84, 12, 12, 28


@dataclass(frozen=True)
class Series:
    """One stacked layer: a name, its colour and micro-dollars per day."""

    name: str
    colour: str
    by_day: Mapping[date, int]

    @property
    def total(self) -> int:
        return sum(self.by_day.values())


def top_series(
    by_name: Mapping[str, Mapping[date, int]], limit: int = len(PALETTE)
) -> list[Series]:
    """The ``limit`` largest layers by total, the rest folded into one grey ``other`` layer."""
    ranked = sorted(by_name.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    series = [
        Series(name, PALETTE[i % len(PALETTE)], dict(days))
        for i, (name, days) in enumerate(ranked[:limit])
    ]
    rest: dict[date, int] = {}
    for _, days in ranked[limit:]:
        for day, micro in days.items():
            rest[day] = rest.get(day, 0) + micro
    if rest:
        series.append(Series(OTHER, OTHER_COLOUR, rest))
    return series


def _nice_ceiling(micro: int) -> int:
    """The smallest 1, 2 or 5 times 10^n micro-dollars that is at least ``micro`` (axis top)."""
    if micro <= 0:
        return 1
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= micro:
                return step * factor
        step *= 10


def stacked_bars(days: Sequence[date], series: Sequence[Series], *, label: str) -> Markup:
    """A bar per day, one stacked segment per series; the y axis in USD from micro-dollars."""
    totals = [sum(s.by_day.get(day, 0) for s in series) for day in days]
    top = _nice_ceiling(max(totals, default=0))
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.72, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(label)}</title>",
    ]
    for i in range(5):
        value = top * i // 4
        y = _TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{format_usd(value)}</text>"
        )
    label_every = max(1, len(days) // 6)
    for index, day in enumerate(days):
        x = _LEFT + slot * index + (slot - bar_w) / 2
        base = float(_TOP + plot_h)
        for layer in series:
            micro = layer.by_day.get(day, 0)
            if micro <= 0:
                continue
            height = max(plot_h * micro / top, 1.0)
            base -= height
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
                f'fill="{layer.colour}"><title>{day.isoformat()} · {escape(layer.name)}: '
                f"{format_usd(micro)} USD</title></rect>"
            )
        if (len(days) - 1 - index) % label_every == 0:
            parts.append(
                f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{_HEIGHT - 8}" '
                f'text-anchor="middle">{day.strftime("%m-%d")}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def swatch(colour: str) -> Markup:
    """A small coloured square for a legend (an SVG, since inline styles are not allowed)."""
    return Markup(
        '<svg class="swatch" viewBox="0 0 10 10" width="10" height="10" aria-hidden="true">'
        f'<rect width="10" height="10" fill="{escape(colour)}"/></svg>'
    )


def gauge(used: int, total: int | None, *, label: str) -> Markup:
    """A horizontal bar: ``used`` of ``total`` micro-dollars (empty outline when unlimited)."""
    width = 200
    filled = 0.0 if not total else min(used / total, 1.0) * width
    colour = "#009E73" if filled < width * 0.8 else ("#E69F00" if filled < width else "#D55E00")
    return Markup(
        f'<svg class="gauge" viewBox="0 0 {width} 12" width="{width}" height="12" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title>"
        f'<rect class="gauge-track" width="{width}" height="12" rx="3"/>'
        f'<rect width="{filled:.1f}" height="12" rx="3" fill="{colour}"/></svg>'
    )

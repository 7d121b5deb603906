"""Charts as self-contained inline SVG strings, for the Flyte UI's Decks.

Hand-written SVG rather than matplotlib: a few hundred bytes to a few tens of kilobytes per chart,
no dependency in either image, and nothing a browser has to fetch (no script, stylesheet or font;
text uses the viewer's own sans-serif). Every chart is one `<svg class="flytetune-plot">` element
whose `data-plot` attribute names its kind; every drawn mark (line, point, bar, cell) carries a
`<title>` with its exact value, shown as a tooltip on hover.

Charts take plain numbers and names, no flytekit and no numpy types required, so a notebook can
show the same pictures (`IPython.display.SVG(line_chart(...))`).
"""

import html
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

# Tableau 10: distinct for the common forms of colour blindness, readable on white.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
# A second colour for a highlighted bin (truncated rows) and the heatmap's scale (white to dark blue).
HIGHLIGHT = "#e15759"
_HEAT_LOW, _HEAT_HIGH = (247, 251, 255), (8, 48, 107)
INK, GRID, MUTED = "#333333", "#e3e3e3", "#777777"
WIDTH = 720  # px; the Deck pane of the Flyte UI is about this wide next to the node list
FONT_PX = 12
_CHAR_PX = 6.6  # mean width of a character at FONT_PX in a sans-serif, to size label margins
# Above this many classes a confusion matrix is unreadable: the most frequent confusions are shown instead.
HEATMAP_MAX_CLASSES = 30


Points = Sequence[tuple[float, float]]


def line_chart(series: Mapping[str, Points], *, title: str, x_label: str, y_label: str = "",
               secondary: Mapping[str, Points] | None = None, secondary_label: str = "",
               width: int = WIDTH, height: int = 300) -> str:
    """Lines of (x, y) points, e.g. loss per step; `secondary` series (dashed) use a right-hand axis
    of their own, e.g. the learning rate next to the loss. Non-finite values are left out."""
    secondary = secondary or {}
    left = {name: _finite(points) for name, points in series.items()}
    right = {name: _finite(points) for name, points in secondary.items()}
    drawn = [p for points in (*left.values(), *right.values()) for p in points]
    margin = _Margin(top=46, right=64 if right else 20, bottom=44, left=64)
    plot = _Plot(width, height, margin)
    if not drawn:
        return _svg("line", title, width, height, plot.frame() + _no_data(plot))
    x_ticks = _ticks(min(x for x, _ in drawn), max(x for x, _ in drawn))
    y_ticks = _ticks(*_span(y for points in left.values() for _, y in points))
    parts = [plot.frame(), plot.x_axis(x_ticks, x_label), plot.y_axis(y_ticks, y_label)]
    y2_ticks = None
    if right:
        y2_ticks = _ticks(*_span(y for points in right.values() for _, y in points))
        parts.append(plot.y_axis(y2_ticks, secondary_label, side="right"))
    legend = []
    lines = [(name, points, False) for name, points in left.items()]
    lines += [(name, points, True) for name, points in right.items()]
    for i, (name, points, dashed) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]
        ticks = y2_ticks if dashed else y_ticks
        xy = [(plot.x(x, x_ticks), plot.y(y, ticks)) for x, y in points]
        dash = ' stroke-dasharray="6 3"' if dashed else ""
        if len(xy) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in xy)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}>'
                         f"<title>{_esc(name)}</title></polyline>")
        if len(xy) <= 40:  # few points: mark each, so that a single point is visible at all
            parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}">'
                      f"<title>{_esc(name)} at {_num(x)}: {_num(y)}</title></circle>"
                      for (px, py), (x, y) in zip(xy, points, strict=True)]
        legend.append((name, color, dashed))
    parts.append(_legend(legend, margin.left, 34))
    return _svg("line", title, width, height, "".join(parts))


def bar_chart(categories: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str,
              value_label: str = "", value_max: float | None = None, max_categories: int = 40,
              width: int = WIDTH) -> str:
    """Horizontal bars, one row per category and one bar per series in it (grouped), e.g. rows per
    label and split, or precision/recall/F1 per class. Categories beyond `max_categories` are left
    out with a note (the caller orders them: largest or worst first). `value_max` fixes the scale
    (1.0 for scores)."""
    names = list(series)
    shown = list(categories)[:max_categories]
    hidden = len(categories) - len(shown)
    values = {name: [float(v) for v in series[name][:len(shown)]] for name in names}
    bar_px, gap_px = (12 if len(names) == 1 else 8), 8
    row_px = bar_px * len(names) + gap_px
    label_px = min(240, max(60, int(max((len(_short(c)) for c in shown), default=4) * _CHAR_PX) + 12))
    legend_px = 18 if len(names) > 1 else 0
    margin = _Margin(top=34 + legend_px + 18, right=56, bottom=18 + (16 if hidden else 0), left=label_px)
    height = margin.top + max(1, len(shown)) * row_px + margin.bottom
    plot = _Plot(width, height, margin)
    finite = [v for vs in values.values() for v in vs if math.isfinite(v)]
    if not shown or not finite:
        return _svg("bar", title, width, height, plot.frame() + _no_data(plot))
    top = value_max if value_max is not None else max(max(finite), 0.0)
    ticks = _ticks(min(0.0, min(finite)), top)
    parts = [plot.frame(), plot.x_axis(ticks, value_label, side="top")]
    zero = plot.x(0.0, ticks)
    for row, category in enumerate(shown):
        y0 = margin.top + row * row_px + gap_px / 2
        parts.append(f'<text x="{margin.left - 6}" y="{y0 + bar_px * len(names) / 2 + 4:.1f}" text-anchor="end" '
                     f'fill="{INK}">{_esc(_short(category))}<title>{_esc(category)}</title></text>')
        for j, name in enumerate(names):
            value = values[name][row]
            if not math.isfinite(value):
                continue
            x1 = plot.x(value, ticks)
            tip = f"{category}: {value:g}" if len(names) == 1 else f"{category}, {name}: {value:g}"
            parts.append(f'<rect x="{min(zero, x1):.1f}" y="{y0 + j * bar_px:.1f}" width="{abs(x1 - zero):.1f}" '
                         f'height="{bar_px - 1}" fill="{PALETTE[j % len(PALETTE)]}"><title>{_esc(tip)}</title></rect>')
            if len(names) == 1:
                parts.append(f'<text x="{max(zero, x1) + 4:.1f}" y="{y0 + bar_px - 2:.1f}" fill="{MUTED}" '
                             f'font-size="10">{_num(value)}</text>')
    if len(names) > 1:
        parts.append(_legend([(name, PALETTE[j % len(PALETTE)], False) for j, name in enumerate(names)],
                             margin.left, 34))
    if hidden:
        parts.append(f'<text x="{margin.left}" y="{height - 6}" fill="{MUTED}">{hidden} more not shown</text>')
    return _svg("bar", title, width, height, "".join(parts))


def histogram(edges: Sequence[float], counts: Sequence[int], *, title: str, x_label: str, y_label: str = "rows",
              highlight_last: str = "", width: int = WIDTH, height: int = 260) -> str:
    """Vertical bars over bins [edges[i], edges[i+1]) with precomputed `counts` (len(edges) - 1 of them).
    `highlight_last` colours the last bin and names it in a legend (e.g. rows cut at max_length)."""
    if len(edges) != len(counts) + 1:
        raise ValueError(f"histogram: {len(edges)} edges for {len(counts)} counts; need one edge more than counts")
    margin = _Margin(top=46 if highlight_last else 34, right=20, bottom=44, left=64)
    plot = _Plot(width, height, margin)
    if not counts or sum(counts) == 0:
        return _svg("histogram", title, width, height, plot.frame() + _no_data(plot))
    x_ticks = _ticks(edges[0], edges[-1])
    y_ticks = _ticks(0, max(counts))
    parts = [plot.frame(), plot.x_axis(x_ticks, x_label), plot.y_axis(y_ticks, y_label)]
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        x0, x1 = plot.x(edges[i], x_ticks), plot.x(edges[i + 1], x_ticks)
        y = plot.y(count, y_ticks)
        color = HIGHLIGHT if highlight_last and i == len(counts) - 1 else PALETTE[0]
        parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(1.0, x1 - x0 - 1):.1f}" '
                     f'height="{plot.bottom - y:.1f}" fill="{color}">'
                     f"<title>{_num(edges[i])} to {_num(edges[i + 1])}: {count}</title></rect>")
    if highlight_last:
        parts.append(_legend([(highlight_last, HIGHLIGHT, False)], margin.left, 34))
    return _svg("histogram", title, width, height, "".join(parts))


def heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str], *,
            title: str, row_title: str = "true", col_title: str = "predicted", width: int = WIDTH) -> str:
    """A matrix of counts as coloured cells, shaded by each cell's share of its row (a confusion
    matrix: the share of a true class given each prediction), with the count written in cells big enough."""
    n_rows, n_cols = len(row_labels), len(col_labels)
    label_px = min(200, max(60, int(max((len(_short(c)) for c in row_labels), default=4) * _CHAR_PX) + 12))
    col_label_px = min(150, max(40, int(max((len(_short(c)) for c in col_labels), default=4) * _CHAR_PX * 0.75)))
    cell = max(8.0, min(30.0, (width - label_px - 30) / max(1, n_cols)))
    margin = _Margin(top=34 + 18 + col_label_px, right=30, bottom=12, left=label_px)
    height = int(margin.top + cell * n_rows + margin.bottom)
    width = int(min(width, margin.left + cell * n_cols + margin.right))
    parts = [f'<text x="{margin.left + cell * n_cols / 2:.1f}" y="{34 + 12}" text-anchor="middle" '
             f'fill="{MUTED}">{_esc(col_title)} →</text>',
             f'<text x="12" y="{margin.top - 6}" fill="{MUTED}">{_esc(row_title)} ↓</text>']
    show_numbers = cell >= 18
    for j, label in enumerate(col_labels):
        cx = margin.left + (j + 0.5) * cell
        parts.append(f'<text transform="translate({cx + 4:.1f},{margin.top - 4}) rotate(-60)" fill="{INK}" '
                     f'font-size="11">{_esc(_short(label, 22))}<title>{_esc(label)}</title></text>')
    for i, (label, row) in enumerate(zip(row_labels, matrix, strict=True)):
        y = margin.top + i * cell
        parts.append(f'<text x="{margin.left - 6}" y="{y + cell / 2 + 4:.1f}" text-anchor="end" fill="{INK}">'
                     f"{_esc(_short(label))}<title>{_esc(label)}</title></text>")
        total = sum(row)
        for j, value in enumerate(row):
            share = value / total if total else 0.0
            x = margin.left + j * cell
            fill = _heat(share) if value else "#ffffff"
            tip = f"{label} → {col_labels[j]}: {_num(value)}" + (f" ({share:.0%} of {label})" if total else "")
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" fill="{fill}" '
                         f'stroke="{GRID}" stroke-width="0.5"><title>{_esc(tip)}</title></rect>')
            if show_numbers and value:
                ink = "#ffffff" if share > 0.5 else INK
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" '
                             f'font-size="10" fill="{ink}">{_num(value)}</text>')
    return _svg("heatmap", title, width, height, "".join(parts))


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], *,
                     max_classes: int = HEATMAP_MAX_CLASSES, top_n: int = 20) -> str:
    """The confusion matrix (rows: true label) as a heatmap; above `max_classes` classes the `top_n`
    most frequent confusions as bars instead."""
    if len(labels) <= max_classes:
        return heatmap(matrix, labels, labels, title="Confusion matrix (rows: true label, shaded by share of the row)")
    cells = [(labels[i], labels[j], count) for i, row in enumerate(matrix) for j, count in enumerate(row)
             if i != j and count]
    cells.sort(key=lambda c: (-c[2], c[0], c[1]))
    return top_confusions(cells[:top_n], classes=len(labels))


def top_confusions(cells: Sequence[tuple[str, str, int]], *, classes: int) -> str:
    """The most frequent mistakes, (true, predicted, count), most frequent first, as bars."""
    return bar_chart([f"{true} → {predicted}" for true, predicted, _ in cells],
                     {"rows": [count for _, _, count in cells]},
                     title=f"Most frequent confusions, true → predicted ({classes} classes: too many for a matrix)",
                     value_label="test rows")


class Span(NamedTuple):
    """One row of a timeline: a bar from `start` to `end`, coloured by `kind` (named in the legend),
    with point `marks` on it, each (x, tooltip)."""
    label: str
    start: float
    end: float
    kind: str
    tooltip: str
    marks: Sequence[tuple[float, str]] = ()


def timeline(spans: Sequence[Span], *, title: str, x_label: str, mark_label: str = "",
             width: int = WIDTH) -> str:
    """Horizontal bars on a shared time axis, one row per span (e.g. the attempts of a training run,
    with their checkpoints as `marks`, named `mark_label` in the legend)."""
    kinds = list(dict.fromkeys(span.kind for span in spans))
    colors = {kind: PALETTE[i % len(PALETTE)] for i, kind in enumerate(kinds)}
    row_px, bar_px = 28, 16
    label_px = min(240, max(60, int(max((len(_short(s.label)) for s in spans), default=4) * _CHAR_PX) + 12))
    margin = _Margin(top=52, right=24, bottom=44, left=label_px)
    height = int(margin.top + max(1, len(spans)) * row_px + margin.bottom)
    plot = _Plot(width, height, margin)
    if not spans:
        return _svg("timeline", title, width, height, plot.frame() + _no_data(plot))
    ticks = _ticks(min(0.0, min(s.start for s in spans)), max(s.end for s in spans))
    parts = [plot.frame(), plot.x_axis(ticks, x_label)]
    for row, span in enumerate(spans):
        y = margin.top + row * row_px + (row_px - bar_px) / 2
        x0, x1 = plot.x(span.start, ticks), plot.x(span.end, ticks)
        parts.append(f'<text x="{margin.left - 6}" y="{y + bar_px / 2 + 4:.1f}" text-anchor="end" fill="{INK}">'
                     f"{_esc(_short(span.label))}<title>{_esc(span.label)}</title></text>")
        # At least 3 px: an attempt that ended at once is still visible.
        parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(3.0, x1 - x0):.1f}" height="{bar_px}" '
                     f'fill="{colors[span.kind]}"><title>{_esc(span.tooltip)}</title></rect>')
        parts += [f'<circle cx="{plot.x(x, ticks):.1f}" cy="{y + bar_px / 2:.1f}" r="4" fill="{INK}" '
                  f'stroke="#ffffff"><title>{_esc(tip)}</title></circle>' for x, tip in span.marks]
    legend = [(kind, colors[kind], False) for kind in kinds]
    legend_svg = _legend(legend, margin.left, 38)
    if mark_label and any(span.marks for span in spans):
        x = margin.left + sum(24 + len(kind) * _CHAR_PX + 18 for kind in kinds)
        legend_svg += (f'<g class="legend"><circle cx="{x + 9:.1f}" cy="34" r="4" fill="{INK}"/>'
                       f'<text x="{x + 24:.1f}" y="38" fill="{INK}">{_esc(mark_label)}</text></g>')
    parts.append(legend_svg)
    return _svg("timeline", title, width, height, "".join(parts))


# --- drawing helpers ----------------------------------------------------------------------------------------------


class _Margin:
    def __init__(self, top: float, right: float, bottom: float, left: float):
        self.top, self.right, self.bottom, self.left = top, right, bottom, left


class _Plot:
    """The plotting area inside the margins, and the mapping of values to pixels."""

    def __init__(self, width: int, height: int, margin: _Margin):
        self.left, self.right = margin.left, width - margin.right
        self.top, self.bottom = margin.top, height - margin.bottom

    def x(self, value: float, ticks: list[float]) -> float:
        return self.left + (value - ticks[0]) / (ticks[-1] - ticks[0]) * (self.right - self.left)

    def y(self, value: float, ticks: list[float]) -> float:
        return self.bottom - (value - ticks[0]) / (ticks[-1] - ticks[0]) * (self.bottom - self.top)

    def frame(self) -> str:
        return (f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
                f'height="{self.bottom - self.top}" fill="none" stroke="{GRID}"/>')

    def x_axis(self, ticks: list[float], label: str, side: str = "bottom") -> str:
        y = self.bottom if side == "bottom" else self.top
        text_y = y + 16 if side == "bottom" else y - 6
        out = []
        for t in ticks:
            x = self.x(t, ticks)
            out.append(f'<line x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" y2="{self.bottom}" stroke="{GRID}"/>')
            out.append(f'<text x="{x:.1f}" y="{text_y}" text-anchor="middle" fill="{MUTED}" font-size="11">'
                       f"{_num(t)}</text>")
        if label:
            label_y = y + 34 if side == "bottom" else y - 20
            anchor_x = (self.left + self.right) / 2 if side == "bottom" else self.right
            anchor = "middle" if side == "bottom" else "end"
            out.append(f'<text x="{anchor_x:.1f}" y="{label_y}" text-anchor="{anchor}" fill="{MUTED}">'
                       f"{_esc(label)}</text>")
        return "".join(out)

    def y_axis(self, ticks: list[float], label: str, side: str = "left") -> str:
        x = self.left if side == "left" else self.right
        out = []
        for t in ticks:
            y = self.y(t, ticks)
            if side == "left":
                out.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}" stroke="{GRID}"/>')
            anchor, text_x = ("end", x - 6) if side == "left" else ("start", x + 6)
            out.append(f'<text x="{text_x}" y="{y + 4:.1f}" text-anchor="{anchor}" fill="{MUTED}" font-size="11">'
                       f"{_num(t)}</text>")
        if label:
            text_x = 14 if side == "left" else x + 56
            mid = (self.top + self.bottom) / 2
            out.append(f'<text transform="translate({text_x},{mid:.1f}) rotate(-90)" text-anchor="middle" '
                       f'fill="{MUTED}">{_esc(label)}</text>')
        return "".join(out)


def _svg(kind: str, title: str, width: int, height: int, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="flytetune-plot" data-plot="{kind}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_esc(title)}" font-family="Helvetica, Arial, sans-serif" font-size="{FONT_PX}" '
            f'style="display:block;margin:8px 0;background:#fff">'
            f'<text x="8" y="20" font-size="14" font-weight="bold" fill="{INK}">{_esc(title)}</text>{body}</svg>')


def _no_data(plot: _Plot) -> str:
    return (f'<text x="{(plot.left + plot.right) / 2:.1f}" y="{(plot.top + plot.bottom) / 2:.1f}" '
            f'text-anchor="middle" fill="{MUTED}">no data</text>')


def _legend(entries: list[tuple[str, str, bool]], x: float, y: float) -> str:
    out = ['<g class="legend">']
    for name, color, dashed in entries:
        dash = ' stroke-dasharray="6 3"' if dashed else ""
        out.append(f'<line x1="{x:.1f}" y1="{y - 4}" x2="{x + 18:.1f}" y2="{y - 4}" stroke="{color}" '
                   f'stroke-width="6"{dash}/>')
        out.append(f'<text x="{x + 24:.1f}" y="{y}" fill="{INK}">{_esc(name)}</text>')
        x += 24 + len(name) * _CHAR_PX + 18
    return "".join(out) + "</g>"


def _ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite, got {lo}..{hi}")
    if hi <= lo:  # one value: a range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 2.5, 5, 10) if s * power >= raw)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(start, stop + 1)]


def _span(values) -> tuple[float, float]:
    values = list(values)
    return (min(values), max(values)) if values else (0.0, 1.0)


def _finite(points: Points) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _heat(share: float) -> str:
    # A floor of 0.15 keeps a single confusion visibly blue, not lost next to white empty cells.
    t = 0.15 + 0.85 * min(1.0, max(0.0, share))
    r, g, b = (round(lo + (hi - lo) * t) for lo, hi in zip(_HEAT_LOW, _HEAT_HIGH, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _num(value: float) -> str:
    value = float(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _short(text: str, limit: int = 32) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)

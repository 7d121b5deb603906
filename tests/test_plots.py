"""flytetune.plots: each chart is one self-contained SVG element whose marks sit where the numbers say.
What a browser makes of them is tests/test_decks_browser.py."""

import math
import re
import xml.etree.ElementTree as ET

import pytest

from flytetune import plots

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg" and root.get("class") == "flytetune-plot"
    return root


def marks(root: ET.Element, tag: str) -> list[ET.Element]:
    """Drawn marks: elements of `tag` that carry a tooltip (axes, grid and legends carry none)."""
    return [e for e in root.iter(f"{SVG}{tag}") if e.find(f"{SVG}title") is not None]


def every_chart() -> dict[str, str]:
    return {
        "line": plots.line_chart({"loss": [(1, 2.5), (2, 2.1), (3, 1.7)]}, title="t", x_label="step",
                                 secondary={"lr": [(1, 2e-4), (2, 1e-4), (3, 0.0)]}, secondary_label="lr"),
        "bar": plots.bar_chart(["a", "b"], {"train": [3, 1], "test": [1, 0]}, title="t"),
        "histogram": plots.histogram([0, 4, 8, 9], [5, 2, 1], title="t", x_label="tokens", highlight_last="cut"),
        "heatmap": plots.confusion_matrix([[3, 1], [0, 2]], ["a", "b"]),
        "timeline": plots.timeline([plots.Span("attempt 1", 0, 13, "preempted", "first", [(10, "ckpt")])],
                                   title="t", x_label="minutes", mark_label="checkpoint"),
    }


@pytest.mark.parametrize("kind", ["line", "bar", "histogram", "heatmap", "timeline"])
def test_every_chart_is_one_svg_that_fetches_nothing(kind):
    svg = every_chart()[kind]
    root = parse(svg)
    assert root.get("data-plot") == kind
    # Nothing for a browser to load: no links, scripts, styles, fonts or embedded documents.
    assert not re.search(r"\b(href|src)\s*=|url\(|@import|<script|<style|<link|<image|<foreignObject", svg)
    assert not [e for e in root.iter() if any("href" in name for name in e.attrib)]
    assert re.findall(r"https?://[^\"']+", svg) == ["http://www.w3.org/2000/svg"], "the namespace only"


def test_line_chart_places_points_and_leaves_out_non_finite_ones():
    svg = plots.line_chart({"loss": [(0, 0.0), (5, float("nan")), (10, 1.0)]}, title="loss", x_label="step",
                           width=400, height=200)
    root = parse(svg)
    (line,) = marks(root, "polyline")
    points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(points) == 2, "the NaN point is left out"
    (x0, y0), (x1, y1) = points
    assert x1 > x0 and y1 < y0, "right and up: larger x, larger y"
    assert [c.find(f"{SVG}title").text for c in marks(root, "circle")] == ["loss at 0: 0", "loss at 10: 1"]


def test_line_chart_puts_secondary_series_on_their_own_dashed_axis():
    root = parse(every_chart()["line"])
    loss, lr = marks(root, "polyline")
    assert loss.get("stroke-dasharray") is None and lr.get("stroke-dasharray") == "6 3"
    # Both span the plot's height, each on its own scale: loss 1.7..2.5 and lr 0..2e-4.
    heights = [max(ys) - min(ys) for ys in ([float(p.split(",")[1]) for p in line.get("points").split()]
                                            for line in (loss, lr))]
    assert min(heights) > 0.5 * max(heights)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "2.0e-04" in texts and "lr" in texts, "right-hand axis ticks and label"


def test_bar_lengths_are_proportional_and_extra_categories_are_named():
    root = parse(plots.bar_chart([f"c{i}" for i in range(45)], {"n": [90 - i for i in range(45)]}, title="t"))
    bars = marks(root, "rect")
    assert len(bars) == 40, "max_categories"
    widths = [float(b.get("width")) for b in bars]
    assert widths[0] / widths[-1] == pytest.approx(90 / 51, rel=0.01)
    assert "5 more not shown" in [t.text for t in root.iter(f"{SVG}text")]


def test_scores_use_a_fixed_scale():
    root = parse(plots.bar_chart(["a"], {"f1": [0.5]}, title="t", value_max=1.0, width=500))
    (bar,) = marks(root, "rect")
    ticks = [t for t in root.iter(f"{SVG}line")]
    x_of = {float(t.get("x1")) for t in ticks}
    assert float(bar.get("width")) == pytest.approx((max(x_of) - min(x_of)) / 2, abs=0.2), "0.5 is half of 0..1"


def test_histogram_highlights_the_last_bin_and_checks_its_input():
    root = parse(every_chart()["histogram"])
    bars = marks(root, "rect")
    assert [b.find(f"{SVG}title").text for b in bars] == ["0 to 4: 5", "4 to 8: 2", "8 to 9: 1"]
    assert bars[-1].get("fill") == plots.HIGHLIGHT and bars[0].get("fill") != plots.HIGHLIGHT
    with pytest.raises(ValueError, match=r"^histogram: 3 edges for 3 counts; need one edge more than counts$"):
        plots.histogram([0, 1, 2], [1, 2, 3], title="t", x_label="x")


def test_confusion_matrix_is_shaded_by_row_share():
    root = parse(every_chart()["heatmap"])
    cells = {c.find(f"{SVG}title").text: c.get("fill") for c in marks(root, "rect")}
    assert cells["a → a: 3 (75% of a)"] != cells["a → b: 1 (25% of a)"]
    assert cells["b → a: 0 (0% of b)"] == "#ffffff", "an empty cell stays white"
    assert cells["b → b: 2 (100% of b)"] == plots._heat(1.0)
    assert "3" in [t.text for t in root.iter(f"{SVG}text")], "counts written in cells"


def test_many_classes_show_the_most_frequent_confusions_instead():
    k = plots.HEATMAP_MAX_CLASSES + 1
    labels = [f"class-{i}" for i in range(k)]
    matrix = [[5 if i == j else 0 for j in range(k)] for i in range(k)]
    matrix[3][7], matrix[1][2], matrix[0][4] = 9, 4, 4
    root = parse(plots.confusion_matrix(matrix, labels, top_n=2))
    assert root.get("data-plot") == "bar"
    assert [b.find(f"{SVG}title").text for b in marks(root, "rect")] == ["class-3 → class-7: 9",
                                                                          "class-0 → class-4: 4"]


@pytest.mark.parametrize("svg", [
    plots.line_chart({"loss": [(1, math.inf)]}, title="t", x_label="step"),
    plots.bar_chart([], {"n": []}, title="t"),
    plots.histogram([0, 1], [0], title="t", x_label="x"),
], ids=["line", "bar", "histogram"])
def test_no_data_draws_no_marks_and_says_so(svg):
    root = parse(svg)
    assert not marks(root, "rect") + marks(root, "polyline") + marks(root, "circle")
    assert "no data" in [t.text for t in root.iter(f"{SVG}text")]


def test_names_are_escaped():
    root = parse(plots.bar_chart(["<script>alert(1)</script> & co"], {"n": [1]}, title='"quoted" <b>'))
    assert root.get("aria-label") == '"quoted" <b>'
    assert "<script>alert(1)</script> & co" in [t.find(f"{SVG}title").text for t in root.iter(f"{SVG}text")
                                                 if t.find(f"{SVG}title") is not None]


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (0, 0.93, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (0, 2e-4, [0, 5e-5, 1e-4, 1.5e-4, 2e-4]),
    (1.7, 2.5, [1.6, 1.8, 2.0, 2.2, 2.4, 2.6]),
    (3, 3, [2.6, 2.8, 3.0, 3.2, 3.4]),  # one value: 10% either side
])
def test_ticks_are_round_numbers_covering_the_range(lo, hi, expected):
    assert plots._ticks(lo, hi) == pytest.approx(expected)


def test_timeline_bars_share_one_time_axis_and_carry_their_marks():
    spans = [plots.Span("attempt 1 (steps 0-130)", 0, 13, "preempted", "attempt 1: preempted",
                        [(10, "checkpoint at step 100"), (13, "checkpoint at step 130")]),
             plots.Span("attempt 2 (steps 130-300)", 33, 50, "finished", "attempt 2: finished", [(40, "step 200")])]
    root = parse(plots.timeline(spans, title="Attempts", x_label="minutes", mark_label="checkpoint saved"))
    bars = marks(root, "rect")
    assert [b.find(f"{SVG}title").text for b in bars] == ["attempt 1: preempted", "attempt 2: finished"]
    first, second = (float(b.get("x")) for b in bars)
    widths = [float(b.get("width")) for b in bars]
    # 0 to 60 minutes on the axis: attempt 2 starts 33/13 of attempt 1's length to the right.
    assert (second - first) / widths[0] == pytest.approx(33 / 13, rel=0.01)
    assert widths[1] / widths[0] == pytest.approx(17 / 13, rel=0.01)
    assert bars[0].get("fill") != bars[1].get("fill"), "outcomes in their own colours"
    dots = marks(root, "circle")
    assert [d.find(f"{SVG}title").text for d in dots] == ["checkpoint at step 100", "checkpoint at step 130",
                                                          "step 200"]
    assert float(dots[1].get("cx")) == pytest.approx(first + widths[0], abs=0.2), "at the end of attempt 1"
    legend = "".join(t for g in root.iter(f"{SVG}g") if g.get("class") == "legend" for t in g.itertext())
    assert "preempted" in legend and "finished" in legend and "checkpoint saved" in legend
    assert "no data" in "".join(parse(plots.timeline([], title="t", x_label="m")).itertext())

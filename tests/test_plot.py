"""plot.py: hand-drawn SVG line plots (linear and log axes), the loss curve, the metrics log."""
import math
import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import assume, given, settings, strategies as st

from minillm import plot

NS = "{http://www.w3.org/2000/svg}"
FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
POSITIVE = st.floats(1e-6, 1e9, allow_nan=False, allow_infinity=False)


def svg_of(path):
    return ET.parse(path).getroot()


def frame_of(root):
    """(x0, y0, x1, y1) of the plot frame: the unfilled rect with a stroke."""
    r = next(e for e in root.iter(f"{NS}rect") if e.get("fill") == "none")
    x, y, w, h = (float(r.get(k)) for k in ("x", "y", "width", "height"))
    return x, y, x + w, y + h


def polyline_points(el):
    return [tuple(map(float, p.split(","))) for p in el.get("points").split()]


def series_of(values):
    """{name: [(x, y), ...]} from drawn lists of points."""
    return {f"s{i}": pts for i, pts in enumerate(values)}


@settings(max_examples=30, deadline=None)
@given(data=st.lists(st.lists(st.tuples(FINITE, FINITE), min_size=1, max_size=30), min_size=1, max_size=5),
       log_x=st.booleans(), log_y=st.booleans())
def test_every_point_is_drawn_inside_the_frame_with_one_line_and_legend_entry_per_series(
        tmp_path_factory, data, log_x, log_y):
    if log_x or log_y:  # a log axis shows positive values only: make them so
        data = [[(abs(x) + 1e-3 if log_x else x, abs(y) + 1e-3 if log_y else y) for x, y in pts]
                for pts in data]
    path = tmp_path_factory.mktemp("plot") / "p.svg"
    root = svg_of(plot.line_plot(path, series_of(data), title="t", xlabel="compute", ylabel="loss",
                                 log_x=log_x, log_y=log_y))
    x0, y0, x1, y1 = frame_of(root)
    lines = root.findall(f"{NS}polyline")
    assert len(lines) == len(data)
    for line, pts in zip(lines, data):
        drawn = polyline_points(line)
        assert len(drawn) == len(pts)
        for px, py in drawn:   # coordinates are rounded to 0.1 px
            assert x0 - 0.05 <= px <= x1 + 0.05 and y0 - 0.05 <= py <= y1 + 0.05
        assert [px for px, _ in drawn] == sorted(px for px, _ in drawn)   # drawn left to right
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert {"compute", "loss", "t"} <= set(texts)
    assert [t for t in texts if re.fullmatch(r"s\d+", t or "")] == list(series_of(data))


def test_a_line_plot_maps_values_linearly_and_a_log_axis_by_their_logarithm(tmp_path):
    series = {"a": [(1, 1.0), (10, 2.0), (100, 3.0), (1000, 4.0)]}
    for log_x in (False, True):
        root = svg_of(plot.line_plot(tmp_path / f"{log_x}.svg", series, log_x=log_x))
        xs = [px for px, _ in polyline_points(root.find(f"{NS}polyline"))]
        gaps = [b - a for a, b in zip(xs, xs[1:])]
        if log_x:   # equal ratios of x are equal distances
            assert max(gaps) - min(gaps) <= 0.2
        else:       # equal differences of x are equal distances: 1->10 is 9/999 of the width
            assert gaps[0] / sum(gaps) == pytest.approx(9 / 999, abs=1e-3)
    ys = [py for _, py in polyline_points(root.find(f"{NS}polyline"))]
    assert ys == sorted(ys, reverse=True)   # larger values higher up (smaller pixel y)


def test_log_axes_leave_out_what_they_cannot_show_and_tick_at_round_numbers(tmp_path):
    series = {"scaling": [(0, 5.0), (-1, 4.0), (1e3, 3.0), (1e6, 2.5), (1e9, float("nan")), (1e9, 2.0)]}
    root = svg_of(plot.line_plot(tmp_path / "s.svg", series, xlabel="FLOPs", log_x=True, log_y=True))
    assert len(polyline_points(root.find(f"{NS}polyline"))) == 3   # x <= 0 and NaN are left out
    x0, _, x1, y1 = frame_of(root)
    below = [t for t in root.iter(f"{NS}text")
             if t.get("text-anchor") == "middle" and float(t.get("y")) > y1 and t.text != "FLOPs"]
    ticks = [float(t.text) for t in below]
    assert ticks and all(math.log10(t) == round(math.log10(t)) for t in ticks)   # powers of ten


@settings(max_examples=50, deadline=None)
@given(lo=FINITE, width=st.floats(1e-6, 1e6))
def test_linear_ticks_are_round_evenly_spaced_and_cover_the_range(lo, width):
    assume(width > 1e-6 * abs(lo))   # else the test's own differences of ticks lose the digits it checks
    hi = lo + width
    ticks = plot._nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 11
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
    assert all(b - a == pytest.approx(step, rel=1e-6, abs=1e-9 * step) for a, b in zip(ticks, ticks[1:]))
    assert ticks[0] >= lo - 1e-6 * step and ticks[-1] <= hi + 1e-6 * step


@settings(max_examples=50, deadline=None)
@given(lo=POSITIVE, ratio=st.floats(1.5, 1e12))
def test_log_ticks_are_round_within_the_range_and_few(lo, ratio):
    hi = lo * ratio
    ticks = plot._log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 9 and ticks == sorted(ticks)
    for t in ticks:
        assert lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)
    if ratio >= 10:   # a decade or more: every tick is a digit times a power of ten
        for t in ticks:
            assert round(t / 10 ** math.floor(math.log10(t) + 1e-12), 9) in range(1, 10)


def test_the_loss_curve_is_a_line_plot_of_loss_against_step_from_zero(tmp_path):
    series = {"train": [(5, 3.0), (10, 2.0)], "val": [(10, 2.5)]}
    loss = plot.write_loss_svg(tmp_path / "loss.svg", series, title="loss: run")
    line = plot.line_plot(tmp_path / "line.svg", series, title="loss: run", xlabel="step", ylabel="loss",
                          x_from_zero=True)
    assert loss.read_bytes() == line.read_bytes()
    x0 = frame_of(svg_of(loss))[0]
    assert "0" in [t.text for t in svg_of(loss).iter(f"{NS}text") if float(t.get("x")) == x0]  # tick at 0


def test_an_empty_plot_says_so_and_text_is_escaped(tmp_path):
    root = svg_of(plot.line_plot(tmp_path / "e.svg", {"a<b": [(1, float("inf"))]}, title="x & y"))
    assert "no data yet" in [t.text for t in root.iter(f"{NS}text")]
    root = svg_of(plot.line_plot(tmp_path / "f.svg", {"a<b": [(1, 1.0)]}, title="x & y"))
    assert {"a<b", "x & y"} <= {t.text for t in root.iter(f"{NS}text")}


def test_metrics_log_is_read_despite_a_torn_last_line_and_plotted(tmp_path):
    (tmp_path / plot.METRICS_FILE).write_text(
        '{"kind": "train", "step": 1, "loss": 3.0}\n{"kind": "eval", "step": 1, "val_loss": 3.1}\n'
        '{"kind": "train", "step": 2, "loss": 2.5}\n{"kind": "tra', encoding="utf-8")
    assert [r["step"] for r in plot.read_metrics(tmp_path)] == [1, 1, 2]
    assert plot.read_metrics(tmp_path / "nowhere") == []
    root = svg_of(plot.plot_metrics(tmp_path))
    assert (tmp_path / plot.PLOT_FILE).is_file()
    assert [len(polyline_points(p)) for p in root.findall(f"{NS}polyline")] == [2, 1]   # train, val


def test_the_worked_examples_in_the_docstrings_hold():
    import doctest
    assert doctest.testmod(plot).failed == 0

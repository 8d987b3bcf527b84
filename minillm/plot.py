"""Line plots drawn by hand as SVG, and the metrics log they are drawn from.

No plotting library: an SVG file is text, and a line plot is a frame, some
round-numbered ticks, one polyline per series and a legend. :func:`line_plot`
draws any number of named series of (x, y) points on shared axes, with axis
labels and optionally logarithmic axes (a scaling law is a straight line on
log-log axes). :func:`write_loss_svg` is the training loss curve: loss against
step, the x axis starting at step 0.

Mapping a value to a pixel is a linear map of the value (or of its log10) from
the axis range [lo, hi] onto the plot's width (or, flipped, its height):

    px = left + (v - lo) / (hi - lo) * width

Ticks fall on round numbers: steps of 1, 2 or 5 times a power of ten on a
linear axis; powers of ten (and 2x, 5x when the range spans few decades) on a
log axis.

A training run also keeps ``metrics.jsonl`` (one JSON object per line, appended
as training goes: ``{"kind": "train", "step", "loss", "lr", ...}`` and
``{"kind": "eval", "step", "train_loss", "val_loss"}``). The log lives here,
beside the plot, because the plot is what it is read for: :func:`read_metrics`
reads it and :func:`plot_metrics` turns it into ``loss.svg``. Neither the
training loop nor the checkpoint format is needed to read or draw it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from xml.sax.saxutils import escape

from .backend import atomic_write

__all__ = ["line_plot", "write_loss_svg", "plot_metrics", "read_metrics", "METRICS_FILE", "PLOT_FILE"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.svg"

_WIDTH, _HEIGHT = 720, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 150, 36, 48          # margins: tick labels, legend, title, x label
_PLOT_W, _PLOT_H = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM   # the frame inside them
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
_MARK_AT_MOST = 60                                      # points of a sparser series get a dot each


# ---------------------------------------------------------------------------
# Axes: value -> pixel, and where the ticks go
# ---------------------------------------------------------------------------

def _nice_ticks(lo, hi, n=5):
    """About n round-numbered ticks covering [lo, hi] (steps of 1, 2 or 5 times a power of 10).

    >>> _nice_ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    """
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _log_ticks(lo, hi):
    """Round ticks in [lo, hi] (both > 0) for a log axis: powers of ten, with 2x and 5x
    in between when that gives too few, and every k-th power when too many. A range
    too narrow for two such ticks is nearly linear, and gets linear ticks.

    >>> _log_ticks(3.0, 40.0)
    [5.0, 10.0, 20.0]
    """
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [float(f"{m}e{k}") for k in range(first, last + 1) for m in mults]   # 6e-1, not 6 * 0.1
        ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:
        return [t for t in _nice_ticks(lo, hi) if lo <= t <= hi]
    every = math.ceil(len(ticks) / 8)
    return ticks[::every]


def _fmt_tick(v):
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.0e}"


class _Axis:
    """One axis: the value range [lo, hi] (in log10 units when log) drawn over ``span`` pixels
    from ``start``; flipped (hi at ``start``) for a y axis, whose pixels grow downwards."""

    def __init__(self, lo, hi, log, start, span, flip=False):
        self.lo, self.hi, self.log = lo, hi, log
        self.start, self.span, self.flip = start, span, flip

    def pixel(self, v):
        u = math.log10(v) if self.log else v
        f = (u - self.lo) / (self.hi - self.lo)               # 0 at lo, 1 at hi
        return self.start + ((1 - f) if self.flip else f) * self.span

    def ticks(self):
        if self.log:
            return _log_ticks(10.0 ** self.lo, 10.0 ** self.hi)
        return [t for t in _nice_ticks(self.lo, self.hi) if self.lo <= t <= self.hi]



def _x_axis(xs, log, from_zero):
    """The x range: the data's, from 0 when from_zero (so curves of different runs line up)."""
    if log:
        x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    else:
        x0, x1 = (min(min(xs), 0.0) if from_zero else min(xs)), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    return _Axis(x0, x1, log, _LEFT, _PLOT_W)


def _y_axis(ys, log):
    """The y range: the data's, padded by 5% on each side so no line runs along the frame."""
    if log:
        ys = [math.log10(v) for v in ys]
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * (y1 - y0) if y1 > y0 else max(abs(y0) * 0.05, 0.05)
    return _Axis(y0 - pad, y1 + pad, log, _TOP, _PLOT_H, flip=True)


# ---------------------------------------------------------------------------
# The plot
# ---------------------------------------------------------------------------

def _plottable(series, log_x, log_y):
    """{name: [(x, y) as floats]} without the points an axis cannot show (NaN, inf, <= 0 on a log axis)."""
    def ok(v, log):
        return math.isfinite(v) and (v > 0 or not log)
    return {name: [(float(x), float(y)) for x, y in pts if ok(float(x), log_x) and ok(float(y), log_y)]
            for name, pts in series.items()}


def _frame_and_ticks(X, Y, xlabel, ylabel):
    """SVG elements: grid lines and labels at Y's ticks, tick marks and labels at X's, the frame,
    the axis labels."""
    left, top, pw, ph = X.start, Y.start, X.span, Y.span
    right, bottom = left + pw, top + ph
    parts = []
    for t in Y.ticks():
        y = Y.pixel(t)
        parts.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>')
    for t in X.ticks():
        x = X.pixel(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="black"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{_fmt_tick(t)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{_HEIGHT - 8}" text-anchor="middle">'
                 f'{escape(str(xlabel))}</text>')
    parts.append(f'<text x="16" y="{top + ph / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {top + ph / 2})">{escape(str(ylabel))}</text>')
    return parts


def _lines_and_legend(X, Y, series):
    """SVG elements: one polyline per series (dots on a sparse one) and its legend entry."""
    parts = []
    legend_x = X.start + X.span + 12
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        if pts:
            coords = " ".join(f"{X.pixel(x):.1f},{Y.pixel(y):.1f}" for x, y in sorted(pts))
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
            if len(pts) <= _MARK_AT_MOST:
                parts += [f'<circle cx="{X.pixel(x):.1f}" cy="{Y.pixel(y):.1f}" r="2.5" fill="{color}"/>'
                          for x, y in pts]
        ly = Y.start + 14 + 20 * i
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 24}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="2.5"/>')
        parts.append(f'<text x="{legend_x + 30}" y="{ly}">{escape(str(name))}</text>')
    return parts


def line_plot(path, series: dict, title="", xlabel="x", ylabel="y", log_x=False, log_y=False,
              x_from_zero=False) -> Path:
    """Draw {name: [(x, y), ...]} as lines on shared axes into an SVG file (atomically); -> its path.

    title, xlabel, ylabel: text (escaped). log_x / log_y: a logarithmic axis (points
    with a value <= 0 on it are left out, as are NaN and inf everywhere).
    x_from_zero: start a linear x axis at 0 even when the data start later (steps).
    Series keep the dict's order: the first is drawn first, in the first colour, and
    listed first in the legend. With no point to draw, the file says "no data yet".
    """
    clean = _plottable(series, log_x, log_y)
    points = [pt for pts in clean.values() for pt in pts]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
             f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif" font-size="12">',
             f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="white"/>',
             f'<text x="{_LEFT + _PLOT_W / 2}" y="22" text-anchor="middle" '
             f'font-size="15">{escape(str(title))}</text>']
    if not points:
        parts.append(f'<text x="{_WIDTH / 2}" y="{_HEIGHT / 2}" text-anchor="middle">no data yet</text>')
    else:
        X = _x_axis([x for x, _ in points], log_x, x_from_zero)
        Y = _y_axis([y for _, y in points], log_y)
        parts += _frame_and_ticks(X, Y, xlabel, ylabel)
        parts += _lines_and_legend(X, Y, clean)
    parts.append("</svg>\n")
    svg = "\n".join(parts)
    path = Path(path)
    atomic_write(path, lambda f: f.write(svg.encode("utf-8")))
    return path


def write_loss_svg(path, series: dict, title="loss") -> Path:
    """The loss curve: {name: [(step, loss), ...]} against step (from step 0) into an SVG file."""
    return line_plot(path, series, title=title, xlabel="step", ylabel="loss", x_from_zero=True)


# ---------------------------------------------------------------------------
# The metrics log of a run, and its loss curve
# ---------------------------------------------------------------------------

def read_metrics(out_dir) -> list:
    """The records in ``out_dir/metrics.jsonl`` (an empty list when there is none).

    A last line cut short by a crash is ignored; training rewrites the file on resume.
    """
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_metrics(out_dir) -> Path:
    """Write ``out_dir/loss.svg`` from ``out_dir/metrics.jsonl``: train loss per logged step, val per eval."""
    records = read_metrics(out_dir)
    train_points = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val_points = [(r["step"], r["val_loss"]) for r in records
                  if r.get("kind") == "eval" and r.get("val_loss") is not None]
    return write_loss_svg(Path(out_dir) / PLOT_FILE, {"train": train_points, "val": val_points},
                          title=f"loss: {Path(out_dir).resolve().name}")

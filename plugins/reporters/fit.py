"""Figures sized to their labels: grown until no two labels overlap and every plot keeps room to draw in.

A figure of a fixed size holds as many labels as fit; a BERT's 25 layer names did not. :func:`fit_to_labels`
lays the figure out (matplotlib's constrained layout), measures every tick label and text in display units and
grows the figure's width or height where two of them overlap — data-placed labels move apart in proportion
to the axes — or where a plot (or its axis label) has less room than :data:`MIN_PLOT_INCHES`, or what is
drawn reaches past the figure's edges; then lays it out again, a few times at most. It never shrinks a
figure, and stops at :data:`MAX_FIGURE_INCHES`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

#: The least width and height of the drawing area of a plot (not of colour bars or hidden axes).
MIN_PLOT_INCHES = 1.8
#: No figure grows beyond this many inches in either direction (1,000 labels cannot all be made readable).
MAX_FIGURE_INCHES = 60.0
#: Space kept between two labels, in points.
LABEL_GAP_POINTS = 1.5
#: Room left around a figure's content when it outgrows the figure, in inches.
MARGIN_INCHES = 0.1
ROUNDS = 6


def _is_plot(axes) -> bool:
    return axes.axison and axes.get_visible() and axes.get_label() != "<colorbar>"


def _label_groups(axes) -> list[tuple[list, str | None]]:
    """The labels that must not overlap one another, each group with the direction that moves them apart: the
    x tick labels (x), the y tick labels (y), the texts (either: see :func:`_growth`)."""
    groups = [(axes.xaxis.get_ticklabels(), "x"), (axes.yaxis.get_ticklabels(), "y"), (list(axes.texts), None)]
    return [([t for t in texts if t.get_visible() and t.get_text()], along) for texts, along in groups]


def _overlapping_pairs(boxes: list) -> Iterator[tuple]:
    """The pairs of *boxes* that overlap (a sweep from left to right: boxes that end before another begins are
    never compared with it)."""
    ordered = sorted(boxes, key=lambda box: box.x0)
    for index, a in enumerate(ordered):
        for b in ordered[index + 1 :]:
            if b.x0 >= a.x1:
                break
            if a.overlaps(b):
                yield a, b


def _growth(boxes: list, along: str | None, gap: float) -> tuple[float, float]:
    """(width factor, height factor) that moves every overlapping pair of *boxes* (display units) apart: along
    *along*, or when None along the direction in which the pair's centres lie farther apart relative to the
    distance they need (a row of a heatmap's values: x; a column: y)."""
    grow_x = grow_y = 1.0
    for a, b in _overlapping_pairs(boxes):
        apart_x = abs((a.x0 + a.x1) - (b.x0 + b.x1)) / 2
        apart_y = abs((a.y0 + a.y1) - (b.y0 + b.y1)) / 2
        by_x = ((a.width + b.width) / 2 + gap) / apart_x if apart_x > 0 else math.inf
        by_y = ((a.height + b.height) / 2 + gap) / apart_y if apart_y > 0 else math.inf
        direction = along or ("x" if by_x <= by_y else "y")
        if direction == "x" and by_x < math.inf:
            grow_x = max(grow_x, by_x)
        elif direction == "y" and by_y < math.inf:
            grow_y = max(grow_y, by_y)
    return grow_x, grow_y


def _room(axes, renderer, size: tuple[float, float], least: float) -> tuple[float, float]:
    """(width factor, height factor) that gives the plot *axes* at least *least* display units of width and
    height, and room for its axis labels, in a figure of *size* (display units); margins stay as they are."""
    box = axes.get_window_extent(renderer)
    xlabel = axes.xaxis.label.get_window_extent(renderer).width if axes.get_xlabel() else 0.0
    ylabel = axes.yaxis.label.get_window_extent(renderer).height if axes.get_ylabel() else 0.0
    width, height = size
    return (width - box.width + max(least, xlabel)) / width, (height - box.height + max(least, ylabel)) / height


def _overflow(figure, renderer) -> tuple[float, float]:
    """(width factor, height factor) that would hold everything drawn, where it reaches past the figure's edges
    (constrained layout gives up, leaving the plots where they were, when their labels take more than the whole
    figure)."""
    drawn = figure.get_tightbbox(renderer)  # inches
    width, height = figure.get_size_inches()
    past_x = drawn.x0 < 0 or drawn.x1 > width
    past_y = drawn.y0 < 0 or drawn.y1 > height
    return (
        (drawn.width + 2 * MARGIN_INCHES) / width if past_x else 1.0,
        (drawn.height + 2 * MARGIN_INCHES) / height if past_y else 1.0,
    )


def fit_to_labels(figure) -> None:
    """Grow *figure* (module docstring) so that its plots have room and then its labels are apart. Room comes
    first: a squeezed plot's own tick labels overlap until it has room again."""
    dpi = figure.dpi
    gap = LABEL_GAP_POINTS * dpi / 72
    for _ in range(ROUNDS):
        with warnings.catch_warnings():  # a figure too small for its labels is what this grows
            warnings.filterwarnings("ignore", message="constrained_layout not applied")
            figure.draw_without_rendering()
        renderer = figure.canvas.get_renderer()
        plots = [axes for axes in figure.axes if _is_plot(axes)]
        size = tuple(figure.get_size_inches() * dpi)
        factors = [_room(axes, renderer, size, MIN_PLOT_INCHES * dpi) for axes in plots]
        factors.append(_overflow(figure, renderer))
        if max((max(f) for f in factors), default=1.0) <= 1.001:
            factors = [
                _growth([t.get_window_extent(renderer) for t in texts], along, gap)
                for axes in plots
                for texts, along in _label_groups(axes)
            ]
        grow_x = max((f[0] for f in factors), default=1.0)
        grow_y = max((f[1] for f in factors), default=1.0)
        if grow_x <= 1.001 and grow_y <= 1.001:
            return
        inches = figure.get_size_inches()
        figure.set_size_inches(
            min(MAX_FIGURE_INCHES, inches[0] * max(1.0, grow_x) * 1.01),
            min(MAX_FIGURE_INCHES, inches[1] * max(1.0, grow_y) * 1.01),
        )

"""Layer names on figures: shortened from the left, the full name kept as the SVG element's title (a tooltip).

A transformer's layer names are module paths such as ``encoder.layer.11.intermediate.intermediate_act_fn``;
25 of them as tick labels filled most of a figure. :func:`short_names` keeps the end that tells layers apart
(``…layer.11.intermediate.intermediate_act_fn``); :func:`label_layers` puts the short names on an axis and
:func:`layer_bands` under an axis of relative depth, one band per network; both remember the full names, which
:func:`svg_with_titles` writes into the SVG as ``<title>`` elements. The HTML report's tables keep full names.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from xml.sax.saxutils import escape

#: Names longer than this many characters are shortened (as far as the rules of :func:`short_names` allow).
LABEL_LIMIT = 32
ELLIPSIS = "…"
#: Characters after which a name may be cut: module paths (``.``) and node names within a module (``/``).
SEPARATORS = "./"
#: Tick labels up to this many characters stay horizontal; longer ones are turned upright (90°), so that
#: their boxes, and not only their glyphs, stay apart.
HORIZONTAL_CHARACTERS = 8
TITLED_ID = "layerscope-name-{}"

_full_names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # figure -> {element id: full name}


def _cuts(name: str) -> list[int]:
    """Where *name* may be cut (the kept end starts there), left to right: after a separator, but never so far
    right that the first component holding a digit, and the component before it when that one is all digits
    (``layer`` of ``layer.3``, ``h`` of ``h.11``), would be lost: the block index tells repeated blocks apart."""
    starts = [0] + [match.end() for match in re.finditer(f"[{re.escape(SEPARATORS)}]", name)]
    components = [name[start : end - 1] for start, end in zip(starts, [*starts[1:], len(name) + 1])]
    first = next((i for i, part in enumerate(components) if any(c.isdigit() for c in part)), None)
    if first is not None:
        keep_from = first - 1 if components[first].isdigit() and first > 0 else first
        starts = starts[: keep_from + 1]
    return starts[1:]


def _shortened(name: str, limit: int) -> str:
    """*name* cut at the leftmost allowed place that leaves at most *limit* characters (the ellipsis included),
    else at the rightmost allowed place; unchanged when it is short enough or cannot be cut."""
    cuts = _cuts(name)
    if len(name) <= limit or not cuts:
        return name
    cut = next((c for c in cuts if len(name) - c + 1 <= limit), cuts[-1])
    return ELLIPSIS + name[cut:]


def _longer(name: str, short: str) -> str:
    """The next longer shortening of *name* than *short* (one more component), or *name* itself."""
    kept = len(short) - len(ELLIPSIS) if short.startswith(ELLIPSIS) else len(name)
    earlier = [c for c in _cuts(name) if c < len(name) - kept]
    return ELLIPSIS + name[earlier[-1] :] if earlier else name


def short_names(names: Iterable[str], limit: int = LABEL_LIMIT) -> dict[str, str]:
    """A label for each distinct name: the name itself when it has at most *limit* characters, else ``…``
    and the name's end, cut after a ``.`` or ``/`` (:func:`_cuts`). Names whose ends would read the same keep
    more of their ends until every label is distinct."""
    short = {name: _shortened(name, limit) for name in dict.fromkeys(names)}
    while True:
        holders: dict[str, list[str]] = {}
        for name, label in short.items():
            holders.setdefault(label, []).append(name)
        clashing = [group for group in holders.values() if len(group) > 1]
        if not clashing:
            return short
        for group in clashing:
            for name in group:
                short[name] = _longer(name, short[name])


def keep_full_name(text, full: str) -> None:
    """Remember *full* as the title of the text artist *text* (drawn as a shortened name) in the SVG of its
    figure (:func:`svg_with_titles`); nothing when the text already reads *full*."""
    figure = text.figure.figure if text.figure is not None else None  # the root figure (of a subfigure too)
    if figure is None or text.get_text() == full:
        return
    titles = _full_names.setdefault(figure, {})
    element = TITLED_ID.format(len(titles))
    text.set_gid(element)
    titles[element] = full


def svg_with_titles(figure, svg: bytes) -> bytes:
    """The SVG of *figure* with a ``<title>`` (the full name, a tooltip in browsers) in the element of every
    shortened name :func:`keep_full_name` remembered."""
    text = svg.decode("utf-8")
    for element, full in _full_names.get(figure, {}).items():
        opening = f'<g id="{element}">'
        text = text.replace(opening, f"{opening}\n<title>{escape(full)}</title>", 1)
    return text.encode("utf-8")


def label_layers(axes, positions: Sequence[float], names: Sequence[str], axis: str = "x") -> None:
    """Tick labels of the layer *names* at *positions* on the *axis* (``x`` or ``y``) of *axes*: shortened
    (:func:`short_names`), their full names kept for the SVG; x labels longer than
    :data:`HORIZONTAL_CHARACTERS` are upright."""
    short = short_names(names)
    labels = [short[name] for name in names]
    if axis == "x":
        upright = max((len(label) for label in labels), default=0) > HORIZONTAL_CHARACTERS
        axes.set_xticks(list(positions), labels, rotation=90 if upright else 0, fontsize="small")
        ticks = axes.get_xticklabels()
    else:
        axes.set_yticks(list(positions), labels, fontsize="small")
        ticks = axes.get_yticklabels()
    for text, name in zip(ticks, names):
        keep_full_name(text, name)


def layer_bands(axes, bands: Mapping[object, Sequence[tuple[float, str]]], gap: float = 6.0) -> None:
    """Layer names of several networks under *axes*, whose x axis is relative depth: a band per network (in
    the order of *bands*: network -> [(depth, layer name)]), its names upright at their depths and the
    network's name at the left, bands stacked so that none overlaps another. The depth axis's ticks and label
    move to the top. Sizes are in points, so the bands hold at any figure size."""
    import matplotlib
    from matplotlib.font_manager import FontProperties

    axes.xaxis.tick_top()
    axes.xaxis.set_label_position("top")
    renderer = axes.figure.canvas.get_renderer()
    points_per_pixel = 72.0 / axes.figure.dpi
    # below the half of the lowest y tick label that reaches under the plot
    offset = gap + FontProperties(size=matplotlib.rcParams["ytick.labelsize"]).get_size_in_points() / 2
    for network, layers in bands.items():
        short = short_names(name for _, name in layers)
        texts = []
        for depth, name in layers:
            text = axes.annotate(
                short[name],
                (depth, 0.0),
                xycoords=("data", "axes fraction"),
                xytext=(0.0, -offset),
                textcoords="offset points",
                rotation=90,
                ha="center",
                va="top",
                fontsize="x-small",
                annotation_clip=False,
            )
            keep_full_name(text, name)
            texts.append(text)
        axes.annotate(
            str(network),
            (0.0, 0.0),
            xycoords="axes fraction",
            xytext=(-gap, -offset),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize="small",
            annotation_clip=False,
        )
        tallest = max((t.get_window_extent(renderer).height for t in texts), default=0.0) * points_per_pixel
        offset += tallest + gap

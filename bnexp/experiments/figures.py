"""What every figure of a report shares: one colour and line style per arm, the same in every plot of a
comparison (plots.py, sweeps.py, why_plots.py), and the files a figure is saved as.

Colours are keyed by position in the comparison's arm list. In a grid with a numeric axis (batch size,
lr, depth) an arm's colour is that of its series, the arms that differ only in that axis's value (the
first numeric axis), and its line style the rank of its value: the sweep plot's line of a series and that
series' curves over training are then the same colour. Figures are written as PNG at print resolution
and as SVG (vector, text as paths: it opens anywhere and converts to PDF with no font to embed).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnexp.engine import files

DPI = 300
_DASHES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2))]

Points = dict[str, tuple[str, dict[str, Any]]]  # arm -> (declared arm, grid point)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numeric_axes(points: Points) -> list[str]:
    """The grid keys whose values are all numbers, with at least two of them."""
    keys: dict[str, set] = defaultdict(set)
    for _, point in points.values():
        for key, value in point.items():
            keys[key].add(value if is_number(value) else None)
    return [key for key, values in keys.items() if None not in values and len(values) >= 2]


def series_label(points: Points, arm: str, axis: str) -> str:
    """The series an arm belongs to along `axis`: its declared arm and the other axes' values."""
    family, point = points[arm]
    others = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items() if key != axis]
    return " ".join(part for part in [family, *others] if part)


def colors(n: int) -> list:
    """n distinct colours: tab10, tab20 (its dark shades first) beyond 10, a sampled colormap beyond 20."""
    import matplotlib

    if n <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:n])
    if n <= 20:
        tab20 = matplotlib.colormaps["tab20"].colors
        return [tab20[i] for i in [*range(0, 20, 2), *range(1, 20, 2)]][:n]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class Style:
    color: Any
    linestyle: Any


class Palette:
    """The style of every arm of a comparison (`arms` in its order), and the colour of a sweep's series."""

    def __init__(self, arms: list[str], points: Points | None = None):
        axes = numeric_axes(points) if points else []
        self.groups: dict[str, str] = {}  # series label -> colour key
        if axes and all(arm in points for arm in arms):
            axis = axes[0]
            labels = [series_label(points, arm, axis) for arm in arms]
            order = list(dict.fromkeys(labels))
            values = sorted({float(points[arm][1][axis]) for arm in arms})
            palette = colors(len(order))
            self.styles = {arm: Style(palette[order.index(label)],
                                      _DASHES[values.index(float(points[arm][1][axis])) % len(_DASHES)])
                           for arm, label in zip(arms, labels)}
            self._series = {label: palette[i] for i, label in enumerate(order)}
        else:
            palette = colors(len(arms))
            # Line styles differ too: two arms that train identically (bnexp vs torch BN) stay visible.
            self.styles = {arm: Style(palette[i], _DASHES[i % 4]) for i, arm in enumerate(arms)}
            self._series = {}

    def __getitem__(self, arm: str) -> Style:
        return self.styles[arm]

    def series(self, labels: list[str]) -> dict[str, Any]:
        """Colours of sweep series: a series of the palette's axis keeps its arms' colour; others (another
        numeric axis) get colours by position."""
        if all(label in self._series for label in labels):
            return {label: self._series[label] for label in labels}
        return dict(zip(labels, colors(len(labels))))


def legend_outside(ax, *others) -> None:
    """One legend right of `ax`, where it hides no curve, of the curves of `ax` and `others` (the panels of
    a figure show the same arms, not always all of them)."""
    entries: dict[str, object] = {}
    for a in (ax, *others):
        for handle, label in zip(*a.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    legend = ax.legend(list(entries.values()), list(entries), fontsize="small", loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), borderaxespad=0, ncols=1 + (len(entries) - 1) // 16)
    # The figure widens by the legend's width: the axes keep theirs however many arms there are.
    fig = ax.figure
    extra = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + extra + 0.2, height)


def save_figure(fig, path: Path) -> Path:
    """`path` (.png) at DPI and the same figure as .svg beside it; returns the PNG's path. Written like a
    run's files (bnexp.engine.files): the folder made if missing and refused if it is a symbolic link, each
    file rendered in memory and replaced atomically, a link planted at its name replaced, never followed."""
    import matplotlib
    import matplotlib.pyplot as plt

    files.real_dir(path.parent, create=True)
    fig.tight_layout()  # legend_outside widened the figure for its legend: the layout holds it
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI)
    # Text as paths (no font to embed or substitute), ids from a fixed salt and no date: the same runs
    # give the same file.
    svg = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "bnexp"}):
        fig.savefig(svg, format="svg", metadata={"Date": None})
    plt.close(fig)
    files.write_atomic(path, png.getbuffer())
    files.write_atomic(path.with_suffix(".svg"), svg.getbuffer())
    return path

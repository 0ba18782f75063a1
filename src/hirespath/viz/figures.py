"""Figures: matplotlib on a backend that needs no display (cluster nodes), and PNGs written atomically."""

from __future__ import annotations

from pathlib import Path

from ..utils.io import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported when a figure is first drawn (it is heavy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: float | str = 120, close: bool = True, **savefig) -> Path:
    """``fig`` as a PNG at ``path`` (its folder made), written atomically: a killed run leaves no half-written
    picture. Closed afterwards unless ``close=False`` (the caller still shows or logs it)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, **savefig)
    finally:
        if close:
            pyplot().close(fig)
    return path


def display_scale(ax, image_size: tuple[int, int]) -> float:
    """Display px per image px at which ``ax`` fits an image of ``image_size`` (w, h; its aspect kept), at the
    figure's dpi. Call it after the layout."""
    box = ax.get_window_extent()
    w, h = image_size
    return min(box.width / w, box.height / h)


def dpi_showing(fig, ax, image_size: tuple[int, int], least: float = 120) -> float:
    """The dpi at which ``ax`` shows an image of ``image_size`` at its own pixels, or ``least`` when that is more
    (a small image is not drawn in a figure of tiny text). Call it after the layout."""
    scale = display_scale(ax, image_size)
    return max(float(least), fig.dpi / scale) if scale > 0 else float(least)

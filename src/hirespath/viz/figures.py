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

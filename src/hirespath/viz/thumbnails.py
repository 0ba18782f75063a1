"""Per-slide pictures of a whole-slide run: the thumbnail with its tissue and kept tiles, and the pruned tokens of
a slide's first tiles. Both are drawn at thumbnail scale, once per slide, so they cost little beside embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .figures import pyplot, save_png

OVERLAY_SIDE = 448  # px per tile in the pruned-token figure (a 1,792 px tile is shown 4× smaller)


def outline_sigma(mask: np.ndarray) -> float:
    """The smoothing width of the tissue outline, in mask px: 1/150 of the mask's long side (at least 1)."""
    return max(1.0, max(mask.shape) / 150)


def smooth_outline_mask(mask: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """The tissue mask blurred by ``sigma`` px (default: ``outline_sigma``) and thresholded at one half: its
    contour follows the tissue's outline instead of every fibre and speck of the raw mask."""
    from scipy.ndimage import gaussian_filter

    sigma = outline_sigma(mask) if sigma is None else sigma
    return gaussian_filter(mask.astype(np.float32), sigma) > 0.5


def save_thumbnail(path: Path, grid, title: str = "") -> Path:
    """Thumbnail of a :class:`~hirespath.wsi.tissue.TileGrid` with the tissue's smoothed outline (green) and the
    kept tiles (blue squares)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    plt = pyplot()
    thumb, mask, (dx, dy) = grid.thumbnail, grid.mask, grid.mask_downsample
    h, w = mask.shape
    fig, ax = plt.subplots(figsize=(8, 8 * h / w) if w >= h else (8 * w / h, 8))
    ax.imshow(thumb)
    outline = smooth_outline_mask(mask)
    if outline.any() and not outline.all():
        ax.contour(outline.astype(np.float32), levels=[0.5], colors="lime", linewidths=1.2)
    side_x, side_y = grid.patch_size_level0 / dx, grid.patch_size_level0 / dy
    ox, oy = grid.mask_origin  # the thumbnail shows QuPath's image of the slide
    rects = [Rectangle(((x - ox) / dx, (y - oy) / dy), side_x, side_y) for x, y in grid.coords]
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="dodgerblue", linewidth=0.6))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return save_png(fig, path)


def pruned_overlays_figure(tiles, patch: int, title: str = "", side: int = OVERLAY_SIDE):
    """One figure, one panel per tile: the tile shrunk to ≤ ``side`` px with its pruned patches tinted red.

    ``tiles``: (tile index, uint8 H×W×3 image, kept (row, col) positions N'×2, patch grid (rows, cols)). The
    pruned patches are one RGBA image per panel (not one rectangle per patch: a 1,792 px tile has 16,384)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tiles), figsize=(4.2 * len(tiles), 4.6), squeeze=False)
    for ax, (index, image, positions, (rows, cols)) in zip(axes[0], tiles):
        step = max(1, int(np.ceil(max(image.shape[:2]) / side)))
        small = np.asarray(image)[::step, ::step]
        kept = np.zeros((rows, cols), bool)
        pos = np.asarray(positions).reshape(-1, 2)
        kept[pos[:, 0], pos[:, 1]] = True
        tint = np.zeros((rows, cols, 4), np.float32)
        tint[~kept] = (1.0, 0.0, 0.0, 0.45)
        extent = (0, cols * patch, rows * patch, 0)  # the patch grid in the tile's pixels
        ax.imshow(small, extent=(0, image.shape[1], image.shape[0], 0))
        ax.imshow(tint, extent=extent, interpolation="nearest")
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        ax.set_title(f"tile {index}: pruned {int((~kept).sum())} of {kept.size} patches", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_pruned_overlays(path: Path, tiles, patch: int, title: str = "") -> Path:
    """:func:`pruned_overlays_figure` written as one PNG (atomically)."""
    return save_png(pruned_overlays_figure(tiles, patch, title), path, dpi=100)

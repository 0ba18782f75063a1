"""Pictures of segmentations: a SegPath tile's ground truth (green) and prediction (magenta) of its labelled type
(``segment``), and a whole slide's class polygons over its thumbnail (``segment_slides``' ``<slide>_overlay.png``:
each class as much as its polygons cover each pixel, each class alone beside all of them, and a legend)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .figures import display_scale, pyplot, save_png


def segmentation_overlay(image: np.ndarray, target: np.ndarray, pred: np.ndarray, title: str, path: str | Path):
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    axes[0].imshow(image)
    axes[0].set_title("H&E", fontsize=9)
    for ax, m, colour, name in (
        (axes[1], target == 1, (0, 1, 0), "ground truth"),
        (axes[2], pred == 1, (1, 0, 1), "prediction"),
    ):
        ax.imshow(image)
        rgba = np.zeros((*m.shape, 4))
        rgba[m] = (*colour, 0.45)
        ax.imshow(rgba)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def polygon_coverage(geom, size: tuple[int, int], bounds: tuple[float, float, float, float],
                     supersample: int = 4) -> np.ndarray:  # fmt: skip
    """The share of each pixel of a ``size`` (w, h) picture of the level-0 box ``bounds`` (x0, y0, x1, y1) that
    the (Multi)Polygon ``geom`` (level-0 px, holes kept) covers: h×w float32 in [0, 1], so a class drawn with it
    shows the area its polygons hold. Polygons are filled ``supersample``× finer by the pixel-centre rule
    (:func:`_fill_rings`) and averaged; polygons smaller than one of those fine pixels (cells in a large slide's
    thumbnail), which the centre rule would keep or lose whole, add their area to the pixel of their centroid."""
    import shapely

    w, h = size
    x0, y0, x1, y1 = bounds
    s = supersample
    scale = np.array([w * s / (x1 - x0), h * s / (y1 - y0)])  # fine px per level-0 px
    cover = np.zeros((h, w), np.float32)
    if geom is None or geom.is_empty:
        return cover
    parts = shapely.get_parts(geom)
    fine_px = 1 / (scale[0] * scale[1])  # level-0 px² per fine px
    tiny = shapely.area(parts) < fine_px
    if tiny.any():
        c = (shapely.get_coordinates(shapely.centroid(parts[tiny])) - (x0, y0)) * scale / s
        ix, iy = np.clip(c[:, 0].astype(int), 0, w - 1), np.clip(c[:, 1].astype(int), 0, h - 1)
        np.add.at(cover, (iy, ix), shapely.area(parts[tiny]) / (fine_px * s * s))
    if not tiny.all():
        xy, ring = shapely.get_coordinates(shapely.get_rings(parts[~tiny]), return_index=True)
        # rounded so that a vertex exactly on a pixel centre stays there whatever the slide's offset (a region of a
        # larger canvas: its level-0 coordinates differ by an offset, and by the last bit after the subtraction)
        inside = _fill_rings(np.round((xy - (x0, y0)) * scale, 6), ring, (h, w), s)
        cover += inside.astype(np.float32) / (s * s)
    return np.minimum(cover, 1, out=cover)


def _fill_rings(xy: np.ndarray, ring: np.ndarray, shape: tuple[int, int], s: int = 1) -> np.ndarray:
    """h×w uint16: how many of each pixel's s×s fine pixels (``xy`` in fine px, fine pixel (i, j) spanning
    [j, j+1] × [i, i+1]; ``ring``: each vertex's ring) have their centre inside the closed rings, by the even-odd
    rule, so holes stay empty. Each edge's crossings of the fine rows' centre lines (half open: a vertex counts
    once), sorted along each row and paired: every pair covers the fine pixels between, added as differences into
    the row of pixels it falls in (a row's s fine rows together: s× less to sum than one row each), summed along
    the row, then over each pixel's s fine columns."""
    h, w = shape
    H, W = h * s, w * s
    same = ring[1:] == ring[:-1]
    (ax, ay), (bx, by) = xy[:-1][same].T, xy[1:][same].T
    lo, hi = np.minimum(ay, by), np.maximum(ay, by)
    r0 = np.ceil(lo - 0.5).astype(np.int64)  # the first row whose centre r + 0.5 is ≥ lo
    n = np.maximum(np.ceil(hi - 0.5).astype(np.int64) - r0, 0)  # rows with centres in [lo, hi)
    edge = np.repeat(np.arange(len(n)), n)
    row = r0[edge] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    yc = row + 0.5
    x = ax[edge] + (yc - ay[edge]) * (bx[edge] - ax[edge]) / (by[edge] - ay[edge])
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    start, end, row = x[0::2], x[1::2], row[0::2]  # a closed ring crosses each row an even number of times
    keep = (row >= 0) & (row < H)
    i0 = np.clip(np.ceil(start[keep] - 0.5), 0, W).astype(np.int64)  # the first pixel centre ≥ start
    i1 = np.clip(np.ceil(end[keep] - 0.5), 0, W).astype(np.int64)
    diff = np.zeros((h, W + 1), np.int8)  # a row's pairs never overlap: a fine column counts 0..s of its fine rows
    np.add.at(diff, (row[keep] // s, i0), 1)
    np.add.at(diff, (row[keep] // s, i1), -1)
    fine = np.cumsum(diff[:, :W], axis=1, dtype=np.int8)
    return fine.reshape(h, w, s).sum(-1, dtype=np.uint16)


def tinted(picture: np.ndarray, coverage: list[np.ndarray], colors: list, alpha: float) -> np.ndarray:
    """``picture`` (h×w×3 float in [0, 1]) with each class's colour laid over it, ``alpha`` × its coverage."""
    for cov, col in zip(coverage, colors):
        a = alpha * cov[..., None]
        picture = (1 - a) * picture + a * np.asarray(col, np.float32) / 255
    return picture


def overlay_pictures(thumbnail: np.ndarray, coverage: list[np.ndarray], colors: list,
                     sizes: tuple[tuple[int, int], tuple[int, int]] | None = None) -> list[np.ndarray]:  # fmt: skip
    """The pictures of the overlay (h×w×3 float in [0, 1]): every class over the thumbnail, then, for more than
    one class, each class alone over a faded grey thumbnail. SegPath's cell types overlap (lymphocytes, plasma
    cells and myeloid cells are leukocytes too): in one picture the classes drawn last hide the others.

    ``sizes``: ``(w, h)`` of the first picture and of the others, at most the thumbnail's; the thumbnail and the
    coverage are area-averaged to them first (a coverage keeps its area) — None: the thumbnail's size."""
    full = thumbnail.shape[1::-1]
    big, small = sizes or (full, full)
    img = shrink(thumbnail.astype(np.float32) / 255, big)
    pictures = [tinted(img, [shrink(c, big) for c in coverage], colors, 0.55)]
    if len(coverage) > 1:
        img = shrink(thumbnail.astype(np.float32) / 255, small)
        faded = np.repeat(0.35 + 0.5 * img.mean(-1, keepdims=True), 3, axis=-1)
        pictures += [tinted(faded, [shrink(cov, small)], [col], 0.8) for cov, col in zip(coverage, colors)]
    return pictures


def shrink(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``picture`` area-averaged to ``size`` (w, h); as it is when it has that size already."""
    import cv2

    if picture.shape[1::-1] == tuple(size):
        return picture
    return cv2.resize(picture, tuple(size), interpolation=cv2.INTER_AREA)


def shown_size(ax, image_size: tuple[int, int]) -> tuple[int, int]:
    """The pixels (w, h) an image of ``image_size`` fills in ``ax`` at the figure's dpi (its aspect kept), never
    more than its own."""
    w, h = image_size
    scale = min(1.0, display_scale(ax, image_size))
    return max(1, round(w * scale)), max(1, round(h * scale))


# the small pictures' least width (inches: a class name of 18 characters and its area, at 7 pt) and least row height
SMALL_TITLE_IN, SMALL_ROW_IN = 1.3, 0.8


def save_overlay(path: Path, thumbnail: np.ndarray, coverage: list[np.ndarray] | Callable[..., list[np.ndarray]],
                 classes: list[str], colors: list, title: str, areas_mm2: list[float]) -> Path:  # fmt: skip
    """The thumbnail with every class in its colour, as much as its polygons cover each pixel (``coverage``: h×w
    in [0, 1] per class, :func:`polygon_coverage`; or a function of a picture's ``(w, h)`` giving them at that size,
    called once, at the size the thumbnail is shown with), each class alone in a small picture beside it (below it
    for a wide slide), and a legend with the classes' areas."""
    from matplotlib.patches import Patch

    plt = pyplot()
    h, w = thumbnail.shape[:2]
    big_w, big_h = 8 * w / max(h, w), 8 * h / max(h, w)  # inches
    n = len(classes) if len(classes) > 1 else 0
    k = max(1, math.ceil(n / 2))  # the small pictures: 2 × k, together as long as the big one's side
    slots = [f"c{i}" if i < n else "." for i in range(2 * k)]
    if not n:
        layout, size, ratios = [["all"]], (big_w, big_h), {}
    elif h > w:  # to the right: k rows of 2, each column wide enough for its titles (a thin slide's are not)
        layout = [["all", *slots[2 * r : 2 * r + 2]] for r in range(k)]
        small_w = max(big_w / k, SMALL_TITLE_IN)
        size, ratios = (big_w + 2 * small_w, big_h + 0.45 * k), {"width_ratios": [big_w, small_w, small_w]}
    else:  # below: 2 rows of k, each row tall enough for a picture under its titles
        layout = [["all"] * k, slots[:k], slots[k:]]
        small_h = max(big_h / k, SMALL_ROW_IN)
        size, ratios = (
            (max(big_w, k * SMALL_TITLE_IN), big_h + 2 * small_h + 0.9),
            {"height_ratios": [big_h, small_h, small_h]},
        )
    fig, axes = plt.subplot_mosaic(layout, figsize=(size[0] + 0.4, size[1] + 0.9), dpi=110, **ratios)
    for name, ax in axes.items():
        ax.set_axis_off()
        if name != "all":
            i = int(name[1:])
            ax.set_title(f"{classes[i]}\n{areas_mm2[i]:.3g} mm²", fontsize=7, pad=2)
    fig.suptitle(title, fontsize=9)
    handles = [
        Patch(color=np.asarray(c) / 255, label=f"{n} ({a:.3g} mm²)") for n, c, a in zip(classes, colors, areas_mm2)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, max(1, len(handles))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * math.ceil(len(handles) / 4), 1, 0.97), h_pad=0.6, w_pad=0.4)
    # The pictures are made at the pixels they are shown with: blended at the thumbnail's size (up to 2,048 px, nine
    # pictures) and shrunk by matplotlib, one slide's overlay took 3-5 s, on the thread that closes the slides.
    big = shown_size(axes["all"], (w, h))
    small = shown_size(axes["c0"], (w, h)) if n else big
    if callable(coverage):  # drawn at the size shown: filling polygons at the thumbnail's is most of the work
        coverage, thumbnail = coverage(big), shrink(thumbnail, big)
    pictures = overlay_pictures(thumbnail, coverage, colors, (big, small))
    for name, ax in axes.items():
        ax.imshow(pictures[0 if name == "all" else int(name[1:]) + 1], interpolation="antialiased")
    return save_png(fig, path, dpi="figure", bbox_inches="tight")

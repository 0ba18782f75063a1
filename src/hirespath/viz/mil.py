"""Attention heatmaps of slide-level MIL: each tile drawn at its level-0 coords over the slide thumbnail, coloured
by its attention weight (by default its percentile within the slide, as CLAM's heatmaps, since a few tiles take
most of the weight). Without the slide file the tiles are drawn on a white canvas of the coords' extent.

Tied weights share a colour (their mean percentile), and a slide whose weights are all equal (mean pooling's 1/n, or
an attention head that gave every tile the same weight up to rounding) is drawn in one colour, titled as uniform:
ranking equal numbers would paint a blue-to-red picture of nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from ..wsi import qupath
from ..wsi.reader import SlideError, open_slide, read_thumbnail
from .figures import dpi_showing, pyplot, save_png

log = logging.getLogger("hirespath.viz")


def infer_tile_size(coords: np.ndarray) -> int | None:
    """The tile side in level-0 pixels from a grid of coords (smallest positive step in x or y), None if unknown."""
    steps = []
    for axis in (0, 1):
        u = np.unique(coords[:, axis])
        if len(u) > 1:
            steps.append(int(np.diff(u).min()))
    return min(steps) if steps else None


UNIFORM_RTOL = 1e-4  # weights within this relative spread count as equal (float32 softmax rounding is ~1e-7)


def is_uniform(attention: np.ndarray) -> bool:
    """Every weight the same up to ``UNIFORM_RTOL`` of the largest."""
    a = np.asarray(attention, dtype=np.float64)
    return len(a) == 0 or float(a.max() - a.min()) <= UNIFORM_RTOL * float(np.abs(a).max())


def attention_scaled(attention: np.ndarray, scale: str) -> np.ndarray:
    """The colour values in [0, 1]: the weights' percentiles (ties share their mean rank) or min-max scaled; a
    uniform slide gets 0.5 for every tile, so it shows in one colour whatever the scale."""
    if scale not in ("percentile", "minmax"):
        raise ValueError(f"scale must be 'percentile' or 'minmax', got {scale!r}")
    a = np.asarray(attention, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{int((~np.isfinite(a)).sum())} of {len(a)} attention weights are not finite")
    if is_uniform(a):
        return np.full(len(a), 0.5)
    if scale == "percentile":
        _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts  # rank of each distinct value's first occurrence in sorted order
        return (first + (counts - 1) / 2)[inverse] / (len(a) - 1)
    return (a - a.min()) / (a.max() - a.min())


def _footprint(x: float, y: float, sx: float, sy: float, tile: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the image px a tile at level-0 (x, y) covers, at least one px; x0 and y0 may be negative
    (a tile starting before the image, i.e. before QuPath's crop of the slide)."""
    x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
    return x0, y0, max(x0 + 1, int(round((x + tile) * sx))), max(y0 + 1, int(round((y + tile) * sy)))


def tile_overlay(coords: np.ndarray, values: np.ndarray, shape: tuple[int, int], sx: float, sy: float, tile: int):
    """An H×W array (``shape``) with each tile's value over its footprint (level-0 coords scaled by ``sx``, ``sy``)
    and NaN where no tile lies; where tiles overlap the larger value shows."""
    overlay = np.full(shape, np.nan)
    for (x, y), v in zip(coords, values):
        x0, y0, x1, y1 = _footprint(x, y, sx, sy, tile)
        x0, y0 = max(x0, 0), max(y0, 0)  # a tile that starts before the image (its crop) is drawn from its edge
        overlay[y0:y1, x0:x1] = np.fmax(overlay[y0:y1, x0:x1], v)
    return overlay


def token_values(attention: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """N×rows×cols: each tile's attention spread over its patches in proportion to their global-attention scores
    (a tile's patches sum to its attention; a tile whose scores are all 0 spreads it evenly)."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0, None)
    total = s.sum(axis=(1, 2), keepdims=True)
    s = np.where(total > 0, s / np.where(total > 0, total, 1), 1.0 / (s.shape[1] * s.shape[2]))
    return np.asarray(attention, dtype=np.float64)[:, None, None] * s


def token_overlay(coords: np.ndarray, values: np.ndarray, shape: tuple[int, int], sx: float, sy: float, tile: float):
    """As :func:`tile_overlay` with one value per patch: ``values`` N×rows×cols, each tile's footprint split into its
    rows×cols patch cells (nearest neighbour, one vectorised paint per tile)."""
    overlay = np.full(shape, np.nan)
    rows, cols = values.shape[1:]
    for (x, y), v in zip(coords, values):
        x0, y0, x1, y1 = _footprint(x, y, sx, sy, tile)
        top, left = max(y0, 0), max(x0, 0)  # the part inside the image (a tile may start before its crop)
        region = overlay[top:y1, left:x1]
        if region.size == 0:
            continue
        ri = (np.arange(region.shape[0]) + top - y0) * rows // (y1 - y0)
        ci = (np.arange(region.shape[1]) + left - x0) * cols // (x1 - x0)
        region[:] = np.fmax(region, v[ri[:, None], ci[None, :]])
    return overlay


def _thumbnail(slide_path, max_side: int):
    """(RGB array, its long side ``max_side`` or the region's own when smaller; (x, y, width, height): the level-0
    region it shows) of the image QuPath shows of the slide (the whole slide, or the scanned region of a MIRAX or
    SCN slide, whose canvas can be several times larger and empty), or None when it cannot be read.

    Read as the tissue thumbnails are (:func:`~hirespath.wsi.reader.read_thumbnail`: in strips, at a level that
    holds ``max_side`` px), not with ``get_thumbnail``, which reads the level whole: a one-level 50,000 px slide
    would be 10 GB."""
    try:
        slide = open_slide(slide_path)
    except SlideError as err:
        log.warning("heatmap without thumbnail: %s", err)
        return None
    try:
        region = qupath.image_region(slide)
        image, _ = read_thumbnail(slide, 2 * max_side, region)  # long side max_side to 2·max_side
        thumb = Image.fromarray(image).convert("RGB")
        thumb.thumbnail((max_side, max_side), Image.LANCZOS)
        return np.asarray(thumb), region
    except Exception as err:  # noqa: BLE001 — corrupt slides surface as many exception types
        log.warning("heatmap without thumbnail: cannot read %s: %s", Path(slide_path).name, err)
        return None
    finally:
        slide.close()


def attention_heatmap(
    coords: np.ndarray,
    attention: np.ndarray,
    path: str | Path,
    tile_size: int | None = None,
    slide_path: str | Path | None = None,
    title: str = "",
    max_side: int = 1024,
    scale: str = "percentile",
    cmap: str = "jet",
    alpha: float = 0.5,
    token_scores: np.ndarray | None = None,
) -> Path:
    """Write a PNG of the attention of one slide. ``coords``: N×2 level-0 (x, y) of the tiles' top-left corners;
    ``tile_size``: tile side in level-0 pixels (inferred from the coords grid when None); ``slide_path``: the
    slide, whose thumbnail (long side ``max_side``) is the background when it can be read. ``token_scores``
    (N×rows×cols, the tiles' patch scores): drawn at patch resolution, tile attention × the patches' share of the
    tile's scores (:func:`token_values`), ranked over all patches."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    attention = np.asarray(attention, dtype=np.float64).reshape(-1)
    if len(coords) != len(attention):
        raise ValueError(f"{len(attention)} attention weights but {len(coords)} coords")
    if len(coords) == 0 or (coords < 0).all():
        raise ValueError("no tile coords to draw (the feature file had no 'coords')")
    tile = int(tile_size or infer_tile_size(coords) or 1)
    thumb = _thumbnail(slide_path, max_side) if slide_path is not None else None
    if thumb is not None:
        image, (ox, oy, w0, h0) = thumb
        coords = coords - np.array([ox, oy])  # QuPath's image of the slide starts there
    else:
        w0, h0 = int(coords[:, 0].max()) + tile, int(coords[:, 1].max()) + tile
        s = min(1.0, max_side / max(w0, h0))  # as the thumbnail: max_side, or the slide's own size when smaller
        image = np.full((max(1, round(h0 * s)), max(1, round(w0 * s)), 3), 255, dtype=np.uint8)
    sy, sx = image.shape[0] / h0, image.shape[1] / w0
    if token_scores is not None:
        values = token_values(attention, token_scores)
        if values.shape[0] != len(coords):
            raise ValueError(f"{values.shape[0]} tiles of token scores but {len(coords)} coords")
        uniform = is_uniform(values.ravel())
        scaled = attention_scaled(values.ravel(), scale).reshape(values.shape)
        overlay = token_overlay(coords, scaled, image.shape[:2], sx, sy, tile)
    else:
        uniform = is_uniform(attention)
        overlay = tile_overlay(coords, attention_scaled(attention, scale), image.shape[:2], sx, sy, tile)
    plt = pyplot()
    h, w = image.shape[:2]
    # the picture's long side 7 inches (a tall slide's too: its height grew with the aspect, 22,000 px for 27:1)
    fig, ax = plt.subplots(figsize=(7, max(2.0, 7 * h / w)) if h <= w else (max(3.0, 7 * w / h + 1.2), 7.6))
    try:
        ax.imshow(image)
        im = ax.imshow(np.ma.masked_invalid(overlay), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
        if uniform:  # one colour: a colour bar would suggest a scale the weights do not have
            title = f"{title or f'{len(coords)} tiles'}\nuniform attention: every tile weighted {attention[0]:.3g}"
        else:
            label = "attention (percentile)" if scale == "percentile" else "attention"
            fig.colorbar(im, ax=ax, fraction=0.03, label=label)
        ax.set_title(title or f"{len(coords)} tiles", fontsize=9)
        ax.axis("off")
        fig.tight_layout()
        # the thumbnail at its own pixels (max_side): at a fixed dpi it was shown ~700 px whatever max_side said
        dpi = dpi_showing(fig, ax, (w, h))
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path, dpi=dpi, bbox_inches="tight")  # a long title over a thin slide's narrow figure


def attention_heatmaps(
    attention_dir: str | Path,
    out_dir: str | Path,
    slide_ids: Iterable[str] | None = None,
    slide_path: Callable[[str], str | Path | None] | None = None,
    limit: int | None = 4,
    name: str = "{}.png",
    **kwargs,
) -> list[Path]:
    """Heatmap PNGs ``out_dir/<slide>.png`` from the ``attention/<slide>.h5`` files of ``write_mil_outputs``: of
    ``slide_ids`` (default: every file by name), the first ``limit`` that have coords (slides whose feature file
    had none get no heatmap). ``slide_path(slide_id)`` locates the slide file for the thumbnail (e.g. PANDA:
    ``lambda s: root / "train_images" / f"{s}.tiff"``; a path that does not exist: no thumbnail). ``name``: the file
    name pattern."""
    from ..modules.mil import read_attention

    attention_dir = Path(attention_dir)
    files = (
        [attention_dir / f"{s}.h5" for s in slide_ids] if slide_ids is not None else sorted(attention_dir.glob("*.h5"))
    )
    paths = []
    for f in files:
        if limit is not None and len(paths) >= limit:  # the first ``limit`` drawn: slides without coords not counted
            break
        if not f.is_file():
            raise FileNotFoundError(f"no attention file {f} (written by write_mil_outputs)")
        a = read_attention(f)
        sid = str(a.get("slide_id", f.stem))
        if (a["coords"] < 0).all():
            log.info("no heatmap for %s: its feature file has no coords", sid)
            continue
        title = f"{sid}: label {a.get('label')}, pred {a.get('pred')}, {len(a['attention'])} tiles"
        slide = slide_path(sid) if slide_path else None
        paths.append(
            attention_heatmap(
                a["coords"],
                a["attention"],
                Path(out_dir) / name.format(sid),
                tile_size=a["tile_size"],
                slide_path=slide if slide is not None and Path(slide).is_file() else None,
                title=title,
                **kwargs,
            )
        )
    return paths

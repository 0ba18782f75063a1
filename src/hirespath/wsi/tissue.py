"""Tissue on a slide's thumbnail and the grid of large tiles kept for a run, at a target µm/px.

The grid follows TRIDENT's patcher (``trident/wsi_objects/WSIPatcher.py``) so our coordinate files mean what theirs
mean: level-0 top-left (x, y) of every tile, in raster order, stride ``patch_size_level0 − overlap_level0``
from (0, 0), columns and rows until the slide's width and height are covered (the last tiles may reach past the edge);
segmentation's covering grid is the same grid shifted by less than a stride where that holds the tissue in fewer
tiles (``fitted_covering_grid``). Unlike TRIDENT, the scale is the exact ``tile_mpp / slide_mpp`` (TRIDENT rounds
both magnifications to 40x/20x/…, so its "20x" tiles of a 0.2527 µm/px slide are 0.5054 µm/px): a tile of
``tile_size`` px at ``tile_mpp`` covers ``patch_size_level0 = round(tile_size · tile_mpp / slide_mpp)`` level-0
pixels, the region that is actually read. Writing ``level0_magnification = 10 / slide_mpp`` and
``target_magnification = 10 / tile_mpp`` (unrounded) into the coordinate files makes TRIDENT's own formula
``round(patch_size · level0_magnification / target_magnification)`` give the same integer, so its readers and
patchers re-read exactly our tiles; the float side differs from that integer by at most half a level-0 pixel.
"""

from __future__ import annotations

import heapq
import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np

from ..utils.errors import InputError
from . import qupath
from .reader import SlideError, best_level, level0_mpp, open_slide, read_thumbnail


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (between-class variance maximum)."""
    hist = np.bincount(values.ravel().astype(np.uint8), minlength=256).astype(np.float64)
    prob = hist / max(hist.sum(), 1)
    omega = np.cumsum(prob)
    mu = np.cumsum(prob * np.arange(256))
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = (mu_t * omega - mu) ** 2 / (omega * (1 - omega))
    sigma_b = np.nan_to_num(sigma_b)
    return float(np.argmax(sigma_b))


def tissue_mask(rgb: np.ndarray, min_saturation: int = 20, threshold: float | None = None) -> np.ndarray:
    """Tissue = saturation (0–255) above Otsu's threshold (and above a floor, so a blank slide has none), or above
    a fixed ``threshold`` (CLAM's ``sthresh``). Otsu's threshold splits the image where it is most bimodal: glass
    from tissue on a slide, but pale from dense tissue on an exported region or crop with little glass, which then
    loses its pale tissue; a fixed threshold does not depend on what else the image holds."""
    rgb = rgb[..., :3].astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0) * 255
    sat = sat.astype(np.uint8)
    # not tissue: near-black (scanner fill, black pen) and green/blue ink. H&E is red-dominant: green above red
    # is never stain; blue far above red is marker ink (dense hematoxylin stays within ~40 of red at thumbnail scale)
    dark = mx <= 50
    pen = (g > r + 10) | (b > r + 60)
    sat[dark] = 0  # background for Otsu, never tissue
    if pen.all():
        return np.zeros(sat.shape, bool)
    thr = max(otsu_threshold(sat[~pen]), min_saturation) if threshold is None else threshold
    return ~pen & ~dark & (sat > thr)


def tissue_thumbnail(
    slide, max_side: int, region: tuple[int, int, int, int], threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    """(RGB thumbnail, its tissue mask, level-0 px per mask px (x, y), level-0 (x, y) of the mask's top-left) of
    ``region`` of the slide (x, y, width, height in level-0 px: QuPath's image of it, ``qupath.image_region``);
    ``threshold``: :func:`tissue_mask`'s (None: Otsu's)."""
    thumb, downsample = read_thumbnail(slide, max_side, region)
    return thumb, tissue_mask(thumb, threshold=threshold), downsample, (int(region[0]), int(region[1]))


@dataclass
class TileGrid:
    """The tiles of one slide kept for embedding, with what the h5 files and thumbnails need."""

    coords: np.ndarray  # N×2 int64 level-0 top-left (x, y), raster order
    tile_size: int  # px of the encoder's input (TRIDENT's patch_size)
    tile_mpp: float  # µm/px of the encoder's input
    overlap: int  # px at tile_mpp between neighbouring tiles
    slide_mpp: float  # level-0 µm/px
    patch_size_level0: int  # level-0 px read per tile: round(tile_size · tile_mpp / slide_mpp)
    stride_level0: int  # level-0 px between tiles: patch_size_level0 − round(overlap · tile_mpp / slide_mpp)
    level0_size: tuple[int, int]  # (width, height)
    read_level: int  # pyramid level the tiles are read from
    read_downsample: float  # its downsample
    grid_shape: tuple[int, int]  # (rows, cols) of the full grid before the tissue filter
    tissue_fraction: np.ndarray  # N tissue fraction of each kept tile (outside the slide counts as glass)
    tissue_area_mm2: float  # tissue on the mask
    min_tissue: float
    cover_tissue: bool = False  # low-tissue tiles added so that the kept ones hold every tissue pixel
    tissue_threshold: float | None = None  # saturation above which a pixel is tissue (None: Otsu's, tissue_mask)
    grid_offset: tuple[int, int] = (0, 0)  # level-0 px the grid starts left of and above (0, 0) (fitted_covering_grid)
    mask: np.ndarray | None = field(default=None, repr=False)  # tissue mask (bool) on the thumbnail
    mask_downsample: tuple[float, float] = (1.0, 1.0)  # level-0 px per mask px (x, y)
    # level-0 (x, y) of the mask's top-left: the thumbnail shows QuPath's image of the slide (qupath.image_region),
    # the whole slide except for slides QuPath crops to their scanned region (MIRAX, Leica SCN)
    mask_origin: tuple[int, int] = (0, 0)
    thumbnail: np.ndarray | None = field(default=None, repr=False)  # RGB the mask was computed on

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def level0_magnification(self) -> float:
        return 10.0 / self.slide_mpp

    @property
    def target_magnification(self) -> float:
        return 10.0 / self.tile_mpp


def check_tiling(tile_size: int, tile_mpp: float, overlap: int = 0, min_tissue: float = 0.25,
                 tissue_threshold: float | None = None) -> None:  # fmt: skip
    """Clear errors for a tiling that cannot work, before any slide is opened."""
    if not (isinstance(tile_size, numbers.Integral) and tile_size > 0):
        raise InputError(f"tile_size must be a positive integer of pixels, got {tile_size!r}")
    if not (isinstance(tile_mpp, numbers.Real) and tile_mpp > 0 and math.isfinite(tile_mpp)):
        raise InputError(f"tile_mpp must be a positive number of µm per pixel (0.5 = 20x), got {tile_mpp!r}")
    if not (isinstance(overlap, numbers.Integral) and 0 <= overlap < tile_size):
        raise InputError(f"overlap must be an integer in [0, tile_size={tile_size}), got {overlap!r}")
    if not (0 <= min_tissue <= 1):
        raise InputError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}")
    check_tissue_threshold(tissue_threshold)


def check_tile_multiple(tile_size: int, patch_size: int, whose: str, source: str = "") -> None:
    """A tile of ``tile_size`` px is a whole number of patches; the error names the nearest sizes that are
    (``whose``: "the encoder's", "the model's"; ``source``: the model's file, named in the error)."""
    size, p = int(tile_size), int(patch_size)
    if p and size % p:
        near = " or ".join(str(n) for n in dict.fromkeys([size // p * p or p, (size // p + 1) * p]))
        source = f" ({source})" if source else ""
        raise InputError(f"tile.size={size} is not a multiple of {whose} patch size {p}{source}; use {near}")


def check_tissue_threshold(tissue_threshold: float | None) -> None:
    """None (Otsu's threshold per slide) or a saturation in [0, 255) (:func:`tissue_mask`)."""
    if tissue_threshold is not None and not (
        isinstance(tissue_threshold, numbers.Real) and not isinstance(tissue_threshold, bool)
        and 0 <= tissue_threshold < 255
    ):  # fmt: skip
        raise InputError(
            "tissue_threshold must be null (Otsu's threshold of each slide's saturation) or a saturation in "
            f"[0, 255) above which a pixel is tissue (e.g. 20; CLAM's sthresh), got {tissue_threshold!r}"
        )


def tile_size_level0(tile_size: int, tile_mpp: float, slide_mpp: float) -> int:
    """TRIDENT's ``round(patch_size · level0_mag / target_mag)`` with the unrounded magnifications 10/mpp."""
    return max(1, round(tile_size * (10.0 / slide_mpp) / (10.0 / tile_mpp)))


# a piece of tissue smaller than this share of a tile's area gets no tile of its own when covering the tissue
SPECK_SHARE = 0.01


def mask_boxes(mask_shape: tuple[int, int], mask_downsample: tuple[float, float], coords: np.ndarray,
               side0: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:  # fmt: skip
    """N×5: (y0, y1, x0, x1) of each level-0 square (x, y, side0) on the mask (whose top-left is the level-0
    ``origin``), clipped to it, and its unclipped area in mask px. A grid's neighbouring squares meet or overlap on
    the mask too, so their boxes cover all of it."""
    h, w = mask_shape
    dx, dy = mask_downsample
    xs, ys = coords[:, 0] - origin[0], coords[:, 1] - origin[1]
    x0 = np.round(xs / dx).astype(np.int64)
    y0 = np.round(ys / dy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((xs + side0) / dx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((ys + side0) / dy).astype(np.int64))
    return np.stack([np.clip(y0, 0, h), np.clip(y1, 0, h), np.clip(x0, 0, w), np.clip(x1, 0, w),
                     (x1 - x0) * (y1 - y0)], 1)  # fmt: skip


def _integral(mask: np.ndarray) -> np.ndarray:
    return np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)


def _box_sums(mask: np.ndarray, boxes: np.ndarray, ii: np.ndarray | None = None) -> np.ndarray:
    """Pixels set in each (y0, y1, x0, x1) box of ``mask``; ``ii``: its ``_integral`` when already made."""
    ii = _integral(mask) if ii is None else ii
    y0, y1, x0, x1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


def tissue_fractions(
    mask: np.ndarray, mask_downsample: tuple[float, float], coords: np.ndarray, side0: int,
    origin: tuple[int, int] = (0, 0), ii: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Fraction of each level-0 square (x, y, side0) that is tissue on ``mask`` (its top-left at the level-0
    ``origin``); outside the mask counts as glass. ``ii``: the mask's ``_integral`` when already made."""
    boxes = mask_boxes(mask.shape, mask_downsample, coords, side0, origin)
    return _box_sums(mask, boxes, ii) / boxes[:, 4].astype(np.float64)


def covering_tiles(mask: np.ndarray, mask_downsample: tuple[float, float], coords: np.ndarray, side0: int,
                 keep: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray:  # fmt: skip
    """``keep`` and the fewest other tiles (greedy set cover) that together hold every tissue pixel of ``mask``,
    specks aside (pieces of tissue under ``SPECK_SHARE`` of a tile: debris and stray cells, not worth a forward).

    Segmentation must cover all the tissue, but a tile filter such as ``min_tissue`` drops the tiles at the
    tissue's border and small fragments (on a real H&E slide 1–3 % of the tissue at 10 %); covering it with every
    tile that touches tissue instead costs up to 1.7× the forwards. Greedy by the uncovered tissue each tile
    would add (re-counted lazily: a tile's gain only falls), ties in raster order."""
    import cv2

    boxes = mask_boxes(mask.shape, mask_downsample, coords, side0, origin)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    speck = stats[:, cv2.CC_STAT_AREA] < SPECK_SHARE * side0**2 / (mask_downsample[0] * mask_downsample[1])
    left = mask & ~speck[labels]
    keep = keep.copy()
    if not keep.any() and not left.any() and mask.any():
        # all the tissue is specks (a region exported smaller than 1 % of a tile): one tile, the one holding the
        # most of it, rather than a slide refused
        keep[int(np.argmax(_box_sums(mask, boxes)))] = True
        return keep
    for y0, y1, x0, x1, _ in boxes[keep]:
        left[y0:y1, x0:x1] = False
    gains = _box_sums(left, boxes)
    heap = [(-int(g), int(i)) for i, g in enumerate(gains) if g > 0 and not keep[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        y0, y1, x0, x1, _ = boxes[i]
        gain = int(left[y0:y1, x0:x1].sum())
        if not gain:
            continue
        if heap and gain < -heap[0][0]:  # another tile now adds more: count this one again later
            heapq.heappush(heap, (-gain, i))
            continue
        keep[i] = True
        left[y0:y1, x0:x1] = False
    return keep


def _grey_hint(thumb: np.ndarray) -> str:
    """Why a slide with content has no tissue: grey pixels (a grayscale or single-channel fluorescence image), where
    tissue is found by its colour saturation, as in brightfield H&E."""
    rgb = np.asarray(thumb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.size == 0:
        return ""
    spread = rgb[..., :3].max(2).astype(np.int16) - rgb[..., :3].min(2)
    dark = rgb[..., :3].min(2) < 200  # content, not glass
    if dark.mean() > 0.01 and np.percentile(spread[dark], 99) <= 4:
        return (
            ": its pixels are grey (R = G = B: a grayscale or single-channel image); tissue is found by its "
            "colour saturation, as in brightfield RGB (H&E) slides"
        )
    return ""


def grid_coords(size0: tuple[int, int], stride0: int, offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, tuple]:
    """Level-0 top-lefts (x, y), raster order, of the regular grid over a ``size0`` (width, height) slide whose
    first tile starts at ``-offset`` (TRIDENT's grid: offset 0), and its (rows, cols)."""
    (W, H), (ox, oy) = size0, offset
    cols, rows = math.ceil((W + ox) / stride0), math.ceil((H + oy) / stride0)
    yy, xx = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    return np.stack([xx.ravel() * stride0 - ox, yy.ravel() * stride0 - oy], 1), (rows, cols)


def _holds_min_tissue(frac: np.ndarray, min_tissue: float) -> np.ndarray:
    return (frac >= min_tissue) & (frac > 0)


def _kept(mask, mds, coords, side0, min_tissue, cover, origin, ii=None) -> tuple[np.ndarray, np.ndarray]:
    """(tissue fraction of every tile, which are kept): ``min_tissue`` tiles, and with ``cover`` the covering.
    ``ii``: the mask's ``_integral`` when already made."""
    frac = tissue_fractions(mask, mds, coords, side0, origin, ii)
    keep = _holds_min_tissue(frac, min_tissue)
    return frac, covering_tiles(mask, mds, coords, side0, keep, origin) if cover else keep


GRID_FIT_STEPS = 8  # offsets tried per axis when fitting the covering grid: multiples of stride / 8
GRID_FIT_FINALISTS = 4  # offsets whose covering is computed: the fewest tissue cells first


def map_step(side0: int, tile_size: int) -> int:
    """The smallest level-0 step that is a whole number of map px, for tiles of ``tile_size`` px read from
    ``side0`` level-0 px (2 at 0.5 µm/px on a 0.25 µm/px slide; ``side0`` itself where the ratio is not simple)."""
    return side0 // math.gcd(side0, tile_size)


def fitted_covering_grid(
    mask: np.ndarray, mds: tuple[float, float], size0: tuple[int, int], side0: int, stride0: int,
    min_tissue: float, origin: tuple[int, int] = (0, 0), align: int = 1,
) -> tuple[tuple[int, int], np.ndarray, tuple[int, int], np.ndarray, np.ndarray]:  # fmt: skip
    """The regular grid, shifted by less than a stride each way, whose covering tiling (``min_tissue`` tiles and
    ``covering_tiles``) holds the tissue in the fewest tiles — (0, 0), TRIDENT's grid, unless another needs fewer:
    ``(offset, coords, (rows, cols), tissue fraction, kept)`` as ``grid_coords`` and ``_kept`` give them.

    A piece of tissue needs as many tiles as grid lines cross it: a 1.6 mm square (7,300 px at 0.22 µm/px) takes
    5 × 5 tiles of 1,792 px (overlap 256) where the grid meets it well and 6 × 6 where it does not — the larger the
    tiles, the larger the share (docs/benchmarks.md, "tiles per tissue"). The offsets, multiples of a
    ``GRID_FIT_STEPS``-th of the stride, are ranked by the tiles the ``min_tissue`` rule keeps or whose own part of
    the grid (what their left and upper neighbours do not also cover) holds tissue, on one integral image; the
    covering is computed for the best ``GRID_FIT_FINALISTS`` and (0, 0). The offsets are multiples of ``align``
    level-0 px (with a stride that is one too: every tile then starts on a whole map px, see ``tile_grid``)."""
    ii = _integral(mask)
    steps = sorted({k * stride0 // GRID_FIT_STEPS // align * align for k in range(GRID_FIT_STEPS)})
    shared = side0 - stride0  # the overlap, level-0 px

    def cells(offset: tuple[int, int]) -> int:
        coords, _ = grid_coords(size0, stride0, offset)
        kept = _holds_min_tissue(tissue_fractions(mask, mds, coords, side0, origin, ii), min_tissue)
        own = tissue_fractions(mask, mds, coords + shared, stride0 - shared, origin, ii) > 0
        return int(np.count_nonzero(kept | own))

    ranked = sorted(((cells((ox, oy)), (ox, oy)) for oy in steps for ox in steps), key=lambda c: c[0])
    best = None
    for offset in [(0, 0)] + [o for _, o in ranked[:GRID_FIT_FINALISTS] if o != (0, 0)]:
        coords, shape = grid_coords(size0, stride0, offset)
        frac, keep = _kept(mask, mds, coords, side0, min_tissue, True, origin, ii)
        if best is None or keep.sum() < best[4].sum():
            best = (offset, coords, shape, frac, keep)
    return best


def tile_grid(
    slide,
    tile_size: int,
    tile_mpp: float,
    overlap: int = 0,
    min_tissue: float = 0.25,
    *,
    mpp: float | None = None,
    default_mpp: float | None = None,
    mask_max_side: int = 2048,
    keep_images: bool = True,
    cover_tissue: bool = False,
    region: tuple[int, int, int, int] | None = None,
    fit_grid: bool = True,
    tissue_threshold: float | None = None,
) -> TileGrid:
    """Tissue on a thumbnail (``read_thumbnail``), then the regular grid of ``tile_size`` px tiles at ``tile_mpp``
    µm/px over the whole slide; tiles with tissue fraction ≥ ``min_tissue`` (and > 0) are kept, and with
    ``cover_tissue`` also the fewest others that hold the tissue those miss (:func:`covering_tiles`: segmentation
    covers every tissue pixel).

    ``slide``: an open OpenSlide/TiffSlide or a path. ``mpp`` overrides the slide's level-0 µm/px,
    ``default_mpp`` is used only when the slide has none. Tissue is looked for in ``region`` (x, y, width, height
    in level-0 px; default QuPath's image of the slide, :func:`~hirespath.wsi.qupath.image_region`): a MIRAX or
    Leica SCN canvas can be several times its scanned region, and a thumbnail of the canvas would see the tissue
    coarser and smooth its outline by the canvas's size. The grid starts at the slide's (0, 0), as TRIDENT's;
    the covering grid is shifted by less than a stride each way where that needs fewer tiles
    (:func:`fitted_covering_grid`; its first column or row may then start left of or above the slide, read as glass;
    ``fit_grid=False`` keeps it at (0, 0)). ``tissue_threshold``: :func:`tissue_mask`'s (None: Otsu's).
    SlideError when there is no mpp, no tissue, or no tile holds enough of it.
    """
    check_tiling(tile_size, tile_mpp, overlap, min_tissue, tissue_threshold)
    if isinstance(slide, (str, os.PathLike)):
        handle = open_slide(slide)
        try:
            return tile_grid(
                handle,
                tile_size,
                tile_mpp,
                overlap,
                min_tissue,
                mpp=mpp,
                default_mpp=default_mpp,
                mask_max_side=mask_max_side,
                keep_images=keep_images,
                cover_tissue=cover_tissue,
                region=region,
                fit_grid=fit_grid,
                tissue_threshold=tissue_threshold,
            )
        finally:
            handle.close()
    smpp = level0_mpp(slide, mpp, default_mpp)
    W, H = slide.dimensions
    ds = tile_mpp / smpp
    side0 = tile_size_level0(tile_size, tile_mpp, smpp)
    stride0 = side0 - round(overlap * ds)
    if stride0 < 1:
        raise SlideError(f"overlap {overlap} px leaves no stride at {smpp:g} µm/px")
    region = qupath.image_region(slide) if region is None else region
    thumb, mask, mds, origin = tissue_thumbnail(slide, mask_max_side, region, tissue_threshold)
    if not mask.any():
        above = "" if tissue_threshold is None else f" above saturation {tissue_threshold:g} (tile.tissue_threshold)"
        raise SlideError(f"no tissue detected{above}" + _grey_hint(thumb))
    if cover_tissue and fit_grid:
        # segmentation stitches each tile into a map at tile_size / side0 map px per level-0 px: a tile whose corner
        # is not on a whole map px would be placed up to half a map px off (its neighbours blended out of register),
        # so where the ratio allows (0.5, 0.25, ...) stride and offsets are whole map px, the overlap < 1 px larger
        align = map_step(side0, tile_size)
        align = align if align <= stride0 // GRID_FIT_STEPS else 1
        stride0 = stride0 // align * align
        offset, coords, (rows, cols), frac, keep = fitted_covering_grid(
            mask, mds, (W, H), side0, stride0, min_tissue, origin, align
        )
    else:
        offset, (coords, (rows, cols)) = (0, 0), grid_coords((W, H), stride0)
        frac, keep = _kept(mask, mds, coords, side0, min_tissue, cover_tissue, origin)
    if not keep.any():
        raise SlideError(
            f"no tile of {tile_size} px at {tile_mpp:g} µm/px holds ≥ {min_tissue:.0%} tissue "
            f"(best {frac.max():.0%}); lower min_tissue"
        )
    level = best_level(slide.level_downsamples, side0 / tile_size)
    return TileGrid(
        coords=coords[keep],
        tile_size=int(tile_size),
        tile_mpp=float(tile_mpp),
        overlap=int(overlap),
        slide_mpp=smpp,
        patch_size_level0=side0,
        stride_level0=stride0,
        level0_size=(int(W), int(H)),
        read_level=level,
        read_downsample=float(slide.level_downsamples[level]),
        grid_shape=(rows, cols),
        tissue_fraction=frac[keep],
        min_tissue=float(min_tissue),
        cover_tissue=bool(cover_tissue),
        tissue_threshold=None if tissue_threshold is None else float(tissue_threshold),
        grid_offset=(int(offset[0]), int(offset[1])),
        tissue_area_mm2=float(mask.sum() * mds[0] * mds[1] * smpp**2 / 1e6),
        mask=mask if keep_images else None,
        mask_downsample=mds,
        mask_origin=origin,
        thumbnail=thumb if keep_images else None,
    )

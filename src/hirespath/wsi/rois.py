"""PANDA's fields of view: the square ROIs of a slide holding the most tissue, read at a chosen resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reader import SlideError, on_white, open_slide, slide_mpp, truncation
from .tissue import tissue_mask


@dataclass
class ROI:
    """A square field of view at level 0: top-left (x, y) and side in level-0 pixels."""

    x: int
    y: int
    size: int
    tissue_fraction: float


def find_rois(mask: np.ndarray, downsample: float, size0: int, count: int = 1, min_tissue: float = 0.05) -> list[ROI]:
    """The ``count`` non-overlapping windows of ``size0`` level-0 pixels holding the most tissue.

    ``mask`` is the tissue mask at a low level whose downsample to level 0 is ``downsample``. Windows slide on
    that low-level grid; each pick blanks its window so the next one is elsewhere.
    """
    side = max(1, int(round(size0 / downsample)))
    h, w = mask.shape
    m = mask.astype(np.float64)
    rois = []
    for _ in range(count):
        # integral image → tissue count of every side×side window (clipped at the border)
        ii = np.pad(m, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        ys = np.arange(0, max(1, h - side + 1))
        xs = np.arange(0, max(1, w - side + 1))
        y1 = np.minimum(ys + side, h)
        x1 = np.minimum(xs + side, w)
        sums = ii[y1][:, x1] - ii[ys][:, x1] - ii[y1][:, xs] + ii[ys][:, xs]
        iy, ix = np.unravel_index(np.argmax(sums), sums.shape)
        frac = float(sums[iy, ix]) / float(side * side)
        if frac < min_tissue:
            break
        rois.append(ROI(int(xs[ix] * downsample), int(ys[iy] * downsample), size0, frac))
        m[ys[iy] : ys[iy] + side, xs[ix] : xs[ix] + side] = 0
    return rois


def locate_rois(
    path: str | Path,
    fov_um: float,
    count: int = 1,
    min_tissue: float = 0.05,
    thumbnail_level: int | None = None,
    default_mpp: float | None = None,
) -> tuple[list[ROI], float]:
    """Tissue detection on a low level, then the best square ROIs of ``fov_um`` microns. Returns (rois, mpp)."""
    cut = truncation(path) if Path(path).is_file() else None
    if cut:
        raise SlideError(cut)
    slide = open_slide(path)
    try:
        mpp = slide_mpp(slide, default_mpp)
        level = slide.level_count - 1 if thumbnail_level is None else min(thumbnail_level, slide.level_count - 1)
        w, h = slide.level_dimensions[level]
        thumb = np.asarray(on_white(slide.read_region((0, 0), level, (w, h))))
        mask = tissue_mask(thumb)
        if mask.mean() == 0:
            raise SlideError("no tissue detected")
        size0 = int(round(fov_um / mpp))
        # a slide smaller than the field of view keeps the field (same µm/px as every slide); the part beyond
        # the slide reads as transparent and is composited on white by _on_white
        rois = find_rois(mask, float(slide.level_downsamples[level]), size0, count, min_tissue)
        if not rois:
            raise SlideError(f"no {fov_um:g} µm window holds at least {min_tissue:.0%} tissue")
        return rois, mpp
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 — corrupt tiles surface as many exception types
        raise SlideError(f"cannot read {Path(path).name}: {err}") from err
    finally:
        slide.close()


def read_roi(path: str | Path, roi: ROI, resolution: int) -> np.ndarray:
    """Read ``roi`` and resize it to ``resolution``×``resolution`` (RGB uint8).

    The coarsest level that still has at least ``resolution`` pixels across the ROI is read, then resized
    with antialiasing: the same tissue at every resolution, as the paper simulates resolutions by resizing.
    """
    from PIL import Image

    slide = open_slide(path)
    try:
        level = 0
        for lv in range(slide.level_count):
            if roi.size / slide.level_downsamples[lv] >= resolution:
                level = lv
        side = int(round(roi.size / slide.level_downsamples[level]))
        region = on_white(slide.read_region((roi.x, roi.y), level, (side, side)))
        if region.size != (resolution, resolution):
            region = region.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
        return np.asarray(region)
    except Exception as err:  # noqa: BLE001
        raise SlideError(truncation(path) or f"cannot read ROI of {Path(path).name}: {err}") from err
    finally:
        slide.close()

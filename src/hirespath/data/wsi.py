"""Whole-slide image reading (OpenSlide, tiffslide fallback), tissue detection and ROI cutting."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("hirespath.wsi")


class SlideError(Exception):
    """A slide that cannot be used (unreadable, no mpp, no tissue); the run skips it and lists the reason."""


def truncation(path: str | Path) -> str | None:
    """Why a TIFF is truncated (its tiles reach past the end of the file), or None (not a TIFF, or complete).

    A truncated copy otherwise shows as a decoder error ("Empty input file") or, when only the small pyramid levels
    are cut, as a slide without tissue."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"):
        return None
    try:
        import tifffile

        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            end = max(
                (o + n for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts) if n),
                default=0,
            )
    except Exception:  # noqa: BLE001 — not a TIFF tifffile can parse: left to the readers' own errors
        return None
    if end > size:
        return f"truncated file {path.name}: {size} bytes, but its image data reaches byte {end}; copy it again"
    return None


def open_slide(path: str | Path):
    """Open a slide with OpenSlide, or tiffslide where OpenSlide is missing or refuses the file."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"missing file {path}")
    errors = []
    try:
        import openslide

        return openslide.OpenSlide(str(path))
    except Exception as err:  # noqa: BLE001 — OpenSlide raises several types for unreadable files
        errors.append(f"openslide: {err}")
    try:
        import tiffslide

        return tiffslide.TiffSlide(str(path))
    except Exception as err:  # noqa: BLE001
        errors.append(f"tiffslide: {err}")
    raise SlideError(truncation(path) or f"cannot read {path.name}: " + "; ".join(errors))


def slide_mpp(slide, default: float | None = None) -> float:
    """Microns per pixel at level 0, from OpenSlide/tiffslide properties (TIFF resolution tags), else ``default``."""
    props = slide.properties
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        value = props.get(key)
        if value not in (None, "", "0"):
            mpp = float(value)
            if mpp > 0:
                return mpp
    if default:
        log.warning("no microns-per-pixel in the TIFF tags; using data.default_mpp=%g", default)
        return float(default)
    raise SlideError("no microns-per-pixel in the slide's metadata (TIFF resolution tags); set data.default_mpp")


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


def tissue_mask(rgb: np.ndarray, min_saturation: int = 20) -> np.ndarray:
    """Tissue = saturation above Otsu's threshold (and above a floor, so a blank slide has none)."""
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
    thr = max(otsu_threshold(sat[~pen]), min_saturation)
    return ~pen & ~dark & (sat > thr)


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


def _on_white(region):
    """RGBA from read_region → RGB with transparent pixels (outside the scan, alpha-masked) white, not black."""
    from PIL import Image

    if region.mode != "RGBA":
        return region.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region).convert("RGB")


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
        thumb = np.asarray(_on_white(slide.read_region((0, 0), level, (w, h))))
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
        region = _on_white(slide.read_region((roi.x, roi.y), level, (side, side)))
        if region.size != (resolution, resolution):
            region = region.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
        return np.asarray(region)
    except Exception as err:  # noqa: BLE001
        raise SlideError(truncation(path) or f"cannot read ROI of {Path(path).name}: {err}") from err
    finally:
        slide.close()

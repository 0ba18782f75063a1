"""A slide opened and tiled: its tissue grid, reusing the tiling's patches file (:func:`patches_path`) when it matches.

Runs in the runner's background thread (the next slide is prepared while the current one runs). The consumers of
one tiling that tile the tissue alike share its patches file: embedding with any encoder ``patches/``, segmentation
with any model ``patches_cover_tissue/`` (the covering grid).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.io import out_of_storage
from ..wsi import qupath, trident_h5
from ..wsi.listing import SlideSpec
from ..wsi.reader import SlideError, best_level, level0_mpp, open_slide
from ..wsi.tissue import TileGrid, tile_grid, tissue_fractions, tissue_thumbnail
from .provenance import path_to_record, slide_bytes

log = logging.getLogger("hirespath.slides")

# tiles read at a finer mpp than the slide's by more than this factor are upsampled (interpolated): warned
UPSAMPLE_TOLERANCE = 1.05
# beyond this the slide's mpp is wrong, not the user's wish (a 40x scan given as mpp 40: tiles interpolated 80x,
# hours of them): the slide is skipped, naming it (a SegPath model, 0.22 µm/px, on a 5x scan is 9x)
MAX_UPSAMPLE = 16.0


@dataclass
class PreparedSlide:
    """A slide's tile grid (in the background thread while the previous slide runs)."""

    grid: TileGrid
    reused: bool
    open_s: float
    tissue_s: float
    # QuPath's image of the slide (x, y, w, h in level-0 px, qupath.image_region): the whole slide, or its crop
    qupath_region: tuple[int, int, int, int]
    warnings: list[str] = field(default_factory=list)
    slide_bytes: int | None = None  # the slide file's size (:func:`slide_bytes`), recorded with its grid
    slide_path: str | None = None  # the file (:func:`path_to_record`) its outputs record they were made from
    patches: Path | None = None  # the file the grid is stored in (None: not stored, another tool's file is there)


def cover_tissue(tiling) -> bool:
    """Whether the tiling covers every tissue pixel (segmentation) rather than keeping only ``min_tissue`` tiles."""
    return bool(getattr(tiling, "cover_tissue", False))


def tissue_threshold(tiling) -> float | None:
    """The fixed saturation above which a pixel is tissue (None: Otsu's threshold of each slide, the default)."""
    value = getattr(tiling, "tissue_threshold", None)
    return None if value is None else float(value) + 0.0  # -0.0 is 0.0 (one identity digest)


def patches_path(tiling_dir: Path, tiling, slide_id: str) -> Path:
    """The tiling's patches file of a slide: ``patches/`` (TRIDENT/CLAM's layout, ``min_tissue`` tiles), or
    ``patches_cover_tissue/`` for the covering grid, so that embedding and segmenting one tiling each keep theirs
    instead of tiling again over the other's file on every alternate run."""
    folder = trident_h5.PATCHES_COVER_TISSUE if cover_tissue(tiling) else trident_h5.PATCHES
    return tiling_dir / folder / f"{slide_id}_patches.h5"


def patches_attrs(slide_id: str, grid: TileGrid, tiling_dir: Path, qupath_region, nbytes, source) -> dict:
    """The coords attributes of a slide's patches file (TRIDENT's, the tissue area, and the slide file's size and
    path, :mod:`.provenance`); its features files carry the same, as TRIDENT copies them."""
    attrs = trident_h5.coords_attrs(grid, name=slide_id, savetodir=tiling_dir, tiling=tiling_dir.name,
                                    qupath_region=qupath_region)  # fmt: skip
    attrs["tissue_area_mm2"], attrs["slide_bytes"] = grid.tissue_area_mm2, nbytes
    if source is not None:
        attrs["slide_path"] = source
    return attrs


class ForeignPatches(Exception):
    """A patches file hirespath did not write (TRIDENT's or CLAM's: no ``target_mpp``): never replaced."""


def _grid_from_patches(slide, path: Path, tiling, smpp: float, nbytes: int) -> TileGrid | None:
    """The grid stored in an earlier run's patches file when it was tiled with the same settings from the same
    slide file (``nbytes``: its size now; files written before the size was recorded are compared by pixel size
    only), else None; :class:`ForeignPatches` for a file another tool wrote (its tiling is that tool's, kept)."""
    try:
        attrs, coords = trident_h5.read_coords(path)
        if "target_mpp" not in attrs and "level0_mpp" not in attrs:
            raise ForeignPatches(str(path))
        same = (
            int(attrs.get("slide_bytes", nbytes)) == nbytes
            and int(attrs["patch_size"]) == int(tiling.size)
            and int(attrs["overlap"]) == int(tiling.overlap)
            and np.isclose(float(attrs["target_mpp"]), float(tiling.mpp))
            and np.isclose(float(attrs["level0_mpp"]), smpp)
            # the slide replaced by another image (a re-export) since: its tissue is elsewhere
            and [int(attrs.get("level0_width", -1)), int(attrs.get("level0_height", -1))] == list(slide.dimensions)
            and np.isclose(float(attrs["min_tissue"]), float(tiling.min_tissue))
            and bool(attrs.get("cover_tissue", False)) == cover_tissue(tiling)
            and _same_threshold(attrs.get("tissue_threshold"), tissue_threshold(tiling))
            # a covering grid from before the grid was fitted to the tissue: tiled again (fewer tiles, once)
            and ("grid_offset_x" in attrs or not cover_tissue(tiling))
        )
    except (OSError, KeyError, ValueError) as err:
        log.warning("%s: unreadable patches file (%s); tiling again", path, err)
        return None
    if not same or not len(coords):
        log.info("%s was tiled with other settings; tiling again", path)
        return None
    size0 = int(attrs["patch_size_level0"])
    level = best_level(slide.level_downsamples, size0 / int(tiling.size))
    return TileGrid(
        coords=coords.astype(np.int64),
        tile_size=int(tiling.size),
        tile_mpp=float(tiling.mpp),
        overlap=int(tiling.overlap),
        slide_mpp=smpp,
        patch_size_level0=size0,
        stride_level0=int(attrs["stride_level0"]),
        level0_size=tuple(slide.dimensions),
        read_level=level,
        read_downsample=float(slide.level_downsamples[level]),
        grid_shape=(0, 0),
        tissue_fraction=np.full(len(coords), np.nan),
        min_tissue=float(tiling.min_tissue),
        cover_tissue=cover_tissue(tiling),
        tissue_threshold=tissue_threshold(tiling),
        grid_offset=(int(attrs.get("grid_offset_x", 0)), int(attrs.get("grid_offset_y", 0))),
        tissue_area_mm2=float(attrs.get("tissue_area_mm2", np.nan)),
    )


def _same_threshold(stored, wanted: float | None) -> bool:
    """A stored ``tissue_threshold`` attr (absent: Otsu's) is the tiling's: exactly (saturation is an integer
    compared with ``>``: 19.9999 and 20 keep other pixels)."""
    if stored is None or wanted is None:
        return stored is None and wanted is None
    return float(stored) == wanted


def prepare_slide(
    spec: SlideSpec,
    tiling,
    *,
    tiling_dir: Path,
    default_mpp: float | None,
    need_thumbnail: bool,
    mask_max_side: int = 2048,
    stored_since: int | None = None,
) -> PreparedSlide:
    """Open ``spec``, resolve its mpp, and compute (or reuse) its tile grid; any failure is a :class:`SlideError`
    naming the file (one bad slide is skipped, the run goes on). A stored grid older than ``stored_since`` (ns: the
    output folder's last overwrite, :meth:`Ledger.outputs_since`) is not reused: an overwrite tiles every slide as
    it is now."""
    t0 = time.perf_counter()
    try:
        slide = open_slide(spec.path)
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 — corrupt files surface as many exception types
        raise SlideError(f"cannot read {spec.path.name}: the file is corrupt or not a slide ({err})") from err
    t1 = time.perf_counter()
    warnings = []
    try:
        smpp = level0_mpp(slide, spec.mpp, default_mpp)
        if smpp > float(tiling.mpp) * MAX_UPSAMPLE:
            source = "the slides= CSV's mpp column" if spec.mpp is not None else "its metadata or data.default_mpp"
            raise SlideError(
                f"{spec.path.name}: tiles at {float(tiling.mpp):g} µm/px from a slide at {smpp:g} µm/px (from "
                f"{source}) would be interpolated {smpp / float(tiling.mpp):.0f}×, more than {MAX_UPSAMPLE:g}×: "
                "is that mpp right? (a 40x scan ≈ 0.25 µm/px, 20x ≈ 0.5)"
            )
        if float(tiling.mpp) * UPSAMPLE_TOLERANCE < smpp:
            warnings.append(
                f"upsampled: tiles at {float(tiling.mpp):g} µm/px from a slide scanned at {smpp:g} µm/px "
                f"({smpp / float(tiling.mpp):.2f}× interpolated)"
            )
            log.warning("%s: %s", spec.slide_id, warnings[-1])
        region = qupath.image_region(slide)
        patches = patches_path(tiling_dir, tiling, spec.slide_id)
        foreign, nbytes, source = False, slide_bytes(spec.path), path_to_record(spec.path)
        try:
            grid = _grid_from_patches(slide, patches, tiling, smpp, nbytes) if patches.is_file() else None
        except ForeignPatches:
            grid, foreign = None, True
        if grid is not None and stored_since is not None and patches.stat().st_mtime_ns < stored_since:
            grid = None  # tiled before the output folder's last overwrite: tiled again, as the slide is now
        reused = grid is not None
        if grid is None:
            grid = tile_grid(slide, int(tiling.size), float(tiling.mpp), int(tiling.overlap),
                             float(tiling.min_tissue), mpp=smpp, mask_max_side=mask_max_side,
                             cover_tissue=cover_tissue(tiling), region=region,
                             tissue_threshold=tissue_threshold(tiling))  # fmt: skip
            attrs = patches_attrs(spec.slide_id, grid, tiling_dir, region, nbytes, source)
            if foreign:  # TRIDENT's tiling in a shared job_dir: its features and later TRIDENT runs rely on it
                log.warning("%s: a patches file hirespath did not write (TRIDENT's?) is kept; the slide was tiled "
                            "by hirespath's rules and its grid is not stored", patches)  # fmt: skip
            else:
                trident_h5.write_patches_h5(patches, grid.coords, attrs)
        elif need_thumbnail:  # the tissue as tile_grid sees it: on QuPath's image of the slide
            grid.thumbnail, grid.mask, grid.mask_downsample, grid.mask_origin = tissue_thumbnail(
                slide, mask_max_side, region, tissue_threshold(tiling)
            )
            # the patches file keeps coordinates only: each tile's tissue again from the mask (the seam measure
            # picks its window by them; unknown, it picked none)
            grid.tissue_fraction = tissue_fractions(
                grid.mask, grid.mask_downsample, grid.coords, grid.patch_size_level0, grid.mask_origin
            )
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001
        if out_of_storage(err):  # writing the patches file: not the slide's fault
            raise
        raise SlideError(f"cannot read {spec.path.name}: the file is truncated or corrupt ({err})") from err
    finally:
        slide.close()
    stored = None if foreign else patches
    return PreparedSlide(grid, reused, t1 - t0, time.perf_counter() - t1, region, warnings, nbytes, source,
                         stored)  # fmt: skip

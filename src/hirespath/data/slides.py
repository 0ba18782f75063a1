"""Whole slides as grids of large tiles: listing, tissue grid at a target µm/px, tile reading, a tile Dataset.

The grid follows TRIDENT's patcher (``trident/wsi_objects/WSIPatcher.py``) so our coordinate files mean what
theirs mean: level-0 top-left (x, y) of every tile, in raster order, stride ``patch_size_level0 − overlap_level0``
from (0, 0), columns and rows until the slide's width and height are covered (the last tiles may reach past the
edge). Unlike TRIDENT, the scale is the exact ``tile_mpp / slide_mpp`` (TRIDENT rounds both magnifications to
40x/20x/…, so its "20x" tiles of a 0.2527 µm/px slide are 0.5054 µm/px): a tile of ``tile_size`` px at
``tile_mpp`` covers ``patch_size_level0 = round(tile_size · tile_mpp / slide_mpp)`` level-0 pixels, the region
that is actually read. Writing ``level0_magnification = 10 / slide_mpp`` and ``target_magnification = 10 /
tile_mpp`` (unrounded) into the coordinate files makes TRIDENT's own formula ``round(patch_size ·
level0_magnification / target_magnification)`` give the same integer, so its readers and patchers re-read exactly
our tiles; the float side differs from that integer by at most half a level-0 pixel.

Reading, resizing and encoding are separate steps (:func:`read_tile_region`, :func:`resize_tile`, the encoder)
so their times can be measured apart; :class:`SlideTileDataset` does the first two in DataLoader workers.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import math
import numbers
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from .wsi import SlideError, _on_white, open_slide, slide_mpp, tissue_mask

log = logging.getLogger("hirespath.slides")

# What OpenSlide (and tiffslide) open as one file. DICOM is left out on purpose: a DICOM slide is a folder of
# .dcm files (one per level), so globbing them would list each level as a slide; pass extensions=(".dcm",) with
# a CSV naming one file per slide instead.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
COMPOUND_EXTENSIONS = (".ome.tiff", ".ome.tif")
# a level whose downsample is within 1 % above the needed one is read and upsampled by ≤ 1 % (SVS levels are
# 4.0002×, 16.001×…): reading the next finer level instead would cost 4–16× the pixels for no detail
LEVEL_TOLERANCE = 0.01


@dataclass(frozen=True)
class SlideSpec:
    """One slide to process: id (file stem, the output file names), path, and an mpp overriding the slide's."""

    slide_id: str
    path: Path
    mpp: float | None = None


def slide_id_of(path: str | os.PathLike) -> str:
    """File name without its extension; ``x.ome.tiff`` → ``x`` (TRIDENT's compound-extension rule)."""
    name = Path(path).name
    for ext in COMPOUND_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _check_unique(specs: list[SlideSpec]) -> list[SlideSpec]:
    seen: dict[str, Path] = {}
    for s in specs:
        if s.slide_id in seen:
            raise ValueError(
                f"two slides have the id {s.slide_id!r} (the file stem names the output files): "
                f"{seen[s.slide_id]} and {s.path}; rename one or list only one of them"
            )
        seen[s.slide_id] = s.path
    return specs


def _parse_mpp(value, where: str) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    try:
        mpp = float(value)
    except ValueError:
        mpp = float("nan")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"{where}: mpp {value!r} is not a positive number of microns per pixel (e.g. 0.25, 0.5)")
    return mpp


def list_slides(
    wsi_dir: str | os.PathLike | None = None,
    slides_csv: str | os.PathLike | None = None,
    extensions: tuple[str, ...] = SLIDE_EXTENSIONS,
    recursive: bool = False,
) -> list[SlideSpec]:
    """The slides of ``wsi_dir`` (files with one of ``extensions``, sorted) or of a CSV list.

    The CSV (TRIDENT's ``--custom_list_of_wsis``) has a column ``wsi`` or ``path``, relative to ``wsi_dir`` when
    given (else to the CSV's folder), and optionally ``mpp`` overriding the slide's own microns per pixel (empty
    cells keep it). Listed files that do not exist stay in the list: the engine skips them as "missing file" and
    lists them in skipped.csv, so one typo does not stop a long run. Two slides with the same id are an error.
    """
    if slides_csv is None and wsi_dir is None:
        raise ValueError("list_slides needs wsi_dir (a folder of slides) or slides_csv (a CSV with a 'wsi' column)")
    if slides_csv is not None:
        slides_csv = Path(slides_csv)
        table = pd.read_csv(slides_csv)
        col = "wsi" if "wsi" in table.columns else "path" if "path" in table.columns else None
        if col is None:
            raise ValueError(
                f"{slides_csv}: needs a column 'wsi' or 'path' naming the slide files; it has {list(table.columns)}"
            )
        base = Path(wsi_dir) if wsi_dir is not None else slides_csv.parent
        specs = []
        for i, row in table.iterrows():
            if pd.isna(row[col]) or not str(row[col]).strip():
                raise ValueError(f"{slides_csv}, row {i + 2}: empty {col!r}")
            path = Path(str(row[col]).strip())
            path = path if path.is_absolute() else base / path
            mpp = _parse_mpp(row["mpp"], f"{slides_csv}, row {i + 2} ({path.name})") if "mpp" in table else None
            specs.append(SlideSpec(slide_id_of(path), path, mpp))
        if not specs:
            raise ValueError(f"{slides_csv} lists no slides")
        missing = [str(s.path) for s in specs if not s.path.is_file()]
        if missing:
            log.warning(
                "%d of %d listed slides do not exist (they will be skipped), e.g. %s",
                len(missing),
                len(specs),
                missing[:3],
            )
        return _check_unique(specs)
    root = Path(wsi_dir)
    if not root.is_dir():
        raise ValueError(f"wsi_dir {root} is not a folder")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    files = sorted(
        p
        for p in (root.rglob("*") if recursive else root.iterdir())
        if p.is_file() and p.name.lower().endswith(exts) and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(f"no slides in {root} (looked for {', '.join(exts)}{', recursively' if recursive else ''})")
    return _check_unique([SlideSpec(slide_id_of(p), p) for p in files])


def as_specs(slides) -> list[SlideSpec]:
    """Paths or SlideSpecs → SlideSpecs (ids checked unique)."""
    return _check_unique([s if isinstance(s, SlideSpec) else SlideSpec(slide_id_of(s), Path(s)) for s in slides])


# ---------------------------------------------------------------------------------------------------------------
# microns per pixel, levels, thumbnail


def level0_mpp(slide, override: float | None = None, default: float | None = None) -> float:
    """Level-0 µm/px: ``override`` (a slide list's mpp), else the slide's metadata (OpenSlide/tiffslide mpp, then
    the TIFF resolution tags in cm or inch), else ``default``; none of them → SlideError("no mpp ...")."""
    if override:
        return float(override)
    try:
        return slide_mpp(slide)
    except SlideError:
        pass
    props = slide.properties
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    try:
        res = float(props.get("tiff.XResolution") or 0)
    except ValueError:
        res = 0.0
    per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    # 72/96 dpi are image-editor defaults, not scans: only microscope-like values count
    if per_unit and res > 0 and 0.01 < per_unit / res < 50:
        return per_unit / res
    if default:
        return float(default)
    raise SlideError(
        "no mpp: the slide's metadata has no microns per pixel (openslide.mpp-x, tiffslide.mpp-x or "
        "TIFF resolution tags); pass default_mpp= or give it an mpp column in the slide list"
    )


def best_level(level_downsamples, downsample: float, tolerance: float = LEVEL_TOLERANCE) -> int:
    """The coarsest level whose downsample is ≤ ``downsample`` (OpenSlide's get_best_level_for_downsample, with
    ``tolerance`` so a 4.0002× level serves a 4× request)."""
    fits = [i for i, d in enumerate(level_downsamples) if d <= downsample * (1 + tolerance)]
    return max(fits, key=lambda i: level_downsamples[i]) if fits else 0


def read_thumbnail(slide, max_side: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB of the coarsest level (transparent → white), shrunk by an integer factor in strips until its long side
    is ≤ ``max_side`` (a one-level slide is never read whole). Returns (image, level-0 px per image px in x, y)."""
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    d = float(slide.level_downsamples[level])
    f = max(1, math.ceil(max(w, h) / max_side))
    if f == 1:
        img = np.asarray(_on_white(slide.read_region((0, 0), level, (w, h))))
    else:
        rows_per_strip = f * max(1, (32 << 20) // (4 * w * f))
        out_w = max(1, w // f)
        strips = []
        for y0 in range(0, h, rows_per_strip):
            sh = min(rows_per_strip, h - y0)
            strip = _on_white(slide.read_region((0, round(y0 * d)), level, (w, sh)))
            strips.append(np.asarray(strip.resize((out_w, max(1, round(sh / f))), Image.BOX)))
        img = np.concatenate(strips, 0)
    W, H = slide.dimensions
    return img, (W / img.shape[1], H / img.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# the tile grid


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
    mask: np.ndarray | None = field(default=None, repr=False)  # tissue mask (bool) on the thumbnail
    mask_downsample: tuple[float, float] = (1.0, 1.0)  # level-0 px per mask px (x, y)
    thumbnail: np.ndarray | None = field(default=None, repr=False)  # RGB the mask was computed on

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def level0_magnification(self) -> float:
        return 10.0 / self.slide_mpp

    @property
    def target_magnification(self) -> float:
        return 10.0 / self.tile_mpp


def check_tiling(tile_size: int, tile_mpp: float, overlap: int = 0, min_tissue: float = 0.25) -> None:
    """Clear errors for a tiling that cannot work, before any slide is opened."""
    if not (isinstance(tile_size, numbers.Integral) and tile_size > 0):
        raise ValueError(f"tile_size must be a positive integer of pixels, got {tile_size!r}")
    if not (isinstance(tile_mpp, numbers.Real) and tile_mpp > 0 and math.isfinite(tile_mpp)):
        raise ValueError(f"tile_mpp must be a positive number of µm per pixel (0.5 = 20x), got {tile_mpp!r}")
    if not (isinstance(overlap, numbers.Integral) and 0 <= overlap < tile_size):
        raise ValueError(f"overlap must be an integer in [0, tile_size={tile_size}), got {overlap!r}")
    if not (0 <= min_tissue <= 1):
        raise ValueError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}")


def tile_size_level0(tile_size: int, tile_mpp: float, slide_mpp: float) -> int:
    """TRIDENT's ``round(patch_size · level0_mag / target_mag)`` with the unrounded magnifications 10/mpp."""
    return max(1, round(tile_size * (10.0 / slide_mpp) / (10.0 / tile_mpp)))


def tissue_fractions(
    mask: np.ndarray, mask_downsample: tuple[float, float], coords: np.ndarray, side0: int
) -> np.ndarray:
    """Fraction of each level-0 square (x, y, side0) that is tissue on ``mask``; outside the mask counts as glass."""
    h, w = mask.shape
    ii = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    dx, dy = mask_downsample
    x0 = np.round(coords[:, 0] / dx).astype(np.int64)
    y0 = np.round(coords[:, 1] / dy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((coords[:, 0] + side0) / dx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((coords[:, 1] + side0) / dy).astype(np.int64))
    cx0, cx1, cy0, cy1 = (np.clip(a, 0, n) for a, n in ((x0, w), (x1, w), (y0, h), (y1, h)))
    inside = ii[cy1, cx1] - ii[cy0, cx1] - ii[cy1, cx0] + ii[cy0, cx0]
    return inside / ((x1 - x0) * (y1 - y0)).astype(np.float64)


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
) -> TileGrid:
    """Tissue on the coarsest level, then the regular grid of ``tile_size`` px tiles at ``tile_mpp`` µm/px over the
    whole slide; tiles with tissue fraction ≥ ``min_tissue`` (and > 0) are kept.

    ``slide``: an open OpenSlide/TiffSlide or a path. ``mpp`` overrides the slide's level-0 µm/px,
    ``default_mpp`` is used only when the slide has none. SlideError when there is no mpp, no tissue, or no tile
    holds enough of it.
    """
    check_tiling(tile_size, tile_mpp, overlap, min_tissue)
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
    thumb, mds = read_thumbnail(slide, mask_max_side)
    mask = tissue_mask(thumb)
    if not mask.any():
        raise SlideError("no tissue detected")
    cols, rows = math.ceil(W / stride0), math.ceil(H / stride0)
    yy, xx = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    coords = np.stack([xx.ravel() * stride0, yy.ravel() * stride0], 1)
    frac = tissue_fractions(mask, mds, coords, side0)
    keep = (frac >= min_tissue) & (frac > 0)
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
        tissue_area_mm2=float(mask.sum() * mds[0] * mds[1] * smpp**2 / 1e6),
        mask=mask if keep_images else None,
        mask_downsample=mds,
        thumbnail=thumb if keep_images else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# reading tiles


def read_tile_region(slide, x: int, y: int, size0: int, level: int) -> Image.Image:
    """The level-0 square (x, y, size0) read at ``level`` as RGB; what lies beyond the slide is white (padded,
    never stretched: the in-slide part is read and pasted into a white canvas of the full tile's size)."""
    d = float(slide.level_downsamples[level])
    W, H = slide.dimensions
    side = max(1, round(size0 / d))
    x0, y0 = max(int(x), 0), max(int(y), 0)
    x1, y1 = min(int(x) + size0, W), min(int(y) + size0, H)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    if x1 <= x0 or y1 <= y0:
        return canvas
    lw, lh = slide.level_dimensions[level]
    ox, oy = round((x0 - x) / d), round((y0 - y) / d)
    w = min(max(1, round((x1 - x0) / d)), side - ox, lw - int(x0 / d))
    h = min(max(1, round((y1 - y0) / d)), side - oy, lh - int(y0 / d))
    if w <= 0 or h <= 0:
        return canvas
    if (w, h) == (side, side) and (ox, oy) == (0, 0):
        return _on_white(slide.read_region((x0, y0), level, (w, h)))
    canvas.paste(_on_white(slide.read_region((x0, y0), level, (w, h))), (ox, oy))
    return canvas


def resize_tile(region: Image.Image, tile_size: int) -> np.ndarray:
    """Resize (antialiased, bicubic) to ``tile_size``² and return uint8 H×W×3."""
    if region.size != (tile_size, tile_size):
        region = region.resize((tile_size, tile_size), Image.BICUBIC, reducing_gap=None)
    return np.array(region)  # a writable copy: torch.from_numpy warns on PIL's read-only buffer


def read_tile(slide, x: int, y: int, size0: int, tile_size: int, level: int | None = None) -> np.ndarray:
    """One tile as uint8 H×W×3 at ``tile_size`` px (level: the best for the needed downsample when None)."""
    level = best_level(slide.level_downsamples, size0 / tile_size) if level is None else level
    return resize_tile(read_tile_region(slide, x, y, size0, level), tile_size)


class SlideTileDataset(Dataset):
    """The tiles of one slide (map-style): ``{"image": uint8 C×H×W (or H×W×C), "index", "read_s", "resize_s"}``.

    The slide is opened lazily in each process that reads (DataLoader workers included, fork or spawn) and never
    pickled, so workers read while the main process encodes. ``read_s``/``resize_s`` time the two steps per tile.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        coords: np.ndarray,
        patch_size_level0: int,
        tile_size: int,
        level: int | None = None,
        channels_last: bool = False,
    ):
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.size0, self.tile_size, self.level = int(patch_size_level0), int(tile_size), level
        self.channels_last = channels_last
        self._slide, self._pid = None, None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = state["_pid"] = None
        return state

    def _open(self):
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path), os.getpid()
            if self.level is None:
                self.level = best_level(self._slide.level_downsamples, self.size0 / self.tile_size)
        return self._slide

    def __getitem__(self, i: int) -> dict:
        slide = self._open()
        x, y = self.coords[i]
        t0 = time.perf_counter()
        region = read_tile_region(slide, int(x), int(y), self.size0, self.level)
        t1 = time.perf_counter()
        tile = torch.from_numpy(resize_tile(region, self.tile_size))
        t2 = time.perf_counter()
        if not self.channels_last:
            tile = tile.permute(2, 0, 1).contiguous()
        return {"image": tile, "index": int(i), "read_s": t1 - t0, "resize_s": t2 - t1}

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass


# ---------------------------------------------------------------------------------------------------------------
# streaming a slide's tiles while the encoder runs

READERS = ("threads", "workers")


def _collate_tiles(items: list[dict], pin_memory: bool) -> dict:
    images = torch.stack([it["image"] for it in items])
    return {
        "image": images.pin_memory() if pin_memory else images,
        "index": torch.tensor([it["index"] for it in items]),
        "read_s": torch.tensor([it["read_s"] for it in items], dtype=torch.float64),
        "resize_s": torch.tensor([it["resize_s"] for it in items], dtype=torch.float64),
    }


def tile_batches(
    dataset: SlideTileDataset,
    batch_size: int,
    *,
    reader: str = "threads",
    num_workers: int = 1,
    prefetch_batches: int = 2,
    pin_memory: bool = False,
):
    """Batches of one slide's tiles, in order, read ahead while the caller encodes (at most ``prefetch_batches``
    batches waiting, so memory stays bounded; never the whole slide).

    ``reader="threads"``: a pool of ``num_workers`` threads, each with its own slide handle (OpenSlide's reads and
    PIL's decoding/resizing release the GIL, and no process is started per slide); ``"workers"``: DataLoader worker
    processes; ``num_workers=0``: read in the calling thread. Yields ``{"image": uint8 B×C×H×W (pinned when
    pin_memory), "index", "read_s", "resize_s"}`` (the last two: seconds the readers spent per tile).
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    if num_workers < 0 or batch_size < 1 or prefetch_batches < 1:
        raise ValueError(f"need num_workers ≥ 0, batch_size ≥ 1, prefetch_batches ≥ 1 (got {num_workers}, "
                         f"{batch_size}, {prefetch_batches})")  # fmt: skip
    n = len(dataset)
    if num_workers == 0:
        for s in range(0, n, batch_size):
            yield _collate_tiles([dataset[i] for i in range(s, min(n, s + batch_size))], pin_memory)
        return
    if reader == "workers":
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_batches, collate_fn=functools.partial(_collate_tiles, pin_memory=False),
        )  # fmt: skip
        yield from loader
        return
    local, clones = threading.local(), []

    def read(i: int) -> dict:
        if not hasattr(local, "ds"):  # one slide handle per thread (tiffslide handles are not thread-safe)
            local.ds = copy.copy(dataset)
            clones.append(local.ds)
        return local.ds[i]

    pending: collections.deque = collections.deque()
    todo = iter(range(n))
    with ThreadPoolExecutor(num_workers, thread_name_prefix="tile-reader") as pool:
        try:
            while True:
                while len(pending) < (prefetch_batches + 1) * batch_size:
                    i = next(todo, None)
                    if i is None:
                        break
                    pending.append(pool.submit(read, i))
                if not pending:
                    break
                take = min(batch_size, len(pending))
                yield _collate_tiles([pending.popleft().result() for _ in range(take)], pin_memory)
        finally:
            for f in pending:
                f.cancel()
    for ds in clones:
        ds.close()

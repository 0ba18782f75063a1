"""Per-class probability maps as a tiled pyramidal OME-TIFF: uint8 (probability · 255), one plane per class.

The layout QuPath's own OME-TIFF writer uses, so that QuPath (through Bio-Formats) opens it as a pyramid of named,
coloured channels: level 0 at the map's mpp, one IFD per class (planar), then halvings (2×2 means) as SubIFDs until
the long side is ≤ 1,024 px; 256 px tiles, horizontal predictor + zlib level 1, compressed on every available core.
The OME-XML names each channel after its class, in the class's colour, with the physical pixel size in µm; the
TIFF resolution tags say the same in pixels per centimetre; the OME Image ``Description`` is JSON (``classes`` in
channel order, ``mpp``, ``level0_mpp`` of the slide, ``level0_scale``: map px per slide level-0 px,
``level0_origin``: the slide level-0 px of the map's (0, 0), where QuPath crops a slide to its scanned region).
Written from the C×H×W memmaps a row of tiles at a time (never the whole map in memory: ~45 MB of heap for a 1.3 GB
map; each class's plane read once, contiguously), to a temporary name that the caller renames when complete.
:func:`read_probs` gives a level back as H×W×C (an image's usual axes); :class:`MapLevel` reads a level in row bands
(C×rows×W, as the map was written), for drawing polygons again from a finished file.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

from ..utils.io import new_memmap, write_rows
from ..utils.threads import available_cores

TILE = 256
SMALLEST = 1024
Progress = Callable[[int], object] | None  # told the rows done, for a progress bar


def halve(src: np.ndarray, dst_path: Path, band_bytes: int = 1 << 27, progress: Progress = None) -> np.memmap:
    """``src`` (C×H×W uint8) shrunk 2× by 2×2 means, into a new memmap at ``dst_path`` (in row bands;
    ``progress(rows of src)`` after each).

    Integer sums of the four values (uint16), rounded half to even as ``np.rint`` of their float mean would be
    (equal to it, ~6× faster); an odd last row or column is repeated."""
    C, H, W = src.shape
    band = max(2, band_bytes // (W * C * 2) // 2 * 2)  # an even number of rows of uint16
    h, w = (H + 1) // 2, (W + 1) // 2
    dst = new_memmap(dst_path, np.uint8, (C, h, w))
    fd = os.open(dst_path, os.O_RDWR)  # written with pwrite: a full disk is an OSError, not SIGBUS
    try:
        for r in range(0, H, band):
            block = np.asarray(src[:, r : r + band])
            if block.shape[1] % 2:
                block = np.concatenate([block, block[:, -1:]], 1)
            if W % 2:
                block = np.concatenate([block, block[:, :, -1:]], 2)
            total = block[:, 0::2, 0::2].astype(np.uint16)
            total += block[:, 1::2, 0::2]
            total += block[:, 0::2, 1::2]
            total += block[:, 1::2, 1::2]
            total += 1 + ((total >> 2) & 1)  # total / 4 rounded half to even: +2 when the quotient is odd, else +1
            total >>= 2
            write_rows(fd, dst, r // 2, 0, total)  # a pwrite per class: the band spans the width
            if progress is not None:
                progress(min(band, H - r))
    finally:
        os.close(fd)
    return dst


def pyramid_shapes(shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The shapes of :func:`pyramid`'s levels for a level 0 of ``shape`` (C, H, W)."""
    shapes = [tuple(shape)]
    while max(shapes[-1][1:]) > SMALLEST:
        C, H, W = shapes[-1]
        shapes.append((C, (H + 1) // 2, (W + 1) // 2))
    return shapes


def pyramid(level0: np.ndarray, prefix: Path, progress: Progress = None) -> list[np.ndarray]:
    """[level0, level0 / 2, ...] down to a long side ≤ SMALLEST (the halvings in ``<prefix>.levelK.tmp``;
    ``progress(rows)`` as the rows of each level are halved: sum(H for the shapes but the last) in all)."""
    levels = [level0]
    for k in range(1, len(pyramid_shapes(level0.shape))):
        levels.append(halve(levels[-1], Path(f"{prefix}.level{k}.tmp"), progress=progress))
    return levels


def _plane_tiles(arr: np.ndarray, progress: Progress = None) -> Iterator[np.ndarray]:
    """The tiles of ``arr`` (C×H×W) plane by plane, each plane in rows of tiles: the order of the TIFF's tiles.
    A row of one class (256 × W bytes, contiguous) is copied at a time: each plane is read once, never held
    (``progress(rows)`` as each row of tiles is read)."""
    C, H, W = arr.shape
    for c in range(C):
        for y in range(0, H, TILE):
            row = np.array(arr[c, y : y + TILE])
            if progress is not None:  # before its tiles: the writer stops pulling after the last one
                progress(row.shape[0])
            for x in range(0, W, TILE):
                yield row[:, x : x + TILE]


def ome_color(rgb: Sequence[int]) -> int:
    """An OME channel colour: RGBA packed into a signed 32-bit integer."""
    value = (int(rgb[0]) << 24) | (int(rgb[1]) << 16) | (int(rgb[2]) << 8) | 255
    return value - (1 << 32) if value >= 1 << 31 else value


def write_probs_tiff(path: Path, levels: list[np.ndarray], classes: list[str], colors: list[Sequence[int]],
                     mpp: float, extra: dict, name: str = "", progress: Progress = None) -> None:  # fmt: skip
    """Write the pyramid ``levels`` (C×H×W uint8 each; class c in ``colors[c]``) to ``path`` as an OME-TIFF (the
    caller renames it into place; ``progress(rows)`` as rows of tiles are read to be compressed: C × H summed over
    the levels in all)."""
    description = json.dumps({"classes": list(classes), "mpp": float(mpp), "values": "probability * 255", **extra})
    channels = {"Name": list(classes), "Color": [ome_color(c) for c in colors]}
    metadata = {"axes": "CYX", "Name": name or "class probabilities", "Description": description,
                "PhysicalSizeX": float(mpp), "PhysicalSizeXUnit": "µm", "PhysicalSizeY": float(mpp),
                "PhysicalSizeYUnit": "µm", "Channel": channels}  # fmt: skip
    # zlib level 1 after horizontal differencing (TIFF predictor 2, read by libtiff, Bio-Formats, tifffile): smooth
    # maps compress better and faster than with zlib's default level alone; tiles compressed on every core, 32 MB of
    # them at a time (tifffile's default for tiles from an iterator is 512 MB of memory, and no faster)
    opts = dict(dtype=np.uint8, photometric="minisblack", tile=(TILE, TILE), compression="zlib",
                compressionargs={"level": 1}, predictor=True, resolutionunit="CENTIMETER",
                maxworkers=available_cores(), buffersize=32 << 20)  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, arr in enumerate(levels):
            C, H, W = arr.shape
            res = 1e4 / (mpp * 2**k)  # px per cm
            kw = dict(subifds=len(levels) - 1, metadata=metadata) if k == 0 else dict(subfiletype=1, metadata=None)
            tif.write(_plane_tiles(arr, progress), shape=(C, H, W), resolution=(res, res), **opts, **kw)


def read_description(path: Path) -> dict:
    """The JSON description of a probability TIFF: the OME Image's, or (files written before they were OME-TIFFs)
    the first page's."""
    with tifffile.TiffFile(path) as tif:
        if tif.is_ome:
            image = ET.fromstring(tif.ome_metadata).find("{*}Image")
            text = image.findtext("{*}Description") if image is not None else None
            if text is None:
                raise ValueError(f"{path}: an OME-TIFF without the JSON description of a probability map")
            return json.loads(text)
        return json.loads(tif.pages[0].description)


def read_probs(path: Path, level: int = 0, region: Sequence[int] | None = None) -> np.ndarray:
    """Pyramid level ``level`` of a probability TIFF as H×W×C uint8 (class c as in ``classes``).

    ``region``: (x, y, width, height) in px of that level: only the tiles it touches are read (a map too large
    for memory, or the part under one annotation); it must lie inside the level."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if not 0 <= level < len(series.levels):
            raise ValueError(f"{path}: level {level} does not exist; the map has levels 0 to {len(series.levels) - 1}")
        page = series.levels[level]
        if region is None:
            arr = page.asarray()
        else:
            H, W = page.shape[page.axes.index("Y")], page.shape[page.axes.index("X")]
            x, y, w, h = (int(v) for v in region)
            if not (0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H):
                raise ValueError(f"{path}: region {tuple(region)} (x, y, width, height) is not inside level {level}, "
                                 f"{W}×{H} px")  # fmt: skip
            import zarr  # tiffslide's dependency: reads only the tiles a slice touches

            cut = tuple({"Y": slice(y, y + h), "X": slice(x, x + w)}.get(a, slice(None)) for a in series.axes)
            with series.aszarr(level=level) as store:
                arr = np.asarray(zarr.open_array(store, mode="r")[cut])
        if series.axes == "YX":  # a one-class map: tifffile drops the length-1 channel axis
            return arr[..., None]
        return np.moveaxis(arr, 0, -1) if series.axes.startswith("C") else arr


class MapLevel:
    """One level of a probability TIFF as the C×H×W map it was written from, read in row bands: ``rows(y0, y1)``
    reads only the tiles of those rows (a whole-slide map need not fit in memory). Use as a context manager."""

    def __init__(self, path: Path, level: int = 0):
        import zarr  # tiffslide's dependency: reads only the tiles a slice touches

        self.path = Path(path)
        self._tif = tifffile.TiffFile(self.path)
        try:
            series = self._tif.series[0]
            if not -len(series.levels) <= level < len(series.levels):
                raise ValueError(f"{path}: level {level} does not exist; the map has {len(series.levels)} levels")
            self._store = series.aszarr(level=level % len(series.levels))  # -1: the smallest
            self._array = zarr.open_array(self._store, mode="r")
        except BaseException:
            self._tif.close()
            raise
        axes = series.axes  # CYX as written; YX for one class (tifffile drops the length-1 axis); YXS before OME
        self._y = axes.index("Y")
        self._c = next((axes.index(a) for a in "CS" if a in axes), None)
        shape = dict(zip(axes, self._array.shape))
        self.shape = (shape.get("C", shape.get("S", 1)), shape["Y"], shape["X"])

    def rows(self, y0: int, y1: int) -> np.ndarray:
        cut = tuple(slice(y0, y1) if i == self._y else slice(None) for i in range(self._array.ndim))
        band = np.asarray(self._array[cut])
        return band[None] if self._c is None else np.moveaxis(band, self._c, 0)

    def close(self) -> None:
        self._store.close()
        self._tif.close()

    def __enter__(self) -> MapLevel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Per-class probability maps as a tiled pyramidal TIFF: uint8 (probability · 255), one sample per class.

Level 0 at the map's mpp, then halvings (2×2 means) as SubIFDs until the long side is ≤ 1,024 px; 256 px tiles,
horizontal predictor + zlib level 1, compressed on every available core; resolution tags in pixels per centimetre;
the ImageDescription is JSON (``classes`` in channel order, ``mpp``, ``level0_mpp`` of the slide, ``level0_scale``:
map px per slide level-0 px). Written from memmaps tile by tile (never the whole map in memory), to a temporary
name, renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from ..utils.threads import available_cores

TILE = 256
SMALLEST = 1024


def halve(src: np.ndarray, dst_path: Path, band_bytes: int = 1 << 27) -> np.memmap:
    """``src`` (H×W×C uint8) shrunk 2× by 2×2 means, into a new memmap at ``dst_path`` (in row bands).

    Integer sums of the four values (uint16), rounded half to even as ``np.rint`` of their float mean would be
    (equal to it, ~6× faster); an odd last row or column is repeated."""
    H, W, C = src.shape
    band = max(2, band_bytes // (W * C * 2) // 2 * 2)  # an even number of rows of uint16
    h, w = (H + 1) // 2, (W + 1) // 2
    dst = np.lib.format.open_memmap(dst_path, mode="w+", dtype=np.uint8, shape=(h, w, C))
    for r in range(0, H, band):
        block = np.asarray(src[r : r + band])
        if block.shape[0] % 2:
            block = np.concatenate([block, block[-1:]], 0)
        if W % 2:
            block = np.concatenate([block, block[:, -1:]], 1)
        total = block[0::2, 0::2].astype(np.uint16)
        total += block[1::2, 0::2]
        total += block[0::2, 1::2]
        total += block[1::2, 1::2]
        total += 1 + ((total >> 2) & 1)  # total / 4 rounded half to even: +2 when the quotient is odd, else +1
        total >>= 2
        dst[r // 2 : r // 2 + total.shape[0]] = total
    dst.flush()
    return dst


def pyramid(level0: np.ndarray, prefix: Path) -> list[np.ndarray]:
    """[level0, level0 / 2, ...] down to a long side ≤ SMALLEST (the halvings in ``<prefix>.levelK.tmp``)."""
    levels = [level0]
    while max(levels[-1].shape[:2]) > SMALLEST:
        levels.append(halve(levels[-1], Path(f"{prefix}.level{len(levels)}.tmp")))
    return levels


def write_probs_tiff(path: Path, levels: list[np.ndarray], classes: list[str], mpp: float, extra: dict) -> None:
    """Write the pyramid ``levels`` (H×W×C uint8 each) to ``path`` (the caller renames it into place)."""
    description = json.dumps({"classes": list(classes), "mpp": float(mpp), "values": "probability * 255", **extra})
    # tifffile reads the memmaps tile by tile and compresses the tiles on every core this process may use
    # zlib level 1 after horizontal differencing (TIFF predictor 2, read by libtiff, Bio-Formats, tifffile): smooth
    # maps compress better and faster than with zlib's default level alone
    opts = dict(photometric="minisblack", planarconfig="contig", tile=(TILE, TILE), compression="zlib",
                compressionargs={"level": 1}, predictor=True, resolutionunit="CENTIMETER", metadata=None,
                maxworkers=available_cores())  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, arr in enumerate(levels):
            res = 1e4 / (mpp * 2**k)  # px per cm
            kw = dict(description=description, subifds=len(levels) - 1) if k == 0 else dict(subfiletype=1)
            tif.write(arr, resolution=(res, res), **opts, **kw)


def read_description(path: Path) -> dict:
    with tifffile.TiffFile(path) as tif:
        return json.loads(tif.pages[0].description)

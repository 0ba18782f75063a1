"""Overlapping tiles' class probabilities blended into one map per slide, accumulated on disk.

Each tile adds ``w · p`` to a weighted sum and ``w`` to a weight map (both ``numpy.memmap`` files in the output
folder, under temporary names the runner removes if a worker dies); the map is ``Σ w·p / Σ w``. Two weightings:

- ``linear``: ``w`` falls linearly from 1 to near 0 over the ``overlap`` px next to the tile border (product of the
  two axes), so each pixel is mostly decided by the tile that sees it farthest from a border (where a ViT's
  prediction is best) and neighbouring tiles fade into each other: no seam;
- ``crop``: each tile keeps its centre (``overlap / 2`` px cropped on every side, weight 1e-3 there, so that the
  slide's outer borders, seen by one tile only, are still filled): a hard switch between tiles.

Tiles covering one pixel alone give exactly that tile's probabilities (the weights cancel), whatever the mode.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BLENDS = ("linear", "crop")
FLOOR = 1e-3  # weight of cropped margins: a pixel only they cover still gets their prediction


def to_uint8(probs: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Probabilities as the map stores them: · 255, rounded, uint8 (values outside [0, 1] clipped).
    ``inplace``: ``probs`` (a float temporary) is overwritten on the way, with no other temporaries."""
    p = np.clip(probs, 0, 1, out=probs if inplace else None)
    p *= 255
    return np.rint(p, out=p).astype(np.uint8)


def blend_weights(size: int, overlap: int, mode: str = "linear") -> np.ndarray:
    """size×size float32 weights of one tile (all 1 without overlap)."""
    if mode not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {mode!r}")
    d = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)  # px to the nearest border
    if overlap <= 0:
        w = np.ones(size, np.float32)
    elif mode == "linear":
        w = np.clip((d + 0.5) / overlap, FLOOR, 1.0)
    else:
        w = np.where(d >= overlap / 2, 1.0, FLOOR).astype(np.float32)
    return np.outer(w, w)


class ProbabilityStitcher:
    """``add`` tiles (C×S×S probabilities at map px x, y; parts outside the map are dropped), then ``finalize``
    to the uint8 H×W×C map (a memmap file next to the accumulators)."""

    def __init__(self, folder: Path, prefix: str, shape: tuple[int, int], channels: int, weights: np.ndarray):
        self.folder, self.prefix = Path(folder), prefix
        self.shape, self.channels, self.weights = (int(shape[0]), int(shape[1])), int(channels), weights
        self.files: list[Path] = []
        # zero-filled sparse files: only the tissue's tiles take disk space, and never the whole map memory
        self.acc = self._memmap("sum", np.float32, (*self.shape, self.channels))
        self.wsum = self._memmap("weight", np.float32, self.shape)

    def _memmap(self, name: str, dtype, shape) -> np.memmap:
        path = self.folder / f"{self.prefix}.{name}.tmp"
        self.files.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def add(self, x: int, y: int, probs: np.ndarray) -> None:
        H, W = self.shape
        _, h, w = probs.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 <= x0 or y1 <= y0:
            return
        wt = self.weights[y0 - y : y1 - y, x0 - x : x1 - x]
        p = probs[:, y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32).transpose(1, 2, 0)
        self.acc[y0:y1, x0:x1] += p * wt[..., None]
        self.wsum[y0:y1, x0:x1] += wt

    def finalize(self, band_bytes: int = 1 << 27) -> np.memmap:
        """The uint8 map (probability · 255, 0 where no tile was), computed in row bands of ~``band_bytes``."""
        out = self._memmap("probs", np.uint8, (*self.shape, self.channels))
        band = max(1, band_bytes // (self.shape[1] * self.channels * 4))
        for r in range(0, self.shape[0], band):
            w = self.wsum[r : r + band]
            p = self.acc[r : r + band] / np.maximum(w, 1e-12)[..., None]
            out[r : r + band] = to_uint8(p, inplace=True)
        out.flush()
        for name in ("acc", "wsum"):  # the float accumulators are no longer needed: free their disk now
            arr = getattr(self, name)
            path = Path(arr.filename)
            del arr
            setattr(self, name, None)
            path.unlink(missing_ok=True)
        return out

    def cleanup(self) -> None:
        self.acc = self.wsum = None
        for p in self.files:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

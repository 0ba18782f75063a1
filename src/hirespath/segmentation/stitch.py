"""Overlapping tiles' class probabilities blended into one map per slide, written to disk as blocks finish.

Each tile adds ``w · p`` to a weighted sum and ``w`` to a weight map; the map is ``Σ w·p / Σ w``. The sums are kept
in memory per block of ``BLOCK`` map px, only for blocks some listed tile has yet to reach: when a block's last tile
is in, it is turned into uint8 and written into the map with pwrite (a .npy file in the output folder, read back
through a ``numpy.memmap``, under a temporary name the runner removes if a worker dies), and its memory reused.
Tiles come in raster order, so the open blocks are one or two block rows across the slide (where the next tile row
will overlap) plus the current tiles' blocks: with 8 classes and 1,792 px tiles, 0.01–0.02 GB per 1,000 px of map
width (0.6–1.2 GB across a 60,000 px-wide resection) — never the whole map — and no float sums on disk (they were
4.5× the uint8 map, read and rewritten by every overlapping tile). Two weightings:

- ``linear``: ``w`` falls linearly from 1 to near 0 over the ``overlap`` px next to the tile border (product of the
  two axes), so each pixel is mostly decided by the tile that sees it farthest from a border (where a ViT's
  prediction is best) and neighbouring tiles fade into each other: no seam;
- ``crop``: each tile keeps its centre (``overlap / 2`` px cropped on every side, weight 1e-3 there, so that the
  slide's outer borders, seen by one tile only, are still filled): a hard switch between tiles.

Tiles covering one pixel alone give exactly that tile's probabilities (the weights cancel), whatever the mode.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..utils.io import new_memmap, write_rows
from ..utils.threads import available_cores

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
    else:  # ⌈overlap/2⌉ px cropped at the start, ⌊overlap/2⌋ at the end: neighbours meet with no shared column
        i = np.arange(size)  # (an odd overlap cropped by half a px more on both sides left a 50/50 line)
        w = np.where((i >= (overlap + 1) // 2) & (size - 1 - i >= overlap // 2), 1.0, FLOOR).astype(np.float32)
    return np.outer(w, w)


# map px per side of an accumulator block: rows are freed soon after their last tile, and a block's sums (2.4 MB with
# 8 classes) stay in the CPU's caches while a tile is added: 256 px blended a 1,792 px tile 1.8× faster than 512 px
# and holds a third less (docs/benchmarks.md)
BLOCK = 256
SPARE_BLOCKS = 96  # freed blocks kept for reuse (more than one 1,792 px tile's 64–81): fresh ones cost page faults


def _runs(keys: list[tuple[int, int]], longest: int) -> list[list[int]]:
    """The indices of ``keys`` (row, column) grouped into runs of consecutive columns within a row, ≤ ``longest``."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    runs: list[list[int]] = []
    for i in order:
        if runs and len(runs[-1]) < longest and keys[runs[-1][-1]] == (keys[i][0], keys[i][1] - 1):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class ProbabilityStitcher:
    """``add`` tiles (C×S×S probabilities at map px x, y; parts outside the map are dropped), then ``finalize``
    to the uint8 C×H×W map (a memmap file, one plane per class: the probability TIFF's planes and each class's
    polygons are then contiguous reads, not a stride through every class of a map larger than memory).
    ``positions``: the (x, y) of every tile that will be added, so that each block is written as soon as its last
    tile is in; None keeps every block until ``finalize`` (small maps)."""

    def __init__(
        self,
        folder: Path,
        prefix: str,
        shape: tuple[int, int],
        channels: int,
        weights: np.ndarray,
        positions=None,
        block: int = BLOCK,
        threads: int | None = None,
    ):
        self.folder, self.prefix = Path(folder), prefix
        self.shape, self.channels, self.weights = (int(shape[0]), int(shape[1])), int(channels), weights
        self.block = int(block)
        self.files: list[Path] = []
        # zero-filled sparse file: only the tissue's blocks take disk space; 0 where no tile was. Read through the
        # mapping, written with pwrite: a full disk or quota is then an error, not SIGBUS
        self.out: np.memmap | None = self._memmap("probs", np.uint8, (self.channels, *self.shape))
        self._fd: int | None = os.open(self.out.filename, os.O_RDWR)
        self.open: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # block → (Σ w·p, Σ w)
        self.pending: dict[tuple[int, int], int] = {}  # block → listed tiles not added yet
        self.written: set[tuple[int, int]] = set()
        self.peak_open = 0  # most blocks held at once (memory: peak_open · BLOCK² · (C + 1) · 4 bytes)
        self._spare: list[tuple[np.ndarray, np.ndarray]] = []  # freed full-size blocks, reused (no fresh pages)
        # a tile's blocks are blended on every core this process may use (1.8× on 2 cores; with write_behind on a
        # GPU node this is the writer thread's work per tile)
        self.threads = available_cores() if threads is None else int(threads)
        self._pool: ThreadPoolExecutor | None = None
        for x, y in positions if positions is not None else ():
            for b in self._blocks(int(x), int(y)):
                self.pending[b] = self.pending.get(b, 0) + 1

    def _memmap(self, name: str, dtype, shape) -> np.memmap:
        path = self.folder / f"{self.prefix}.{name}.tmp"
        self.files.append(path)
        return new_memmap(path, dtype, shape)

    def _clip(self, x: int, y: int) -> tuple[int, int, int, int]:
        """The map rectangle (x0, y0, x1, y1) a tile at (x, y) covers; empty when x1 <= x0 or y1 <= y0."""
        H, W = self.shape
        h, w = self.weights.shape
        return max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)

    def _blocks(self, x: int, y: int) -> list[tuple[int, int]]:
        x0, y0, x1, y1 = self._clip(x, y)
        if x1 <= x0 or y1 <= y0:
            return []
        b = self.block
        return [(r, c) for r in range(y0 // b, (y1 - 1) // b + 1) for c in range(x0 // b, (x1 - 1) // b + 1)]

    def _bounds(self, key: tuple[int, int]) -> tuple[int, int, int, int]:
        b, (H, W) = self.block, self.shape
        return key[1] * b, key[0] * b, min((key[1] + 1) * b, W), min((key[0] + 1) * b, H)

    def _sums(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if key in self.written:
            raise RuntimeError(f"a tile reaches map block {key}, already written: it was not among the positions")
        if key not in self.open:
            bx0, by0, bx1, by1 = self._bounds(key)
            h, w = by1 - by0, bx1 - bx0
            if self._spare and (h, w) == (self.block, self.block):
                acc, wsum = self._spare.pop()
                acc.fill(0)
                wsum.fill(0)
            else:
                acc, wsum = np.zeros((self.channels, h, w), np.float32), np.zeros((h, w), np.float32)
            self.open[key] = (acc, wsum)
            self.peak_open = max(self.peak_open, len(self.open))
        return self.open[key]

    def add(self, x: int, y: int, probs: np.ndarray) -> None:
        keys = self._blocks(x, y)
        sums = [self._sums(key) for key in keys]
        self._each(lambda i: self._blend(keys[i], sums[i], x, y, probs), len(keys))
        self._write([key for key in keys if self._arrived(key)])

    def _blend(self, key: tuple[int, int], sums: tuple[np.ndarray, np.ndarray], x: int, y: int, probs) -> None:
        """The part of the tile at (x, y) inside block ``key``, added into the block's sums."""
        bx0, by0, bx1, by1 = self._bounds(key)
        x0, y0, x1, y1 = self._clip(x, y)
        x0, y0, x1, y1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
        acc, wsum = sums
        wt = self.weights[y0 - y : y1 - y, x0 - x : x1 - x]
        p = probs[:, y0 - y : y1 - y, x0 - x : x1 - x]
        acc[:, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] += p * wt  # planes as the model gives them: no transpose
        wsum[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] += wt

    def _arrived(self, key: tuple[int, int]) -> bool:
        """Counts a tile in for a listed block: True when it was the block's last."""
        if key not in self.pending:
            return False
        self.pending[key] -= 1
        return self.pending[key] == 0

    def _write(self, keys: list[tuple[int, int]]) -> None:
        """The blocks' map values (probability · 255, uint8) into the map; their sums freed for reuse."""
        sums = [self.open.pop(key) for key in keys]

        def values(i: int) -> np.ndarray:
            acc, wsum = sums[i]
            return to_uint8(np.divide(acc, np.maximum(wsum, 1e-12), out=acc), True)

        def write(run: list[int]) -> None:
            bx0, by0 = self._bounds(keys[run[0]])[:2]
            write_rows(self._fd, self.out, by0, bx0, np.concatenate([values(i) for i in run], axis=2))

        # side by side blocks of a block row as one: a pwrite per map row of the run, not per block row (2.2–2.5×
        # less host time per tile; as fast as stores through the mapping, docs/benchmarks.md), a run per thread
        runs = _runs(keys, longest=max(1, -(-len(keys) // self.threads)))
        self._each(lambda r: write(runs[r]), len(runs))
        for key, (acc, wsum) in zip(keys, sums):
            self.pending.pop(key, None)
            self.written.add(key)
            if acc.shape[1:] == (self.block, self.block) and len(self._spare) < SPARE_BLOCKS:
                self._spare.append((acc, wsum))

    def _each(self, fn, n: int) -> None:
        """``fn(0) … fn(n − 1)`` on disjoint blocks, in threads (numpy releases the GIL on these arrays)."""
        if self.threads <= 1 or n <= 1:
            for i in range(n):
                fn(i)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="stitch")
        list(self._pool.map(fn, range(n)))

    def finalize(self) -> np.memmap:
        """The uint8 map, after writing the blocks still open (tiles listed but never added: unreadable or
        refused ones)."""
        self._write(list(self.open))
        self._stop()
        self.out.flush()
        return self.out

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._spare = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def cleanup(self) -> None:
        self._stop()
        self.out, self.open = None, {}
        for p in self.files:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

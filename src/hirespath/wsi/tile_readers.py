"""Reading one slide's tiles while the encoder runs: a tile Dataset and a bounded stream of batches from reader
threads (one slide handle each) or DataLoader worker processes.

Reading and resizing are separate steps (:func:`~hirespath.wsi.reader.read_tile_region`,
:func:`~hirespath.wsi.reader.resize_tile`) so their times can be measured apart; :class:`SlideTileDataset` does
both in the readers.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .reader import IMAGE_SUFFIXES, best_level, open_slide, read_tile_region, resize_tile


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

    def decode_once(self) -> bool:
        """A plain image (PNG/JPEG: one level, which PIL decodes whole on the first read): decode it now, in this
        thread, so that reader threads share this handle instead of each decoding the image again (regions of a
        decoded image are read without changing it; PIL's lazy first decode is not safe from two threads).
        False for a slide read region by region: each reader thread opens its own handle."""
        if self.path.suffix.lower() not in IMAGE_SUFFIXES:
            return False
        read_tile_region(self._open(), 0, 0, 1, 0)  # a corrupt image raises its SlideError here
        return True

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass


READERS = ("threads", "workers")


def collate_tiles(items: list[dict], pin_memory: bool) -> dict:
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
    PIL's decoding/resizing release the GIL, and no process is started per slide), sharing one for a PNG/JPEG
    (decoded once); ``"workers"``: DataLoader worker
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
            yield collate_tiles([dataset[i] for i in range(s, min(n, s + batch_size))], pin_memory)
        return
    if reader == "workers":
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_batches, collate_fn=functools.partial(collate_tiles, pin_memory=False),
        )  # fmt: skip
        yield from loader
        return
    local, clones = threading.local(), []
    shared = dataset.decode_once()  # a PNG/JPEG: decoded once for every thread, not once per thread

    def read(i: int) -> dict:
        if shared:
            return dataset[i]
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
                yield collate_tiles([pending.popleft().result() for _ in range(take)], pin_memory)
        finally:
            for f in pending:
                f.cancel()
    for ds in clones:
        ds.close()

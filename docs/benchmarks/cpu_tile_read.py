"""Seconds the tile readers take for one generated slide (no model): the 16 tiles of 1,792 px, or the 1,024 tiles
of 224 px, of a 7,168 px slide at 0.5 µm/px (JPEG, OpenSlide), read by ``tile_batches`` with 1 and 2 reader threads,
best of 3. ``reader_s`` sums the threads' own read + resize seconds; ``wall_s`` is what the encoder waits for when
reading bounds the run (as on a GPU host). Run at two commits to compare (PYTHONPATH=src).

    python docs/benchmarks/cpu_tile_read.py [LABEL]
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hirespath.benchmark.slide_throughput import synthetic_slide
from hirespath.wsi.tile_readers import SlideTileDataset, tile_batches

label = sys.argv[1] if len(sys.argv) > 1 else ""
side = 7168
with tempfile.TemporaryDirectory() as tmp:
    path = synthetic_slide(Path(tmp) / "s.tiff", side, 0.5)
    print("label,tile_px,tiles,threads,wall_s,reader_s,mpx_per_s")
    for size in (1792, 224):
        xs = np.arange(0, side - size + 1, size)
        coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
        for threads in (1, 2):
            best = None
            for _ in range(3):
                ds = SlideTileDataset(path, coords, size, size, level=0)
                t, reader_s = time.perf_counter(), 0.0
                for batch in tile_batches(ds, 16, num_workers=threads):
                    reader_s += float(batch["read_s"].sum() + batch["resize_s"].sum())
                wall = time.perf_counter() - t
                ds.close()
                best = min(best or (wall, reader_s), (wall, reader_s))
            mpx = len(coords) * size * size / 1e6 / best[0]
            print(f"{label},{size},{len(coords)},{threads},{best[0]:.3f},{best[1]:.3f},{mpx:.1f}", flush=True)

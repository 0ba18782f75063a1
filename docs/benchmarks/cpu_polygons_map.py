"""The GeoJSON step of segment_slides on a real probability map: ``masks_polygons`` over every class of a
``<slide>_probs.tif`` level 0 (copied once into a C×H×W memmap next to it, as the stitcher leaves the map), the bands
and threshold the consumer uses; prints the seconds and the peak anonymous memory (RssAnon, sampled every 50 ms).
Run at two commits to compare; HIRESPATH_CPU_MALLOC=system so that freed memory is not kept.

    HIRESPATH_CPU_MALLOC=system python docs/benchmarks/cpu_polygons_map.py PROBS.tif [THREADS] [MIN_AREA_PX]
"""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import tifffile

import hirespath.utils.threads as threads

probs_tif = Path(sys.argv[1])
n_threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
min_area = float(sys.argv[3]) if len(sys.argv) > 3 else 2000.0
threads.available_cores = lambda: n_threads  # the thread count masks_polygons uses
from hirespath.segmentation.polygons import masks_polygons  # noqa: E402

cached = probs_tif.with_suffix(".planar.npy")
if not cached.exists():
    with tifffile.TiffFile(probs_tif) as tif:
        level0 = tif.series[0].levels[0]
        out = np.lib.format.open_memmap(cached, mode="w+", dtype=np.uint8, shape=level0.shape)
        for c, page in enumerate(level0.pages):
            out[c] = page.asarray()
        out.flush()
        del out
probs = np.load(cached, mmap_mode="r")
peak = [0]


def sample() -> None:
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.05)


threading.Thread(target=sample, daemon=True).start()
time.sleep(0.2)
before = peak[0]
C, H, W = probs.shape
band = int(np.clip((1 << 27) // (W * C), 64, 1024))  # as consumer.py
t = time.perf_counter()
geoms = masks_polygons(lambda y0, y1: probs[:, y0:y1] > 127.5, H, C, band=band, min_area=min_area, simplify=1.0)
seconds = time.perf_counter() - t
polygons = sum(len(g.geoms) if g is not None and hasattr(g, "geoms") else int(g is not None) for g in geoms)
print(f"map {C}x{H}x{W}, {n_threads} thread(s): {seconds:.1f} s, {polygons} polygons, "
      f"RssAnon peak {peak[0] // 1024} MB (at start {before // 1024} MB)")  # fmt: skip

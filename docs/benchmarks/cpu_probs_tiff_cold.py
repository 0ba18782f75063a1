"""Writing the probability TIFF from a map that does not fit in memory: seconds and bytes read from disk.

``prepare`` writes an 8-class SIDE px uint8 map (smooth blobs) as the segment_slides stitcher leaves it — H×W×C up to
674abba, C×H×W since — to MAP.npy; ``write`` writes level 0 of it as the probability TIFF (``write_probs_tiff``) and
prints the seconds and this process's ``read_bytes`` (/proc/self/io). Run ``write`` with a cold page cache inside a
memory cgroup smaller than the map (docs/benchmarks/cpu_probs_tiff_cold.sh), so that what a class's pass reads is
not in memory for the next: a whole-slide map at 0.22 µm/px is tens of GB.

    python docs/benchmarks/cpu_probs_tiff_cold.py prepare MAP.npy SIDE planar|interleaved
    python docs/benchmarks/cpu_probs_tiff_cold.py write MAP.npy OUT.tif LABEL
"""

import sys
import time
from pathlib import Path

import numpy as np

mode, path = sys.argv[1], Path(sys.argv[2])
if mode == "prepare":
    from scipy import ndimage

    side, planar = int(sys.argv[3]), sys.argv[4] == "planar"
    rng = np.random.default_rng(0)
    small = ndimage.gaussian_filter(rng.normal(size=(8, 64, 64)).astype(np.float32), (0, 2, 2), mode="wrap")
    block = (255 / (1 + np.exp(-(ndimage.zoom(small, (1, 16, 16), order=1) * 6 - 2)))).astype(np.uint8)
    shape = (8, side, side) if planar else (side, side, 8)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    reps = side // 1024
    for r in range(reps):  # a 1,024 px band of repeated blob blocks at a time
        band = np.tile(np.roll(block, 97 * r, axis=2), (1, 1, reps))
        if planar:
            out[:, r * 1024 : (r + 1) * 1024] = band
        else:
            out[r * 1024 : (r + 1) * 1024] = band.transpose(1, 2, 0)
    out.flush()
else:
    from hirespath.segmentation.probs_tiff import write_probs_tiff

    level0 = np.load(path, mmap_mode="r")
    t = time.perf_counter()
    write_probs_tiff(Path(sys.argv[3]), [level0], [f"c{k}" for k in range(8)], [(255, 0, 0)] * 8, 0.5, {})
    seconds = time.perf_counter() - t
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    print(f"{sys.argv[4]},{'x'.join(map(str, level0.shape))},{level0.nbytes / 1e9:.2f},{seconds:.1f},"
          f"{int(io['read_bytes']) / 1e9:.2f}")

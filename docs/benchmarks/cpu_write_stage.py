"""Time segment_slides' map writing after the last tile: finalize (weighted sums → uint8 map), the pyramid
halvings and the probability TIFF, on one generated 8-class map (smooth blobs, as a trained model's maps).
Run from a checkout: ``python docs/benchmarks/cpu_write_stage.py SIDE [LABEL]``; prints one CSV row per stage."""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from hirespath.segmentation.probs_tiff import pyramid, write_probs_tiff
from hirespath.segmentation.stitch import ProbabilityStitcher

side, label = int(sys.argv[1]) if len(sys.argv) > 1 else 4096, sys.argv[2] if len(sys.argv) > 2 else ""
rng = np.random.default_rng(0)
small = ndimage.gaussian_filter(rng.normal(size=(side // 16, side // 16, 8)).astype(np.float32), (2, 2, 0))
probs = 1 / (1 + np.exp(-(ndimage.zoom(small, (16, 16, 1), order=1) * 6 - 2)))
with tempfile.TemporaryDirectory(dir=".") as tmp:
    weight = (0.5 + rng.random((side, side), dtype=np.float32)).astype(np.float32)
    # as if tiles had been added: one map-sized "tile" of weights ``weight`` (sums Σ w·p and Σ w, kept in memory
    # as no positions are listed), then the timed part
    st = ProbabilityStitcher(Path(tmp), "bench", (side, side), 8, weight)
    st.add(0, 0, np.ascontiguousarray(probs.transpose(2, 0, 1)))
    t0 = time.perf_counter()
    level0 = st.finalize()
    t1 = time.perf_counter()
    levels = pyramid(level0, Path(tmp) / "bench")
    t2 = time.perf_counter()
    write_probs_tiff(Path(tmp) / "bench.tif", levels, [f"c{k}" for k in range(8)], [(255, 0, 0)] * 8, 0.5, {})
    t3 = time.perf_counter()
    size_mb = (Path(tmp) / "bench.tif").stat().st_size / 1e6
    print("label,side,finalize_s,pyramid_s,tiff_s,total_s,tiff_mb")
    print(f"{label},{side},{t1 - t0:.3f},{t2 - t1:.3f},{t3 - t2:.3f},{t3 - t0:.3f},{size_mb:.1f}")

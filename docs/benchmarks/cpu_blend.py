"""Host time of blending segment_slides' tiles into the map: 1,792 px tiles of 8 classes (fp16, as the tile function
returns them), overlap 128, raster order, over a SIDE px map, then the uint8 map (``finalize``). The stitcher of
the checkout on ``sys.path`` (it runs against older ones too, which kept the float sums in files on disk).
``python docs/benchmarks/cpu_blend.py [SIDE] [LABEL]``; prints one CSV row."""

import inspect
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hirespath.segmentation.stitch import ProbabilityStitcher, blend_weights

side, label = int(sys.argv[1]) if len(sys.argv) > 1 else 7168, sys.argv[2] if len(sys.argv) > 2 else ""
S, C, step = 1792, 8, 1792 - 128
probs = np.random.default_rng(0).random((C, S, S), dtype=np.float32).astype(np.float16)
positions = [(x, y) for y in range(0, side - S + step, step) for x in range(0, side - S + step, step)]
listed = {"positions": positions} if "positions" in inspect.signature(ProbabilityStitcher).parameters else {}
with tempfile.TemporaryDirectory(dir=".") as tmp:
    st = ProbabilityStitcher(Path(tmp), "bench", (side, side), C, blend_weights(S, 128), **listed)
    t0 = time.perf_counter()
    for x, y in positions:
        st.add(x, y, probs)
    t1 = time.perf_counter()
    out = st.finalize()
    t2 = time.perf_counter()
    sub = out[:, ::7, ::7] if out.shape[0] == C else out[::7, ::7]  # C×H×W since the planar map, H×W×C before
    checksum = int(np.asarray(sub, np.int64).sum())  # equal before and after: the same map
    open_gb = getattr(st, "peak_open", 0) * getattr(st, "block", 512) ** 2 * (C + 1) * 4 / 1e9
    float_on_disk_gb = 0.0 if listed else side * side * (C + 1) * 4 / 1e9
    st.cleanup()
print("label,side,tiles,blend_s_per_tile,finalize_s,total_s,float_sums_on_disk_gb,peak_block_memory_gb,checksum")
print(f"{label},{side},{len(positions)},{(t1 - t0) / len(positions):.3f},{t2 - t1:.3f},{t2 - t0:.3f},"
      f"{float_on_disk_gb:.2f},{open_gb:.2f},{checksum}")  # fmt: skip

"""Time ``segmentation.polygons.mask_polygons`` on generated class masks (the GeoJSON step of segment_slides).

    .venv/bin/python docs/benchmarks/cpu_polygons.py     # blob maps, 4,096 px, 2 classes; 2,048 px, many holes;
                                                         # 8 blob classes read together, 1 and 2 threads

Blob maps: a smoothed random field > 0 (what a random-weight model's probability maps look like), traced in the
bands segment_slides uses, min_area 200 px², simplified by 1 px. Holes: a field > −1σ (one region with thousands of
holes, like epithelium with lumina and gaps). Run it at two commits to compare; the numbers are in docs/benchmarks.md.
"""

import sys
import time

import numpy as np
from scipy import ndimage

from hirespath.segmentation import polygons
from hirespath.segmentation.polygons import mask_polygons


def blob_masks(n: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(classes):
        yield ndimage.zoom(rng.standard_normal((n // 16, n // 16)).astype(np.float32), (16, 16), order=1) > 0


def timed(mask: np.ndarray, min_area: float) -> tuple[float, object]:
    n = mask.shape[0]
    band = int(np.clip((1 << 26) // mask.shape[1], 64, 1024))  # as consumer.py
    t = time.perf_counter()
    g = mask_polygons(lambda y0, y1: mask[y0:y1], n, band=band, min_area=min_area, simplify=1.0)
    return time.perf_counter() - t, g


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    for k, mask in enumerate(blob_masks(n, 2)):
        s, g = timed(mask, 200)
        print(f"blobs {n} px class {k}: {s:.1f} s, {len(g.geoms)} polygons")
    field = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32), 3)
    s, g = timed(field > -field.std(), 10)
    print(f"holes 2048 px: {s:.1f} s, {len(g.geoms)} polygons, {sum(len(p.interiors) for p in g.geoms)} holes")
    if hasattr(polygons, "masks_polygons"):
        import hirespath.utils.threads as threads

        planar = "masks × rows" in polygons.masks_polygons.__doc__  # bands as masks × rows × W (since the C×H×W map)
        stack = np.stack(list(blob_masks(n, 8)), 0 if planar else -1)
        for cores in (1, 2):
            threads.available_cores = lambda c=cores: c  # the thread count masks_polygons uses
            t = time.perf_counter()
            band = (lambda y0, y1: stack[:, y0:y1]) if planar else (lambda y0, y1: stack[y0:y1])
            polygons.masks_polygons(band, n, 8, band=512, min_area=200, simplify=1.0)
            print(f"8 blob classes {n} px together, {cores} thread(s): {time.perf_counter() - t:.1f} s")

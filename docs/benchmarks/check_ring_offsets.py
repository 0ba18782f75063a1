"""Check the tracer's own ring offsets against GEOS's buffer on generated masks (the claim in docs/benchmarks.md,
"Growing the traced rings without GEOS"): every contour the tracer makes of a mask (``polygons._traced_rings``: at
twice its resolution, diagonal bridges split) is grown or shrunk by ``polygons._offset_rings`` and by
``shapely.buffer`` with the same mitre limit; prints how many rings fell back to GEOS and the largest difference.

    .venv/bin/python docs/benchmarks/check_ring_offsets.py [MASKS]     # 300 by default: noise, blobs, specks, holes
"""

import sys

import numpy as np
import shapely
from scipy import ndimage

from hirespath.segmentation.polygons import GROW, MITRE_LIMIT, _offset_rings, _traced_rings


def generated_mask(rng, kind: int) -> np.ndarray:
    n = int(rng.integers(8, 160))
    if kind == 0:  # noise: thousands of diagonal bridges
        return rng.random((n, n)) < rng.uniform(0.2, 0.8)
    if kind == 1:  # blobs, like a probability map's regions
        return ndimage.gaussian_filter(rng.standard_normal((n, n)), rng.uniform(0.5, 4)) > rng.uniform(-0.3, 0.3)
    if kind == 2:  # specks
        return ndimage.binary_dilation(rng.random((n, n)) < 0.05, iterations=int(rng.integers(0, 3)))
    m = np.ones((n, n), bool)  # one region with many holes
    m[rng.random((n, n)) < rng.uniform(0.01, 0.3)] = False
    return m


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    rings = fell_back = 0
    worst = 0.0
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 300):
        contours, parent = _traced_rings(generated_mask(rng, i % 4), 0)
        keep = [k for k, c in enumerate(contours) if len(c) >= 3]  # the rest (lines, points) always go to GEOS
        if not keep:
            continue
        traced = [contours[k] for k in keep]
        hole = parent[keep] != -1
        distance = np.where(hole, -GROW, GROW)
        ours, good = _offset_rings(traced, distance)
        polys = np.array([shapely.Polygon(r) for r in traced], dtype=object)
        geos = shapely.buffer(polys, distance, join_style="mitre", mitre_limit=MITRE_LIMIT)
        rings += len(traced)
        fell_back += int((~good).sum())
        diff = shapely.area(shapely.symmetric_difference(ours[good], geos[good])) / shapely.area(geos[good])
        worst = max(worst, float(diff.max(initial=0.0)))
    print(f"{rings} rings: {fell_back} fell back to GEOS; largest difference from GEOS: {worst:.1e} of a ring's area")

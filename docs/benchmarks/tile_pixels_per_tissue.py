"""Pixels a tiling runs per pixel of tissue, by tile size and tissue shape (no model runs).

segment_slides' tiling (the regular grid from the slide's (0, 0), tiles with >= min_tissue kept, plus the fewest
others that cover the rest of the tissue) on three kinds of tissue mask at 0.25 µm/px level 0, tiles at 0.2208 µm/px
(SegPath's): four needle biopsy cores (~1 mm wide, 6–12 mm long, tilted up to 40°: PANDA-like), one compact block
(segment_speed's generated slide, 2.6 mm²) and a resection-sized ellipse (15 × 10 mm). For each: the grid from the
slide's (0, 0) (TRIDENT's), the grid segment_slides fits to the tissue (``fitted_covering_grid``, and the seconds it
took) and the best of all 64 offsets it considers, found by brute force.
    python docs/benchmarks/tile_pixels_per_tissue.py [SEEDS] > docs/benchmarks/cpu_tile_pixels_per_tissue.csv
"""

import math
import sys
import time

import cv2
import numpy as np

from hirespath.wsi.tissue import covering_tiles, fitted_covering_grid, tissue_fractions

SLIDE_MPP, TILE_MPP, DS = 0.25, 0.2208, 32.0  # level-0 µm/px, tiles' µm/px, mask downsample
TILINGS = [(518, 128), (1792, 128), (1792, 256), (3430, 256)]  # (tile px, overlap px) at TILE_MPP


def mask_of(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    um = lambda v: v / SLIDE_MPP / DS  # noqa: E731  µm -> mask px
    if kind == "needle cores":
        W, H = 60_000, 30_000
        mask = np.zeros((int(H / DS), int(W / DS)), np.uint8)
        for _ in range(4):
            centre = (rng.uniform(0.15, 0.85) * W / DS, rng.uniform(0.25, 0.75) * H / DS)
            size = (um(rng.uniform(6000, 12000)), um(rng.uniform(700, 1200)))
            cv2.fillPoly(mask, [cv2.boxPoints((centre, size, rng.uniform(-40, 40))).astype(np.int32)], 1)
    elif kind == "compact block":
        W = H = 16_000
        mask = np.zeros((int(H / DS), int(W / DS)), np.uint8)
        side = um(math.sqrt(2.6e6))
        x0 = rng.uniform(0.2, 0.4) * W / DS
        cv2.rectangle(mask, (int(x0), int(x0)), (int(x0 + side), int(x0 + side)), 1, -1)
    else:  # resection
        W, H = 80_000, 60_000
        mask = np.zeros((int(H / DS), int(W / DS)), np.uint8)
        centre = (int(W / DS / 2 + rng.uniform(-20, 20)), int(H / DS / 2 + rng.uniform(-20, 20)))
        cv2.ellipse(mask, centre, (int(um(7500)), int(um(5000))), rng.uniform(0, 90), 0, 360, 1, -1)
    return mask.astype(bool), W, H


def tiles(mask: np.ndarray, W: int, H: int, side0: int, stride0: int, offset=(0, 0)) -> int:
    cols, rows = math.ceil((W + offset[0]) / stride0), math.ceil((H + offset[1]) / stride0)
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([xx.ravel() * stride0 - offset[0], yy.ravel() * stride0 - offset[1]], 1).astype(np.int64)
    frac = tissue_fractions(mask, (DS, DS), coords, side0)
    keep = covering_tiles(mask, (DS, DS), coords, side0, (frac >= 0.1) & (frac > 0))
    return int(keep.sum())


def main(seeds: int) -> None:
    print("tissue,seed,tissue_mm2,tile_px,overlap_px,tiles_at_origin,px_per_tissue_px_at_origin,tiles_fitted,"
          "px_per_tissue_px_fitted,fit_seconds,tiles_best_of_64")  # fmt: skip
    for kind in ("needle cores", "compact block", "resection"):
        for seed in range(seeds):
            mask, W, H = mask_of(kind, np.random.default_rng(seed))
            tissue_px0 = mask.sum() * DS * DS
            mm2 = tissue_px0 * SLIDE_MPP**2 / 1e6
            for size, overlap in TILINGS:
                side0 = round(size * TILE_MPP / SLIDE_MPP)
                stride0 = side0 - round(overlap * TILE_MPP / SLIDE_MPP)
                n = tiles(mask, W, H, side0, stride0)
                t0 = time.perf_counter()
                fitted = int(fitted_covering_grid(mask, (DS, DS), (W, H), side0, stride0, 0.1)[4].sum())
                fit_s = time.perf_counter() - t0
                k = 8
                best = min(tiles(mask, W, H, side0, stride0, (i * stride0 // k, j * stride0 // k))
                           for i in range(k) for j in range(k))  # fmt: skip
                per = [count * side0**2 / tissue_px0 for count in (n, fitted)]
                print(f"{kind},{seed},{mm2:.2f},{size},{overlap},{n},{per[0]:.3f},{fitted},{per[1]:.3f},{fit_s:.2f},{best}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)

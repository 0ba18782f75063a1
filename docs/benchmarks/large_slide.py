"""A large generated slide, written tile by tile (never the whole image in memory): a JPEG-tiled pyramidal BigTIFF
(levels 1, 4, 16; resolution tags) of SIDE px at MPP µm/px, H&E-coloured tissue with nuclei in an ellipse over
~40 % of the glass. The tissue repeats a 2,048 px pattern drawn by the benchmarks' own generator.

    python docs/benchmarks/large_slide.py OUT.tiff [SIDE] [MPP]
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from hirespath.benchmark.slide_throughput import synthetic_slide

TILE, PATTERN, GLASS = 256, 2048, 243
out = Path(sys.argv[1])
side = int(sys.argv[2]) if len(sys.argv) > 2 else 24576
mpp = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
with tempfile.TemporaryDirectory() as tmp:
    base = tifffile.imread(synthetic_slide(Path(tmp) / "pattern.tiff", PATTERN, mpp, margin=0.0))


def tiles(down: int):
    """The level's tiles in TIFF order: the pattern where the ellipse is, glass elsewhere."""
    n, p = side // down, PATTERN // down
    pattern = np.asarray(Image.fromarray(base).resize((p, p), Image.BOX)) if down > 1 else base
    for y in range(0, n, TILE):
        for x in range(0, n, TILE):
            yy, xx = np.mgrid[y : y + TILE, x : x + TILE]
            inside = ((xx + 0.5) / n - 0.5) ** 2 / 0.42**2 + ((yy + 0.5) / n - 0.5) ** 2 / 0.30**2 <= 1
            tile = np.full((TILE, TILE, 3), GLASS, np.uint8)
            tile[inside] = pattern[yy[inside] % p, xx[inside] % p]
            yield tile


tmp_out = out.with_name(out.name + ".tmp")
with tifffile.TiffWriter(tmp_out, bigtiff=True) as tif:
    for i, down in enumerate((1, 4, 16)):
        n = side // down
        tif.write(tiles(down), shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                  compressionargs={"level": 90}, photometric="rgb", resolution=(1e4 / mpp / down,) * 2,
                  resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1, metadata=None)  # fmt: skip
tmp_out.replace(out)
print(out, f"{side} px at {mpp} µm/px, {out.stat().st_size / 1e6:.0f} MB")

"""A synthetic SegPath download in the real layout: 8 archives of H&E PNG + 0/1 mask PNG + fileinfo CSV.

Each image shows several cell types as coloured blobs; only the archive's own cell type is in its mask,
as in SegPath (the others are present but unlabelled).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .segpath import CELL_TYPES

# a distinct stain-like colour and blob size per cell type, so a model can tell them apart
_COLOURS = np.array(
    [
        [200, 120, 190],
        [230, 150, 170],
        [210, 40, 60],
        [80, 50, 140],
        [60, 30, 120],
        [190, 90, 150],
        [120, 60, 160],
        [150, 70, 130],
    ],
    dtype=np.float32,
)
_RADII = np.array([0.05, 0.035, 0.012, 0.018, 0.015, 0.02, 0.022, 0.025])


def _blobs(rng, size: int, cell: int, n: int, canvas: np.ndarray, mask: np.ndarray | None) -> None:
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        r = _RADII[cell] * size * rng.uniform(0.7, 1.3)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        canvas[inside] = _COLOURS[cell] + rng.normal(0, 6, 3)
        if mask is not None:
            mask[inside] = 1


def make_synthetic_segpath(
    root: str | Path, images_per_split: int = 2, size: int = 984, seed: int = 0, fileinfo_in_folder: bool = False
) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cell_idx, cell in enumerate(CELL_TYPES):
        antigen = cell.split("_")[0]
        folder = root / cell
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for split in ("train", "val", "test"):
            for k in range(images_per_split):
                canvas = np.full((size, size, 3), 235, np.float32) + rng.normal(0, 3, (size, size, 3))
                mask = np.zeros((size, size), np.uint8)
                for other in rng.choice(len(CELL_TYPES), 2, replace=False):
                    if other != cell_idx:
                        _blobs(rng, size, int(other), 4, canvas, None)  # present but unlabelled
                _blobs(rng, size, cell_idx, 6, canvas, mask)
                x, y = rng.integers(0, 10**6), rng.integers(0, 10**6)
                name = f"{antigen}_{cell.split('_')[1]}_slide{k % 3}_{x:06d}_{y:06d}_HE.png"
                Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(folder / name)
                Image.fromarray(mask).save(folder / name.replace("_HE.png", "_mask.png"))
                rows.append(dict(filename=name, antigen=antigen, train_val_test=split))
        info = (folder if fileinfo_in_folder else root) / f"{antigen}_fileinfo.csv"
        pd.DataFrame(rows).to_csv(info, index=False)
    return root

"""SegPath: eight cell-type archives of 984×984 H&E tiles with one antigen-derived binary mask each.

Layout (as downloaded, one folder per archive):
    <root>/<antigen>_<celltype>/  {antigen}_{celltype}_{slide}_{x:06}_{y:06}_HE.png + ..._mask.png (0/1)
    <antigen>_fileinfo.csv (filename, antigen, train_val_test) — at the root or inside the folder
Each image is labelled for ONE cell type; other cell types in it are unlabelled (not background).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger("hirespath.segpath")

CELL_TYPES = (
    "panCK_Epithelium",
    "aSMA_SmoothMuscle",
    "CD235a_RBC",
    "CD45RB_Leukocyte",
    "CD3CD20_Lymphocyte",
    "ERG_Endothelium",
    "MIST1_PlasmaCell",
    "MNDA_MyeloidCell",
)
ANTIGENS = tuple(c.split("_")[0] for c in CELL_TYPES)
MPP = 0.2208
IGNORE = 255
SPLITS = {"train": "train", "val": "val", "test": "test", "validation": "val"}


class SegPathError(ValueError):
    """A SegPath file that would give a wrong label; names the file."""


def find_fileinfo(root: Path, archive: str) -> Path | None:
    antigen = archive.split("_")[0]
    for p in (root / f"{antigen}_fileinfo.csv", root / archive / f"{antigen}_fileinfo.csv"):
        if p.is_file():
            return p
    return None


def index_segpath(root: str | Path, cell_types=CELL_TYPES, skip_bad: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All (image, mask, cell type, split) rows, validated against the files; and the rows skipped.

    A fileinfo row whose image or mask is missing is an error naming the file, or, with ``skip_bad``, a skip.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"SegPath root {str(root)!r} does not exist")
    rows, skipped, missing_archives = [], [], []
    for cls, cell in enumerate(CELL_TYPES):
        if cell not in cell_types:
            continue
        info = find_fileinfo(root, cell)
        folder = root / cell
        if info is None or not folder.is_dir():
            missing_archives.append(cell)
            continue
        with open(info, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        df = pd.read_csv(info, compression="gzip" if gz else None)
        if not {"filename", "train_val_test"} <= set(df.columns):
            raise SegPathError(f"{info} lacks the columns filename and train_val_test")
        # the Zenodo fileinfo lists the masks as rows too: one sample per _HE.png row
        df = df[df.filename.astype(str).str.endswith("_HE.png")]
        if df.empty:
            raise SegPathError(f"{info} lists no *_HE.png image (one row per H&E tile is expected)")
        for r in df.itertuples():
            image = folder / r.filename
            mask = folder / r.filename.replace("_HE.png", "_mask.png")
            split = SPLITS.get(str(r.train_val_test).strip().lower())
            problem = None
            if split is None:
                problem = f"unknown split {r.train_val_test!r} (train, val or test)"
            elif not image.is_file():
                problem = "image file missing"
            elif not mask.is_file():
                problem = "mask file missing"
            if problem:
                if not skip_bad:
                    raise SegPathError(f"{info.name}: {r.filename}: {problem}")
                skipped.append(dict(filename=str(image), reason=problem))
                continue
            rows.append(dict(image=str(image), mask=str(mask), cell_type=cell, label=cls, split=split))
    if missing_archives and len(missing_archives) == len(cell_types):
        raise FileNotFoundError(
            f"{str(root)!r} holds no SegPath archive: expected folders {list(cell_types)} with "
            "<antigen>_fileinfo.csv beside or inside them (`hirespath make_synthetic dataset=segpath` writes one)"
        )
    for cell in missing_archives:
        log.warning("SegPath archive %s not found under %s; its cell type is left out", cell, root)
    return pd.DataFrame(rows), pd.DataFrame(skipped, columns=["filename", "reason"])


def load_pair(image_path: str, mask_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Image (H×W×3 uint8) and mask (H×W uint8 in {0, 1, 255}); any inconsistency raises naming the file."""
    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(mask_path) as im:
        mask = np.asarray(im)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != image.shape[:2]:
        raise SegPathError(
            f"{mask_path}: mask is {mask.shape[1]}×{mask.shape[0]} but the image is {image.shape[1]}×{image.shape[0]}"
        )
    bad = np.setdiff1d(np.unique(mask), [0, 1, IGNORE])
    if len(bad):
        raise SegPathError(f"{mask_path}: mask values {bad.tolist()} outside {{0, 1, 255}}")
    return image, mask


class SegPathDataset(Dataset):
    """Images resized to ``resolution`` (normalised); the full-size mask is kept for evaluation."""

    def __init__(self, rows: pd.DataFrame, resolution: int, mean, std, train: bool = False):
        self.rows = rows.reset_index(drop=True)
        self.resolution = resolution
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.train = train

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows.iloc[i]
        image, mask = load_pair(r["image"], r["mask"])
        if self.train:  # flips and 90° rotations: the label's meaning is orientation-free
            k = np.random.randint(4)
            image, mask = np.rot90(image, k), np.rot90(mask, k)
            if np.random.rand() < 0.5:
                image, mask = image[:, ::-1], mask[:, ::-1]
        # np.array copies: PIL's arrays are read-only, which torch.from_numpy warns about
        img = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        full_mask = torch.from_numpy(np.array(mask)).long()
        small = torch.nn.functional.interpolate(
            img[None], size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False
        )[0]
        small_mask = torch.nn.functional.interpolate(
            full_mask[None, None].float(), size=(self.resolution,) * 2, mode="nearest-exact"
        )[0, 0].long()
        return {
            "image": (small - self.mean) / self.std,
            "mask": small_mask,
            "full_mask": full_mask,
            "label": int(r.label),
            "index": i,
        }


def collate(batch: list[dict]) -> dict:
    out = {k: torch.stack([b[k] for b in batch]) for k in ("image", "mask")}
    out["full_mask"] = [b["full_mask"] for b in batch]
    out["label"] = torch.tensor([b["label"] for b in batch])
    out["index"] = torch.tensor([b["index"] for b in batch])
    return out

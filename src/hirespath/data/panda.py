"""PANDA (prostate cANcer graDe Assessment): labels, splits, ROI location and the ROI dataset.

What is cut (and why): PANDA biopsies are thin tissue strips on large, mostly empty slides. For every slide
the tissue is detected on the lowest pyramid level (saturation + Otsu), and the square window of ``fov_um``
microns (default 1715 µm = 3430 px at 0.5 µm/px, the paper's largest input) holding the most tissue is cut
at level 0 — optionally ``rois_per_slide`` non-overlapping windows. The same window is then resized to the
requested ``resolution``, so every resolution sees the same tissue and only the detail changes, which is
how the paper simulates resolutions. ROIs are located once and written to ``rois.csv`` beside the split.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .wsi import ROI, SlideError, locate_rois, read_roi

log = logging.getLogger("hirespath.panda")

REQUIRED_COLUMNS = ("image_id", "data_provider", "isup_grade", "gleason_score")
NUM_CLASSES = 6


def check_panda_root(root: str | Path) -> Path:
    """One clear error listing what is missing when ``root`` is not a PANDA download."""
    root = Path(root)
    missing = []
    if not root.is_dir():
        raise FileNotFoundError(f"PANDA root {str(root)!r} does not exist")
    if not (root / "train.csv").is_file():
        missing.append("train.csv")
    if not (root / "train_images").is_dir():
        missing.append("train_images/ (the <image_id>.tiff slides)")
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} is not a PANDA data root: missing {', '.join(missing)}. Expected the layout of the "
            "Kaggle download: train.csv, train_images/<image_id>.tiff, train_label_masks/<image_id>_mask.tiff "
            "(masks optional). `python tasks/make_synthetic.py dataset=panda root=DIR` writes a small one.")
    return root


def read_labels(root: str | Path, exclude: str | Path | None = None) -> pd.DataFrame:
    """train.csv, validated: ISUP grades 0–5, "negative" Gleason normalised to "0+0", exclusions dropped."""
    root = check_panda_root(root)
    df = pd.read_csv(root / "train.csv")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{root / 'train.csv'} lacks columns {missing}; PANDA's has {list(REQUIRED_COLUMNS)}")
    grade = pd.to_numeric(df.isup_grade, errors="coerce")
    bad = df[grade.isna() | ~grade.isin(range(NUM_CLASSES))]
    if len(bad):
        rows = ", ".join(f"row {i + 2} ({r.image_id}: {r.isup_grade!r})" for i, r in bad.head(20).iterrows())
        raise ValueError(f"{root / 'train.csv'}: isup_grade must be an integer 0–5; bad rows: {rows}"
                         + (f" and {len(bad) - 20} more" if len(bad) > 20 else ""))
    df["isup_grade"] = grade.astype(int)
    df["gleason_score"] = df.gleason_score.replace({"negative": "0+0"})
    if exclude:
        ids = set(pd.read_csv(exclude).iloc[:, 0].astype(str))
        before = len(df)
        df = df[~df.image_id.astype(str).isin(ids)]
        log.info("excluded %d slides listed in %s", before - len(df), exclude)
    return df.reset_index(drop=True)


def make_split(labels: pd.DataFrame, fractions=(0.7, 0.15, 0.15), seed: int = 42) -> pd.DataFrame:
    """Stratified train/val/test split by ISUP grade (eva's protocol: 70/15/15, seed 42)."""
    from sklearn.model_selection import train_test_split

    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    ids, y = labels.image_id.to_numpy(), labels.isup_grade.to_numpy()
    counts = np.bincount(y, minlength=NUM_CLASSES)
    strat = y if counts[counts > 0].min() >= 3 else None  # sklearn needs ≥ 2 per class in each cut
    train, rest, y_train, y_rest = train_test_split(ids, y, train_size=fractions[0], random_state=seed, stratify=strat)
    rel = fractions[1] / (fractions[1] + fractions[2])
    strat_rest = y_rest if strat is not None and np.bincount(y_rest)[np.bincount(y_rest) > 0].min() >= 2 else None
    val, test = train_test_split(rest, train_size=rel, random_state=seed, stratify=strat_rest)
    split = {**{i: "train" for i in train}, **{i: "val" for i in val}, **{i: "test" for i in test}}
    out = labels.copy()
    out["split"] = out.image_id.map(split)
    return out


def load_or_make_split(root: str | Path, split_csv: str | Path, exclude=None, seed: int = 42) -> pd.DataFrame:
    """Written once and reused, so every run compares like with like."""
    split_csv = Path(split_csv)
    if split_csv.is_file():
        return pd.read_csv(split_csv, dtype={"image_id": str})
    df = make_split(read_labels(root, exclude), seed=seed)
    from ..utils.io import atomic_path

    with atomic_path(split_csv) as tmp:
        df.to_csv(tmp, index=False)
    log.info("wrote split %s (%s)", split_csv, df.split.value_counts().to_dict())
    return df


def locate_all(root: Path, split: pd.DataFrame, fov_um: float, rois_per_slide: int, min_tissue: float,
               rois_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROIs of every slide (cached in ``rois_csv``) and the slides skipped, with their reasons."""
    from tqdm.auto import tqdm

    from ..utils.io import atomic_path

    if rois_csv.is_file():
        cached = pd.read_csv(rois_csv, dtype={"image_id": str})
        skipped = pd.read_csv(rois_csv.with_name(rois_csv.stem + "_skipped.csv"), dtype={"image_id": str})
        return cached, skipped
    rows, skipped = [], []
    for r in tqdm(split.itertuples(), total=len(split), desc="locating ROIs"):
        path = root / "train_images" / f"{r.image_id}.tiff"
        try:
            rois, mpp = locate_rois(path, fov_um, rois_per_slide, min_tissue)
        except SlideError as err:
            log.warning("skipping slide %s: %s", r.image_id, err)
            skipped.append(dict(image_id=r.image_id, reason=str(err)))
            continue
        for k, roi in enumerate(rois):
            rows.append(dict(image_id=r.image_id, roi=k, label=int(r.isup_grade), split=r.split, mpp=mpp, **asdict(roi)))
    cols = ["image_id", "roi", "label", "split", "mpp", "x", "y", "size", "tissue_fraction"]
    rois_df, skipped_df = pd.DataFrame(rows, columns=cols), pd.DataFrame(skipped, columns=["image_id", "reason"])
    with atomic_path(rois_csv.with_name(rois_csv.stem + "_skipped.csv")) as tmp:
        skipped_df.to_csv(tmp, index=False)
    with atomic_path(rois_csv) as tmp:
        rois_df.to_csv(tmp, index=False)
    return rois_df, skipped_df


class PandaROIDataset(Dataset):
    """ROIs resized to ``resolution``, normalised with the backbone's mean/std; a failing read yields None."""

    def __init__(self, root: str | Path, rois: pd.DataFrame, resolution: int, mean, std):
        self.root = Path(root)
        self.rois = rois.reset_index(drop=True)
        self.resolution = resolution
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rois)

    def __getitem__(self, i: int):
        r = self.rois.iloc[i]
        path = self.root / "train_images" / f"{r.image_id}.tiff"
        try:
            rgb = read_roi(path, ROI(int(r.x), int(r.y), int(r["size"]), float(r.tissue_fraction)), self.resolution)
        except SlideError as err:
            log.warning("skipping ROI %s/%d: %s", r.image_id, r.roi, err)
            return {"index": i, "error": str(err)}
        img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255)
        return {"index": i, "image": (img - self.mean) / self.std, "label": int(r.label)}


def collate_skipping(batch: list[dict]) -> dict:
    ok = [b for b in batch if "image" in b]
    out = {"errors": [(b["index"], b["error"]) for b in batch if "error" in b],
           "index": torch.tensor([b["index"] for b in ok], dtype=torch.long),
           "label": torch.tensor([b["label"] for b in ok], dtype=torch.long)}
    out["image"] = torch.stack([b["image"] for b in ok]) if ok else None
    return out

"""PANDA (prostate cANcer graDe Assessment): labels, splits, ROI location and the ROI dataset.

What is cut (and why): PANDA biopsies are thin tissue strips on large, mostly empty slides. For every slide
the tissue is detected on the lowest pyramid level (saturation + Otsu), and the square window of ``fov_um``
microns (default 1715 µm = 3430 px at 0.5 µm/px, the paper's largest input) holding the most tissue is cut
at level 0 — optionally ``rois_per_slide`` non-overlapping windows. The same window is then resized to the
requested ``resolution``, so every resolution sees the same tissue and only the detail changes, which is
how the paper simulates resolutions. ROIs are located once and written to ``rois.csv`` beside the split.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..utils.errors import InputError
from ..wsi.reader import SlideError
from ..wsi.rois import ROI, locate_rois, read_roi

log = logging.getLogger("hirespath.panda")

REQUIRED_COLUMNS = ("image_id", "data_provider", "isup_grade", "gleason_score")
NUM_CLASSES = 6
# The fewest slides the 70/15/15 split can cut into non-empty train, val and test splits.
MIN_SPLIT_SLIDES = 4


def panda_cache_dir(root: str | Path, cache_dir: str | Path) -> Path:
    """``cache_dir/panda/<hash of the resolved root>``: where the split, ROI locations (and so on) of one PANDA
    download are kept, shared by every task that reads it (classify, extract, mil)."""
    root_tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / "panda" / root_tag


def default_split_csv(root: str | Path, cache_dir: str | Path, seed: int = 42) -> Path:
    """The split file the ROI tasks write for ``root`` when ``data.split_csv`` is not set."""
    return panda_cache_dir(root, cache_dir) / f"split_seed{seed}.csv"


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
            "(masks optional). `hirespath make_synthetic dataset=panda root=DIR` writes a small one."
        )
    return root


def read_labels(root: str | Path, exclude: str | Path | None = None) -> pd.DataFrame:
    """train.csv, validated: ISUP grades 0–5, "negative" Gleason normalised to "0+0", exclusions dropped."""
    root = check_panda_root(root)
    csv = root / "train.csv"
    try:
        df = pd.read_csv(csv, dtype={"image_id": str})
    except pd.errors.EmptyDataError:
        raise InputError(
            f"{csv} is empty; expected PANDA's train.csv: a header {','.join(REQUIRED_COLUMNS)} and one row per slide"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{csv} is not a readable CSV ({err}); expected PANDA's train.csv") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{csv} lacks columns {missing}; PANDA's has {list(REQUIRED_COLUMNS)}")
    if df.empty:
        raise InputError(f"{csv} has a header but no rows; expected one row per slide of train_images/")
    df = _drop_duplicates(df, csv)
    grade = pd.to_numeric(df.isup_grade, errors="coerce")
    bad = df[grade.isna() | ~grade.isin(range(NUM_CLASSES))]
    if len(bad):
        rows = ", ".join(f"row {i + 2} ({r.image_id}: {r.isup_grade!r})" for i, r in bad.head(20).iterrows())
        raise InputError(
            f"{csv}: isup_grade must be an integer 0–5; bad rows: {rows}"
            + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        )
    df["isup_grade"] = grade.astype(int)
    df["gleason_score"] = df.gleason_score.replace({"negative": "0+0"})
    if exclude:
        # header=None: a plain list of ids keeps its first id (a header line matches no image_id anyway)
        ids = set(pd.read_csv(exclude, header=None, dtype=str).iloc[:, 0].str.strip())
        before = len(df)
        df = df[~df.image_id.astype(str).isin(ids)]
        log.info("excluded %d slides listed in %s", before - len(df), exclude)
        if df.empty:
            raise InputError(f"data.exclude={exclude} excludes all {before} slides of {csv}: no slide is left")
    return df.reset_index(drop=True)


def _drop_duplicates(df: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """An image_id listed twice: the same row again is dropped with a warning; rows that disagree (another grade,
    provider or Gleason score) are refused, naming the id, its rows (as numbered in the file) and their grades."""
    rows = df.image_id.astype(str).str.strip()
    dup = df[rows.duplicated(keep=False)]
    if dup.empty:
        return df
    conflicts, exact = [], []
    for image_id, group in dup.groupby(rows[dup.index], sort=False):
        lines = ", ".join(str(i + 2) for i in group.index)  # line 1 is the header
        if len(group[list(REQUIRED_COLUMNS)].astype(str).drop_duplicates()) > 1:
            grades = ", ".join(repr(g) for g in group.isup_grade)
            conflicts.append(f"{image_id} (rows {lines}: isup_grade {grades})")
        else:
            exact.append(f"{image_id} (rows {lines})")
    if conflicts:
        raise InputError(
            f"{csv}: image_ids listed more than once with different values: {'; '.join(conflicts[:20])}"
            + (f" and {len(conflicts) - 20} more" if len(conflicts) > 20 else "")
            + ". Each slide must have one row: keep the right one and delete the others."
        )
    log.warning(
        "%s: dropped %d repeated rows of the same slide: %s",
        csv,
        int(rows.duplicated().sum()),
        "; ".join(exact[:20]) + (f" and {len(exact) - 20} more" if len(exact) > 20 else ""),
    )
    return df[~rows.duplicated()].reset_index(drop=True)


def make_split(labels: pd.DataFrame, fractions=(0.7, 0.15, 0.15), seed: int = 42) -> pd.DataFrame:
    """Stratified train/val/test split by ISUP grade (eva's protocol: 70/15/15, seed 42)."""
    from sklearn.model_selection import train_test_split

    if abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"split fractions must sum to 1, got {fractions}")
    if len(labels) < MIN_SPLIT_SLIDES:
        raise InputError(
            f"{len(labels)} slides cannot be split 70/15/15 into non-empty train, val and test splits: "
            f"at least {MIN_SPLIT_SLIDES} are needed (or give a split file with data.split_csv)"
        )
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


def load_or_make_split(root: str | Path, split_csv: str | Path, exclude=None, split_seed: int = 42) -> pd.DataFrame:
    """Split assignments written once and reused; labels and exclusions always come from the current
    train.csv / ``exclude`` (an excluded or corrected slide must not keep its stale row)."""
    split_csv = Path(split_csv)
    labels = read_labels(root, exclude)
    labels["image_id"] = labels.image_id.astype(str)
    if split_csv.is_file():
        old = _read_split(split_csv)
        df = labels.merge(old[["image_id", "split"]], on="image_id", how="left")
        new = df[df.split.isna()]
        if len(new):
            raise InputError(
                f"{len(new)} image_ids of train.csv have no split in {split_csv} (e.g. {new.image_id.iloc[0]}): "
                "train.csv changed since the split was written; delete it (or set data.split_csv) to re-split"
            )
        grades = old[["image_id", "isup_grade"]] if "isup_grade" in old else df[["image_id", "isup_grade"]]
        relabelled = df.merge(grades, on="image_id", suffixes=("", "_old"))
        relabelled = relabelled[relabelled.isup_grade != relabelled.isup_grade_old]
        if len(relabelled):
            log.warning(
                "%d slides changed ISUP grade in train.csv since %s was written; using train.csv",
                len(relabelled),
                split_csv,
            )
        check_split(df, f"the split {split_csv}")
        return df
    df = make_split(labels, seed=split_seed)
    check_split(df, f"the split of {root / 'train.csv'}")
    from ..utils.io import atomic_path

    with atomic_path(split_csv) as tmp:
        df.to_csv(tmp, index=False)
    log.info("wrote split %s (%s)", split_csv, df.split.value_counts().to_dict())
    return df


SPLITS = ("train", "val", "test")


def _read_split(split_csv: Path) -> pd.DataFrame:
    """A split file: image_id, split (train | val | test) and isup_grade, one row per slide."""
    try:
        old = pd.read_csv(split_csv, dtype={"image_id": str})
    except pd.errors.EmptyDataError:
        raise InputError(f"split file {split_csv} is empty; delete it to re-split (or fix data.split_csv)") from None
    missing = [c for c in ("image_id", "split") if c not in old.columns]
    if missing:
        raise InputError(f"split file {split_csv} lacks columns {missing}; it needs image_id and split")
    bad = old[~old.split.isin(SPLITS)]
    if len(bad):
        rows = ", ".join(f"row {i + 2} ({r.image_id}: {r.split!r})" for i, r in bad.head(10).iterrows())
        raise InputError(f"split file {split_csv}: split must be one of {list(SPLITS)}; bad rows: {rows}")
    dup = old[old.image_id.duplicated(keep=False)]
    if len(dup):
        ids = ", ".join(
            f"{i} (rows {', '.join(str(r + 2) for r in g.index)}: {', '.join(g.split)})"
            for i, g in dup.head(20).groupby("image_id", sort=False)
        )
        raise InputError(f"split file {split_csv} lists image_ids more than once: {ids}; keep one row per slide")
    return old


def check_split(df: pd.DataFrame, what: str, skipped_csv: Path | None = None) -> None:
    """Refuse a split whose train or test part is empty, or whose train part holds a single grade (no classifier
    can be fit), naming ``what`` was split and where the skipped slides are listed."""
    counts = df.split.value_counts()
    where = f"; the slides skipped and why are in {skipped_csv}" if skipped_csv else ""
    empty = [s for s in ("train", "test") if counts.get(s, 0) == 0]
    if empty:
        raise InputError(
            f"{what} leaves the {' and '.join(empty)} split empty ({counts.reindex(SPLITS, fill_value=0).to_dict()})"
            + where
        )
    label = "isup_grade" if "isup_grade" in df else "label"
    grades = sorted(set(df[df.split == "train"][label]))
    if len(grades) < 2:
        raise InputError(
            f"{what} leaves a single ISUP grade ({grades[0]}) in the train split: nothing to classify{where}"
        )


def _file_tag(path: Path) -> str:
    """Size and mtime of a slide file ("" when it is missing): a skip is remembered for this version of it."""
    try:
        st = path.stat()
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def _same_file(record: dict, path: Path) -> bool:
    tag = record.get("file")
    if not isinstance(tag, str):  # written before skips recorded the file: retry slides that were missing
        return not (str(record.get("reason", "")).startswith("missing file") and path.is_file())
    return tag == _file_tag(path)


def locate_all(
    root: Path,
    split: pd.DataFrame,
    fov_um: float,
    rois_per_slide: int,
    min_tissue: float,
    rois_csv: Path,
    default_mpp: float | None = None,
    checkpoint_every: int = 500,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROIs of every slide and the slides skipped, with their reasons.

    ``rois_csv`` caches ROI *locations* per slide (they do not depend on the split); labels and split come from
    ``split`` on every call, slides not yet located are located (so a killed run resumes), and slides no longer
    in ``split`` (excluded) are dropped.
    """
    from tqdm.auto import tqdm

    from ..utils.io import atomic_path

    loc_cols = ["image_id", "roi", "mpp", "x", "y", "size", "tissue_fraction"]
    skipped_csv = rois_csv.with_name(rois_csv.stem + "_skipped.csv")
    rows, skipped = [], []
    if rois_csv.is_file():
        rows = pd.read_csv(rois_csv, dtype={"image_id": str})[loc_cols].to_dict("records")
    if skipped_csv.is_file():
        skipped = pd.read_csv(skipped_csv, dtype={"image_id": str, "file": str}).to_dict("records")
        # a slide skipped for its file is tried again once that file was added or replaced
        skipped = [r for r in skipped if _same_file(r, root / "train_images" / f"{r['image_id']}.tiff")]
    done = {r["image_id"] for r in rows} | {r["image_id"] for r in skipped}
    todo = [i for i in split.image_id.astype(str) if i not in done]

    def save():
        with atomic_path(skipped_csv) as tmp:
            pd.DataFrame(skipped, columns=["image_id", "reason", "file"]).to_csv(tmp, index=False)
        with atomic_path(rois_csv) as tmp:
            pd.DataFrame(rows, columns=loc_cols).to_csv(tmp, index=False)

    for n, image_id in enumerate(tqdm(todo, desc="locating ROIs", disable=not todo), 1):
        path = root / "train_images" / f"{image_id}.tiff"
        try:
            rois, mpp = locate_rois(path, fov_um, rois_per_slide, min_tissue, default_mpp=default_mpp)
        except SlideError as err:
            log.warning("skipping slide %s: %s", image_id, err)
            skipped.append(dict(image_id=image_id, reason=str(err), file=_file_tag(path)))
        else:
            rows += [dict(image_id=image_id, roi=k, mpp=mpp, **asdict(roi)) for k, roi in enumerate(rois)]
        if n % checkpoint_every == 0:
            save()
    if todo:
        save()
    extra = [c for c in ("data_provider",) if c in split]  # kept for per-provider analysis of the predictions
    lab = split[["image_id", "isup_grade", "split", *extra]].rename(columns={"isup_grade": "label"})
    lab = lab.astype({"image_id": str})
    rois_df = pd.DataFrame(rows, columns=loc_cols).merge(lab, on="image_id")  # inner: drops excluded slides
    cols = ["image_id", "roi", "label", "split", "mpp", "x", "y", "size", "tissue_fraction", *extra]
    skipped_df = pd.DataFrame(skipped, columns=["image_id", "reason"])
    return rois_df[cols].reset_index(drop=True), skipped_df[skipped_df.image_id.isin(lab.image_id)].reset_index(
        drop=True
    )


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
    out = {
        "errors": [(b["index"], b["error"]) for b in batch if "error" in b],
        "index": torch.tensor([b["index"] for b in ok], dtype=torch.long),
        "label": torch.tensor([b["label"] for b in ok], dtype=torch.long),
    }
    out["image"] = torch.stack([b["image"] for b in ok]) if ok else None
    return out

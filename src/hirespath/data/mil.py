"""Slide-level MIL data: bags of tile features from per-slide h5 files (TRIDENT / CLAM layout), read lazily.

One file per slide, ``<features_dir>/<slide_id>.h5``, holding

- ``features``: N×D (float32 in TRIDENT and hirespath; any float is read as float32). Its attrs may name the
  ``encoder`` (TRIDENT, hirespath) and hirespath's backbone, weights, attention, pruning and resolution.
- ``coords``: N×2 level-0 (x, y) of each tile's top-left corner. TRIDENT and hirespath give it attrs
  (``patch_size_level0``, ...); CLAM's legacy feature files have none; a file without ``coords`` reads as −1s.

``h5py.File(p)["features"][:]`` is the whole contract, so TRIDENT's and CLAM's own files work unchanged.
Files are opened in ``__getitem__`` (nothing held open: fork-safe for DataLoader workers).

The DataModule joins the files with a label table (``slide_id``, ``label``, ``split`` in train/val/test): a slide of
the table without a usable file is listed in ``skipped`` (slide_id, split, reason) instead of failing the run, and
a directory mixing feature dimensions or encoders is refused with an error naming two of its files.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..utils.errors import InputError
from ..utils.io import atomic_path, read_csv_ids
from ..wsi import trident_h5
from .samplers import evaluation_sampler

log = logging.getLogger("hirespath.mil")

SPLITS = ("train", "val", "test")
# attrs of `features` that identify the feature extractor (TRIDENT's `encoder`; the rest as hirespath's
# embed_slides writes them): files differing in one of them hold different features
IDENTITY_ATTRS = (
    "encoder",
    "backbone",
    "feature",
    "attention",
    "window",
    "prune_ratio",
    "prune_layer",
    "resolution",
    "depth",
    "num_heads",
    "architecture",
)
# the weights file, from the ``weights_fingerprint`` attr, as embed_slides tells files apart: by size and sampled
# digest, not by path or mtime (slides embedded on several nodes, each from its own copy, hold the same features)
WEIGHTS_KEYS = ("weights_size", "weights_digest")


SCAN_CACHE = ".hirespath_scan.json"  # beside the h5 files: what each held, keyed by its size, mtime and inode
SCAN_CACHE_VERSION = 4  # 2: the weights compared by size and digest; 3: depth, num_heads, architecture; 4: TRIDENT's
# files of no tiles (features and coords of shape (0,)) are "no tiles", not unreadable


def scan_feature_dir(features_dir: str | Path) -> pd.DataFrame:
    """One row per ``*.h5`` of the directory: slide_id, path, n_tiles, dim, tile_size (coords attr
    ``patch_size_level0``), the identity attrs, and ``error`` (why the file cannot be used, else None: unreadable,
    not a feature file, no tiles, or NaN/inf among its features — every value is read, in chunks).

    A file's row is kept in ``<features_dir>/.hirespath_scan.json`` under its size, mtime and inode, so a rerun
    reads only new or rewritten files (a folder that cannot be written is scanned without it). Refuses a directory
    whose usable files differ in feature dimension or in an identity attr (``IDENTITY_ATTRS``: ``encoder``, and
    hirespath's backbone/weights/attention/pruning/resolution) that both files set, naming two of them. Extra
    datasets (hirespath's ``tokens``) are ignored."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise InputError(f"features_dir {str(features_dir)!r} does not exist")
    paths = sorted(p for p in features_dir.glob("*.h5") if not p.name.startswith("."))  # not temporary files
    if not paths:
        # a job_dir or its tiling folder given for the features folder: name the feature folders below it (not
        # the tilings' grids, embedding's or segmentation's: coords only)
        below = sorted({str(p.parent) for pattern in ("*/*.h5", "*/*/*.h5") for p in features_dir.glob(pattern)
                        if p.parent.name not in (trident_h5.PATCHES, trident_h5.PATCHES_COVER_TISSUE)})  # fmt: skip
        hint = f"; feature folders below it: {', '.join(below)}" if below else ""
        if pts := [p for p in features_dir.glob("*.pt") if not p.name.startswith(".")]:
            h5 = features_dir.parent / "h5_files"  # CLAM's extract_features_fp writes both folders
            there = f" {h5}" if h5.is_dir() else ""
            hint += (f"; it holds {len(pts)} .pt files, CLAM's pt_files (not read: they have no coords): give "
                     f"CLAM's h5_files folder{there}, the same features with their coords")  # fmt: skip
        raise InputError(
            f"no <slide>.h5 feature files in {features_dir}; expected TRIDENT's layout "
            f"<job dir>/<tiling tag>/features_<encoder>/<slide>.h5 (as `hirespath embed_slides` writes){hint}"
        )
    cached = _read_scan_cache(features_dir)
    keep: dict[str, dict] = {}
    rows, todo = {}, []
    for p in paths:
        st = p.stat()
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = cached.get(p.name)
        if hit is not None and hit.get("key") == key:
            rows[p.name], keep[p.name] = {"slide_id": p.stem, "path": str(p), **hit["row"]}, hit
        else:
            todo.append((p, key))
    for p, key in tqdm(todo, desc="scanning feature files", unit="file", disable=len(todo) < 50):
        row, final = _scan_feature_file(p)
        rows[p.name] = row
        if final:  # a read error may be passing (a network file system): scanned again next time
            keep[p.name] = {"key": key, "row": {k: v for k, v in row.items() if k not in ("slide_id", "path")}}
    if keep != cached:
        _write_scan_cache(features_dir, keep)
    df = pd.DataFrame([rows[p.name] for p in paths])
    ok = df[df.error.isna()]
    _refuse_mixed(ok, "dim", "feature dimensions", features_dir)
    for key in IDENTITY_ATTRS + WEIGHTS_KEYS:
        _refuse_mixed(ok[ok[key].notna()], key, f"'{key}' attrs" if key in IDENTITY_ATTRS else key, features_dir)
    return df


def weights_identity(fingerprint) -> dict:
    """``weights_size`` and ``weights_digest`` of a ``weights_fingerprint`` attr (JSON; files written before
    2026-12-06 have no digest; TRIDENT's and CLAM's files no fingerprint)."""
    try:
        fp = json.loads(fingerprint) if isinstance(fingerprint, str) else None
    except ValueError:
        fp = None
    fp = fp if isinstance(fp, dict) else {}
    return {"weights_size": fp.get("size"), "weights_digest": fp.get("digest")}


# coords attrs: the features' scale, tile and overlap (a bag of overlapping tiles holds 2-4x the tiles of another)
TILING_KEYS = ("target_mpp", "target_magnification", "patch_size", "overlap")
TRAINED_ON = "features.json"  # in a mil run folder: what its features were (see features_identity)


def features_identity(path: str | Path) -> dict:
    """What a feature file says of how it was made, as predict_slides compares it: ``attrs`` (the identity attrs it
    sets), ``weights`` (size and digest of the weights file, where recorded) and ``tiling`` (:data:`TILING_KEYS` of
    ``coords``). Raises OSError/ValueError for a file that cannot be read."""
    info = trident_h5.inspect_features(path, count_nonfinite=False)  # attrs as plain Python (JSON-ready)
    attrs, coords = info["features_attrs"], info["coords_attrs"]
    return {
        "attrs": {k: attrs[k] for k in IDENTITY_ATTRS if attrs.get(k) is not None},
        "weights": weights_identity(attrs.get("weights_fingerprint")),  # by content: paths differ between machines
        # target_magnification: TRIDENT's files give the scale so, without target_mpp
        "tiling": {k: coords[k] for k in TILING_KEYS if coords.get(k) is not None},
    }


def _scan_feature_file(p: Path) -> tuple[dict, bool]:
    """The row of one file, and whether it may be cached (the file's content decided it, and every value is a
    JSON scalar that reads back as itself)."""
    row = {"slide_id": p.stem, "path": str(p), "n_tiles": 0, "dim": -1, "tile_size": None, "error": None}
    row.update(dict.fromkeys(IDENTITY_ATTRS + WEIGHTS_KEYS))
    try:
        info = trident_h5.inspect_features(p)
    except (OSError, ValueError) as err:  # unreadable / truncated h5 (may pass: not cached), or not a feature file
        row["error"] = f"cannot read {p.name}: {err}"
        return row, isinstance(err, ValueError)
    row.update(n_tiles=info["n_tiles"], dim=info["dim"], tile_size=info["tile_size"])
    row.update({k: info["features_attrs"].get(k) for k in IDENTITY_ATTRS})
    row.update(weights_identity(info["features_attrs"].get("weights_fingerprint")))
    if row["n_tiles"] == 0:
        row["error"] = f"no tiles in {p.name} (empty 'features')"
    elif info["nonfinite"]:
        row["error"] = f"{info['nonfinite']} non-finite feature values (NaN/inf) in {p.name}; embed it again"
    plain = all(v is None or type(v) in (str, int, float, bool) for v in row.values())
    return row, plain


def _read_scan_cache(features_dir: Path) -> dict[str, dict]:
    try:
        data = json.loads((features_dir / SCAN_CACHE).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: scan every file
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") != SCAN_CACHE_VERSION
        or not isinstance(data.get("files"), dict)
    ):
        return {}
    return data["files"]


def _write_scan_cache(features_dir: Path, files: dict[str, dict]) -> None:
    try:  # atomic: concurrent runs each write a whole file, the last one stays
        with atomic_path(features_dir / SCAN_CACHE) as tmp:
            Path(tmp).write_text(json.dumps({"version": SCAN_CACHE_VERSION, "files": files}))
    except OSError as err:  # a read-only folder (a shared dataset): scanned again next time
        log.debug("feature scan not cached in %s: %s", features_dir, err)


def _refuse_mixed(df: pd.DataFrame, column: str, what: str, features_dir: Path) -> None:
    values = df[column].astype(str).unique()
    if len(values) > 1:
        a = df[df[column].astype(str) == values[0]].iloc[0]
        b = df[df[column].astype(str) == values[1]].iloc[0]
        va, vb = (v.item() if isinstance(v, np.generic) else v for v in (a[column], b[column]))
        raise InputError(
            f"{features_dir} mixes {what}: {Path(a.path).name} has {va!r}, {Path(b.path).name} has {vb!r}. "
            "One directory must hold one feature extractor's files (TRIDENT keeps each in its own "
            "features_<encoder> folder); point features_dir at one of them."
        )


def check_labels(labels: pd.DataFrame | str | Path) -> pd.DataFrame:
    """The label table (a DataFrame or CSV path) validated: columns slide_id, label (integer ≥ 0), split
    (train/val/test), slide ids unique. Extra columns (data_provider, ...) are kept."""
    src = labels if isinstance(labels, (str, Path)) else "the label table"
    if isinstance(labels, (str, Path)):
        labels = read_csv_ids(labels, "slide_id")
    missing = [c for c in ("slide_id", "label", "split") if c not in labels.columns]
    if missing:
        raise InputError(f"{src} lacks columns {missing}; it needs slide_id, label, split (has {list(labels.columns)})")
    df = labels.copy()
    df["slide_id"] = df.slide_id.astype(str)
    label = pd.to_numeric(df.label, errors="coerce")
    bad = df[label.isna() | (label < 0) | (label != label.round())]
    if len(bad):
        raise InputError(
            f"{src}: label must be an integer class index ≥ 0; bad rows: "
            + ", ".join(f"{r.slide_id}: {r.label!r}" for r in bad.head(10).itertuples())
        )
    df["label"] = label.astype(int)
    bad = df[~df.split.isin(SPLITS)]
    if len(bad):
        raise InputError(
            f"{src}: split must be one of {list(SPLITS)}; bad rows: "
            + ", ".join(f"{r.slide_id}: {r.split!r}" for r in bad.head(10).itertuples())
        )
    dup = df.slide_id[df.slide_id.duplicated()]
    if len(dup):
        raise InputError(f"{src}: slide_id {dup.iloc[0]!r} appears more than once ({len(dup)} duplicates)")
    return df.reset_index(drop=True)


class SlideFeatureDataset(Dataset):
    """Bags of one slide each: ``{"features": N×D, "coords": N×2, "label", "slide_id", "index", "tile_size"}``.

    ``max_tiles``: bags larger than this are subsampled without replacement — afresh at every read with
    ``random=True`` (training: torch's RNG, which Lightning's ``seed_everything(workers=True)`` seeds per worker),
    else the same subset at every read (seeded by ``seed`` and the slide's index)."""

    def __init__(
        self,
        rows: pd.DataFrame,
        max_tiles: int | None = None,
        random: bool = False,
        seed: int = 0,
    ):
        missing = [c for c in ("slide_id", "path", "label") if c not in rows.columns]
        if missing:
            raise ValueError(f"SlideFeatureDataset rows lack columns {missing}")
        if max_tiles is not None and int(max_tiles) < 1:
            raise ValueError(f"max_tiles must be a positive integer or None, got {max_tiles!r}")
        self.rows = rows.reset_index(drop=True)
        self.max_tiles, self.random, self.seed = max_tiles, random, seed

    def __len__(self) -> int:
        return len(self.rows)

    def tile_subset(self, n: int, slide_id: str) -> np.ndarray | None:
        """The indices of the ``max_tiles`` a bag of ``n`` tiles keeps (random, or the slide's fixed draw); None: all"""
        if not self.max_tiles or n <= self.max_tiles:
            return None
        if self.random:
            idx = torch.randperm(n)[: self.max_tiles].numpy()
        else:  # by the slide's id, not its place in the table: predict_slides' folder gives mil's test subset back
            idx = np.random.default_rng((self.seed, zlib.crc32(slide_id.encode()))).choice(
                n, self.max_tiles, replace=False
            )
        return np.sort(idx)

    def __getitem__(self, i: int) -> dict:
        r = self.rows.iloc[i]
        data = trident_h5.read_features(r.path)
        feats, coords = data["features"], data["coords"]
        idx = self.tile_subset(len(feats), str(r.slide_id))
        if idx is not None:
            feats, coords = feats[idx], coords[idx]
        size = data["coords_attrs"].get("patch_size_level0")
        return {
            "features": torch.from_numpy(np.ascontiguousarray(feats)),
            "coords": torch.from_numpy(np.ascontiguousarray(coords)),
            "label": int(r.label),
            "slide_id": str(r.slide_id),
            "index": i,
            "tile_size": int(size) if size is not None else None,
        }


def collate_bags(batch: list[dict]) -> dict:
    """Pad bags to the largest: ``features`` B×N×D (zeros), ``mask`` B×N (True = real tile), ``coords`` B×N×2
    (−1 on padding), ``label`` B, ``n_tiles`` B, ``index`` B, ``slide_id`` and ``tile_size`` lists."""
    n = max(len(b["features"]) for b in batch)
    dim = batch[0]["features"].shape[1]
    feats = torch.zeros(len(batch), n, dim, dtype=torch.float32)
    coords = torch.full((len(batch), n, 2), -1, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.bool)
    for k, b in enumerate(batch):
        m = len(b["features"])
        feats[k, :m], coords[k, :m], mask[k, :m] = b["features"], b["coords"], True
    return {
        "features": feats,
        "mask": mask,
        "coords": coords,
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "n_tiles": mask.sum(1),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "slide_id": [b["slide_id"] for b in batch],
        "tile_size": [b["tile_size"] for b in batch],
    }


class MILDataModule(L.LightningDataModule):
    """Slides of ``labels`` (DataFrame or CSV: slide_id, label, split) with their features in ``features_dir``.

    ``rows``: the usable slides (slide_id, label, split, path, n_tiles, tile_size, ...); ``skipped``: the slides of
    the table that have no usable file (slide_id, split, reason); ``feature_dim``, ``encoder``, ``num_classes``.
    Training shuffles (Lightning adds the distributed sampler under DDP); evaluation loaders use an unrepeated
    distributed sampler under DDP so every slide is evaluated exactly once."""

    def __init__(
        self,
        features_dir: str | Path,
        labels: pd.DataFrame | str | Path,
        batch_size: int = 1,
        num_workers: int = 0,
        max_tiles_train: int | None = None,
        max_tiles_eval: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
        self.features_dir = Path(features_dir)
        self.batch_size, self.num_workers, self.pin_memory = int(batch_size), int(num_workers), pin_memory
        self.max_tiles_train, self.max_tiles_eval, self.seed = max_tiles_train, max_tiles_eval, seed
        table = check_labels(labels)
        files = scan_feature_dir(self.features_dir)
        df = table.merge(files, on="slide_id", how="left", suffixes=("", "_file"))
        reason = df.error.where(
            df.path.notna(), "no feature file " + (str(self.features_dir) + "/") + df.slide_id + ".h5"
        )
        bad = reason.notna()
        self.skipped = pd.DataFrame({"slide_id": df.slide_id[bad], "split": df.split[bad], "reason": reason[bad]})
        self.skipped = self.skipped.reset_index(drop=True)
        self.rows = df[~bad].drop(columns=["error"]).reset_index(drop=True)
        self.rows["n_tiles"] = self.rows.n_tiles.astype(int)
        if len(self.skipped):
            log.warning(
                "%d of %d labelled slides skipped (no usable feature file in %s), e.g. %s: %s",
                len(self.skipped),
                len(table),
                self.features_dir,
                self.skipped.slide_id.iloc[0],
                self.skipped.reason.iloc[0],
            )
        unused = int((~files.slide_id.isin(table.slide_id)).sum())
        if unused:
            log.info("%d feature files of %s are not in the label table (ignored)", unused, self.features_dir)
        if self.rows.empty:
            raise ValueError(
                f"no slide of the label table has a usable feature file in {self.features_dir} "
                f"(table slide ids e.g. {table.slide_id.head(3).tolist()}, "
                f"files e.g. {files.slide_id.head(3).tolist()})"
            )
        self.feature_dim = int(self.rows.dim.iloc[0])
        enc = self.rows.encoder.dropna()
        self.encoder = str(enc.iloc[0]) if len(enc) else None
        top = int(table.label.max()) + 1
        if num_classes is not None and top > int(num_classes):
            raise ValueError(
                f"label {top - 1} in the label table, but num_classes={num_classes} (labels 0…{num_classes - 1})"
            )
        self.num_classes = int(num_classes) if num_classes is not None else top

    def split_rows(self, name: str) -> pd.DataFrame:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {list(SPLITS)}")
        return self.rows[self.rows.split == name].reset_index(drop=True)

    def dataset(self, name: str, train: bool = False) -> SlideFeatureDataset:
        rows = self.split_rows(name)
        if rows.empty:
            raise ValueError(f"no {name!r} slides with features in {self.features_dir} (see the skipped list)")
        if train:
            return SlideFeatureDataset(rows, self.max_tiles_train, random=True, seed=self.seed)
        return SlideFeatureDataset(rows, self.max_tiles_eval, random=False, seed=self.seed)

    def _loader(self, ds: SlideFeatureDataset, shuffle: bool) -> DataLoader:
        sampler = None if shuffle else evaluation_sampler(ds)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_bags,
            drop_last=False,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader(self.dataset("train", train=True), True)

    def val_dataloader(self):
        return self._loader(self.dataset("val"), False)

    def test_dataloader(self):
        return self._loader(self.dataset("test"), False)

    def predict_dataloader(self):
        return self.test_dataloader()


def panda_slide_labels(
    root: str | Path,
    cache_dir: str | Path | None = None,
    split_csv: str | Path | None = None,
    exclude: str | Path | None = None,
    split_seed: int = 42,
) -> pd.DataFrame:
    """PANDA's label table for MIL (slide_id, label = ISUP grade, split, data_provider) on the SAME stratified split
    file as the ROI tasks: ``split_csv``, else ``cache_dir/panda/<root hash>/split_seed<seed>.csv`` (written by the
    first task that needs it, then reused by all)."""
    from .panda import check_panda_root, default_split_csv, load_or_make_split

    root = check_panda_root(root)
    if split_csv is None:
        if cache_dir is None:
            raise ValueError("panda_slide_labels needs split_csv or cache_dir (to find the ROI tasks' split file)")
        split_csv = default_split_csv(root, cache_dir, split_seed)
    split = load_or_make_split(root, split_csv, exclude, split_seed=int(split_seed))
    out = pd.DataFrame(
        {"slide_id": split.image_id.astype(str), "label": split.isup_grade.astype(int), "split": split.split}
    )
    if "data_provider" in split:
        out["data_provider"] = split.data_provider.to_numpy()
    return out

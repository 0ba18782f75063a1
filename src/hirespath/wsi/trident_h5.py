"""Whole-slide feature files in TRIDENT's layout, readable by TRIDENT, CLAM and the slide encoders built on them.

Layout (TRIDENT ``run_batch_of_slides.py``; see docs/design.md "Whole-slide features")::

    <job_dir>/<tiling tag>/patches/<slide>_patches.h5            coords (+ attrs)
    <job_dir>/<tiling tag>/features_<encoder tag>/<slide>.h5     features, coords (+ attrs) [, tokens ...]

Datasets are chunked with ``maxshape=(None, ...)`` as TRIDENT's ``save_h5`` makes them (resizable along tiles);
chunks hold ~256 KB instead of TRIDENT's single rows, so a 15k-tile file is not 15k chunk reads. Attributes follow
``save_h5``: dicts as JSON strings, None as the string ``'None'``.

* ``coords`` int64 N×2, level-0 top-left (x, y). Attrs: ``patch_size`` (tile px at the target scale),
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``,
  ``level0_width``, ``level0_height`` (TRIDENT's), plus ``target_mpp``, ``level0_mpp``, ``stride_level0``,
  ``min_tissue``, ``cover_tissue`` (0/1), ``grid_offset_x``, ``grid_offset_y`` (the grid's first tile at (−x, −y): 0
  but for a covering grid fitted to the tissue), ``tissue_threshold`` (only when one was set: the fixed saturation
  above which a pixel was tissue; absent: Otsu's), ``tiling``, ``tissue_area_mm2``, ``qupath_region`` (x, y, w, h: the
  level-0 region QuPath shows, a MIRAX/SCN scan's, for heatmaps drawn without the slide). The magnifications are the
  unrounded ``10 / mpp`` (see :mod:`hirespath.wsi.tissue`), so ``round(patch_size · level0_magnification /
  target_magnification)`` is ``patch_size_level0``, the level-0 side that was read.
* ``features`` float32 N×D (CLAM's models need float32). Attrs: ``name``, ``savetodir``, ``encoder`` (TRIDENT's),
  plus ``backbone``, ``attention``, ``window``, ``radius``, ``prune_ratio``, ``prune_layer``,
  ``prune_score_tokens``, ``resolution`` (tile px the encoder saw), ``vit_patch_size``, ``depth``, ``num_heads``,
  ``num_prefix_tokens``, ``architecture`` (a digest of the module's tensor shapes), ``weights`` (path or 'None'),
  ``weights_fingerprint`` (JSON: path, size, mtime, digest), ``feature`` (cls | mean | cls+mean), ``precision``,
  ``embed_dim``, ``num_tiles``.
* Optional per-token output (``tokens=True``): ``tokens`` (T×D, float16 by default, the kept final normed patch
  tokens of all tiles concatenated in tile order), ``token_positions`` (T×2 int16 (row, col) in the tile's patch
  grid; int32 for grids over 32,767 patches a side), ``token_offsets`` (N+1 int64: tile i owns rows
  ``offsets[i]:offsets[i+1]``). Cost: kept·(D·2 + 4) bytes per tile in float16 — UNI2-h (D=1536, patch 14) at
  1,792 px (128² = 16,384 patches) keeps 6,554 tokens at prune ratio 0.6: 20.2 MB per tile, 50.4 MB without
  pruning; a 500-tile slide: ~10 GB (25 GB unpruned), against 3 MB for its CLS features. Use it for a few slides
  or small tiles (224 px, 256 patches: 0.8 MB per tile unpruned).
* Optional per-patch scores (``token_scores=True``): ``token_scores`` (N×(rows·cols) float32, attr ``grid`` =
  [rows, cols]): each tile's global-attention score of every patch of its grid (the pruner's scores at its layer,
  0 for none; without pruning the last block's prefix attention). 4 bytes per patch: 64 KB per 1,792 px UNI2-h
  tile. ``hirespath predict_slides heatmaps.resolution=token`` draws them.

Files are written under a temporary name in the same folder and renamed when complete (``os.replace``): a killed
job never leaves a file a rerun would take as finished. CLAM's loader (``h5py.File(path)['features'][:]``) and
TRIDENT's ``read_coords`` read them as they are.

Reading (:func:`read_features`, :func:`read_coords`, :func:`inspect_features`) accepts what TRIDENT and CLAM write
too, with one tolerance policy (see "reading" below); the MIL data reads its bags through it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np

from ..utils.checkpoints import file_digest
from ..utils.errors import InputError
from ..utils.io import atomic_path, discard_h5, new_h5, temporary_beside

CHUNK_BYTES = 1 << 18
SCORES_DESCRIPTION = (
    "row i: tile i's patches' global-attention scores, row-major over attrs['grid'] (rows, cols): "
    "the pruner's scores at its layer, or the last block's prefix attention when nothing is pruned"
)


def _fmt_mag(mag: float) -> str:
    """TRIDENT's folder spelling of a magnification: 20 → '20', 1.25 → '1.25'."""
    return str(round(mag)) if abs(mag - round(mag)) < 1e-9 else f"{mag:g}"


def is_standard_magnification(mpp: float) -> bool:
    """True when 10/mpp is exactly a number with at most 3 decimals (0.5 → 20x, 0.25 → 40x, 8 → 1.25x)."""
    mag = 10.0 / mpp
    return math.isclose(mag, round(mag, 3), rel_tol=1e-9, abs_tol=0.0)


# the tiling folder's shared sub-folders: the grids (TRIDENT's min_tissue tiles; segmentation's covering grid) and
# the slides' thumbnails
PATCHES, PATCHES_COVER_TISSUE, THUMBNAILS = "patches", "patches_cover_tissue", "thumbnails"


def tiling_tag(target_mpp: float, tile_size: int, overlap: int = 0) -> str:
    """TRIDENT's tiling folder name: ``20x_1792px_0px_overlap`` for 0.5 µm/px.

    TRIDENT names tilings by target magnification (``f"{mag}x_{patch_size}px_{overlap}px_overlap"``, fractional
    magnifications as ``1.25x``); magnification here is 10/mpp. When that is not a round number (10/0.6 = 16.67)
    the magnification would misname the scale, so ``mpp<target_mpp>`` (``%g``, e.g. ``mpp0.6_1792px_0px_overlap``)
    takes its place; the exact ``target_mpp`` is in the files' attributes either way.
    """
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise ValueError(f"target_mpp must be a positive number of µm per pixel, got {target_mpp!r}")
    scale = f"{_fmt_mag(10.0 / target_mpp)}x" if is_standard_magnification(target_mpp) else f"mpp{target_mpp:g}"
    return f"{scale}_{int(tile_size)}px_{int(overlap)}px_overlap"


def encoder_tag(encoder, features: str = "cls", weights: str | os.PathLike | None = None) -> str:
    """Folder name of one encoder configuration, e.g. ``uni2_h_sparse-w8_prune0.6-l4_cls``.

    It names what changes the numbers and can be read off the encoder: preset, attention (window, radius when not
    1), pruning (ratio, layer, score tokens when not CLS), the feature kind; ``-random`` when no weights file is
    given. Architecture overrides and which weights file are not in the name: the engine records the full
    configuration in ``features_<tag>/config.json`` and refuses to mix another one into that folder.
    """
    preset = getattr(getattr(encoder, "preset", None), "name", None) or "vit"
    att = encoder.attention
    if att == "sparse":
        att = f"sparse-w{encoder.window}" + (f"-r{encoder.radius}" if getattr(encoder, "radius", 1) != 1 else "")
    parts = [preset, att]
    pruner = getattr(encoder, "pruner", None)
    if pruner is not None and pruner.enabled:
        parts.append(
            f"prune{pruner.ratio:g}-l{pruner.layer}"
            + ("" if pruner.score_tokens == "cls" else f"-{pruner.score_tokens}")
        )
    parts.append(features.replace("+", "-"))
    tag = "_".join(parts)
    return tag if weights else f"{tag}-random"


def weights_fingerprint(weights) -> dict | None:
    """Where the weights came from (path, mtime) and what they are (size, sampled digest: equal for a copy)."""
    if not weights:
        return None
    st = os.stat(weights)
    return {"path": str(Path(weights).resolve()), "size": st.st_size, "mtime": int(st.st_mtime),
            "digest": file_digest(weights)}  # fmt: skip


ARCHITECTURE_KEYS = ("depth", "num_heads", "num_prefix_tokens", "architecture")  # recorded since 2026-12-07


def architecture(encoder) -> dict:
    """What the encoder's module is, beyond its preset's name (a narrowed or overridden preset): ``depth``,
    ``num_heads``, ``num_prefix_tokens`` and ``architecture``, a digest of its parameter and buffer shapes (MLP kind
    and width, position table, norms). Empty for a module without a timm ViT (``encoder.vit``)."""
    import hashlib

    vit = getattr(encoder, "vit", None)
    if vit is None or not hasattr(vit, "blocks"):
        return {}
    shapes = sorted(list(t.shape) for t in vit.state_dict().values())  # by shape: names may move between versions
    heads = int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else 0
    digest = hashlib.blake2b(json.dumps([heads, shapes]).encode(), digest_size=8).hexdigest()
    return {"depth": len(vit.blocks), "num_heads": heads, "num_prefix_tokens": int(vit.num_prefix_tokens),
            "architecture": digest}  # fmt: skip


def encoder_attrs(
    encoder,
    *,
    tag: str,
    features: str,
    tile_size: int,
    weights=None,
    precision: str = "fp32",
    extra: dict | None = None,
) -> dict:
    """The ``features`` dataset's attributes for this encoder configuration (TRIDENT's ``encoder`` + ours)."""
    pruner = getattr(encoder, "pruner", None)
    attrs = {
        "encoder": tag,
        "backbone": getattr(getattr(encoder, "preset", None), "name", None),
        "attention": encoder.attention,
        "window": int(encoder.window),
        "radius": int(getattr(encoder, "radius", 1)),
        "prune_ratio": float(pruner.ratio) if pruner is not None else 0.0,
        "prune_layer": int(pruner.layer) if pruner is not None else 0,
        "prune_score_tokens": pruner.score_tokens if pruner is not None else "cls",
        "resolution": int(tile_size),
        "vit_patch_size": int(encoder.patch_size),
        "embed_dim": int(encoder.embed_dim),
        **architecture(encoder),
        "weights": str(weights) if weights else None,
        "weights_fingerprint": weights_fingerprint(weights),
        "feature": features,
        "precision": str(precision),
    }
    attrs.update(extra or {})
    return attrs


def coords_attrs(grid, *, name: str, savetodir: str | os.PathLike, tiling: str, qupath_region=None) -> dict:
    """The ``coords`` dataset's attributes for a :class:`~hirespath.wsi.tissue.TileGrid` (TRIDENT's + ours);
    ``qupath_region``: the level-0 (x, y, w, h) QuPath shows of the slide (heatmaps drawn without the slide)."""
    region = {"qupath_region": [int(v) for v in qupath_region]} if qupath_region is not None else {}
    return {
        "patch_size": int(grid.tile_size),
        "patch_size_level0": int(grid.patch_size_level0),
        "level0_magnification": float(grid.level0_magnification),
        "target_magnification": float(grid.target_magnification),
        "overlap": int(grid.overlap),
        "name": name,
        "savetodir": str(savetodir),
        "level0_width": int(grid.level0_size[0]),
        "level0_height": int(grid.level0_size[1]),
        "target_mpp": float(grid.tile_mpp),
        "level0_mpp": float(grid.slide_mpp),
        "stride_level0": int(grid.stride_level0),
        "min_tissue": float(grid.min_tissue),
        "cover_tissue": int(grid.cover_tissue),  # 0/1: an HDF5 integer every reader takes (bool is an enum)
        "grid_offset_x": int(grid.grid_offset[0]),  # the grid's first tile at (-x, -y): 0 but for a fitted cover
        "grid_offset_y": int(grid.grid_offset[1]),
        "tiling": tiling,
        # only when set: HDF5 has no None, and files without it (those made before it existed too) used Otsu's
        **({} if grid.tissue_threshold is None else {"tissue_threshold": float(grid.tissue_threshold)}),
        **region,
    }


# ---------------------------------------------------------------------------------------------------------------
# writing


def _to_attr(value):
    """TRIDENT's save_h5 conventions: dicts as JSON, None as 'None'; paths and non-numeric lists as strings/JSON."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (list, tuple)) and not all(isinstance(v, (int, float, np.number)) for v in value):
        return json.dumps(list(value), default=str)
    return value


def _set_attrs(dset, attrs: dict | None) -> None:
    for k, v in (attrs or {}).items():
        try:
            dset.attrs[k] = _to_attr(v)
        except TypeError as err:
            raise TypeError(f"cannot store attribute {k}={v!r} on {dset.name}: {err}") from err


def _chunk_rows(row_bytes: int) -> int:
    return int(min(4096, max(1, CHUNK_BYTES // max(1, row_bytes))))


def _dataset(f: h5py.File, name: str, width: int, dtype) -> h5py.Dataset:
    dtype = np.dtype(dtype)
    return f.create_dataset(
        name, shape=(0, width), maxshape=(None, width), dtype=dtype, chunks=(_chunk_rows(width * dtype.itemsize), width)
    )


def _append(dset: h5py.Dataset, rows: np.ndarray) -> None:
    if len(rows):
        n = dset.shape[0]
        dset.resize(n + len(rows), axis=0)
        dset[n:] = rows


class FeatureWriter:
    """Streams one slide's features (and tokens) into ``path`` batch by batch; the file appears only on ``close``.

    Used as a context manager: an exception discards the temporary file. Nothing of the slide is held in memory
    beyond the batch being appended.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        coords_attrs: dict,
        features_attrs: dict,
        tokens: bool = False,
        token_dtype=np.float16,
        token_dim: int | None = None,  # the tokens' width (the encoder's dim; `dim` is twice it for cls+mean)
        token_scores: bool = False,  # also `token_scores`: N×(rows·cols) float32 per-patch global-attention scores
    ):
        self.path = Path(path)
        self.tmp = temporary_beside(self.path)  # renamed onto path when closed
        self.coords_attrs, self.features_attrs = dict(coords_attrs), dict(features_attrs)
        self.tokens = tokens
        self.file = h5py.File(self.tmp, "w")
        self.features = _dataset(self.file, "features", dim, np.float32)
        self.coords = _dataset(self.file, "coords", 2, np.int64)
        if tokens:
            self.tok = _dataset(self.file, "tokens", token_dim or dim, token_dtype)
            self.pos = None  # dtype chosen from the first grid
            self.offsets = [0]
        self.token_scores = token_scores
        self.scores = None  # width (rows·cols) from the first grid
        self.n = 0

    def append(self, features, coords, tokens=None, positions=None, grid: tuple[int, int] | None = None,
               token_scores=None) -> None:  # fmt: skip
        """Add B tiles: features B×D, coords B×2; with tokens, per tile its kept tokens nᵢ×D and their (row, col);
        with token scores, B×rows·cols (row-major over the tile's patch grid ``grid``)."""
        features = np.asarray(features, dtype=np.float32)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        if len(features) != len(coords):
            raise ValueError(f"{len(features)} feature rows for {len(coords)} coords")
        _append(self.features, features)
        _append(self.coords, coords)
        if self.tokens:
            if tokens is None or positions is None or len(tokens) != len(coords):
                raise ValueError("tokens=True: pass each tile's tokens and positions")
            if self.pos is None:
                big = grid is not None and max(grid) > np.iinfo(np.int16).max
                self.pos = _dataset(self.file, "token_positions", 2, np.int32 if big else np.int16)
            for t, p in zip(tokens, positions):
                _append(self.tok, np.asarray(t, dtype=self.tok.dtype))
                _append(self.pos, np.asarray(p, dtype=self.pos.dtype))
                self.offsets.append(self.offsets[-1] + len(t))
        if self.token_scores:
            if token_scores is None or grid is None or len(token_scores) != len(coords):
                raise ValueError("token_scores=True: pass each tile's scores (B×rows·cols) and the patch grid")
            if self.scores is None:
                self.scores = _dataset(self.file, "token_scores", int(grid[0]) * int(grid[1]), np.float32)
                _set_attrs(self.scores, {"grid": [int(grid[0]), int(grid[1])], "description": SCORES_DESCRIPTION})
            _append(self.scores, np.asarray(token_scores, dtype=np.float32).reshape(len(coords), -1))
        self.n += len(coords)

    def close(self) -> Path:
        if self.tokens:
            if self.pos is None:
                self.pos = _dataset(self.file, "token_positions", 2, np.int16)
            off = self.file.create_dataset(
                "token_offsets",
                data=np.asarray(self.offsets, dtype=np.int64),
                maxshape=(None,),
                chunks=(_chunk_rows(8),),
            )
            _set_attrs(off, {"description": "tile i's tokens are tokens[token_offsets[i]:token_offsets[i+1]]"})
        _set_attrs(self.coords, self.coords_attrs)
        _set_attrs(self.features, {**self.features_attrs, "num_tiles": self.n})
        self.file.flush()  # a full disk fails here, where the file can still be discarded (abort), not in close
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            discard_h5(self.file)
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_patches_h5(path: str | os.PathLike, coords, attrs: dict) -> Path:
    """TRIDENT's ``<slide>_patches.h5``: the ``coords`` dataset with the tiling attributes, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, new_h5(tmp) as f:
        dset = _dataset(f, "coords", 2, np.int64)
        _append(dset, np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        _set_attrs(dset, attrs)
    return path


def write_features_h5(
    path: str | os.PathLike,
    features,
    coords,
    coords_attrs: dict,
    features_attrs: dict,
    tokens=None,
    token_positions=None,
    token_dtype=np.float16,
) -> Path:
    """One slide's features file in one call (``tokens``/``token_positions``: per-tile lists, or None)."""
    features = np.asarray(features, dtype=np.float32)
    token_dim = int(np.asarray(tokens[0]).shape[-1]) if tokens is not None and len(tokens) else None
    with FeatureWriter(path, features.shape[1], coords_attrs, features_attrs, tokens=tokens is not None,
                       token_dtype=token_dtype, token_dim=token_dim) as w:  # fmt: skip
        w.append(features, coords, tokens, token_positions)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# reading: one tolerance policy for every reader (the MIL bags, read_features, the engine's patches files), so a
# file TRIDENT, CLAM or hirespath wrote reads the same whichever code reads it:
# - ``features`` N×D, or 1×N×D (some writers keep a batch axis); any float dtype is returned as float32;
# - ``coords`` N×2 int64, or −1s when the file has none (CLAM's legacy files may not);
# - attrs as plain Python: bytes → str, numpy scalars → int/float, TRIDENT's 'None' → None (JSON dicts stay text).

READ_CHUNK_ROWS = 4096  # rows per read when a whole features dataset is scanned (bounded memory)


def _from_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, str) and value == "None" else value


def _attrs(dset) -> dict:
    return {k: _from_attr(v) for k, v in dset.attrs.items()}


def _features_dataset(f: h5py.File, path: Path) -> tuple[h5py.Dataset, tuple[int, int]]:
    """The ``features`` dataset and its (tiles, dim), a leading axis of 1 dropped."""
    ds = f.get("features")
    if not isinstance(ds, h5py.Dataset):
        raise InputError(
            f"{path}: no 'features' dataset (has {sorted(f.keys())}); expected a TRIDENT/CLAM feature file"
        )
    if ds.ndim == 3 and ds.shape[0] == 1:
        return ds, ds.shape[1:]
    if ds.shape == (0,):  # TRIDENT's file of a slide without tissue: no tiles, no dimension
        return ds, (0, 0)
    if ds.ndim != 2:
        raise InputError(f"{path}: 'features' has shape {ds.shape}; expected N×D (tiles × feature dimension)")
    return ds, ds.shape


def _feature_rows(ds: h5py.Dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    if ds.ndim == 1:  # (0,): no tiles (_features_dataset)
        return np.zeros((0, 0), dtype=np.float32)
    rows = ds[0, start:stop] if ds.ndim == 3 else ds[start:stop]
    return np.asarray(rows, dtype=np.float32)


def _coords(f: h5py.File, path: Path, n: int) -> tuple[np.ndarray, dict]:
    """(coords N×2 int64, their attrs); −1s and no attrs when the file has no ``coords``."""
    if "coords" not in f:
        return np.full((n, 2), -1, dtype=np.int64), {}
    ds = f["coords"]
    if ds.shape == (0,) and n == 0:  # TRIDENT's slide without tissue (its coords np.array([]))
        return np.zeros((0, 2), dtype=np.int64), _attrs(ds)
    if ds.ndim != 2 or ds.shape[1] != 2:
        raise InputError(f"{path}: 'coords' has shape {ds.shape}; expected N×2 level-0 (x, y)")
    if ds.shape[0] != n:
        raise InputError(f"{path}: {n} feature rows but {ds.shape[0]} coords; the file is inconsistent")
    return np.asarray(ds[:], dtype=np.int64), _attrs(ds)


def read_coords(path: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """(attrs, coords) of a patches or features file, as TRIDENT's ``read_coords`` returns them (attrs decoded by
    the policy above); InputError when the file has no N×2 ``coords``."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise InputError(f"{path}: no 'coords' dataset (has {sorted(f.keys())})")
        coords, attrs = _coords(f, path, f["coords"].shape[0])
    return attrs, coords


def read_features(path: str | os.PathLike, tokens: bool = False) -> dict:
    """One slide's ``features`` (N×D float32), ``coords`` (N×2 int64; −1 where the file has none), both datasets'
    attributes (``features_attrs``, ``coords_attrs``), and with ``tokens`` the token datasets."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        ds, (n, _dim) = _features_dataset(f, path)
        coords, coords_attrs = _coords(f, path, n)
        out = {
            "features": _feature_rows(ds),
            "coords": coords,
            "features_attrs": _attrs(ds),
            "coords_attrs": coords_attrs,
        }
        if tokens:
            if "tokens" not in f:
                raise KeyError(f"{path} has no tokens (written without tokens=True)")
            out.update(
                tokens=f["tokens"][:], token_positions=f["token_positions"][:], token_offsets=f["token_offsets"][:]
            )
    return out


def inspect_features(path: str | os.PathLike, count_nonfinite: bool = True) -> dict:
    """What a features file holds, without keeping it in memory: ``n_tiles``, ``dim``, ``features_attrs``,
    ``coords_attrs``, ``tile_size`` (coords attr ``patch_size_level0``, else None) and ``nonfinite`` (NaN/inf
    values among the features, read in chunks; 0 when not counted). Raises InputError / OSError for a file the
    readers cannot use (the same checks :func:`read_features` makes)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        ds, (n, dim) = _features_dataset(f, path)
        _, coords_attrs = _coords(f, path, n)  # checked as read_features checks them (N×2 int64: small)
        info = {"n_tiles": int(n), "dim": int(dim), "features_attrs": _attrs(ds), "coords_attrs": coords_attrs}
        nonfinite = 0
        if count_nonfinite:
            for start in range(0, n, READ_CHUNK_ROWS):
                nonfinite += int((~np.isfinite(_feature_rows(ds, start, start + READ_CHUNK_ROWS))).sum())
    size = info["coords_attrs"].get("patch_size_level0")
    info["tile_size"] = int(size) if size is not None else None
    info["nonfinite"] = nonfinite
    return info


def read_tile_tokens(path: str | os.PathLike, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One tile's kept tokens and their (row, col), read without loading the others."""
    with h5py.File(path, "r") as f:
        off = f["token_offsets"]
        a, b = int(off[index]), int(off[index + 1])
        return f["tokens"][a:b], f["token_positions"][a:b]

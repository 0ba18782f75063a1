"""Embedding extraction through Lightning predict (so DDP splits the slides), with an atomic on-disk cache.

The cache key hashes everything that changes the numbers: backbone preset, architecture overrides, the
weights file (path, size, mtime), attention mode/window/radius, pruner, resolution, ROI policy, data root and
the extraction version. Inside a key's file the embeddings are stored per ROI position (image_id, roi, x, y,
size): a changed split, corrected labels, excluded or added slides reuse what is there and extract only the
ROIs it lacks ("cache hit" when none). Reads that failed are not cached: they are retried on the next run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..callbacks.embeddings_writer import EmbeddingsWriter
from ..data.panda import PandaROIDataset, collate_skipping
from ..modules.encoder_predictor import EncoderPredictor
from ..utils.io import atomic_path, exclusive_lock

log = logging.getLogger("hirespath.embeddings")
EXTRACT_VERSION = 2  # 2: cache files store embeddings per ROI position
POSITION = ("image_id", "roi", "x", "y", "size")


def file_fingerprint(path) -> dict | None:
    if not path:
        return None
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def cache_key(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _merge(shard_dir: Path, n: int, dim: int) -> tuple[dict, list]:
    cls = torch.full((n, dim), float("nan"))
    mean = torch.full((n, dim), float("nan"))
    errors = []
    for part in sorted(shard_dir.glob("part_*.pt")) if shard_dir.is_dir() else []:
        for b in torch.load(part, weights_only=False):
            errors += b["errors"]
            if b["cls"] is not None:
                cls[b["index"]] = b["cls"]
                mean[b["index"]] = b["mean"]
    return {"cls": cls, "mean": mean}, errors


def roi_positions(rois: pd.DataFrame) -> list[tuple]:
    """What identifies a ROI's pixels within one data root and ROI policy."""
    return list(zip(rois.image_id.astype(str).tolist(), *(rois[c].astype(int).tolist() for c in POSITION[1:])))


def extract_embeddings(
    encoder,
    root,
    rois: pd.DataFrame,
    resolution: int,
    cache_dir,
    key_parts: dict,
    *,
    batch_size: int = 4,
    num_workers: int = 0,
    trainer: Callable[..., L.Trainer] | None = None,
    flush_every: int = 50,
) -> dict:
    """Embeddings of every ROI (rows of ``rois``, in order), extracting only those the cache lacks.

    ``trainer``: a factory of the predict Trainer, e.g. ``hydra.utils.instantiate(cfg.trainer, _partial_=True,
    precision=...)`` (accelerator, devices, DDP strategy and precision from the trainer group) or
    ``functools.partial(lightning.Trainer, accelerator="cpu")``; it is called with ``callbacks``, ``logger=False``
    and ``enable_model_summary=False``. Default: ``lightning.Trainer`` on one device of the best accelerator.

    A single-process job holds ``<key>.lock`` while it extracts, so parallel jobs needing the same embeddings
    (the two heads of a grid point under joblib or a SLURM array) extract them once: the second waits, then hits
    the cache. DDP jobs do not lock (their ranks must all take part).
    """
    key = cache_key({**key_parts, "resolution": resolution, "version": EXTRACT_VERSION})
    path = Path(cache_dir) / "embeddings" / f"{key}.pt"
    writer = EmbeddingsWriter(path.parent, flush_every)  # its directory is set to this pass's shard folder
    make_trainer = trainer or functools.partial(L.Trainer, accelerator="auto", devices=1)
    predictor = make_trainer(callbacks=[writer], logger=False, enable_model_summary=False)
    distributed = predictor.world_size > 1
    lock = (
        contextlib.nullcontext()
        if distributed
        else exclusive_lock(path.with_suffix(".lock"), f"another job extracting the same embeddings ({path.name})")
    )
    with lock:
        return _extract(
            encoder,
            root,
            rois,
            resolution,
            path,
            key,
            key_parts,
            batch_size=batch_size,
            num_workers=num_workers,
            trainer=predictor,
            writer=writer,
        )


def _extract(
    encoder,
    root,
    rois: pd.DataFrame,
    resolution: int,
    path: Path,
    key: str,
    key_parts: dict,
    *,
    batch_size: int,
    num_workers: int,
    trainer: L.Trainer,
    writer: EmbeddingsWriter,
) -> dict:
    want = roi_positions(rois)
    store = torch.load(path, weights_only=False) if path.is_file() else None
    have = set(store["positions"]) if store else set()
    missing = [i for i, p in enumerate(want) if p not in have]
    if not missing:
        log.info("cache hit: %s", path)
        return _aligned(store, want, rois)
    log.info(
        "cache %s: extracting %d of %d ROIs at %d px into %s",
        "update" if store else "miss",
        len(missing),
        len(rois),
        resolution,
        path,
    )
    todo_rois = rois.iloc[missing].reset_index(drop=True)
    ds = PandaROIDataset(root, todo_rois, resolution, encoder.mean, encoder.std)
    # parts of a killed run with the same key and the same ROIs to do are picked up again
    shard_dir = path.with_name(f".{key}.{cache_key({'todo': [want[i] for i in missing]})[:10]}.shards")
    feats, errors = _merge(shard_dir, len(todo_rois), encoder.embed_dim)
    done = ~torch.isnan(feats["cls"]).any(1)
    done[[i for i, _ in errors]] = True
    todo = torch.nonzero(~done).flatten().tolist()
    if len(todo) < len(todo_rois):
        log.info(
            "resuming: %d of %d ROIs already extracted in %s", len(todo_rois) - len(todo), len(todo_rois), shard_dir
        )
    dl = DataLoader(
        torch.utils.data.Subset(ds, todo), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping
    )
    writer.directory = shard_dir
    if todo:
        trainer.predict(EncoderPredictor(encoder.eval()), dl, return_predictions=False)
    trainer.strategy.barrier()
    merged = None
    if trainer.is_global_zero:
        feats, errors = _merge(shard_dir, len(todo_rois), encoder.embed_dim)
        ok = ~torch.isnan(feats["cls"]).any(1)
        new_positions = [want[missing[i]] for i in torch.nonzero(ok).flatten().tolist()]
        merged = {
            "positions": (store["positions"] if store else []) + new_positions,
            "cls": torch.cat([store["cls"], feats["cls"][ok]]) if store else feats["cls"][ok],
            "mean": torch.cat([store["mean"], feats["mean"][ok]]) if store else feats["mean"][ok],
            "key_parts": key_parts,
            "resolution": resolution,
            "version": EXTRACT_VERSION,
            # failed reads of this pass, by position (not reused: a repaired slide is read again next run)
            "last_errors": {want[missing[i]]: msg for i, msg in errors},
        }
        with atomic_path(path) as tmp:
            torch.save(merged, tmp)
        for part in shard_dir.glob("part_*.pt"):
            part.unlink()
        if shard_dir.is_dir():
            shard_dir.rmdir()
    trainer.strategy.barrier()
    # rank 0 has the file it wrote in memory; other ranks read it
    return _aligned(merged if merged is not None else torch.load(path, weights_only=False), want, rois)


def _aligned(store: dict, want: list[tuple], rois: pd.DataFrame) -> dict:
    """The cached embeddings in the order of ``rois``, with its current labels and split; NaN rows where a read
    failed (listed in ``errors`` / ``failed``)."""
    have = {p: i for i, p in enumerate(store["positions"])}
    dim = store["cls"].shape[1]
    cls, mean = torch.full((len(want), dim), float("nan")), torch.full((len(want), dim), float("nan"))
    rows = [(i, have[p]) for i, p in enumerate(want) if p in have]
    if rows:
        dst, src = map(list, zip(*rows))
        cls[dst], mean[dst] = store["cls"][src], store["mean"][src]
    failed = [i for i, p in enumerate(want) if p not in have]
    last = store.get("last_errors", {})
    errors = [(rois.image_id.iloc[i], last.get(want[i], "ROI could not be read")) for i in failed]
    return {
        "cls": cls,
        "mean": mean,
        "image_id": rois.image_id.tolist(),
        "roi": rois.roi.tolist(),
        "label": torch.tensor(rois.label.to_numpy()),
        "split": rois.split.tolist(),
        "errors": errors,
        "failed": failed,
        "key_parts": store["key_parts"],
        "resolution": store["resolution"],
    }

"""Embedding extraction through Lightning predict (so DDP splits the slides), with an atomic on-disk cache.

The cache key hashes everything that changes the numbers: backbone preset, architecture overrides, the
weights file (path, size, mtime), attention mode/window/radius, pruner, resolution, ROI policy, the split
and ROI tables, and the extraction version. A rerun with the same key loads the file ("cache hit").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from .data.panda import PandaROIDataset, collate_skipping
from .utils.io import atomic_path

log = logging.getLogger("hirespath.extract")
EXTRACT_VERSION = 1


def file_fingerprint(path) -> dict | None:
    if not path:
        return None
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def cache_key(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class EncoderPredictor(L.LightningModule):
    """Wraps the encoder for ``trainer.predict``: CLS and mean of the kept patch tokens per ROI."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def predict_step(self, batch, batch_idx):
        out = {"index": batch["index"], "errors": batch["errors"]}
        if batch["image"] is None:
            out.update(cls=None, mean=None)
            return out
        enc = self.encoder(batch["image"])
        out.update(cls=enc.cls.float().cpu(), mean=enc.mean_patch.float().cpu())
        return out


class ShardWriter(BasePredictionWriter):
    """Each rank appends its predictions to part files every ``flush_every`` batches (and at the end), so a
    killed extraction keeps what it finished; rank 0 merges the parts (works with and without DDP)."""

    def __init__(self, directory: Path, flush_every: int = 50):
        super().__init__(write_interval="batch")
        self.directory, self.flush_every, self.buffer = Path(directory), flush_every, []

    def _flush(self, rank: int) -> None:
        if not self.buffer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        import uuid

        with atomic_path(self.directory / f"part_{rank}_{uuid.uuid4().hex}.pt") as tmp:
            torch.save(self.buffer, tmp)
        self.buffer = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.buffer.append(prediction)
        if len(self.buffer) >= self.flush_every:
            self._flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module):
        self._flush(trainer.global_rank)


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


def extract_embeddings(encoder, root, rois: pd.DataFrame, resolution: int, cache_dir, key_parts: dict, *,
                       batch_size: int = 4, num_workers: int = 0, trainer_kwargs: dict | None = None,
                       flush_every: int = 50) -> dict:
    """Embeddings of every ROI (rows of ``rois``), from the cache when the key matches."""
    key = cache_key({**key_parts, "resolution": resolution, "version": EXTRACT_VERSION,
                     "rois": hashlib.sha256(rois.to_csv(index=False).encode()).hexdigest()})
    path = Path(cache_dir) / "embeddings" / f"{key}.pt"
    if path.is_file():
        log.info("cache hit: %s", path)
        return torch.load(path, weights_only=False)
    log.info("cache miss: extracting %d ROIs at %d px into %s", len(rois), resolution, path)
    ds = PandaROIDataset(root, rois, resolution, encoder.mean, encoder.std)
    shard_dir = path.with_name(f".{key}.shards")
    feats, errors = _merge(shard_dir, len(rois), encoder.embed_dim)  # parts left by a killed run with this key
    done = ~torch.isnan(feats["cls"]).any(1)
    done[[i for i, _ in errors]] = True
    todo = torch.nonzero(~done).flatten().tolist()
    if len(todo) < len(rois):
        log.info("resuming: %d of %d ROIs already extracted in %s", len(rois) - len(todo), len(rois), shard_dir)
    dl = DataLoader(torch.utils.data.Subset(ds, todo), batch_size=batch_size, num_workers=num_workers,
                    collate_fn=collate_skipping)
    trainer = L.Trainer(**{"accelerator": "auto", "devices": 1, "logger": False, "enable_model_summary": False,
                           **(trainer_kwargs or {}), "callbacks": [ShardWriter(shard_dir, flush_every)]})
    if todo:
        trainer.predict(EncoderPredictor(encoder.eval()), dl, return_predictions=False)
    trainer.strategy.barrier()
    result = None
    if trainer.is_global_zero:
        feats, errors = _merge(shard_dir, len(rois), encoder.embed_dim)
        failed = sorted({i for i, _ in errors})
        result = {**feats, "image_id": rois.image_id.tolist(), "roi": rois.roi.tolist(),
                  "label": torch.tensor(rois.label.to_numpy()), "split": rois.split.tolist(),
                  "errors": [(rois.image_id.iloc[i], msg) for i, msg in errors], "failed": failed,
                  "key_parts": key_parts, "resolution": resolution}
        with atomic_path(path) as tmp:
            torch.save(result, tmp)
        for part in shard_dir.glob("part_*.pt"):
            part.unlink()
        if shard_dir.is_dir():
            shard_dir.rmdir()
    trainer.strategy.barrier()
    if result is None:
        result = torch.load(path, weights_only=False)
    return result

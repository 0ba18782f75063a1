"""Prediction writer for embedding extraction (eva-style): part files per rank, merged by rank 0."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..utils.io import atomic_path


class EmbeddingsWriter(BasePredictionWriter):
    """Each rank appends its predictions to part files every ``flush_every`` batches (and at the end), so a
    killed extraction keeps what it finished; rank 0 merges the parts (works with and without DDP)."""

    def __init__(self, directory: Path, flush_every: int = 50):
        super().__init__(write_interval="batch")
        self.directory, self.flush_every, self.buffer = Path(directory), flush_every, []

    def _flush(self, rank: int) -> None:
        if not self.buffer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.directory / f"part_{rank}_{uuid.uuid4().hex}.pt") as tmp:
            torch.save(self.buffer, tmp)
        self.buffer = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.buffer.append(prediction)
        if len(self.buffer) >= self.flush_every:
            self._flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module):
        self._flush(trainer.global_rank)

"""The encoder as a LightningModule for ``trainer.predict`` (so DDP splits the ROIs over ranks)."""

from __future__ import annotations

import lightning as L


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

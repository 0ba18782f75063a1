"""Logistic regression as a LightningModule: the smoke task's model (checks launchers, loggers, DDP)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class LinearClassifier(L.LightningModule):
    def __init__(self, num_features: int, num_classes: int, lr: float):
        super().__init__()
        self.save_hyperparameters()
        self.fc = nn.Linear(num_features, num_classes)

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self.fc(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}/loss", loss, sync_dist=stage != "train", prog_bar=True)
        self.log(f"{stage}/accuracy", acc, sync_dist=stage != "train")
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def test_step(self, batch, _):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

"""The AdamW linear probe on cached embeddings as a LightningModule (early stopping on val/loss).

The scikit-learn-style probe that users configure (``head=linear_probe``) is
``hirespath.probes.linear_probe.LinearProbeHead``; its ``adamw`` solver calls ``train_linear_probe`` here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def feature_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (floored; 1 for a single sample) used to standardise embeddings (by this module and
    by ``hirespath.probes.linear_probe.fit_lbfgs``)."""
    x = x.float()
    std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], device=x.device)
    return x.mean(0), std


class LinearProbe(L.LightningModule):
    """Linear layer on embeddings standardised with the training set's statistics (kept as buffers, so a
    checkpoint applies them): backbones' embedding scales differ by orders of magnitude, and a fixed learning
    rate on raw features can leave the probe stuck at the class prior."""

    def __init__(
        self, in_features: int, num_classes: int, lr: float = 1e-3, weight_decay: float = 1e-4, max_epochs: int = 100
    ):
        super().__init__()
        self.save_hyperparameters()
        self.fc = nn.Linear(in_features, num_classes)
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    def set_standardisation(self, x: Tensor) -> None:
        mean, std = feature_stats(x)
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc((x - self.mean) / self.std)

    def _step(self, batch, stage: str) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.hparams.max_epochs))
        return [opt], [sched]

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        self.eval()
        return self(x.float().to(self.device)).softmax(1).cpu()


def train_linear_probe(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    *,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    patience: int,
    batch_size: int,
    trainer: Callable[..., L.Trainer] | None = None,
    seed: int = 0,
) -> LinearProbe:
    """Fit a LinearProbe with early stopping on ``val/loss`` and return its best checkpoint.

    ``trainer``: a Trainer factory (e.g. ``hydra.utils.instantiate(cfg.trainer, _partial_=True, logger=...)``), called
    with ``max_epochs``, ``callbacks`` and ``enable_model_summary``; default ``lightning.Trainer`` without a logger.
    The best checkpoint is written as ``linear_probe_best.ckpt`` into the Trainer's ``default_root_dir``.
    """
    L.seed_everything(seed, workers=True)
    model = LinearProbe(train[0].shape[1], num_classes, lr=lr, weight_decay=weight_decay, max_epochs=max_epochs)
    model.set_standardisation(train[0])
    best_ckpt = L.pytorch.callbacks.ModelCheckpoint(
        monitor="val/loss", mode="min", save_top_k=1, filename="linear_probe_best"
    )
    callbacks = [L.pytorch.callbacks.EarlyStopping("val/loss", patience=patience, mode="min"), best_ckpt]
    make_trainer = trainer or functools.partial(L.Trainer, logger=False)
    fit_trainer = make_trainer(max_epochs=max_epochs, callbacks=callbacks, enable_model_summary=False)
    # beside the run's other outputs, not in the logger's version folder (ModelCheckpoint's default with a logger)
    best_ckpt.dirpath = os.path.realpath(fit_trainer.default_root_dir)
    dl = lambda t, shuffle: DataLoader(TensorDataset(t[0].float(), t[1].long()), batch_size=batch_size, shuffle=shuffle)  # noqa: E731
    fit_trainer.fit(model, dl(train, True), dl(val, False))
    best = best_ckpt.best_model_path
    if best:
        model = LinearProbe.load_from_checkpoint(best, weights_only=False)
    return model

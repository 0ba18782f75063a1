"""Linear probe on cached embeddings: a LightningModule (AdamW, early stopping on val) or UNI-style L-BFGS."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def feature_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (floored; 1 for a single sample) used to standardise embeddings."""
    x = x.float()
    std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], device=x.device)
    return x.mean(0), std


class LinearProbe(L.LightningModule):
    """Linear layer on embeddings standardised with the training set's statistics (kept as buffers, so a
    checkpoint applies them): backbones' embedding scales differ by orders of magnitude, and a fixed learning
    rate on raw features can leave the probe stuck at the class prior."""

    def __init__(self, in_features: int, num_classes: int, lr: float = 1e-3, weight_decay: float = 1e-4,
                 max_epochs: int = 100):
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


def fit_lbfgs(x: Tensor, y: Tensor, num_classes: int, l2: float = 1e-4, max_iter: int = 1000,
              standardise: bool = True, squared_penalty: bool = True) -> nn.Linear:
    """Full-batch L2-regularised multinomial logistic regression with L-BFGS (zero init, strong Wolfe).

    Loss: cross-entropy + ``l2`` · ‖W‖² (``squared_penalty``) or ``l2`` · ‖W‖ (UNI's code). With ``standardise``
    the fit runs on standardised features and the scaling is folded into the returned layer.
    """
    x = x.float()
    mean, std = feature_stats(x) if standardise else (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    fc = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    opt = torch.optim.LBFGS(fc.parameters(), lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-9)
    xs = (x - mean) / std

    def closure():
        opt.zero_grad()
        penalty = fc.weight.square().sum() if squared_penalty else fc.weight.norm()
        loss = nn.functional.cross_entropy(fc(xs), y) + l2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    # fold the standardisation into the layer so it applies to raw embeddings
    with torch.no_grad():
        fc.weight.div_(std)
        fc.bias.sub_((fc.weight * mean).sum(1))
    return fc


def fit_uni_probe(x: Tensor, y: Tensor, num_classes: int, max_iter: int = 1000) -> nn.Linear:
    """mahmoodlab/UNI's linear probe (eval_linear_probe): raw features, cost C = D·K/100 (K classes in the
    training labels), loss cross-entropy + (1/C)·0.5·‖W‖, L-BFGS from zeros. The caller passes train+val, as UNI's
    default ``combine_trainval``."""
    cost = x.shape[1] * len(torch.unique(y)) / 100
    return fit_lbfgs(x, y, num_classes, l2=0.5 / cost, max_iter=max_iter, standardise=False, squared_penalty=False)


def train_linear_probe(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], num_classes: int, *, lr: float,
                       weight_decay: float, max_epochs: int, patience: int, batch_size: int, trainer_kwargs: dict,
                       loggers=None, seed: int = 0) -> LinearProbe:
    L.seed_everything(seed, workers=True)
    model = LinearProbe(train[0].shape[1], num_classes, lr=lr, weight_decay=weight_decay, max_epochs=max_epochs)
    model.set_standardisation(train[0])
    callbacks = [L.pytorch.callbacks.EarlyStopping("val/loss", patience=patience, mode="min"),
                 L.pytorch.callbacks.ModelCheckpoint(monitor="val/loss", mode="min", save_top_k=1,
                                                     dirpath=trainer_kwargs.get("default_root_dir"),
                                                     filename="linear_probe_best")]
    trainer = L.Trainer(**{**trainer_kwargs, "max_epochs": max_epochs, "callbacks": callbacks,
                           "logger": loggers or False, "enable_model_summary": False})
    dl = lambda t, shuffle: DataLoader(TensorDataset(t[0].float(), t[1].long()), batch_size=batch_size, shuffle=shuffle)  # noqa: E731
    trainer.fit(model, dl(train, True), dl(val, False))
    best = callbacks[1].best_model_path
    if best:
        model = LinearProbe.load_from_checkpoint(best, weights_only=False)
    return model

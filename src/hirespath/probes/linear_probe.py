"""Linear probes on cached embeddings, scikit-learn style: ``LinearProbeHead.fit(x, y)`` then ``predict_proba(x)``.

``LinearProbeHead`` is the head object ``conf/head/linear_probe.yaml`` builds (``hydra.utils.instantiate``): the
same ``fit`` / ``predict_proba`` interface as ``KNNClassifier``, dispatching to its solver. The L-BFGS solvers live
here; the AdamW solver trains the LightningModule ``hirespath.modules.linear_probe.LinearProbe`` (probes sit above
modules: a probe may train a LightningModule, a module never imports a probe).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..modules.linear_probe import feature_stats, train_linear_probe

SOLVERS = ("adamw", "lbfgs", "uni")


def fit_lbfgs(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float = 1e-4,
    max_iter: int = 1000,
    standardise: bool = True,
    squared_penalty: bool = True,
) -> nn.Linear:
    """Full-batch L2-regularised multinomial logistic regression with L-BFGS (zero init, strong Wolfe).

    Loss: cross-entropy + ``l2`` · ‖W‖² (``squared_penalty``) or ``l2`` · ‖W‖ (UNI's code). With ``standardise``
    the fit runs on standardised features and the scaling is folded into the returned layer.
    """
    x = x.float()
    mean, std = feature_stats(x) if standardise else (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    fc = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    opt = torch.optim.LBFGS(
        fc.parameters(),
        lr=1,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-9,
    )
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


class LinearProbeHead:
    """A linear probe with the heads' interface: ``fit(x, y, val=None, trainer=None)``, then ``predict_proba(x)``.

    ``solver``:
      - ``adamw``: ``hirespath.modules.linear_probe.LinearProbe`` trained with AdamW (``lr``, ``weight_decay``,
        cosine schedule over ``max_epochs``, ``batch_size``) on standardised embeddings, early stopping on
        ``val/loss`` (``patience``), best checkpoint restored; needs ``val``. ``trainer`` builds its Lightning
        Trainer (a factory such as ``hydra.utils.instantiate(cfg.trainer, _partial_=True, logger=...)``; default
        ``lightning.Trainer`` without a logger); ``seed`` seeds its initialisation and batch order.
      - ``lbfgs``: full-batch logistic regression on standardised embeddings, ``l2``·‖W‖², ``max_iter``; train only.
      - ``uni``: mahmoodlab/UNI's ``eval_linear_probe`` (raw embeddings, C = dim·classes/100, ``max_iter``), trained
        on train + ``val`` as UNI's default ``combine_trainval``; needs ``val``.
    ``num_classes``: output classes (default: the largest training label + 1). ``name`` labels the head.
    """

    def __init__(
        self,
        solver: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 100,
        patience: int = 10,
        batch_size: int = 256,
        l2: float = 1e-4,
        max_iter: int = 1000,
        seed: int = 0,
        num_classes: int | None = None,
        name: str = "linear_probe",
    ):
        if solver not in SOLVERS:
            raise ValueError(f"head.solver must be one of {list(SOLVERS)}, got {solver!r}")
        self.solver, self.lr, self.weight_decay, self.max_epochs = solver, lr, weight_decay, max_epochs
        self.patience, self.batch_size, self.l2, self.max_iter = patience, batch_size, l2, max_iter
        self.seed, self.num_classes, self.name = seed, num_classes, name
        self.model: nn.Module | None = None

    def fit(
        self,
        x: Tensor,
        y: Tensor,
        val: tuple[Tensor, Tensor] | None = None,
        trainer: Callable | None = None,
    ) -> LinearProbeHead:
        if val is None and self.solver in ("adamw", "uni"):
            why = "early stopping on val/loss" if self.solver == "adamw" else "UNI trains on train + val"
            raise ValueError(f"the {self.solver} linear probe needs a validation split ({why}), and none was given")
        num_classes = self.num_classes or int(y.max()) + 1
        if self.solver == "lbfgs":
            self.model = fit_lbfgs(x, y, num_classes, l2=float(self.l2), max_iter=int(self.max_iter))
        elif self.solver == "uni":
            xs, ys = torch.cat([x, val[0]]), torch.cat([y, val[1]])
            self.model = fit_uni_probe(xs, ys, num_classes, max_iter=int(self.max_iter))
        else:
            self.model = train_linear_probe(
                (x, y),
                val,
                num_classes,
                lr=float(self.lr),
                weight_decay=float(self.weight_decay),
                max_epochs=int(self.max_epochs),
                patience=int(self.patience),
                batch_size=int(self.batch_size),
                trainer=trainer,
                seed=int(self.seed),
            )
        return self

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("LinearProbeHead.predict_proba before fit")
        if isinstance(self.model, nn.Linear):
            return self.model(x.float()).softmax(1)
        return self.model.predict_proba(x)

    def predict(self, x: Tensor) -> Tensor:
        return self.predict_proba(x).argmax(1)

"""Linear probe on cached embeddings: a LightningModule (AdamW, early stopping on val) or UNI-style L-BFGS."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def feature_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (floored; 1 for a single sample) used to standardise embeddings."""
    x = x.float()
    std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], device=x.device)
    return x.mean(0), std


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

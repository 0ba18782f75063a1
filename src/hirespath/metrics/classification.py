"""Classification metrics with torchmetrics (the keys the paper's tables report)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_cohen_kappa,
    multiclass_f1_score,
)

from ..results import ACCURACY, AUROC, BALANCED_ACCURACY, F1_WEIGHTED, KAPPA, TEST


def classification_metrics(probs: Tensor, target: Tensor, num_classes: int, prefix: str = TEST) -> dict[str, float]:
    """accuracy, balanced accuracy (mean per-class recall), weighted F1, macro one-vs-rest AUROC, quadratic kappa."""
    probs, target = probs.float(), target.long()
    pred = probs.argmax(1)
    present = torch.bincount(target, minlength=num_classes) > 0
    recall = multiclass_accuracy(pred, target, num_classes, average="none")
    m = {
        ACCURACY: multiclass_accuracy(pred, target, num_classes, average="micro"),
        # classes absent from the target would count as 0 recall; balanced accuracy averages the present ones
        BALANCED_ACCURACY: recall[present].mean(),
        F1_WEIGHTED: multiclass_f1_score(pred, target, num_classes, average="weighted"),
        KAPPA: multiclass_cohen_kappa(pred, target, num_classes, weights="quadratic"),
    }
    if present.sum() > 1:
        auroc = multiclass_auroc(probs, target, num_classes, average="none", thresholds=None)
        m[AUROC] = auroc[present].mean()  # macro over the classes present (one-vs-rest is undefined otherwise)
    else:
        m[AUROC] = torch.tensor(float("nan"))
    return {prefix + k: float(v) for k, v in m.items()}

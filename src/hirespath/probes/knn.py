"""KNN on frozen embeddings, as in UNI's evaluation: k=20, centred + L2-normalised, Euclidean, majority vote."""

from __future__ import annotations

import torch
from torch import Tensor


class KNNClassifier:
    """Majority vote of the ``k`` nearest training embeddings (ties go to the smallest label, as scikit-learn).

    ``center_l2`` (default ``True``, as UNI's ``eval_knn`` and ``conf/head/knn.yaml``): subtract the training mean and
    L2-normalise every embedding first (UNI's "CL2N"); ``False`` votes on raw Euclidean distances.
    Class probabilities are the vote fractions (used for AUROC). ``name`` labels the head (``conf/head/knn.yaml``
    builds it with ``hydra.utils.instantiate``).
    """

    def __init__(
        self,
        k: int = 20,
        center_l2: bool = True,
        num_classes: int | None = None,
        chunk: int = 4096,
        name: str = "knn",
    ):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.center_l2, self.num_classes, self.chunk, self.name = k, center_l2, num_classes, chunk, name

    def _prep(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.center_l2:
            x = torch.nn.functional.normalize(x - self.mean, dim=1)
        return x

    def fit(self, x: Tensor, y: Tensor, val=None, trainer=None) -> KNNClassifier:
        """Store the training embeddings. ``val`` and ``trainer`` belong to the heads' common ``fit`` (see
        ``LinearProbeHead``); a KNN uses neither."""
        if len(x) < self.k:
            raise ValueError(f"KNN with k={self.k} needs at least {self.k} training embeddings, got {len(x)}")
        self.mean = x.float().mean(0, keepdim=True)
        self.x, self.y = self._prep(x), y.long()
        self.num_classes = self.num_classes or int(self.y.max()) + 1
        return self

    def predict_proba(self, x: Tensor) -> Tensor:
        x = self._prep(x)
        out = []
        for s in range(0, len(x), self.chunk):
            d = torch.cdist(x[s : s + self.chunk], self.x)
            idx = d.topk(self.k, dim=1, largest=False).indices
            votes = torch.zeros(len(idx), self.num_classes).scatter_add_(1, self.y[idx], torch.ones(idx.shape))
            out.append(votes / self.k)
        return torch.cat(out)

    def predict(self, x: Tensor) -> Tensor:
        return self.predict_proba(x).argmax(1)  # argmax picks the first (smallest) label among ties

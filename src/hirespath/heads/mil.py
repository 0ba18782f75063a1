"""Slide-level multiple-instance heads on bags of tile features: gated-attention MIL (ABMIL) and mean pooling.

A batch holds bags of different sizes padded to the largest: ``x`` is B×N×D and ``mask`` B×N (True = a real tile).
Padded tiles get attention −inf before the softmax (weight exactly 0) and are left out of the mean, so a bag's
output does not depend on what it is batched with.

ABMIL follows Ilse et al. 2018 as CLAM (``CLAM_SB``, ``Attn_Net_Gated``) and TRIDENT train it: Linear(D, hidden) +
ReLU + dropout, then gated attention ``w·(tanh(V h) ⊙ sigmoid(U h))`` (dropout on both branches), softmax over the
bag's tiles, attention-weighted sum of ``h``, and a linear classifier. CLAM's "small" size is hidden 512,
attention 256 for 1024-d UNI features; both are arguments here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class MILOutput(NamedTuple):
    logits: Tensor  # B×C
    attention: Tensor  # B×N, float32, sums to 1 over each bag's real tiles, 0 on padding


def _full_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    if x.ndim == 2:
        raise ValueError(f"expected a batch of bags B×N×D, got a {tuple(x.shape)} tensor (use x[None] for one bag)")
    if x.ndim != 3:
        raise ValueError(f"expected a batch of bags B×N×D, got shape {tuple(x.shape)}")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the bags' B×N {tuple(x.shape[:2])}")
    return mask.bool()


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over dim 1 in float32 with padded entries at −inf; a bag without any tile gets all-zero weights."""
    a = scores.float().masked_fill(~mask, float("-inf")).softmax(1)
    return torch.nan_to_num(a, nan=0.0)  # an all −inf row is NaN after softmax


class GatedAttention(nn.Module):
    """Attention score per tile: ``Linear(tanh(V h) ⊙ sigmoid(U h))`` (CLAM's Attn_Net_Gated with one output)."""

    def __init__(self, in_features: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(in_features, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


class ABMIL(nn.Module):
    """Gated-attention MIL. ``forward(x, mask) -> MILOutput(logits B×C, attention B×N)``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 512,
        attention_hidden: int = 256,
        dropout: float = 0.25,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes), ("hidden", hidden)):
            if int(v) < 1:
                raise ValueError(f"ABMIL: {name} must be a positive integer, got {v!r}")
        self.fc = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attention_hidden, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        mask = _full_mask(x, mask)
        h = self.fc(x)  # B×N×H
        a = masked_softmax(self.attention(h), mask)  # B×N float32
        pooled = torch.bmm(a.unsqueeze(1).to(h.dtype), h).squeeze(1)  # B×H
        return MILOutput(self.classifier(pooled), a)


class MeanPool(nn.Module):
    """Mean of the bag's tile features, then a linear layer (``hidden=None``) or Linear-ReLU-dropout-Linear.
    Its ``attention`` is the pooling weight, 1/n on each of the bag's n tiles."""

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if int(v) < 1:
                raise ValueError(f"MeanPool: {name} must be a positive integer, got {v!r}")
        if hidden:
            self.classifier = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        mask = _full_mask(x, mask)
        w = mask.float() / mask.sum(1, keepdim=True).clamp_min(1)  # B×N, 0 on padding
        pooled = torch.bmm(w.unsqueeze(1).to(x.dtype), x).squeeze(1)
        return MILOutput(self.classifier(pooled), w)


MIL_HEADS: dict[str, type[nn.Module]] = {"abmil": ABMIL, "mean_pool": MeanPool}


def create_mil_head(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    """A MIL head by name (``abmil`` | ``mean_pool``); ``kwargs`` go to its constructor."""
    if name not in MIL_HEADS:
        raise ValueError(f"unknown MIL head {name!r}; valid: {', '.join(MIL_HEADS)}")
    return MIL_HEADS[name](in_features, num_classes, **kwargs)

"""Attention-guided token pruning: keep the patch tokens the global tokens attend to most."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from ..utils.config import one_of

SCORE_TOKENS = ("cls", "all")


def check_prune_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise ValueError(
            f"prune ratio must be in [0, 1) (the fraction of patch tokens dropped; 0 disables pruning), got {ratio!r}"
        )


def check_score_tokens(score_tokens: str) -> None:
    if score_tokens not in SCORE_TOKENS:
        raise ValueError(f"prune score_tokens must be {one_of(score_tokens, SCORE_TOKENS)}, got {score_tokens!r}")


def check_prune_layer(layer: int, depth: int | None, ratio: float = 1.0) -> None:
    """The block after which tokens are dropped: 1 .. depth - 1 (``depth`` None: unknown, only >= 1 is checked);
    any value when ``ratio`` is 0 (no pruning)."""
    if ratio == 0:
        return
    top = f"{depth - 1}] for a {depth}-block model" if depth is not None else "depth - 1]"
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1 or (depth is not None and layer >= depth):
        raise ValueError(f"prune layer must be in [1, {top} (an integer, when pruning), got {layer!r}")


class GlobalAttentionPruner:
    """After block ``layer`` (1-based count of blocks run), drop the fraction ``ratio`` of patch tokens.

    Each patch token is scored by the attention the global tokens give it in block ``layer``'s own
    attention, averaged over heads (and over the scoring tokens: CLS only, or CLS + registers). Every
    image keeps the same number ⌈(1−ratio)·N⌉ of tokens, so tensors stay rectangular; the survivors keep
    their raster order.
    """

    def __init__(self, ratio: float = 0.6, layer: int = 4, score_tokens: str = "cls"):
        check_prune_ratio(ratio)
        check_score_tokens(score_tokens)
        self.ratio = float(ratio)
        self.layer = int(layer)
        self.score_tokens = score_tokens

    @property
    def enabled(self) -> bool:
        return self.ratio > 0

    def check_depth(self, depth: int) -> None:
        check_prune_layer(self.layer, depth, self.ratio)

    def num_kept(self, n: int) -> int:
        # exact ⌈(1−p)·N⌉: in floats (1 − 0.7)·10 is 3.0000000000000004 and would keep 4
        return max(1, math.ceil((1 - Fraction(str(self.ratio))) * n))

    def scores(self, probs: Tensor, num_prefix: int) -> Tensor:
        """``probs``: B×H×P×L prefix-row attention → B×N patch scores."""
        rows = probs[:, :, :1] if self.score_tokens == "cls" else probs
        return rows[..., num_prefix:].float().mean(dim=(1, 2))

    def select(self, scores: Tensor) -> Tensor:
        """Indices (B×N', ascending) of the patch tokens to keep."""
        keep = torch.topk(scores, self.num_kept(scores.shape[1]), dim=1, sorted=False).indices
        return keep.sort(dim=1).values

    def __repr__(self) -> str:
        return f"GlobalAttentionPruner(ratio={self.ratio}, layer={self.layer}, score_tokens={self.score_tokens!r})"

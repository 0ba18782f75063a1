"""Segmentation metrics after mmseg's intersect-and-union (ignore index 255), per cell type and averaged.

SegPath labels one cell type per image, so cell type c is scored on the images of its archive as a binary
problem: pixels of c (mask 1) against the rest (mask 0); 255 is ignored. For c: IoU = I/U, Dice = 2I/(P+L)
and class pixel accuracy CPA = I/L (mmseg's per-class "Acc"), with I, U, P, L summed over the images.
As in mmseg's ``total_area_to_metrics``, a ratio whose denominator is 0 is undefined (NaN; null in metrics.json):
a cell type with predicted but no ground-truth pixels has no CPA. MPA is the nanmean of CPA over the evaluated
cell types, test/iou and test/dice the nanmeans of IoU and Dice (mmseg's mAcc, mIoU, mDice). Cell types without
pixels of either kind (not in the evaluated images) are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.segpath import CELL_TYPES, IGNORE
from ..results import CPA, DICE, IOU, MPA, TEST


class SegPathMetrics:
    def __init__(self, cell_types=CELL_TYPES):
        self.cell_types = list(cell_types)
        self.reset()

    def reset(self) -> None:
        n = len(self.cell_types)
        self.intersect, self.union = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.pred_area, self.label_area = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)

    def update(self, pred: Tensor, target: Tensor, cell: int) -> None:
        """``pred``, ``target``: H×W with 1 = the image's cell type, 0 = not; target may hold 255 (ignored)."""
        valid = target != IGNORE
        p, t = (pred == 1) & valid, (target == 1) & valid
        inter = (p & t).sum()
        self.intersect[cell] += inter
        self.pred_area[cell] += p.sum()
        self.label_area[cell] += t.sum()
        self.union[cell] += p.sum() + t.sum() - inter

    def compute(self, prefix: str = TEST) -> dict[str, float]:
        seen = self.label_area + self.pred_area > 0
        # 0/0 (and I/0 with I = 0) gives NaN, as mmseg's division: undefined, not 0
        iou = self.intersect / self.union
        dice = 2 * self.intersect / (self.pred_area + self.label_area)
        cpa = self.intersect / self.label_area
        out = {}
        for i, name in enumerate(self.cell_types):
            if seen[i]:
                out[f"{prefix}{CPA}/{name}"] = float(cpa[i])
                out[f"{prefix}{IOU}/{name}"] = float(iou[i])
                out[f"{prefix}{DICE}/{name}"] = float(dice[i])
        if seen.any():
            out[f"{prefix}{MPA}"] = float(cpa[seen].nanmean())  # NaN only if no evaluated type has label pixels
            out[f"{prefix}{IOU}"] = float(iou[seen].nanmean())
            out[f"{prefix}{DICE}"] = float(dice[seen].nanmean())
        return out

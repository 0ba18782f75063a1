"""Lightning modules for SegPath: the data module (splits from fileinfo) and the segmentation module."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import lightning as L
import torch

from ..data.segpath import CELL_TYPES
from ..metrics.segmentation import SegPathMetrics
from ..results import TEST, VAL

log = logging.getLogger("hirespath.segment")


def layer_decay_groups(
    model, lr: float, weight_decay: float, backbone_lr_mult: float, layer_decay: float
) -> list[dict]:
    """AdamW groups: the heads at ``lr``; encoder block i at lr·mult·decay^(depth − i) (layer-wise decay)."""
    encoder = model.encoder
    depth = encoder.depth
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith("adapter.encoder."):
            rest = name[len("adapter.encoder.vit.") :]
            layer = (
                int(rest.split(".")[1]) + 1
                if rest.startswith("blocks.")
                else (0 if not rest.startswith("norm") else depth + 1)
            )
            scale = backbone_lr_mult * layer_decay ** (depth + 1 - layer)
        # no decay on norms, biases, position/class/register tokens and, as mmseg's Mask2Former recipe, the
        # query and level embeddings
        no_wd = p.ndim == 1 or name.endswith(
            (
                ".bias",
                "pos_embed",
                "cls_token",
                "reg_token",
                "level_embed",
                "level_embed.weight",
                "queries_embedder.weight",
                "queries_features.weight",
            )
        )
        key = (scale, no_wd)
        groups.setdefault(key, {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_wd else weight_decay})
        groups[key]["params"].append(p)
    return list(groups.values())


class SegmentationModule(L.LightningModule):
    def __init__(
        self,
        model,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        backbone_lr_mult: float = 0.1,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
        poly_power: float = 0.9,
        warmup_steps: int = 0,
        cell_types=CELL_TYPES,
        overlays: int = 1,
    ):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self.cell_types = list(cell_types)
        if freeze_backbone:
            for p in model.encoder.parameters():
                p.requires_grad_(False)
        self.val_metrics, self.test_metrics = SegPathMetrics(self.cell_types), SegPathMetrics(self.cell_types)
        self.overlay_items: list = []  # (dataset index, prediction, full mask, cell type): `overlays` per type

    def training_step(self, batch, _):
        out = self.model(batch["image"], batch["mask"], batch["label"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["label"]))
        return out.loss

    def _evaluate(self, batch, metrics: SegPathMetrics, stage: str):
        out = self.model(batch["image"], batch["mask"], batch["label"])
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=len(batch["label"]), sync_dist=True)
        preds = []
        for i, (full, t) in enumerate(zip(batch["full_mask"], batch["label"])):
            # predict back at the full tile size: the labelled cell type's probability map > 0.5
            one = SimpleNamespace(
                class_queries_logits=out.class_queries_logits[i : i + 1],
                masks_queries_logits=out.masks_queries_logits[i : i + 1],
            )
            prob = self.model.semantic_probs(one, tuple(full.shape), classes=t.view(1))[0]
            pred = (prob > 0.5).long()
            metrics.update(pred.cpu(), full.cpu(), int(t))
            preds.append(pred.cpu())
        return preds

    def validation_step(self, batch, _):
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self):
        self._log_metrics(self.val_metrics, VAL)

    def test_step(self, batch, batch_idx):
        preds = self._evaluate(batch, self.test_metrics, "test")
        for i, (pred, full, t) in enumerate(zip(preds, batch["full_mask"], batch["label"].tolist())):
            if sum(item[3] == t for item in self.overlay_items) < self.hparams.overlays:
                self.overlay_items.append((int(batch["index"][i]), pred, full.cpu(), t))

    def on_test_epoch_end(self):
        self._log_metrics(self.test_metrics, TEST)

    def _log_metrics(self, metrics: SegPathMetrics, prefix: str):
        # counts are summed over ranks before the ratios, so DDP gives the same numbers as one process
        for name in ("intersect", "union", "pred_area", "label_area"):
            setattr(
                metrics,
                name,
                self.all_gather(getattr(metrics, name)).reshape(-1, len(self.cell_types)).sum(0)
                if self.trainer.world_size > 1
                else getattr(metrics, name),
            )
        values = metrics.compute(prefix)
        finite = {k: v for k, v in values.items() if math.isfinite(v)}  # undefined (NaN) ones go to metrics.json only
        if finite:
            # every rank holds the same global values: syncing them is a no-op mean, and it keeps Lightning from
            # warning, for each key, that epoch-level values are not synced
            self.log_dict(finite, sync_dist=self.trainer.world_size > 1)
        self.computed = getattr(self, "computed", {})
        self.computed.update(values)
        metrics.reset()

    def configure_optimizers(self):
        groups = layer_decay_groups(
            self.model,
            self.hparams.lr,
            self.hparams.weight_decay,
            self.hparams.backbone_lr_mult,
            self.hparams.layer_decay,
        )
        opt = torch.optim.AdamW(groups)
        total = max(1, self.trainer.estimated_stepping_batches)
        warm, power = self.hparams.warmup_steps, self.hparams.poly_power

        def poly(step: int) -> float:  # mmseg's poly schedule with optional linear warm-up
            if step < warm:
                return (step + 1) / warm
            return max(0.0, 1 - (step - warm) / max(1, total - warm)) ** power

        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, poly), "interval": "step"},
        }

"""The SegPath task: train, validate and test ViT-Adapter + Mask2Former on the sparse encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ..data.segpath import CELL_TYPES, load_pair
from ..data.segpath_datamodule import SegPathDataModule
from ..heads.mask2former import SegmentationModel
from ..models.backbones import check_resolution
from ..modules.segmentation import SegmentationModule
from ..results import METRICS_FILE, SKIPPED_FILE, TEST, TEST_DICE, TEST_IOU, TEST_MPA, TRAIN_PEAK_MEMORY_GB
from ..utils.hydra import instantiate_list
from ..utils.io import atomic_path, write_json
from ..utils.wandb import log_images

log = logging.getLogger("hirespath.segment")


def run_segment(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if float(cfg.pruner.prune_ratio) > 0:
        raise ValueError(
            f"segmentation needs the full patch grid, but pruner.prune_ratio={cfg.pruner.prune_ratio}: use "
            "pruner=none (token pruning is for classification only)"
        )
    encoder = instantiate(cfg.encoder)
    check_resolution(cfg.resolution, encoder.patch_size)
    dm: SegPathDataModule = instantiate(cfg.data, resolution=int(cfg.resolution), mean=encoder.mean, std=encoder.std)
    model: SegmentationModel = instantiate(cfg.head, encoder=encoder, num_classes=len(CELL_TYPES))
    if len(dm.skipped):
        with atomic_path(out_dir / SKIPPED_FILE) as tmp:
            dm.skipped.to_csv(tmp, index=False)
        log.warning("%d SegPath files skipped; see %s", len(dm.skipped), out_dir / SKIPPED_FILE)
    module = SegmentationModule(model, **OmegaConf.to_container(cfg.optim, resolve=True))
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = instantiate_list(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    device = trainer.strategy.root_device
    if device.type == "cuda":  # Table 4's memory column: the training peak on this process's GPU
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    best = next((c.best_model_path for c in callbacks if getattr(c, "best_model_path", "")), "")
    trainer.test(module, datamodule=dm, ckpt_path=best or None, weights_only=False) if best else trainer.test(
        module, datamodule=dm
    )
    metrics = {k: float(v) for k, v in getattr(module, "computed", {}).items() if k.startswith(TEST)}
    if peak_gb is not None:
        metrics[TRAIN_PEAK_MEMORY_GB] = peak_gb
    if trainer.is_global_zero:
        write_json(out_dir / METRICS_FILE, metrics)
        paths = save_overlays(module, dm, out_dir)
        log_images(loggers, "segmentation", paths)
        log.info(
            "test metrics: MPA %.4f  IoU %.4f  Dice %.4f",
            metrics.get(TEST_MPA, float("nan")),
            metrics.get(TEST_IOU, float("nan")),
            metrics.get(TEST_DICE, float("nan")),
        )
    return metrics


def save_overlays(module: SegmentationModule, dm: SegPathDataModule, out_dir: Path) -> list[Path]:
    from ..viz.segmentation import segmentation_overlay

    rows = dm.split_rows("test")
    paths = []
    (out_dir / "overlays").mkdir(exist_ok=True)
    for i, pred, target, t in module.overlay_items:
        r = rows.iloc[i]
        image, _ = load_pair(r["image"], r["mask"])
        path = out_dir / "overlays" / f"{Path(r.image).stem}.png"
        paths.append(
            segmentation_overlay(image, target.numpy(), pred.numpy(), f"{CELL_TYPES[t]}: {Path(r.image).name}", path)
        )
    return paths


def main() -> None:
    """``python -m hirespath.tasks.segment [overrides]``: the Hydra app ``hirespath segment`` runs."""
    from .app import hydra_main

    hydra_main("segment")


if __name__ == "__main__":
    main()

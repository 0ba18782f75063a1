"""The embed_slides task: every tissue tile of every slide through the encoder into TRIDENT/CLAM h5 files.

    hirespath embed_slides wsi_dir=DIR job_dir=OUT backbone=uni2_h backbone.weights=FILE tile.size=1792 \
        tile.mpp=0.5 attention=sparse pruner=global_attention trainer=gpu

The ``tile`` node is the tiling (:class:`hirespath.configs.TilingConfig`), ``embed`` the embedding options
(:class:`hirespath.configs.EmbedConfig`: features, tokens, batch size, readers, threads, thumbnails, ...).

The trainer group gives the device, precision and processes: ``trainer=ddp`` (or ``devices=N``) launches one
process per device through Lightning Fabric and the slides are spread over the ranks (per-slide locks make any
number of parallel jobs safe too: a SLURM array or joblib over the same ``job_dir``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..embeddings.features import embed_slides
from ..slides import Runtime
from ..slides.launch import launch_id, launch_workers, run_on_workers
from ..slides.summary import merge_summaries
from ..utils.errors import InputError
from ..utils.hydra import instantiate_list
from ..utils.wandb import log_images
from ..wsi import trident_h5
from ..wsi.listing import list_slides

log = logging.getLogger("hirespath.embed_slides")


def _log_summary(loggers, cfg: DictConfig, summary: dict) -> None:
    """Run totals, per-stage seconds, one step per slide (its stages, tiles/s, mm²/s) and a few thumbnails."""
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers.update({f"stage_seconds/{k}": v for k, v in summary["stage_seconds"].items()})
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        for step, slide in enumerate(summary["embedded"]):
            row = {f"slide/{k}_s": v for k, v in slide["stage_seconds"].items()}
            row.update({"slide/tiles": slide["tiles"], "slide/seconds": slide["seconds"],
                        "slide/tiles_per_s": slide["tiles"] / slide["seconds"],
                        "slide/mm2_per_s": slide["tissue_mm2"] / slide["seconds"]})  # fmt: skip
            lg.log_metrics(row, step=step)
        lg.log_metrics({f"embed/{k}": v for k, v in numbers.items() if v is not None})
    thumbs = sorted(Path(summary["features_dir"]).parent.joinpath(trident_h5.THUMBNAILS).glob("*.png"))[:8]
    log_images(loggers, "thumbnails", thumbs)
    for lg in loggers:
        lg.finalize("success")


def run_embed_slides(cfg: DictConfig) -> dict:
    if not cfg.wsi_dir and not cfg.slides:
        raise InputError("embed_slides needs wsi_dir=DIR (a folder of slides) or slides=LIST.csv (column 'wsi')")
    # a bad precision is refused before any work
    runtime = Runtime.from_trainer(cfg.trainer, count_startup=True, launch=launch_id())
    specs = list_slides(cfg.wsi_dir, cfg.slides, cfg.get("wsi_ext"), recursive=bool(cfg.recursive), exclude=cfg.job_dir)
    fabric, runtime = launch_workers(cfg.trainer, runtime)
    torch.manual_seed(int(cfg.seed))  # a random-init backbone gets the same weights on every rank
    encoder = instantiate(cfg.encoder)
    loggers = instantiate_list(cfg.get("logger")) if fabric.global_rank == 0 else []
    summary = run_on_workers(fabric, lambda: embed_slides(encoder, specs, cfg.job_dir, cfg.tile, cfg.embed, runtime,
                                                          weights=cfg.backbone.weights,
                                                          default_mpp=cfg.data.default_mpp),
                             merge=merge_summaries)  # W&B gets every rank's slides  # fmt: skip
    if loggers:
        _log_summary(loggers, cfg, summary)
    return summary


def main() -> None:
    """``python -m hirespath.tasks.embed_slides [overrides]``: the Hydra app ``hirespath embed_slides`` runs."""
    from .app import hydra_main

    hydra_main("embed_slides")


if __name__ == "__main__":
    main()

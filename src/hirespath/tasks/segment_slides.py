"""The segment_slides task: a trained ``segment`` model over whole slides → QuPath GeoJSON, probability TIFF,
overlay and areas.

    hirespath segment_slides ckpt=RUN wsi_dir=DIR job_dir=OUT tile.size=1792 tile.overlap=256 trainer=gpu

``ckpt``: a ``segment`` run folder (its best checkpoint) or one of its ``checkpoints/*.ckpt``.

The model (backbone, attention, adapter, head, classes, the mpp it was trained at) is rebuilt from the checkpoint
and its run's ``.hydra/config.yaml``; ``tile.mpp`` defaults to that mpp and ``attention.*`` to the trained attention.
Reading options come from the ``embed`` node (batch_size, num_workers, reader, threads, lock_stale_hours,
overwrite), the rest from ``segment``.
``trainer=ddp`` (or ``trainer.devices=N``) runs one process per device with the slides spread over the ranks; several
jobs can also share one ``job_dir`` (per-slide locks): a SLURM array or joblib over the same folder.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

from ..segmentation import SegmentOptions, load_segmentation, segment_slides
from ..segmentation.consumer import seam_facts
from ..slides import Runtime
from ..slides.launch import launch_id, launch_workers, run_on_workers
from ..slides.summary import merge_summaries
from ..utils.errors import InputError
from ..utils.hydra import instantiate_list
from ..utils.wandb import log_images
from ..wsi.listing import list_slides

log = logging.getLogger("hirespath.segment_slides")


def run_segment_slides(cfg: DictConfig) -> dict:
    if not cfg.wsi_dir and not cfg.slides:
        raise InputError("segment_slides needs wsi_dir=DIR (a folder of slides) or slides=LIST.csv (column 'wsi')")
    # a bad precision is refused before any work
    runtime = Runtime.from_trainer(cfg.trainer, count_startup=True, launch=launch_id())
    seg = load_segmentation(cfg.ckpt)  # a wrong or missing checkpoint is refused before any slide is listed
    seg.use_attention(**OmegaConf.to_container(cfg.attention, resolve=True))  # null: as trained
    given = OmegaConf.to_container(cfg.segment, resolve=True)
    fields = [f.name for f in dataclasses.fields(SegmentOptions)]
    if unknown := sorted(set(given) - set(fields)):
        raise InputError(f"segment.{unknown[0]}: not an option of segment_slides (valid: {', '.join(fields)})")
    options = SegmentOptions(**given)
    options.check()
    t = cfg.tile  # mpp None: the model's (segment_slides warns when another is given, and checks the size)
    tiling = SimpleNamespace(size=t.size, mpp=t.mpp, overlap=t.overlap, min_tissue=t.min_tissue,
                             cover_tissue=t.cover_tissue, tissue_threshold=t.get("tissue_threshold"))  # fmt: skip
    specs = list_slides(cfg.wsi_dir, cfg.slides, cfg.get("wsi_ext"), recursive=bool(cfg.recursive), exclude=cfg.job_dir)
    fabric, runtime = launch_workers(cfg.trainer, runtime)  # trainer=ddp: the slides spread over the ranks
    loggers = instantiate_list(cfg.get("logger")) if fabric.global_rank == 0 else []
    summary = run_on_workers(fabric, lambda: segment_slides(seg, specs, cfg.job_dir, tiling, cfg.embed, options,
                                                            runtime, default_mpp=cfg.data.default_mpp),
                             merge=lambda parts: _merged(parts, options))  # fmt: skip
    log.info("segmentations in %s", summary["output_dir"])
    if loggers:
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            lg.log_metrics({f"segment_slides/{k}": v for k, v in numbers.items() if v is not None})
        log_images(loggers, "overlays", sorted(Path(summary["output_dir"]).glob("*_overlay.png"))[:8])
        for lg in loggers:
            lg.finalize("success")
    return summary


def _merged(parts: list[dict], options: SegmentOptions) -> dict:
    """A DDP run's summary (W&B gets every rank's slides) with its seam measure over every rank's slides."""
    run = merge_summaries(parts)
    return {**run, **seam_facts(run["done"], options)} if len(parts) > 1 else run


def main() -> None:
    """``python -m hirespath.tasks.segment_slides [overrides]``: the Hydra app ``hirespath segment_slides`` runs."""
    from .app import hydra_main

    hydra_main("segment_slides")


if __name__ == "__main__":
    main()

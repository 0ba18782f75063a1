"""The mil task: slide-level MIL (ABMIL or mean pooling) on per-slide tile features, PANDA ISUP grade.

    hirespath mil data=panda_slides data.root=PANDA features_dir=OUT/20x_224px_0px_overlap/features_<tag> head=abmil
    hirespath mil data.root=PANDA backbone.weights=FILE tile.size=1792 head=abmil trainer=gpu   (embeds first)

``features_dir`` given: train on its ``<slide>.h5`` files (ours, TRIDENT's or CLAM's). ``features_dir=null``: the
slides of ``data.root/train_images`` are first embedded with the composed encoder and the ``tile`` node through
the embed_slides engine into ``job_dir`` (``${paths.cache_dir}/slide_embeddings``) with the ``embed`` node's
options (the same ``tile`` and ``embed`` nodes as embed_slides), under an exclusive lock
per features folder: parallel grid jobs of one tiling (abmil and mean_pool) embed once, the second waits and
finds every slide finished. The embedding cost of each slide is kept in ``<features folder>/embedding_cost.csv``
so every later run on that folder reports it.

Outputs in the run directory: metrics.json (test/accuracy, test/balanced_accuracy, test/f1_weighted, test/auroc,
test/kappa, test/num_slides, embed/seconds_per_slide, ...), predictions.csv, attention/<slide>.h5 (per-tile
attention and coords), skipped.csv (labelled slides without a usable feature file, and why), and
figures/attention_<slide>.png heatmaps over the slide thumbnails of the first test slides (also to W&B).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..data.mil import MILDataModule, panda_slide_labels
from ..data.panda import NUM_CLASSES
from ..modules.mil import MONITOR_MODES, MILModule, read_attention, write_mil_outputs
from ..results import (
    EMBED_SECONDS_PER_SLIDE,
    METRICS_FILE,
    SKIPPED_FILE,
    TEST_ACCURACY,
    TEST_AUROC,
    TEST_BALANCED_ACCURACY,
    TEST_CLASSIFICATION_KEYS,
    TEST_KAPPA,
    TEST_LOSS,
    TEST_NUM_SLIDES,
)
from ..utils.hydra import instantiate_list
from ..utils.io import atomic_path, exclusive_lock, write_json
from ..utils.threads import dataloader_workers
from ..utils.wandb import log_images

log = logging.getLogger("hirespath.mil")

COST_FILE = "embedding_cost.csv"  # per-slide embedding cost, kept in the features folder
COST_COLUMNS = ["slide", "tiles", "seconds", "tissue_mm2", "device", "precision", "host", "time"]


# ----------------------------------------------------------------------------------------------- embedding


def _is_child_rank() -> bool:
    """A DDP process Lightning started (it re-runs the task): it must not embed or write the run's outputs."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def _embed_device_precision(trainer: DictConfig) -> tuple[str, str]:
    from .embed_slides import PRECISION

    accelerator = str(trainer.get("accelerator", "cpu"))
    device = "cuda" if accelerator in ("gpu", "cuda") else "cpu" if accelerator == "cpu" else "auto"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISION:
        raise ValueError(f"trainer.precision={precision!r} is not supported here; use one of {sorted(PRECISION)}")
    return device, PRECISION[precision]


def read_embedding_cost(features_dir: str | Path) -> pd.DataFrame:
    """``<features_dir>/embedding_cost.csv`` (slide, tiles, seconds, ...); empty when the folder has none."""
    path = Path(features_dir) / COST_FILE
    if not path.is_file():
        return pd.DataFrame(columns=COST_COLUMNS)
    return pd.read_csv(path, dtype={"slide": str})


def update_embedding_cost(features_dir: str | Path, summary: dict) -> None:
    """Merge the slides an embed_slides run embedded (its ``summary["embedded"]``) into the folder's cost file."""
    rows = [
        {"slide": e["slide"], "tiles": e["tiles"], "seconds": e["seconds"], "tissue_mm2": e.get("tissue_mm2"),
         "device": summary.get("device"), "precision": summary.get("precision"), "host": summary.get("host"),
         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for e in summary.get("embedded", [])
    ]  # fmt: skip
    if not rows:
        return
    features_dir = Path(features_dir)
    with exclusive_lock(features_dir / f".{COST_FILE}.lock", f"another job writing {COST_FILE}", poll_s=0.05):
        old = read_embedding_cost(features_dir)
        new = pd.DataFrame(rows, columns=COST_COLUMNS)
        table = pd.concat([old[~old.slide.isin(new.slide)], new], ignore_index=True) if len(old) else new
        with atomic_path(features_dir / COST_FILE) as tmp:
            table.to_csv(tmp, index=False)


def _slide_path(root: Path, slide_id: str) -> Path:
    return root / "train_images" / f"{slide_id}.tiff"


def embed_panda_slides(cfg: DictConfig, slide_ids: list[str]) -> tuple[Path, dict]:
    """Embed the slides (cached) with the composed encoder and ``cfg.tile``; returns (features folder, info)."""
    from ..embeddings.slides import embed_slides, is_finished
    from ..wsi import trident_h5
    from ..wsi.listing import SlideSpec

    root = Path(cfg.data.root)
    encoder = instantiate(cfg.encoder)
    features = str(cfg.embed.features)
    job_dir = Path(cfg.job_dir)
    tiling = trident_h5.tiling_tag(float(cfg.tile.mpp), int(cfg.tile.size), int(cfg.tile.overlap))
    tag = cfg.embed.encoder_tag or trident_h5.encoder_tag(encoder, features, cfg.backbone.weights)
    feat_dir = job_dir / tiling / f"features_{tag}"
    specs = [SlideSpec(s, _slide_path(root, s)) for s in slide_ids if _slide_path(root, s).is_file()]
    info = {"embed/slides_embedded": 0, "embed/seconds": 0.0}
    if not specs:
        raise FileNotFoundError(f"none of the {len(slide_ids)} labelled slides is in {root / 'train_images'}")
    todo = [s for s in specs if not is_finished(feat_dir / f"{s.slide_id}.h5")]
    if not todo:
        log.info("all %d slides already embedded in %s", len(specs), feat_dir)
        return feat_dir, info
    if _is_child_rank():  # rank 0 embedded before the DDP processes started; what is left it could not embed
        return feat_dir, info
    device, precision = _embed_device_precision(cfg.trainer)
    lock = feat_dir.parent / f".{feat_dir.name}.embed.lock"
    with exclusive_lock(lock, f"another job embedding into {feat_dir}", poll_s=2.0):
        todo = [s for s in specs if not is_finished(feat_dir / f"{s.slide_id}.h5")]  # the holder before us
        if todo:
            log.info("embedding %d of %d slides into %s", len(todo), len(specs), feat_dir)
            summary = embed_slides(
                encoder, todo, job_dir, tile_size=int(cfg.tile.size), tile_mpp=float(cfg.tile.mpp),
                overlap=int(cfg.tile.overlap), min_tissue=float(cfg.tile.min_tissue),
                default_mpp=cfg.data.default_mpp, features=features, tokens=bool(cfg.embed.tokens),
                batch_size=int(cfg.embed.batch_size), num_workers=int(cfg.embed.num_workers),
                reader=str(cfg.embed.reader), threads=cfg.embed.threads, device=device, precision=precision,
                weights=cfg.backbone.weights, encoder_tag=cfg.embed.encoder_tag, progress=False, rank=0,
                world_size=1, thumbnails=bool(cfg.embed.thumbnails), overlay_tiles=int(cfg.embed.overlay_tiles),
                lock_stale_s=float(cfg.embed.lock_stale_hours) * 3600,
            )  # fmt: skip
            if Path(summary["features_dir"]) != feat_dir:
                raise RuntimeError(f"embed_slides wrote {summary['features_dir']}, expected {feat_dir}")
            update_embedding_cost(feat_dir, summary)
            info = {"embed/slides_embedded": summary["slides_done"], "embed/seconds": summary["seconds"]}
    return feat_dir, info


def _embedding_skips(job_dir: Path) -> dict[str, str]:
    path = job_dir / SKIPPED_FILE
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(table.slide, table.reason)) if {"slide", "reason"} <= set(table.columns) else {}


# ----------------------------------------------------------------------------------------------- the task


def _monitor(cfg: DictConfig) -> None:
    monitor = str(cfg.monitor)
    if monitor not in MONITOR_MODES:
        raise ValueError(f"monitor={monitor!r} is not logged by the MIL module; valid: {sorted(MONITOR_MODES)}")
    mode = cfg.get("monitor_mode")
    if mode is None:
        with open_dict(cfg):
            cfg.monitor_mode = MONITOR_MODES[monitor]
    elif mode != MONITOR_MODES[monitor]:
        raise ValueError(
            f"monitor_mode={mode!r} with monitor={monitor}: it must be {MONITOR_MODES[monitor]!r} "
            "(min for val/loss, max for the others); or leave monitor_mode=null"
        )


def _heatmaps(cfg: DictConfig, out_dir: Path, test_ids: list[str], loggers) -> list[Path]:
    from ..viz.mil import attention_heatmap

    root = Path(cfg.data.root)
    paths = []
    for sid in test_ids[: int(cfg.figures.num_slides)]:
        a = read_attention(out_dir / "attention" / f"{sid}.h5")
        if (a["coords"] < 0).all():
            log.info("no heatmap for %s: its feature file has no coords", sid)
            continue
        slide = _slide_path(root, sid)
        paths.append(
            attention_heatmap(
                a["coords"], a["attention"], out_dir / "figures" / f"attention_{sid}.png", tile_size=a["tile_size"],
                slide_path=slide if slide.is_file() else None,
                title=f"{sid}: ISUP {a.get('label')}, predicted {a.get('pred')}, {len(a['attention'])} tiles",
            )
        )  # fmt: skip
    log_images(loggers, "attention", paths, captions=[p.stem.removeprefix("attention_") for p in paths])
    return paths


def run_mil(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _monitor(cfg)
    workers = dataloader_workers(cfg.data.num_workers, "data.num_workers")  # before any embedding work
    L.seed_everything(int(cfg.seed), workers=True)
    labels = panda_slide_labels(
        cfg.data.root,
        cache_dir=cfg.paths.cache_dir,
        split_csv=cfg.data.split_csv,
        exclude=cfg.data.exclude,
        split_seed=int(cfg.data.split_seed),
    )
    embed_info: dict = {}
    if cfg.features_dir:
        features_dir = Path(cfg.features_dir)
    else:
        features_dir, embed_info = embed_panda_slides(cfg, labels.slide_id.tolist())
    # reads every file's header: mixed feature dimensions / encoders are refused here, before any training
    dm = MILDataModule(
        features_dir,
        labels,
        batch_size=int(cfg.data.batch_size),
        num_workers=workers,
        max_tiles_train=cfg.data.max_tiles_train,
        max_tiles_eval=cfg.data.max_tiles_eval,
        seed=int(cfg.seed),
        num_classes=NUM_CLASSES,
        pin_memory=str(cfg.trainer.get("accelerator")) in ("gpu", "cuda"),
    )
    main = not _is_child_rank()
    if main:
        skipped = dm.skipped.copy()
        why = {}
        if not cfg.features_dir:  # why a slide has no features: no slide file, or the embedding skipped it
            why = _embedding_skips(features_dir.parent.parent)
            root = Path(cfg.data.root)
            why.update({s: f"no slide file {_slide_path(root, s)}" for s in skipped.slide_id
                        if not _slide_path(root, s).is_file()})  # fmt: skip
        skipped["reason"] = [
            f"not embedded: {why[s]}" if s in why else r for s, r in zip(skipped.slide_id, skipped.reason)
        ]
        with atomic_path(out_dir / SKIPPED_FILE) as tmp:
            skipped.to_csv(tmp, index=False)
        if len(skipped):
            log.warning("%d labelled slides skipped; see %s", len(skipped), out_dir / SKIPPED_FILE)

    head = instantiate(cfg.head, in_features=dm.feature_dim, num_classes=NUM_CLASSES)
    module = MILModule(
        head,
        num_classes=NUM_CLASSES,
        lr=float(cfg.optim.lr),
        weight_decay=float(cfg.optim.weight_decay),
        max_epochs=int(cfg.trainer.max_epochs),
    )
    loggers = instantiate_list(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = instantiate_list(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    best = next((c.best_model_path for c in callbacks if getattr(c, "best_model_path", "")), "")
    if best:  # the head is passed in, not rebuilt: the checkpoint's weights go into this module
        trainer.test(module, datamodule=dm, ckpt_path=best, weights_only=False, verbose=False)
    else:
        trainer.test(module, datamodule=dm, verbose=False)
    if not trainer.is_global_zero:
        return {}

    metrics = {k: float(module.test_metrics[k]) for k in TEST_CLASSIFICATION_KEYS}
    metrics[TEST_LOSS] = float(module.test_metrics.get(TEST_LOSS, float("nan")))
    metrics[TEST_NUM_SLIDES] = len(module.test_results)
    metrics["train/num_slides"] = int((dm.rows.split == "train").sum())
    metrics["features/dim"] = dm.feature_dim
    metrics["features/tiles_per_slide"] = float(dm.rows.n_tiles.mean())
    metrics["skipped_slides"] = len(dm.skipped)
    cost = read_embedding_cost(features_dir)
    cost = cost[cost.slide.isin(dm.rows.slide_id)]
    metrics[EMBED_SECONDS_PER_SLIDE] = float(cost.seconds.mean()) if len(cost) else float("nan")
    metrics["embed/tiles_per_second"] = float(cost.tiles.sum() / cost.seconds.sum()) if len(cost) else float("nan")
    metrics["embed/slides_timed"] = len(cost)
    metrics.update(embed_info)
    write_json(out_dir / METRICS_FILE, metrics)
    write_mil_outputs(out_dir, module.test_results, NUM_CLASSES)
    if int(cfg.figures.num_slides):
        _heatmaps(cfg, out_dir, [str(r["slide_id"]) for r in module.test_results], loggers)
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)})
        lg.finalize("success")
    log.info(
        "MIL %s on %s (%d test slides): kappa %.4f, balanced accuracy %.4f, accuracy %.4f, AUROC %.4f; "
        "embedding %.2f s per slide",
        cfg.head.name, features_dir, metrics[TEST_NUM_SLIDES], metrics[TEST_KAPPA],
        metrics[TEST_BALANCED_ACCURACY], metrics[TEST_ACCURACY], metrics[TEST_AUROC],
        metrics[EMBED_SECONDS_PER_SLIDE],
    )  # fmt: skip
    return metrics


def main() -> None:
    """``python -m hirespath.tasks.mil [overrides]``: the Hydra app ``hirespath mil`` runs."""
    from .app import hydra_main

    hydra_main("mil")


if __name__ == "__main__":
    main()

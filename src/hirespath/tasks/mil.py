"""The mil task: slide-level MIL (ABMIL or mean pooling) on per-slide tile features, PANDA ISUP grade.

    hirespath mil data=panda_slides data.root=PANDA features_dir=OUT/20x_224px_0px_overlap/features_<tag> head=abmil
    hirespath mil data.root=PANDA backbone.weights=FILE tile.size=1792 head=abmil trainer=gpu   (embeds first)

``features_dir`` given: train on its ``<slide>.h5`` files (ours, TRIDENT's or CLAM's). ``features_dir=null``: the
slides of ``data.root/train_images`` are first embedded into ``job_dir`` with the composed encoder and the same
``tile`` and ``embed`` nodes as embed_slides, through :func:`hirespath.embeddings.features.ensure_features`
(parallel grid jobs of one tiling share the slides through their locks and wait for each other). The features
folder's ledger (``timings.csv``) holds each slide's embedding seconds, which every run on that folder reports.

Outputs in the run directory: metrics.json (test/accuracy, test/balanced_accuracy, test/f1_weighted, test/auroc,
test/kappa, test/num_slides, embed/seconds_per_slide, ...), predictions.csv, attention/<slide>.h5 (per-tile
attention and coords), skipped.csv (labelled slides without a usable feature file, and why), and
figures/attention_<slide>.png heatmaps over the slide thumbnails of the first test slides (also to W&B).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..data.mil import TRAINED_ON, MILDataModule, features_identity, panda_slide_labels
from ..data.panda import NUM_CLASSES
from ..embeddings.features import ensure_features, features_folder
from ..modules.mil import MILModule, monitor_mode, write_mil_outputs
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
from ..slides import Ledger, Runtime
from ..slides.launch import launch_id
from ..utils.errors import InputError
from ..utils.hydra import instantiate_list
from ..utils.io import atomic_path, write_json
from ..utils.threads import dataloader_workers
from ..utils.wandb import log_images
from ..viz.mil import attention_heatmaps
from ..wsi.listing import SlideSpec

log = logging.getLogger("hirespath.mil")


# ----------------------------------------------------------------------------------------------- embedding


def _is_child_rank() -> bool:
    """A DDP process Lightning started (it re-runs the task): it must not embed or write the run's outputs."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def _slide_path(root: Path, slide_id: str) -> Path:
    return root / "train_images" / f"{slide_id}.tiff"


def embed_panda_slides(cfg: DictConfig, slide_ids: list[str]) -> tuple[Path, dict]:
    """The labelled slides' features folder, embedding what is missing; returns (folder, embed/* numbers)."""
    root = Path(cfg.data.root)
    specs = [SlideSpec(s, _slide_path(root, s)) for s in slide_ids if _slide_path(root, s).is_file()]
    if not specs:
        raise InputError(f"none of the {len(slide_ids)} labelled slides is in {root / 'train_images'}")
    encoder = instantiate(cfg.encoder)
    if _is_child_rank():  # rank 0 embedded before the DDP processes started
        return features_folder(encoder, cfg.job_dir, cfg.tile, cfg.embed, cfg.backbone.weights), {}
    runtime = Runtime.from_trainer(cfg.trainer, progress=False, rank=0, world_size=1, launch=launch_id())
    folder, summary = ensure_features(encoder, specs, cfg.tile, cfg.embed, runtime, job_dir=cfg.job_dir,
                                      weights=cfg.backbone.weights, default_mpp=cfg.data.default_mpp)  # fmt: skip
    return folder, {"embed/slides_embedded": summary["slides_done"], "embed/seconds": summary["seconds"]}


def embedding_cost(features_dir: Path, slide_ids) -> dict:
    """embed/* numbers of the slides the folder's ledger timed (none for folders written outside hirespath)."""
    t = Ledger(features_dir).timings()
    t = t[t.slide.isin(set(slide_ids))] if "seconds" in t else t.iloc[0:0]
    if not len(t):
        return {"embed/slides_timed": 0}
    return {EMBED_SECONDS_PER_SLIDE: float(t.seconds.mean()), "embed/slides_timed": len(t),
            "embed/tiles_per_second": float(t.tiles.sum() / t.seconds.sum())}  # fmt: skip


# ----------------------------------------------------------------------------------------------- the task


def run_mil(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):  # the callbacks' mode follows the monitored key
        cfg.monitor_mode = monitor_mode(str(cfg.monitor), cfg.get("monitor_mode"))
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
        # what the model is trained on, for predict_slides to check new features against (weights by digest)
        write_json(out_dir / TRAINED_ON, {"features_dir": str(Path(features_dir).resolve()),
                                          **features_identity(dm.rows.path.iloc[0])})  # fmt: skip
        skipped = dm.skipped.copy()
        why = {}
        if not cfg.features_dir:  # why a slide has no features: no slide file, or the embedding skipped it
            ledger = Ledger(features_dir).skipped()
            why = dict(zip(ledger.slide, ledger.reason))
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
    metrics.update({"embed/slides_embedded": 0, **embed_info, **embedding_cost(features_dir, dm.rows.slide_id)})
    write_json(out_dir / METRICS_FILE, metrics)
    write_mil_outputs(out_dir, module.test_results, NUM_CLASSES)
    if int(cfg.figures.num_slides):
        root = Path(cfg.data.root)
        pngs = attention_heatmaps(out_dir / "attention", out_dir / "figures", [str(r["slide_id"]) for r in
                                  module.test_results], lambda s: _slide_path(root, s), int(cfg.figures.num_slides),
                                  name="attention_{}.png")  # fmt: skip
        log_images(loggers, "attention", pngs, captions=[p.stem.removeprefix("attention_") for p in pngs])
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)})
        lg.finalize("success")
    cost = metrics.get(EMBED_SECONDS_PER_SLIDE)
    log.info(
        "MIL %s on %s (%d test slides): kappa %.4f, balanced accuracy %.4f, accuracy %.4f, AUROC %.4f%s",
        cfg.head.name, features_dir, metrics[TEST_NUM_SLIDES], metrics[TEST_KAPPA],
        metrics[TEST_BALANCED_ACCURACY], metrics[TEST_ACCURACY], metrics[TEST_AUROC],
        f"; embedding {cost:.2f} s per slide" if cost is not None else "",
    )  # fmt: skip
    return metrics


def main() -> None:
    """``python -m hirespath.tasks.mil [overrides]``: the Hydra app ``hirespath mil`` runs."""
    from .app import hydra_main

    hydra_main("mil")


if __name__ == "__main__":
    main()

"""The extract task: PANDA ROI embeddings only (what classify reuses from the cache).

hirespath extract data.root=DIR backbone=uni2_h backbone.weights=FILE resolution=1344 trainer=gpu
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..configs.model import arch_overrides
from ..data.panda import (
    check_panda_root,
    check_split,
    default_split_csv,
    load_or_make_split,
    locate_all,
    panda_cache_dir,
)
from ..embeddings.cache import extract_embeddings, file_fingerprint
from ..results import SKIPPED_FILE
from ..utils.errors import InputError
from ..utils.io import atomic_path

log = logging.getLogger("hirespath.extract")


def cache_config_parts(cfg: DictConfig) -> dict:
    """The attention and pruner groups as the embedding cache key has always hashed them.

    The config keys became ``create_encoder``'s keyword names (``pruner.prune_ratio``, ``attention.sparse_backend``);
    the key keeps the former names so caches extracted before that change stay valid (extraction at 3430 px is
    the expensive part of a grid)."""
    a, p = cfg.attention, cfg.pruner
    return {
        "attention": {"mode": a.mode, "window": a.window, "radius": a.radius, "backend": a.sparse_backend},
        "pruner": {"ratio": p.prune_ratio, "layer": p.prune_layer, "score_tokens": p.prune_score_tokens},
    }


def write_skipped(skipped: pd.DataFrame, out_dir: Path) -> Path:
    path = out_dir / SKIPPED_FILE
    with atomic_path(path) as tmp:
        skipped.to_csv(tmp, index=False)
    return path


def prepare_embeddings(cfg: DictConfig, out_dir: Path, check_splits: bool = False) -> tuple:
    """Split (written once), ROIs (cached), encoder and embeddings (cached); skips go to skipped.csv.

    No usable slide at all (or, with ``check_splits``, an empty train/test split or a single grade to train on once
    unusable slides are skipped) is an error raised before the encoder is built, with skipped.csv written."""
    data = cfg.data
    root = check_panda_root(data.root)
    data_cache = panda_cache_dir(root, cfg.paths.cache_dir)
    split_csv = data.split_csv or default_split_csv(root, cfg.paths.cache_dir, data.split_seed)
    mpp_tag = f"mpp{data.get('default_mpp') or 'tags'}"
    split = load_or_make_split(root, split_csv, exclude=data.exclude, split_seed=data.split_seed)
    rois, skipped = locate_all(
        root,
        split,
        float(data.fov_um),
        int(data.rois_per_slide),
        float(data.min_tissue),
        data_cache / f"rois_v2_fov{data.fov_um:g}_n{data.rois_per_slide}_t{data.min_tissue:g}_{mpp_tag}.csv",
        default_mpp=data.get("default_mpp"),
    )
    if rois.empty:
        path = write_skipped(skipped, out_dir)
        raise InputError(
            f"no usable slide under {root}: {len(skipped)} of {len(split)} skipped, reasons in {path}"
            + (f" (e.g. {skipped.image_id.iloc[0]}: {skipped.reason.iloc[0]})" if len(skipped) else "")
        )
    if check_splits:
        path = write_skipped(skipped, out_dir)
        check_split(rois, f"skipping {len(skipped)} unusable slides of {root}", path)
    torch.manual_seed(cfg.seed)  # random-init backbones get the same weights in every run (the cache key has the seed)
    encoder = instantiate(cfg.encoder)
    key_parts = {
        "backbone": cfg.backbone.name,
        "overrides": arch_overrides(cfg.backbone),
        "weights": file_fingerprint(cfg.backbone.weights),
        **cache_config_parts(cfg),
        "fov_um": data.fov_um,
        "rois_per_slide": data.rois_per_slide,
        "min_tissue": data.min_tissue,
        "root": str(root.resolve()),
        "precision": str(cfg.extract.precision),
        "seed": cfg.seed,
    }
    # the predict Trainer: the trainer group (accelerator, devices, DDP strategy, ...) at extract.precision
    trainer = instantiate(cfg.trainer, _partial_=True, precision=cfg.extract.precision, default_root_dir=str(out_dir))
    emb = extract_embeddings(
        encoder,
        root,
        rois,
        int(cfg.resolution),
        cfg.paths.cache_dir,
        key_parts,
        batch_size=int(cfg.extract.batch_size),
        num_workers=int(cfg.extract.num_workers),
        trainer=trainer,
        flush_every=int(cfg.extract.get("flush_every", 50)),
    )
    skipped = pd.concat([skipped, pd.DataFrame(emb["errors"], columns=["image_id", "reason"])], ignore_index=True)
    write_skipped(skipped, out_dir)
    if len(skipped):
        log.warning("%d slides/ROIs skipped; see %s", len(skipped), out_dir / SKIPPED_FILE)
    return root, rois, emb, encoder


def run_extract(cfg: DictConfig) -> dict:
    """The extract task: embeddings only (what classify would reuse from the cache)."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, rois, emb, _ = prepare_embeddings(cfg, out_dir)
    log.info("%d ROI embeddings (%d failed) ready", len(rois), len(emb["failed"]))
    return emb


def main() -> None:
    """``python -m hirespath.tasks.extract [overrides]``: the Hydra app ``hirespath extract`` runs."""
    from .app import hydra_main

    hydra_main("extract")


if __name__ == "__main__":
    main()

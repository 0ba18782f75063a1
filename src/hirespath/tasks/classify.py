"""PANDA ISUP-grade classification on frozen encoder features: extract (cached), fit a head, test."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..data.panda import NUM_CLASSES, check_split
from ..embeddings.features import FEATURES
from ..metrics.classification import classification_metrics
from ..results import METRICS_FILE, PREDICTIONS_FILE, SKIPPED_FILE, TEST_CLASSIFICATION_KEYS, TEST_NUM_SLIDES
from ..utils.hydra import instantiate_list
from ..utils.io import atomic_path, write_json
from ..viz.overlays import save_pruned_token_figures
from .extract import prepare_embeddings

log = logging.getLogger("hirespath.classify")


def slide_features(emb: dict, features: str) -> pd.DataFrame:
    """One row per slide: its ROI embeddings averaged (ROIs whose read failed are left out)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    parts = {"cls": [emb["cls"]], "mean": [emb["mean"]], "cls+mean": [emb["cls"], emb["mean"]]}[features]
    x = torch.cat(parts, dim=1)
    ok = ~torch.isnan(x).any(1)
    df = pd.DataFrame({"image_id": emb["image_id"], "split": emb["split"], "label": emb["label"].numpy()})[ok.numpy()]
    vecs = x[ok]
    groups = df.groupby("image_id", sort=False).indices
    ids = list(groups)
    feats = torch.stack([vecs[idx].mean(0) for idx in groups.values()]) if ids else torch.empty(0, x.shape[1])
    first = df.groupby("image_id", sort=False).first().loc[ids]
    return pd.DataFrame(
        {"image_id": ids, "split": first.split.to_numpy(), "label": first.label.to_numpy(), "x": list(feats)}
    )


def _tensors(df: pd.DataFrame, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    part = df[df.split == split]
    if len(part) == 0:
        raise ValueError(f"no slides in the {split!r} split after skipping unusable slides")
    return torch.stack(list(part.x)), torch.tensor(part.label.to_numpy(), dtype=torch.long)


def fit_predict(head, feats: pd.DataFrame, trainer=None) -> torch.Tensor:
    """Fit a head (``KNNClassifier``, ``LinearProbeHead``: ``fit(x, y, val, trainer)``) on the train split (+ val
    where it has one) and return the test split's class probabilities."""
    xtr, ytr = _tensors(feats, "train")
    xte, _ = _tensors(feats, "test")
    val = _tensors(feats, "val") if (feats.split == "val").any() else None
    return head.fit(xtr, ytr, val=val, trainer=trainer).predict_proba(xte)


def run_classify(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loggers = instantiate_list(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    head = instantiate(cfg.head, num_classes=NUM_CLASSES)  # its arguments fail here, before any extraction
    root, rois, emb, encoder = prepare_embeddings(cfg, out_dir, check_splits=True)
    feats = slide_features(emb, cfg.features)
    # ROIs whose read failed during extraction are left out: the splits must still hold slides
    check_split(feats, f"leaving out the {len(emb['failed'])} ROIs that could not be read", out_dir / SKIPPED_FILE)
    # the AdamW probe's Trainer: the trainer group, logging to the run's loggers
    trainer = instantiate(cfg.trainer, _partial_=True, logger=loggers or False, default_root_dir=str(out_dir))
    probs = fit_predict(head, feats, trainer)
    _, yte = _tensors(feats, "test")
    metrics = classification_metrics(probs, yte, NUM_CLASSES)
    metrics.update({TEST_NUM_SLIDES: int(len(yte)), "tokens": int((cfg.resolution // encoder.patch_size) ** 2)})
    write_json(out_dir / METRICS_FILE, metrics)
    test_ids = feats[feats.split == "test"].image_id.tolist()
    with atomic_path(out_dir / PREDICTIONS_FILE) as tmp:
        provider = rois.groupby("image_id").data_provider.first() if "data_provider" in rois else None
        pd.DataFrame(
            {
                "image_id": test_ids,
                **({"data_provider": provider.reindex(test_ids).to_numpy()} if provider is not None else {}),
                "label": yte.numpy(),
                "pred": probs.argmax(1).numpy(),
                **{f"p{c}": probs[:, c].numpy() for c in range(NUM_CLASSES)},
            }
        ).to_csv(tmp, index=False)
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)})
    if cfg.figures.num_rois:
        save_pruned_token_figures(encoder, root, rois, int(cfg.resolution), out_dir, loggers, int(cfg.figures.num_rois))
    for lg in loggers:
        lg.finalize("success")
    log.info("metrics (%s, %d test slides):\n%s", cfg.head.name, len(yte), format_metrics(metrics))
    return metrics


def format_metrics(metrics: dict) -> str:
    keys = TEST_CLASSIFICATION_KEYS
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k:<{width}}  {metrics[k]:.4f}" for k in keys)


def main() -> None:
    """``python -m hirespath.tasks.classify [overrides]``: the Hydra app ``hirespath classify`` runs."""
    from .app import hydra_main

    hydra_main("classify")


if __name__ == "__main__":
    main()

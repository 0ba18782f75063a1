"""The predict_slides task: a trained MIL model (``hirespath mil``) applied to new slides, with attention heatmaps.

    hirespath predict_slides ckpt=MILRUN/checkpoints/epoch_007.ckpt features_dir=OUT/20x_224px_0px_overlap/features_x
    hirespath predict_slides ckpt=MILRUN wsi_dir=NEW_SLIDES job_dir=OUT heatmaps.resolution=token

``ckpt``: a checkpoint of a mil run, or the run directory (its best checkpoint, as ``last.ckpt`` records it). The
run's saved config (``MILRUN/.hydra/config.yaml``) gives the head and — when slides are embedded first
(``wsi_dir``/``slides``, ``features_dir=null``) — exactly the encoder, tiling and feature kind the model was trained
on, through :func:`hirespath.embeddings.features.ensure_features`; the user restates nothing. Given features
(ours, TRIDENT's, CLAM's) are checked before any work: another dimension, encoder or tiling than the model's is
refused, naming what the model expects and what the folder holds.

Outputs in the run directory: predictions.csv (slide_id, pred, p0..p{K-1}, n_tiles), metrics.json (counts; with
``labels=CSV`` of slide_id, label — checked before any slide is read — the test metrics), skipped.csv (slides that
could not be predicted, and why), and for all slides or the first ``heatmaps.num_slides``: ``heatmaps/<slide>.png``
(attention over the slide thumbnail, rank-normalised) and ``heatmaps/<slide>.geojson`` (the tiles as QuPath
detections with the attention and class probabilities as measurements). ``heatmaps.resolution=token`` multiplies
each tile's attention by its patches' global-attention scores (the h5 dataset ``token_scores``, written when
embedding with ``embed.token_scores=true``: patch resolution without a second pass over the slide)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from ..data.mil import scan_feature_dir
from ..predict.mil import (
    RESOLUTIONS,
    check_embedding_reproduces,
    check_features,
    clear_earlier_heatmaps,
    embed_new_slides,
    expected_features,
    find_checkpoint,
    labelled_metrics,
    load_mil_head,
    predict,
    predictions_table,
    read_labels,
    run_config,
    write_heatmaps,
)
from ..results import METRICS_FILE, PREDICTIONS_FILE, SKIPPED_FILE
from ..utils.errors import InputError
from ..utils.io import atomic_path, write_json

log = logging.getLogger("hirespath.predict_slides")
# the heatmap PNG's long side: its figure grows with the square of it (8,192 px: 7.1 GiB, 93 s per slide)
MIN_SIDE, MAX_SIDE = 64, 8192


def run_predict_slides(cfg: DictConfig) -> dict:
    from ..slides import Ledger
    from ..slides.ledger import whole_slide_rows
    from ..utils.hydra import instantiate_list
    from ..utils.wandb import log_images, log_table
    from ..wsi.listing import list_slides

    out_dir = Path(cfg.paths.output_dir)
    resolution = str(cfg.heatmaps.resolution)
    if resolution not in RESOLUTIONS:
        raise InputError(f"heatmaps.resolution={resolution!r}: must be one of {', '.join(RESOLUTIONS)}")
    n = cfg.heatmaps.num_slides
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise InputError(f"heatmaps.num_slides={n!r}: must be null (every slide) or an integer >= 0 (0: none)")
    side = cfg.heatmaps.max_side
    if not (isinstance(side, int) and not isinstance(side, bool) and MIN_SIDE <= side <= MAX_SIDE):
        raise InputError(f"heatmaps.max_side={side!r}: must be an integer in [{MIN_SIDE}, {MAX_SIDE}] (px of the "
                         f"heatmap's long side; {MAX_SIDE:,} px takes about 7 GiB and 1.5 min per slide)")  # fmt: skip
    _say_one_process(cfg.trainer)
    ckpt, run_dir = find_checkpoint(cfg.ckpt)
    run_cfg = run_config(run_dir, ckpt)
    head, dim, num_classes = load_mil_head(ckpt, run_cfg)
    expected = expected_features(run_cfg, dim, run_dir)
    labels = read_labels(cfg.labels, num_classes) if cfg.labels else None  # before any slide is read
    if not cfg.features_dir and not cfg.wsi_dir and not cfg.slides:
        raise InputError("predict_slides needs features_dir=DIR (features to predict) or wsi_dir=DIR / slides=LIST.csv "
                         "with job_dir=OUT (slides to embed first with the model's encoder)")  # fmt: skip
    if not cfg.features_dir:
        check_embedding_reproduces(run_cfg, expected)  # a run trained on given features: before any slide is read
    specs = (
        list_slides(cfg.wsi_dir, cfg.slides, cfg.get("wsi_ext"), recursive=bool(cfg.recursive), exclude=cfg.job_dir)
        if cfg.wsi_dir or cfg.slides
        else []
    )
    slide_paths = {s.slide_id: s.path for s in specs}
    skipped: list[tuple[str, str]] = []
    if cfg.features_dir:
        features_dir = Path(cfg.features_dir)
        files = scan_feature_dir(features_dir)
        check_features(files, expected, features_dir)
    else:
        features_dir = embed_new_slides(run_cfg, specs, job_dir=cfg.job_dir, trainer=cfg.trainer,
                                        default_mpp=OmegaConf.select(cfg, "data.default_mpp"),
                                        token_scores=resolution == "token")  # fmt: skip
        ledger = Ledger(features_dir).skipped()
        wanted = set(slide_paths)
        ledger = ledger[whole_slide_rows(ledger)]  # a slide with failed tiles is embedded
        skipped += [(s, f"not embedded: {r}") for s, r in zip(ledger.slide, ledger.reason) if s in wanted]
        files = scan_feature_dir(features_dir)
        # a slide the run refused has no features of its own there (another cohort's slide of that id may)
        files = files[files.slide_id.isin(wanted - {s for s, _ in skipped})]
        check_features(files, expected, features_dir)
    bad = files.error.notna()  # NaN, not None, in a column that holds reasons (pandas)
    skipped += list(zip(files.slide_id[bad], files.error[bad]))
    rows = files[~bad].reset_index(drop=True)
    max_tiles = OmegaConf.select(run_cfg, "data.max_tiles_eval")
    results, failed = predict(head, rows, max_tiles, int(run_cfg.get("seed", 0)))
    skipped += failed
    out_dir.mkdir(parents=True, exist_ok=True)
    not_predicted = pd.DataFrame(skipped, columns=["slide_id", "reason"]).drop_duplicates("slide_id")
    with atomic_path(out_dir / SKIPPED_FILE) as tmp:
        not_predicted.to_csv(tmp, index=False)
    if len(not_predicted):
        log.warning("%d slides skipped; see %s", len(not_predicted), out_dir / SKIPPED_FILE)
    if not results:
        raise InputError(f"no slide could be predicted from {features_dir}; see {out_dir / SKIPPED_FILE}")
    pred = predictions_table(results, num_classes)
    metrics = {"num_slides": len(pred), "skipped_slides": len(not_predicted), "features/dim": dim,
               "features_dir": str(features_dir), "ckpt": str(ckpt)}  # fmt: skip
    earlier = clear_earlier_heatmaps(out_dir)  # a folder reused: before its predictions.csv is replaced
    with atomic_path(out_dir / PREDICTIONS_FILE) as tmp:  # kept whatever the labels say
        pred.to_csv(tmp, index=False)
    pngs = write_heatmaps(results, pred, slide_paths, out_dir, num_classes, num_slides=cfg.heatmaps.num_slides,
                          resolution=resolution, max_side=int(cfg.heatmaps.max_side))  # fmt: skip
    if gone := earlier - {p.stem for p in pngs}:
        log.warning("removed the heatmaps of %d slides an earlier run drew in %s (this run drew %d)", len(gone),
                    out_dir / "heatmaps", len(pngs))  # fmt: skip
    try:
        if labels is not None:
            metrics.update(labelled_metrics(pred, labels, num_classes, source=f"labels={cfg.labels}"))
    finally:  # labels of another cohort: the counts, predictions and heatmaps are kept, then the error
        write_json(out_dir / METRICS_FILE, metrics)
    loggers = instantiate_list(cfg.get("logger"))
    log_images(loggers, "heatmaps", pngs, captions=[p.stem for p in pngs])
    log_table(loggers, "predictions", pred)
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        lg.finalize("success")
    log.info("predicted %d slides with %s into %s (%d heatmaps in %s)", len(pred), ckpt, out_dir / PREDICTIONS_FILE,
             len(pngs), out_dir / "heatmaps")  # fmt: skip
    return metrics


def _say_one_process(trainer: DictConfig) -> None:
    """predict_slides starts no ranks (the MIL head runs on the CPU; new slides are embedded on one device): a
    trainer for several devices is said not to be used, with the way to embed on several."""
    from ..utils.config import select
    from ..utils.devices import requested_devices

    devices, strategy = select(trainer, "devices"), str(trainer.get("strategy", "auto"))
    try:
        needed, _ = requested_devices(devices)  # a count, indices ([0, 1] or "0,1"); -1: every device
    except ValueError:  # no device indices ("a,b"): Lightning refuses them where a trainer is built
        needed = 0
    if needed > 1 or str(devices).strip() == "-1" or "ddp" in strategy:
        log.warning("predict_slides runs as one process on one device: trainer.devices=%s (strategy %s) is not used. "
                    "To embed new slides on several devices, start one predict_slides per device (trainer.devices=1, "
                    "e.g. a SLURM array) with the same job_dir: they share the embedding, each slide embedded once",
                    devices, strategy)  # fmt: skip


def main() -> None:
    """``python -m hirespath.tasks.predict_slides [overrides]``: the Hydra app ``hirespath predict_slides`` runs."""
    from .app import hydra_main

    hydra_main("predict_slides")


if __name__ == "__main__":
    main()

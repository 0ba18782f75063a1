"""``hirespath benchmark experiment=segment_speed``: whole-slide segmentation speed and the seam measure.

Per entry of ``segment_bench.compare`` (tile_size, overlap, attention, window) the same model segments the same
slide end to end (:func:`.consumer.segment_slides`: reading, the model, stitching, GeoJSON, TIFF) and the tissue mm²
per second is reported (startup excluded; without the per-slide seam check unless ``segment_bench.seam_check``: its
one extra forward per slide would weigh 1/4 on the 4 large tiles of the benchmark slide and 1/81 on the small ones,
where a real slide has hundreds), with its two factors: the pixels the model runs per tissue pixel (overlap,
tiles over the tissue's edge) and the model's seconds per megapixel at that tile size. With ``segment_bench.repeats``
> 1 the entries run in rounds (one run of each per round) and the medians are reported. The seam measure
(:mod:`.seams`) compares, on a region of ``segment_bench.seam_region`` px, the entry's tiles stitched (both blends)
with one forward over the region. An entry that fails (its segmentation or its seam measure) is logged and its row
says so (``status``, ``seam_error``); the other entries are measured and written, then the run fails naming it.
The model: a trained run's (``segment_bench.ckpt``) or the composed backbone under a Mask2Former head with random
weights (speed does not depend on the weights; the seam measure of a random model only shows the mechanics).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from ..data.segpath import CELL_TYPES, MPP
from ..segmentation.consumer import SegmentOptions, segment_slides
from ..segmentation.model import SEGPATH_TILE_PX, SegmentationCheckpoint, load_segmentation
from ..segmentation.seams import covered, seam_measure
from ..utils.errors import InputError
from ..utils.io import atomic_path
from ..utils.memory import is_oom
from .measure import device_name, failure_status
from .plots import plot_segmentation
from .rounds import check_repeats, in_rounds

log = logging.getLogger("hirespath.segmentation")

ENTRY_KEYS = ("tile_size", "overlap", "attention", "window")


def random_segmentation(cfg) -> SegmentationCheckpoint:
    """The composed encoder under a Mask2Former head (``segment_bench.head``: its keywords), random weights."""
    from hydra.utils import instantiate

    from ..heads.mask2former import SegmentationModel

    torch.manual_seed(int(cfg.seed))
    model = SegmentationModel(instantiate(cfg.encoder), num_classes=len(CELL_TYPES),
                              **OmegaConf.to_container(cfg.segment_bench.head, resolve=True)).eval()  # fmt: skip
    resolution = SEGPATH_TILE_PX  # a random model has no training mpp: SegPath's own
    return SegmentationCheckpoint(model, Path("random"), Path("."), cfg, list(CELL_TYPES), list(range(8)),
                                  MPP * SEGPATH_TILE_PX / resolution, resolution, "random")  # fmt: skip


def check_segment_bench(b) -> int:
    """The ``segment_bench`` keys checked before any model is built: each entry's keys; returns ``repeats``."""
    for entry in b.compare:
        unknown = set(entry) - set(ENTRY_KEYS)
        if unknown:
            raise InputError(f"segment_bench.compare entry {dict(entry)}: unknown keys {sorted(unknown)}; "
                             f"valid: {', '.join(ENTRY_KEYS)}")  # fmt: skip
    return check_repeats(b.get("repeats", 1), "segment_bench.repeats")


def run_segmentation_benchmark(cfg, out_dir: Path) -> dict:
    from ..slides import Runtime
    from ..wsi.reader import open_slide
    from .slide_throughput import synthetic_slide

    b = cfg.segment_bench
    repeats = check_segment_bench(b)
    seg = load_segmentation(b.ckpt) if b.ckpt else random_segmentation(cfg)
    mpp = float(cfg.tile.mpp) if b.get("tile_mpp") is None else float(b.tile_mpp)
    slide = Path(b.wsi) if b.wsi else synthetic_slide(out_dir / "benchmark_slide.tiff", int(b.synthetic_side), mpp)
    device = None if cfg.device == "auto" else cfg.device
    runtime = Runtime(device=device, precision=str(b.precision), progress=False, rank=0, world_size=1)
    region = None
    if int(b.seam_region) > 0:  # 0: speed only (the seam measure of random weights says nothing)
        with open_slide(slide) as handle:  # the seam region: the slide's centre at the tiles' mpp
            region = _region(handle, int(b.seam_region), mpp)
    enc = seg.model.encoder

    def configure(entry) -> tuple[int, int]:
        # as segment_slides' attention.* (each entry its own output folder); the entries differ on purpose: no warning
        seg.use_attention(mode=entry.get("attention"), window=entry.get("window"), warn=False)
        return int(entry["tile_size"]), int(entry.get("overlap", 0))

    # seam_check=true: the check runs on the benchmark slide whatever its tile count (share 1)
    options = SegmentOptions(threshold=float(b.threshold), seam_check=bool(b.get("seam_check", False)),
                             seam_check_share=1.0)  # fmt: skip

    def run(i: int, entry) -> dict:
        tile, overlap = configure(entry)
        tiling = SimpleNamespace(size=tile, mpp=mpp, overlap=overlap, min_tissue=float(cfg.tile.min_tissue),
                                 tissue_threshold=cfg.tile.get("tissue_threshold"),
                                 cover_tissue=True)  # every tissue pixel, as segment_slides tiles  # fmt: skip
        # each entry's own outputs (a rerun in the same folder segments afresh instead of skipping the slide)
        job = out_dir / f"segment_{i}_{tile}px_{enc.attention}"
        shutil.rmtree(job, ignore_errors=True)
        s = segment_slides(seg, [slide], job, tiling, cfg.embed, options, runtime)
        if not s["slides_done"]:
            raise InputError(f"the benchmark slide {slide} could not be segmented: {s['skipped']}")
        if not b.get("keep_outputs", False):  # a real slide's maps are gigabytes at full size
            shutil.rmtree(job, ignore_errors=True)
        return s

    def leaves_rounds(i: int, err: BaseException) -> bool:  # logged with its entry; the others go on
        failure_status(err, f"segment_speed entry {dict(b.compare[i])}", int(b.compare[i]["tile_size"]))
        return True

    runs = in_rounds({i: functools.partial(run, i, entry) for i, entry in enumerate(b.compare)}, repeats,
                     stops=leaves_rounds)  # fmt: skip
    rows = []
    for entry_runs, entry in zip(runs.values(), b.compare, strict=True):
        tile, overlap = configure(entry)
        if isinstance(entry_runs, BaseException):
            rows.append({"model": seg.trained_tag, "tile_size": tile, "overlap": overlap, "attention": enc.attention,
                         "window": enc.window, "status": "oom" if is_oom(entry_runs) else "error",
                         "error": f"{type(entry_runs).__name__}: {entry_runs}"})  # fmt: skip
            continue
        s = entry_runs[-1]
        seconds_all = [r["seconds"] - r["stage_seconds"].get("startup", 0.0) for r in entry_runs]
        seconds = statistics.median(seconds_all)
        encode_s = statistics.median(r["stage_seconds"]["encode"] for r in entry_runs)
        # speedup = (pixels the model runs per tissue pixel, a) ÷ (b) × (model seconds per megapixel, a) ÷ (b): the
        # first is the overlap and the tissue grid's edges, the second what the model costs per pixel at that size
        mpx = s["tiles"] * tile**2 / 1e6
        px_per_tissue_px = mpx * 1e6 * (mpp * 1e-3) ** 2 / s["tissue_mm2"]
        seams, seam_error = {}, None
        try:
            if region is not None:
                seams = seam_measure(seg.model, seg.class_index, seg.classes, region, tile, overlap, float(b.threshold))
        except Exception as err:  # noqa: BLE001 — the speed stands without it
            failure_status(err, f"segment_speed seam measure of {dict(entry)}", tile)
            seam_error = f"{type(err).__name__}: {err}"
        rows.append({
            "model": seg.trained_tag, "device": device_name(s["device"]),
            "tile_size": tile, "overlap": overlap, "attention": enc.attention, "window": enc.window,
            "tiles": s["tiles"], "tissue_mm2": s["tissue_mm2"], "seconds": seconds,
            "mm2_per_s": s["tissue_mm2"] / seconds, "encode_s": encode_s,
            "px_per_tissue_px": px_per_tissue_px, "encode_s_per_mpx": encode_s / mpx,
            "write_s": statistics.median(r["stage_seconds"]["write"] for r in entry_runs),
            "repeats": repeats, "seconds_all": json.dumps([round(x, 3) for x in seconds_all]),
            "seam_check": options.seam_check,
            "seam_region": 0 if region is None else covered(region, tile, overlap).shape[0],  # what was compared
            **{f"seam_dice_{k}": v["mean_dice"] for k, v in seams.items()},
            **{f"seam_abs_diff_{k}": v["mean_abs_diff"] for k, v in seams.items()},
            **({"seam_dice_per_class": json.dumps({k: v["dice"] for k, v in seams.items()})} if seams else {}),
            # classes whose one-forward map is a single value (all of them: a random head, the seam columns are moot)
            **({"seam_constant_classes": len(next(iter(seams.values()))["constant_classes"])} if seams else {}),
            "status": "ok", **({"seam_error": seam_error} if seam_error else {}),
        })  # fmt: skip
    base = rows[0].get("mm2_per_s", float("nan"))
    for r in rows:
        r["speedup"] = r.get("mm2_per_s", float("nan")) / base
    path = out_dir / "segmentation_benchmark.csv"
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    png = out_dir / "segmentation_benchmark.png"
    plot_segmentation(rows, png)
    seam_columns = sorted({c for r in rows for c in r if c.startswith("seam_dice_") and c != "seam_dice_per_class"})
    table = pd.DataFrame(rows).reindex(
        columns=[
            "tile_size",
            "overlap",
            "attention",
            "window",
            "tiles",
            "mm2_per_s",
            "speedup",
            "px_per_tissue_px",
            "encode_s_per_mpx",
            "status",
            *seam_columns,
        ]
    )
    log.info("whole-slide segmentation of %s (model %s):\n%s", slide, seg.trained_tag, table.to_string(index=False))
    result = {"csv": str(path), "plot": str(png), "rows": rows, "summary": table.to_string(index=False),
              "tables": [str(path)], "plots": [str(png)]}  # fmt: skip
    failed = [r for r in rows if r["status"] != "ok" or r.get("seam_error")]
    if failed:  # the benchmark task raises it once the rows are written and logged
        result["failed"] = (
            f"segment_speed: {len(failed)} entr{'y' if len(failed) == 1 else 'ies'} failed ("
            + ", ".join(
                f"{r['tile_size']} px {r['attention']}: {r.get('error') or r.get('seam_error')}" for r in failed
            )
            + f"); the others are in {path}"
        )
    return result


def _region(handle, side: int, mpp: float) -> np.ndarray:
    """A side×side RGB crop of the slide's centre at ``mpp`` (read at level 0 and resized)."""
    from PIL import Image

    from ..wsi.reader import level0_mpp

    smpp = level0_mpp(handle, None, None)
    side0 = round(side * mpp / smpp)
    W, H = handle.dimensions
    x, y = max(0, (W - side0) // 2), max(0, (H - side0) // 2)
    img = handle.read_region((x, y), 0, (side0, side0)).convert("RGB")
    return np.asarray(img.resize((side, side), Image.BILINEAR))

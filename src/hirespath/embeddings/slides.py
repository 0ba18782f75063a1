"""Whole-slide embedding at high resolution: every tissue tile of every slide through the encoder, TRIDENT's files.

``embed_slides`` is the engine behind the (later) Hydra task: plain keyword arguments, no config objects.
Per slide: tissue grid (or the ``patches/<slide>_patches.h5`` of an earlier run with the same tiling) →
tiles streamed through a DataLoader over :class:`~hirespath.wsi.tile_readers.SlideTileDataset` (workers read and
resize while the encoder runs; never a whole slide in memory) → ``features_<encoder tag>/<slide>.h5`` written
batch by batch under a temporary name and renamed when complete (:mod:`hirespath.wsi.trident_h5`).

Many workers can share one job folder (DDP ranks, parallel jobs, a SLURM array): slides are pre-assigned
round-robin by rank, and every slide is embedded under ``<slide>.h5.lock`` taken with
:func:`~hirespath.utils.io.try_lock` (create-exclusive, stale locks of dead processes taken over), so no slide is
embedded twice; a rank that finishes its share takes the others' unlocked unfinished slides. A rerun skips
finished slides. Slides that cannot be used (unreadable, no mpp, no tissue) go to ``skipped.csv`` and the run
goes on.

On disk (``<tiling>`` = :func:`~hirespath.wsi.trident_h5.tiling_tag`, e.g. ``20x_1792px_0px_overlap``)::

    job_dir/
      <tiling>/patches/<slide>_patches.h5          coords; reused by every encoder with the same tiling and mpp
      <tiling>/features_<encoder tag>/<slide>.h5   features + coords (+ tokens); <slide>.h5.lock while embedding
      <tiling>/features_<encoder tag>/config.json  the encoder configuration this folder holds (checked on reuse)
      <tiling>/thumbnails/<slide>.png              tissue outline + kept tiles (hirespath.viz.thumbnails)
      <tiling>/thumbnails/<slide>_pruned.png       pruned tokens of the first tiles (when pruning)
      skipped.csv                                  slide, path, reason, time, host (tiles that ran out of memory too)
      summary.json (summary_rank<r>.json when world_size > 1)

Timing (which stage costs what). ``summary["stage_seconds"]`` and each row of ``job_dir/timings.csv`` (one per
slide) hold wall seconds of this process: ``prepare`` (waiting for the slide to be opened and its tissue grid
computed — the next slide's is computed in a background thread while the current one encodes, so this is what was
not hidden), ``read`` (waiting for tiles: the reading not hidden behind encoding), ``h2d`` (host→device copy,
CUDA), ``encode`` (forward, synchronised), ``write`` (h5 appends), ``thumbnails``, ``bookkeeping`` (locks,
skipped.csv, timings.csv) and, once per run, ``setup``. They add up to the wall time (``untracked_seconds`` is the
rest). The overlapped work is reported apart: ``reader_read`` (region read + JPEG decode) and ``reader_resize``,
summed over tiles in the readers, and the background ``open`` and ``tissue`` seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..utils.io import atomic_path, exclusive_lock, try_lock, write_json
from ..utils.memory import is_oom
from ..utils.threads import AdaptiveThreads, torch_threads
from ..viz.thumbnails import save_pruned_overlays, save_thumbnail
from ..wsi import trident_h5
from ..wsi.listing import SlideSpec, as_specs
from ..wsi.reader import SlideError, best_level, level0_mpp, open_slide, read_thumbnail
from ..wsi.tile_readers import SlideTileDataset, tile_batches
from ..wsi.tissue import TileGrid, check_tiling, tile_grid, tissue_mask

log = logging.getLogger("hirespath.embeddings")

FEATURES = ("cls", "mean", "cls+mean")
STAGES = ("setup", "prepare", "read", "h2d", "encode", "write", "thumbnails", "bookkeeping")  # wall time, measured
BACKGROUND = ("open", "tissue", "reader_read", "reader_resize")  # overlapped work, summed
TIMING_COLUMNS = [
    "slide",
    "rank",
    "host",
    "tiles",
    "tissue_mm2",
    "seconds",
    *(f"{s}_s" for s in STAGES),
    *(f"{s}_s" for s in BACKGROUND),
    "tiles_per_s",
    "mm2_per_s",
    "reader",
    "num_workers",
    "threads",
]
PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16")
# what must match for features to share one features_<tag>/ folder (precision may differ: bf16 vs fp32 numbers
# are the same features within rounding)
IDENTITY_KEYS = (
    "backbone",
    "attention",
    "window",
    "radius",
    "prune_ratio",
    "prune_layer",
    "prune_score_tokens",
    "resolution",
    "vit_patch_size",
    "embed_dim",
    "feature",
    "weights_size",
)
# ---------------------------------------------------------------------------------------------------------------
# encoding


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None, torch.dtype | None]:
    """(name, autocast dtype, weights dtype). ``auto``: bf16 autocast on CUDA with bf16 support, fp32 elsewhere;
    ``bf16``/``fp16`` cast the weights (the benchmark's paper-style setting), ``*-mixed`` autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("fp16", "fp16-mixed") and device.type != "cuda":
        raise ValueError(f"precision={precision!r} needs a CUDA device (got {device}); use bf16-mixed or fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.split("-")[0])
    return (
        precision,
        (dtype if precision.endswith("-mixed") else None),
        (None if precision.endswith("-mixed") else dtype),
    )


class TileEncoder:
    """uint8 tiles → (features, kept tokens, positions), with a batch that runs out of memory retried in halves.

    After an out-of-memory error the smaller batch is kept for the rest of the run (the next batches would fail
    the same way); a single tile that still does not fit is reported back as failed.
    """

    def __init__(self, encoder, device: torch.device, precision: str, features: str, tokens: bool, batch_size: int):
        self.encoder, self.device, self.features, self.tokens = encoder, device, features, tokens
        self.precision, self.autocast, self.weights_dtype = resolve_precision(precision, device)
        self.batch_size = int(batch_size)
        self.input_dtype = self.weights_dtype or torch.float32
        self.h2d_seconds = 0.0  # host→device copies (pinned, non-blocking, then synchronised to time them)

    def _forward(self, images: torch.Tensor):
        t0 = time.perf_counter()
        x = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.h2d_seconds += time.perf_counter() - t0
        x = x.to(self.input_dtype).div_(255)
        x = self.encoder.normalize(x)
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = self.encoder(x)
        parts = {"cls": [out.cls], "mean": [out.mean_patch], "cls+mean": [out.cls, out.mean_patch]}[self.features]
        feats = torch.cat([p.float() for p in parts], 1).cpu().numpy()
        # positions are small (N'×2 per tile) and feed the pruned-token overlays even without tokens
        toks = list(out.patch_tokens.float().cpu().numpy()) if self.tokens else None
        return feats, toks, list(out.positions.cpu().numpy()), out.grid

    def __call__(self, images: torch.Tensor) -> list[tuple[np.ndarray, tuple | None]]:
        """[(indices into images, (features, tokens, positions, grid)) or (indices, None) for failed tiles]."""
        results, start = [], 0
        while start < len(images):
            chunk = images[start : start + self.batch_size]
            try:
                results.append((np.arange(start, start + len(chunk)), self._forward(chunk)))
                start += len(chunk)
            except Exception as err:  # noqa: BLE001 — only out-of-memory is handled here
                if not is_oom(err):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(chunk) == 1:
                    log.warning("out of memory on a single tile: skipping it (%s)", str(err).splitlines()[0])
                    results.append((np.arange(start, start + 1), None))
                    start += 1
                else:
                    self.batch_size = max(1, len(chunk) // 2)
                    log.warning("out of memory at batch size %d: retrying with %d", len(chunk), self.batch_size)
        return results


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping: skipped.csv, folder config, rank


SKIPPED_COLUMNS = ["slide", "path", "reason", "time", "host"]


def update_skipped(job_dir: Path, rows: list[dict], done: list[str] = ()) -> None:
    """Merge into ``job_dir/skipped.csv`` (atomic rewrite under a lock, so parallel workers lose no rows): rows
    of the slides in ``rows`` and ``done`` are replaced — a slide that now finished leaves the list."""
    path = job_dir / "skipped.csv"
    if not rows and not (done and path.exists()):
        return
    with exclusive_lock(job_dir / ".skipped.csv.lock", "another worker writing skipped.csv", poll_s=0.05):
        old = (
            pd.read_csv(path, dtype=str, keep_default_na=False)
            if path.exists()
            else pd.DataFrame(columns=SKIPPED_COLUMNS)
        )
        drop = {r["slide"] for r in rows} | set(done)
        new = pd.concat([old[~old["slide"].isin(drop)], pd.DataFrame(rows, columns=SKIPPED_COLUMNS)], ignore_index=True)
        if len(new) or path.exists():
            with atomic_path(path) as tmp:
                new.to_csv(tmp, index=False)


def _check_folder_config(path: Path, config: dict) -> None:
    """One features folder, one encoder configuration: refuse to mix another into it (written on first use)."""
    import json

    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), config.get(k)) for k in IDENTITY_KEYS if old.get(k) != config.get(k)}
        if diff:
            raise ValueError(
                f"{path.parent} holds features of another encoder configuration "
                f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                f"pass another encoder_tag= or job_dir"
            )
        return
    write_json(path, config)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


def is_finished(path: Path, tokens: bool = False) -> bool:
    """A features file exists (files appear only complete) and, when tokens are wanted, holds them."""
    if not path.is_file():
        return False
    if not tokens:
        return True
    try:
        with h5py.File(path, "r") as f:
            return "tokens" in f
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# the engine


def _grid_for(
    slide,
    spec: SlideSpec,
    patches_path: Path,
    *,
    tile_size,
    tile_mpp,
    overlap,
    min_tissue,
    default_mpp,
    mask_max_side,
    need_images: bool,
    tiling: str,
    tdir: Path,
) -> tuple[TileGrid, bool]:
    """The slide's tile grid: the patches file of an earlier run when its tiling matches, else computed (and
    written). Returns (grid, reused)."""
    smpp = level0_mpp(slide, spec.mpp, default_mpp)
    if patches_path.is_file():
        try:
            attrs, coords = trident_h5.read_coords(patches_path)
            same = (
                int(attrs["patch_size"]) == tile_size
                and int(attrs["overlap"]) == overlap
                and np.isclose(float(attrs["target_mpp"]), tile_mpp)
                and np.isclose(float(attrs["level0_mpp"]), smpp)
                and np.isclose(float(attrs["min_tissue"]), min_tissue)
            )
        except (OSError, KeyError, ValueError) as err:
            same, attrs = False, {}
            log.warning("%s: unreadable patches file (%s); tiling again", patches_path, err)
        if same and len(coords):
            size0 = int(attrs["patch_size_level0"])
            level = best_level(slide.level_downsamples, size0 / tile_size)
            grid = TileGrid(
                coords=coords.astype(np.int64),
                tile_size=tile_size,
                tile_mpp=tile_mpp,
                overlap=overlap,
                slide_mpp=smpp,
                patch_size_level0=size0,
                stride_level0=int(attrs["stride_level0"]),
                level0_size=tuple(slide.dimensions),
                read_level=level,
                read_downsample=float(slide.level_downsamples[level]),
                grid_shape=(0, 0),
                tissue_fraction=np.full(len(coords), np.nan),
                min_tissue=min_tissue,
                tissue_area_mm2=float(attrs.get("tissue_area_mm2", np.nan)),
            )
            if need_images:
                grid.thumbnail, grid.mask_downsample = read_thumbnail(slide, mask_max_side)
                grid.mask = tissue_mask(grid.thumbnail)
            return grid, True
        if not same:
            log.warning(
                "%s was tiled with other settings (%s); tiling again",
                patches_path,
                {k: attrs.get(k) for k in ("patch_size", "overlap", "target_mpp", "level0_mpp", "min_tissue")},
            )
    grid = tile_grid(slide, tile_size, tile_mpp, overlap, min_tissue, mpp=smpp, mask_max_side=mask_max_side)
    attrs = trident_h5.coords_attrs(grid, name=spec.slide_id, savetodir=tdir, tiling=tiling)
    attrs["tissue_area_mm2"] = grid.tissue_area_mm2
    trident_h5.write_patches_h5(patches_path, grid.coords, attrs)
    return grid, False


def embed_slides(
    encoder,
    slides,
    job_dir,
    *,
    tile_size: int = 1792,
    tile_mpp: float = 0.5,
    overlap: int = 0,
    min_tissue: float = 0.25,
    default_mpp: float | None = None,
    features: str = "cls",
    tokens: bool = False,
    token_dtype=np.float16,
    batch_size: int = 4,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    precision: str = "auto",
    weights=None,
    encoder_tag: str | None = None,
    extra_attrs: dict | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    thumbnails: bool = True,
    overlay_tiles: int = 2,
    skip_errors: bool = True,
    lock_stale_s: float = 24 * 3600,
    mask_max_side: int = 2048,
    reader: str = "threads",
    threads: int | None = None,
) -> dict:
    """Embed every tissue tile of ``slides`` into TRIDENT/CLAM h5 files under ``job_dir``; returns the summary.

    ``encoder``: a :class:`~hirespath.models.encoder.HiResEncoder` (``hirespath.create_encoder``), moved to
    ``device`` (default: CUDA when available) and, for ``precision`` ``bf16``/``fp16``, cast. ``slides``: paths or
    :class:`~hirespath.wsi.listing.SlideSpec` (``list_slides``). Tiles of ``tile_size`` px at ``tile_mpp`` µm/px
    (``overlap`` px between neighbours, ``min_tissue`` fraction of tissue to keep a tile); ``default_mpp`` for
    slides without one. ``features``: ``cls`` | ``mean`` (of the kept patch tokens) | ``cls+mean`` (concatenated).
    ``tokens=True`` also stores every tile's kept tokens (large: see :mod:`hirespath.wsi.trident_h5`).
    ``weights``: the weights file the encoder was built from (recorded, and part of the folder's identity).
    ``rank``/``world_size``: this worker's share (default: torch.distributed, else $RANK/$WORLD_SIZE, else 0/1).
    ``skip_errors=False`` raises unexpected per-slide errors instead of listing them (SlideErrors are always
    listed). ``reader``/``num_workers``: how tiles are read while the encoder runs (threads or DataLoader worker
    processes); ``threads``: the encoder's intra-op CPU threads (None: the cores the readers leave, see
    :mod:`hirespath.utils.threads`). Layout, resume, locking and timing: see the module docstring.
    """
    t_start = time.perf_counter()
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    check_tiling(tile_size, tile_mpp, overlap, min_tissue)
    if encoder.patch_size and tile_size % encoder.patch_size:
        p = encoder.patch_size
        raise ValueError(
            f"tile_size {tile_size} is not a multiple of the encoder's patch size {p}; e.g. "
            f"{tile_size // p * p} or {(tile_size // p + 1) * p}"
        )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    specs = as_specs(slides)
    rank, world_size = _rank_world(rank, world_size)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    tile_encoder = TileEncoder(encoder, device, precision, features, tokens, batch_size)
    encoder.to(device).eval()
    if tile_encoder.weights_dtype is not None:
        encoder.to(tile_encoder.weights_dtype)

    job_dir = Path(job_dir)
    tiling = trident_h5.tiling_tag(tile_mpp, tile_size, overlap)
    tag = encoder_tag or trident_h5.encoder_tag(encoder, features, weights)
    tdir = job_dir / tiling
    patches_dir, feat_dir, thumb_dir = tdir / "patches", tdir / f"features_{tag}", tdir / "thumbnails"
    f_attrs = trident_h5.encoder_attrs(
        encoder,
        tag=tag,
        features=features,
        tile_size=tile_size,
        weights=weights,
        precision=tile_encoder.precision,
        extra=extra_attrs,
    )
    fp = f_attrs["weights_fingerprint"]
    _check_folder_config(
        feat_dir / "config.json",
        {
            **f_attrs,
            "weights_size": fp["size"] if fp else None,
            "tiling": tiling,
            "tile_mpp": tile_mpp,
            "overlap": overlap,
            "min_tissue": min_tissue,
            "tokens": tokens,
        },
    )

    # own share first (round-robin by rank), then the others' in an order that differs by rank
    mine = specs[rank::world_size]
    others = [s for i, s in enumerate(specs) if i % world_size != rank]
    others = others[rank * len(others) // world_size :] + others[: rank * len(others) // world_size]
    order = mine + others
    finished_before = [s for s in order if is_finished(feat_dir / f"{s.slide_id}.h5", tokens)]
    if finished_before:
        log.info("skipping %d finished slides of %d in %s", len(finished_before), len(specs), feat_dir)
    done_ids = {s.slide_id for s in finished_before}

    summary = {
        "job_dir": str(job_dir),
        "tiling": tiling,
        "features_dir": str(feat_dir),
        "encoder": tag,
        "rank": rank,
        "world_size": world_size,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slides_total": len(specs),
        "slides_already_finished": len(finished_before),
        "slides_done": 0,
        "slides_skipped": 0,
        "slides_locked_by_others": 0,
        "tiles": 0,
        "tiles_skipped": 0,
        "tissue_mm2": 0.0,
        "precision": tile_encoder.precision,
        "device": str(device),
        "reader": reader,
        "num_workers": num_workers,
        "embedded": [],
        "skipped": [],
    }
    totals = dict.fromkeys(STAGES + BACKGROUND, 0.0)
    todo = [s for s in order if s.slide_id not in done_ids]
    grid_kwargs = dict(tile_size=tile_size, tile_mpp=tile_mpp, overlap=overlap, min_tissue=min_tissue,
                       default_mpp=default_mpp, mask_max_side=mask_max_side, tiling=tiling, tdir=tdir)  # fmt: skip

    def prepare(s: SlideSpec) -> PreparedSlide:
        return _prepare_slide(s, patches_dir=patches_dir, need_images=thumbnails, **grid_kwargs)

    # readers busy while the encoder runs: worker processes/threads; the encoder gets the cores they leave
    # readers busy beside the encoder take cores from it (on CPU): start from the cores they leave, then follow
    # how busy they really are (utils/threads.py); readers in this thread (num_workers=0) take none
    policy = AdaptiveThreads(threads, num_workers) if device.type == "cpu" else None
    bar = tqdm(todo, desc=f"slides (rank {rank})" if world_size > 1 else "slides", disable=not progress, unit="slide")
    with (
        ThreadPoolExecutor(1, thread_name_prefix="slide-prepare") as prep_pool,
        torch_threads(policy.n, f"{num_workers} tile reader {reader}") if policy else _nothing(),
    ):
        futures: dict[str, Future] = {}

        def prefetch(k: int) -> None:  # the next slide's tissue grid while this one encodes
            if k < len(todo) and todo[k].slide_id not in futures:
                futures[todo[k].slide_id] = prep_pool.submit(prepare, todo[k])

        prefetch(0)
        totals["setup"] = time.perf_counter() - t_start  # folder checks, the finished-slides scan, thread policy
        for k, spec in enumerate(bar):
            t_slide = time.perf_counter()
            stages = dict.fromkeys(STAGES + BACKGROUND, 0.0)
            out = feat_dir / f"{spec.slide_id}.h5"
            lock = try_lock(out.with_name(out.name + ".lock"), stale_s=lock_stale_s)
            finished = lock is not None and is_finished(out, tokens)  # by another worker since our scan
            stages["bookkeeping"] += time.perf_counter() - t_slide
            if lock is None or finished:
                summary["slides_locked_by_others" if lock is None else "slides_already_finished"] += 1
                futures.pop(spec.slide_id, None)
                prefetch(k + 1)
                if lock is not None:
                    lock.release()
                totals["bookkeeping"] += time.perf_counter() - t_slide
                continue
            timing_row = None
            try:
                bar.set_postfix_str(spec.slide_id)
                future = futures.pop(spec.slide_id, None) or prep_pool.submit(prepare, spec)
                prefetch(k + 1)
                t0 = time.perf_counter()
                prepared = future.result()
                stages["prepare"] += time.perf_counter() - t0
                stages["open"], stages["tissue"] = prepared.open_s, prepared.tissue_s
                result = _embed_slide(
                    spec, prepared, out, tile_encoder, encoder, stages, tiling=tiling, tdir=tdir,
                    thumb_dir=thumb_dir, tile_size=tile_size, tile_mpp=tile_mpp, f_attrs=f_attrs, tokens=tokens,
                    token_dtype=token_dtype, batch_size=batch_size, num_workers=num_workers, reader=reader,
                    device=device, thumbnails=thumbnails, overlay_tiles=overlay_tiles, progress=progress,
                    threads=policy,
                )  # fmt: skip
                t0 = time.perf_counter()
                summary["slides_done"] += 1
                summary["tiles"] += result["tiles"]
                summary["tiles_skipped"] += len(result["failed_tiles"])
                summary["tissue_mm2"] += result["tissue_mm2"] if np.isfinite(result["tissue_mm2"]) else 0.0
                update_skipped(job_dir, [_skip_row(spec, r) for r in result["failed_tiles"]], done=[spec.slide_id])
                stages["bookkeeping"] += time.perf_counter() - t0
                seconds = time.perf_counter() - t_slide
                result.update(seconds=seconds, stage_seconds=dict(stages))
                summary["embedded"].append(result)
                timing_row = {
                    "slide": spec.slide_id, "rank": rank, "host": summary["host"], "tiles": result["tiles"],
                    "tissue_mm2": result["tissue_mm2"], "seconds": seconds,
                    **{f"{s}_s": stages[s] for s in STAGES + BACKGROUND},
                    "tiles_per_s": result["tiles"] / seconds, "mm2_per_s": result["tissue_mm2"] / seconds,
                    "reader": reader, "num_workers": num_workers,
                    "threads": policy.n if policy else torch.get_num_threads(),
                }  # fmt: skip
            except Exception as err:  # noqa: BLE001 — one bad slide must not stop a run over thousands
                if not isinstance(err, SlideError):
                    if not skip_errors:
                        raise
                    log.exception("%s: unexpected error", spec.path)
                t0 = time.perf_counter()
                reason = str(err) if isinstance(err, SlideError) else f"{type(err).__name__}: {err}"
                log.warning("skipping %s: %s", spec.slide_id, reason)
                summary["slides_skipped"] += 1
                summary["skipped"].append({"slide": spec.slide_id, "reason": reason})
                update_skipped(job_dir, [_skip_row(spec, reason)])
                stages["bookkeeping"] += time.perf_counter() - t0
            finally:
                t0 = time.perf_counter()
                if timing_row is not None:
                    update_timings(job_dir, [timing_row])  # (its own write counts in the run's totals only)
                lock.release()
                stages["bookkeeping"] += time.perf_counter() - t0
                for s in totals:
                    totals[s] += stages[s]
        bar.close()

    seconds = time.perf_counter() - t_start
    summary.update(
        seconds=seconds,
        stage_seconds=totals,
        untracked_seconds=seconds - sum(totals[s] for s in STAGES),
        threads=policy.chosen if policy else [torch.get_num_threads()],
        tiles_per_second=summary["tiles"] / seconds if seconds else None,
        tissue_mm2_per_second=summary["tissue_mm2"] / seconds if seconds else None,
        slides_finished_on_disk=sum(is_finished(feat_dir / f"{s.slide_id}.h5", tokens) for s in specs),
    )
    write_json(job_dir / ("summary.json" if world_size == 1 else f"summary_rank{rank}.json"), summary)
    log.info(
        "%d slides embedded (%d tiles, %.1f mm² tissue), %d skipped, %d already finished, %d held by other "
        "workers, in %.1f s → %s\n%s",
        summary["slides_done"],
        summary["tiles"],
        summary["tissue_mm2"],
        summary["slides_skipped"],
        summary["slides_already_finished"],
        summary["slides_locked_by_others"],
        seconds,
        feat_dir,
        format_stages(totals, seconds, summary["tiles"], summary["tissue_mm2"]),
    )
    return summary


_nothing = contextlib.nullcontext


def _skip_row(spec: SlideSpec, reason: str) -> dict:
    return {
        "slide": spec.slide_id,
        "path": str(spec.path),
        "reason": reason,
        "host": socket.gethostname(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }


@dataclass
class PreparedSlide:
    """A slide opened and tiled (in the background thread while the previous slide encodes)."""

    grid: TileGrid
    reused: bool
    open_s: float
    tissue_s: float


def _prepare_slide(spec: SlideSpec, *, patches_dir, need_images, **grid_kwargs) -> PreparedSlide:
    t0 = time.perf_counter()
    try:
        slide = open_slide(spec.path)
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 — corrupt files surface as many exception types
        raise SlideError(f"cannot read {spec.path.name}: {type(err).__name__}: {err}") from err
    t1 = time.perf_counter()
    try:
        grid, reused = _grid_for(slide, spec, patches_dir / f"{spec.slide_id}_patches.h5", need_images=need_images,
                                 **grid_kwargs)  # fmt: skip
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001
        raise SlideError(f"cannot read {spec.path.name}: {type(err).__name__}: {err}") from err
    finally:
        slide.close()
    return PreparedSlide(grid, reused, t1 - t0, time.perf_counter() - t1)


def _embed_slide(
    spec: SlideSpec,
    prepared: PreparedSlide,
    out: Path,
    tile_encoder: TileEncoder,
    encoder,
    stages: dict,
    *,
    tiling,
    tdir,
    thumb_dir,
    tile_size,
    tile_mpp,
    f_attrs,
    tokens,
    token_dtype,
    batch_size,
    num_workers,
    reader,
    device,
    thumbnails,
    overlay_tiles,
    progress,
    threads: AdaptiveThreads | None = None,
) -> dict:
    """Stream the prepared slide's tiles through the encoder into ``out``; adds this slide's seconds to ``stages``."""
    grid = prepared.grid
    thumb_path = thumb_dir / f"{spec.slide_id}.png"
    draw = thumbnails and not thumb_path.is_file() and grid.thumbnail is not None
    # the coords attributes are the patches file's, as TRIDENT copies them into the features file
    c_attrs = trident_h5.coords_attrs(grid, name=spec.slide_id, savetodir=tdir, tiling=tiling)
    c_attrs["tissue_area_mm2"] = grid.tissue_area_mm2
    attrs = {**f_attrs, "name": spec.slide_id, "savetodir": str(out.parent)}
    dim = encoder.embed_dim * (2 if f_attrs["feature"] == "cls+mean" else 1)
    ds = SlideTileDataset(spec.path, grid.coords, grid.patch_size_level0, tile_size, level=grid.read_level)
    batches = tile_batches(ds, batch_size, reader=reader, num_workers=num_workers, pin_memory=device.type == "cuda")
    failed, overlays = [], []
    want_overlays = thumbnails and overlay_tiles > 0 and encoder.pruner.enabled and draw
    h2d_before = tile_encoder.h2d_seconds
    t_open = time.perf_counter()
    try:
        with trident_h5.FeatureWriter(out, dim, c_attrs, attrs, tokens=tokens, token_dtype=token_dtype) as writer:
            t_wait = time.perf_counter()
            stages["write"] += t_wait - t_open  # creating the file
            tiles_bar = tqdm(total=len(ds), desc=spec.slide_id, leave=False, disable=not progress, unit="tile")
            for batch in batches:
                t1 = time.perf_counter()
                stages["read"] += t1 - t_wait
                stages["reader_read"] += float(batch["read_s"].sum())
                stages["reader_resize"] += float(batch["resize_s"].sum())
                images, index = batch["image"], batch["index"].numpy()
                results = tile_encoder(images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t2 = time.perf_counter()
                stages["encode"] += t2 - t1
                for sub, res in results:
                    idx = index[sub]
                    if res is None:
                        x, y = grid.coords[idx[0]]
                        failed.append(f"tile {int(idx[0])} at ({x}, {y}): out of memory at batch size 1")
                        continue
                    feats, toks, pos, patch_grid = res
                    writer.append(feats, grid.coords[idx], toks, pos if tokens else None, grid=patch_grid)
                    for j in range(min(len(sub), overlay_tiles - len(overlays)) if want_overlays else 0):
                        overlays.append((int(idx[j]), images[sub[j]].permute(1, 2, 0).numpy(), pos[j], patch_grid))
                stages["write"] += time.perf_counter() - t2
                tiles_bar.update(len(index))
                if threads is not None:
                    threads.observe(
                        float(batch["read_s"].sum() + batch["resize_s"].sum()), time.perf_counter() - t_wait
                    )
                t_wait = time.perf_counter()
            tiles_bar.close()
            if writer.n == 0:
                raise SlideError(f"no tile could be embedded ({len(failed)} ran out of memory at batch size 1)")
            t_close = time.perf_counter()
        stages["write"] += time.perf_counter() - t_close  # the final flush and rename
    finally:
        t_stop = time.perf_counter()
        batches.close()  # stops the readers (waits for reads in flight)
        ds.close()
        stages["read"] += time.perf_counter() - t_stop
        # h2d is measured inside the encoder call: move it out of "encode"
        h2d = tile_encoder.h2d_seconds - h2d_before
        stages["h2d"] += h2d
        stages["encode"] -= h2d

    t3 = time.perf_counter()
    if draw:
        save_thumbnail(
            thumb_path,
            grid,
            f"{spec.slide_id}: {len(grid)} tiles of {tile_size} px at {tile_mpp:g} "
            f"µm/px, {grid.tissue_area_mm2:.1f} mm² tissue",
        )
        if overlays:
            save_pruned_overlays(
                thumb_dir / f"{spec.slide_id}_pruned.png",
                overlays,
                encoder.patch_size,
                f"{spec.slide_id}: pruned patches (red) of the first {len(overlays)} tiles",
            )
    stages["thumbnails"] += time.perf_counter() - t3
    return {
        "slide": spec.slide_id,
        "tiles": writer.n,
        "failed_tiles": failed,
        "tissue_mm2": grid.tissue_area_mm2,
        "patches_reused": prepared.reused,
    }


def update_timings(job_dir: Path, rows: list[dict]) -> None:
    """Merge per-slide rows into ``job_dir/timings.csv`` (atomic rewrite under a lock; a re-embedded slide's row is
    replaced)."""
    if not rows:
        return
    path = job_dir / "timings.csv"
    with exclusive_lock(job_dir / ".timings.csv.lock", "another worker writing timings.csv", poll_s=0.05):
        old = pd.read_csv(path, dtype={"slide": str}) if path.exists() else pd.DataFrame(columns=TIMING_COLUMNS)
        new_ids = {r["slide"] for r in rows}
        table = pd.concat([old[~old["slide"].isin(new_ids)], pd.DataFrame(rows, columns=TIMING_COLUMNS)],
                          ignore_index=True)  # fmt: skip
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)


def format_stages(stages: dict, wall: float, tiles: int, tissue_mm2: float) -> str:
    """The end-of-run table: seconds and share of the wall time per stage, then the overlapped work."""
    lines = [f"  {'stage':<14} {'seconds':>9} {'share':>7}"]
    for s in STAGES:
        lines.append(f"  {s:<14} {stages[s]:>9.2f} {stages[s] / wall if wall else 0:>7.1%}")
    lines.append(f"  {'wall':<14} {wall:>9.2f}")
    lines.append("  overlapped: " + ", ".join(f"{s} {stages[s]:.2f} s" for s in BACKGROUND))
    if wall:
        lines.append(f"  {tiles / wall:.2f} tiles/s, {tissue_mm2 / wall:.3f} tissue mm²/s end to end")
    return "\n".join(lines)

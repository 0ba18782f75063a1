"""The slide job runner: list → lock → skip finished → prepare → stream tiles → tile function → sink → ledger.

Many workers can share one ``job_dir`` (DDP ranks, parallel jobs, a SLURM array): slides are pre-assigned
round-robin by rank, and every slide is processed under ``<output>.lock`` taken with
:func:`~hirespath.utils.io.try_lock` (create-exclusive, stale locks of dead processes taken over), so no slide is
processed twice; a worker that finishes its share takes the others' unlocked unfinished slides. A rerun skips
finished slides after checking that they were made with the same settings (the output folder's identity, and each
slide's mpp). Slides that cannot be used (unreadable, no mpp, no tissue) go to the folder's ``skipped.csv`` and the
run goes on; a run in which no slide could be processed at all raises :class:`NothingProcessed`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils.cpu_memory import keep_freed_memory, release_freed_memory
from ..utils.errors import InputError
from ..utils.io import (
    HEARTBEAT_MISSES,
    HEARTBEAT_S,
    lock_is_stale,
    out_of_storage,
    remove_temporaries,
    storage_errors,
    try_lock,
)
from ..utils.threads import AdaptiveThreads, available_cores, torch_threads
from ..utils.timing import startup_seconds
from ..wsi import trident_h5
from ..wsi.listing import SlideSpec, as_specs
from ..wsi.reader import SlideError
from ..wsi.tile_readers import READERS, SlideTileDataset, tile_batches
from ..wsi.tissue import check_tissue_threshold
from .ledger import TIMING_COLUMNS, TIMINGS, Ledger, slide_lock, tile_reason, whole_slide_rows
from .leftovers import release_finished_leftovers, remove_old_temporaries
from .prepare import PreparedSlide, cover_tissue, prepare_slide, tissue_threshold
from .provenance import check_finished_mpp, is_newer, output_ns, recorded_path, replaced_slides, utf8_path
from .stages import BACKGROUND, STAGES, format_stages, zero_stages
from .write_behind import WriteBehind, closing_result

log = logging.getLogger("hirespath.slides")

# a full disk fails every slide after it, so the run stops with this advice instead of skipping them all
RESUME = (
    "Make room (or pass a job_dir with room) and run again: the slides finished so far are kept and the rerun "
    "goes on with the rest"
)

# Lightning precision names → the runner's (weights stay fp32 under autocast; "bf16"/"fp16" would cast them)
LIGHTNING_PRECISION = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16-mixed", "16-mixed": "fp16-mixed",
                       "bf16-true": "bf16", "16-true": "fp16", "64-true": "fp32"}  # fmt: skip


class NothingProcessed(InputError):
    """Every slide of the run failed: a run-wide cause (a bad option, no mpp anywhere), so the run must fail."""


@dataclass
class Runtime:
    """Where the work runs: device, precision, this worker's rank, progress bars."""

    device: torch.device | str | None = None  # None: CUDA when available
    precision: str = "auto"  # auto | fp32 | bf16-mixed | fp16-mixed | bf16 | fp16 (see tile_model)
    rank: int | None = None  # None: torch.distributed, else $RANK, else 0
    world_size: int | None = None
    progress: bool = True
    skip_errors: bool = True  # False: raise unexpected per-slide errors instead of listing them (debugging)
    # a task's run: the process's age when the runner starts (imports, model build, weights) is the stage
    # "startup", so the stage table adds up to what the user waited (not for library calls inside a longer process)
    count_startup: bool = False
    # an id the workers of one launch share (DDP ranks, SLURM array tasks, a multirun's jobs: slides.launch.launch_id)
    # so that an overwrite they all run replaces each slide once, whenever each starts; None: this process alone
    launch: str | None = None

    @classmethod
    def from_trainer(cls, trainer, **kwargs) -> Runtime:
        """From a Lightning trainer config (``accelerator``, ``precision``): gpu/cuda → CUDA, cpu → CPU, auto → CUDA
        when available; Lightning's precision names mapped to the runner's."""
        precision = str(trainer.get("precision", "32-true"))
        if precision not in LIGHTNING_PRECISION:
            raise InputError(f"trainer.precision={precision!r} is not supported for slide work; use one of "
                             f"{', '.join(sorted(LIGHTNING_PRECISION))}")  # fmt: skip
        accelerator = str(trainer.get("accelerator", "auto"))
        device = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(accelerator)
        return cls(device=device, precision=LIGHTNING_PRECISION[precision], **kwargs)

    def resolve(self) -> Runtime:
        device = torch.device(self.device) if self.device is not None else None
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            keep_freed_memory()  # large tiles' activations: no page faults per tensor (utils/cpu_memory.py)
        rank, world = _rank_world(self.rank, self.world_size)
        return replace(self, device=device, rank=rank, world_size=world)


@dataclass
class SlideJob:
    """What every slide task shares: the job folder, the tiling, the tile readers and the locks."""

    job_dir: Path
    tiling: Any  # size, mpp, overlap, min_tissue[, cover_tissue, tissue_threshold] (configs.TilingConfig or alike)
    default_mpp: float | None = None  # µm/px for slides whose metadata has none
    batch_size: int = 4
    num_workers: int | None = None  # tile readers running while the tile function works; None: default_readers
    reader: str = "threads"  # threads | workers
    threads: int | None = None  # CPU intra-op threads; None: the cores the readers leave (utils/threads.py)
    lock_stale_s: float = 24 * 3600
    mask_max_side: int = 2048
    overwrite: bool = False  # replace outputs made with other settings instead of refusing
    write_behind: bool | None = None  # sink.add and slide closing in background threads; None: on CUDA only

    # identity keys added since output folders were first made, as every output made before had them
    IMPLIED: ClassVar[dict] = {"tissue_threshold": None}
    # identity keys no output depends on while a folder holds null: a slide without an mpp was skipped, so the
    # default_mpp its skip reason advises joins a finished folder
    UNUSED_WHILE_NULL: ClassVar[tuple] = ("default_mpp",)
    # how a user of a slide task replaces outputs made with other settings (named in the refusal)
    OVERWRITE: ClassVar[str] = "embed.overwrite=true"

    @classmethod
    def from_settings(cls, job_dir, tiling, embed, default_mpp: float | None = None) -> SlideJob:
        """The job from the tasks' ``tile`` and ``embed`` nodes (``hirespath.configs.TilingConfig``/``EmbedConfig``
        or any objects with their fields: the readers, batch, threads, locks and overwrite every slide task shares)."""
        return cls(
            job_dir=Path(job_dir), tiling=tiling, default_mpp=default_mpp, batch_size=int(embed.batch_size),
            num_workers=None if embed.num_workers is None else int(embed.num_workers), reader=str(embed.reader),
            threads=None if embed.threads is None else int(embed.threads),
            lock_stale_s=float(embed.lock_stale_hours) * 3600, overwrite=bool(getattr(embed, "overwrite", False)),
            write_behind=getattr(embed, "write_behind", None),
        )  # fmt: skip

    @property
    def tiling_tag(self) -> str:
        return trident_h5.tiling_tag(float(self.tiling.mpp), int(self.tiling.size), int(self.tiling.overlap))

    @property
    def tiling_dir(self) -> Path:
        return Path(self.job_dir) / self.tiling_tag

    def identity(self) -> dict:
        """What decides which tiles a slide gets (part of every output folder's identity)."""
        from ..wsi.reader import LEVEL_TOLERANCE  # which pyramid level a tile is read from (then resized)

        t = self.tiling
        return {"tiling": self.tiling_tag, "tile_size": int(t.size), "tile_mpp": float(t.mpp),
                "overlap": int(t.overlap), "min_tissue": float(t.min_tissue),
                "cover_tissue": cover_tissue(t), "tissue_threshold": tissue_threshold(t),
                "default_mpp": self.default_mpp,
                "mask_max_side": int(self.mask_max_side), "level_tolerance": LEVEL_TOLERANCE}  # fmt: skip


class SlideSink(Protocol):
    """One slide's output, written as tiles arrive; it appears on disk only when closed (atomically)."""

    def add(self, tiles: np.ndarray, output: Any, images: torch.Tensor) -> list[tuple[int, str]]:
        """Write the tile function's ``output`` for the grid tiles ``tiles`` (``images`` are their uint8 pixels);
        return (tile, reason) for tiles refused (e.g. non-finite features)."""

    # optional: ``takes_tiles = False``: the sink draws its output again from what an earlier run stored (no tile is
    # read, the tile function does not run)

    def close(self) -> dict:
        """Finish the file (atomic rename); returns per-slide facts for the summary (``tiles`` written; optional
        ``encode_seconds``: tile-function work done on closing, timed as encode rather than write;
        ``picture_seconds``: pictures drawn before the file appears, timed as thumbnails; ``redrawn``:
        drawn again from stored outputs, so the timing row of the run that made them is kept)."""

    def abort(self) -> None: ...


class SlideConsumer(Protocol):
    """A slide task: what runs on the tiles and what is written (embedding: ``embeddings.features``; segmentation:
    ``segmentation.consumer``)."""

    folder: str  # output folder name under <job_dir>/<tiling tag>/ (features_<tag>, segmentation_<tag>)
    identity: dict  # what the outputs depend on beyond the tiling (encoder, weights, features, ...)
    overwrite_hint: str  # the option that replaces outputs made with other settings (named in the refusal)
    tile_function: Callable[[torch.Tensor], list[tuple[np.ndarray, Any]]]  # e.g. a TileModel
    needs_thumbnail: bool  # the grid keeps the slide's thumbnail and tissue mask (for pictures)

    def output_path(self, out_dir: Path, spec: SlideSpec) -> Path: ...

    def is_finished(self, path: Path) -> bool: ...

    def finished_mpp(self, path: Path) -> float | None:
        """The level-0 mpp a finished output was made with (checked against an explicit ``mpp`` of the slide)."""

    def open(self, spec: SlideSpec, prepared: PreparedSlide, path: Path) -> SlideSink: ...

    def finish(self, spec: SlideSpec, prepared: PreparedSlide, result: dict, out_dir: Path) -> None:
        """After the slide's output is closed: pictures (timed as ``thumbnails``)."""

    # Optional, each read by run_slides where it is used (getattr):
    # - ``check_folder(out_dir)``: refuse a folder another tool wrote, before config.json vouches for its files;
    # - ``unvouched_keys``: identity keys an older config.json lacks whose outputs may have been made otherwise
    #   (left unrecorded there, with a warning: Ledger.check_identity);
    # - ``redraw_keys`` (identity keys that only change what is drawn from the stored outputs), ``redraw`` (their
    #   change is allowed: finished slides are drawn again) and ``redraw_hint`` (the option that allows it);
    # - ``outputs_since``: set by the runner (Ledger.outputs_since) for a consumer that reuses parts of unfinished
    #   outputs (segmentation's finished map) only when newer than an overwrite's mark;
    # - ``made_from(path) -> dict | None``: the ``slide_bytes``/``slide_path`` an output records (provenance);
    # - ``files_of(out_dir, spec) -> list[Path]``: the other files it writes for a slide (pictures), and ``tables``:
    #   the ledger tables it writes besides timings.csv (areas.csv), so that a kill's temporaries are removed;
    # - ``run_facts(done: list[dict]) -> dict``: this worker's facts over its slides' results for the summary.
    # The tile function may count ``h2d_seconds`` (TileModel), moved from the stage encode to h2d.


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


def check_job(job: SlideJob) -> None:
    """The run-wide options, once, before any slide is opened."""
    # a bad threshold would fail each slide's tile_grid, naming the slide, not the option (the other tiling values
    # are taken as int()/float() of what is given)
    check_tissue_threshold(getattr(job.tiling, "tissue_threshold", None))
    if not (isinstance(job.batch_size, int) and job.batch_size >= 1):
        raise InputError(f"batch_size must be a positive integer, got {job.batch_size!r}")
    if job.num_workers is not None and not (isinstance(job.num_workers, int) and job.num_workers >= 0):
        raise InputError(
            f"num_workers must be an integer >= 0 (0: read in this thread) or null (automatic), got {job.num_workers!r}"
        )
    if job.reader not in READERS:
        raise InputError(f"reader must be one of {', '.join(READERS)}, got {job.reader!r}")
    if job.threads is not None and not (isinstance(job.threads, int) and job.threads >= 1):
        raise InputError(f"threads must be a positive integer or null (automatic), got {job.threads!r}")
    if job.write_behind not in (None, True, False):
        raise InputError(f"write_behind must be true, false or null (on CUDA only), got {job.write_behind!r}")
    job_dir = Path(job.job_dir)
    if job_dir.exists() and not job_dir.is_dir():
        raise InputError(f"job_dir {str(job_dir)!r} is a file; pass a folder (it is created when missing)")
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"job_dir {str(job_dir)!r} cannot be created: {err.strerror or err}") from err


def _order(specs: list[SlideSpec], rank: int, world_size: int) -> list[SlideSpec]:
    """Own share first (round-robin by rank), then the others' in an order that differs by rank."""
    mine = specs[rank::world_size]
    others = [s for i, s in enumerate(specs) if i % world_size != rank]
    k = rank * len(others) // world_size
    return mine + others[k:] + others[:k]


@contextlib.contextmanager
def _memory_returned_at_the_end():
    """The CPU memory kept for reuse during the run (``keep_freed_memory``) goes back to the OS when it ends."""
    try:
        yield
    finally:
        release_freed_memory()


def run_slides(
    slides, job: SlideJob, consumer: SlideConsumer, runtime: Runtime | None = None, notes: dict | None = None
) -> dict:
    """Run ``consumer`` over every tissue tile of ``slides``; returns this worker's summary (also merged into the
    output folder's ``summary.json``). ``notes``: facts of the run for the summary (e.g. ``random_weights``)."""
    t_start = time.perf_counter()
    runtime = (runtime or Runtime()).resolve()
    rank, world_size, device = runtime.rank, runtime.world_size, runtime.device
    check_job(job)
    if job.num_workers is None:
        job = replace(job, num_workers=default_readers(device))
    specs = as_specs(slides)
    out_dir = job.tiling_dir / consumer.folder
    if (check_folder := getattr(consumer, "check_folder", None)) and not job.overwrite:
        check_folder(out_dir)  # optional: outputs another tool left in the folder (before the ledger vouches)
    ledger = Ledger(out_dir)
    since = ledger.check_identity({**job.identity(), **consumer.identity}, overwrite=job.overwrite,
                          how=consumer.overwrite_hint, redrawable=tuple(getattr(consumer, "redraw_keys", ())),
                          redraw=bool(getattr(consumer, "redraw", False)),
                          redraw_hint=getattr(consumer, "redraw_hint", ""), launch=runtime.launch,
                          unvouched=tuple(getattr(consumer, "unvouched_keys", ())),
                          slides=[s.slide_id for s in specs], implied=SlideJob.IMPLIED,
                          unused_while_null=SlideJob.UNUSED_WHILE_NULL)  # fmt: skip
    order = _order(specs, rank, world_size)
    outputs = {s.slide_id: consumer.output_path(out_dir, s) for s in specs}
    files_of = getattr(consumer, "files_of", lambda out_dir, spec: [])
    if hasattr(consumer, "outputs_since"):  # it reuses parts of unfinished outputs (a finished map) only if newer
        consumer.outputs_since = since

    def output_of(slide: str) -> Path:  # a listed slide's, or another the folder holds (the totals)
        return outputs.get(slide) or consumer.output_path(out_dir, SlideSpec(slide, out_dir / slide))

    def finished(slide: str) -> bool:
        """Finished, and not before the folder's last overwrite started (with ``overwrite`` this run's own start:
        parallel workers of one overwrite run each replace the old outputs, not one another's new ones)."""
        out, t = output_of(slide), since.of(slide)
        return consumer.is_finished(out) and (t is None or is_newer(out, t))  # one stat less per slide

    # rescans under the same name: done again, and what is left of their outputs (a map to redraw) not reused;
    # another folder's slide under a finished one's id: refused (an overwrite replaces whatever it lists)
    made = getattr(consumer, "made_from", None)  # optional: the slide file its outputs record
    replaced, clashes, moved = replaced_slides(order, ledger, consumer.overwrite_hint, finished,
                                                (lambda slide: made(output_of(slide))) if made else None,
                                                lambda slide: output_ns(output_of(slide)))  # fmt: skip
    if moved:  # copied without their times (cp -r), or drawn again: read once, not at every start
        ledger.set_values(TIMINGS, "output_ns", moved)
    if job.overwrite:
        clashes = {}
    if replaced:
        since = ledger.replace_slides([s.slide_id for s in replaced], runtime.launch)
        if hasattr(consumer, "outputs_since"):
            consumer.outputs_since = since
    finished_before = [s for s in order if s.slide_id not in clashes and finished(s.slide_id)]
    for s in finished_before:
        check_finished_mpp(consumer, outputs[s.slide_id], s, consumer.overwrite_hint)
    if finished_before:
        log.info("skipping %d finished slides of %d in %s", len(finished_before), len(specs), out_dir)
        ledger.forget_slide_failures([s.slide_id for s in finished_before])
    release_finished_leftovers(finished_before, outputs, files_of, job.lock_stale_s)
    remove_old_temporaries(job.tiling_dir)
    done_ids = {s.slide_id for s in finished_before}
    found_finished = [s.slide_id for s in finished_before]  # for merge_summaries; not kept in summary.json
    host = socket.gethostname()
    summary = {
        "job_dir": str(job.job_dir), "tiling": job.tiling_tag, "output_dir": str(out_dir), "rank": rank,
        "world_size": world_size, "host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "worker": f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        "slides_total": len(specs), "slides_already_finished": len(finished_before), "slides_done": 0,
        "slides_redrawn": 0, "slides_skipped": 0, "slides_locked_by_others": 0, "slides_failed_by_others": 0,
        "tiles": 0, "tiles_skipped": 0, "tissue_mm2": 0.0,
        "device": str(device), "reader": job.reader, "num_workers": job.num_workers, "done": [], "skipped": [],
        "held": [], "failed_by_others": [],
        "warnings": {}, **(notes or {}),
    }  # fmt: skip
    totals = zero_stages()
    if runtime.count_startup:
        totals["startup"] = max(0.0, startup_seconds() - (time.perf_counter() - t_start))
    todo = [s for s in order if s.slide_id not in done_ids]

    def prepare(s: SlideSpec) -> PreparedSlide:
        return prepare_slide(s, job.tiling, tiling_dir=job.tiling_dir, default_mpp=job.default_mpp,
                             need_thumbnail=consumer.needs_thumbnail, mask_max_side=job.mask_max_side,
                             stored_since=since.of(s.slide_id))  # fmt: skip

    # readers busy beside the tile function take cores from it (on CPU): start from the cores they leave, then
    # follow how busy they really are (utils/threads.py); readers in this thread (num_workers=0) take none
    policy = AdaptiveThreads(job.threads, job.num_workers) if device.type == "cpu" else None
    bar = tqdm(todo, desc=f"slides (rank {rank})" if world_size > 1 else "slides", disable=not runtime.progress,
               unit="slide")  # fmt: skip
    with (
        storage_errors(out_dir, RESUME),  # a full disk (settle re-raises it) stops the run with one error
        _memory_returned_at_the_end(),
        ThreadPoolExecutor(1, thread_name_prefix="slide-prepare") as prep_pool,
        torch_threads(policy.n, f"{job.num_workers} tile reader {job.reader}") if policy else contextlib.nullcontext(),
    ):
        futures: dict[str, Future] = {}

        def prefetch(k: int) -> None:  # the next slide's tissue grid while this one runs
            if k < len(todo) and todo[k].slide_id not in futures and todo[k].slide_id not in clashes:
                if ledger.failed_in_launch(todo[k].slide_id, runtime.launch) is None:  # else not opened again
                    futures[todo[k].slide_id] = prep_pool.submit(prepare, todo[k])

        prefetch(0)
        totals["setup"] = time.perf_counter() - t_start  # folder checks, the finished-slides scan, thread policy
        # write_behind: a slide's closing (its sink's close and the consumer's finish) runs in this thread while
        # the next slide streams; its lock is held until its bookkeeping is done here
        closer = ThreadPoolExecutor(1, thread_name_prefix="slide-close") if _write_behind(job, device) else None
        pending: list[tuple] = []  # (spec, lock, t_slide, stages, future) of the slide closing in the background

        def settle(spec: SlideSpec, lock, t_slide: float, stages: dict, work: Callable[[], dict]) -> None:
            """``work()`` (the slide's run, or the wait for its closing) and the slide's bookkeeping, here."""
            timing_row = None
            try:
                result = work()
                t0 = time.perf_counter()
                summary["slides_done"] += 1
                summary["slides_redrawn"] += bool(result.get("redrawn"))
                summary["tiles"] += result["tiles"]
                summary["tiles_skipped"] += len(result["failed_tiles"])
                summary["tissue_mm2"] += result["tissue_mm2"] if np.isfinite(result["tissue_mm2"]) else 0.0
                ledger.update_skipped([_skip_row(spec, r, runtime.launch) for r in result["failed_tiles"]],
                                      done=[spec.slide_id])  # fmt: skip
                stages["bookkeeping"] += time.perf_counter() - t0
                # the time this thread spent on the slide (a closing behind the next slide is not counted twice)
                seconds = time.perf_counter() - t_slide if closer is None else sum(stages[s] for s in STAGES)
                result.update(seconds=seconds, stage_seconds=dict(stages))
                summary["done"].append(result)
                timing_row = None if result.get("redrawn") else {
                    "slide": spec.slide_id, "rank": rank, "host": host, "tiles": result["tiles"],
                    "tissue_mm2": result["tissue_mm2"], "seconds": seconds,
                    **{f"{s}_s": stages[s] for s in STAGES + BACKGROUND},
                    "tiles_per_s": result["tiles"] / seconds, "mm2_per_s": result["tissue_mm2"] / seconds,
                    "reader": job.reader, "num_workers": job.num_workers,
                    "threads": policy.n if policy else torch.get_num_threads(), "slide_bytes": result["slide_bytes"],
                    "slide_path": result["slide_path"], "output_ns": output_ns(outputs[spec.slide_id]),
                }  # fmt: skip
            except Exception as err:  # noqa: BLE001 — one bad slide must not stop a run over thousands
                if out_of_storage(err):  # but a full disk fails every slide after it: storage_errors stops the run
                    raise
                if not isinstance(err, SlideError):
                    if not runtime.skip_errors:
                        raise
                    log.exception("%s: unexpected error", spec.path)
                t0 = time.perf_counter()
                reason = str(err) if isinstance(err, SlideError) else f"{type(err).__name__}: {err}"
                log.warning("skipping %s: %s", spec.slide_id, reason)
                summary["slides_skipped"] += 1
                summary["skipped"].append({"slide": spec.slide_id, "reason": reason})
                ledger.update_skipped([_skip_row(spec, reason, runtime.launch)])
                stages["bookkeeping"] += time.perf_counter() - t0
            finally:
                t0 = time.perf_counter()
                try:
                    if timing_row is not None:
                        ledger.update_timings([timing_row], TIMING_COLUMNS)
                finally:
                    lock.release()  # a slide left locked after a failed row would be locked for good
                stages["bookkeeping"] += time.perf_counter() - t0
                for s in totals:
                    if s != "startup":
                        totals[s] += stages[s]

        def settle_pending() -> None:
            if not pending:
                return
            spec, lock, t_slide, stages, future = pending.pop()

            def wait() -> dict:
                t0 = time.perf_counter()
                try:
                    result, background = closing_result(future)
                finally:
                    stages["write"] += time.perf_counter() - t0  # what this thread waited for the closing
                stages["write_behind"] += sum(background[s] for s in STAGES)
                return result

            settle(spec, lock, t_slide, stages, wait)

        def stream(k: int, spec: SlideSpec, out: Path, stages: dict) -> Callable[[dict], dict]:
            future = futures.pop(spec.slide_id, None) or prep_pool.submit(prepare, spec)
            prefetch(k + 1)
            t0 = time.perf_counter()
            prepared = future.result()
            stages["prepare"] += time.perf_counter() - t0
            stages["open"], stages["tissue"] = prepared.open_s, prepared.tissue_s
            for w in prepared.warnings:
                summary["warnings"].setdefault(w.split(":")[0], []).append(spec.slide_id)
            return _stream_slide(spec, prepared, out, out_dir, job, consumer, device, stages, runtime, policy)

        try:
            for k, spec in enumerate(bar):
                t_slide = time.perf_counter()
                stages = zero_stages()
                out = outputs[spec.slide_id]
                lock_path = slide_lock(out)
                lock = try_lock(lock_path, stale_s=job.lock_stale_s)
                if lock is not None:  # a run with other settings took an output-less folder over (check_identity)
                    try:
                        ledger.check_settings_unchanged()
                    except BaseException:
                        lock.release()
                        raise
                # a clash's outputs are the other slide's: refused by the worker that locks it (counted once)
                done_by_another = lock is not None and spec.slide_id not in clashes and finished(spec.slide_id)
                failed = (
                    None if lock is None or done_by_another else ledger.failed_in_launch(spec.slide_id, runtime.launch)
                )
                if lock is not None and not done_by_another and failed is None:
                    if why := clashes.get(spec.slide_id):
                        settle(spec, lock, t_slide, stages, functools.partial(_reraise, SlideError(why)))
                        prefetch(k + 1)
                        continue
                    remove_temporaries([out, *files_of(out_dir, spec)])
                stages["bookkeeping"] += time.perf_counter() - t_slide
                if lock is None or done_by_another or failed is not None:
                    if lock is None:
                        summary["slides_locked_by_others"] += 1
                        summary["held"].append({"slide": spec.slide_id, "lock": str(lock_path),
                                                "by": lock_is_stale(lock_path, job.lock_stale_s)[1]})  # fmt: skip
                    elif failed is not None:
                        summary["slides_failed_by_others"] += 1
                        summary["failed_by_others"].append({"slide": spec.slide_id, "reason": failed["reason"],
                                                            "host": failed["host"]})  # fmt: skip
                        log.info("not trying %s: a worker of this launch on %s failed it (%s); the next launch tries "
                                 "it again", spec.slide_id, failed["host"] or "?", failed["reason"])  # fmt: skip
                    else:
                        summary["slides_already_finished"] += 1
                        found_finished.append(spec.slide_id)
                    futures.pop(spec.slide_id, None)
                    prefetch(k + 1)
                    if lock is not None:
                        lock.release()
                    totals["bookkeeping"] += time.perf_counter() - t_slide
                    continue
                bar.set_postfix_str(spec.slide_id)
                try:
                    closing = stream(k, spec, out, stages)
                except BaseException as err:  # noqa: BLE001 — settled (skipped or raised) like any failed slide
                    settle(spec, lock, t_slide, stages, functools.partial(_reraise, err))
                    continue
                if closer is None:
                    settle(spec, lock, t_slide, stages, functools.partial(closing, stages))
                    continue
                try:
                    settle_pending()  # the previous slide closed while this one streamed
                except BaseException:
                    closing.abort()  # this one is not queued yet: its files and lock are ours to clear
                    lock.release()
                    raise

                def close_behind(closing=closing) -> tuple[dict, dict]:
                    background = zero_stages()
                    return closing(background), background

                pending.append((spec, lock, t_slide, stages, closer.submit(close_behind)))
        finally:
            try:
                settle_pending()
            finally:
                if closer is not None:
                    closer.shutdown(wait=True)
        bar.close()

    ledger.update_skipped([])  # the file exists (header only) even when nothing was skipped
    seconds = time.perf_counter() - t_start + totals["startup"]
    summary.update(
        seconds=seconds,
        stage_seconds=totals,
        untracked_seconds=seconds - sum(totals[s] for s in STAGES),
        threads=policy.chosen if policy else [torch.get_num_threads()],
        tiles_per_second=summary["tiles"] / seconds if seconds else None,
        tissue_mm2_per_second=summary["tissue_mm2"] / seconds if seconds else None,
    )
    if run_facts := getattr(consumer, "run_facts", None):  # optional: what the consumer sums up over its slides
        summary.update(run_facts(summary["done"]))
    finished_listed = {s.slide_id for s in specs if finished(s.slide_id)}

    def folder_totals() -> dict:
        """The folder's totals, counted under summary.json's lock (the last worker to write them has seen every
        other's rows): this run's slides, and every earlier run's still there (a subset run, array tasks given their
        own lists): those timings.csv names whose output is on disk, and those skipped.csv names whose file is."""
        skipped = ledger.skipped()
        failed = skipped[whole_slide_rows(skipped)]
        failed = {s for s, p in zip(failed.slide, failed.path) if s in outputs or (p and recorded_path(p).exists())}
        # one whose output was deleted (dropped from the cohort) has left the folder
        made = {s for s in set(ledger.timings().slide.astype(str)) - set(outputs) if output_of(s).exists()}
        others = (made | failed) - set(outputs)
        on_disk = finished_listed | {slide for slide in others if finished(slide)}
        return {"output_dir": str(out_dir), "slides_total": len(specs) + len(others), "slides_finished": len(on_disk),
                "slides_skipped": len(failed - on_disk), **consumer.identity}  # fmt: skip

    ledger.sweep([TIMINGS, *getattr(consumer, "tables", ())])  # other runs' leftovers, where this one wrote no row
    ledger.update_summary(summary, folder_totals)
    summary["slides_finished_on_disk"] = len(finished_listed)
    summary["found_finished"] = found_finished
    redrawn = f"{n} drawn again from their stored outputs, " if (n := summary["slides_redrawn"]) else ""
    log.info(
        "%d slides done (%s%d tiles, %.1f mm² tissue), %d skipped, %d already finished, %d held by other workers, "
        "%sin %.1f s → %s\n%s",
        summary["slides_done"], redrawn, summary["tiles"], summary["tissue_mm2"], summary["slides_skipped"],
        summary["slides_already_finished"], summary["slides_locked_by_others"],
        f"{n} failed by other workers of this launch, " if (n := summary["slides_failed_by_others"]) else "",
        seconds, out_dir,
        format_stages(totals, seconds, summary["tiles"], summary["tissue_mm2"]),
    )  # fmt: skip
    if held := summary["held"]:
        names = "; ".join(f"{h['slide']} ({h['by']})" for h in held[:10]) + (" …" if len(held) > 10 else "")
        log.info("held by other workers (a lock its holder stopped touching is taken over after %.0f min): %s",
                 min(job.lock_stale_s, HEARTBEAT_MISSES * HEARTBEAT_S) / 60, names)  # fmt: skip
    # a slide another worker of this launch failed counts as failed here too: an array task whose slides all
    # failed, some in other tasks, exits 1 like them (afterok dependencies)
    failures = summary["skipped"] + summary["failed_by_others"]
    # only when no slide of the run is finished: another worker may have finished the rest while this one failed
    if failures and not (summary["slides_done"] or summary["slides_already_finished"]
                         or summary["slides_locked_by_others"]):  # fmt: skip
        reasons = sorted({s["reason"] for s in failures})
        by_others = f", {n} of them by other workers of this launch" if (n := len(summary["failed_by_others"])) else ""
        raise NothingProcessed(
            f"no slide could be processed: all {len(failures)} failed{by_others} (listed in "
            f"{out_dir / 'skipped.csv'}); first reason: {reasons[0]}"
        )
    return summary


def _skip_row(spec: SlideSpec, reason: str, launch: str | None) -> dict:
    return {"slide": spec.slide_id, "path": utf8_path(spec.path), "reason": reason, "launch": launch or ""}


def _reraise(err: BaseException):
    raise err


def default_readers(device: torch.device) -> int:
    """Tile readers when none are asked for. On CUDA every core but two (the main thread's kernel launches and
    the writer's), at most 16: a GPU encodes a 1,792 px tile faster than one thread reads it (on an H200, 8 readers
    still bound the run). The cores are shared with the other ranks on this node (torchrun's LOCAL_WORLD_SIZE). On
    CPU one: the encoder needs the cores (its threads follow how busy the readers are)."""
    if device.type != "cuda":
        return 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(16, max(1, available_cores() // local_ranks - 2))


def _write_behind(job: SlideJob, device: torch.device) -> bool:
    return job.write_behind if job.write_behind is not None else device.type == "cuda"


def _stream_slide(
    spec: SlideSpec,
    prepared: PreparedSlide,
    out: Path,
    out_dir: Path,
    job: SlideJob,
    consumer: SlideConsumer,
    device: torch.device,
    stages: dict,
    runtime: Runtime,
    policy: AdaptiveThreads | None,
) -> Callable[[dict], dict]:
    """Stream the prepared slide's tiles through the tile function into the consumer's sink; returns the slide's
    closing: ``close(stages)`` closes the sink, runs the consumer's finish and returns the result (its seconds go
    into ``stages``: this slide's, or a background account when it runs behind the next slide)."""
    grid, fn = prepared.grid, consumer.tile_function
    t_open = time.perf_counter()
    sink = consumer.open(spec, prepared, out)
    # a sink drawing its output again from an earlier run's stored output reads no tile: no readers, no writer
    takes_tiles = getattr(sink, "takes_tiles", True)
    coords = grid.coords if takes_tiles else grid.coords[:0]
    try:
        ds = SlideTileDataset(spec.path, coords, grid.patch_size_level0, int(job.tiling.size), level=grid.read_level)
        batches = tile_batches(ds, job.batch_size, reader=job.reader, num_workers=job.num_workers if takes_tiles else 0,
                               pin_memory=device.type == "cuda")  # fmt: skip
    except BaseException:
        sink.abort()
        raise
    failed: list[str] = []

    def refused(tile: int, why: str) -> None:
        x, y = grid.coords[tile]
        failed.append(tile_reason(int(tile), x, y, why))

    h2d_before = getattr(fn, "h2d_seconds", 0.0)
    writer = WriteBehind(sink) if takes_tiles and _write_behind(job, device) else None
    add = writer.add if writer else sink.add
    try:
        t_wait = time.perf_counter()
        stages["write"] += t_wait - t_open  # creating the file
        tiles_bar = tqdm(total=len(ds), desc=spec.slide_id, leave=False, disable=not runtime.progress, unit="tile")
        for batch in batches:
            t1 = time.perf_counter()
            stages["read"] += t1 - t_wait
            stages["reader_read"] += float(batch["read_s"].sum())
            stages["reader_resize"] += float(batch["resize_s"].sum())
            images, index = batch["image"], batch["index"].numpy()
            results = fn(images)
            t2 = time.perf_counter()
            stages["encode"] += t2 - t1
            for sub, output in results:
                tiles = index[sub]
                if output is None:
                    refused(tiles[0], "out of memory at batch size 1")
                    continue
                for t, why in add(tiles, output, images[sub]):
                    refused(t, why)
            stages["write"] += time.perf_counter() - t2  # with write_behind: the wait for the writer only
            tiles_bar.update(len(index))
            if policy is not None:
                policy.observe(float(batch["read_s"].sum() + batch["resize_s"].sum()), time.perf_counter() - t_wait)
            t_wait = time.perf_counter()
        tiles_bar.close()
        if writer is not None:
            t_drain = time.perf_counter()
            for t, why in writer.drain():
                refused(t, why)
            writer.stop()
            stages["write"] += time.perf_counter() - t_drain
            stages["write_behind"] += writer.seconds
        if failed:
            log.warning("%s: %d tiles not written (%s)", spec.slide_id, len(failed), failed[0])
    except BaseException:
        if writer is not None:
            writer.stop()  # no add may run while the sink removes its files
        sink.abort()
        raise
    finally:
        t_stop = time.perf_counter()
        batches.close()  # stops the readers (waits for reads in flight)
        ds.close()
        stages["read"] += time.perf_counter() - t_stop
        h2d = getattr(fn, "h2d_seconds", 0.0) - h2d_before  # measured inside the tile function: move it out
        stages["h2d"] += h2d
        stages["encode"] -= h2d

    def close(stages: dict) -> dict:
        t_close = time.perf_counter()
        try:
            info = sink.close()
        except BaseException as err:
            sink.abort()
            if failed and isinstance(err, SlideError):  # every tile refused: the slide's one row says why
                raise SlideError(f"{err}: {len(failed)} tiles refused, the first {failed[0]}") from err
            raise
        # the final flush and rename; tile-function work the sink did on closing (encode_seconds) is the model's,
        # pictures it drew before its file appeared (picture_seconds) are thumbnails
        extra, pictures = float(info.pop("encode_seconds", 0.0)), float(info.pop("picture_seconds", 0.0))
        stages["write"] += time.perf_counter() - t_close - extra - pictures
        stages["encode"] += extra
        stages["thumbnails"] += pictures
        result = {"slide": spec.slide_id, "failed_tiles": failed, "tissue_mm2": grid.tissue_area_mm2,
                  "patches_reused": prepared.reused, "slide_bytes": prepared.slide_bytes,
                  "slide_path": prepared.slide_path, **info}  # fmt: skip
        t3 = time.perf_counter()
        consumer.finish(spec, prepared, result, out_dir)
        stages["thumbnails"] += time.perf_counter() - t3
        return result

    close.abort = sink.abort  # a slide streamed but never closed (the run stopped before its closing)
    return close

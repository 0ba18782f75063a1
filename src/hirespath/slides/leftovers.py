"""What stopped writers left behind: temporaries (``.<name>.<8 chars>.tmp``) and locks of runs killed mid-write.

A slide's own temporaries are removed by its lock holder (the runner, under ``<output>.lock``). What is left outside
a slide run is removed here: a finished slide's lock and temporaries left by a worker stopped after its output
appeared, and the temporaries in the tiling's shared folders, which every consumer of the tiling writes without a
slide's lock. The ledger's tables sweep their own (:meth:`~hirespath.slides.ledger.Ledger.sweep`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..utils.io import TEMPORARY, remove_temporaries, try_lock
from ..wsi.listing import SlideSpec
from ..wsi.trident_h5 import PATCHES, PATCHES_COVER_TISSUE, THUMBNAILS
from .ledger import file_system_now, slide_lock

log = logging.getLogger("hirespath.slides")


# the tiling's folders every consumer of it writes without a slide's lock (patches files, thumbnails); a temporary
# there is a stopped writer's when untouched this long (those files take seconds to write)
SHARED_FOLDERS = (PATCHES, PATCHES_COVER_TISSUE, THUMBNAILS)
SHARED_TEMPORARY_S = 3600.0


def remove_old_temporaries(tiling_dir: Path) -> None:
    """The temporaries in the tiling's shared folders (:data:`SHARED_FOLDERS`) untouched for
    :data:`SHARED_TEMPORARY_S`: their writers stopped (a kill, or the prefetch of a slide the run never reached)."""
    for folder in SHARED_FOLDERS:
        try:
            names = [n for n in os.listdir(tiling_dir / folder) if TEMPORARY.fullmatch(n)]
        except FileNotFoundError:
            continue
        if not names:
            continue
        try:  # the file server's clock, as the temporaries' times (a worker's clock an hour ahead took live ones)
            now_ns = file_system_now(tiling_dir / folder)
        except OSError:  # a folder this worker cannot write to: not its to sweep
            continue
        for name in names:
            tmp = tiling_dir / folder / name
            try:
                if now_ns - tmp.stat().st_mtime_ns < SHARED_TEMPORARY_S * 1e9:
                    continue
            except FileNotFoundError:
                continue
            log.info("removing %s, left by a writer that stopped", tmp)
            tmp.unlink(missing_ok=True)


def release_finished_leftovers(finished: list[SlideSpec], outputs: dict[str, Path], files_of, stale_s: float):
    """A finished slide's lock and temporaries left by a worker stopped after its output appeared (before its
    bookkeeping): removed where the lock is stale (its holder is gone), as a slide run would."""
    listed: dict[Path, list[str]] = {}  # each folder listed once (hundreds of stale locks after a killed array)
    for spec in finished:
        out = outputs[spec.slide_id]
        lock_path = slide_lock(out)
        if lock_path.exists() and (lock := try_lock(lock_path, stale_s=stale_s)) is not None:
            try:
                if out.parent not in listed:
                    listed[out.parent] = os.listdir(out.parent)
                remove_temporaries([out, *files_of(out.parent, spec)], listed[out.parent])
            finally:
                lock.release()

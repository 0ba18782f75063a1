"""Where a Lightning run keeps its checkpoints: the best one its ``last.ckpt`` recorded (what ``ckpt=RUN`` means to
segment_slides and predict_slides), and the run folder; and a digest that tells two weight files apart."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from .errors import InputError

log = logging.getLogger("hirespath")
LAST = re.compile(r"last(-v\d+)?\.ckpt")  # Lightning's last.ckpt, and last-v1.ckpt, ... of later trainings


def best_from_last(last: Path) -> Path | None:
    """The best checkpoint Lightning's ModelCheckpoint recorded in ``last.ckpt``, looked up next to it (so a moved
    run folder still works); None when it records none, the file is not there, or ``last.ckpt`` cannot be read."""
    try:
        state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 — an unreadable last.ckpt: the caller falls back (and reports when loading)
        return None
    for key, value in (state.get("callbacks") or {}).items():
        if "ModelCheckpoint" in str(key) and isinstance(value, dict) and value.get("best_model_path"):
            candidate = last.parent / Path(value["best_model_path"]).name
            if candidate.is_file():
                return candidate
    return None


def last_checkpoint(folder: Path) -> Path | None:
    """The run's ``last.ckpt``, or None. A run folder trained in more than once keeps every training's files:
    Lightning names the later ones ``last-v1.ckpt``, ``last-v2.ckpt``, ... (and ``epoch_003-v1.ckpt``), so the last
    training's record is the newest of them, not ``last.ckpt`` (then a warning names the one taken)."""
    lasts = [p for p in Path(folder).glob("last*.ckpt") if LAST.fullmatch(p.name)]
    if not lasts:
        return None
    newest = max(lasts, key=lambda p: p.stat().st_mtime_ns)
    if len(lasts) > 1:
        log.warning("%s holds the checkpoints of %d trainings (%s): using the newest, %s", folder, len(lasts),
                    ", ".join(sorted(p.name for p in lasts)), newest.name)  # fmt: skip
    return newest


def best_checkpoint(path: Path, given: str) -> Path:
    """The checkpoint a run folder (or its ``checkpoints/`` folder) ``path`` stands for (``given``: what the user
    passed, for messages): the best one its newest ``last*.ckpt`` records; else its only checkpoint besides those;
    else that ``last*.ckpt``. InputError when it holds none, or several and no record of the best."""
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not found and path.is_dir():  # no checkpoint callback: Lightning's own RUN/<logger>/version_N/checkpoints/
        folders = sorted({p.parent for p in path.glob("*/version_*/checkpoints/*.ckpt")})
        if len(folders) > 1:
            raise InputError(f"ckpt={given!r}: checkpoints in {len(folders)} folders of {path} "
                             f"({', '.join(str(f.relative_to(path)) for f in folders)}); pass one of them")  # fmt: skip
        if folders:
            folder, found = folders[0], sorted(folders[0].glob("*.ckpt"))
    if not found:
        raise InputError(f"ckpt={given!r}: no *.ckpt in {folder}; pass a checkpoint file")
    last = last_checkpoint(folder)
    best = best_from_last(last) if last else None
    if best is not None:
        return best
    others = [p for p in found if not LAST.fullmatch(p.name)]
    if len(others) > 1:
        names = ", ".join(p.name for p in others)
        raise InputError(f"ckpt={given!r}: {len(others)} checkpoints in {folder} and no best recorded (no "
                         f"best_model_path in a last.ckpt); pass one of them: {names}")  # fmt: skip
    return others[0] if others else last


def run_dir_of(ckpt: Path) -> Path:
    """The run folder of ``RUN/checkpoints/X.ckpt``, of ``RUN/<logger>/version_N/checkpoints/X.ckpt`` (where
    Lightning keeps checkpoints without a checkpoint callback) when RUN holds the run's ``.hydra/config.yaml``, or of
    a checkpoint lying in RUN itself. A symlink: the run of the last link on its way to the file that lies in a run
    (a link to a checkpoint of run B kept elsewhere, or in run A's folder, is B's model, also when B's checkpoint is
    itself linked into B from scratch storage outside any run)."""
    hops, path = [Path(ckpt)], Path(ckpt)
    while path.is_symlink() and len(hops) < 40:  # one link at a time: resolve() would skip the runs on the way
        path = path.parent / os.readlink(path)
        path = path.parent.resolve() / path.name  # its folder as it is (no "x/.."), the name maybe a link again
        hops.append(path)
    for hop in reversed(hops[1:]):
        run = _run_dir_at(hop)
        if (run / ".hydra" / "config.yaml").is_file():
            return run
    return _run_dir_at(Path(ckpt))


def _run_dir_at(ckpt: Path) -> Path:
    folder = ckpt.parent
    if folder.name == "checkpoints" and folder.parent.name.startswith("version_"):
        run = folder.parents[2]
        if (run / ".hydra" / "config.yaml").is_file():
            return run
    return folder.parent if folder.name == "checkpoints" else folder


def file_digest(path: str | os.PathLike, samples: int = 1024, chunk: int = 16 << 10) -> str:
    """A hex digest of a weights file: BLAKE2b of its size and ``samples`` evenly spaced ``chunk``-byte pieces (the
    whole file when it is no larger than them). Two trainings of one architecture have files of one size whose bytes
    differ in every tensor they changed, and any tensor larger than 1/1024 of the file is sampled: this tells them
    apart (a retrained checkpoint saved under the old name, a fine-tuned copy of the weights), while a copy of the
    same file elsewhere gives the same digest. It reads 16 MB, not the whole multi-GB file."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        if size <= samples * chunk:
            h.update(f.read())
        else:
            for k in range(samples):
                f.seek((size - chunk) * k // (samples - 1))
                h.update(f.read(chunk))
    return h.hexdigest()

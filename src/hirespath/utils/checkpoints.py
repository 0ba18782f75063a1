"""Where a Lightning run keeps its checkpoints: the best one its ``last.ckpt`` recorded, and the run folder; and a
digest that tells two weight files apart."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


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


def run_dir_of(ckpt: Path) -> Path:
    """The run folder of ``RUN/checkpoints/X.ckpt`` (or of a checkpoint lying in RUN itself)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def file_digest(path: str | os.PathLike, samples: int = 16, chunk: int = 1 << 20) -> str:
    """A hex digest of a weights file: BLAKE2b of its size and ``samples`` evenly spaced ``chunk``-byte pieces (the
    whole file when it is no larger). Two trainings of one architecture have files of one size whose bytes differ
    everywhere, so this tells them apart (a retrained checkpoint saved under the old name), while a copy of the same
    file elsewhere gives the same digest; it reads 16 MB, not a multi-GB file."""
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

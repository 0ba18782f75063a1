"""Where a Lightning run keeps its checkpoints: the best one its ``last.ckpt`` recorded, and the run folder."""

from __future__ import annotations

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

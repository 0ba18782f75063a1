"""Weights & Biases in Hydra multiruns: names, groups, resolved config, images, and no leaked runs.

``conf/logger/wandb.yaml`` uses the resolvers registered here:
- ``${hp.wandb_name:${run_name}}``: the job's own command-line/sweep overrides (``resolution=448,head=knn``),
  or the fallback (the config's ``run_name``) when the job has none;
- ``${hp.wandb_group:}``: the experiment (``experiment_name`` or ``task_name``) plus the multirun id (the sweep
  directory's name), so every job of one ``-m`` launch lands in one W&B group.
W&B is offline unless ``WANDB_MODE=online`` (``hp.wandb_offline`` in utils/hydra.py); ``wandb sync DIR`` uploads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("hirespath")

# Left out of run names: where and how a job runs, and what every job of a grid shares (data and weights paths).
NAME_EXCLUDE = (
    "hydra",
    "logger",
    "paths",
    "trainer",
    "callbacks",
    "tags",
    "task_name",
    "experiment_name",
    "resume",
    "data.root",
    "backbone.weights",
)


def _hydra_cfg():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def job_overrides(exclude: Sequence[str] = NAME_EXCLUDE) -> list[str]:
    """This job's overrides (command line + its sweep values), minus those about where it runs."""
    hc = _hydra_cfg()
    if hc is None:
        return []
    out = []
    for item in hc.overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        if key not in exclude and key.split("/")[0].split(".")[0] not in exclude:
            out.append(item)
    return out


def run_name(fallback: str | None = None) -> str:
    name = ",".join(job_overrides())
    return name or (str(fallback) if fallback not in (None, "") else "run")


def multirun_id() -> str | None:
    """The sweep directory's name (e.g. ``2026-01-01_12-00-00``) in a multirun, else None."""
    from .hydra import multirun_dir

    sweep = multirun_dir()
    return Path(sweep).name if sweep else None


def group_name(*, _root_: DictConfig | None = None) -> str:
    experiment = None
    if _root_ is not None:
        experiment = OmegaConf.select(_root_, "experiment_name", default=None) or OmegaConf.select(
            _root_, "task_name", default=None
        )
    experiment = experiment or "hirespath"
    mid = multirun_id()
    return f"{experiment}-{mid}" if mid else str(experiment)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("hp.wandb_name"):
        OmegaConf.register_new_resolver("hp.wandb_name", lambda fallback=None: run_name(fallback))
    if not OmegaConf.has_resolver("hp.wandb_group"):
        OmegaConf.register_new_resolver("hp.wandb_group", group_name)


register_resolvers()


def _wandb_loggers(loggers: Iterable[Any]) -> list[Any]:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [lg for lg in loggers or [] if isinstance(lg, WandbLogger)]


def log_config(loggers: Iterable[Any], cfg: DictConfig) -> None:
    """Log the resolved config (as the job ran it) to every logger."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # e.g. a ${hydra:...} interpolation outside a Hydra run
        log.warning("config not fully resolvable (%s); logging it unresolved", e)
        container = OmegaConf.to_container(cfg, resolve=False)
    for lg in loggers or []:
        lg.log_hyperparams(container)


def _as_image(item: Any):
    """A PNG path or an H×W(×C) array (uint8, or float in [0, 1]) → what wandb.Image accepts."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"log_images: image file {path} does not exist")
        return str(path)
    arr = np.asarray(item.detach().cpu() if hasattr(item, "detach") else item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # C×H×W → H×W×C
    if arr.ndim not in (2, 3):
        raise ValueError(f"log_images: expected an H×W or H×W×C image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return arr


def log_images(
    loggers: Iterable[Any],
    key: str,
    images: Sequence[Any],
    captions: Sequence[str] | None = None,
    step: int | None = None,
) -> int:
    """Log PNG paths or arrays under ``key`` to every W&B logger (others keep the PNG files). Returns #loggers."""
    targets = _wandb_loggers(loggers)
    if not targets or not images:
        return 0
    items = [_as_image(im) for im in images]
    if captions is None:
        captions = [
            Path(im).stem if isinstance(im, (str, os.PathLike)) else f"{key}/{i}" for i, im in enumerate(images)
        ]
    for lg in targets:
        lg.log_image(key=key, images=items, step=step, caption=list(captions))
    return len(targets)


def log_table(loggers: Iterable[Any], key: str, table) -> int:
    """Log a DataFrame as a W&B table under ``key`` to every W&B logger (others keep the CSV); returns #loggers."""
    targets = _wandb_loggers(loggers)
    for lg in targets:
        lg.log_table(key=key, dataframe=table)
    return len(targets)


def finish_runs(loggers: Iterable[Any] = (), exit_code: int = 0) -> None:
    """Finish the W&B run of this job (idempotent). A multirun job must end with no run left open."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    logs = []
    for lg in _wandb_loggers(loggers):
        run = getattr(lg, "_experiment", None)
        if run is not None:
            logs.append(_offline_log(run))
            run.finish(exit_code=exit_code)
    if wandb.run is not None:
        logs.append(_offline_log(wandb.run))
        wandb.finish(exit_code=exit_code)
    for log_path in filter(None, logs):
        _wait_for_exit_record(log_path)


def _offline_log(run) -> Path | None:
    """The transaction log of an offline run (None online or when the settings do not say)."""
    settings = getattr(run, "settings", None)
    if getattr(settings, "mode", None) not in ("offline", "dryrun"):
        return None
    path = getattr(settings, "sync_file", None)
    return Path(path) if path else None


def _wait_for_exit_record(path: Path, timeout_s: float = 30.0) -> None:
    """``finish`` can return before W&B's service has written the run's last records to an offline log: wait (at
    most ``timeout_s``) until its exit record is on disk, so that what reads the run next (``hirespath report``, a
    sync) sees it whole."""
    from google.protobuf.message import DecodeError  # wandb's dependency

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if read_offline_run(path.parent)["finished"]:
                return
        except (OSError, ValueError, DecodeError):  # not written yet, or a record cut short
            pass
        if time.monotonic() > deadline:
            log.warning("W&B offline run %s: no exit record after %.0f s", path.parent, timeout_s)
            return
        time.sleep(0.1)


# ------------------------------------------------------------------ reading offline runs (before `wandb sync`)

_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic 0xBEE1 + version; then LevelDB-log framed records (crc32, length, type)


def _records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (missing ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if pos + 7 + length > len(data):  # the last record of a log still being written: not on disk whole yet
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk
            pending = b""


def read_offline_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Summary of one ``offline-run-*`` directory: id, name, group, job_type, tags, finished, exit_code, and the
    keys logged to its history."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{run_dir} holds no .wandb transaction log")
    info: dict[str, Any] = {"dir": str(run_dir), "finished": False, "exit_code": None, "history_keys": set()}
    for raw in _records(logs[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(
                id=rec.run.run_id,
                name=rec.run.display_name,
                group=rec.run.run_group,
                job_type=rec.run.job_type,
                tags=list(rec.run.tags),
                project=rec.run.project,
            )
        elif kind == "history":
            info["history_keys"].update(item.key or "/".join(item.nested_key) for item in rec.history.item)
        elif kind == "exit":
            info.update(finished=True, exit_code=rec.exit.exit_code)
    return info


def offline_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every offline W&B run below ``root`` (e.g. a multirun directory), summarised by ``read_offline_run``."""
    return [read_offline_run(d) for d in sorted(Path(root).rglob("offline-run-*")) if d.is_dir()]

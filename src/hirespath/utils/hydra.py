"""Glue for the Hydra tasks run by ``hirespath.cli`` (in the style of lightning-hydra-template)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("hirespath")


def _wandb_offline() -> bool:
    # W&B runs offline unless the user explicitly asks for online mode; never require a login.
    os.environ.setdefault("WANDB_MODE", "offline")
    return os.environ["WANDB_MODE"] != "online"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("hp.wandb_offline"):
        OmegaConf.register_new_resolver("hp.wandb_offline", _wandb_offline)
    # The launch directory. Unlike ${hydra:runtime.cwd} it also resolves while Hydra builds the sweep
    # directory of a multirun, before any HydraConfig exists (paths.root_dir feeds hydra.sweep.dir).
    if not OmegaConf.has_resolver("hp.cwd"):
        OmegaConf.register_new_resolver("hp.cwd", os.getcwd)
    # the run folder's suffix in a SLURM job: the tasks of an array start in the same second, and shared one run
    # folder (one log for two tasks, done.json overwritten); each task is a job of its own id. The ranks of one job
    # (srun) share its folder, as they do without SLURM.
    if not OmegaConf.has_resolver("hp.slurm_job"):
        # cached: the submitit launcher's jobs rebuild the sweep's config in SLURM jobs of their own ids
        OmegaConf.register_new_resolver("hp.slurm_job", _slurm_job_suffix, use_cache=True)


def _slurm_job_suffix() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    return f"_slurm{job}" if job.isdigit() else ""


register_resolvers()


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


DONE_FILE = "done.json"  # written into a job's output directory when its task returns


def job_overrides() -> list[str]:
    """The command line's overrides of the running Hydra job (sorted, ``resume`` left out); [] outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return sorted(o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=")[0] != "resume")


def multirun_dir() -> str | None:
    """The sweep folder of the running Hydra multirun (every job of it shares it); None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().sweep.dir)


def _done_marker(cfg: DictConfig):
    from pathlib import Path

    try:
        out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    except Exception:  # ${hydra:...} outside a Hydra run
        return None
    return Path(out) / DONE_FILE if out else None


def _already_done(marker) -> bool:
    """A finished job with the same overrides (so a re-launched sweep into the same directory skips it)."""
    import json

    if marker is None or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("overrides") == job_overrides()
    except ValueError:
        return False


def check_grid_is_multirun() -> None:
    """Experiments carry their grid in ``hydra.sweeper.params`` but not ``hydra.mode`` (the user passes ``-m``, as
    in lightning-hydra-template). Without ``-m`` Hydra would silently run one point of the grid: refuse, unless
    every swept key is set on the command line (a deliberate single point)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return
    params = OmegaConf.select(hc, "sweeper.params", default=None) or {}
    given = {o.lstrip("+~").split("=")[0] for o in hc.overrides.task}
    unset = [k for k in params if k not in given]
    if unset:
        from .config import ConfigValidationError

        grid = " ".join(f"{k}={params[k]}" for k in params)
        raise ConfigValidationError(
            f"this config defines a grid (hydra.sweeper.params: {grid}) but was launched as a single run: add -m "
            f"to run the grid, or set {', '.join(unset)} on the command line to run one point of it"
        )


def _log_traceback_to_files() -> None:
    """The traceback of the exception being handled, into the job's log file(s) only: Hydra prints it on the console
    (once; in full with HYDRA_FULL_ERROR=1), so logging it there too would print it twice."""
    import sys

    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "traceback:", (), sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


INTERRUPTED = 130  # the exit status of a job stopped by Ctrl-C (128 + SIGINT), as shells report it


def task_wrapper(
    task: Callable[[DictConfig], Any], validate: Callable[[DictConfig], None] | None = None
) -> Callable[[DictConfig], Any]:
    """Log failures with the run directory, and always close W&B runs (one finished run per multirun job).

    ``validate(cfg)`` runs first (``hirespath.tasks.task_wrapper`` passes the config checks), before the task.

    A failure logs one line (``task failed; outputs so far are in DIR: Error: message``) and is re-raised for Hydra to
    print its traceback (once). Ctrl-C (or SIGTERM) logs ``task interrupted (SIGINT); outputs so far are in DIR`` and
    exits with 128 + the signal (130 for Ctrl-C), also when Lightning turned the interrupt into its own exit(1)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        import signal

        received: list[int] = []

        def _on_sigterm(signum, frame):  # Lightning's Trainer only records SIGTERM; stop the job (and the sweep)
            received.append(signum)
            raise SystemExit(128 + signum)

        def _on_sigint(signum, frame):  # Python's default (KeyboardInterrupt), remembering that it came
            received.append(signum)
            raise KeyboardInterrupt

        previous = {}
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)

        try:
            check_grid_is_multirun()
            if validate is not None:
                validate(cfg)  # typos and out-of-range values fail here, before any model or data is touched
            marker = _done_marker(cfg)
            if cfg.get("resume", False) and _already_done(marker):
                log.info("resume: %s already finished with the same overrides; skipping", marker.parent)
                return None
            return _run(task, cfg, marker, received)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return wrapped


def _run(task: Callable[[DictConfig], Any], cfg: DictConfig, marker, received: list[int]):
    import signal

    marker_dir = marker.parent if marker is not None else None  # paths.output_dir, where it resolves
    # embed_slides' and segment_slides' outputs are in their job_dir (what a rerun resumes), their log in the run
    # folder (mil's and predict_slides' job_dir holds only the embeddings they reuse; their outputs are the run's)
    slide_task = cfg.get("task_name") in ("embed_slides", "segment_slides") and cfg.get("job_dir")

    def where() -> str:  # at the end: a run refused before any slide made no job_dir
        if not slide_task:
            return str(marker_dir)
        if not os.path.isdir(cfg.job_dir):
            return f"{marker_dir} (this run's log; job_dir={cfg.job_dir} was not made)"
        return f"{cfg.job_dir} (this run's log: {marker_dir})"

    exit_code = 1
    try:
        result = task(cfg)
        exit_code = 0
        if marker is not None:
            from .io import write_json

            write_json(marker, {"overrides": job_overrides(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return result
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning catches KeyboardInterrupt in fit/predict and calls exit(1): the signal tells them apart
        signum = received[0] if received else (signal.SIGINT if isinstance(err, KeyboardInterrupt) else None)
        if signum is None:
            raise
        exit_code = 128 + signum
        log.error("task interrupted (%s); outputs so far are in %s", signal.Signals(signum).name, where())
        raise SystemExit(exit_code) from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if received:  # SLURM's SIGTERM reached the DataLoader workers too: their death, not a bug, is what surfaced
            exit_code = 128 + received[0]
            log.error("task interrupted (%s); outputs so far are in %s (while stopping: %s: %s)",
                      signal.Signals(received[0]).name, where(), type(err).__name__, first)  # fmt: skip
            raise SystemExit(exit_code) from None
        log.error("task failed; outputs so far are in %s: %s: %s", where(), type(err).__name__, first)
        _log_traceback_to_files()
        raise
    finally:
        # A failed job's W&B run is finished as failed; the next job of the multirun starts a fresh one.
        from .wandb import finish_runs

        finish_runs(exit_code=exit_code)

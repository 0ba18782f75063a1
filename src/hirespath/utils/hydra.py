"""Glue for the Hydra entry points in ``tasks/`` (in the style of lightning-hydra-template)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

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


register_resolvers()


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log failures with the run directory, and always close W&B runs (one finished run per multirun job)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        from .config import validate_config

        validate_config(cfg)  # typos and out-of-range values fail here, before any model or data is touched
        exit_code = 1
        try:
            result = task(cfg)
            exit_code = 0
            return result
        except Exception:
            log.exception("task failed; outputs so far are in %s", cfg.get("paths", {}).get("output_dir"))
            raise
        finally:
            # A failed job's W&B run is finished as failed; the next job of the multirun starts a fresh one.
            from .wandb import finish_runs

            finish_runs(exit_code=exit_code)

    return wrapped

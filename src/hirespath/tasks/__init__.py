"""One module per task, each holding its ``run_<task>(cfg)``: what the ``hirespath`` CLI and ``tasks/*.py`` call.

Importing this package prepares Hydra for any task: the ``${hp.*}`` resolvers and the config groups' schemas
(:func:`hirespath.configs.register_configs`) are registered before a config is composed, and
:func:`task_wrapper` checks the composed config (:func:`hirespath.configs.validate_config`) before the task runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from ..configs import register_configs, validate_config
from ..utils import hydra as _hydra

_hydra.register_resolvers()
register_configs()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """:func:`hirespath.utils.hydra.task_wrapper` with the config checks of the task ``run_<task>`` runs."""
    name = getattr(task, "__name__", "")
    name = name.removeprefix("run_") if name.startswith("run_") else None  # None: the config's task_name
    return _hydra.task_wrapper(task, validate=lambda cfg: validate_config(cfg, task=name))

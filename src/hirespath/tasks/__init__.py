"""One module per task, each holding its ``run_<task>(cfg)``: what the ``hirespath`` CLI and ``tasks/*.py`` call.

Importing this package prepares Hydra for any task: the ``${hp.*}`` resolvers and the config groups' schemas
(:func:`hirespath.configs.register_configs`) are registered before a config is composed, and
:func:`task_wrapper` checks the composed config (:func:`hirespath.configs.validate_config`) and that this machine has
the GPUs it asks for (:func:`hirespath.utils.devices.check_devices`) before the task runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from ..configs import register_configs, validate_config
from ..utils import hydra as _hydra
from ..utils.devices import check_devices

_hydra.register_resolvers()
register_configs()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """:func:`hirespath.utils.hydra.task_wrapper` with the config checks of the task ``run_<task>`` runs."""
    name = getattr(task, "__name__", "")
    name = name.removeprefix("run_") if name.startswith("run_") else None  # None: the config's task_name

    def validate(cfg: DictConfig) -> None:
        validate_config(cfg, task=name)
        check_devices(cfg)  # the machine's GPUs against the config's: where the task runs, after the config is valid

    return _hydra.task_wrapper(task, validate=validate)

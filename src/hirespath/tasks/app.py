"""The task registry and each task's Hydra app: ``python -m hirespath.tasks.<task> [overrides]``.

Every task module ends with ``main()``, which calls :func:`hydra_main` (``hydra.main`` on the package's config
directory and the task's root config); ``hirespath <task>`` runs that module (``hirespath.cli``). Adding a task is
one entry in :data:`TASKS` and those three lines at the bottom of its module.

Nothing heavy is imported here: ``hirespath --help`` and ``hirespath <task> --help`` read this module only.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    run: str  # "module:function" taking the composed config; imported only when the task runs
    summary: str  # one line for `hirespath --help`
    config_name: str | None = None  # root config in the config directory (default: the task's name)
    returns: str | None = None  # key of the run's result handed back to Hydra (what a sweeper optimises)
    argv: str | None = None  # "module:function" rewriting the task's arguments before Hydra parses them

    @property
    def module(self) -> str:
        """The task's module, runnable as ``python -m <module>``."""
        return self.run.partition(":")[0]


TASKS: dict[str, Task] = {
    "classify": Task(
        "hirespath.tasks.classify:run_classify",
        "PANDA ISUP grading: extract (cached) ROI embeddings, fit a linear probe or KNN, test",
    ),
    "extract": Task(
        "hirespath.tasks.extract:run_extract", "extract and cache PANDA ROI embeddings for an encoder configuration"
    ),
    "embed_slides": Task(
        "hirespath.tasks.embed_slides:run_embed_slides",
        "whole-slide embedding to TRIDENT/CLAM-layout h5 files (large tiles, sparse attention + pruning)",
    ),
    "mil": Task(
        "hirespath.tasks.mil:run_mil",
        "slide-level MIL (ABMIL, mean pool) on TRIDENT-layout slide features, embedding the slides first if needed",
    ),
    "predict_slides": Task(
        "hirespath.tasks.predict_slides:run_predict_slides",
        "apply a trained mil model to new slides: predictions, attention heatmaps (PNG) and QuPath GeoJSON",
    ),
    "segment": Task(
        "hirespath.tasks.segment:run_segment", "SegPath: fine-tune ViT-Adapter + Mask2Former on the encoder, then test"
    ),
    "segment_slides": Task(
        "hirespath.tasks.segment_slides:run_segment_slides",
        "a trained segment model over whole slides: QuPath GeoJSON, pyramidal probability TIFF, overlay, areas",
    ),
    "benchmark": Task(
        "hirespath.tasks.benchmark:run_benchmark",
        "time, memory and the largest resolution per attention mode (CSV + plot)",
    ),
    "report": Task(
        "hirespath.tasks.report:run_report",
        "the paper's tables and Figure 1 from finished runs: hirespath report DIR [DIR ...]",
        argv="hirespath.tasks.report:positional_dirs_to_override",
    ),
    "make_synthetic": Task(
        "hirespath.tasks.make_synthetic:run_make_synthetic",
        "write a small synthetic PANDA or SegPath dataset in the real layout",
    ),
    "smoke": Task(
        "hirespath.tasks.smoke:run_smoke",
        "a ten-second Lightning job to check launchers, loggers and DDP before a real grid",
        returns="test/accuracy",
    ),
}


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_dir() -> Path:
    """The Hydra config directory: ``hirespath/conf`` when installed from a wheel, else the checkout's ``conf/``."""
    package = Path(__file__).resolve().parents[1]
    candidates = [package / "conf"]
    if package.parent.name == "src":  # a checkout: src/hirespath next to conf/
        candidates.append(package.parent.parent / "conf")
    for candidate in candidates:
        if (candidate / "classify.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "hirespath: no config directory found (looked for "
        + " and ".join(str(c) for c in candidates)
        + "); install the wheel (it ships hirespath/conf) or run from a checkout with conf/ at its root"
    )


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: every error keeps its full traceback (as Hydra reads the variable)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report_input_error(err: BaseException) -> None:
    """The user's input was wrong (an :class:`~hirespath.utils.errors.InputError`): its message alone on stderr, and
    exit status 1 (no traceback: nothing to debug)."""
    sys.stderr.flush()
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(1) from None


def _users_error(err: BaseException) -> BaseException:
    """``err``, or the user's error Hydra wrapped in its own while building a config node (``instantiate``: a bad
    weights file given to the encoder's target)."""
    from hydra.errors import InstantiationException

    from ..utils.errors import InputError

    if isinstance(err, InstantiationException) and isinstance(err.__cause__, InputError):
        return err.__cause__
    return err


class TaskFunction:
    """The function ``hydra.main`` runs for one task: ``task_wrapper(run_<task>)(cfg)``.

    An instance of a module-level class whose state is the task's name, so it pickles by reference to this module
    (the joblib and submitit launchers pickle the task function to run it in other processes), and importing it
    imports no task: the task's module is imported by name when a job runs.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # Hydra names the job after the task function's module (hydra.job.name: `<job>.log`, the help's app name):
        # hirespath.tasks.classify -> "classify"
        self.__module__ = TASKS[name].module

    def __call__(self, cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from ..utils.cpu_memory import keep_freed_memory
        from ..utils.errors import InputError
        from ..utils.io import out_of_storage, storage_error
        from . import task_wrapper  # the config checks of the task, then hirespath.utils.hydra's wrapper

        keep_freed_memory()  # every task's large CPU tensors reuse freed memory (utils/cpu_memory.py says why)
        task = TASKS[self.name]
        try:
            result = task_wrapper(_load(task.run))(cfg)
        except Exception as raised:
            err = _users_error(raised)
            if not isinstance(err, InputError) and not out_of_storage(err):
                raise
            # a multirun job fails as Hydra reports it (the sweep goes on to its other jobs)
            single = not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.RUN
            if single and not full_error():
                report_input_error(err if isinstance(err, InputError) else storage_error(err))
            raise
        if task.returns and isinstance(result, dict):
            return result.get(task.returns)
        return result

    def __repr__(self) -> str:
        return f"TaskFunction({self.name!r})"


def hydra_main(name: str) -> Any:
    """Run task ``name`` as a Hydra app on ``sys.argv`` (``hydra.main``): what its module's ``main()`` calls.

    ``sys.argv[1:]`` are the task's arguments (overrides and Hydra's flags); Lightning's DDP starts the other ranks
    with them again, as ``python -m <the task's module>``. Failures exit through Hydra (status 1).
    """
    import hydra

    from ..utils.errors import InputError
    from . import register_configs  # importing hirespath.tasks registers the resolvers and schemas; again is a no-op

    register_configs()
    task = TASKS[name]
    if task.argv:
        try:
            sys.argv[1:] = _load(task.argv)(sys.argv[1:])
        except InputError as err:
            if not full_error():
                report_input_error(err)
            raise
    # what Hydra would refuse with a less helpful message (an old key's name, another task's head): said here
    from ..configs import composition_hint

    hint = composition_hint(name, [a for a in sys.argv[1:] if not a.startswith("-")])
    if hint and not full_error():
        report_input_error(InputError(hint))
    app = hydra.main(config_path=str(config_dir()), config_name=task.config_name or name, version_base="1.3")
    return app(TaskFunction(name))()

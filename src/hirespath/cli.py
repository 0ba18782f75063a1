"""The ``hirespath`` command: ``hirespath <task> [hydra overrides]``.

Each task is a Hydra app composed from the config directory: the ``conf/`` shipped inside the package
(``hirespath/conf``) in an installed wheel, the repository's ``conf/`` in a checkout (editable install or
``PYTHONPATH=src``). Outputs go under the current directory (``logs/``, ``cache/``: ``conf/paths``). ``tasks/*.py``
in a checkout call :func:`main` too, so both forms take the same arguments and run the same code.

Adding a task is one entry in :data:`TASKS`.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .tasks import task_wrapper  # also registers the ${hp.*} resolvers and the config schemas


@dataclass(frozen=True)
class Task:
    run: str  # "module:function" taking the composed config; imported only when the task runs
    summary: str  # one line for `hirespath --help`
    config_name: str | None = None  # root config in the config directory (default: the task's name)
    returns: str | None = None  # key of the run's result handed back to Hydra (what a sweeper optimises)
    argv: str | None = None  # "module:function" rewriting the task's arguments before Hydra parses them


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
    "segment": Task(
        "hirespath.tasks.segment:run_segment", "SegPath: fine-tune ViT-Adapter + Mask2Former on the encoder, then test"
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


class TaskFunction:
    """What ``hydra.main`` runs for one task: ``task_wrapper(run_<task>)(cfg)``.

    An instance of a module-level class whose state is the task's name, so it pickles by reference to this
    module: the joblib and submitit launchers pickle the task function to run it in other processes.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # Hydra names the job after the task function's module (hydra.job.name: `<job>.log`, the help's app name):
        # hirespath.tasks.classify -> "classify", as tasks/classify.py did.
        self.__module__ = TASKS[name].run.partition(":")[0]

    def __call__(self, cfg: DictConfig) -> Any:
        task = TASKS[self.name]
        result = task_wrapper(_load(task.run))(cfg)
        if task.returns and isinstance(result, dict):
            return result.get(task.returns)
        return result

    def __repr__(self) -> str:
        return f"TaskFunction({self.name!r})"


def config_dir() -> Path:
    """The Hydra config directory: ``hirespath/conf`` when installed from a wheel, else the checkout's ``conf/``."""
    package = Path(__file__).resolve().parent
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


def usage() -> str:
    width = max(map(len, TASKS))
    lines = [
        "usage: hirespath <task> [hydra overrides ...]   e.g. hirespath classify backbone=tiny head=knn",
        "       hirespath <task> --help                   the task's config groups and options (Hydra's help)",
        "       hirespath --version",
        "",
        "tasks:",
        *(f"  {name:<{width}}  {task.summary}" for name, task in TASKS.items()),
        "",
        "Every task is a Hydra app: key=value overrides, -m for multiruns (sweeps, launchers), --cfg job to print",
        "the composed config. Outputs go under the current directory (logs/<task>/, cache/).",
    ]
    try:
        lines.append(f"Configs: {config_dir()}; add your own files with --config-dir DIR (see README).")
    except FileNotFoundError as e:
        lines.append(str(e))
    return "\n".join(lines)


def run_task(name: str, args: Sequence[str], config_path: str | Path | None = None) -> int:
    """Run task ``name`` as a Hydra app on ``args`` (overrides and Hydra flags, as after ``hirespath <task>``).

    What ``@hydra.main`` does, with the arguments given instead of read from ``sys.argv``, which is left as the
    user typed it: Lightning's DDP re-executes ``sys.argv`` for the other ranks (``hirespath smoke trainer=ddp``
    must start ``hirespath smoke ...`` again, ``python tasks/smoke.py ...`` the same script). Failures exit through
    Hydra (``SystemExit(1)``, or the exception itself with ``HYDRA_FULL_ERROR=1``).
    """
    # hydra-core is pinned to 1.3.*: _run_hydra and get_args_parser are what hydra.main calls
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    task = TASKS[name]
    args = list(args)
    if task.argv:
        args = list(_load(task.argv)(args))
    conf = Path(config_path) if config_path is not None else config_dir()
    version.setbase("1.3")
    parser = get_args_parser()
    parser.prog = f"hirespath {name}"
    parsed = parser.parse_args(args)
    task_function = TaskFunction(name)
    if parsed.experimental_rerun is not None:
        from hydra.core.utils import _flush_loggers
        from hydra.main import _get_rerun_conf

        task_function(_get_rerun_conf(parsed.experimental_rerun, parsed.overrides))
        _flush_loggers()
        return 0
    _run_hydra(
        args=parsed,
        args_parser=parser,
        task_function=task_function,
        config_path=str(conf.resolve()),
        config_name=task.config_name or name,
    )
    return 0


def main(argv: Sequence[str] | None = None, config_path: str | Path | None = None) -> int:
    """``hirespath <task> [overrides]``; ``config_path`` replaces the default config directory (tasks/*.py).

    ``argv`` (default ``sys.argv[1:]``) should be what ``sys.argv`` holds after the command: DDP re-executes it.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    first, rest = args[0], args[1:]
    if first in ("-h", "--help", "help"):
        print(usage())
        return 0
    if first in ("-V", "--version"):
        from . import __version__

        print(f"hirespath {__version__}")
        return 0
    if first not in TASKS:
        if first.startswith("-"):
            what, hint = "option", " (before a task: --help, --version)"
        else:
            close = difflib.get_close_matches(first, TASKS, n=1)
            what, hint = "task", f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"hirespath: unknown {what} {first!r}{hint}; valid tasks: {', '.join(TASKS)}. "
            "Usage: hirespath <task> [hydra overrides]; hirespath --help lists the tasks.",
            file=sys.stderr,
        )
        return 2
    return run_task(first, rest, config_path)


if __name__ == "__main__":  # python -m hirespath.cli: use the importable module, so the task function pickles
    from hirespath.cli import main as _main

    sys.exit(_main())

"""The ``hirespath`` command: ``hirespath <task> [hydra overrides]``.

Each task is a Hydra app, ``python -m hirespath.tasks.<task>`` (``hydra.main`` in the task's module:
:mod:`hirespath.tasks.app`), composed from the config directory: the ``conf/`` shipped inside the package
(``hirespath/conf``) in an installed wheel, the repository's ``conf/`` in a checkout (editable install or
``PYTHONPATH=src``). ``hirespath <task> ARGS`` runs that module with ARGS. Outputs go under the current directory
(``logs/``, ``cache/``: ``conf/paths``). ``tasks/*.py`` in a checkout call :func:`main` too, so all three forms take
the same arguments and run the same code.

Adding a task is one entry in :data:`TASKS` (``hirespath.tasks.app``) and ``main()`` at the bottom of its module.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from .tasks.app import TASKS, Task, TaskFunction, config_dir, hydra_main  # noqa: F401  (the registry lives there)
from .utils import timing  # noqa: F401  (where /proc is missing, startup_seconds counts from this import)

# Hydra's flags that print and run nothing: `hirespath <task> --help` composes the config without importing the
# task's module (torch, Lightning: seconds). Other spellings (`--hel`, `-cjob`) still work, through the module.
_PRINT_ONLY = {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}


def _prints_only(args: Sequence[str]) -> bool:
    return any(a in _PRINT_ONLY or a.startswith(("--cfg=", "--info=", "--shell-completion=")) for a in args)


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
    """Run task ``name`` on ``args`` (overrides and Hydra flags, as after ``hirespath <task>``): its module as
    ``__main__`` (``python -m hirespath.tasks.<name> ARGS``), with ``sys.argv[1:]`` = ARGS.

    Lightning's DDP starts the other ranks as ``python -m <__main__'s module> <sys.argv[1:]>``: the task's module with
    the same arguments, whichever way this process was started. ``config_path`` (``tasks/*.py``: the checkout's
    ``conf/``) goes first as Hydra's ``--config-path``, so the ranks use it too. Failures exit through Hydra
    (``SystemExit(1)``, or the exception itself with ``HYDRA_FULL_ERROR=1``).
    """
    import runpy

    args = list(args)
    if config_path is not None:
        args = ["--config-path", str(Path(config_path).resolve()), *args]
    saved = sys.argv[:]
    sys.argv[1:] = args
    try:
        if _prints_only(args):
            hydra_main(name)  # the same app, its task function never called: no task module imported
        else:  # sys.argv[0] and __main__ become the module's while it runs (alter_sys)
            runpy.run_module(TASKS[name].module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv[:] = saved
    return 0


def main(argv: Sequence[str] | None = None, config_path: str | Path | None = None) -> int:
    """``hirespath <task> [overrides]``; ``config_path`` replaces the default config directory (tasks/*.py).

    ``argv`` (default ``sys.argv[1:]``): the task's name, then its arguments.
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


if __name__ == "__main__":
    sys.exit(main())

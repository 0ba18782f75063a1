"""The report task: the paper's tables (markdown + CSV) and Figure 1 from finished runs.

hirespath report logs/classify/multiruns/2026-01-01_12-00-00 logs/benchmark/multiruns/...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..report.tables import build_report

VALUE_FLAGS = {
    "-cn",
    "--config-name",
    "-cp",
    "--config-path",
    "-cd",
    "--config-dir",
    "-c",
    "--cfg",
    "-p",
    "--package",
    "--info",
    "--experimental-rerun",
}


def positional_dirs_to_override(argv: list[str]) -> list[str]:
    """Turn bare directory arguments into one ``dirs=[...]`` Hydra override (Hydra only takes key=value)."""
    dirs, rest, takes_value = [], [], False
    for a in argv:
        if takes_value or "=" in a or a.startswith("-"):
            rest.append(a)
            takes_value = a in VALUE_FLAGS
        else:
            dirs.append(a)
    for d in dirs:
        if not Path(d).is_dir():
            sys.exit(f"report: {d!r} is not a directory (expected Hydra run/multirun directories or key=value)")
    if dirs:
        quoted = ",".join("'" + str(Path(d).resolve()).replace("'", "\\'") + "'" for d in dirs)
        rest.append(f"dirs=[{quoted}]")
    return rest


def run_report(cfg: DictConfig) -> dict[str, Any]:
    dirs = list(cfg.dirs or [])
    if not dirs:
        raise ValueError(
            "report: no directories given; usage: hirespath report DIR [DIR ...] (Hydra run or multirun directories)"
        )
    out_dir = cfg.get("output_dir") or Path(dirs[0]) / "report"
    return build_report(
        dirs, out_dir, window=int(cfg.ours.window), prune_ratio=float(cfg.ours.prune_ratio), metric=str(cfg.metric)
    )


def main() -> None:
    """``python -m hirespath.tasks.report [overrides]``: the Hydra app ``hirespath report`` runs."""
    from .app import hydra_main

    hydra_main("report")


if __name__ == "__main__":
    main()

"""Paper tables (markdown + CSV) and Figure 1 from finished runs.

    python tasks/report.py logs/classify/multiruns/2026-01-01_12-00-00 logs/benchmark/multiruns/...
    python tasks/report.py DIR output_dir=results/ ours.prune_ratio=0.5
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hirespath.report import run_from_config
from hirespath.utils.hydra import task_wrapper


VALUE_FLAGS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-c", "--cfg", "-p",
               "--package", "--info", "--experimental-rerun"}


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_from_config(cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *positional_dirs_to_override(sys.argv[1:])]
    main()

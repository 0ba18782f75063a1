"""Paper tables (markdown + CSV) and Figure 1 from finished runs.

python tasks/report.py logs/classify/multiruns/2026-01-01_12-00-00 logs/benchmark/multiruns/...
python tasks/report.py DIR output_dir=results/ ours.prune_ratio=0.5
"""

import sys

import hydra
from omegaconf import DictConfig

from hirespath.tasks.report import positional_dirs_to_override, run_report
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_report(cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *positional_dirs_to_override(sys.argv[1:])]
    main()

"""Synthetic PANDA or SegPath data in the real layout (for demos and tests)."""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.make_synthetic import run_make_synthetic
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="make_synthetic")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_make_synthetic(cfg)


if __name__ == "__main__":
    main()

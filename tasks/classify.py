"""PANDA classification: extract (cached), fit a linear probe or KNN, test.

    python tasks/classify.py data=panda data.root=DIR backbone=uni2_h backbone.weights=FILE \
        attention=sparse pruner=global_attention head=knn resolution=1344 trainer=gpu logger=wandb
"""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.classify import run_classify
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="classify")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_classify(cfg)


if __name__ == "__main__":
    main()

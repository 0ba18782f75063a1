"""Extract and cache PANDA ROI embeddings (CLS + mean of kept patch tokens) for any encoder configuration.

python tasks/extract.py data.root=DIR backbone=uni2_h backbone.weights=FILE resolution=1344 trainer=gpu
"""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.extract import run_extract
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_extract(cfg)


if __name__ == "__main__":
    main()

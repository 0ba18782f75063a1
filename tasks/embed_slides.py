"""Whole-slide embedding to TRIDENT/CLAM-layout h5 files (large tiles, sparse attention + pruning).

    python tasks/embed_slides.py wsi_dir=DIR job_dir=OUT backbone=uni2_h backbone.weights=FILE tile.size=1792 \
        tile.mpp=0.5 attention=sparse pruner=global_attention trainer=gpu
"""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.embed_slides import run_embed_slides
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="embed_slides")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_embed_slides(cfg)


if __name__ == "__main__":
    main()

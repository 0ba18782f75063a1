"""SegPath: fine-tune ViT-Adapter + Mask2Former on the (sparse) encoder, then test.

    python tasks/segment.py data=segpath data.root=DIR backbone=uni2_h backbone.weights=FILE \
        attention=sparse attention.window=64 resolution=560 trainer=gpu logger=wandb
"""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.segment import run_segment
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="segment")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_segment(cfg)


if __name__ == "__main__":
    main()

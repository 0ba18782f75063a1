"""Synthetic PANDA or SegPath data in the real layout (for demos and tests)."""

import hydra
from omegaconf import DictConfig

from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="make_synthetic")
@task_wrapper
def main(cfg: DictConfig) -> None:
    if cfg.dataset == "panda":
        from hirespath.data.panda_synthetic import make_synthetic_panda

        make_synthetic_panda(cfg.root, num_slides=cfg.num_slides, size=(cfg.slide_height, cfg.slide_width),
                             mpp=cfg.mpp, seed=cfg.seed)
    elif cfg.dataset == "segpath":
        from hirespath.data.segpath_synthetic import make_synthetic_segpath

        make_synthetic_segpath(cfg.root, images_per_split=cfg.images_per_split, size=cfg.size, seed=cfg.seed)
    else:
        raise ValueError(f"dataset must be panda or segpath, got {cfg.dataset!r}")


if __name__ == "__main__":
    main()

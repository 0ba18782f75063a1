"""The make_synthetic task: a small synthetic PANDA or SegPath download in the real on-disk layout.

hirespath make_synthetic dataset=panda root=data/panda_synthetic num_slides=36
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..data.panda_synthetic import make_synthetic_panda
from ..data.segpath_synthetic import make_synthetic_segpath


def run_make_synthetic(cfg: DictConfig) -> None:
    if cfg.dataset == "panda":
        make_synthetic_panda(
            cfg.root, num_slides=cfg.num_slides, size=(cfg.slide_height, cfg.slide_width), mpp=cfg.mpp, seed=cfg.seed
        )
    elif cfg.dataset == "segpath":
        make_synthetic_segpath(cfg.root, images_per_split=cfg.images_per_split, size=cfg.size, seed=cfg.seed)
    else:
        raise ValueError(f"dataset must be panda or segpath, got {cfg.dataset!r}")


def main() -> None:
    """``python -m hirespath.tasks.make_synthetic [overrides]``: the Hydra app ``hirespath make_synthetic`` runs."""
    from .app import hydra_main

    hydra_main("make_synthetic")


if __name__ == "__main__":
    main()

"""Slide-level MIL on PANDA: per-slide tile features (given, or embedded and cached first) → ABMIL / mean pool.

python tasks/mil.py data.root=DIR features_dir=OUT/20x_224px_0px_overlap/features_<tag> head=abmil
python tasks/mil.py data.root=DIR backbone.weights=FILE tile.size=1792 head=abmil trainer=gpu   (embeds first)
python tasks/mil.py -m experiment=mil_tile_size data.root=DIR backbone.weights=FILE trainer=gpu
"""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.mil import run_mil
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="mil")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_mil(cfg)


if __name__ == "__main__":
    main()

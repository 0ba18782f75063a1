"""Slide-level MIL on PANDA: per-slide tile features (given, or embedded and cached first) → ABMIL / mean pool.

python tasks/mil.py data.root=DIR features_dir=OUT/20x_224px_0px_overlap/features_<tag> head=abmil
python tasks/mil.py data.root=DIR backbone.weights=FILE tile.size=1792 head=abmil trainer=gpu   (embeds first)
python tasks/mil.py -m experiment=mil_tile_size data.root=DIR backbone.weights=FILE trainer=gpu
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["mil", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

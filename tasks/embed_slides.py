"""Whole-slide embedding to TRIDENT/CLAM-layout h5 files (large tiles, sparse attention + pruning).

    python tasks/embed_slides.py wsi_dir=DIR job_dir=OUT backbone=uni2_h backbone.weights=FILE tile.size=1792 \
        tile.mpp=0.5 attention=sparse pruner=global_attention trainer=gpu

The checkout's entry point of `hirespath embed_slides`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed_slides", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

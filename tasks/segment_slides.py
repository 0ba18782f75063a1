"""Whole-slide segmentation with a trained `segment` model: QuPath GeoJSON, probability TIFF, overlay, areas.

    python tasks/segment_slides.py ckpt=RUN/checkpoints/best.ckpt wsi_dir=DIR job_dir=OUT tile.size=1792 \
        tile.overlap=256 trainer=gpu

The checkout's entry point of `hirespath segment_slides`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment_slides", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

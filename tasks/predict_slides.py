"""Apply a trained MIL model to new slides: predictions, attention heatmaps (PNG) and QuPath GeoJSON.

    python tasks/predict_slides.py ckpt=MILRUN/checkpoints/epoch_007.ckpt features_dir=OUT/20x_224px_0px_overlap/feat_x
    python tasks/predict_slides.py ckpt=MILRUN wsi_dir=NEW_SLIDES job_dir=OUT heatmaps.resolution=token

The checkout's entry point of `hirespath predict_slides`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict_slides", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

"""Extract and cache PANDA ROI embeddings (CLS + mean of kept patch tokens) for any encoder configuration.

python tasks/extract.py data.root=DIR backbone=uni2_h backbone.weights=FILE resolution=1344 trainer=gpu

The checkout's entry point of `hirespath extract`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

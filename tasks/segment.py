"""SegPath: fine-tune ViT-Adapter + Mask2Former on the (sparse) encoder, then test.

    python tasks/segment.py data=segpath data.root=DIR backbone=uni2_h backbone.weights=FILE \
        attention=sparse attention.window=64 resolution=560 trainer=gpu logger=wandb

The checkout's entry point of `hirespath segment`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

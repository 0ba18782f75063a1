"""PANDA classification: extract (cached), fit a linear probe or KNN, test.

    python tasks/classify.py data=panda data.root=DIR backbone=uni2_h backbone.weights=FILE \
        attention=sparse pruner=global_attention head=knn resolution=1344 trainer=gpu logger=wandb

The checkout's entry point of `hirespath classify`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

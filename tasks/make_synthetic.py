"""Synthetic PANDA or SegPath data in the real layout (for demos and tests).

The checkout's entry point of `hirespath make_synthetic`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["make_synthetic", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

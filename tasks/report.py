"""Paper tables (markdown + CSV) and Figure 1 from finished runs.

python tasks/report.py logs/classify/multiruns/2026-01-01_12-00-00 logs/benchmark/multiruns/...
python tasks/report.py DIR output_dir=results/ ours.prune_ratio=0.5

The checkout's entry point of `hirespath report`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

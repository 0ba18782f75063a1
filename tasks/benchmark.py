"""Time, memory and largest resolution per attention mode.

python tasks/benchmark.py backbone=uni2_h attention=sparse pruner=global_attention 'resolutions=[224,448,896]'
python tasks/benchmark.py experiment=table1_cost            # the paper's cost columns, three configurations
python tasks/benchmark.py -m attention=dense,sparse         # one run per mode

The checkout's entry point of `hirespath benchmark`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

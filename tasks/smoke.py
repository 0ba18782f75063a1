"""A ten-second Lightning job to check launchers, loggers and DDP before launching a real grid.

python tasks/smoke.py                                              # local, CSV logger
python tasks/smoke.py -m hydra/launcher=joblib lr=0.01,0.1 logger=wandb
python tasks/smoke.py trainer=ddp                                  # 2 CPU processes (gloo)
python tasks/smoke.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu trainer=gpu

The checkout's entry point of `hirespath smoke`: the same arguments and code (hirespath.cli), with this
repository's conf/.
"""

import sys
from pathlib import Path

from hirespath.cli import main

if __name__ == "__main__":
    sys.exit(main(["smoke", *sys.argv[1:]], config_path=Path(__file__).resolve().parents[1] / "conf"))

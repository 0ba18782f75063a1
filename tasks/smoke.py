"""A ten-second Lightning job to check launchers, loggers and DDP before launching a real grid.

python tasks/smoke.py                                              # local, CSV logger
python tasks/smoke.py -m hydra/launcher=joblib lr=0.01,0.1 logger=wandb
python tasks/smoke.py trainer=ddp                                  # 2 CPU processes (gloo)
python tasks/smoke.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu trainer=gpu
"""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.smoke import run_smoke
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="smoke")
@task_wrapper
def main(cfg: DictConfig) -> float:
    return run_smoke(cfg)["test/accuracy"]


if __name__ == "__main__":
    main()

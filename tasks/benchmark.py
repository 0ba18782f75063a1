"""Time, memory and largest resolution per attention mode.

python tasks/benchmark.py backbone=uni2_h attention=sparse pruner=global_attention 'resolutions=[224,448,896]'
python tasks/benchmark.py experiment=table1_cost            # the paper's cost columns, three configurations
python tasks/benchmark.py -m attention=dense,sparse         # one run per mode
"""

import hydra
from omegaconf import DictConfig

from hirespath.tasks.benchmark import run_benchmark
from hirespath.utils.hydra import task_wrapper


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
@task_wrapper
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg)


if __name__ == "__main__":
    main()

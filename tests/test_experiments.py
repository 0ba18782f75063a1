"""Every experiment and launcher config composes; grids have the paper's sizes."""

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir


def _compose(task, overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(task, overrides=overrides, return_hydra_config=True)


def _jobs(cfg) -> int:
    n = 1
    for value in cfg.hydra.sweeper.params.values():
        n *= len(str(value).split(","))
    return n


@pytest.mark.parametrize("exp,jobs", [("table1", 36), ("table2", 10), ("table3", 8)])
def test_classification_grids(exp, jobs):
    cfg = _compose("classify", [f"experiment={exp}"])
    assert _jobs(cfg) == jobs and cfg.backbone.name == "uni2_h"
    if exp != "table1":
        assert cfg.resolution == 3430 and cfg.attention.mode == "sparse" and cfg.pruner.prune_ratio == 0.6


@pytest.mark.parametrize("method,mode,ratio", [("vanilla", "dense", 0.0), ("ours", "sparse", 0.6)])
def test_method_sets_attention_and_pruner(method, mode, ratio):
    cfg = _compose("classify", [f"method={method}"])
    assert cfg.attention.mode == mode and cfg.pruner.prune_ratio == ratio


@pytest.mark.parametrize("task", ["classify", "extract", "segment", "benchmark", "make_synthetic", "report"])
def test_root_configs_compose(task):
    assert _compose(task, []).task_name == task

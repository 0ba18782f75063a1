"""End to end: a 2×2 classification multirun on synthetic PANDA with the tiny preset → 4 metrics.json,
4 finished offline W&B runs in one group, and the report's Table 1. Skipped where tasks/classify.py is absent."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "tasks" / "classify.py").is_file(), reason="needs tasks/classify.py")


def _task(name, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("WANDB_MODE", None)  # offline is the default
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tasks" / f"{name}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_by_two_grid_wandb_and_report(tmp_path):
    from hirespath.report.tables import build_report
    from hirespath.utils.wandb import offline_runs

    data = tmp_path / "panda"
    _task("make_synthetic", "dataset=panda", f"root={data}", "num_slides=12", cwd=tmp_path)
    sweep = tmp_path / "logs" / "classify" / "multiruns" / "grid"
    _task(
        "classify",
        "-m",
        f"data.root={data}",
        "data.fov_um=256",
        "backbone=tiny",
        "attention=sparse",
        "pruner=global_attention",
        "pruner.prune_layer=2",
        "resolution=112,224",
        "pruner.prune_ratio=0.4,0.6",
        "head=knn",
        "head.k=3",
        "logger=wandb",
        "figures.num_rois=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    runs = offline_runs(sweep)
    assert len(runs) == 4 and all(r["finished"] and r["exit_code"] == 0 for r in runs)
    assert {r["group"] for r in runs} == {"classify-grid"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_report([sweep], tmp_path / "report")
    t1 = pd.read_csv(tmp_path / "report" / "table1.csv")
    assert list(t1.resolution) == [112, 224] and set(t1.method) == {"ours"} and set(t1.prune_ratio) == {0.6}
    assert t1.knn_acc.between(0, 1).all()
    t2 = pd.read_csv(tmp_path / "report" / "table2.csv")
    assert list(t2.prune_ratio) == [0.4, 0.6] and set(t2.resolution) == {224}
    assert (tmp_path / "report" / "figure1.png").is_file()

"""hirespath.results: the names runs write and the report reads (torch-free, values frozen, writers agree)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from hirespath import results

ROOT = Path(__file__).resolve().parents[1]


def test_results_and_report_import_without_torch():
    code = "import sys, hirespath.results, hirespath.report.tables; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"


def test_names_are_the_on_disk_format():
    """Runs written before must still be read: these values are a file format, not a style choice."""
    assert {k: v for k, v in vars(results).items() if k.isupper()} == {
        "METRICS_FILE": "metrics.json",
        "PREDICTIONS_FILE": "predictions.csv",
        "SKIPPED_FILE": "skipped.csv",
        "BENCHMARK_FILE": "benchmark.csv",
        "SUMMARY_FILE": "summary.json",
        "TIMINGS_FILE": "timings.csv",
        "TRAIN": "train/",
        "VAL": "val/",
        "TEST": "test/",
        "LOSS": "loss",
        "ACCURACY": "accuracy",
        "BALANCED_ACCURACY": "balanced_accuracy",
        "F1_WEIGHTED": "f1_weighted",
        "AUROC": "auroc",
        "KAPPA": "kappa",
        "CLASSIFICATION_METRICS": ("accuracy", "balanced_accuracy", "f1_weighted", "auroc", "kappa"),
        "TEST_ACCURACY": "test/accuracy",
        "TEST_BALANCED_ACCURACY": "test/balanced_accuracy",
        "TEST_F1_WEIGHTED": "test/f1_weighted",
        "TEST_AUROC": "test/auroc",
        "TEST_KAPPA": "test/kappa",
        "TEST_CLASSIFICATION_KEYS": (
            "test/accuracy",
            "test/balanced_accuracy",
            "test/f1_weighted",
            "test/auroc",
            "test/kappa",
        ),
        "TEST_LOSS": "test/loss",
        "TEST_NUM_SLIDES": "test/num_slides",
        "MPA": "mpa",
        "CPA": "cpa",
        "IOU": "iou",
        "DICE": "dice",
        "TEST_MPA": "test/mpa",
        "TEST_IOU": "test/iou",
        "TEST_DICE": "test/dice",
        "TRAIN_PEAK_MEMORY_GB": "train/peak_memory_gb",
        "EMBED_SECONDS_PER_SLIDE": "embed/seconds_per_slide",
    }


def test_metric_writers_use_the_names():
    """What the metric code computes is what the report looks up (a renamed metric would leave a blank column)."""
    from hirespath.metrics.classification import classification_metrics
    from hirespath.metrics.segmentation import SegPathMetrics
    from hirespath.modules.mil import MONITOR_MODES
    from hirespath.report.tables import CLS_METRICS, MIL_METRICS, SEG_METRICS

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    cls = classification_metrics(probs, torch.tensor([0, 1, 1]), num_classes=2)
    assert set(cls) == set(results.TEST_CLASSIFICATION_KEYS) == set(CLS_METRICS.values())
    assert set(MIL_METRICS.values()) <= set(cls)
    assert set(MONITOR_MODES) == {"val/loss", *(f"val/{m}" for m in results.CLASSIFICATION_METRICS)}

    seg = SegPathMetrics(["Epithelium"])
    seg.update(torch.tensor([[1, 0], [1, 1]]), torch.tensor([[1, 0], [0, 255]]), cell=0)
    out = seg.compute()
    assert set(SEG_METRICS.values()) <= set(out)
    assert {"test/cpa/Epithelium", "test/iou/Epithelium", "test/dice/Epithelium"} <= set(out)


def test_report_knows_every_mil_head():
    """report/tables.py keeps the MIL head names by hand (it must not import torch): they must match the heads."""
    from hirespath.heads.mil import MIL_HEADS
    from hirespath.report.tables import MIL_HEADS as REPORT_MIL_HEADS

    assert REPORT_MIL_HEADS == tuple(MIL_HEADS)

"""What runs write and the report reads: output file names and metric keys, in one place.

Tasks and modules build their outputs with these names; ``hirespath.report`` reads them back. This module imports
no torch (the report runs without it) and nothing from hirespath, so every layer may import it. The values are an
on-disk format: the report must keep reading runs written before, so a value never changes (add a new name and
teach the report both instead).
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------- output files

METRICS_FILE = "metrics.json"  # classify, segment, mil, smoke: the keys below (nested dicts are flattened with "/")
PREDICTIONS_FILE = "predictions.csv"  # classify, mil: one row per test slide
SKIPPED_FILE = "skipped.csv"  # what could not be used and why (a task's run directory, the slide job, the report)
BENCHMARK_FILE = "benchmark.csv"  # benchmark: one row per attention configuration × resolution
SUMMARY_FILE = "summary.json"  # the slide embedding job (summary_rank<r>.json per rank when world_size > 1)
TIMINGS_FILE = "timings.csv"  # the slide embedding job: per-slide stage seconds


def backbone_overrides_label(overrides) -> str:
    """``backbone.overrides`` (e.g. a narrowed UNI2-h: depth 12, dim 384) as benchmark.csv's ``backbone_overrides``
    column and the report's run key write it: ``k=v`` sorted, comma-joined; "" for none."""
    return ",".join(f"{k}={v}" for k, v in sorted(dict(overrides or {}).items()))


def asked_backend(column) -> str:
    """The backend a benchmark.csv row's configuration asked for, from its ``sparse_backend`` column (``asked`` or
    ``asked:ran``, empty for dense/eager): what identifies its plot line, and the report's default-kernel rows."""
    return column.split(":")[0] if isinstance(column, str) and column else "auto"


# ----------------------------------------------------------------------------------------------- metric keys

# stage prefixes: Lightning logs and metrics.json keys are "<stage>/<name>"
TRAIN, VAL, TEST = "train/", "val/", "test/"

LOSS = "loss"
# hirespath.metrics.classification_metrics' names, in the report's order
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced_accuracy"
F1_WEIGHTED = "f1_weighted"  # support-weighted F1
AUROC = "auroc"  # macro one-vs-rest over the classes present
KAPPA = "kappa"  # quadratic Cohen's kappa (PANDA's official metric)
CLASSIFICATION_METRICS = (ACCURACY, BALANCED_ACCURACY, F1_WEIGHTED, AUROC, KAPPA)

TEST_ACCURACY = TEST + ACCURACY
TEST_BALANCED_ACCURACY = TEST + BALANCED_ACCURACY
TEST_F1_WEIGHTED = TEST + F1_WEIGHTED
TEST_AUROC = TEST + AUROC
TEST_KAPPA = TEST + KAPPA
TEST_CLASSIFICATION_KEYS = tuple(TEST + name for name in CLASSIFICATION_METRICS)
TEST_LOSS = TEST + LOSS
TEST_NUM_SLIDES = TEST + "num_slides"

# SegPath segmentation (hirespath.metrics.segmentation.SegPathMetrics): means over the evaluated cell types, and
# per cell type "<stage>/<CPA|IOU|DICE>/<cell type>"
MPA, CPA, IOU, DICE = "mpa", "cpa", "iou", "dice"
TEST_MPA = TEST + MPA
TEST_IOU = TEST + IOU
TEST_DICE = TEST + DICE
TRAIN_PEAK_MEMORY_GB = TRAIN + "peak_memory_gb"  # the segmentation training's peak GPU memory

# slide-level MIL: the embedding cost behind its features
EMBED_SECONDS_PER_SLIDE = "embed/seconds_per_slide"

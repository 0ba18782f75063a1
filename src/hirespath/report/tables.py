"""Collect finished runs into the paper's tables (markdown + CSV) and Figure 1.

Input: any number of Hydra run / multirun directories. Every ``metrics.json`` (classify, segment) and every
``benchmark.csv`` below them is read; each metrics.json gets its configuration (backbone, attention, window,
pruner ratio, resolution, head) from the ``.hydra/config.yaml`` of its job directory, as Hydra writes it:

    DIR/multirun.yaml
    DIR/<job>/.hydra/{config,hydra,overrides}.yaml
    DIR/<job>/metrics.json            (or benchmark.csv)

benchmark.csv rows carry their own configuration columns (one row per attention configuration × resolution).

Method labels follow the paper: ``vanilla`` = full attention (eager or dense SDPA) without pruning; ``ours`` =
sparse attention with pruning for classification, sparse attention alone for segmentation (the paper prunes
only for classification). Anything else (e.g. sparse without pruning in classification) is labelled by its
configuration, e.g. ``sparse`` or ``dense+p0.6``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from ..results import (
    BENCHMARK_FILE,
    EMBED_SECONDS_PER_SLIDE,
    METRICS_FILE,
    SKIPPED_FILE,
    TEST_ACCURACY,
    TEST_AUROC,
    TEST_BALANCED_ACCURACY,
    TEST_DICE,
    TEST_F1_WEIGHTED,
    TEST_IOU,
    TEST_KAPPA,
    TEST_MPA,
    TRAIN_PEAK_MEMORY_GB,
    asked_backend,
    backbone_overrides_label,
)
from ..utils.io import atomic_path, write_text
from ..viz.figures import pyplot, save_png

log = logging.getLogger("hirespath.report")

VANILLA_ATTENTION = ("eager", "dense")  # eager first: the paper's vanilla memory column is eager attention

# (column in the tables, metrics.json key)
CLS_METRICS = {
    "acc": TEST_ACCURACY,
    "bal_acc": TEST_BALANCED_ACCURACY,
    "f1": TEST_F1_WEIGHTED,
    "auroc": TEST_AUROC,
    "kappa": TEST_KAPPA,
}
SEG_METRICS = {"mpa": TEST_MPA, "iou": TEST_IOU, "dice": TEST_DICE}
# slide-level MIL (tasks/mil.py): kappa first, PANDA's official metric
MIL_METRICS = {
    "kappa": TEST_KAPPA,
    "bal_acc": TEST_BALANCED_ACCURACY,
    "acc": TEST_ACCURACY,
    "auroc": TEST_AUROC,
}
MIL_COST = EMBED_SECONDS_PER_SLIDE
MIL_HEADS = ("abmil", "mean_pool")  # hirespath.heads.mil.MIL_HEADS (not imported: the report needs no torch)
# the first is what tasks/segment.py writes; the others are read too
SEG_MEMORY_KEYS = (TRAIN_PEAK_MEMORY_GB, "test/peak_memory_gb", "peak_memory_gb", "memory/peak_gb")

# Config keys tried in order for each field of a run (first one present wins). The second pruner keys are the
# names before the config keys became create_encoder's (runs made before that still report).
CONFIG_KEYS = {
    "task": ("task_name",),
    "backbone": ("backbone.name",),
    "attention": ("attention.mode",),
    "window": ("attention.window",),
    "prune_ratio": ("pruner.prune_ratio", "pruner.ratio"),
    "prune_layer": ("pruner.prune_layer", "pruner.layer"),
    "resolution": ("resolution", "data.resolution", "data.image_size"),
    "head": ("head.name",),
    "head_solver": ("head.solver",),
    "data": ("data.name",),
    "experiment": ("experiment_name",),
    # slide-level MIL: the tiling (a conf/mil_tiling name, else tile size + attention + pruning) and the seed
    "tiling": ("tiling_name",),
    "tile_size": ("tile.size",),
    "seed": ("seed",),
    "features_dir": ("features_dir",),
    # not table keys, but runs averaged into one cell must agree on them (see _warn_mixed)
    "data_root": ("data.root",),
    "weights": ("backbone.weights",),
    "features": ("features",),
    "fov_um": ("data.fov_um",),
}
SETTINGS = ("data_root", "weights", "features", "fov_um", "head_solver", "features_dir")
ARCH = "backbone_overrides"  # benchmark.csv's column; the runs' backbone.overrides, labelled the same way


def _warn_mixed(runs: pd.DataFrame, keys: Sequence[str], table: str) -> None:
    """Runs that share a table cell are averaged: say so when they differ in data, weights or features."""
    cols = [c for c in SETTINGS if c in runs and runs[c].notna().any()]
    if not cols or not len(runs):
        return
    mixed = runs.groupby(list(keys), dropna=False)[cols].nunique(dropna=False)
    mixed = mixed[(mixed > 1).any(axis=1)]
    for idx, row in mixed.iterrows():
        what = ", ".join(c for c in cols if row[c] > 1)
        warnings.warn(
            f"report: {table} averages runs at {dict(zip(keys, idx if isinstance(idx, tuple) else (idx,)))} "
            f"that differ in {what}; report those sweeps separately",
            stacklevel=3,
        )


@dataclass
class Collected:
    runs: pd.DataFrame  # one row per metrics.json
    bench: pd.DataFrame  # one row per benchmark.csv row
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


# ----------------------------------------------------------------------------------------------- collecting


def method_label(attention: str | None, prune_ratio: float | None, task: str = "classify") -> str:
    ratio = float(prune_ratio or 0.0)
    if attention in VANILLA_ATTENTION and ratio == 0:
        return "vanilla"
    if attention == "sparse" and (ratio > 0 or task == "segment"):
        return "ours"
    return f"{attention}+p{ratio:g}" if ratio > 0 else str(attention)


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # an interpolation to a resolver that only exists inside a Hydra run
        return None
    return OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig) else value


def _parse_overrides(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    items = OmegaConf.to_container(OmegaConf.load(path)) or []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def find_job_dir(path: Path, root: Path) -> Path | None:
    """The nearest directory at or above ``path`` (not above ``root``) holding ``.hydra/config.yaml``."""
    d = path if path.is_dir() else path.parent
    root = root.resolve()
    while True:
        if (d / ".hydra" / "config.yaml").is_file():
            return d
        if d.resolve() == root or d.parent == d:
            return None
        d = d.parent


def job_info(job_dir: Path) -> dict[str, Any]:
    """Configuration fields of one Hydra job, from its .hydra/config.yaml (overrides.yaml as fallback)."""
    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    overrides = _parse_overrides(job_dir / ".hydra" / "overrides.yaml")
    info: dict[str, Any] = {}
    for name, keys in CONFIG_KEYS.items():
        value = None
        for key in keys:
            value = _select(cfg, key)
            if value is None:
                value = overrides.get(key)
            if value is not None:
                break
        info[name] = value
    info["overrides"] = ",".join(f"{k}={v}" for k, v in overrides.items())
    arch = _select(cfg, "backbone.overrides")  # a narrowed preset is another model: its own rows (see _arch_keys)
    info[ARCH] = backbone_overrides_label(arch if isinstance(arch, dict) else None)
    return info


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _is_segment(info: dict, metrics: dict) -> bool:
    return info.get("task") == "segment" or any(k in metrics for k in SEG_METRICS.values())


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for col in ("window", "prune_layer", "resolution", "tile_size", "seed"):
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    if "prune_ratio" in frame:
        frame["prune_ratio"] = pd.to_numeric(frame["prune_ratio"], errors="coerce").fillna(0.0).astype(float)
    return frame


def _unfinished_jobs(root: Path) -> list[tuple[str, str]]:
    """Job directories of classify/segment/benchmark runs that left no result: a failed or interrupted job is
    listed (a blank table cell must not look like a configuration that was never run)."""
    import yaml

    out = []
    for cfg_path in sorted(root.rglob(".hydra/config.yaml")):
        job = cfg_path.parent.parent
        if (job / METRICS_FILE).is_file() or (job / BENCHMARK_FILE).is_file():
            continue
        try:
            raw = yaml.safe_load(cfg_path.read_text()) or {}
            task = raw.get("task_name")
            if (raw.get("head") or {}).get("name") in MIL_HEADS:  # a MIL job, under any experiment's task name
                task = "mil"
        except Exception:  # noqa: BLE001 — an unreadable config is reported as such
            task = "unknown"
        if task in ("classify", "segment", "benchmark", "mil", "unknown"):
            out.append((str(job), f"{task} job without metrics.json or benchmark.csv (failed or unfinished)"))
    return out


def collect(dirs: Sequence[str | Path]) -> Collected:
    """Read every metrics.json and benchmark.csv below ``dirs``. Unreadable files are skipped with a warning."""
    runs, bench, skipped = [], [], []
    for root in map(Path, dirs):
        if not root.is_dir():
            raise FileNotFoundError(f"report: {root} is not a directory; pass Hydra run/multirun directories")
        for path in sorted(root.rglob(METRICS_FILE)):
            job = find_job_dir(path, root)
            if job is None:
                skipped.append((str(path), "no .hydra/config.yaml in its job directory"))
                continue
            try:
                metrics = _flatten(json.loads(path.read_text()))
                info = job_info(job)
            except Exception as e:  # one bad job must not sink the report
                skipped.append((str(path), f"{type(e).__name__}: {e}"))
                continue
            info["task"] = "segment" if _is_segment(info, metrics) else (info["task"] or "classify")
            info["method"] = method_label(info["attention"], info["prune_ratio"], info["task"])
            runs.append({**info, "job_dir": str(job), **metrics})
        for path in sorted(root.rglob(BENCHMARK_FILE)):
            try:
                frame = pd.read_csv(path)
                missing = {"backbone", "attention", "resolution", "seconds_per_image", "peak_memory_gb"} - set(frame)
                if missing:
                    raise ValueError(f"missing columns {sorted(missing)}")
            except Exception as e:
                skipped.append((str(path), f"{type(e).__name__}: {e}"))
                continue
            frame["source"] = str(path)
            # "" (no overrides) reads back as NaN; NaN stays only where the file predates the column: unknown
            frame[ARCH] = frame[ARCH].fillna("").astype(str) if ARCH in frame else np.nan
            bench.append(frame)
        skipped += _unfinished_jobs(root)
    for path, reason in skipped:
        warnings.warn(f"report: skipped {path}: {reason}", stacklevel=2)
    runs_df = _typed(pd.DataFrame(runs))
    bench_df = _typed(pd.concat(bench, ignore_index=True)) if bench else pd.DataFrame()
    if len(bench_df):
        if "status" not in bench_df:
            bench_df["status"] = "ok"
        bench_df["method"] = [method_label(a, r) for a, r in zip(bench_df.attention, bench_df.prune_ratio)]
    return Collected(runs_df, bench_df, skipped)


# ----------------------------------------------------------------------------------------------- tables


def _metric_cols(runs: pd.DataFrame, keys: dict[str, str], prefix: str = "") -> pd.DataFrame:
    return pd.DataFrame(
        {f"{prefix}{name}": runs[key] if key in runs else np.nan for name, key in keys.items()}, index=runs.index
    )


def _pick_ours(frame: pd.DataFrame, window: int, prune_ratio: float | None) -> pd.DataFrame:
    """Keep vanilla rows, and of the ours rows those with the default window (and ratio) when present."""
    ours = frame.method == "ours"
    keep = ~ours | (frame.window == window)
    if prune_ratio is not None:
        keep &= ~ours | np.isclose(frame.prune_ratio, prune_ratio)
    # Fall back to every ours row of a resolution that has none at the defaults.
    chosen = frame[keep]
    extra = frame[ours & ~frame.resolution.isin(chosen[chosen.method == "ours"].resolution)]
    return pd.concat([chosen, extra])


def _classification(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per configuration with LP and KNN metric columns side by side."""
    cls = runs[runs.task != "segment"] if len(runs) else runs
    if not len(cls):
        return pd.DataFrame(columns=[*keys])
    parts = []
    for head, prefix, metrics in (
        ("linear_probe", "lp_", ("acc", "f1", "auroc")),
        ("knn", "knn_", ("acc", "bal_acc", "f1")),
    ):
        sub = cls[cls["head"] == head]
        if not len(sub):
            continue
        _warn_mixed(sub, keys, head)
        vals = _metric_cols(sub, {m: CLS_METRICS[m] for m in metrics}, prefix)
        part = pd.concat([sub[list(keys)], vals], axis=1).groupby(list(keys), dropna=False).mean().reset_index()
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[*keys])
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p, on=list(keys), how="outer")
    return out


def _arch_keys(col: Collected) -> list[str]:
    """``[ARCH]`` when the runs and benchmark rows are of more than one architecture of a preset (a narrowed UNI2-h
    beside the full one: their rows then stand apart, labelled), else none (the tables as before)."""
    labels = set()
    for f in (col.runs, col.bench):
        if len(f) and ARCH in f:
            labels |= set(f[ARCH].dropna())
    return [ARCH] if len(labels) > 1 else []


def _bench_for(bench: pd.DataFrame, row: pd.Series) -> pd.Series | None:
    """The benchmark row measuring the same configuration (vanilla: same attention, else eager, else dense) on the
    same architecture; of several, the default kernel's (a forced ``sparse_backend`` is a comparison entry)."""
    if not len(bench):
        return None
    b = bench[(bench.backbone == row.backbone) & (bench.resolution == row.resolution)]
    if ARCH in row and isinstance(row[ARCH], str):  # its own architecture's rows, else rows of unknown one (old)
        same = b[ARCH] == row[ARCH]
        b = b[same] if same.any() else b[b[ARCH].isna()]
    if row.method == "ours":
        # Same attention, window and pruning ratio (segmentation's "ours" is sparse without pruning).
        b = b[(b.attention == "sparse") & np.isclose(b.prune_ratio, row.prune_ratio)]
        b = b[b.window == row.window] if "window" in b else b
        if "sparse_backend" in b:  # the default kernel's rows, as the accuracy runs ran
            auto = b.sparse_backend.map(asked_backend) == "auto"
            b = b[auto] if auto.any() else b
    else:
        b = b[b.method == row.method]
        order = [
            *VANILLA_ATTENTION
        ]  # the cost column of "vanilla" is eager when measured, whatever the accuracy run used
        for att in order:
            if (b.attention == att).any():
                b = b[b.attention == att]
                break
    return b.iloc[-1] if len(b) else None


def _add_cost(table: pd.DataFrame, bench: pd.DataFrame) -> pd.DataFrame:
    secs, mem, status = [], [], []
    for _, row in table.iterrows():
        b = _bench_for(bench, row)
        secs.append(b.seconds_per_image if b is not None else np.nan)
        mem.append(b.peak_memory_gb if b is not None else np.nan)
        status.append(b.status if b is not None else "")
    return table.assign(seconds_per_image=secs, peak_memory_gb=mem, bench_status=status)


def table1(col: Collected, window: int = 8, prune_ratio: float = 0.6) -> pd.DataFrame:
    """Resolution × vanilla/ours: LP acc/F1/AUROC, KNN acc/bal.acc/F1, seconds per image and peak memory."""
    keys = ["backbone", *_arch_keys(col), "resolution", "method", "attention", "window", "prune_ratio"]
    t = _classification(col.runs, keys)
    if len(t):
        t = _pick_ours(t[t.method.isin(["vanilla", "ours"])], window, prune_ratio)
    # Benchmark-only configurations (e.g. vanilla OOM at high resolution) still get a row.
    if len(col.bench):
        b = col.bench[col.bench.method.isin(["vanilla", "ours"])]
        b = _pick_ours(b, window, prune_ratio) if len(b) else b
        ident = [k for k in keys if k in ("backbone", ARCH, "resolution", "method")]
        have = set(t[ident].itertuples(index=False, name=None)) if len(t) else set()
        cell = set(zip(t.backbone, t.resolution, t.method)) if len(t) else set()
        # a row of unknown architecture (a file before the column) adds none where the runs have the cell
        known = b[ARCH].notna() | np.array([k not in cell for k in zip(b.backbone, b.resolution, b.method)], bool)
        extra = b[known & np.array([k not in have for k in b[ident].itertuples(index=False, name=None)], bool)]
        extra = extra.assign(_e=(extra.attention != "eager")).sort_values("_e", kind="stable")
        extra = extra[keys].drop_duplicates(ident, keep="first")
        t = pd.concat([t, extra], ignore_index=True) if len(t) else extra.reset_index(drop=True)
    if not len(t):
        return t
    t = _add_cost(t.reset_index(drop=True), col.bench)
    t["_m"] = t.method.map({"vanilla": 0, "ours": 1})
    order = ["backbone", *[k for k in keys if k == ARCH], "resolution", "_m"]
    return t.sort_values(order, na_position="first").drop(columns="_m").reset_index(drop=True)


def _largest(frame: pd.DataFrame) -> pd.DataFrame:
    if not len(frame):
        return frame
    top = frame.groupby("backbone").resolution.transform("max")
    return frame[frame.resolution == top]


def table2(col: Collected, window: int = 8) -> pd.DataFrame:
    """Pruning ratio at the largest resolution (sparse attention, default window)."""
    t = _classification(col.runs, ["backbone", "resolution", "attention", "window", "prune_ratio"])
    if not len(t):
        return t
    t = _largest(t[(t.attention == "sparse") & (t.window == window)])
    return t.sort_values(["backbone", "prune_ratio"]).reset_index(drop=True)


def table3(col: Collected, prune_ratio: float = 0.6) -> pd.DataFrame:
    """Window size at the largest resolution (sparse attention, default pruning ratio)."""
    t = _classification(col.runs, ["backbone", "resolution", "attention", "window", "prune_ratio"])
    if not len(t):
        return t
    t = _largest(t[(t.attention == "sparse") & np.isclose(t.prune_ratio, prune_ratio)])
    return t.sort_values(["backbone", "window"]).reset_index(drop=True)


def _segmentation(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    seg = runs[runs.task == "segment"] if len(runs) else runs
    if not len(seg):
        return pd.DataFrame(columns=[*keys])
    _warn_mixed(seg, keys, "segmentation")
    vals = _metric_cols(seg, SEG_METRICS)
    mem_key = next((k for k in SEG_MEMORY_KEYS if k in seg), None)
    vals["peak_memory_gb"] = seg[mem_key] if mem_key else np.nan
    return pd.concat([seg[list(keys)], vals], axis=1).groupby(list(keys), dropna=False).mean().reset_index()


def table4(col: Collected, window: int = 8) -> pd.DataFrame:
    """Segmentation: resolution × vanilla/ours, MPA / IoU / Dice / peak memory."""
    t = _segmentation(col.runs, ["backbone", "resolution", "method", "attention", "window", "prune_ratio"])
    if not len(t):
        return t
    t = _pick_ours(t[t.method.isin(["vanilla", "ours"])], window, None).reset_index(drop=True)
    if len(col.bench) and t.peak_memory_gb.isna().any():  # memory from a benchmark run when training did not log it
        cost = _add_cost(t, col.bench)
        t["peak_memory_gb"] = t.peak_memory_gb.fillna(cost.peak_memory_gb)
    t["_m"] = t.method.map({"vanilla": 0, "ours": 1})
    return t.sort_values(["backbone", "resolution", "_m"]).drop(columns="_m").reset_index(drop=True)


def table5(col: Collected) -> pd.DataFrame:
    """Segmentation: window size at the largest resolution (sparse attention)."""
    t = _segmentation(col.runs, ["backbone", "resolution", "attention", "window"])
    if not len(t):
        return t
    t = _largest(t[t.attention == "sparse"]).drop(columns="peak_memory_gb")
    return t.sort_values(["backbone", "window"]).reset_index(drop=True)


MIL_KEYS = ["backbone", "tiling", "tile_size", "attention", "window", "prune_ratio", "head"]


def table_mil(col: Collected) -> pd.DataFrame:
    """Slide-level MIL: one row per tiling × head, each metric's mean and std over the seeds (``<metric>`` and
    ``<metric>_std``; std is NaN for one seed), ``seeds`` (runs averaged) and the embedding ``seconds_per_slide``."""
    runs = col.runs
    if not len(runs) or "head" not in runs:
        return pd.DataFrame()
    mil = runs[runs["head"].isin(MIL_HEADS)].copy()
    if not len(mil):
        return pd.DataFrame()
    for key in MIL_KEYS:
        if key not in mil:
            mil[key] = np.nan
    _warn_mixed(mil, MIL_KEYS, "the MIL table")
    vals = _metric_cols(mil, {**MIL_METRICS, "seconds_per_slide": MIL_COST})
    frame = pd.concat([mil[MIL_KEYS], vals], axis=1)
    groups = frame.groupby(MIL_KEYS, dropna=False, sort=False)
    mean, std = groups.mean(), groups.std(ddof=1)
    out = mean[[]].copy()
    out["seeds"] = groups.size()
    for name in MIL_METRICS:
        out[name], out[f"{name}_std"] = mean[name], std[name]
    out["seconds_per_slide"] = mean["seconds_per_slide"]
    out = out.reset_index()
    order = {h: i for i, h in enumerate(MIL_HEADS)}
    out["_h"] = out["head"].map(order)
    return out.sort_values(["tile_size", "tiling", "_h"], na_position="last").drop(columns="_h").reset_index(drop=True)


def mil_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """The MIL table with ``mean ± std`` cells (the CSV keeps them in separate columns)."""
    show = table[["tiling", "tile_size", "head", "seeds"]].copy()
    for name in MIL_METRICS:
        show[name] = [
            "–" if pd.isna(m) else f"{m:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}")
            for m, s in zip(table[name], table[f"{name}_std"])
        ]
    show["seconds_per_slide"] = table["seconds_per_slide"]
    return to_markdown(show, digits=2)


TABLES = {
    "table1": ("Table 1 — linear probe, KNN and cost vs resolution", table1),
    "table2": ("Table 2 — pruning ratio at the largest resolution", table2),
    "table3": ("Table 3 — window size at the largest resolution", table3),
    "table4": ("Table 4 — segmentation vs resolution", table4),
    "table5": ("Table 5 — segmentation window size at the largest resolution", table5),
    "mil": ("Slide-level MIL — tiling × head, mean ± std over seeds, embedding seconds per slide", table_mil),
}


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (no tabulate dependency); NaN shows as '–'."""

    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return "–"
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- figure


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another (lower-or-equal memory and higher-or-equal accuracy), by memory."""
    pts = sorted((float(m), float(a)) for m, a in points if np.isfinite(m) and np.isfinite(a))
    front, best = [], -np.inf
    for m, a in pts:
        if a > best:
            front.append((m, a))
            best = a
    return front


def figure1(t1: pd.DataFrame, path: str | Path, metric: str = "lp_acc") -> Path | None:
    """Figure 1: accuracy vs resolution, memory vs resolution, accuracy–memory Pareto front (vanilla vs ours)."""
    if not len(t1):
        return None
    if metric not in t1 or t1[metric].isna().all():
        metric = "knn_acc" if "knn_acc" in t1 and t1["knn_acc"].notna().any() else metric
    plt = pyplot()
    style = {"vanilla": dict(color="tab:gray", marker="o"), "ours": dict(color="tab:red", marker="s")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, sub in t1.groupby("method"):
        sub = sub.sort_values("resolution")
        kw = dict(label=method, **style.get(method, {}))
        if metric in sub:
            ok = sub[sub[metric].notna()]
            axes[0].plot(ok.resolution.astype(float), ok[metric], **kw)
        mem = sub[sub.peak_memory_gb.notna()]
        axes[1].plot(mem.resolution.astype(float), mem.peak_memory_gb, **kw)
        oom = sub[sub.bench_status == "oom"]
        if len(oom):
            top = t1.peak_memory_gb.max() if t1.peak_memory_gb.notna().any() else 1.0
            axes[1].scatter(
                oom.resolution.astype(float),
                [top] * len(oom),
                marker="x",
                s=80,
                color=kw.get("color"),
                label=f"{method} OOM",
            )
        if metric in sub:
            both = sub[sub[metric].notna() & sub.peak_memory_gb.notna()]
            axes[2].scatter(both.peak_memory_gb, both[metric], **{k: v for k, v in kw.items()})
            for _, r in both.iterrows():
                axes[2].annotate(
                    str(r.resolution),
                    (r.peak_memory_gb, r[metric]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    if metric in t1:
        for method, sub in t1.groupby("method"):
            front = pareto_front(zip(sub.peak_memory_gb, sub[metric]))
            if len(front) > 1:
                xs, ys = zip(*front)
                axes[2].step(xs, ys, where="post", linestyle="--", alpha=0.6, color=style.get(method, {}).get("color"))
    name = {"lp_acc": "linear-probe accuracy", "knn_acc": "KNN accuracy"}.get(metric, metric)
    axes[0].set(xlabel="resolution (px)", ylabel=name, title="accuracy vs resolution")
    axes[1].set(xlabel="resolution (px)", ylabel="peak memory (GB)", title="memory vs resolution")
    axes[2].set(xlabel="peak memory (GB)", ylabel=name, title="accuracy–memory Pareto front")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


# ----------------------------------------------------------------------------------------------- entry


def build_report(
    dirs: Sequence[str | Path], out_dir: str | Path, window: int = 8, prune_ratio: float = 0.6, metric: str = "lp_acc"
) -> dict[str, Any]:
    """Write tableN.{csv,md}, report.md, runs.csv, figure1.png (and skipped.csv) into ``out_dir``."""
    col = collect(dirs)
    if not len(col.runs) and not len(col.bench):
        raise FileNotFoundError(f"report: no metrics.json or benchmark.csv found under {[str(d) for d in dirs]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "table1": table1(col, window, prune_ratio),
        "table2": table2(col, window),
        "table3": table3(col, prune_ratio),
        "table4": table4(col, window),
        "table5": table5(col),
        "mil": table_mil(col),
    }
    sections = [
        f"# hirespath report\n\nSources: {', '.join(str(d) for d in dirs)}  \n"
        f"{len(col.runs)} runs with metrics.json, {len(col.bench)} benchmark rows. "
        f"Defaults for 'ours': window={window}, prune_ratio={prune_ratio}.\n"
    ]
    written = {}
    for name, table in tables.items():
        title = TABLES[name][0]
        if not len(table):
            sections.append(f"## {title}\n\n(no matching runs)\n")
            continue
        with atomic_path(out / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
        md = mil_markdown(table) if name == "mil" else to_markdown(table)
        write_text(out / f"{name}.md", md + "\n")
        sections.append(f"## {title}\n\n{md}\n")
        written[name] = table
    fig = figure1(tables["table1"], out / "figure1.png", metric) if len(tables["table1"]) else None
    if fig:
        sections.append("## Figure 1\n\n![Figure 1](figure1.png)\n")
    if len(col.runs):
        with atomic_path(out / "runs.csv") as tmp:
            col.runs.to_csv(tmp, index=False)
    if col.skipped:
        with atomic_path(out / SKIPPED_FILE) as tmp:
            pd.DataFrame(col.skipped, columns=["path", "reason"]).to_csv(tmp, index=False)
        sections.append(f"{len(col.skipped)} files skipped: see {SKIPPED_FILE}\n")
    write_text(out / "report.md", "\n".join(sections))
    log.info("report written to %s (%s)", out, ", ".join(written) or "no tables")
    return {"out_dir": str(out), "tables": tables, "figure": str(fig) if fig else None, "collected": col}

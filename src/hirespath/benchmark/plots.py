"""Benchmark plot: time and memory vs resolution, one line per attention configuration."""

from __future__ import annotations

from pathlib import Path

from ..utils.io import atomic_path
from .spec import COLUMNS, BenchConfig, asked_backend


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Time and memory vs resolution, log axes, one line per configuration."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    # one line per configuration: the backend asked for (it may run another kernel at some resolutions)
    keys = df.assign(backend=df.sparse_backend.map(asked_backend), parallel=df.cpu_parallel.fillna("auto"))
    for _, group in keys.groupby(
        ["attention", "window", "prune_ratio", "prune_layer", "backend", "parallel"], sort=False
    ):
        cfg = BenchConfig.of_row(group.iloc[0])
        ok = group[group.status == "ok"]
        for ax, col in zip(axes, ("seconds_per_image", "peak_memory_gb")):
            (line,) = ax.plot(ok.resolution, ok[col], marker="o", label=cfg.label)
            oom = group[group.status == "oom"]
            if len(oom):
                ax.axvline(oom.resolution.min(), color=line.get_color(), ls=":", lw=1)
    # label the measured resolutions themselves (log-axis default ticks are powers of ten), skipping a label
    # that would overlap the previous one
    resolutions, labels, last = sorted(int(r) for r in df.resolution.unique()), [], 0
    for r in resolutions:
        labels.append(str(r) if r >= 1.25 * last else "")
        last = r if labels[-1] else last
    for ax, col, ylabel in zip(
        axes, ("seconds_per_image", "peak_memory_gb"), ("seconds per image", "peak memory (GB)")
    ):
        ax.set_xscale("log")
        ax.set_xticks(
            resolutions,
            labels,
            rotation=45 if len(resolutions) > 5 else 0,
            ha="right" if len(resolutions) > 5 else "center",
        )
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if (df[col] > 0).any():
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    device = df.device.iloc[0] if len(df) else ""
    backbone, dtype = (df.backbone.iloc[0], df.dtype.iloc[0]) if len(df) else ("", "")
    fig.suptitle(title or f"{backbone} on {device} ({dtype}); dotted: first OOM")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

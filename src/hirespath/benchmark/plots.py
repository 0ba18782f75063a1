"""Benchmark plot: time and memory vs resolution, one line per attention configuration."""

from __future__ import annotations

from pathlib import Path

from ..viz.figures import pyplot, save_png
from .spec import COLUMNS, BenchConfig, asked_backend


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Time and memory vs resolution, log axes, one line per configuration."""
    import pandas as pd

    plt = pyplot()
    import matplotlib.ticker

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
        if (df.loc[df.status == "ok", col] > 0).any():  # what is drawn (an oom row keeps the peak it reached)
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
    save_png(fig, path)


def plot_segmentation(rows: list[dict], path: Path, title: str = "") -> None:
    """Whole-slide segmentation (``experiment=segment_speed``): tissue mm² per second per tiling, with the speed-up
    and its two factors; and, where measured, the seam Dice of both blends (bar: mean, dots: the classes)."""
    import json

    import pandas as pd

    plt = pyplot()

    df = pd.DataFrame(rows)
    for column in ("mm2_per_s", "speedup", "px_per_tissue_px", "encode_s_per_mpx"):  # absent when every entry failed
        df[column] = df[column] if column in df else float("nan")
    labels = [f"{r.tile_size} px {r.attention}" + (f" w={r.window}" if r.attention == "sparse" else "")
              + f"\noverlap {r.overlap} px" for r in df.itertuples()]  # fmt: skip
    x = range(len(df))
    fig, (speed, seams) = plt.subplots(1, 2, figsize=(max(9, 3.2 * len(df)), 4.4))
    bars = speed.bar(x, df.mm2_per_s.fillna(0), 0.6, color="tab:blue")
    for bar, r in zip(bars, df.itertuples()):
        if not r.mm2_per_s > 0:  # an entry that failed (its row's status and error say how)
            speed.text(bar.get_x() + bar.get_width() / 2, 0, "failed", ha="center", va="bottom", color="tab:red")
            continue
        speed.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r.speedup:.2f}×", ha="center",
                   va="bottom", fontsize=9, fontweight="bold")  # fmt: skip
        speed.text(bar.get_x() + bar.get_width() / 2, bar.get_height() / 2,
                   f"{r.px_per_tissue_px:.2f} px per\ntissue px\n\n{r.encode_s_per_mpx:.2f} s/Mpx",
                   ha="center", va="center", fontsize=7, color="white")  # fmt: skip
    speed.set_xticks(list(x), labels, fontsize=8)
    speed.set_ylabel("tissue mm² per second (end to end)")
    speed.set_ylim(0, (df.mm2_per_s.max() if df.mm2_per_s.gt(0).any() else 1) * 1.15)
    speed.set_title("speed", fontsize=10)
    if "seam_dice_linear" in df and df.seam_dice_linear.notna().any():
        width = 0.35
        for k, (blend, color) in enumerate((("linear", "tab:green"), ("crop", "tab:orange"))):
            pos = [i + (k - 0.5) * width for i in x]
            seams.bar(pos, df[f"seam_dice_{blend}"], width, color=color, alpha=0.6, label=f"{blend} blend: mean")
            for p, per_class in zip(pos, df.seam_dice_per_class):
                dice = list(json.loads(per_class)[blend].values()) if isinstance(per_class, str) else []
                seams.scatter([p] * len(dice), dice, s=10, color=color, edgecolor="black", linewidth=0.3, zorder=3)
        seams.set_xticks(list(x), labels, fontsize=8)
        seams.set_ylim(0, 1.05)
        seams.set_ylabel("Dice, stitched vs one forward")
        seams.legend(fontsize=8, loc="lower right")
        seams.set_title(f"seams on a {int(df.seam_region.iloc[0])} px region (dots: classes)", fontsize=10)
        constant = int(df.get("seam_constant_classes", pd.Series([0])).fillna(0).max())
        if constant:  # a class that is one value all over the one forward (a random head): Dice 1 by construction
            seams.text(0.5, 0.5, f"{constant} classes constant in the one forward\n(a random head?): their Dice says "
                       "nothing", ha="center", va="center", transform=seams.transAxes, fontsize=9,
                       bbox=dict(facecolor="white", alpha=0.85))  # fmt: skip
    else:  # a region no entry's tiles cross (one tile covers it) has no seam either: NaN, as when not run
        asked = "seam_region" in df and df.seam_region.fillna(0).gt(0).any()
        why = "one tile covers the region:\nno seam in it" if asked else "seam measure not run\n(seam_region=0)"
        seams.text(0.5, 0.5, why, ha="center", va="center", transform=seams.transAxes)
        seams.set_axis_off()
    first = df.iloc[0]
    fig.suptitle(title or f"whole-slide segmentation, {first.get('model', '')} on {first.get('device', '')}: "
                 f"{first.tissue_mm2:.2f} mm² of tissue", fontsize=10)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path)

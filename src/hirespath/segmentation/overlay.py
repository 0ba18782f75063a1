"""``<slide>_overlay.png``: the slide's thumbnail with each class's mask in its colour, and a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..viz.figures import pyplot, save_png


def class_masks_at(small_probs: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    """C×h×w bool masks of the coarsest probability level (C×H×W uint8) resized to ``size`` (w, h)."""
    from PIL import Image

    w, h = size
    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize((w, h), Image.BILINEAR)) > threshold * 255
        for plane in small_probs
    ])  # fmt: skip


def save_overlay(path: Path, thumbnail: np.ndarray, masks: np.ndarray, classes: list[str], colors: list, title: str,
                 areas_mm2: list[float]) -> Path:  # fmt: skip
    from matplotlib.patches import Patch

    plt = pyplot()

    img = thumbnail.astype(np.float32) / 255
    for m, col in zip(masks, colors):
        img[m] = 0.45 * img[m] + 0.55 * np.asarray(col, np.float32) / 255
    h, w = img.shape[:2]
    fig, ax = plt.subplots(figsize=(min(14, 4 + 8 * w / max(h, w)), min(12, 1 + 8 * h / max(h, w))), dpi=110)
    ax.imshow(img)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    handles = [
        Patch(color=np.asarray(c) / 255, label=f"{n} ({a:.3g} mm²)") for n, c, a in zip(classes, colors, areas_mm2)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    return save_png(fig, path, dpi="figure", bbox_inches="tight")

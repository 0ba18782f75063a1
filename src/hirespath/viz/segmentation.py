"""Prediction overlays for SegPath: image, ground truth (green) and prediction (magenta) of the labelled type."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .figures import pyplot, save_png


def segmentation_overlay(image: np.ndarray, target: np.ndarray, pred: np.ndarray, title: str, path: str | Path):
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    axes[0].imshow(image)
    axes[0].set_title("H&E", fontsize=9)
    for ax, m, colour, name in (
        (axes[1], target == 1, (0, 1, 0), "ground truth"),
        (axes[2], pred == 1, (1, 0, 1), "prediction"),
    ):
        ax.imshow(image)
        rgba = np.zeros((*m.shape, 4))
        rgba[m] = (*colour, 0.45)
        ax.imshow(rgba)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)

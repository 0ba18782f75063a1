"""Figures of the method (paper Fig. 3): pruned tokens over the image, and the sparse attention pattern."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kept_mask(positions: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """rows×cols boolean: True where the patch token survived pruning."""
    kept = np.zeros(grid, dtype=bool)
    pos = positions.cpu().numpy()
    kept[pos[:, 0], pos[:, 1]] = True
    return kept


def pruned_token_overlay(image: np.ndarray, positions: torch.Tensor, grid: tuple[int, int], patch: int,
                         path: str | Path | None = None, title: str = ""):
    """The ROI with every pruned patch drawn as a red square; returns the figure (and saves a PNG)."""
    from matplotlib.patches import Rectangle

    plt = _plt()
    kept = kept_mask(positions, grid)
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    ax.imshow(image)
    for r, c in zip(*np.nonzero(~kept)):
        ax.add_patch(Rectangle((c * patch, r * patch), patch, patch, fill=False, edgecolor="red", lw=0.6))
    ax.set_title(title or f"pruned {int((~kept).sum())} of {kept.size} patches (red)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def sparse_pattern_figure(window: int, radius: int = 1, grid: tuple[int, int] = (12, 12), num_prefix: int = 1,
                          query: tuple[int, int] | None = None, path: str | Path | None = None):
    """Left: which patches one query token attends to on the grid (its block neighbourhood, block lines drawn).
    Right: the full (prefix + patches)² attention mask of that small grid, block structure visible."""
    from ..models.attention import TokenLayout, sparse_reference_mask

    plt = _plt()
    layout = TokenLayout.full_grid(1, grid, num_prefix, "cpu")
    mask = sparse_reference_mask(layout, window, radius)[0].numpy()
    q = query or (grid[0] // 2, grid[1] // 2)
    qi = num_prefix + q[0] * grid[1] + q[1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    axes[0].imshow(mask[qi, num_prefix:].reshape(grid), cmap="Blues", vmin=0, vmax=1.5)
    axes[0].scatter([q[1]], [q[0]], c="red", s=30, marker="s")
    for b in range(0, max(grid) + 1, window):
        axes[0].axhline(b - 0.5, color="gray", lw=0.5)
        axes[0].axvline(b - 0.5, color="gray", lw=0.5)
    axes[0].set_title(f"query patch {q} attends to (blue), window {window}, radius {radius}", fontsize=9)
    # patches in block-major order, so each block's rows and columns are contiguous in the picture
    pos = layout.positions[0]
    order = np.lexsort((pos[:, 1].numpy(), pos[:, 0].numpy(), (pos[:, 1] // window).numpy(), (pos[:, 0] // window).numpy()))
    perm = np.concatenate([np.arange(num_prefix), num_prefix + order])
    axes[1].imshow(mask[np.ix_(perm, perm)], cmap="Greys", interpolation="nearest")
    axes[1].set_title(f"attention mask: {num_prefix} global + {grid[0]}×{grid[1]} patch tokens (block-major)",
                      fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig

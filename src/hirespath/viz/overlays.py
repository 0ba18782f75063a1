"""Figures of the method (paper Fig. 3): pruned tokens over the image, and the sparse attention pattern."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..utils.wandb import log_images
from ..wsi.reader import SlideError
from ..wsi.rois import ROI, read_roi
from .figures import pyplot, save_png

log = logging.getLogger("hirespath.viz")


def kept_mask(positions: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """rows×cols boolean: True where the patch token survived pruning."""
    kept = np.zeros(grid, dtype=bool)
    pos = positions.cpu().numpy()
    kept[pos[:, 0], pos[:, 1]] = True
    return kept


def pruned_token_overlay(
    image: np.ndarray,
    positions: torch.Tensor,
    grid: tuple[int, int],
    patch: int,
    path: str | Path | None = None,
    title: str = "",
):
    """The ROI with every pruned patch drawn as a red square; returns the figure (and saves a PNG)."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    kept = kept_mask(positions, grid)
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    ax.imshow(image)
    for r, c in zip(*np.nonzero(~kept)):
        ax.add_patch(Rectangle((c * patch, r * patch), patch, patch, fill=False, edgecolor="red", lw=0.6))
    ax.set_title(title or f"pruned {int((~kept).sum())} of {kept.size} patches (red)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    if path:
        save_png(fig, path, close=False)
    return fig


def sparse_pattern_figure(
    window: int,
    radius: int = 1,
    grid: tuple[int, int] = (12, 12),
    num_prefix: int = 1,
    query: tuple[int, int] | None = None,
    path: str | Path | None = None,
):
    """Left: which patches one query token attends to on the grid (its block neighbourhood, block lines drawn).
    Right: the full (prefix + patches)² attention mask of that small grid, block structure visible."""
    from ..models.attention import TokenLayout, sparse_reference_mask

    plt = pyplot()
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
    order = np.lexsort(
        (pos[:, 1].numpy(), pos[:, 0].numpy(), (pos[:, 1] // window).numpy(), (pos[:, 0] // window).numpy())
    )
    perm = np.concatenate([np.arange(num_prefix), num_prefix + order])
    axes[1].imshow(mask[np.ix_(perm, perm)], cmap="Greys", interpolation="nearest")
    axes[1].set_title(
        f"attention mask: {num_prefix} global + {grid[0]}×{grid[1]} patch tokens (block-major)", fontsize=9
    )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path:
        save_png(fig, path, close=False)
    return fig


def save_pruned_token_figures(
    encoder, root: Path, rois: pd.DataFrame, resolution: int, out_dir: Path, loggers, n: int = 2
) -> list[Path]:
    """Pruned-token overlays for the first ``n`` test ROIs and a picture of the sparse attention pattern."""
    plt = pyplot()

    paths = []
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for r in rois[rois.split == "test"].itertuples():
        if len(paths) >= n:
            break
        try:
            rgb = read_roi(
                root / "train_images" / f"{r.image_id}.tiff", ROI(r.x, r.y, r.size, r.tissue_fraction), resolution
            )
        except SlideError as err:  # a ROI that failed extraction is in skipped.csv; draw the next one
            log.warning("no figure for %s: %s", r.image_id, err)
            continue
        img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)[None]
        with torch.inference_mode():
            out = encoder(encoder.normalize(img))
        path = figs / f"pruned_tokens_{r.image_id}_{r.roi}.png"
        fig = pruned_token_overlay(
            rgb,
            out.positions[0],
            out.grid,
            encoder.patch_size,
            path,
            title=f"{r.image_id} (ISUP {r.label}): pruned patches in red",
        )
        plt.close(fig)
        paths.append(path)
    if encoder.attention == "sparse":
        path = figs / "sparse_attention_pattern.png"
        fig = sparse_pattern_figure(
            encoder.window,
            encoder.radius,
            num_prefix=encoder.num_prefix_tokens,
            path=path,
            grid=(min(5 * encoder.window, 40),) * 2,
        )
        plt.close(fig)
        paths.append(path)
    log_images(loggers, "figures", paths)
    return paths

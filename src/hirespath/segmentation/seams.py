"""The seam measure: how far a prediction stitched from tiles is from one forward over the whole region.

A region that fits one forward is predicted (1) in one forward and (2) as overlapping tiles blended by :mod:`.stitch`
exactly as a slide is (same weights, same uint8 map); the per-class Dice of the thresholded maps and the mean absolute
probability difference say what tiling costs. 1.0 / 0.0 would be seam-free; context lost at tile borders and blending
both lower the Dice. Two uses:

- :func:`seam_measure`: the benchmark's, on any image, both blends (to choose one);
- :func:`seam_window`: each slide run's, on the slide itself, for one extra forward per slide: a tile-sized window
  centred where four tiles of the slide's own grid overlap (the seams cross there) is predicted in one forward and
  compared with the slide's stitched map (``segment.seam_check``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from .model import tile_probabilities
from .stitch import BLENDS, ProbabilityStitcher, blend_weights, to_uint8

log = logging.getLogger("hirespath.segmentation")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side, every ``tile − overlap`` px as on a slide's grid, as many as fit in ``length``
    (one when the tile does not fit). A last tile flush with the end overlapped its neighbour by more than
    ``overlap``, where the crop blend then averaged instead of cropping; what lies past the last tile is left out."""
    if tile >= length:
        return [0]
    return list(range(0, length - tile + 1, tile - overlap))


def _device(model) -> torch.device:
    """Where the model's weights are (the seam measure runs where the benchmark put the model: CPU or CUDA)."""
    return next(model.parameters()).device


def predict_uint8(model, class_index: list[int], image: np.ndarray) -> np.ndarray:
    """C×H×W uint8 probabilities (· 255) of an H×W×3 uint8 image in one forward."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(_device(model)).float() / 255
    with torch.inference_mode():
        p = tile_probabilities(model, x, class_index)[0].cpu().numpy()
    return to_uint8(p)


def covered(image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """The part of ``image`` (H×W×3) that :func:`tile_starts`' tiles cover: the region a seam measure compares."""
    ys, xs = tile_starts(image.shape[0], tile, overlap), tile_starts(image.shape[1], tile, overlap)
    return image[: ys[-1] + tile, : xs[-1] + tile]


def stitched_uint8(model, class_index: list[int], image: np.ndarray, tile: int, overlap: int, blend: str,
                   folder: Path) -> np.ndarray:  # fmt: skip
    """C×H×W uint8 probabilities of ``image`` (as :func:`covered` cuts it) from its tiles, blended."""
    H, W = image.shape[:2]
    starts = [(x, y) for y in tile_starts(H, tile, overlap) for x in tile_starts(W, tile, overlap)]
    weights = blend_weights(tile, overlap, blend)
    st = ProbabilityStitcher(folder, f".seams.{blend}", (H, W), len(class_index), weights, positions=starts)
    try:
        for x, y in starts:
            crop = torch.from_numpy(np.array(image[y : y + tile, x : x + tile])).permute(2, 0, 1)
            with torch.inference_mode():
                batch = crop[None].to(_device(model)).float() / 255
                p = tile_probabilities(model, batch, class_index)[0].cpu().numpy()
            st.add(x, y, p)
        return np.array(st.finalize())
    finally:
        st.cleanup()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; NaN when both are empty (nothing to agree on)."""
    total = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def compare(stitched: np.ndarray, one: np.ndarray, classes: list[str], threshold: float) -> dict:
    """{"dice": {class: Dice or None}, "mean_dice" (over the classes present in either), "mean_abs_diff"} of two
    C×H×W uint8 probability maps (· 255)."""
    cut = threshold * 255
    per = {c: dice(stitched[k] > cut, one[k] > cut) for k, c in enumerate(classes)}
    finite = [v for v in per.values() if np.isfinite(v)]
    return {"dice": {c: v if np.isfinite(v) else None for c, v in per.items()},  # None: absent from both (JSON)
            "mean_dice": float(np.mean(finite)) if finite else float("nan"),
            "mean_abs_diff": float(np.abs(stitched.astype(np.int16) - one).mean() / 255)}  # fmt: skip


def constant_classes(one: np.ndarray, classes: list[str]) -> list[str]:
    """The classes whose one-forward probability is a single value over the whole region. An untrained head
    saturates every class at 1 (its ~100 queries' masks sum past 1): then every tiling gets Dice 1.0 and no
    difference, and the measure says nothing about seams."""
    flat = one.reshape(one.shape[0], -1)
    return [c for k, c in enumerate(classes) if flat[k].min() == flat[k].max()]


def seam_measure(model, class_index: list[int], classes: list[str], image: np.ndarray, tile: int, overlap: int,
                 threshold: float = 0.5, blends=BLENDS) -> dict:  # fmt: skip
    """{blend: {"dice": {class: Dice}, "mean_dice", "mean_abs_diff", "constant_classes", "tiles"}} of tiles vs one
    forward over ``image`` (the part its tiles cover: :func:`covered`); a warning when every class is constant over
    it (``constant_classes``), and when one tile covers it: no seam is crossed (Dice and difference NaN)."""
    image = covered(image, tile, overlap)
    n = len(tile_starts(image.shape[0], tile, overlap)) * len(tile_starts(image.shape[1], tile, overlap))
    if n == 1:
        log.warning("seam measure: %d px tiles cover the %d px region in one tile, so no seam lies in it (Dice "
                    "and |Δp| left out: NaN); a region larger than the tile measures them (segment_bench."
                    "seam_region)", tile, image.shape[0])  # fmt: skip
        none = {"dice": dict.fromkeys(classes), "mean_dice": float("nan"), "mean_abs_diff": float("nan")}
        return {blend: {**none, "constant_classes": [], "tiles": 1} for blend in blends}
    one = predict_uint8(model, class_index, image)
    constant = constant_classes(one, classes)
    if constant and len(constant) == len(classes):
        log.warning(
            "seam measure (%d px tiles, %d px region): every class's probability is one value over the whole "
            "region (uint8 %s; an untrained head saturates), so its Dice of 1.0 says nothing about seams; measure "
            "a trained model (benchmark: segment_bench.ckpt=RUN)",
            tile, image.shape[0], sorted(set(one[:, 0, 0].tolist())),  # every pixel's values: the first one's
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        return {blend: {**compare(stitched_uint8(model, class_index, image, tile, overlap, blend, Path(tmp)), one,
                                  classes, threshold), "constant_classes": constant, "tiles": n}
                for blend in blends}  # fmt: skip


def seam_window(
    coords: np.ndarray, stride: int, tissue_fraction: np.ndarray, scale: float = 1.0
) -> tuple[int, int] | None:
    """Level-0 top-left of a window of one tile, shifted by half a stride from a tile whose right, lower and diagonal
    neighbours are all in the grid: it is centred on the overlap of those four tiles, where both seams cross. Of all
    such places, the one with the most tissue under its four tiles (unknown fractions, NaN, count as none: the
    first such place); None when the grid has no 2×2 block of tiles."""
    tissue_fraction = np.nan_to_num(np.asarray(tissue_fraction, dtype=np.float64), nan=0.0)
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(np.asarray(coords).reshape(-1, 2))}
    best, where = -1.0, None
    for x, y in index:
        quad = [index.get((x + dx, y + dy)) for dx, dy in ((0, 0), (stride, 0), (0, stride), (stride, stride))]
        if None in quad:
            continue
        score = float(np.sum(tissue_fraction[quad]))
        if score > best:
            best, where = score, (x, y)
    if where is None:
        return None
    half = _half_stride(stride, scale)
    return where[0] + half, where[1] + half


def _half_stride(stride: int, scale: float) -> int:
    """The level-0 offset from a tile's corner, near half a stride, that is a whole number of map px (``scale``:
    map px per level-0 px): the window then lies on the map's pixels as that tile does. Half a stride often falls
    between two (at 2/3 map px per level-0 px, 61 px is 40.67 map px), and the window was compared with the map a
    fraction of a pixel off (Dice 0.79 for a model without seams)."""

    def off_grid(o: int) -> float:
        return round(abs(o * scale - round(o * scale)), 6)

    return min(range(stride // 4, stride - stride // 4 + 1), key=lambda o: (off_grid(o), abs(o - stride / 2)))

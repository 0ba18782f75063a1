"""A synthetic PANDA download in the real layout: train.csv, JPEG-tiled pyramidal TIFFs, label masks.

Slides are pink tissue bands on a white background, ~0.5 µm/px, levels at downsample 1/4/16, tile 256,
resolution tags in centimetres, exactly as the PANDA files are written; OpenSlide and tiffslide read them.
The ISUP grade only shows in fine detail: the density of small dark nuclei grows with the grade while
pale spots keep the tissue's mean colour fixed, so a low-resolution view of the ROI loses the signal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("hirespath.synthetic")

GLEASON_BY_GRADE = {0: "0+0", 1: "3+3", 2: "3+4", 3: "4+3", 4: "4+4", 5: "4+5"}
TISSUE_RGB = np.array([226, 160, 200], dtype=np.float32)
NUCLEUS_RGB = np.array([90, 40, 120], dtype=np.float32)
PALE_RGB = np.array([250, 225, 240], dtype=np.float32)


def write_pyramid(
    path: Path,
    image: np.ndarray,
    mpp: float,
    *,
    compression: str,
    levels: tuple[int, ...] = (1, 4, 16),
    tile: int = 256,
) -> None:
    """Write a tiled multi-resolution TIFF (reduced levels as subfiletype=1 pages), resolution in cm."""
    import tifffile
    from PIL import Image

    px_per_cm = 1e4 / mpp
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        for i, down in enumerate(levels):
            if down == 1:
                level = image
            else:
                h, w = image.shape[0] // down, image.shape[1] // down
                if min(h, w) < 1:
                    break
                level = np.asarray(Image.fromarray(image).resize((w, h), Image.BOX))
            kwargs = dict(compressionargs={"level": 90}) if compression == "jpeg" else {}
            tif.write(
                level,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                resolution=(px_per_cm / down, px_per_cm / down),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **kwargs,
            )
    tmp.replace(path)


def _draw_disks(img: np.ndarray, centres: np.ndarray, radius: float, colour: np.ndarray, inside: np.ndarray) -> None:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (yy**2 + xx**2) <= radius**2
    h, w = inside.shape
    for cy, cx in centres:
        y0, x0 = cy - r, cx - r
        if y0 < 0 or x0 < 0 or y0 + 2 * r + 1 > h or x0 + 2 * r + 1 > w:
            continue
        sub = disk & inside[y0 : y0 + 2 * r + 1, x0 : x0 + 2 * r + 1]
        img[y0 : y0 + 2 * r + 1, x0 : x0 + 2 * r + 1][sub] = colour


def make_slide(grade: int, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic biopsy: (RGB image, label mask) at level 0."""
    h, w = size
    img = np.full((h, w, 3), 243, dtype=np.float32)  # glass
    yy, xx = np.mgrid[0:h, 0:w]
    # a curved tissue band (needle biopsy), random orientation and thickness
    cy = h / 2 + rng.uniform(-0.1, 0.1) * h
    amp = rng.uniform(0.05, 0.15) * h
    centre = cy + amp * np.sin(2 * np.pi * xx / w * rng.uniform(0.5, 1.5) + rng.uniform(0, np.pi))
    half = rng.uniform(0.22, 0.32) * h
    inside = np.abs(yy - centre) < half
    inside &= (xx > 0.03 * w) & (xx < 0.97 * w)
    img[inside] = TISSUE_RGB + rng.normal(0, 4, size=(inside.sum(), 3))
    area = inside.sum()
    # Fine detail: nuclei (r≈1.6 px ≈ 0.8 µm) whose density rises with the grade; pale spots of the same
    # total area balance the mean colour so the grade is not visible once the ROI is shrunk a lot.
    density = 0.0015 + 0.0012 * grade
    n = int(area * density)
    coords = np.argwhere(inside)
    nuclei = coords[rng.integers(0, len(coords), n)]
    _draw_disks(img, nuclei, 1.6, NUCLEUS_RGB, inside)
    # pale counterweight: (ΔRGB of nuclei) · n_nuclei = (ΔRGB of pale) · n_pale
    ratio = float(np.abs(NUCLEUS_RGB - TISSUE_RGB).mean() / np.abs(PALE_RGB - TISSUE_RGB).mean())
    pale = coords[rng.integers(0, len(coords), int(n * ratio))]
    _draw_disks(img, pale, 1.6, PALE_RGB, inside)
    mask = np.zeros((h, w, 3), dtype=np.uint8)
    mask[..., 0][inside] = 1 if grade == 0 else min(5, 2 + grade // 2)  # Radboud-style labels in the red channel
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_synthetic_panda(
    root: str | Path,
    num_slides: int = 24,
    size: tuple[int, int] = (1536, 2048),
    mpp: float = 0.5,
    seed: int = 0,
    grades: tuple[int, ...] = (0, 1, 2, 3, 4, 5),
) -> Path:
    """Write ``num_slides`` slides (grades cycling through ``grades``) under ``root`` in PANDA's layout."""
    import pandas as pd
    from tqdm.auto import tqdm

    root = Path(root)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    (root / "train_label_masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(num_slides), desc="synthetic PANDA"):
        grade = grades[i % len(grades)]
        provider = "radboud" if i % 2 else "karolinska"
        image_id = f"{rng.integers(0, 16**12):012x}{i:04d}"  # hex ids, like PANDA's
        img, mask = make_slide(grade, size, rng)
        write_pyramid(root / "train_images" / f"{image_id}.tiff", img, mpp, compression="jpeg")
        write_pyramid(root / "train_label_masks" / f"{image_id}_mask.tiff", mask, mpp, compression="zlib")
        gleason = GLEASON_BY_GRADE[grade]
        if grade == 0 and provider == "karolinska":
            gleason = "negative"
        rows.append(dict(image_id=image_id, data_provider=provider, isup_grade=grade, gleason_score=gleason))
    from ..utils.io import atomic_path

    with atomic_path(root / "train.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    log.info("wrote %d synthetic PANDA slides to %s", num_slides, root)
    return root

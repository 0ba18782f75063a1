"""The ``data`` group: PANDA (ROIs and slides) and SegPath, with the readers' keyword names; which task reads which
data set; the numbers the readers need, checked before any file is read."""

from __future__ import annotations

# ruff: noqa: UP006, UP007, UP035, UP045  (typing's List/Optional: the annotations OmegaConf's schemas read)
from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig

from ..utils.config import Problems, is_int, is_number, one_of, select
from ..wsi.reader import PLAUSIBLE_MPP, plausible_mpp

# The data sets each task reads (conf/data/<name>.yaml).
TASK_DATA: dict[str, tuple[str, ...]] = {
    "classify": ("panda",),
    "extract": ("panda",),
    "segment": ("segpath",),
    "mil": ("panda_slides",),
}


@dataclass
class PandaDataConfig:
    """PANDA, read by ``hirespath.data.panda`` (``load_or_make_split``, ``locate_all``): their keyword names."""

    name: str = "panda"
    root: str = MISSING
    fov_um: float = 1715.0
    rois_per_slide: int = 1
    min_tissue: float = 0.05
    default_mpp: Optional[float] = None
    exclude: Optional[str] = None
    split_seed: int = 42
    split_csv: Optional[str] = None


@dataclass
class SegPathDataConfig:
    """``hirespath.data.segpath_datamodule.SegPathDataModule`` (the task passes resolution, mean and std)."""

    _target_: str = "hirespath.data.segpath_datamodule.SegPathDataModule"
    name: str = "segpath"
    root: str = MISSING
    batch_size: int = 2
    num_workers: int = 4
    skip_bad: bool = False
    max_items_per_type: Optional[int] = None
    cell_types: Optional[List[str]] = None
    balance_types: bool = False


@dataclass
class PandaSlidesDataConfig:
    """PANDA slides for MIL: ``panda_slide_labels`` (root, split_csv, exclude, split_seed: the ROI tasks' split) and
    ``MILDataModule``'s keyword arguments; ``default_mpp`` is the embedding's, for slides without resolution tags."""

    name: str = "panda_slides"
    root: str = MISSING
    split_seed: int = 42
    split_csv: Optional[str] = None
    exclude: Optional[str] = None
    default_mpp: Optional[float] = None
    max_tiles_train: Optional[int] = 1000
    max_tiles_eval: Optional[int] = None
    batch_size: int = 1
    num_workers: Optional[int] = None  # DataLoader workers; None: min(4, cores − 1), chosen at run time


def check_data(cfg: DictConfig, task: str | None, problems: Problems) -> None:
    """``data.name`` one of the task's data sets; the PANDA readers' numbers; SegPath's cell types."""
    if not isinstance(cfg.get("data"), DictConfig):
        return
    name = select(cfg, "data.name")
    if task in TASK_DATA and name is not None and name not in TASK_DATA[task]:
        owners = " and ".join(t for t, names in TASK_DATA.items() if name in names)
        why = f" ({name} is for {owners})" if owners else ""
        problems.bad("data.name", name, f"{one_of(name, TASK_DATA[task])} in the {task} task{why}")
    mpp = select(cfg, "data.default_mpp")
    lo, hi = PLAUSIBLE_MPP
    big = is_number(mpp) and mpp >= hi
    if mpp is not None and not (is_number(mpp) and plausible_mpp(mpp)):
        problems.bad(
            "data.default_mpp",
            mpp,
            f"null (slides without resolution tags are skipped) or a scan's microns per pixel, between {lo:g} and "
            f"{hi:g} (PANDA: 0.5; a 40x scan ≈ 0.25, 20x ≈ 0.5{': a magnification is not an mpp' if big else ''})",
        )
    if "fov_um" in cfg.data:
        fov = select(cfg, "data.fov_um")
        if not (is_number(fov) and fov > 0):
            problems.bad("data.fov_um", fov, "the ROI side in microns, > 0 (default 1715)")
    if "rois_per_slide" in cfg.data:
        n = select(cfg, "data.rois_per_slide")
        if not (is_int(n) and n >= 1):
            problems.bad("data.rois_per_slide", n, "an integer >= 1")
    if "min_tissue" in cfg.data:
        t = select(cfg, "data.min_tissue")
        if not (is_number(t) and 0 <= t <= 1):
            problems.bad("data.min_tissue", t, "a tissue fraction in [0, 1]")
    cell_types = select(cfg, "data.cell_types")
    if cell_types is not None:
        from ..data.segpath import CELL_TYPES

        unknown = [c for c in cell_types if c not in CELL_TYPES]
        if unknown or not cell_types:
            problems.bad(
                "data.cell_types", cell_types, f"null (all) or a list of SegPath cell types among {list(CELL_TYPES)}"
            )


def check_make_synthetic(cfg: DictConfig, problems: Problems) -> None:
    """make_synthetic's sizes: enough slides for the PANDA split, images large enough to hold ROIs."""
    from ..data.panda import MIN_SPLIT_SLIDES

    dataset = select(cfg, "dataset")
    if dataset not in ("panda", "segpath"):
        problems.bad("dataset", dataset, one_of(dataset, ["panda", "segpath"]))
    elif dataset == "panda":
        n = select(cfg, "num_slides")
        if not (is_int(n) and n >= MIN_SPLIT_SLIDES):
            problems.bad(
                "num_slides",
                n,
                f"an integer >= {MIN_SPLIT_SLIDES} (the 70/15/15 split needs a slide in train, val and test)",
            )
        for key in ("slide_height", "slide_width"):
            v: Any = select(cfg, key)
            if not (is_int(v) and v >= 64):
                problems.bad(key, v, "an integer >= 64 (pixels at level 0)")
        mpp = select(cfg, "mpp")
        if not (is_number(mpp) and mpp > 0):
            problems.bad("mpp", mpp, "microns per pixel > 0")
    else:
        for key in ("images_per_split", "size"):
            v = select(cfg, key)
            if not (is_int(v) and v >= 1):
                problems.bad(key, v, "an integer >= 1")

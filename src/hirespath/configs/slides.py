"""Slide work's groups: ``tile`` (the tiling) and ``embed`` (how tiles are read and embedded), shared by
``embed_slides``, ``mil`` (which embeds first) and the benchmark's ``mode=slides``; the job's paths.

Every value is checked once, before any model is built or any slide is opened: the tiling by the tiling's own
checker, ``tile.size`` against the backbone's patch size, the embedding options against the readers' and the
engine's choices, and ``job_dir`` / ``wsi_dir`` / ``slides`` / ``features_dir`` against the file system.
"""

from __future__ import annotations

# ruff: noqa: UP007, UP045  (typing's Optional: the annotations OmegaConf's schemas read)
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from ..utils.config import Problems, has_key, is_folder_name, is_int, is_number, one_of, select
from ..utils.errors import InputError
from ..wsi.listing import slide_extensions
from .model import Geometry, check_patch_multiple


@dataclass
class TilingConfig:
    """The tile grid: ``size`` px at ``mpp`` µm/px, ``overlap`` px between neighbours, tiles with at least
    ``min_tissue`` of tissue; with ``cover_tissue`` also the fewest others that hold the tissue those miss. Tissue:
    saturation above Otsu's threshold of each slide, or above ``tissue_threshold`` (0–255) when set."""

    size: int = 1792
    mpp: float = 0.5
    overlap: int = 0
    min_tissue: float = 0.25
    cover_tissue: bool = False
    tissue_threshold: Optional[float] = None


@dataclass
class EmbedConfig:
    """The embedding run: what is stored per tile, how tiles are read, what is drawn, how locks expire."""

    features: str = "cls"  # cls | mean | cls+mean
    tokens: bool = False
    token_scores: bool = False  # per-patch global-attention scores per tile (h5 `token_scores`: token heatmaps)
    batch_size: int = 4
    num_workers: Optional[int] = None  # tile readers; null: every core but two on CUDA (≤ 16), 1 on CPU
    reader: str = "threads"  # threads | workers
    threads: Optional[int] = None
    thumbnails: bool = True
    overlay_tiles: int = 2
    lock_stale_hours: float = 24.0
    encoder_tag: Optional[str] = None
    overwrite: bool = False  # replace features made with other settings (else such a run is refused)
    write_behind: Optional[bool] = None  # writes and slide closing behind the device; null: on CUDA only


EMBED_KEYS = ("features", "tokens", "batch_size", "num_workers", "reader", "threads", "thumbnails", "overlay_tiles",
              "lock_stale_hours", "encoder_tag", "overwrite")  # fmt: skip

# Keys that moved into the tile/embed nodes, per task: a config still using one is pointed at the new one.
TASK_RENAMED: dict[str, dict[str, str]] = {
    "embed_slides": {key: f"embed.{key}" for key in EMBED_KEYS},
    "mil": {"embed.job_dir": "job_dir"},
    "benchmark": {
        "slides.tile_size": "tile.size",
        "slides.tile_mpp": "tile.mpp",
        "slides.min_tissue": "tile.min_tissue",
        "slides.batch_size": "embed.batch_size",
        "slides.num_workers": "embed.num_workers",
        "slides.reader": "embed.reader",
        "slides.threads": "embed.threads",
    },
}

# The tasks whose slide-reading outputs go to ``job_dir``.
JOB_OUTPUTS = {"segment_slides": "segmentations"}  # the others write slide embeddings
JOB_TASKS = ("embed_slides", "mil", "predict_slides", "segment_slides")


def _tiling_checker():
    from ..wsi.tissue import check_tiling  # the tiling's own rules

    return check_tiling


def check_tile(cfg: DictConfig, geometry: Geometry, problems: Problems) -> None:
    """``tile.*`` by the tiling's checker, one key at a time (the others at valid values, so each bad key is
    named); ``tile.size`` a multiple of the backbone's patch size."""
    if not isinstance(cfg.get("tile"), DictConfig):
        return
    check_tiling = _tiling_checker()
    size, mpp = select(cfg, "tile.size"), select(cfg, "tile.mpp")
    overlap, min_tissue = select(cfg, "tile.overlap"), select(cfg, "tile.min_tissue")
    # of the wrong type (a string: +tile.min_tissue=abc), a value is named here, not by the checker's TypeError
    typed = {"size": (size, is_int, "an integer number of px"), "mpp": (mpp, is_number, "a number of µm/px > 0"),
             "overlap": (overlap, is_int, "an integer >= 0 (px)"),
             "min_tissue": (min_tissue, is_number, "a fraction in [0, 1]")}  # fmt: skip
    # null only where it means something: segment_slides' tile.mpp (the model's); the schema-typed tiles have none
    nullable = {"mpp"} if select(cfg, "task_name") == "segment_slides" else set()
    wrong = {key for key, (value, ok, _) in typed.items() if not ok(value) and not (value is None and key in nullable)}
    for key in sorted(wrong):
        problems.bad(f"tile.{key}", typed[key][0], typed[key][2])
    if wrong:
        return
    size_ok = problems.check("tile.size", size, check_tiling, size, 0.5)
    if size_ok:
        check_patch_multiple(problems, "tile.size", size, geometry, "the encoder sees each tile whole")
    if mpp is not None:  # segment_slides: null = the model's mpp
        problems.check("tile.mpp", mpp, check_tiling, 1, mpp)
    problems.check("tile.overlap", overlap, check_tiling, size if size_ok else 2**31, 0.5, overlap)
    problems.check("tile.min_tissue", min_tissue, check_tiling, 1, 0.5, 0, min_tissue)
    if has_key(cfg, "tile.cover_tissue") and not isinstance(cover := select(cfg, "tile.cover_tissue"), bool):
        problems.bad("tile.cover_tissue", cover, "true or false")
    if has_key(cfg, "tile.tissue_threshold") and (threshold := select(cfg, "tile.tissue_threshold")) is not None:
        if is_number(threshold):
            from ..wsi.tissue import check_tissue_threshold

            problems.check("tile.tissue_threshold", threshold, check_tissue_threshold, threshold)
        else:
            problems.bad("tile.tissue_threshold", threshold, "null (Otsu's threshold of each slide) or a saturation "
                         "in [0, 255) above which a pixel is tissue")  # fmt: skip


# what a segmentation checkpoint holds: segment_slides rebuilds the model from it alone, so these are refused rather
# than ignored (+resolution=...) or misread (+backbone.overrides.depth=... had asked for a backbone.name)
TRAINED_KEYS = ("backbone", "head", "pruner", "encoder", "resolution")


def check_model_from_checkpoint(cfg: DictConfig) -> None:
    """segment_slides: no key that the checkpoint decides (:data:`TRAINED_KEYS`); one error, before the other
    checks (a restated backbone would otherwise be checked as an incomplete one)."""
    restated = [key for key in TRAINED_KEYS if key in cfg]
    if not restated:
        return
    problems = Problems()
    for key in restated:
        if key == "pruner":
            problems.add("pruner: segment_slides does not prune (segmentation needs every patch's prediction); "
                         "drop +pruner=...")  # fmt: skip
        else:
            problems.add(f"{key}: segment_slides rebuilds the model ({key} included) from ckpt alone; drop "
                         f"+{key}... (attention.* and tile.mpp choose how the trained model runs)")  # fmt: skip
    problems.raise_if_any()


def untyped_node_keys(cfg: DictConfig) -> list[tuple[str, str, list[str]]]:
    """segment_slides' ``tile`` and ``attention`` nodes are plain, not schema-typed there: their keys that the
    schemas lack, as :func:`~hirespath.utils.config.unknown_keys` lists a typed node's (a misspelt key was ignored,
    or reached the model as an argument)."""
    import dataclasses

    from .model import AttentionConfig

    out = []
    for node, schema in (("tile", TilingConfig), ("attention", AttentionConfig)):
        fields = [f.name for f in dataclasses.fields(schema)]
        out += [(f"{node}.{key}", schema.__name__, fields) for key in select(cfg, node) or {} if key not in fields]
    return out


def check_embed(cfg: DictConfig, problems: Problems) -> None:
    """``embed.*`` against the engine's and the readers' choices (today they would fail on every slide)."""
    if not isinstance(cfg.get("embed"), DictConfig):
        return
    from ..embeddings.features import FEATURES
    from ..utils.threads import encoder_threads
    from ..wsi.tile_readers import READERS

    e = {key: select(cfg, f"embed.{key}") for key in EMBED_KEYS}
    if e["features"] not in FEATURES:
        problems.bad("embed.features", e["features"], one_of(e["features"], FEATURES))
    if not (is_int(e["batch_size"]) and e["batch_size"] >= 1):
        problems.bad("embed.batch_size", e["batch_size"], "an integer >= 1 (tiles per forward)")
    if e["num_workers"] is not None and not (is_int(e["num_workers"]) and e["num_workers"] >= 0):
        problems.bad(
            "embed.num_workers",
            e["num_workers"],
            "an integer >= 0 (tile readers; 0: read in the main thread) or null (automatic)",
        )
    if e["reader"] not in READERS:
        problems.bad("embed.reader", e["reader"], one_of(e["reader"], READERS))
    if e["threads"] is not None:
        problems.check("embed.threads", e["threads"], encoder_threads, e["threads"], 0, cores=1)
    if not (is_int(e["overlay_tiles"]) and e["overlay_tiles"] >= 0):
        problems.bad("embed.overlay_tiles", e["overlay_tiles"], "an integer >= 0 (tiles drawn per slide; 0: none)")
    hours = e["lock_stale_hours"]
    if not (is_number(hours) and hours > 0 and math.isfinite(hours)):
        problems.bad("embed.lock_stale_hours", hours, "a number of hours > 0 (a lock untouched so long is taken over)")
    tag = e["encoder_tag"]
    if tag is not None and not is_folder_name(tag):
        problems.bad("embed.encoder_tag", tag, "null or a folder name (no '/'), e.g. uni2_h_sparse")


def _is_entry_list(value: Any) -> bool:
    """A benchmark compare list: a list of mappings, one configuration each."""
    return isinstance(value, list) and all(isinstance(e, dict) for e in value)


def benchmark_entries(cfg: DictConfig) -> list[tuple[str, Any]] | None:
    """(key, entry) of the configurations a benchmark run builds, each over the composed attention and pruner
    groups: ``slides.compare`` (mode=slides), ``compare`` and ``max_resolution.compare`` (mode=encoder). None: the
    composed groups alone."""
    mode = select(cfg, "mode") if "mode" in cfg else "encoder"
    search = has_key(cfg, "max_resolution.enabled") and select(cfg, "max_resolution.enabled") is True
    lists = {"slides": ["slides.compare"], "encoder": ["compare"] + ["max_resolution.compare"] * search}.get(mode, [])
    entries = []
    for key in lists:
        value = select(cfg, key) if has_key(cfg, key) else None
        if value and _is_entry_list(value):
            entries += [(f"{key}[{i}]", entry) for i, entry in enumerate(value)]
        elif key != "max_resolution.compare":  # no list: the composed groups run (the search: the sweep's lines)
            entries.append(("pruner", {}))
    return entries or None


def check_benchmark_slides(cfg: DictConfig, geometry: Geometry, problems: Problems) -> None:
    """The benchmark's counts and memory budgets (``mode=encoder``), and its ``slides`` node: its precision and each
    ``slides.compare`` entry's tile size."""
    for key in ("compare", "slides.compare", "max_resolution.compare"):
        value = select(cfg, key) if has_key(cfg, key) else None
        if value is not None and not _is_entry_list(value):
            problems.bad(key, value, "null or a list of mappings, one per configuration, e.g. "
                         "[{attention: dense, prune_ratio: 0.0}, {attention: sparse, window: 8}]")  # fmt: skip
    for key, least in (("batch_size", 1), ("repeats", 1), ("warmup", 0)):
        value = select(cfg, key) if key in cfg else least
        if not (is_int(value) and value >= least):
            problems.bad(key, value, f"a whole number >= {least}")
    for key in ("memory_budget_gb", "max_resolution.memory_budget_gb"):
        value = select(cfg, key) if has_key(cfg, key) else None
        if value is not None and not (is_number(value) and value > 0):
            problems.bad(key, value, "a number of GB > 0, or null for no budget")
    if has_key(cfg, "max_resolution.limit") and geometry.patch:
        limit = select(cfg, "max_resolution.limit")
        if not (is_int(limit) and limit >= geometry.patch):
            problems.bad("max_resolution.limit", limit, f"a side in px >= the patch size ({geometry.patch})")
    if not isinstance(cfg.get("slides"), DictConfig):
        return
    from ..slides.tile_model import PRECISIONS

    precision = select(cfg, "slides.precision")
    if precision is not None and precision not in PRECISIONS:
        problems.bad("slides.precision", precision, one_of(precision, PRECISIONS))
    for i, entry in enumerate(select(cfg, "slides.compare") or []):
        if isinstance(entry, dict) and "tile_size" in entry:
            check_patch_multiple(problems, f"slides.compare[{i}].tile_size", entry["tile_size"], geometry)


def _output_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an output folder (None: it is one, or can be created)."""
    if path.exists():
        if not path.is_dir():
            return "it is an existing file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "the folder is not writable"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"it cannot be created: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"it cannot be created: {ancestor} is not writable"
    return None


def _path(cfg: DictConfig, key: str) -> Path | None:
    try:
        value = select(cfg, key)
    except Exception:  # an interpolation that only resolves inside a Hydra run (${hydra:...})
        return None
    return Path(str(value)).expanduser() if value not in (None, "") else None


def check_job_paths(cfg: DictConfig, task: str | None, problems: Problems) -> None:
    """The inputs and the output folder of a slide job, named as the user typed them: ``wsi_dir`` a folder,
    ``slides`` a CSV file, ``features_dir`` a folder, ``job_dir`` a folder that exists or can be created."""
    if task not in JOB_TASKS:
        return
    wsi_dir, slides = _path(cfg, "wsi_dir"), _path(cfg, "slides")
    if task == "embed_slides" and wsi_dir is None and slides is None:
        problems.add("wsi_dir=null, slides=null: give wsi_dir=DIR (a folder of slides) or slides=LIST.csv "
                     "(a column 'wsi')")  # fmt: skip
    if wsi_dir is not None and not wsi_dir.is_dir():
        what = "is a file, not a folder" if wsi_dir.exists() else "does not exist"
        problems.add(f"wsi_dir={str(wsi_dir)!r}: {what}; give the folder that holds the slides")
    if slides is not None and not slides.is_file():
        what = "is a folder (for a folder of slides use wsi_dir=)" if slides.is_dir() else "does not exist"
        problems.add(f"slides={str(slides)!r}: {what}; give a CSV file with a column 'wsi' (or 'path') of slides")
    recursive = select(cfg, "recursive") if has_key(cfg, "recursive") else False
    if recursive is not None and not isinstance(recursive, bool):  # recursive=no: a string, and bool("no") is True
        problems.bad("recursive", recursive, "true or false (whether to look in the sub-folders of wsi_dir too)")
    try:
        slide_extensions(select(cfg, "wsi_ext") if has_key(cfg, "wsi_ext") else None)
    except InputError as err:
        problems.add(str(err))
    features_dir = _path(cfg, "features_dir")
    if features_dir is not None and not features_dir.is_dir():
        what = "is a file, not a folder" if features_dir.exists() else "does not exist"
        problems.add(
            f"features_dir={str(features_dir)!r}: {what}; give a folder of <slide>.h5 feature files, or "
            "features_dir=null to embed the slides first"
        )
    job_dir = _path(cfg, "job_dir")
    if job_dir is not None and features_dir is None:
        why = _output_dir_problem(job_dir)
        if why:
            problems.add(
                f"job_dir={str(job_dir)!r}: {why}; give a folder to write the {JOB_OUTPUTS.get(task, 'embeddings')} to"
            )


def renamed_keys(cfg: DictConfig, renamed: dict[str, str]) -> list[tuple[str, str, Any]]:
    """(old key, new key, value) of every key of ``renamed`` that the config still sets."""
    return [(old, new, select(cfg, old)) for old, new in renamed.items() if has_key(cfg, old)]

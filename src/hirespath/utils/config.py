"""Config validation: a typo or an out-of-range value fails before any model is built or any data is read.

Types and key names of the config groups are checked by Hydra when it composes (the schemas of
``hirespath.configs``). ``validate_config(cfg)`` checks what composition cannot: keys added to a closed group with
Hydra's ``+key=value`` (which bypasses the schema), the value ranges of the keys every task shares (backbone,
attention, pruner, resolution, head and data names), and the options of the task that ``task_name`` names (which
heads and data it takes, ``features``, ``data.*`` numbers, ``extract.*``, make_synthetic's sizes). It raises one
``ConfigValidationError`` listing every problem as ``key=value: what is valid``. Keys a config does not have are
not checked, so every task's root config can go through it.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import InputError

# timm's default depth of the architectures whose preset does not set it explicitly.
_TIMM_DEPTH = {
    "vit_large_patch16_224": 24,
    "vit_huge_patch14_224": 32,
    "vit_giant_patch14_224": 40,
    "vit_giant_patch14_dinov2": 40,
    "vit_giant_patch14_reg4_dinov2": 40,
}

# The embedding features a task can average per slide (hirespath.tasks.classify / hirespath.embeddings.slides).
FEATURES = ("cls", "mean", "cls+mean")

# Which tasks use the options of the head and data groups (named in the error when a task gets another's).
OPTION_TASKS = {
    "knn": "classify",
    "linear_probe": "classify",
    "mask2former": "segment",
    "segpath": "segment",
    "panda": "classify and extract",
}

# The fewest PANDA slides the 70/15/15 split can cut into non-empty train, val and test splits.
MIN_SPLIT_SLIDES = 4

# Groups whose selected option's ``name`` must be one of the group's config files.
NAMED_GROUPS = ("head", "data")

# Keys renamed to the Python keyword names (create_encoder's); a config still using one gets pointed at the new one.
RENAMED = {
    "pruner.ratio": "pruner.prune_ratio",
    "pruner.layer": "pruner.prune_layer",
    "pruner.score_tokens": "pruner.prune_score_tokens",
    "attention.backend": "attention.sparse_backend",
}


class ConfigValidationError(InputError):
    """Raised by validate_config; the message lists every invalid key with its value and the valid range."""


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _choices(value: Any, valid: Iterable[str]) -> str:
    valid = list(valid)
    hint = difflib.get_close_matches(str(value), valid, n=1)
    return f"one of {valid}" + (f" (did you mean {hint[0]!r}?)" if hint else "")


def group_options(group: str) -> list[str] | None:
    """Config files of a group on the search path of the active Hydra (None outside Hydra); the schemas of
    ``hirespath.configs`` (``base_*``), which are no choice of their own, are left out."""
    from hydra.core.global_hydra import GlobalHydra

    from ..configs import SCHEMAS

    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        return None
    schemas = {name for g, name, _ in SCHEMAS if g == group}
    try:
        return sorted(o for o in gh.config_loader().get_group_options(group) if o not in schemas)
    except Exception:
        return None


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, str, list[str]]]:
    """(key, schema name, valid keys) of every key that a structured (dataclass-typed) node's schema lacks.

    Hydra refuses a misspelt ``group.key=value`` at composition, but ``+group.key=value`` force-adds it even to a
    closed structured config; this finds such keys (the ``hydra`` node is Hydra's own and skipped)."""
    out = []
    schema = OmegaConf.get_type(cfg)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        key = str(key)
        if not prefix and key == "hydra":
            continue
        if fields is not None and key not in fields:
            out.append((f"{prefix}{key}", schema.__name__, fields))
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not (node._is_none() or node._is_missing() or node._is_interpolation()):
            out += unknown_keys(node, f"{prefix}{key}.")
    return out


def backbone_geometry(name: str, overrides: dict | None) -> tuple[int, int | None]:
    """(patch size, depth or None if unknown) of a preset with its timm overrides, without building it."""
    from ..models.backbones import get_backbone

    preset = get_backbone(name)
    overrides = overrides or {}
    patch = int(overrides.get("patch_size", preset.patch_size))
    depth = overrides.get("depth", preset.kwargs.get("depth", _TIMM_DEPTH.get(preset.timm_name)))
    return patch, (int(depth) if depth is not None else None)


def validate_config(cfg: DictConfig) -> None:
    """Check the shared keys of a task config; raise one ConfigValidationError naming every bad key."""
    from ..models import ATTENTION_MODES, list_backbones
    from ..models.attention import SPARSE_BACKENDS
    from ..models.backbones import ResolutionError
    from ..models.backbones import check_resolution as check_patch_multiple
    from ..models.pruning import SCORE_TOKENS

    errors: list[str] = []

    def bad(key: str, value: Any, valid: str) -> None:
        errors.append(f"{key}={value!r}: must be {valid}")

    for key, schema, fields in unknown_keys(cfg):
        group, _, leaf = key.rpartition(".")
        if key in RENAMED:
            hint = f"renamed to {RENAMED[key]}"
        else:
            close = difflib.get_close_matches(leaf, fields, n=1)
            hint = f"did you mean {group + '.' if group else ''}{close[0]}?" if close else ""
        errors.append(f"{key}: not a key of {schema} (valid: {fields}){'; ' + hint if hint else ''}")

    patch, depth = None, None
    name = _get(cfg, "backbone.name")
    if "backbone" in cfg:
        if name not in list_backbones():
            bad("backbone.name", name, _choices(name, list_backbones()))
        else:
            overrides = _get(cfg, "backbone.overrides") or {}
            if not isinstance(overrides, dict):
                bad("backbone.overrides", overrides, "a mapping of timm keyword arguments")
                overrides = {}
            patch, depth = backbone_geometry(name, overrides)

    if "attention" in cfg:
        mode = _get(cfg, "attention.mode")
        if mode not in ATTENTION_MODES:
            bad("attention.mode", mode, _choices(mode, ATTENTION_MODES))
        window = _get(cfg, "attention.window")
        if window is not None and not (_is_int(window) and window >= 1):
            bad("attention.window", window, "an integer >= 1 (block side in patches)")
        radius = _get(cfg, "attention.radius")
        if radius is not None and not (_is_int(radius) and radius >= 0):
            bad("attention.radius", radius, "an integer >= 0 (neighbour blocks on each side)")
        backend = _get(cfg, "attention.sparse_backend")
        if backend is not None and backend not in SPARSE_BACKENDS:
            bad("attention.sparse_backend", backend, _choices(backend, SPARSE_BACKENDS))

    if "pruner" in cfg:
        ratio = _get(cfg, "pruner.prune_ratio")
        ratio_ok = _is_number(ratio) and 0 <= ratio < 1
        if not ratio_ok:
            bad(
                "pruner.prune_ratio",
                ratio,
                "a number in [0, 1) (fraction of patch tokens dropped; 0 disables pruning)",
            )
        layer = _get(cfg, "pruner.prune_layer")
        if not (ratio_ok and ratio == 0):  # pruning asked for (even with a bad ratio): the layer matters too
            top = f"{depth - 1}] ({name} has {depth} blocks)" if depth else "depth - 1]"
            if not _is_int(layer) or layer < 1 or (depth is not None and layer >= depth):
                bad("pruner.prune_layer", layer, f"an integer in [1, {top} when pruner.prune_ratio > 0")
        score = _get(cfg, "pruner.prune_score_tokens")
        if score is not None and score not in SCORE_TOKENS:
            bad("pruner.prune_score_tokens", score, _choices(score, SCORE_TOKENS))

    def check_resolution(key: str, value: Any) -> None:
        multiple = f" of the patch size {patch} ({name})" if patch else ""
        if not (_is_int(value) and value > 0):
            bad(key, value, f"a positive integer multiple{multiple}")
        elif patch:
            try:
                check_patch_multiple(value, patch)
            except ResolutionError as err:
                bad(key, value, f"a positive integer multiple{multiple}, e.g. {err.nearest[0]} or {err.nearest[1]}")

    if "resolution" in cfg and _get(cfg, "resolution") is not None:
        check_resolution("resolution", _get(cfg, "resolution"))
    if "resolutions" in cfg and _get(cfg, "resolutions") is not None:
        values = _get(cfg, "resolutions")
        if not isinstance(values, list) or not values:
            bad("resolutions", values, "a non-empty list of resolutions")
        else:
            for i, v in enumerate(values):
                check_resolution(f"resolutions[{i}]", v)

    cell_types = _get(cfg, "data.cell_types")
    if cell_types is not None:
        from ..data.segpath import CELL_TYPES

        unknown = [c for c in cell_types if c not in CELL_TYPES]
        if unknown or not cell_types:
            bad("data.cell_types", cell_types, f"null (all) or a list of SegPath cell types among {list(CELL_TYPES)}")

    _check_data(cfg, bad)
    _check_task_options(cfg, bad)

    for group in NAMED_GROUPS:
        if group in cfg and isinstance(cfg[group], DictConfig) and "name" in cfg[group]:
            options = group_options(group)
            value = _get(cfg, f"{group}.name")
            if options and value not in options:
                bad(f"{group}.name", value, _choices(value, options) + f" (the files in conf/{group}/)")

    if errors:
        errors = list(dict.fromkeys(errors))  # a key named by two checks is listed once
        raise ConfigValidationError("invalid configuration:\n  " + "\n  ".join(errors))


def _check_data(cfg: DictConfig, bad: Callable[[str, Any, str], None]) -> None:
    """The PANDA readers' numbers (``data.*``; ``embed_slides`` has ``data.default_mpp`` too)."""
    if not isinstance(cfg.get("data"), DictConfig):
        return
    mpp = _get(cfg, "data.default_mpp")
    if mpp is not None and not (_is_number(mpp) and mpp > 0):
        bad(
            "data.default_mpp",
            mpp,
            "null (slides without resolution tags are skipped) or microns per pixel > 0 (PANDA: 0.5)",
        )
    if "fov_um" in cfg.data:
        fov = _get(cfg, "data.fov_um")
        if not (_is_number(fov) and fov > 0):
            bad("data.fov_um", fov, "the ROI side in microns, > 0 (default 1715)")
    if "rois_per_slide" in cfg.data:
        n = _get(cfg, "data.rois_per_slide")
        if not (_is_int(n) and n >= 1):
            bad("data.rois_per_slide", n, "an integer >= 1")
    if "min_tissue" in cfg.data:
        t = _get(cfg, "data.min_tissue")
        if not (_is_number(t) and 0 <= t <= 1):
            bad("data.min_tissue", t, "a tissue fraction in [0, 1]")


def _precisions() -> list[str]:
    """The precision strings Lightning's Trainer accepts (its ``_PRECISION_INPUT``)."""
    import typing

    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:  # a Lightning without it: leave the check to the Trainer
        return []

    def flat(t) -> list:
        args = typing.get_args(t)
        return [x for a in args for x in flat(a)] if args else [t]

    return list(dict.fromkeys(str(v) for v in flat(_PRECISION_INPUT) if isinstance(v, (str, int))))


def _check_task_options(cfg: DictConfig, bad: Callable[[str, Any, str], None]) -> None:
    """Options of one task (by ``task_name``) that no schema types: which head and data a task can use, its
    ``features``, ``extract.*``, ``make_synthetic``'s sizes. Checked here so they fail before any data is read."""
    task = cfg.get("task_name")
    uses = {
        "classify": {"head.name": ("knn", "linear_probe"), "data.name": ("panda",)},
        "extract": {"data.name": ("panda",)},
        "segment": {"head.name": ("mask2former",), "data.name": ("segpath",)},
    }.get(task, {})
    for key, valid in uses.items():
        value = _get(cfg, key)
        if value is not None and value not in valid:
            owner = OPTION_TASKS.get(value)
            bad(
                key, value, f"one of {list(valid)} in the {task} task" + (f" ({value} is for {owner})" if owner else "")
            )
    if task in ("classify", "extract", "embed_slides") and "features" in cfg:
        features = _get(cfg, "features")
        if features not in FEATURES:
            bad("features", features, _choices(features, FEATURES))
    head_k = _get(cfg, "head.k") if isinstance(cfg.get("head"), DictConfig) else None
    if head_k is not None and not (_is_int(head_k) and head_k >= 1):
        bad("head.k", head_k, "an integer >= 1 (neighbours that vote)")
    if isinstance(cfg.get("extract"), DictConfig):
        for key, low in (("extract.batch_size", 1), ("extract.num_workers", 0), ("extract.flush_every", 1)):
            value = _get(cfg, key)
            if value is not None and not (_is_int(value) and value >= low):
                bad(key, value, f"an integer >= {low}")
        precision, valid = _get(cfg, "extract.precision"), _precisions()
        if valid and str(precision) not in valid:
            bad("extract.precision", precision, _choices(str(precision), valid))
    if isinstance(cfg.get("figures"), DictConfig):
        for key in ("num_rois", "num_slides"):  # classify/extract draw ROIs, mil draws slides
            if key in cfg.figures:
                n = _get(cfg, f"figures.{key}")
                if not (_is_int(n) and n >= 0):
                    bad(f"figures.{key}", n, "an integer >= 0 (0: no figures)")
    if task == "make_synthetic":
        dataset = _get(cfg, "dataset")
        if dataset not in ("panda", "segpath"):
            bad("dataset", dataset, _choices(dataset, ["panda", "segpath"]))
        elif dataset == "panda":
            n = _get(cfg, "num_slides")
            if not (_is_int(n) and n >= MIN_SPLIT_SLIDES):
                bad(
                    "num_slides",
                    n,
                    f"an integer >= {MIN_SPLIT_SLIDES} (the 70/15/15 split needs a slide in train, val and test)",
                )
            for key in ("slide_height", "slide_width"):
                v = _get(cfg, key)
                if not (_is_int(v) and v >= 64):
                    bad(key, v, "an integer >= 64 (pixels at level 0)")
            mpp = _get(cfg, "mpp")
            if not (_is_number(mpp) and mpp > 0):
                bad("mpp", mpp, "microns per pixel > 0")
        else:
            for key in ("images_per_split", "size"):
                v = _get(cfg, key)
                if not (_is_int(v) and v >= 1):
                    bad(key, v, "an integer >= 1")

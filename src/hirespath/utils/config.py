"""Config validation: a typo or an out-of-range value fails before any model is built or any data is read.

``validate_config(cfg)`` checks the keys every task shares (backbone, attention, pruner, resolution, head and
data names) and raises one ``ConfigValidationError`` listing every problem as ``key=value: what is valid``.
Keys a config does not have are not checked, so every task's root config can go through it.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# timm's default depth of the architectures whose preset does not set it explicitly.
_TIMM_DEPTH = {
    "vit_large_patch16_224": 24,
    "vit_huge_patch14_224": 32,
    "vit_giant_patch14_224": 40,
    "vit_giant_patch14_dinov2": 40,
    "vit_giant_patch14_reg4_dinov2": 40,
}

# Groups whose selected option's ``name`` must be one of the group's config files.
NAMED_GROUPS = ("head", "data")


class ConfigValidationError(ValueError):
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
    """Config files of a group on the search path of the active Hydra (None outside Hydra)."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        return None
    try:
        return sorted(gh.config_loader().get_group_options(group))
    except Exception:
        return None


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
    from ..models.backbones import ResolutionError
    from ..models.backbones import check_resolution as check_patch_multiple
    from ..models.pruning import SCORE_TOKENS

    errors: list[str] = []

    def bad(key: str, value: Any, valid: str) -> None:
        errors.append(f"{key}={value!r}: must be {valid}")

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

    if "pruner" in cfg:
        ratio = _get(cfg, "pruner.ratio")
        ratio_ok = _is_number(ratio) and 0 <= ratio < 1
        if not ratio_ok:
            bad("pruner.ratio", ratio, "a number in [0, 1) (fraction of patch tokens dropped; 0 disables pruning)")
        layer = _get(cfg, "pruner.layer")
        if ratio_ok and ratio > 0:
            top = f"{depth - 1}] ({name} has {depth} blocks)" if depth else "depth - 1]"
            if not _is_int(layer) or layer < 1 or (depth is not None and layer >= depth):
                bad("pruner.layer", layer, f"an integer in [1, {top} when pruner.ratio > 0")
        score = _get(cfg, "pruner.score_tokens")
        if score is not None and score not in SCORE_TOKENS:
            bad("pruner.score_tokens", score, _choices(score, SCORE_TOKENS))

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

    for group in NAMED_GROUPS:
        if group in cfg and isinstance(cfg[group], DictConfig) and "name" in cfg[group]:
            options = group_options(group)
            value = _get(cfg, f"{group}.name")
            if options and value not in options:
                bad(f"{group}.name", value, _choices(value, options) + f" (the files in conf/{group}/)")

    if errors:
        raise ConfigValidationError("invalid configuration:\n  " + "\n  ".join(errors))

"""The encoder's groups: ``backbone``, ``attention``, ``pruner`` (``create_encoder``'s keyword names).

Each check calls the checker of ``hirespath.models`` that ``create_encoder`` runs on the same argument, so a rule
is written once and a config fails with it before any model is built.
"""

from __future__ import annotations

# ruff: noqa: UP006, UP007, UP035, UP045  (typing's Dict/Optional: the annotations OmegaConf's schemas read)
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING, DictConfig

from ..utils.config import Problems, is_int, select


@dataclass
class BackboneConfig:
    """A registry preset (``hirespath.list_backbones()``), its local weights file and extra timm kwargs."""

    name: str = MISSING
    weights: Optional[str] = None  # None: random init; else a local checkpoint in timm key layout
    overrides: Optional[Dict[str, Any]] = field(default_factory=dict)  # timm kwargs, e.g. {depth: 2}; null: none


@dataclass
class AttentionConfig:
    """``create_encoder``'s attention arguments; ``mode`` is its ``attention=`` (dense | eager | sparse)."""

    mode: str = "sparse"
    window: int = 8
    radius: int = 1
    sparse_backend: str = "auto"  # auto | gather | flex | varlen


@dataclass
class PrunerConfig:
    """``create_encoder``'s token-pruning arguments (``prune_ratio=0`` disables pruning)."""

    prune_ratio: float = 0.0
    prune_layer: int = 4
    prune_score_tokens: str = "cls"  # cls | all


# Keys renamed to the Python keyword names (create_encoder's); a config still using one gets pointed at the new one.
RENAMED = {
    "pruner.ratio": "pruner.prune_ratio",
    "pruner.layer": "pruner.prune_layer",
    "pruner.score_tokens": "pruner.prune_score_tokens",
    "attention.backend": "attention.sparse_backend",
}


@dataclass(frozen=True)
class Geometry:
    """What the other groups' checks need of the backbone: its name, patch size and depth (None: unknown)."""

    name: str | None = None
    patch: int | None = None
    depth: int | None = None


def check_backbone(cfg: DictConfig, problems: Problems) -> Geometry:
    """``backbone.name`` a registered preset, ``backbone.overrides`` a mapping; returns the preset's geometry."""
    if "backbone" not in cfg:
        return Geometry()
    from ..models.backbones import get_backbone, preset_geometry

    name = select(cfg, "backbone.name")
    if not problems.check("backbone.name", name, get_backbone, name):
        return Geometry()
    overrides = select(cfg, "backbone.overrides") or {}
    if not isinstance(overrides, dict):
        problems.bad("backbone.overrides", overrides, "a mapping of timm keyword arguments")
        overrides = {}
    elif overrides and _emptied_on_the_command_line():
        # Hydra merges a mapping into the one composed (an experiment's narrowing): `={}` changes nothing, and a
        # GPU benchmark meant for the full model ran the narrowed one
        problems.add(
            f"backbone.overrides={{}}: Hydra merges it into the composed {dict(overrides)}, which stays; "
            f"backbone.overrides=null gives {name} as it is (or set a key: backbone.overrides.depth=...)"
        )
    for key in ("patch_size", "depth"):  # the other checks read them; timm would take a (h, w) patch, not these
        if key in overrides and not is_int(overrides[key]):
            problems.bad(f"backbone.overrides.{key}", overrides[key], "an integer")
            return Geometry(name)
    patch, depth = preset_geometry(name, overrides)
    return Geometry(name, patch, depth)


def arch_overrides(backbone: DictConfig) -> dict:
    """``backbone.overrides`` as a plain dict: {} for null or empty (an empty DictConfig is falsy, and
    ``OmegaConf.to_container(node or {})`` failed on the plain {} every preset's empty overrides gave)."""
    from omegaconf import OmegaConf

    node = backbone.get("overrides")
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def _emptied_on_the_command_line() -> bool:
    """Whether the running job's command line says ``backbone.overrides={}``."""
    from ..utils.hydra import job_overrides

    return any("".join(o.split()).lstrip("+") == "backbone.overrides={}" for o in job_overrides())


def check_attention(cfg: DictConfig, problems: Problems, as_trained: bool = False) -> None:
    """The ``attention`` group through ``models.attention``'s checkers (the ones ``create_encoder`` runs).
    ``as_trained``: every key may be null (segment_slides: the trained model's value)."""
    if "attention" not in cfg:
        return
    from ..models.attention import ATTENTION_CHECKS

    for key, checker in ATTENTION_CHECKS:
        value = select(cfg, f"attention.{key}")
        if value is not None or (key == "mode" and not as_trained):
            problems.check(f"attention.{key}", value, checker, value)


def check_pruner(
    cfg: DictConfig, geometry: Geometry, problems: Problems, entries: list[tuple[str, Any]] | None = None
) -> None:
    """The ``pruner`` group through ``models.pruning``'s checkers; the layer against the backbone's depth.
    ``entries``: (key, entry) of the configurations that run instead of the composed group alone (the benchmark's
    compare lists): each entry's prune_ratio/prune_layer over the composed ones, the layer checked for each."""
    if "pruner" not in cfg:
        return
    from ..models.pruning import check_prune_layer, check_prune_ratio, check_score_tokens

    ratio = select(cfg, "pruner.prune_ratio")
    ratio_ok = problems.check("pruner.prune_ratio", ratio, check_prune_ratio, ratio)
    layer = select(cfg, "pruner.prune_layer")
    for key, entry in entries or [("pruner", {})]:
        own_ratio, own_layer = "prune_ratio" in entry, "prune_layer" in entry
        r, lay = entry.get("prune_ratio", ratio), entry.get("prune_layer", layer)
        r_ok = problems.check(f"{key}.prune_ratio", r, check_prune_ratio, r) if own_ratio else ratio_ok
        # pruning asked for (even with a bad ratio): the layer matters too
        where = f"{key}.prune_layer" if own_layer else "pruner.prune_layer"
        problems.check(where, lay, check_prune_layer, lay, geometry.depth, r if r_ok else 1)
    score = select(cfg, "pruner.prune_score_tokens")
    if score is not None:
        problems.check("pruner.prune_score_tokens", score, check_score_tokens, score)


def check_patch_multiple(problems: Problems, key: str, value: Any, geometry: Geometry, what: str = "") -> None:
    """An image or tile side: a positive integer multiple of the backbone's patch size (``models``' rule)."""
    from ..models.backbones import check_resolution

    patch = geometry.patch
    if patch is None:  # backbone unknown (reported on its own): the side must still be a positive integer
        from ..utils.config import is_int

        if not (is_int(value) and value > 0):
            problems.bad(key, value, "a positive integer number of pixels")
        return
    hint = f"{geometry.name} patches{'; ' + what if what else ''}"
    problems.check(key, value, check_resolution, value, patch, what=key, hint=hint)

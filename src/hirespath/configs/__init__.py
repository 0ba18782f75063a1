"""Structured configs: the schemas of the config groups, registered in Hydra's ConfigStore, and their checks.

One module per concern: :mod:`.model` (backbone, attention, pruner), :mod:`.heads`, :mod:`.data`, :mod:`.slides`
(tile, embed and a slide job's paths); :mod:`.validate` runs them all.

Each file of a group starts with ``defaults: [base_<...>, _self_]`` (Hydra's schema pattern), so the group is
typed and closed: a misspelt key (``pruner.prune_ratoi=0.5``) or a wrong type (``attention.window=eight``) fails
when Hydra composes the config, with Hydra's message. Field names are the Python keyword names of what the group
builds (``create_encoder``'s ``prune_ratio``/``prune_layer``/``prune_score_tokens``/``sparse_backend``, the heads'
and the SegPath DataModule's constructor arguments, the slide engine's ``features``/``batch_size``/``reader``/...),
so configs reach the code without any renaming; the one exception is ``attention.mode``, which is
``create_encoder(attention=...)``.

Hydra's ``+key=value`` (and ``++``) adds keys even to a closed structured config (``force_add``);
:func:`validate_config` refuses such keys before a task starts, with the value ranges a type cannot express
(window >= 1, 0 <= ratio < 1, layer < depth, resolution and tile size multiples of the patch, ...), each checked by
the domain that owns the rule (``hirespath.models``, the tiling, the readers).

:func:`register_configs` runs where tasks start (``hirespath.tasks``), before any config is composed.
"""

from __future__ import annotations

import dataclasses

from ..utils.config import ConfigValidationError
from .data import TASK_DATA, PandaDataConfig, PandaSlidesDataConfig, SegPathDataConfig
from .heads import (
    TASK_HEADS,
    ABMILHeadConfig,
    AdapterConfig,
    KNNHeadConfig,
    LinearProbeHeadConfig,
    Mask2FormerHeadConfig,
    MeanPoolHeadConfig,
)
from .model import RENAMED, AttentionConfig, BackboneConfig, PrunerConfig
from .slides import TASK_RENAMED, EmbedConfig, TilingConfig
from .validate import composition_hint, validate_config

# (group, schema name, dataclass): conf/<group>/*.yaml list the schema name first in their defaults.
SCHEMAS = (
    ("backbone", "base_backbone", BackboneConfig),
    ("attention", "base_attention", AttentionConfig),
    ("pruner", "base_pruner", PrunerConfig),
    ("head", "base_knn", KNNHeadConfig),
    ("head", "base_linear_probe", LinearProbeHeadConfig),
    ("head", "base_mask2former", Mask2FormerHeadConfig),
    ("head", "base_abmil", ABMILHeadConfig),
    ("head", "base_mean_pool", MeanPoolHeadConfig),
    ("data", "base_panda", PandaDataConfig),
    ("data", "base_segpath", SegPathDataConfig),
    ("data", "base_panda_slides", PandaSlidesDataConfig),
    ("tile", "base_tile", TilingConfig),
    ("embed", "base_embed", EmbedConfig),
)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent: storing again replaces the same entries)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)


def schema_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


__all__ = [
    "RENAMED",
    "SCHEMAS",
    "TASK_DATA",
    "TASK_HEADS",
    "TASK_RENAMED",
    "ABMILHeadConfig",
    "AdapterConfig",
    "AttentionConfig",
    "BackboneConfig",
    "ConfigValidationError",
    "EmbedConfig",
    "KNNHeadConfig",
    "LinearProbeHeadConfig",
    "Mask2FormerHeadConfig",
    "MeanPoolHeadConfig",
    "PandaDataConfig",
    "PandaSlidesDataConfig",
    "PrunerConfig",
    "SegPathDataConfig",
    "TilingConfig",
    "composition_hint",
    "register_configs",
    "schema_fields",
    "validate_config",
]

"""Structured configs: the schemas of the config groups, registered in Hydra's ConfigStore.

Each file of a group starts with ``defaults: [base_<...>, _self_]`` (Hydra's schema pattern), so the group is
typed and closed: a misspelt key (``pruner.prune_ratoi=0.5``) or a wrong type (``attention.window=eight``) fails
when Hydra composes the config, with Hydra's message. Field names are the Python keyword names of what the group
builds (``create_encoder``'s ``prune_ratio``/``prune_layer``/``prune_score_tokens``/``sparse_backend``, the heads'
and the SegPath DataModule's constructor arguments), so configs reach the code without any renaming; the one
exception is ``attention.mode``, which is ``create_encoder(attention=...)``.

Hydra's ``+key=value`` (and ``++``) adds keys even to a closed structured config (``force_add``);
``hirespath.utils.config.validate_config`` refuses such keys (``unknown_keys``) before a task starts.
Value ranges a type cannot express (window >= 1, 0 <= ratio < 1, layer < depth, resolution a multiple of the
patch) are checked there too.

``register_configs()`` runs when ``hirespath.utils.hydra`` is imported (every task entry point imports it; tests
import it in conftest.py before composing).
"""

from __future__ import annotations

# ruff: noqa: UP006, UP007, UP035, UP045  (typing's Dict/List/Optional: the annotations OmegaConf's schemas read)
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class BackboneConfig:
    """A registry preset (``hirespath.list_backbones()``), its local weights file and extra timm kwargs."""

    name: str = MISSING
    weights: Optional[str] = None  # None: random init; else a local checkpoint in timm key layout
    overrides: Dict[str, Any] = field(default_factory=dict)  # timm kwargs, e.g. {depth: 2}


@dataclass
class AttentionConfig:
    """``create_encoder``'s attention arguments; ``mode`` is its ``attention=`` (dense | eager | sparse)."""

    mode: str = "sparse"
    window: int = 8
    radius: int = 1
    sparse_backend: str = "auto"  # auto | gather | flex


@dataclass
class PrunerConfig:
    """``create_encoder``'s token-pruning arguments (``prune_ratio=0`` disables pruning)."""

    prune_ratio: float = 0.0
    prune_layer: int = 4
    prune_score_tokens: str = "cls"  # cls | all


@dataclass
class KNNHeadConfig:
    """``hirespath.heads.knn.KNNClassifier``."""

    _target_: str = "hirespath.heads.knn.KNNClassifier"
    name: str = "knn"
    k: int = 20
    center_l2: bool = True


@dataclass
class LinearProbeHeadConfig:
    """``hirespath.heads.linear_probe.LinearProbeHead`` (solver adamw | lbfgs | uni)."""

    _target_: str = "hirespath.heads.linear_probe.LinearProbeHead"
    name: str = "linear_probe"
    solver: str = "adamw"
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    max_epochs: int = 100
    patience: int = 10
    batch_size: int = 256
    l2: float = 1.0e-4
    max_iter: int = 1000
    seed: int = 0


@dataclass
class AdapterConfig:
    """``hirespath.models.vit_adapter.ViTAdapter``'s keyword arguments."""

    num_groups: int = 4
    heads: int = 6
    n_points: int = 4
    spm_inplanes: int = 64
    init_gamma: float = 0.0
    add_vit_feature: bool = True
    extra_extractors: int = 2
    ffn_ratio: float = 0.25


@dataclass
class Mask2FormerHeadConfig:
    """``hirespath.heads.mask2former.SegmentationModel`` (the task passes ``encoder`` and ``num_classes``)."""

    _target_: str = "hirespath.heads.mask2former.SegmentationModel"
    name: str = "mask2former"
    num_queries: int = 100
    hidden_dim: int = 256
    decoder_layers: int = 10
    pixel_decoder_layers: int = 6
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    no_object_weight: float = 0.1
    adapter: AdapterConfig = field(default_factory=AdapterConfig)


@dataclass
class ABMILHeadConfig:
    """``hirespath.heads.mil.ABMIL`` via ``create_mil_head`` (the task passes ``in_features`` and ``num_classes``)."""

    _target_: str = "hirespath.heads.mil.create_mil_head"
    name: str = "abmil"
    hidden: int = 512
    attention_hidden: int = 256
    dropout: float = 0.25


@dataclass
class MeanPoolHeadConfig:
    """``hirespath.heads.mil.MeanPool`` via ``create_mil_head`` (``hidden=None``: one linear layer)."""

    _target_: str = "hirespath.heads.mil.create_mil_head"
    name: str = "mean_pool"
    hidden: Optional[int] = None
    dropout: float = 0.0


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
)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent: storing again replaces the same entries)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)


def schema_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]

"""The ``head`` group: one schema per head (its constructor's keyword names), and which task uses which head.

:data:`TASK_HEADS` is the one map of task → heads: validation refuses another task's head with it
(``hirespath mil head=knn``) and error messages list a task's heads from it.
"""

from __future__ import annotations

# ruff: noqa: UP006, UP007, UP035, UP045  (typing's Optional: the annotations OmegaConf's schemas read)
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig

from ..utils.config import Problems, is_int, one_of, select

# The heads each task can train (conf/head/<name>.yaml); a task not listed takes no head.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "classify": ("knn", "linear_probe"),
    "segment": ("mask2former",),
    "mil": ("abmil", "mean_pool"),
}


def head_task(head: str) -> str | None:
    """The task a head belongs to (None for an unknown head)."""
    return next((task for task, heads in TASK_HEADS.items() if head in heads), None)


def head_choices(task: str, value: object) -> str:
    """What a task accepts as ``head``, worded for an error about ``value`` (and whose head it is)."""
    owner = head_task(str(value))
    why = f" ({value} is for {owner})" if owner and owner != task else ""
    return f"{one_of(value, TASK_HEADS[task])} in the {task} task{why}"


@dataclass
class KNNHeadConfig:
    """``hirespath.probes.knn.KNNClassifier``."""

    _target_: str = "hirespath.probes.knn.KNNClassifier"
    name: str = "knn"
    k: int = 20
    center_l2: bool = True


@dataclass
class LinearProbeHeadConfig:
    """``hirespath.probes.linear_probe.LinearProbeHead`` (solver adamw | lbfgs | uni)."""

    _target_: str = "hirespath.probes.linear_probe.LinearProbeHead"
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


def check_head(cfg: DictConfig, task: str | None, problems: Problems, depth: int | None = None) -> None:
    """``head.name`` one of the task's heads (:data:`TASK_HEADS`); the heads' numbers; the ViT-Adapter's groups
    against the backbone's ``depth`` (when known)."""
    if not isinstance(cfg.get("head"), DictConfig):
        return
    name = select(cfg, "head.name")
    if task in TASK_HEADS and name not in TASK_HEADS[task]:
        problems.bad("head.name", name, head_choices(task, name))
    groups = select(cfg, "head.adapter.num_groups") if isinstance(cfg.head.get("adapter"), DictConfig) else None
    if groups is not None:
        from ..models.vit_adapter import ADAPTER_GROUPS

        if groups != ADAPTER_GROUPS:  # each group's ViT features feed one of the adapter's four output scales
            problems.bad("head.adapter.num_groups", groups, f"{ADAPTER_GROUPS} (one per output scale: 1/4 to 1/32)")
        elif depth is not None and depth < ADAPTER_GROUPS:
            problems.add(f"backbone.overrides.depth={depth}: the ViT-Adapter's {ADAPTER_GROUPS} interaction groups "
                         f"need at least {ADAPTER_GROUPS} blocks")  # fmt: skip
    k = select(cfg, "head.k")
    if k is not None and not (is_int(k) and k >= 1):
        problems.bad("head.k", k, "an integer >= 1 (neighbours that vote)")

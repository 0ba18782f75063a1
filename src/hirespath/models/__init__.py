from .attention import ATTENTION_KERNELS, ATTENTION_MODES, TokenLayout, select_kernel, sparse_reference_mask
from .backbones import (
    BackbonePreset,
    build_timm_model,
    check_resolution,
    get_backbone,
    list_backbones,
    load_weights,
    register_backbone,
)
from .encoder import EncoderOutput, HiResEncoder, TokenState, create_encoder
from .pruning import GlobalAttentionPruner

__all__ = [
    "ATTENTION_KERNELS",
    "ATTENTION_MODES",
    "BackbonePreset",
    "EncoderOutput",
    "GlobalAttentionPruner",
    "HiResEncoder",
    "TokenLayout",
    "TokenState",
    "build_timm_model",
    "check_resolution",
    "create_encoder",
    "get_backbone",
    "list_backbones",
    "load_weights",
    "register_backbone",
    "select_kernel",
    "sparse_reference_mask",
]

"""Multi-scale deformable attention (Deformable DETR's sampling step) computed in query chunks, level by level.

transformers' pure-PyTorch ``multi_scale_deformable_attention`` (what its Mask2Former pixel decoder and our
ViT-Adapter call) samples every level for every query, stacks the samples and only then weights them: a
(batch·heads) × head_dim × queries × (levels·points) tensor, 800 MB in fp32 for the pixel decoder of one 1,792 px
tile, written and read three times. Here each chunk of queries is sampled and weighted one level at a time into its
output, so a few MB are live: the same bilinear ``grid_sample`` (zeros padding, align_corners=False) and the same
weights, equal up to float rounding (the sum runs in another order). Measured on the 2-core CPU (narrowed UNI2-h
head, pixel decoder, interleaved A/B): 1,792 px 15.2–15.9 s instead of 17.8–19.2 s; 518 px unchanged.

:func:`install` makes transformers' deformable attention modules call this one (they look the function up in
their module at every call); ``hirespath.models.vit_adapter`` installs it when imported.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

# bytes of one chunk's sampled values: in cache on CPUs; on GPUs few chunks (each is a few kernel launches)
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}


def multi_scale_deformable_attention(
    value: Tensor, value_spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """transformers' signature and result: ``value`` B×S×H×d (the levels' cells, flattened in order),
    ``value_spatial_shapes`` [(h, w)] per level, ``sampling_locations`` B×Q×H×L×P×2 in [0, 1] (x, y),
    ``attention_weights`` B×Q×H×L×P → B×Q×(H·d)."""
    B, S, H, d = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    levels = [
        v.flatten(2).transpose(1, 2).reshape(B * H, d, h, w)
        for v, (h, w) in zip(value.split([h * w for h, w in shapes], dim=1), shapes)
    ]
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 1, 4, 5).reshape(B * H, L, Q, P, 2)
    weights = attention_weights.permute(0, 2, 3, 1, 4).reshape(B * H, L, 1, Q, P)
    per_query = B * H * d * P * max(value.element_size(), 4)
    step = max(1, CHUNK_BYTES.get(value.device.type, CHUNK_BYTES["cuda"]) // per_query)
    out = None
    for q0 in range(0, Q, step):
        q1 = min(Q, q0 + step)
        acc = None
        for lvl, v in enumerate(levels):
            sampled = F.grid_sample(v, grids[:, lvl, q0:q1], mode="bilinear", padding_mode="zeros", align_corners=False)
            term = (sampled * weights[:, lvl, :, q0:q1]).sum(-1)  # (B·H)×d×q
            acc = term if acc is None else acc.add_(term)
        if out is None:  # the dtype autocast gave the products
            out = acc.new_empty(B * H, d, Q)
        out[..., q0:q1] = acc
    return out.view(B, H * d, Q).transpose(1, 2).contiguous()


shipped = None  # transformers' own function, kept by install() (the tests compare with it)


def install() -> None:
    """Point transformers' Mask2Former deformable attention at :func:`multi_scale_deformable_attention`."""
    global shipped
    from transformers.models.mask2former import modeling_mask2former

    if modeling_mask2former.multi_scale_deformable_attention is not multi_scale_deformable_attention:
        shipped = modeling_mask2former.multi_scale_deformable_attention
    modeling_mask2former.multi_scale_deformable_attention = multi_scale_deformable_attention

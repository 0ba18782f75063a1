"""Multi-scale deformable attention (Deformable DETR's sampling step) without the full stack of samples in memory.

transformers' pure-PyTorch ``multi_scale_deformable_attention`` (what its Mask2Former pixel decoder and our
ViT-Adapter call) samples every level for every query, stacks the samples and only then weights them: a
(batch·heads) × head_dim × queries × (levels·points) tensor, 800 MB in fp32 for the pixel decoder of one 1,792 px
tile, written and read three times. Two ways round it, the same bilinear sampling (zeros padding,
align_corners=False) and weights, equal up to float rounding:

- on CUDA each chunk of queries is sampled (``grid_sample``) and weighted one level at a time into its output, so a
  few MB are live (measured when this was also the CPU path, 2-core CPU, narrowed UNI2-h head, interleaved A/B: a
  1,792 px forward 15.2–15.9 s instead of transformers' 17.8–19.2 s; 518 px unchanged);
- on CPU the four corners of every sampling point are gathered as rows of a channels-last table and summed with
  their bilinear × attention weights by one ``embedding_bag`` per chunk of queries: ``grid_sample`` reads each
  channel of a corner from a different plane, the table a corner's channels as one row; 2× faster than the chunked
  ``grid_sample`` on a pixel-decoder layer of a 1,792 px tile (0.5 s instead of 1.03 s).

:func:`install` makes transformers' deformable attention modules call this one (they look the function up in
their module at every call); ``hirespath.models.vit_adapter`` installs it when imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# bytes of one chunk's sampled values in the grid_sample path: few chunks on GPUs (each is a few kernel launches);
# "cpu" only where that path is called on a CPU (the tests)
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}


def multi_scale_deformable_attention(
    value: Tensor, value_spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """transformers' signature and result: ``value`` B×S×H×d (the levels' cells, flattened in order),
    ``value_spatial_shapes`` [(h, w)] per level, ``sampling_locations`` B×Q×H×L×P×2 in [0, 1] (x, y),
    ``attention_weights`` B×Q×H×L×P → B×Q×(H·d)."""
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    if value.device.type == "cpu":
        return _gathered(value, shapes, sampling_locations, attention_weights)
    return _grid_sampled(value, shapes, sampling_locations, attention_weights)


# query·head rows per embedding_bag call on CPU (each gathers levels · points · 4 corners rows of head_dim values)
GATHER_ROWS = 1 << 14


def _gathered(value: Tensor, shapes: list, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    B, S, H, d = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    table = value.permute(0, 2, 1, 3).reshape(B * H * S, d)  # row: one cell of one level for one (image, head)
    heights = torch.tensor([h for h, _ in shapes]).view(L, 1)
    widths = torch.tensor([w for _, w in shapes]).view(L, 1)
    starts = torch.tensor([0] + [h * w for h, w in shapes[:-1]]).cumsum(0).view(L, 1)
    base = (torch.arange(B * H) * S).view(B, H, 1, 1, 1)  # the (image, head)'s first row
    out = value.new_empty(B, H, Q, d)
    step = max(1, GATHER_ROWS // (B * H))
    for q0 in range(0, Q, step):
        q1 = min(Q, q0 + step)
        loc = sampling_locations[:, q0:q1].permute(0, 2, 1, 3, 4, 5)  # B×H×q×L×P×2
        weight = attention_weights[:, q0:q1].permute(0, 2, 1, 3, 4)  # B×H×q×L×P
        x = loc[..., 0].float() * widths - 0.5  # pixel coordinates, centres at .5 (align_corners=False)
        y = loc[..., 1].float() * heights - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        x0, y0 = x0.long(), y0.long()
        rows, weights = [], []
        for dy, dx, bilinear in (
            (0, 0, (1 - fx) * (1 - fy)),
            (0, 1, fx * (1 - fy)),
            (1, 0, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            xc, yc = x0 + dx, y0 + dy
            inside = (xc >= 0) & (xc < widths) & (yc >= 0) & (yc < heights)  # outside: zeros padding
            rows.append(torch.where(inside, base + starts + yc.clamp(min=0) * widths + xc.clamp(min=0), base))
            weights.append(bilinear * weight * inside)
        rows = torch.stack(rows, -1).view(-1, L * P * 4)
        weights = torch.stack(weights, -1).view(-1, L * P * 4).to(table.dtype)
        out[:, :, q0:q1] = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum").view(B, H, -1, d)
    return out.permute(0, 2, 1, 3).reshape(B, Q, H * d)


def _grid_sampled(value: Tensor, shapes: list, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    B, S, H, d = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
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

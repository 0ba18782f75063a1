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
  channel of a corner from a different plane, the table a corner's channels as one row. Each level sits in a ring
  of zero rows, so the corners need no bounds tests, and the index and weight arithmetic runs in int32 with the
  (level, point) axis innermost. A pixel-decoder layer of a 1,792 px tile: 1.03 s as chunked ``grid_sample``,
  0.45–0.47 s gathered with a bounds test per corner, 0.21–0.22 s now (``docs/benchmarks/cpu_deformable_layer.py``).

:func:`install` makes transformers' deformable attention modules call this one (they look the function up in
their module at every call); ``hirespath.models.vit_adapter`` installs it when imported.
"""

from __future__ import annotations

import itertools

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


def _padded_table(value: Tensor, shapes: list) -> tuple[Tensor, list[int]]:
    """The values as rows of a channels-last table, B·H·Σ(h + 2)(w + 2) × d: each level's cells inside a ring of
    zero cells, so a bilinear corner just outside a level reads zero (zeros padding) with no bounds test per
    corner. Returns the table and each level's first row (L, within an image and head)."""
    B, S, H, d = value.shape
    sizes = [(h + 2) * (w + 2) for h, w in shapes]
    table = value.new_zeros(B, H, sum(sizes), d)
    start = 0
    for v, (h, w), n in zip(value.split([h * w for h, w in shapes], dim=1), shapes, sizes):
        level = table[:, :, start : start + n].view(B, H, h + 2, w + 2, d)
        level[:, :, 1:-1, 1:-1] = v.view(B, h, w, H, d).permute(0, 3, 1, 2, 4)
        start += n
    return table.view(-1, d), [0, *itertools.accumulate(sizes[:-1])]


def _gathered(value: Tensor, shapes: list, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    B, S, H, d = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    table, starts = _padded_table(value, shapes)  # row: one cell of one level for one (image, head)

    def per_sample(values, dtype=torch.float32) -> Tensor:
        # one entry per (level, point), the samples' innermost axis: broadcasting a (level, 1) column over the
        # points instead runs 4-7x slower (a stride-0 inner loop of 4)
        return torch.tensor(values, dtype=dtype).view(L, 1).expand(L, P).reshape(L * P)

    heights = per_sample([float(h) for h, _ in shapes])
    widths = per_sample([float(w) for _, w in shapes])
    pitch = per_sample([w + 2 for _, w in shapes], torch.int32)  # rows between vertically adjacent padded cells
    first = per_sample(starts, torch.int32)
    corners = torch.stack([torch.zeros_like(pitch), torch.ones_like(pitch), pitch, pitch + 1])  # 4 × L·P
    base = (torch.arange(B * H, dtype=torch.int32) * (table.shape[0] // (B * H))).view(B, 1, H, 1)
    out = value.new_empty(B, Q, H, d)  # bags in the queries' order: B×Q×(H·d) is a view of it
    step = max(1, GATHER_ROWS // (B * H))
    for q0 in range(0, Q, step):
        q1 = min(Q, q0 + step)
        loc = sampling_locations[:, q0:q1].reshape(B, q1 - q0, H, L * P, 2)
        x = loc[..., 0].float() * widths - 0.5  # pixel coordinates, centres at .5 (align_corners=False)
        y = loc[..., 1].float() * heights - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        # a point with any corner inside its level (the others land on the zero ring); the rest weigh nothing
        inside = (x0 >= -1) & (x0 < widths) & (y0 >= -1) & (y0 < heights)
        x0 = torch.minimum(x0.clamp_(min=-1), widths - 1).to(torch.int32)
        y0 = torch.minimum(y0.clamp_(min=-1), heights - 1).to(torch.int32)
        # a bag (one query and head) lists its samples corner by corner: B×q×H×4×(L·P)
        rows = ((base + first) + (y0 + 1) * pitch + (x0 + 1)).unsqueeze(3) + corners
        weight = attention_weights[:, q0:q1].reshape(B, q1 - q0, H, L * P) * inside
        wy1 = weight * fy
        wy0 = weight - wy1
        weights = torch.stack([wy0 * (1 - fx), wy0 * fx, wy1 * (1 - fx), wy1 * fx], 3)
        out[:, q0:q1] = F.embedding_bag(
            rows.reshape(-1, 4 * L * P),
            table,
            per_sample_weights=weights.reshape(-1, 4 * L * P).to(table.dtype),
            mode="sum",
        ).view(B, -1, H, d)
    return out.view(B, Q, H * d)


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

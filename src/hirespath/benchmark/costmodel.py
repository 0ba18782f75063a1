"""Analytic cost of one encoder forward: FLOPs and transient attention memory, per attention mode.

FLOPs count a multiply-add as 2. The patch embedding (3·p² → D per patch) is counted, and the linear layers are
read off the model itself (so SwiGLU, registers and any arch override are counted exactly); attention FLOPs are
2·2·(queries)·(keys)·D per block (QKᵀ and PV). Sparse keys are counted exactly for the full grid (block
neighbourhoods clipped at the border); after pruning, a fraction (1−p) of each neighbourhood is expected to survive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.attention import (
    VARLEN_CHUNK_KEYS,
    TokenLayout,
    eager_matrix_bytes,
    flex_padding,
    gather_chunk_keys,
    gather_key_align,
    gather_padding,
    select_kernel,
    varlen_padding,
)


@dataclass
class Cost:
    tokens: int  # patch tokens before pruning
    tflops: float  # whole forward, one image
    attn_memory_gb: float  # largest transient attention buffer of one block, one image


def _linear_macs_per_token(block: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))


def _neighbourhood_keys(grid: tuple[int, int], window: int, radius: int) -> int:
    """Σ over patch tokens of the number of patch keys in its block neighbourhood (full grid)."""

    def axis(n: int) -> list[tuple[int, int]]:
        nb = math.ceil(n / window)
        sizes = [min(window, n - b * window) for b in range(nb)]
        # (tokens in block b along this axis, tokens in its neighbourhood along this axis)
        return [(sizes[b], sum(sizes[max(0, b - radius) : b + radius + 1])) for b in range(nb)]

    rows, cols = axis(grid[0]), axis(grid[1])
    return sum(qr * qc * kr * kc for qr, kr in rows for qc, kc in cols)


def inference_kernel(encoder, grid: tuple[int, int], device: str, dtype: torch.dtype | None = None) -> str:
    """The kernel ``select_kernel`` runs for ``encoder``'s blocks on ``grid`` in inference on ``device``, with
    queries of ``dtype`` (None: not known)."""
    name, _ = select_kernel(
        encoder.attention,
        encoder.sparse_backend,
        device,
        grid,
        encoder.window,
        training=False,
        radius=encoder.radius,
        dtype=dtype,
        head_dim=encoder.vit.blocks[0].attn.head_dim,
    )
    return name


def encoder_cost(
    encoder,
    resolution: int | tuple[int, int],
    bytes_per_element: int = 2,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
) -> Cost:
    """Cost of ``encoder`` (a HiResEncoder) on one image of ``resolution`` pixels (side, or (H, W)), in inference on
    ``device`` (``cpu`` or ``cuda``) with queries of ``dtype``: the attention is costed for the kernel
    ``select_kernel`` runs there."""
    H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
    p = encoder.patch_size
    grid = (H // p, W // p)
    N = grid[0] * grid[1]
    P = encoder.num_prefix_tokens
    D = encoder.embed_dim
    heads = encoder.vit.blocks[0].attn.num_heads
    depth = encoder.depth
    pruner = encoder.pruner
    kernel = inference_kernel(encoder, grid, device, dtype)
    kept_frac = 1.0
    full_blocks = depth
    if pruner.enabled:
        full_blocks = pruner.layer
        kept_frac = pruner.num_kept(N) / N

    flops = 2 * 3 * p * p * D * N  # patch embedding (a p×p stride-p convolution: one 3p²→D product per patch)
    attn_mem = 0.0
    for i, blk in enumerate(encoder.vit.blocks):
        frac = 1.0 if i < full_blocks else kept_frac
        n = round(N * frac) if frac < 1 else N
        L = P + n
        flops += 2 * _linear_macs_per_token(blk) * L
        if kernel in ("dense", "eager"):
            flops += 4 * L * L * D
            # eager holds the scores and their softmax at once (two H·L² buffers); SDPA keeps O(L) statistics; both
            # write their output rows, counted as the sparse kernels' are
            matrices = eager_matrix_bytes(heads, L, bytes_per_element) if kernel == "eager" else heads * L * 4
            mem = matrices + L * D * bytes_per_element
        else:
            keys = _neighbourhood_keys(grid, encoder.window, encoder.radius) * frac * frac
            flops += 4 * (keys + n * P + P * L) * D  # patch→patch, patch→prefix, prefix→all
            if kernel == "sparse[flex]":  # slot buffers for q, k, v and the output
                mem = 4 * n * D * bytes_per_element
            elif kernel == "sparse[varlen]":  # K, V and the output rows, a call's gathered K/V, its queries, outputs
                chunk = encoder.attn_chunk_keys or VARLEN_CHUNK_KEYS
                mem = (3 * L * D + 2 * min(chunk, L * 9) * D + 2 * min(chunk, n) * D) * bytes_per_element
            else:  # the output rows plus one chunk of gathered K and V (the kernel's chunk on that device)
                chunk = encoder.attn_chunk_keys or gather_chunk_keys(device)
                mem = (L * D + 2 * min(chunk, L * 9) * D) * bytes_per_element
        attn_mem = max(attn_mem, mem)
    return Cost(tokens=N, tflops=flops / 1e12, attn_memory_gb=attn_mem / 1e9)


def padding_ratio(
    encoder, resolution: int | tuple[int, int], device: str = "cuda", seed: int = 0, dtype: torch.dtype | None = None
) -> float:
    """Padded / real attention work (query×key products) of one forward of ``encoder`` on ``device`` in inference
    (queries of ``dtype``):
    1.0 for dense and eager (no padding), else the sparse kernel's own plans (gather: its chunks; flex: its BlockMask
    tiles; varlen: none, 1.0) on the full grid up to the pruning block, then on ⌈(1−p)·N⌉ survivors drawn uniformly
    at random — the cost model's survival assumption — with ``seed``."""
    H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
    grid = (H // encoder.patch_size, W // encoder.patch_size)
    kernel = inference_kernel(encoder, grid, device, dtype)
    if kernel in ("dense", "eager"):
        return 1.0
    chunk_keys = encoder.attn_chunk_keys or gather_chunk_keys(device)
    full = TokenLayout.full_grid(1, grid, encoder.num_prefix_tokens, "cpu")
    pruner, depth = encoder.pruner, encoder.depth
    blocks = [(full, pruner.layer if pruner.enabled else depth)]
    if pruner.enabled:
        N = grid[0] * grid[1]
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(N, generator=gen)[: pruner.num_kept(N)].sort().values[None]
        blocks.append((full.select(keep), depth - pruner.layer))
    padded = real = 0
    for layout, count in blocks:
        if kernel == "sparse[flex]":
            p, r = flex_padding(layout, encoder.window, encoder.radius)
        elif kernel == "sparse[varlen]":
            p, r = varlen_padding(layout, encoder.window, encoder.radius, encoder.attn_chunk_keys or VARLEN_CHUNK_KEYS)
        else:
            p, r = gather_padding(layout, encoder.window, encoder.radius, chunk_keys, gather_key_align(device))
        padded, real = padded + count * p, real + count * r
    return padded / real

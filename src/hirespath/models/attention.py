"""Attention kernels run on the weights of a timm ``Attention`` module: dense (SDPA), eager and sparse.

All three take the block's normalised tokens ``x`` (B×L×D, prefix tokens first) and return the
projected output, exactly as timm's ``Attention.forward`` would, so state_dict keys never change. ``qkv``:
the (q, k, v) of ``split_heads(attn, x)`` when the caller already has them (the pruning block); kernels in
``PROJECTING_KERNELS`` project their own, and given the block's ``norm`` they take its input instead and
normalise it chunk by chunk (the whole normalised tokens then never exist during the call).

Sparse semantics (docs/design.md): the patch grid is cut into ``window``×``window`` blocks; a patch token
attends to the patch tokens of its own block and of the blocks within ``radius`` (1: the 3×3 block
neighbourhood, clipped at the border) plus all prefix tokens; prefix tokens attend to everything.
No L×L tensor is ever built. The gather kernel (CPU, training, very large grids) gathers each block's
neighbourhood K/V rows by index and runs SDPA over chunks of similar blocks; the flex kernel (CUDA inference)
projects the tokens chunk by chunk into per-block slots and runs flex_attention with a block-sparse BlockMask; the
varlen kernel (asked for, CUDA fp16/bf16 inference) projects K and V chunk by chunk, gathers them as gather does and
runs flash attention over the blocks as ragged sequences, unpadded, projecting each call's queries itself.

``ATTENTION_KERNELS`` names the kernels (dense, eager, sparse[gather], sparse[flex], sparse[varlen]) and
``select_kernel`` holds the policy choosing one (timm's ``ATTN_LAYERS`` / ``use_fused_attn`` in spirit): the
encoder, the cost model and the benchmark all ask it.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import threading
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.config import one_of
from .cpu_tasks import map_rows, map_tasks

T = TypeVar("T")
ATTENTION_MODES = ("dense", "eager", "sparse")
SPARSE_BACKENDS = ("auto", "gather", "flex", "varlen")  # flex: torch flex_attention, compiled on CUDA; varlen:
# torch varlen_attn (flash attention over ragged blocks, CUDA fp16/bf16)
# Kernels that project q/k/v themselves, chunk by chunk into their own buffers, and ignore a ``qkv`` passed in.
PROJECTING_KERNELS = frozenset({"sparse[flex]", "sparse[varlen]"})
FLEX_MAX_BLOCKS = 4096  # flex's BlockMask holds (blocks × blocks) int32 index tables: 64 MB each at 4096


@dataclass
class SparsePlan:
    """Slot layout of the patch tokens for the flex kernel (built once per token layout)."""

    capacity: int  # slots per block (max tokens of any block in any image)
    num_blocks: int  # real blocks; slot block ``num_blocks`` is an always-empty dummy
    slot: Tensor  # B×N long: slot of each patch token in the (num_blocks + 1) * capacity buffer
    key_valid: Tensor  # B×S bool: slot holds a token
    neighbours: Tensor  # num_blocks×K long: neighbour block ids, ``num_blocks`` where clipped


@dataclass
class TokenLayout:
    """Where the patch tokens of a batch sit in the full patch grid."""

    grid: tuple[int, int]
    positions: Tensor  # B×N×2 long (row, col)
    num_prefix: int
    _plans: dict = field(default_factory=dict, repr=False)  # read and written through ``plan`` only

    @classmethod
    def full_grid(cls, batch: int, grid: tuple[int, int], num_prefix: int, device) -> TokenLayout:
        rows = torch.arange(grid[0], device=device)
        cols = torch.arange(grid[1], device=device)
        pos = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(1, -1, 2)
        return cls(grid=grid, positions=pos.expand(batch, -1, -1).clone(), num_prefix=num_prefix)  # no aliasing

    def select(self, keep: Tensor) -> TokenLayout:
        """Layout of the patch tokens at indices ``keep`` (B×N')."""
        pos = self.positions.gather(1, keep[..., None].expand(-1, -1, 2))
        return TokenLayout(grid=self.grid, positions=pos, num_prefix=self.num_prefix)

    def plan(self, key: Hashable, build: Callable[[], T]) -> T:
        """The plan cached under ``key`` for this layout, built by ``build()`` on first use.

        Plans (slot layouts, gather chunks, block masks) depend only on the token positions, so every block of
        a forward reuses them; a layout from ``select`` (pruning) starts with an empty cache.
        """
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]

    def sparse_plan(self, window: int, radius: int, align: int = 1) -> SparsePlan:
        return self.plan(
            (window, radius, align), lambda: build_sparse_plan(self.positions, self.grid, window, radius, align)
        )


def block_neighbours(n_br: int, n_bc: int, radius: int, device) -> tuple[Tensor, Tensor]:
    """For each block of an n_br×n_bc block grid (raster order), its (2·radius+1)² neighbour block ids (nb×K,
    raster order) and whether each lies inside the grid (ids of clipped neighbours are meaningless)."""
    br = torch.arange(n_br, device=device).repeat_interleave(n_bc)
    bc = torch.arange(n_bc, device=device).repeat(n_br)
    offsets = torch.arange(-radius, radius + 1, device=device)
    nr = br[:, None] + offsets.repeat_interleave(len(offsets))
    nc = bc[:, None] + offsets.repeat(len(offsets))
    inside = (nr >= 0) & (nr < n_br) & (nc >= 0) & (nc < n_bc)
    return nr * n_bc + nc, inside


def build_sparse_plan(positions: Tensor, grid: tuple[int, int], window: int, radius: int, align: int = 1) -> SparsePlan:
    """``align`` > 1 rounds the slot capacity up to a power of two >= align (flex_attention's block size)."""
    device = positions.device
    B, N, _ = positions.shape
    n_br, n_bc = math.ceil(grid[0] / window), math.ceil(grid[1] / window)
    nb = n_br * n_bc
    block = (positions[..., 0] // window) * n_bc + positions[..., 1] // window  # B×N

    counts = torch.zeros(B, nb + 1, dtype=torch.long, device=device)
    counts.scatter_add_(1, block, torch.ones_like(block))
    capacity = max(int(counts.max()), 1)
    if align > 1:
        capacity = max(align, 1 << (capacity - 1).bit_length())
    # Rank of each token inside its block: stable sort by block, subtract the block's start offset.
    order = torch.sort(block, dim=1, stable=True).indices
    sorted_block = block.gather(1, order)
    start = torch.cumsum(counts, dim=1) - counts
    rank_sorted = torch.arange(N, device=device).expand(B, -1) - start.gather(1, sorted_block)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    slot = block * capacity + rank

    key_valid = torch.zeros(B, (nb + 1) * capacity, dtype=torch.bool, device=device)
    key_valid.scatter_(1, slot, True)

    neighbours, inside = block_neighbours(n_br, n_bc, radius, device)
    neighbours = torch.where(inside, neighbours, nb)
    # Drop neighbour columns that are clipped for every block (small grids, large radius).
    neighbours = neighbours[:, inside.any(0)]
    return SparsePlan(capacity, nb, slot, key_valid, neighbours)


def split_heads(attn, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Project ``x`` (B×L×D) to q, k, v of shape B×L×H×d, with timm's optional q/k norms."""
    B, L, _ = x.shape
    qkv = map_rows(attn.qkv, x).reshape(B, L, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(2)
    return attn.q_norm(q), attn.k_norm(k), v


def merge_heads(attn, x: Tensor, out: Tensor) -> Tensor:
    """timm's output path: heads merged (B×L×H·d), scale norm, optional gate, projection."""
    gate = getattr(attn, "gate", None)
    if gate is None:  # token-wise: chunks of tokens as CPU tasks (cpu_tasks.py)
        return map_rows(lambda o: attn.proj_drop(attn.proj(attn.norm(o))), out.flatten(2))
    return attn.proj_drop(attn.proj(attn.norm(out.flatten(2)) * gate(x).sigmoid()))


def _identity(x: Tensor) -> Tensor:
    return x


PREFIX_SCORE_KEYS = 1 << 13  # keys per step of the pruning scores (an fp32 copy of the keys this long at a time)


def project_parts(attn, x: Tensor, first: int, count: int = 1) -> tuple[Tensor, ...]:
    """Parts ``first`` … ``first + count − 1`` of ``split_heads(attn, x)`` (0: q, 1: k, 2: v; each ×H×d) from those
    thirds of the fused projection alone: the others are not computed."""
    qkv = attn.qkv
    if not isinstance(qkv, torch.nn.Linear):
        return split_heads(attn, x)[first : first + count]
    H, d = attn.num_heads, attn.head_dim
    rows = slice(first * H * d, (first + count) * H * d)  # timm's fused output is laid out q, k, v (each H·d)
    y = F.linear(x, qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])
    norms = (attn.q_norm, attn.k_norm, _identity)
    return tuple(norms[first + i](t) for i, t in enumerate(y.unflatten(-1, (count, H, d)).unbind(-3)))


def project_keys(attn, x: Tensor) -> Tensor:
    """The keys of ``split_heads(attn, x)`` alone (B×L×H×d)."""
    return project_parts(attn, x, 1)[0]


def prefix_attention_probs(
    attn,
    q_prefix: Tensor,
    k: Tensor | Callable[[int, int], Tensor],
    chunk: int = PREFIX_SCORE_KEYS,
    length: int | None = None,
) -> Tensor:
    """Softmax attention of the prefix queries over all keys: B×H×P×L in fp32 (O(L) memory).

    ``k``: the B×L×H×d keys, or a function ``k(start, end)`` giving those keys (``length`` of them), so that the
    keys are made a chunk at a time and never exist whole.

    Computed and kept in fp32 even under bf16: bf16 probabilities take ~100 distinct values over a 576-token grid,
    so pruning scores tie at the cut and the survivors depend on rounding. The keys are cast to fp32 ``chunk`` at a
    time: under bf16 an fp32 copy of all of them (and einsum's permuted copy of that) was the pruning block's peak
    (2 × 369 MB at 3,430 px for UNI2-h), where the scores themselves are P / D of it.
    """
    keys = k if callable(k) else (lambda start, end: k[:, start:end])
    L = length if callable(k) else k.shape[1]
    B, H = q_prefix.shape[0], q_prefix.shape[2]
    with torch.autocast(q_prefix.device.type, enabled=False):
        q = q_prefix.float() * attn.scale
        scores = q.new_empty(B, H, q.shape[1], L)
        for l0 in range(0, L, chunk):
            scores[..., l0 : l0 + chunk] = torch.einsum("bphd,blhd->bhpl", q, keys(l0, l0 + chunk).float())
    return scores.softmax(dim=-1)


def _dropout_p(attn) -> float:
    return attn.attn_drop.p if attn.training else 0.0


def dense_attention(attn, x: Tensor, layout: TokenLayout, qkv: tuple | None = None) -> Tensor:
    q, k, v = qkv or split_heads(attn, x)
    k_t, v_t, p = k.transpose(1, 2), v.transpose(1, 2), _dropout_p(attn)
    # chunks of queries as CPU tasks (cpu_tasks.py); otherwise one call
    out = map_rows(
        lambda qs: F.scaled_dot_product_attention(qs.transpose(1, 2), k_t, v_t, dropout_p=p).transpose(1, 2), q
    )
    return merge_heads(attn, x, out)


def eager_attention(attn, x: Tensor, layout: TokenLayout, qkv: tuple | None = None) -> Tensor:
    """The paper's "vanilla": the full L×L probability matrix is materialised."""
    q, k, v = (t.transpose(1, 2) for t in qkv or split_heads(attn, x))
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = attn.attn_drop(probs) @ v
    return merge_heads(attn, x, out.transpose(1, 2))


def _prefix_rows(attn, q: Tensor, k: Tensor, v: Tensor, P: int) -> Tensor:
    """Prefix (global) rows attend to every key: B×P×H×d."""
    return F.scaled_dot_product_attention(
        q[:, :P].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=_dropout_p(attn)
    ).transpose(1, 2)


FLEX_PROJECTION_TOKENS = 1 << 13  # patch tokens projected per step straight into the flex kernel's slots


def flex_kv_valid(plan: SparsePlan, num_prefix: int, batch: int) -> Tensor:
    """B×(nb + 2)·C bool: which rows of the flex K/V buffers hold a key (slot blocks, then the prefix block)."""
    C, nb = plan.capacity, plan.num_blocks
    kv_valid = torch.zeros(batch, (nb + 2) * C, dtype=torch.bool, device=plan.slot.device)
    kv_valid[:, : (nb + 1) * C] = plan.key_valid
    kv_valid[:, (nb + 1) * C : (nb + 1) * C + num_prefix] = True
    return kv_valid


def _project_to_slots(
    attn, x: Tensor, plan: SparsePlan, P: int, q_len: int, kv_len: int, chunk: int, norm: Callable = _identity
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q/k/v of ``norm(x)`` projected ``chunk`` patch tokens at a time into zeroed per-block slot buffers of flat
    H·d rows, so that the fused B×L×3×H×d projection (three times the tokens, the largest tensor of a flex block)
    and the normalised tokens never exist whole; each image's prefix keys/values go to rows ``q_len``… of its K/V
    (block nb + 1).
    Returns qb (B·q_len rows), kb and vb (B·kv_len rows), the prefix queries (B×P×H×d) and the q-buffer row
    of every patch token (B×N)."""
    B, L, _ = x.shape
    Hd = attn.num_heads * attn.head_dim
    batch = torch.arange(B, device=x.device)[:, None]
    q_rows = plan.slot + batch * q_len
    kv_rows = plan.slot + batch * kv_len
    q_prefix, k, v = split_heads(attn, norm(x[:, :P]))  # the projection's dtype (autocast) sizes the buffers
    qb = q_prefix.new_zeros(B * q_len, Hd)
    kb, vb = k.new_zeros(B * kv_len, Hd), v.new_zeros(B * kv_len, Hd)
    prefix_rows = (torch.arange(q_len, q_len + P, device=x.device) + batch * kv_len).flatten()
    for buf, t in ((kb, k), (vb, v)):
        buf.index_copy_(0, prefix_rows, t.reshape(B * P, Hd))
    for start in range(P, L, chunk):
        end = min(L, start + chunk)
        q, k, v = split_heads(attn, norm(x[:, start:end]))
        span = slice(start - P, end - P)
        qb.index_copy_(0, q_rows[:, span].flatten(), q.reshape(-1, Hd))
        kb.index_copy_(0, kv_rows[:, span].flatten(), k.reshape(-1, Hd))
        vb.index_copy_(0, kv_rows[:, span].flatten(), v.reshape(-1, Hd))
        del q, k, v  # before the next chunk's projection
    return qb, kb, vb, q_prefix, q_rows


def _from_slots(out_slots: Tensor, out_prefix: Tensor, q_rows: Tensor, L: int) -> Tensor:
    """B×L×H×d: the prefix rows, then each patch token's row read back from its slot (B·q_len × H·d), in
    inference straight into the output (no second copy of it)."""
    B, P, H, d = out_prefix.shape
    out = out_prefix.new_empty(B, L, H * d)
    out[:, :P] = out_prefix.reshape(B, P, H * d)
    if torch.is_grad_enabled() and out_slots.requires_grad:  # out= has no autograd: through a temporary
        out[:, P:] = out_slots.index_select(0, q_rows.flatten()).view(B, L - P, H * d)
    else:
        for b in range(B):  # each image's patch rows are contiguous in ``out``
            torch.index_select(out_slots, 0, q_rows[b], out=out[b, P:])
    return out.view(B, L, H, d)


@dataclass
class GatherChunk:
    """A group of query blocks computed by one SDPA call (blocks of similar size, so padding stays small)."""

    q_rows: Tensor  # n×Cq long: rows (in the flattened B·L tokens) of each block's queries, padded with a real row
    out_rows: Tensor  # n·Cq long: where each query's output goes; padded queries go to the trash row B·L
    kv_rows: Tensor  # n·Kc long: each block's neighbourhood keys, then its image's prefix keys, then padding
    key_mask: Tensor | None  # n×1×1×Kc bool (False: padding); None when no key is padding
    real_work: int  # Σ over the chunk's units of (queries × keys): the products the sparse pattern asks for

    @property
    def padded_work(self) -> int:
        """Query × key products the SDPA call computes: units × most queries × most keys (aligned)."""
        return self.q_rows.numel() * (self.kv_rows.numel() // self.q_rows.shape[0])


@dataclass
class BlockUnits:
    """The query units of the sparse kernels that gather: the non-empty (image, block) pairs, image-major, blocks in
    raster order, each with its queries and the key tokens of its neighbourhood (only the tokens that exist)."""

    rows_sorted: Tensor  # B·N long: token rows (in the flattened B·L tokens) grouped by unit, raster order inside
    starts: Tensor  # (B·nb) long: where each unit id's tokens start in ``rows_sorted`` (empty units too)
    units: Tensor  # U long: the non-empty unit ids, increasing
    image: Tensor  # U long: each unit's image
    nbr_units: Tensor  # U×K long: its neighbour units (any valid id where clipped: those count no keys)
    nbr_counts: Tensor  # U×K long: tokens of each neighbour (0 where clipped)
    n_q: Tensor  # U long: its queries
    n_keys: Tensor  # U long: its keys, the neighbourhood's tokens and the image's prefix tokens


def block_units(positions: Tensor, grid: tuple[int, int], num_prefix: int, window: int, radius: int) -> BlockUnits:
    device = positions.device
    B, N, _ = positions.shape
    P, L = num_prefix, num_prefix + N
    n_br, n_bc = math.ceil(grid[0] / window), math.ceil(grid[1] / window)
    nb = n_br * n_bc
    block = (positions[..., 0] // window) * n_bc + positions[..., 1] // window  # B×N
    unit_of_token = (torch.arange(B, device=device)[:, None] * nb + block).flatten()  # image-major unit id
    order = torch.sort(unit_of_token, stable=True).indices
    rows_sorted = (order // N) * L + P + order % N  # token rows grouped by unit, raster order inside
    counts = torch.bincount(unit_of_token, minlength=B * nb)
    starts = torch.cumsum(counts, 0) - counts

    neighbours, inside = block_neighbours(n_br, n_bc, radius, device)
    neighbours = torch.where(inside, neighbours, 0)  # any valid id: clipped entries count no keys (``inside``)

    units = torch.nonzero(counts).flatten()
    image, blk = units // nb, units % nb
    nbr_units = image[:, None] * nb + neighbours[blk]  # U×K
    nbr_counts = torch.where(inside[blk], counts[nbr_units], 0)
    return BlockUnits(rows_sorted, starts, units, image, nbr_units, nbr_counts, counts[units], nbr_counts.sum(1) + P)


def build_gather_chunks(
    positions: Tensor,
    grid: tuple[int, int],
    num_prefix: int,
    window: int,
    radius: int,
    chunk_keys: int,
    key_align: int | None = None,
) -> list[GatherChunk]:
    """Query units (``block_units``) are sorted by (queries, keys) and cut into chunks (``_cut_chunks``), each
    padded only to its own largest unit: after pruning, blocks hold different numbers of survivors and padding
    every block to the fullest one would cost ~2.5× the real work. ``key_align``: chunk key lengths are rounded up
    to a multiple of it; None: ``gather_key_align`` of the positions' device."""
    device = positions.device
    key_align = key_align or gather_key_align(device)
    B, N, _ = positions.shape
    P, L = num_prefix, num_prefix + N
    u = block_units(positions, grid, num_prefix, window, radius)
    rows_sorted, starts = u.rows_sorted, u.starts
    rank = torch.sort(u.n_q * (int(u.n_keys.max()) + 1) + u.n_keys, stable=True).indices
    units, image, nbr_units, nbr_counts, n_keys, n_q = (
        t[rank] for t in (u.units, u.image, u.nbr_units, u.nbr_counts, u.n_keys, u.n_q)
    )
    nbr_ends = torch.cumsum(nbr_counts, 1)

    chunks = []
    for sl in _cut_chunks(n_q.tolist(), n_keys.tolist(), chunk_keys):
        Cq = int(n_q[sl].max())
        Kc = int(n_keys[sl].max())
        Kc += -Kc % key_align
        j = torch.arange(Cq, device=device)
        q_valid = j < n_q[sl, None]
        q_rows = rows_sorted[(starts[units[sl], None] + j).clamp(max=len(rows_sorted) - 1)]
        q_rows = torch.where(q_valid, q_rows, q_rows[:, :1])  # padded queries repeat a real one
        out_rows = torch.where(q_valid, q_rows, B * L).flatten()
        # Key j of a unit: the (j - end of previous neighbour)-th token of the neighbour whose range holds j,
        # then the prefix keys of the unit's image, then padding (masked; points at a real row).
        j = torch.arange(Kc, device=device).repeat(len(n_q[sl]), 1)
        ends = nbr_ends[sl]
        which = torch.searchsorted(ends, j, right=True)  # neighbour index, K past the patch keys
        K = ends.shape[1]
        first = torch.cat([ends.new_zeros(len(ends), 1), ends], 1).gather(1, which.clamp(max=K))
        nbr = nbr_units[sl].gather(1, which.clamp(max=K - 1))
        patch_row = rows_sorted[(starts[nbr] + j - first).clamp(0, len(rows_sorted) - 1)]
        patch_keys = ends[:, -1:]
        prefix_row = image[sl, None] * L + (j - patch_keys).clamp(0, max(P - 1, 0))
        is_patch = j < patch_keys
        kv_rows = torch.where(is_patch, patch_row, prefix_row)
        valid = j < (patch_keys + P)
        key_mask = None if bool(valid.all()) else valid[:, None, None, :]
        real = int((n_q[sl] * n_keys[sl]).sum())
        chunks.append(GatherChunk(q_rows, out_rows, kv_rows.flatten(), key_mask, real))
    return chunks


GATHER_MAX_PADDING = 1.1  # padded / real query×key work allowed in one chunk (before the 8-key alignment)


def _cut_chunks(
    n_q: list[int], n_keys: list[int], chunk_keys: int, max_padding: float = GATHER_MAX_PADDING
) -> list[slice]:
    """Cut the sorted units into consecutive chunks: a chunk ends before it would gather more than ``chunk_keys``
    keys or before its padded work (units × most queries × most keys) exceeds ``max_padding`` × its real work."""
    cuts, start, q_max, k_max, work = [], 0, 0, 0, 0
    for i, (q, k) in enumerate(zip(n_q, n_keys)):
        nq, nk, n = max(q_max, q), max(k_max, k), i - start + 1
        if n > 1 and (n * nk > chunk_keys or n * nq * nk > max_padding * (work + q * k)):
            cuts.append(slice(start, i))
            start, nq, nk, work = i, q, k, 0
        q_max, k_max, work = nq, nk, work + q * k
    cuts.append(slice(start, len(n_q)))
    return cuts


def gather_plan(
    layout: TokenLayout, window: int, radius: int, chunk_keys: int, key_align: int | None = None
) -> list[GatherChunk]:
    """The gather kernel's chunks for ``layout``, built once per layout (every block of a forward reuses them).
    ``key_align``: None for the layout's device (see ``build_gather_chunks``)."""
    key_align = key_align or gather_key_align(layout.positions.device)
    return layout.plan(
        ("gather", window, radius, chunk_keys, key_align),
        lambda: build_gather_chunks(
            layout.positions, layout.grid, layout.num_prefix, window, radius, chunk_keys, key_align
        ),
    )


def gather_key_align(device: torch.device | str) -> int:
    """Key lengths of a gather chunk are rounded up to a multiple of this: 8 on GPUs (keeps the fused SDPA kernels),
    1 on CPUs (no alignment needed; padding is work)."""
    return 8 if _device_type(device) == "cuda" else 1


def gather_padding(
    layout: TokenLayout, window: int, radius: int = 1, chunk_keys: int = 1 << 13, key_align: int | None = None
) -> tuple[int, int]:
    """``(padded, real)`` query×key products of the gather kernel on ``layout`` (prefix rows included, they are
    exact): the attention FLOPs it computes and those the sparse pattern needs, in the same unit. The chunk plan is
    the kernel's own (cached on the layout under the same key), so this is what a forward on ``layout`` runs."""
    chunks = gather_plan(layout, window, radius, chunk_keys, key_align)
    B, N, _ = layout.positions.shape
    P = layout.num_prefix
    prefix = B * P * (P + N)
    return prefix + sum(c.padded_work for c in chunks), prefix + sum(c.real_work for c in chunks)


def gather_chunk_keys(device: torch.device | str) -> int:
    """Default gathered key rows per chunk of the gather kernel: small on CPU (the gathered K/V stay in cache:
    8192 rows ran the gather 7× faster than 65536), larger on GPUs (fewer launches)."""
    return 1 << 18 if _device_type(device) == "cuda" else 1 << 13


def sparse_attention(
    attn,
    x: Tensor,
    layout: TokenLayout,
    window: int,
    radius: int = 1,
    chunk_keys: int | None = None,
    qkv: tuple | None = None,
) -> Tensor:
    """Index-gather kernel: each chunk of query blocks gathers its neighbourhood K/V rows and runs masked SDPA.

    ``chunk_keys``: gathered key rows per chunk; None: ``gather_chunk_keys`` of the device."""
    q, k, v = qkv or split_heads(attn, x)
    P = layout.num_prefix
    B, L, H, d = q.shape
    chunk_keys = chunk_keys or gather_chunk_keys(x.device)
    chunks = gather_plan(layout, window, radius, chunk_keys)

    # Row views of the projections (B·L × H·d; a view of the fused qkv output, no copy).
    q_all, k_all, v_all = (t.reshape(B * L, H * d) for t in (q, k, v))
    # every row is written below (prefix rows, each patch token in exactly one chunk); the last row collects the
    # padded queries' outputs
    out = q.new_empty(B * L + 1, H * d)
    # In inference the gathered neighbourhoods go to buffers reused across chunks (small enough to stay in
    # cache on CPUs, and no allocator traffic), one pair per thread; autograd needs fresh tensors.
    reuse = not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad))
    buffers: dict[int, tuple[Tensor, Tensor]] = {}
    size = max(c.kv_rows.numel() for c in chunks)

    def prefix_rows() -> None:
        out[: B * L].view(B, L, H * d)[:, :P] = _prefix_rows(attn, q, k, v, P).reshape(B, P, H * d)

    def run_chunk(c: GatherChunk) -> None:
        n, Cq = c.q_rows.shape
        qc = q_all.index_select(0, c.q_rows.flatten()).view(n, Cq, H, d)
        if reuse:
            thread = threading.get_ident()
            if thread not in buffers:
                buffers[thread] = (k_all.new_empty(size, H * d), v_all.new_empty(size, H * d))
            kbuf, vbuf = buffers[thread]
            rows = c.kv_rows.numel()
            kc = torch.index_select(k_all, 0, c.kv_rows, out=kbuf[:rows])
            vc = torch.index_select(v_all, 0, c.kv_rows, out=vbuf[:rows])
        else:
            kc, vc = k_all.index_select(0, c.kv_rows), v_all.index_select(0, c.kv_rows)
        kc, vc = kc.view(n, -1, H, d), vc.view(n, -1, H, d)
        oc = F.scaled_dot_product_attention(
            qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=c.key_mask, dropout_p=_dropout_p(attn)
        )
        # Chunks write disjoint rows (all padded queries write the trash row, whose value is never read).
        out.index_copy_(0, c.out_rows, oc.transpose(1, 2).reshape(n * Cq, H * d))

    # One task per chunk (cpu_tasks.py), the prefix rows one more; outside cpu_tasks, a plain loop.
    map_tasks(lambda task: task(), [prefix_rows, *(functools.partial(run_chunk, c) for c in chunks)])
    return merge_heads(attn, x, out[: B * L].view(B, L, H, d))


# --- varlen: one flash-attention call per chunk of ragged units, nothing padded (CUDA, fp16/bf16) -----------------
# Gathered key rows per varlen call: 2 × 100 MB of K/V for UNI2-h in bf16, about one tokens × D tensor at 3,430 px,
# so the call's peak (block input, K, V, output, this) matches flex's (block input, three slot buffers, output).
VARLEN_CHUNK_KEYS = 1 << 15
VARLEN_MAX_HEAD_DIM = 256  # flash attention's limit


@dataclass
class VarlenChunk:
    """Consecutive query units (``block_units``) packed for ``varlen_attn``: no unit is padded."""

    q_rows: Tensor  # T_q long: the units' query rows (in the flattened B·L tokens), unit after unit
    kv_rows: Tensor  # T_k long: each unit's neighbourhood keys, then its image's prefix keys, unit after unit
    cu_q: Tensor  # (units + 1) int32: where each unit's queries start in ``q_rows`` (and the end)
    cu_k: Tensor  # (units + 1) int32: the same for its keys in ``kv_rows``
    max_q: int  # most queries of a unit
    max_k: int  # most keys of a unit
    real_work: int  # Σ queries × keys: the products the sparse pattern asks for, all that the call computes


def build_varlen_chunks(
    positions: Tensor, grid: tuple[int, int], num_prefix: int, window: int, radius: int, chunk_keys: int
) -> list[VarlenChunk]:
    """The units in id order (their queries are consecutive rows of ``rows_sorted``), their keys listed compactly,
    cut into chunks of at most ``chunk_keys`` keys (a unit more than that is a chunk of its own)."""
    device = positions.device
    L = num_prefix + positions.shape[1]
    u = block_units(positions, grid, num_prefix, window, radius)
    U, K = u.nbr_counts.shape
    # Each unit's key segments: its K neighbours' token runs in ``rows_sorted``, then its image's prefix rows.
    lengths = torch.cat([u.nbr_counts, u.nbr_counts.new_full((U, 1), num_prefix)], 1).flatten()
    first = torch.cat([u.starts[u.nbr_units], (u.image * L)[:, None]], 1).flatten()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    offset = torch.arange(len(segment), device=device) - (torch.cumsum(lengths, 0) - lengths)[segment]
    at = first[segment] + offset
    is_prefix = segment % (K + 1) == K
    kv_rows = torch.where(is_prefix, at, u.rows_sorted[at.clamp(max=len(u.rows_sorted) - 1)])

    n_q, n_keys = u.n_q.tolist(), u.n_keys.tolist()
    q_end = list(itertools.accumulate(n_q, initial=0))
    k_end = list(itertools.accumulate(n_keys, initial=0))
    chunks, start = [], 0
    while start < U:
        end = max(start + 1, bisect.bisect_right(k_end, k_end[start] + chunk_keys) - 1)
        cu_q = torch.tensor([e - q_end[start] for e in q_end[start : end + 1]], dtype=torch.int32, device=device)
        cu_k = torch.tensor([e - k_end[start] for e in k_end[start : end + 1]], dtype=torch.int32, device=device)
        chunks.append(
            VarlenChunk(
                q_rows=u.rows_sorted[q_end[start] : q_end[end]],
                kv_rows=kv_rows[k_end[start] : k_end[end]],
                cu_q=cu_q,
                cu_k=cu_k,
                max_q=max(n_q[start:end]),
                max_k=max(n_keys[start:end]),
                real_work=sum(q * k for q, k in zip(n_q[start:end], n_keys[start:end])),
            )
        )
        start = end
    return chunks


def varlen_plan(layout: TokenLayout, window: int, radius: int, chunk_keys: int) -> list[VarlenChunk]:
    """The varlen kernel's chunks for ``layout``, built once per layout."""
    return layout.plan(
        ("varlen", window, radius, chunk_keys),
        lambda: build_varlen_chunks(layout.positions, layout.grid, layout.num_prefix, window, radius, chunk_keys),
    )


def varlen_padding(
    layout: TokenLayout, window: int, radius: int = 1, chunk_keys: int = VARLEN_CHUNK_KEYS
) -> tuple[int, int]:
    """``(padded, real)`` query×key products of the varlen kernel on ``layout``, as ``gather_padding``: equal."""
    B, N, _ = layout.positions.shape
    P = layout.num_prefix
    real = B * P * (P + N) + sum(c.real_work for c in varlen_plan(layout, window, radius, chunk_keys))
    return real, real


_VARLEN: dict[str, Callable[..., Tensor] | None] = {}


def _varlen_attention(device_type: str) -> Callable[..., Tensor] | None:
    """torch's ``varlen_attn`` (flash attention over packed ragged sequences, PyTorch ≥ 2.10) on CUDA; None where
    it cannot run (another device, an older PyTorch)."""
    if device_type not in _VARLEN:
        fn = None
        if device_type == "cuda":
            try:
                from torch.nn.attention.varlen import varlen_attn as fn
            except ImportError:
                fn = None
        _VARLEN[device_type] = fn
    return _VARLEN[device_type]


def varlen_unsupported(
    device: torch.device | str, dtype: torch.dtype | None = None, head_dim: int | None = None, dropout: bool = False
) -> str | None:
    """Why the varlen kernel would run gather instead on ``device`` with queries of ``dtype`` and ``head_dim``
    (None: not known, assumed to fit), or None where it runs: the one rule of the kernel, the policy and the
    benchmark's columns."""
    device_type = _device_type(device)
    if _varlen_attention(device_type) is None:
        return f"no varlen_attn on {device_type} in PyTorch {torch.__version__} (CUDA, PyTorch >= 2.10)"
    flash = device_type == "cuda"  # (the tests' CPU stand-in for varlen_attn takes any dtype)
    if flash and (
        (dtype is not None and dtype not in (torch.float16, torch.bfloat16))
        or (head_dim is not None and (head_dim > VARLEN_MAX_HEAD_DIM or head_dim % 8))
    ):
        return (
            f"flash attention needs fp16 or bf16 and a head dim <= {VARLEN_MAX_HEAD_DIM}, a multiple of 8 "
            f"(got {dtype}, {head_dim})"
        )
    if dropout:
        return "varlen has no attention dropout"
    return None


@functools.cache
def _warn_varlen_fallback(why: str) -> None:
    warnings.warn(f"sparse_backend=varlen: {why}; the gather kernel ran instead (the same outputs)", stacklevel=3)


VARLEN_PROJECTION_TOKENS = 1 << 13  # tokens per step of the varlen kernel's K/V projection


def project_kv(
    attn, x: Tensor, norm: Callable[[Tensor], Tensor] = _identity, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """K and V of ``norm(x)`` (B×L×H×d each), projected ``chunk`` tokens at a time (None:
    ``VARLEN_PROJECTION_TOKENS``): neither the fused q/k/v (three tokens × D tensors) nor the normalised tokens
    exist whole."""
    B, L, _ = x.shape
    chunk = chunk or VARLEN_PROJECTION_TOKENS
    k = v = None
    for start in range(0, L, chunk):
        kc, vc = project_parts(attn, norm(x[:, start : start + chunk]), 1, 2)
        if k is None:  # the projection's dtype (autocast) sizes them
            k, v = kc.new_empty(B, L, *kc.shape[2:]), vc.new_empty(B, L, *vc.shape[2:])
        k[:, start : start + chunk], v[:, start : start + chunk] = kc, vc
        del kc, vc
    return k, v


def sparse_attention_varlen(
    attn,
    x: Tensor,
    layout: TokenLayout,
    window: int,
    radius: int = 1,
    chunk_keys: int | None = None,
    qkv: tuple | None = None,
    norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Same semantics as ``sparse_attention``: each block's queries attend to its neighbourhood's keys and the
    prefix keys, gathered compactly as in the gather kernel, but all the blocks of a chunk go to one
    ``varlen_attn`` call as ragged sequences (query and key counts per block), so no block is padded to another
    and a block is a handful of kernel launches, not five per chunk of similar blocks. Flash attention runs fp16
    and bf16 on CUDA; elsewhere (fp32, a head dim over 256) this is the gather kernel.

    Memory: K and V are projected chunk by chunk and each call's queries for that call only, so the fused q/k/v
    never exists (a ``qkv`` given is ignored, as flex does); alive at once are the block's input, K, V, the output
    and one call's gathered K/V. ``norm``: ``x`` is the block's input, normalised here a chunk at a time."""
    norm = _identity if norm is None else norm
    P = layout.num_prefix
    B, L, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    q_prefix = project_parts(attn, norm(x[:, :P]), 0)[0]  # its dtype (autocast) is the kernel's
    why = varlen_unsupported(x.device, q_prefix.dtype, d, dropout=_dropout_p(attn) > 0)
    if why is not None:
        _warn_varlen_fallback(why)
        return sparse_attention(attn, norm(x), layout, window, radius, chunk_keys)
    fn = _varlen_attention(x.device.type)
    chunks = varlen_plan(layout, window, radius, chunk_keys or VARLEN_CHUNK_KEYS)
    k, v = project_kv(attn, x, norm)
    out = k.new_empty(B * L, H * d)
    out.view(B, L, H * d)[:, :P] = _prefix_rows(attn, q_prefix, k, v, P).reshape(B, P, H * d)
    del q_prefix
    rows, k_all, v_all = x.reshape(B * L, -1), k.view(B * L, H, d), v.view(B * L, H, d)
    for c in chunks:
        qc = project_parts(attn, norm(rows.index_select(0, c.q_rows)), 0)[0]
        kc, vc = k_all.index_select(0, c.kv_rows), v_all.index_select(0, c.kv_rows)
        oc = fn(qc.contiguous(), kc, vc, c.cu_q, c.cu_k, c.max_q, c.max_k)
        del qc, kc, vc
        out.index_copy_(0, c.q_rows, oc.reshape(-1, H * d))
        del oc
    del k, v, k_all, v_all
    gated = getattr(attn, "gate", None) is not None  # the gate reads the normalised tokens
    return merge_heads(attn, norm(x) if gated else x, out.view(B, L, H, d))


_FLEX = {}


def _flex_attention(device_type: str):
    """flex_attention, compiled on CUDA (uncompiled flex materialises the full score matrix)."""
    if device_type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if device_type == "cuda":
            # One compiled kernel per (grid, capacity) shape: a sweep over resolutions needs more than dynamo's
            # default of 8 recompilations, after which it would silently run the O(L²) unfused fallback.
            import torch._dynamo.config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
            if hasattr(dynamo_config, "accumulated_cache_size_limit"):
                dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 1024)
            _FLEX[device_type] = torch.compile(flex_attention, dynamic=False)
        else:
            _FLEX[device_type] = flex_attention
    return _FLEX[device_type]


FLEX_TILE_PREFERENCE = 1.25  # a smaller BlockMask block must cut the padded work by more than this to be chosen
# The smallest BlockMask block (and kernel tile) considered: flex accepts 16, but tiles that small were not measured
# on a GPU; 32 already cuts the padded work after pruning 3.3× (flex_block_size).
FLEX_MIN_BLOCK = 32


def _flex_block_pairs(plan: SparsePlan, kv_valid: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """The BlockMask's block pairs at ``block`` slots per block (a power of two dividing the slot capacity):
    ``(cand, is_full, is_partial)``, ``cand`` the candidate KV blocks of every query block (query blocks × K, the
    parts of its window's neighbour windows and of the prefix window nb + 1; ids in the dummy window nb pad), and
    which of them the kernel computes without (full) and with (partial) ``mask_mod``. KV blocks empty in every
    image are neither; a query block empty in every image gets only the prefix keys (no row is left without keys)."""
    C, nb = plan.capacity, plan.num_blocks
    parts = C // block
    device = plan.slot.device
    batch = kv_valid.shape[0]
    per_block = kv_valid.view(batch, (nb + 2) * parts, block)
    full = per_block.all(-1).all(0)
    nonempty = per_block.any(-1).any(0)
    q_nonempty = plan.key_valid.view(batch, (nb + 1) * parts, block).any(-1).any(0)
    prefix_window = torch.full((nb, 1), nb + 1, device=device, dtype=torch.long)
    windows = torch.cat([plan.neighbours, prefix_window], dim=1)
    dummy_row = torch.full((1, windows.shape[1]), nb, device=device, dtype=torch.long)
    dummy_row[0, 0] = nb + 1
    windows = torch.cat([windows, dummy_row], dim=0)  # (nb + 1) query windows × (K + 1)
    part = torch.arange(parts, device=device)
    cand = (windows[:, :, None] * parts + part).flatten(1).repeat_interleave(parts, dim=0)
    is_prefix = cand // parts == nb + 1
    keep = q_nonempty[:, None] | is_prefix
    is_full = full[cand] & ~is_prefix & keep
    is_partial = nonempty[cand] & ~is_full & keep
    return cand, is_full, is_partial


def _flex_block_work(plan: SparsePlan, kv_valid: Tensor, block: int) -> int:
    """Query × key products flex computes for one image at ``block`` (every listed block pair is a full tile)."""
    _, is_full, is_partial = _flex_block_pairs(plan, kv_valid, block)
    return int(is_full.sum() + is_partial.sum()) * block * block


def flex_block_size(plan: SparsePlan, kv_valid: Tensor) -> int:
    """Slots per BlockMask block: the slot capacity (a window's slots, one block), or a half of it, a quarter...
    down to ``FLEX_MIN_BLOCK``.

    After pruning a window holds ~40 % of its tokens but keeps the capacity of the fullest one, and whole-window
    tiles compute mostly padding (UNI2-h, 3,430 px, 0.6 pruned at random: 6.7× the real work; half-window blocks
    2.0×: the empty halves are not listed). A smaller block is taken only if it cuts the padded work by more than
    ``FLEX_TILE_PREFERENCE`` (larger tiles run faster per product on GPUs) and keeps the query blocks within
    ``FLEX_MAX_BLOCKS`` (the block tables grow quadratically); on the full grid the capacity stays."""
    C, nb = plan.capacity, plan.num_blocks
    sizes = [C]
    while sizes[-1] // 2 >= FLEX_MIN_BLOCK and (nb + 1) * (C // (sizes[-1] // 2)) <= FLEX_MAX_BLOCKS:
        sizes.append(sizes[-1] // 2)
    work = {size: _flex_block_work(plan, kv_valid, size) for size in sizes}
    least = min(work.values())
    return max(size for size in sizes if work[size] <= FLEX_TILE_PREFERENCE * least)


def flex_block_mask(plan: SparsePlan, kv_valid: Tensor, block: int | None = None, backward: bool = True):
    """BlockMask of the sparse pattern built directly from KV block indices (never an L×L mask).

    ``block``: slots per mask block (``flex_block_size``; None: the slot capacity, one block per window);
    ``backward``: also the transposed tables a backward pass reads (as large again; inference needs none). Query
    blocks are the parts of the slot windows 0..nb (nb: the empty dummy); KV blocks those and the parts of window
    nb + 1, which holds the prefix keys. A KV block whose slots are all filled in every image is a "full" block (no
    mask_mod call); others are partial, masked by slot validity (``kv_valid``, from ``flex_kv_valid``).
    """
    from torch.nn.attention.flex_attention import BlockMask

    C, nb = plan.capacity, plan.num_blocks
    block = block or C
    parts = C // block
    device = plan.slot.device
    cand, is_full, is_partial = _flex_block_pairs(plan, kv_valid, block)
    kv_blocks = (nb + 2) * parts

    def packed(selected):
        # Each row lists the selected KV blocks first, then every other block: BlockMask expects a
        # permutation of all KV blocks per query block (it reads only the first ``num``).
        dense = torch.zeros(cand.shape[0], kv_blocks, dtype=torch.bool, device=device)
        dense.scatter_(1, torch.where(selected, cand, torch.full_like(cand, nb * parts)), selected)
        dense[:, nb * parts : (nb + 1) * parts] = False  # the dummy window is never attended
        order = torch.sort((~dense).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
        return dense, dense.sum(1).to(torch.int32)[None, None], order[None, None]

    partial_blocks, kv_num, kv_idx = packed(is_partial)
    full_blocks, full_num, full_idx = packed(is_full)
    # mask_mod must define the whole pattern by itself (uncompiled flex ignores the block structure)
    allowed = partial_blocks | full_blocks

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_valid[b, kv_idx] & allowed[q_idx // block, kv_idx // block]

    lengths = ((nb + 1) * C, (nb + 2) * C)
    transposed = {} if backward else {"compute_q_blocks": False}
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=lengths, **transposed
    )


def _flex_plan(layout: TokenLayout, window: int, radius: int) -> tuple[SparsePlan, Tensor, int]:
    """The flex kernel's slot plan, key validity and mask block size for ``layout`` (built once per layout)."""
    P, B = layout.num_prefix, layout.positions.shape[0]
    plan = layout.sparse_plan(window, radius, align=max(16, 1 << (P - 1).bit_length()))
    kv_valid = layout.plan(("flex_kv_valid", window, radius, B), lambda: flex_kv_valid(plan, P, B))
    block = layout.plan(("flex_block", window, radius, B), lambda: flex_block_size(plan, kv_valid))
    return plan, kv_valid, block


def flex_padding(layout: TokenLayout, window: int, radius: int = 1) -> tuple[int, int]:
    """``(padded, real)`` query×key products of the flex kernel on ``layout``, as ``gather_padding``: every block
    pair of its BlockMask is a full tile, and the prefix rows run over all K/V rows (masked)."""
    plan, kv_valid, block = _flex_plan(layout, window, radius)
    B, P = layout.positions.shape[0], layout.num_prefix
    padded = B * _flex_block_work(plan, kv_valid, block) + B * P * kv_valid.shape[1]
    return padded, gather_padding(layout, window, radius)[1]


def sparse_attention_flex(
    attn,
    x: Tensor,
    layout: TokenLayout,
    window: int,
    radius: int = 1,
    qkv: tuple | None = None,
    norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Same semantics as ``sparse_attention``, through torch flex_attention with a block-sparse BlockMask.

    q/k/v are projected chunk by chunk straight into the slot buffers, and each buffer is dropped once read,
    so at most the slots, the kernel's output and the block's input are alive at once (not the fused q/k/v as
    well: 553 MB per block for UNI2-h at 3,430 px, bf16). A ``qkv`` given by the caller is ignored: holding it
    through the call is what this avoids (the encoder does not pass it to this kernel). ``norm``: ``x`` is the
    block's input, normalised here a chunk at a time (its normalised copy, 184 MB there, is never whole)."""
    P = layout.num_prefix
    B, L, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    plan, kv_valid, block = _flex_plan(layout, window, radius)
    C, nb = plan.capacity, plan.num_blocks
    backward = torch.is_grad_enabled()
    block_mask = layout.plan(
        ("flex_mask", window, radius, B, backward), lambda: flex_block_mask(plan, kv_valid, block, backward)
    )

    SQ, SKV = (nb + 1) * C, (nb + 2) * C  # KV block nb + 1 holds the prefix keys
    qb, kb, vb, q_prefix, q_rows = _project_to_slots(
        attn, x, plan, P, SQ, SKV, FLEX_PROJECTION_TOKENS, _identity if norm is None else norm
    )
    qb, kb, vb = (t.view(B, -1, H, d).transpose(1, 2) for t in (qb, kb, vb))
    # The prefix (global) rows attend to every key: the filled K/V rows, masked.
    out_prefix = F.scaled_dot_product_attention(
        q_prefix.transpose(1, 2), kb, vb, attn_mask=kv_valid[:, None, None], dropout_p=_dropout_p(attn)
    ).transpose(1, 2)
    del q_prefix
    flex = _flex_attention(x.device.type)
    # The kernel's tiles must divide the mask's block size (a power of two >= 16).
    tile = min(block, 128)
    ob = flex(qb, kb, vb, block_mask=block_mask, scale=attn.scale, kernel_options={"BLOCK_M": tile, "BLOCK_N": tile})
    del qb, kb, vb
    out = _from_slots(ob.transpose(1, 2).reshape(B * SQ, H * d), out_prefix, q_rows, L)
    del ob
    gated = getattr(attn, "gate", None) is not None  # the gate reads the normalised tokens
    return merge_heads(attn, norm(x) if norm is not None and gated else x, out)


# --- kernel registry and selection policy ------------------------------------------------------------
# Every kernel is called as ``kernel(attn, x, layout, qkv=None, *, window, radius, chunk_keys, norm=None)`` and
# returns what timm's ``Attention.forward(norm(x))`` would; the arguments a kernel does not use are ignored. ``norm``
# given, ``x`` is the block's input: a projecting kernel normalises it chunk by chunk, the others up front.


def _dense_kernel(attn, x, layout, qkv=None, *, window=None, radius=None, chunk_keys=None, norm=None) -> Tensor:
    return dense_attention(attn, x if norm is None else norm(x), layout, qkv)


def _eager_kernel(attn, x, layout, qkv=None, *, window=None, radius=None, chunk_keys=None, norm=None) -> Tensor:
    return eager_attention(attn, x if norm is None else norm(x), layout, qkv)


def _gather_kernel(attn, x, layout, qkv=None, *, window, radius=1, chunk_keys=None, norm=None) -> Tensor:
    return sparse_attention(attn, x if norm is None else norm(x), layout, window, radius, chunk_keys, qkv)


def _flex_kernel(attn, x, layout, qkv=None, *, window, radius=1, chunk_keys=None, norm=None) -> Tensor:
    return sparse_attention_flex(attn, x, layout, window, radius, qkv, norm)


def _varlen_kernel(attn, x, layout, qkv=None, *, window, radius=1, chunk_keys=None, norm=None) -> Tensor:
    return sparse_attention_varlen(attn, x, layout, window, radius, chunk_keys, qkv, norm)


ATTENTION_KERNELS: dict[str, Callable[..., Tensor]] = {
    "dense": _dense_kernel,  # SDPA (fused, O(L) memory)
    "eager": _eager_kernel,  # the materialised L×L matrix (the paper's "vanilla")
    "sparse[gather]": _gather_kernel,  # index-gather + chunked SDPA: CPU, training, very large grids
    "sparse[flex]": _flex_kernel,  # flex_attention with a block-sparse BlockMask: CUDA inference
    "sparse[varlen]": _varlen_kernel,  # gathered like gather, one varlen_attn per chunk, unpadded: CUDA fp16/bf16
}


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def check_attention_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be {one_of(mode, ATTENTION_MODES)}, got {mode!r}")


def check_sparse_backend(backend: str) -> None:
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse_backend must be {one_of(backend, SPARSE_BACKENDS)}, got {backend!r}")


def check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (block side in patches), got {window!r}")


def check_radius(radius: int) -> None:
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0 (neighbour blocks on each side), got {radius!r}")


# The attention group's keys (``create_encoder``'s names, ``mode`` its ``attention=``) and the check of each: the
# config validation and a segmentation model's attention at inference check with the same ones.
ATTENTION_CHECKS = (
    ("mode", check_attention_mode),
    ("window", check_window),
    ("radius", check_radius),
    ("sparse_backend", check_sparse_backend),
)


def eager_matrix_bytes(heads: int, tokens: int, bytes_per_element: int) -> int:
    """Bytes the eager kernel holds at once per image: the scores and their softmax (two heads × L × L buffers)."""
    return 2 * heads * tokens * tokens * bytes_per_element


def check_kernel_names(mode: str, backend: str = "auto") -> None:
    """Raise ValueError for an attention mode or sparse backend that ``select_kernel`` does not know."""
    check_attention_mode(mode)
    check_sparse_backend(backend)


def select_kernel(
    mode: str,
    backend: str,
    device: torch.device | str,
    grid: tuple[int, int],
    window: int,
    training: bool = False,
    *,
    dropout: bool = False,
    radius: int = 1,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> tuple[str, Callable[..., Tensor]]:
    """The attention kernel that runs: ``(name, kernel)``, ``name`` a key of ``ATTENTION_KERNELS``.

    The whole policy, used by the encoder, the cost model and the benchmark:
    - ``dense`` and ``eager`` run themselves.
    - ``sparse`` where every block's neighbourhood (the blocks within ``radius``) holds every block of ``grid`` —
      one window over the whole grid, or, at radius 1, at most 2 × 2 windows (a model trained with one window over
      its grid, run on a tile up to twice as large) — is dense attention: ``dense`` (the same pattern, pruned or not,
      without the sparse kernels' gathers or slots).
    - ``sparse``, backend ``auto``: flex_attention for CUDA inference (faster and leaner on H100, see
      docs/benchmarks.md) up to ``FLEX_MAX_BLOCKS`` blocks (its block tables grow quadratically); gather otherwise
      (CPU, training, very large grids).
    - ``sparse``, backend ``flex``: flex, except where it cannot run: ``dropout`` (attention dropout active; flex
      has none on the sparse rows) or ``training`` on a non-CUDA device (no CPU backward): gather there.
    - ``sparse``, backend ``gather``: gather.
    - ``sparse``, backend ``varlen``: varlen for CUDA inference where this PyTorch has ``varlen_attn``; gather
      otherwise (CPU, training, dropout, and ``varlen_unsupported``'s dtypes and head dims). Not the default: not yet
      measured on a GPU.
    ``training``: gradients are being computed (``torch.is_grad_enabled()`` in a forward). ``dtype``, ``head_dim``:
    the queries' (None: not known here; the varlen kernel then checks them itself and warns when it runs gather).
    """
    check_kernel_names(mode, backend)
    if mode != "sparse":
        name = mode
    elif max(math.ceil(grid[0] / window), math.ceil(grid[1] / window)) - 1 <= radius:
        name = "dense"  # every block sees every block: sparse attention is dense attention
    else:
        cuda = _device_type(device) == "cuda"
        flex_runs = not dropout and (cuda or not training)
        blocks = math.ceil(grid[0] / window) * math.ceil(grid[1] / window)
        if backend == "auto":
            flex = flex_runs and cuda and not training and blocks <= FLEX_MAX_BLOCKS
        else:
            flex = flex_runs and backend == "flex"
        varlen = backend == "varlen" and not training and varlen_unsupported(device, dtype, head_dim, dropout) is None
        name = "sparse[varlen]" if varlen else "sparse[flex]" if flex else "sparse[gather]"
    return name, ATTENTION_KERNELS[name]


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    """What ``varlen_attn`` computes (T_q×H×d), one sequence at a time with SDPA, on any device: the stand-in where
    flash attention cannot run (CPU tests of the varlen kernel, its CPU memory measure); its own temporaries are one
    sequence's scores. For tests and measurements only."""
    out = torch.empty_like(q)
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        out[a:b] = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
        ).transpose(0, 1)
    return out


def sparse_reference_mask(layout: TokenLayout, window: int, radius: int = 1) -> Tensor:
    """The explicit L×L boolean mask (True = may attend) of the sparse pattern; for tests and figures only."""
    P = layout.num_prefix
    pos = layout.positions
    B, N, _ = pos.shape
    blk = pos // window  # B×N×2 block coordinates
    near = (blk[:, :, None, :] - blk[:, None, :, :]).abs().amax(-1) <= radius  # B×N×N
    mask = torch.ones(B, P + N, P + N, dtype=torch.bool, device=pos.device)
    mask[:, P:, P:] = near
    return mask

"""Every sparse kernel path reachable on CPU equals the reference (fp32, 1e-4) on ragged pruned layouts with prefix
tokens: gather (plain loop and as CPU tasks, one chunk and many) and flex (uncompiled on CPU, projected in one
step and in many)."""

import weakref

import pytest
import torch
from conftest import tiny_encoder

from hirespath.models import attention, encoder
from hirespath.models.attention import (
    ATTENTION_KERNELS,
    TokenLayout,
    gather_plan,
    sparse_reference_mask,
    split_heads,
)
from hirespath.models.cpu_tasks import cpu_tasks


def reference(attn, x: torch.Tensor, layout: TokenLayout, window: int, radius: int) -> torch.Tensor:
    """The design semantics written out: the L×L scores, -inf where the pattern forbids, softmax, timm's output
    path (qkv → heads → masked softmax → merge → proj), in float64."""
    attn = attn.double()
    x = x.double()
    B, L, _ = x.shape
    q, k, v = (t.transpose(1, 2) for t in split_heads(attn, x))
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    allowed = sparse_reference_mask(layout, window, radius)[:, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, L, -1)
    y = attn.proj(attn.norm(out))
    attn.float()
    return y.float()


def layouts(B: int, grid: tuple[int, int], P: int) -> dict[str, TokenLayout]:
    """Full grid; pruned to uneven survivors (some blocks full, some empty: ragged chunks)."""
    g = torch.Generator().manual_seed(1)
    n = grid[0] * grid[1]
    full = TokenLayout.full_grid(B, grid, P, "cpu")
    # survivors weighted towards the top-left, so blocks hold very different numbers of tokens
    weight = torch.linspace(2.0, 0.1, n) * torch.rand(B, n, generator=g)
    keep = weight.topk(int(0.45 * n), dim=1).indices.sort(dim=1).values
    return {"full": full, "pruned": full.select(keep)}


def _flex_projected_in_steps(k, *a, **kw):
    saved = attention.FLEX_PROJECTION_TOKENS
    attention.FLEX_PROJECTION_TOKENS = 7  # many projection steps into the slots, the last one short
    try:
        return ATTENTION_KERNELS["sparse[flex]"](*a, **kw)
    finally:
        attention.FLEX_PROJECTION_TOKENS = saved


PATHS = {
    "gather": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[gather]"](*a, **kw),
    "gather-chunks": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[gather]"](*a, **kw, chunk_keys=k),
    "flex": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[flex]"](*a, **kw),
    "flex-steps": _flex_projected_in_steps,
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("tasks", [False, True], ids=["loop", "tasks"])
@pytest.mark.parametrize("grid,window,radius", [((11, 9), 3, 1), ((8, 8), 2, 2)])
@pytest.mark.parametrize("which", ["full", "pruned"])
def test_kernel_equals_reference(path, tasks, grid, window, radius, which, two_threads):
    enc = tiny_encoder(attention="sparse", window=window)
    attn = enc.vit.blocks[0].attn
    B, P = 2, enc.num_prefix_tokens
    layout = layouts(B, grid, P)[which]
    torch.manual_seed(2)
    x = torch.randn(B, P + layout.positions.shape[1], enc.embed_dim)
    with torch.inference_mode():
        want = reference(attn, x, layout, window, radius)
        with cpu_tasks(torch.device("cpu"), "tasks" if tasks else "ops"):
            got = PATHS[path](64, attn, x, layout, window=window, radius=radius)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if path == "gather-chunks" and which == "pruned":  # really many ragged chunks (padded keys masked)
        chunks = gather_plan(layout, window, radius, 64)
        assert len(chunks) > 2 and any(c.key_mask is not None for c in chunks)


def test_no_projection_is_alive_while_flex_runs(monkeypatch):
    """When flex runs, no q/k/v projection of the block is alive: neither the kernel's own (projected step by
    step into the slots) nor the pruning block's (made for its scores). The fused q/k/v (3 × tokens × D) held
    through the call had been the block's memory peak, next to the slots."""
    enc = tiny_encoder(attention="sparse", window=2, prune_ratio=0.5, prune_layer=2, sparse_backend="flex")
    projections = []
    split_heads_ = attention.split_heads

    def recorded(attn, x):
        qkv = split_heads_(attn, x)
        projections.extend(weakref.ref(t.untyped_storage()) for t in qkv)
        return qkv

    alive_at_calls = []
    flex = attention._flex_attention("cpu")

    def spy(*args, **kwargs):
        alive_at_calls.append(sum(ref() is not None for ref in projections))
        return flex(*args, **kwargs)

    monkeypatch.setattr(attention, "split_heads", recorded)
    monkeypatch.setattr(encoder, "split_heads", recorded)  # the pruning block's projection
    monkeypatch.setitem(attention._FLEX, "cpu", spy)
    with torch.inference_mode():
        out = enc(torch.rand(2, 3, 14 * 6, 14 * 6))
    assert alive_at_calls == [0] * enc.depth
    assert out.patch_tokens.shape[1] == 18  # pruned after block 2
    assert len(projections) >= 3 * (enc.depth + 1)  # every block projected, the pruning block twice

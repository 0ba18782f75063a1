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

    project_keys_ = attention.project_keys

    def recorded_keys(attn, x):
        k = project_keys_(attn, x)
        projections.append(weakref.ref(k.untyped_storage()))
        return k

    monkeypatch.setattr(attention, "split_heads", recorded)
    monkeypatch.setattr(encoder, "split_heads", recorded)  # the pruning block's prefix queries
    monkeypatch.setattr(encoder, "project_keys", recorded_keys)  # and its keys
    monkeypatch.setitem(attention._FLEX, "cpu", spy)
    with torch.inference_mode():
        out = enc(torch.rand(2, 3, 14 * 6, 14 * 6))
    assert alive_at_calls == [0] * enc.depth
    assert out.patch_tokens.shape[1] == 18  # pruned after block 2
    assert len(projections) >= 3 * enc.depth + 4  # every block projected; the pruning block's q and keys too


@pytest.mark.parametrize("backend", ["flex", "gather"])
def test_no_whole_normalised_tokens_live_through_attention_or_mlp(monkeypatch, backend):
    """A block's normalised tokens (norm1 of all of them, one tokens × D tensor) are not alive while flex runs
    (it normalises chunk by chunk) nor, with any kernel, during the MLP (every MLP chunk starts with norm2)."""
    enc = tiny_encoder(attention="sparse", window=2, prune_ratio=0.5, prune_layer=2, sparse_backend=backend)
    L = 6 * 6 + enc.num_prefix_tokens
    normalised, alive_in_flex, alive_in_mlp = [], [], []

    def keep_whole(module, args, output):
        if output.shape[1] == L:
            normalised.append(weakref.ref(output.untyped_storage()))

    def alive() -> int:
        return sum(ref() is not None for ref in normalised)

    for blk in enc.vit.blocks:
        blk.norm1.register_forward_hook(keep_whole)
        blk.norm2.register_forward_pre_hook(lambda module, args: alive_in_mlp.append(alive()))
    flex = attention._flex_attention("cpu")

    def spy(*args, **kwargs):
        alive_in_flex.append(alive())
        return flex(*args, **kwargs)

    monkeypatch.setitem(attention._FLEX, "cpu", spy)
    with torch.inference_mode():
        enc(torch.rand(2, 3, 14 * 6, 14 * 6))
    assert alive_in_flex == ([0] * enc.depth if backend == "flex" else [])
    assert alive_in_mlp and set(alive_in_mlp) == {0}
    assert backend == "flex" or len(normalised) >= 2  # the gather blocks made whole ones, and dropped them


@pytest.mark.parametrize("score_chunk", [None, 7])
def test_flex_encoder_equals_gather_encoder(monkeypatch, score_chunk):
    """The whole encoder through flex (it normalises and projects chunk by chunk; the pruning block's scores come
    from its prefix queries and keys projected a chunk at a time) equals it through gather (whole normalised tokens,
    one q/k/v for scores and attention): same survivors, same scores, outputs within 1e-4 (fp32)."""
    torch.manual_seed(0)
    flex = tiny_encoder(attention="sparse", window=2, prune_ratio=0.5, prune_layer=2, sparse_backend="flex")
    gather = tiny_encoder(attention="sparse", window=2, prune_ratio=0.5, prune_layer=2, sparse_backend="gather")
    gather.load_state_dict(flex.state_dict())
    if score_chunk:  # the keys of the scores in many steps
        monkeypatch.setattr(attention.prefix_attention_probs, "__defaults__", (score_chunk, None))
    monkeypatch.setattr(attention, "FLEX_PROJECTION_TOKENS", 5)  # and the flex projection
    x = torch.rand(2, 3, 14 * 8, 14 * 6)
    with torch.inference_mode():
        a, b = flex(x, token_scores=True), gather(x, token_scores=True)
    assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(a.token_scores, b.token_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.cls, b.cls, rtol=1e-4, atol=1e-4)

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


def varlen_contract(q, k, v, cu_q, cu_k, max_q, max_k):
    """``varlen_attn``'s contract (flash attention over packed ragged sequences) on CPU: checks what the CUDA
    kernel needs of its arguments, then attends sequence by sequence."""
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1:] == k.shape[1:] == v.shape[1:]
    assert all(t.stride(-1) == 1 for t in (q, k, v))
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.shape == cu_k.shape
    lq, lk = cu_q.diff(), cu_k.diff()
    assert cu_q[0] == cu_k[0] == 0 and cu_q[-1] == len(q) and cu_k[-1] == len(k)
    assert bool((lq > 0).all()) and bool((lk > 0).all())
    assert int(lq.max()) == max_q and int(lk.max()) == max_k
    return attention.varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k)


def _varlen_on_cpu(chunk_keys, *a, **kw):
    """The varlen kernel with ``varlen_attn`` (flash attention, CUDA only) replaced by ``varlen_contract``, a CPU
    function of the same contract; ``chunk_keys`` None: one call."""
    saved = attention._VARLEN.get("cpu")
    attention._VARLEN["cpu"] = varlen_contract
    try:
        return ATTENTION_KERNELS["sparse[varlen]"](*a, **kw, chunk_keys=chunk_keys)
    finally:
        attention._VARLEN["cpu"] = saved


PATHS = {
    "gather": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[gather]"](*a, **kw),
    "gather-chunks": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[gather]"](*a, **kw, chunk_keys=k),
    "flex": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[flex]"](*a, **kw),
    "flex-steps": _flex_projected_in_steps,
    "varlen": lambda k, *a, **kw: _varlen_on_cpu(None, *a, **kw),
    "varlen-chunks": _varlen_on_cpu,
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


def test_varlen_holds_neither_a_fused_qkv_nor_whole_normalised_tokens(monkeypatch):
    """While ``varlen_attn`` runs, the block's projections are K and V (projected a few tokens at a time) and that
    call's queries only: no fused q/k/v of the patch tokens was made and no whole normalised tokens are alive (the
    fused q/k/v held through the calls had been three of the kernel's ~7.4 token × D tensors at its peak)."""
    enc = tiny_encoder(attention="sparse", window=2, prune_ratio=0.5, prune_layer=2, sparse_backend="varlen")
    enc.attn_chunk_keys = 64  # many calls per block
    B, P = 2, enc.num_prefix_tokens
    L = 6 * 6 + P
    normalised, fused, calls = [], [], []

    def keep_whole(module, args, output):
        if output.dim() == 3 and output.shape[1] == L:
            normalised.append(weakref.ref(output.untyped_storage()))

    for blk in enc.vit.blocks:
        blk.norm1.register_forward_hook(keep_whole)
    split_heads_ = attention.split_heads

    def recorded(attn, x):
        qkv = split_heads_(attn, x)
        if x.shape[1] > P:  # more than the prefix tokens
            fused.extend(weakref.ref(t.untyped_storage()) for t in qkv)
        return qkv

    def spy(q, k, v, *args):
        calls.append((sum(r() is not None for r in normalised + fused), q.shape[0]))
        return varlen_contract(q, k, v, *args)

    monkeypatch.setattr(attention, "split_heads", recorded)
    monkeypatch.setattr(attention, "VARLEN_PROJECTION_TOKENS", 5)
    monkeypatch.setitem(attention._VARLEN, "cpu", spy)  # the policy picks varlen where varlen_attn is
    with torch.inference_mode():
        out = enc(torch.rand(B, 3, 14 * 6, 14 * 6))
    assert out.patch_tokens.shape[1] == 18
    assert len(calls) > 2 * enc.depth and {alive for alive, _ in calls} == {0}
    assert max(queries for _, queries in calls) < B * 36  # each call projects its own queries, not all of them
    assert not fused  # K/V and the queries came from their thirds of the projection


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


@pytest.mark.parametrize("chunk_keys", [None, 64], ids=["one-call", "many-calls"])
@pytest.mark.parametrize("grid,window,radius", [((11, 9), 3, 1), ((8, 8), 2, 2)])
@pytest.mark.parametrize("which", ["full", "pruned"])
def test_varlen_plan_packs_each_block_unpadded(chunk_keys, grid, window, radius, which):
    """The varlen kernel's chunks (its outputs equal the reference: ``test_kernel_equals_reference``): every query
    once, chunks within their key budget (a block over it alone), and exactly the pattern's query × key pairs."""
    B, P = 2, 9
    layout = layouts(B, grid, P)[which]
    budget = chunk_keys or attention.VARLEN_CHUNK_KEYS
    chunks = attention.varlen_plan(layout, window, radius, budget)
    assert (len(chunks) > 2) == (chunk_keys is not None)
    assert all(len(c.kv_rows) <= budget or len(c.cu_k) == 2 for c in chunks)
    L = P + layout.positions.shape[1]
    patch_rows = (torch.arange(B)[:, None] * L + torch.arange(P, L)).flatten()
    assert torch.equal(torch.cat([c.q_rows for c in chunks]).sort().values, patch_rows)
    padded, real = attention.varlen_padding(layout, window, radius, budget)
    assert padded == real == int(sparse_reference_mask(layout, window, radius).sum())  # nothing padded


def test_varlen_kernel_runs_gather_where_flash_cannot(recwarn):
    """Without ``varlen_attn`` on the device (CPU here) the kernel warns once and runs the gather kernel: the same
    outputs. The policy sends only CUDA inference to it."""
    enc = tiny_encoder(attention="sparse", window=2)
    attn = enc.vit.blocks[0].attn
    layout = layouts(1, (8, 8), enc.num_prefix_tokens)["pruned"]
    x = torch.randn(1, enc.num_prefix_tokens + layout.positions.shape[1], enc.embed_dim)
    attention._warn_varlen_fallback.cache_clear()
    with torch.inference_mode():
        got = ATTENTION_KERNELS["sparse[varlen]"](attn, x, layout, window=2, radius=1)
        again = ATTENTION_KERNELS["sparse[varlen]"](attn, x, layout, window=2, radius=1)
        want = ATTENTION_KERNELS["sparse[gather]"](attn, x, layout, window=2, radius=1)
    assert torch.equal(got, want) and torch.equal(again, want)
    messages = [str(w.message) for w in recwarn if "varlen" in str(w.message)]
    assert len(messages) == 1 and "gather kernel ran instead" in messages[0] and "cpu" in messages[0]


def test_varlen_encoder_equals_gather_encoder(monkeypatch):
    """The whole encoder, pruned, with every sparse block through the varlen kernel (``varlen_attn`` replaced by
    its CPU reference, the policy made to pick it on CPU) equals it through gather: same survivors, outputs within
    1e-4 (fp32)."""
    monkeypatch.setitem(attention._VARLEN, "cpu", varlen_contract)
    torch.manual_seed(0)
    enc = tiny_encoder(attention="sparse", window=2, prune_ratio=0.5, prune_layer=2, sparse_backend="gather")
    x = torch.rand(2, 3, 14 * 8, 14 * 6)
    with torch.inference_mode():
        want = enc(x)
        pick = encoder.select_kernel
        ran = []

        def varlen_on_cpu(*args, **kwargs):
            name, kernel = pick(*args, **kwargs)
            if name == "sparse[gather]":
                name, kernel = "sparse[varlen]", ATTENTION_KERNELS["sparse[varlen]"]
            ran.append(name)
            return name, kernel

        monkeypatch.setattr(encoder, "select_kernel", varlen_on_cpu)
        got = enc(x)
    assert "sparse[varlen]" in ran
    assert torch.equal(got.positions, want.positions)
    torch.testing.assert_close(got.patch_tokens, want.patch_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.cls, want.cls, rtol=1e-4, atol=1e-4)

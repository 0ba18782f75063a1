"""Exactness of the attention modes against timm and against an explicit masked reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_encoder

from hirespath.models.attention import (
    GATHER_MAX_PADDING,
    TokenLayout,
    build_gather_chunks,
    gather_padding,
    merge_heads,
    sparse_attention,
    sparse_reference_mask,
    split_heads,
)


def masked_reference(attn, x, mask):
    """Dense attention restricted by an explicit boolean L×L mask (B×L×L)."""
    q, k, v = (t.transpose(1, 2) for t in split_heads(attn, x))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return merge_heads(attn, x, out.transpose(1, 2))


@pytest.mark.parametrize("mode", ["eager", "dense"])
def test_full_attention_matches_timm(mode):
    enc = tiny_encoder(attention=mode)
    x = torch.randn(2, 3, 14 * 6, 14 * 5)
    with torch.no_grad():
        out = enc(x)
        ref = enc.vit.forward_features(x)
    assert out.grid == (6, 5)
    torch.testing.assert_close(out.cls, ref[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.patch_tokens, ref[:, 9:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.prefix_tokens, ref[:, :9], atol=1e-4, rtol=1e-4)


def test_sparse_with_window_covering_grid_equals_dense():
    x = torch.randn(2, 3, 14 * 7, 14 * 9)
    with torch.no_grad():
        dense = tiny_encoder(attention="dense")(x)
        sparse = tiny_encoder(attention="sparse", window=9)(x)
    # one block holds the whole grid: the encoder runs the dense kernel, so the outputs are bitwise equal
    assert torch.equal(sparse.cls, dense.cls) and torch.equal(sparse.patch_tokens, dense.patch_tokens)


@pytest.mark.parametrize(
    "grid,window,radius",
    [((7, 5), 2, 1), ((9, 9), 4, 1), ((6, 11), 3, 1), ((10, 7), 2, 2), ((5, 8), 1, 1), ((8, 8), 3, 0)],
)
def test_sparse_layer_equals_masked_reference(grid, window, radius):
    enc = tiny_encoder()
    attn = enc.vit.blocks[0].attn
    B, P, D = 2, 9, enc.embed_dim
    layout = TokenLayout.full_grid(B, grid, P, "cpu")
    x = torch.randn(B, P + grid[0] * grid[1], D)
    with torch.no_grad():
        got = sparse_attention(attn, x, layout, window, radius, chunk_keys=200)  # several chunks
        ref = masked_reference(attn, x, sparse_reference_mask(layout, window, radius))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sparse_on_scattered_survivors_equals_masked_reference():
    """After pruning, neighbourhoods are taken among the surviving tokens by their original (row, col)."""
    enc = tiny_encoder()
    attn = enc.vit.blocks[0].attn
    B, P, grid = 3, 9, (9, 13)
    full = TokenLayout.full_grid(B, grid, P, "cpu")
    keep = torch.stack([torch.randperm(grid[0] * grid[1])[:40].sort().values for _ in range(B)])
    layout = full.select(keep)
    x = torch.randn(B, P + 40, enc.embed_dim)
    with torch.no_grad():
        got = sparse_attention(attn, x, layout, window=3, radius=1, chunk_keys=300)
        ref = masked_reference(attn, x, sparse_reference_mask(layout, 3, 1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _differentiable_flex(q, k, v, block_mask, scale, kernel_options=None):
    """flex_attention's result through masked SDPA (CPU flex has no backward): the block mask made dense."""
    from torch.nn.attention.flex_attention import create_mask

    mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[2], k.shape[2], device=q.device)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("kernel", ["gather", "flex", "flex normalising"])
def test_sparse_gradients_equal_masked_reference(kernel, monkeypatch):
    """Training runs the gather kernel under autograd (fresh gather tensors, no reused buffers), and flex on CUDA
    with ``sparse_backend=flex``: its projection into the slots and read-back under autograd, with the kernel
    itself as masked SDPA (CPU flex has no backward); as the encoder calls it, flex normalises the block input
    chunk by chunk (gradients through the norm as well)."""
    from hirespath.models import attention
    from hirespath.models.attention import sparse_attention_flex

    monkeypatch.setitem(attention._FLEX, "cpu", _differentiable_flex)
    monkeypatch.setattr(attention, "FLEX_PROJECTION_TOKENS", 7)
    enc = tiny_encoder()
    attn, norm = enc.vit.blocks[0].attn, enc.vit.blocks[0].norm1
    sparse = {
        "gather": lambda t, layout: sparse_attention(attn, t, layout, 2, 1, chunk_keys=150),
        "flex": lambda t, layout: sparse_attention_flex(attn, t, layout, 2, 1),
        "flex normalising": lambda t, layout: sparse_attention_flex(attn, t, layout, 2, 1, norm=norm),
    }[kernel]
    reference_input = norm if kernel == "flex normalising" else (lambda t: t)
    B, P, grid = 2, 9, (8, 7)
    layout = TokenLayout.full_grid(B, grid, P, "cpu").select(
        torch.stack([torch.randperm(56)[:30].sort().values for _ in range(B)])
    )
    x = torch.randn(B, P + 30, enc.embed_dim)
    grads = []
    for fn in (
        lambda t: sparse(t, layout),
        lambda t: masked_reference(attn, reference_input(t), sparse_reference_mask(layout, 2, 1)),
    ):
        xr = x.clone().requires_grad_(True)
        fn(xr).square().sum().backward()
        grads.append((xr.grad, attn.qkv.weight.grad.clone(), norm.weight.grad))
        enc.zero_grad()
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (grads[0][2] is not None) == (kernel == "flex normalising")


def _pruned_layout(grid, keep_frac, clustered, P=9, B=1, seed=0):
    """Survivors of pruning on ``grid``: uniformly random, or ``clustered`` (a smooth random field plus noise,
    thresholded: whole regions kept or dropped, as tissue and background are)."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    if clustered:
        coarse = torch.randn(B, 1, grid[0] // 8 + 1, grid[1] // 8 + 1, generator=g)
        field = F.interpolate(coarse, size=grid, mode="bilinear").flatten(1) + 0.3 * torch.randn(B, n, generator=g)
    else:
        field = torch.rand(B, n, generator=g)
    keep = field.topk(int(keep_frac * n), dim=1).indices.sort(dim=1).values
    return TokenLayout.full_grid(B, grid, P, "cpu").select(keep)


@pytest.mark.parametrize("clustered", [False, True])
def test_gather_padding_counts_the_kernels_work(clustered):
    """``gather_padding``: real work is exactly the pattern's query×key pairs (the reference mask), padded work
    what the chunks' SDPA calls compute; every patch query sits in exactly one chunk."""
    grid, window, P, B = (20, 17), 4, 9, 2
    layout = _pruned_layout(grid, 0.4, clustered, P, B)
    padded, real = gather_padding(layout, window, 1, chunk_keys=512)
    assert real == int(sparse_reference_mask(layout, window, 1).sum())
    chunks = build_gather_chunks(layout.positions, grid, P, window, 1, chunk_keys=512)
    L = P + layout.positions.shape[1]
    assert padded == B * P * L + sum(c.q_rows.numel() * c.kv_rows.numel() // c.q_rows.shape[0] for c in chunks)
    assert real < padded <= GATHER_MAX_PADDING * real
    out_rows = torch.cat([c.out_rows for c in chunks])
    real_rows = out_rows[out_rows < B * L]
    assert len(real_rows) == B * layout.positions.shape[1] and len(real_rows.unique()) == len(real_rows)


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("grid", [(128, 128), (245, 245)])  # UNI2-h at 1792 and 3430 px
def test_gather_padding_after_pruning_under_1_15(grid, clustered):
    """Blocks hold different numbers of survivors after pruning (0.6 dropped); chunks of similar blocks keep the
    padded work within 1.15× the real work at the paper's resolutions (CPU chunks of 8192 keys and GPU ones),
    where padding every block to the fullest one would cost ~2.5×. Index math only, no attention is run."""
    layout = _pruned_layout(grid, 0.4, clustered)
    for chunk_keys, key_align in ((1 << 13, 1), (1 << 18, 8)):  # CPU chunks; GPU chunks (keys aligned to 8)
        padded, real = gather_padding(layout, 8, 1, chunk_keys, key_align)
        assert padded / real < 1.15, (grid, clustered, chunk_keys, padded / real)
    aligned = build_gather_chunks(layout.positions, grid, 9, 8, 1, 1 << 18, key_align=8)
    assert all(c.kv_rows.numel() // c.q_rows.shape[0] % 8 == 0 for c in aligned)


def test_sparse_encoder_equals_masked_encoder_non_square():
    """Whole model, grid not divisible by the window: every block equals the explicit-mask reference."""
    x = torch.randn(1, 3, 14 * 10, 14 * 7)
    enc = tiny_encoder(attention="sparse", window=3)
    with torch.no_grad():
        got = enc(x)
        layout = TokenLayout.full_grid(1, (10, 7), 9, "cpu")
        mask = sparse_reference_mask(layout, 3, 1)
        ref = enc.vit.forward_features(x, attn_mask=mask[:, None])
    torch.testing.assert_close(got.patch_tokens, ref[:, 9:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.cls, ref[:, 0], atol=1e-4, rtol=1e-4)


def _token_after_one_block(image, window):
    enc = tiny_encoder(attention="sparse", window=window, depth=1)
    with torch.no_grad():
        return enc(image).patch_tokens


def test_locality_one_block():
    """In a 1-block model a patch outside a token's 3×3 block neighbourhood does not change it; one inside does."""
    w, grid = 2, (12, 12)
    x = torch.randn(1, 3, 14 * grid[0], 14 * grid[1])
    base = _token_after_one_block(x, w)
    token = 0  # patch (0, 0): block (0, 0); its neighbourhood covers blocks rows/cols 0..1 → patches 0..3
    far, near = x.clone(), x.clone()
    far[..., 14 * 8 : 14 * 9, 14 * 8 : 14 * 9] += 5.0  # patch (8, 8), block (4, 4): outside
    near[..., 14 * 3 : 14 * 4, 14 * 3 : 14 * 4] += 5.0  # patch (3, 3), block (1, 1): inside
    out_far, out_near = _token_after_one_block(far, w), _token_after_one_block(near, w)
    # The far patch still reaches token 0 through the prefix tokens? Not within one block: prefix tokens
    # are computed in the same block from the block's inputs, so token 0 sees only its inputs' keys.
    torch.testing.assert_close(out_far[0, token], base[0, token], atol=1e-6, rtol=0)
    assert (out_near[0, token] - base[0, token]).abs().max() > 1e-3
    # the far patch itself did change
    assert (out_far[0, 8 * 12 + 8] - base[0, 8 * 12 + 8]).abs().max() > 1e-3


@pytest.mark.parametrize("grid,window,pruned", [((7, 5), 2, False), ((9, 13), 3, True), ((6, 6), 4, False)])
def test_flex_block_mask_path_equals_masked_reference(grid, window, pruned):
    """The CUDA flex_attention path, run uncompiled on CPU on small grids to check its BlockMask."""
    from hirespath.models.attention import sparse_attention_flex

    enc = tiny_encoder()
    attn = enc.vit.blocks[0].attn
    B, P = 2, 9
    layout = TokenLayout.full_grid(B, grid, P, "cpu")
    if pruned:
        n = grid[0] * grid[1]
        layout = layout.select(torch.stack([torch.randperm(n)[: n // 2].sort().values for _ in range(B)]))
    x = torch.randn(B, P + layout.positions.shape[1], enc.embed_dim)
    with torch.no_grad():
        got = sparse_attention_flex(attn, x, layout, window, 1)
        ref = masked_reference(attn, x, sparse_reference_mask(layout, window, 1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _listed_block_pairs(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) query-block × KV-block bool matrices of a BlockMask, read from its index tables."""
    n_q, n_kv = block_mask.kv_indices.shape[-2], block_mask.kv_indices.shape[-1]
    out = []
    for num, idx in (
        (block_mask.kv_num_blocks, block_mask.kv_indices),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        dense = torch.zeros(n_q, n_kv, dtype=torch.bool)
        for q in range(n_q):
            dense[q, idx[0, 0, q, : num[0, 0, q]].long()] = True
        out.append(dense)
    return out[0], out[1]


@pytest.mark.parametrize("pruned", [False, True])
def test_flex_block_mask_lists_exactly_the_pattern(pruned):
    """The block structure compiled flex runs (uncompiled flex reads only mask_mod): every query × key pair the
    pattern allows lies in a listed block pair; a pair listed as full (no mask_mod) allows every real query with
    every key slot of it; after pruning half-window blocks are chosen and list no empty block."""
    from hirespath.models.attention import _flex_plan, flex_block_mask, flex_padding

    grid, window, P, B = (40, 35), 8, 9, 2  # 5 × 5 windows of 64 slots, the last column clipped
    # 0.45 kept: some window holds more than 32 survivors, so the slots stay 64 per window
    layout = _pruned_layout(grid, 0.45, False, P, B) if pruned else TokenLayout.full_grid(B, grid, P, "cpu")
    plan, kv_valid, block = _flex_plan(layout, window, 1)
    assert (plan.capacity, block) == ((64, 32) if pruned else (64, 64))
    partial, full = _listed_block_pairs(flex_block_mask(plan, kv_valid, block))
    assert not (partial & full).any()
    listed = partial | full
    C, nb = plan.capacity, plan.num_blocks
    allowed = sparse_reference_mask(layout, window, 1)  # B × L × L over (prefix, patches)
    N = layout.positions.shape[1]
    for b in range(B):
        q_slot = plan.slot[b]  # patch tokens' rows in the query and key buffers
        k_slot = torch.cat([(nb + 1) * C + torch.arange(P), plan.slot[b]])  # prefix keys, then patch keys
        qi, kj = torch.nonzero(allowed[b, P:], as_tuple=True)  # patch queries × all keys allowed
        assert listed[q_slot[qi] // block, k_slot[kj] // block].all()
        # full pairs: every real query of the query block may see every slot of the key block (all filled)
        slot_token = torch.full(((nb + 2) * C,), -1, dtype=torch.long)
        slot_token[k_slot] = torch.arange(P + N)
        for qb_, kb_ in torch.nonzero(full):
            queries = torch.nonzero(q_slot // block == qb_).flatten()
            keys = slot_token[kb_ * block : (kb_ + 1) * block]
            assert (keys >= 0).all()
            assert allowed[b, P + queries][:, keys].all()
    # every listed KV block holds a key in some image (empty halves of windows are not listed)
    nonempty = kv_valid.view(B, -1, block).any(-1).any(0)
    assert nonempty[torch.nonzero(listed)[:, 1]].all()
    padded, real = flex_padding(layout, window, 1)
    assert padded == B * int(listed.sum()) * block * block + B * P * kv_valid.shape[1]
    assert real == int(allowed.sum())


def test_flex_half_window_blocks_equal_masked_reference():
    """After pruning, flex on half-window blocks (uncompiled on CPU: mask_mod at that granularity) equals the
    reference; a padded work under a third of whole-window blocks'."""
    from hirespath.models.attention import _flex_block_work, _flex_plan, sparse_attention_flex

    enc = tiny_encoder()
    attn = enc.vit.blocks[0].attn
    layout = _pruned_layout((24, 32), 0.4, False, P=9, B=2)
    plan, kv_valid, block = _flex_plan(layout, 8, 1)
    assert (plan.capacity, block) == (64, 32)
    assert _flex_block_work(plan, kv_valid, 32) < _flex_block_work(plan, kv_valid, 64) / 3
    x = torch.randn(2, 9 + layout.positions.shape[1], enc.embed_dim)
    with torch.no_grad():
        got = sparse_attention_flex(attn, x, layout, 8, 1)
        ref = masked_reference(attn, x, sparse_reference_mask(layout, 8, 1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_flex_on_half_window_blocks_equals_gather(monkeypatch):
    """Compiled flex (inductor on CPU, which runs the block structure as CUDA does) equals the gather kernel on a
    pruned layout with half-window blocks. Slow: the compilation takes tens of seconds."""
    from torch.nn.attention.flex_attention import flex_attention

    from hirespath.models import attention

    monkeypatch.setitem(attention._FLEX, "cpu", torch.compile(flex_attention, dynamic=False))
    enc = tiny_encoder()
    attn = enc.vit.blocks[0].attn
    layout = _pruned_layout((24, 32), 0.4, False, P=9, B=2)
    x = torch.randn(2, 9 + layout.positions.shape[1], enc.embed_dim)
    with torch.no_grad():
        got = attention.sparse_attention_flex(attn, x, layout, 8, 1)
        ref = sparse_attention(attn, x, layout, 8, 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_flex_mask_has_backward_tables_only_under_autograd(monkeypatch):
    """The BlockMask's transposed tables (as large as the forward's, 2 × 15 MB at 3,430 px in half-window blocks)
    are built only where a backward pass will read them (CPU flex has no backward: masked SDPA stands in)."""
    from hirespath.models import attention
    from hirespath.models.attention import sparse_attention_flex

    monkeypatch.setitem(attention._FLEX, "cpu", _differentiable_flex)
    enc = tiny_encoder()
    attn = enc.vit.blocks[0].attn
    layout = _pruned_layout((24, 32), 0.4, False, P=9, B=2)
    x = torch.randn(2, 9 + layout.positions.shape[1], enc.embed_dim)
    with torch.no_grad():
        sparse_attention_flex(attn, x, layout, 8, 1)
    sparse_attention_flex(attn, x.requires_grad_(True), layout, 8, 1).sum().backward()
    built = {key[-1]: mask for key, mask in layout._plans.items() if key[0] == "flex_mask"}
    assert built[False].q_indices is None and built[False].full_q_indices is None
    assert built[True].q_indices is not None

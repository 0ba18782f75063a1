"""Attention-guided token pruning."""

import math

import pytest
import torch
from conftest import tiny_encoder


@pytest.mark.parametrize("attention", ["dense", "eager", "sparse"])
def test_pruning_counts_positions_and_prefix(attention):
    enc = tiny_encoder(attention=attention, window=3, prune_ratio=0.6, prune_layer=2)
    grid = (8, 11)
    x = torch.randn(3, 3, 14 * grid[0], 14 * grid[1])
    with torch.no_grad():
        out = enc(x)
    n = grid[0] * grid[1]
    kept = math.ceil(0.4 * n)
    assert out.patch_tokens.shape == (3, kept, enc.embed_dim)
    assert out.positions.shape == (3, kept, 2) and out.positions.dtype == torch.long
    assert out.prefix_tokens.shape == (3, 9, enc.embed_dim)
    assert out.grid == grid
    for pos in out.positions:
        assert (pos[:, 0] >= 0).all() and (pos[:, 0] < grid[0]).all()
        assert (pos[:, 1] >= 0).all() and (pos[:, 1] < grid[1]).all()
        flat = pos[:, 0] * grid[1] + pos[:, 1]
        assert len(flat.unique()) == kept
        assert (flat.diff() > 0).all()  # survivors keep raster order
    # images differ, so their kept sets should too
    assert not torch.equal(out.positions[0], out.positions[1])


def test_pruned_tokens_are_the_least_attended():
    enc = tiny_encoder(attention="sparse", window=4, prune_ratio=0.5, prune_layer=1)
    x = torch.randn(1, 3, 14 * 6, 14 * 6)
    with torch.no_grad():
        state = enc.embed(x)
        blk = enc.vit.blocks[0]
        h = blk.norm1(state.x)
        scores = enc.prune_scores(blk.attn, h, state.layout)[0]
        out = enc(x)
    flat = out.positions[0, :, 0] * 6 + out.positions[0, :, 1]
    kept = torch.zeros(36, dtype=torch.bool)
    kept[flat] = True
    assert scores[kept].min() >= scores[~kept].max()


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_image_in_batch_equals_image_alone(attention):
    enc = tiny_encoder(attention=attention, window=3, prune_ratio=0.6, prune_layer=2)
    x = torch.randn(3, 3, 14 * 7, 14 * 9)
    with torch.no_grad():
        batch = enc(x)
        alone = enc(x[1:2])
    torch.testing.assert_close(batch.positions[1:2], alone.positions)
    torch.testing.assert_close(batch.patch_tokens[1:2], alone.patch_tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.cls[1:2], alone.cls, atol=1e-4, rtol=1e-4)


def test_ratio_zero_equals_no_pruning():
    x = torch.randn(2, 3, 14 * 6, 14 * 6)
    with torch.no_grad():
        a = tiny_encoder(attention="sparse", window=2, prune_ratio=0.0)(x)
        b = tiny_encoder(attention="sparse", window=2, prune_ratio=0.0, prune_layer=99)(x)  # layer unchecked at p=0
    assert a.patch_tokens.shape[1] == 36
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens)


def test_score_tokens_all_uses_registers():
    from hirespath.models.pruning import GlobalAttentionPruner

    probs = torch.rand(2, 4, 9, 9 + 20).softmax(-1)  # B×H×P×L
    cls = GlobalAttentionPruner(0.5, 2, "cls").scores(probs, 9)
    allp = GlobalAttentionPruner(0.5, 2, "all").scores(probs, 9)
    torch.testing.assert_close(cls, probs[:, :, 0, 9:].mean(1))
    torch.testing.assert_close(allp, probs[:, :, :, 9:].mean((1, 2)))
    # end to end: registers that differ from CLS change which tokens survive
    x = torch.randn(1, 3, 14 * 6, 14 * 6)
    encs = [tiny_encoder(prune_ratio=0.5, prune_layer=2, prune_score_tokens=s) for s in ("cls", "all")]
    for enc in encs:
        torch.manual_seed(1)
        enc.vit.reg_token.data = torch.randn_like(enc.vit.reg_token)
    with torch.no_grad():
        a, b = (enc(x) for enc in encs)
    assert not torch.equal(a.positions, b.positions)


def test_sparse_after_pruning_matches_masked_reference_end_to_end():
    """The blocks after pruning use neighbourhoods among the survivors, by original (row, col)."""
    from hirespath.models.attention import sparse_reference_mask

    enc = tiny_encoder(attention="sparse", window=2, prune_ratio=0.5, prune_layer=3)
    x = torch.randn(2, 3, 14 * 6, 14 * 7)
    with torch.no_grad():
        out = enc(x)
        # reference: run the first 3 blocks, prune, then the rest with an explicit mask on the survivors
        state = enc.run_blocks(enc.embed(x), 0, 3)
        for blk in enc.vit.blocks[3:]:
            mask = sparse_reference_mask(state.layout, 2, 1)[:, None]
            state.x = blk(state.x, attn_mask=mask)
        ref = enc.vit.norm(state.x)
    torch.testing.assert_close(out.patch_tokens, ref[:, 9:], atol=1e-4, rtol=1e-4)


def test_kept_count_is_exact_ceiling():
    from fractions import Fraction

    from hirespath.models.pruning import GlobalAttentionPruner

    for ratio in (0.1, 0.25, 0.4, 0.41, 0.6, 0.7, 0.8, 0.9):
        for n in (10, 100, 400, 576, 9216, 60025):
            expected = math.ceil((1 - Fraction(str(ratio))) * n)
            assert GlobalAttentionPruner(ratio).num_kept(n) == expected, (ratio, n)
    assert GlobalAttentionPruner(0.7).num_kept(10) == 3  # float arithmetic gives ⌈3.0000000000000004⌉ = 4


def test_bf16_pruning_scores_are_computed_in_fp32():
    """Under bf16 autocast the survivors are those of fp32 scores on the block's own bf16 q/k (bf16 probabilities
    tie at the cut and change the survivors)."""
    from hirespath.models.attention import split_heads

    enc = tiny_encoder(attention="sparse", window=4, prune_ratio=0.6, prune_layer=2)
    x = torch.randn(2, 3, 14 * 24, 14 * 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state = enc.run_blocks(enc.embed(x), 0, 1)
        blk = enc.vit.blocks[1]
        h = blk.norm1(state.x)
        q, k, _ = split_heads(blk.attn, h)
        scores = enc.prune_scores(blk.attn, h, state.layout)
        out = enc(x)
    P = state.layout.num_prefix
    with torch.no_grad():
        ref = torch.einsum("bphd,blhd->bhpl", q[:, :P].float() * blk.attn.scale, k.float()).softmax(-1)
    ref_scores = ref[:, :, :1, P:].mean(dim=(1, 2))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores)
    keep = enc.pruner.select(ref_scores)
    flat = out.positions[..., 0] * 24 + out.positions[..., 1]
    assert torch.equal(flat, keep)


def test_pruning_scores_cast_the_keys_in_chunks_with_the_same_values(monkeypatch):
    """The keys go to fp32 a chunk at a time (memory): the probabilities, hence the survivors, are unchanged."""
    from hirespath.models import attention

    enc = tiny_encoder(attention="sparse", window=4, prune_ratio=0.6, prune_layer=2)
    x = torch.randn(2, 3, 14 * 20, 14 * 18)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = enc(x, token_scores=True)
        monkeypatch.setattr(attention.prefix_attention_probs, "__defaults__", (50, None))  # 360 keys: 8 chunks
        chunked = enc(x, token_scores=True)
    assert torch.equal(chunked.token_scores, whole.token_scores)
    assert torch.equal(chunked.positions, whole.positions)


def test_unsupported_vits_are_refused():
    import hirespath

    for kwargs, match in (
        (dict(global_pool="avg"), "fc_norm"),
        (dict(patch_drop_rate=0.2), "patch_drop_rate"),
        (dict(class_token=False, global_pool=""), "no class token"),
    ):
        with pytest.raises(ValueError, match=match):
            hirespath.create_encoder("uni", depth=2, embed_dim=64, num_heads=4, **kwargs)


def test_flex_in_training_falls_back_to_gather():
    """flex has no attention dropout on sparse rows and no CPU backward: training uses the gather kernel."""
    enc = tiny_encoder(attention="sparse", window=2, sparse_backend="flex", attn_drop_rate=0.5)
    ref = tiny_encoder(attention="sparse", window=2, sparse_backend="gather", attn_drop_rate=0.5)
    x = torch.randn(1, 3, 14 * 6, 14 * 6)
    enc.train()
    ref.train()
    torch.manual_seed(1)
    a = enc(x).patch_tokens
    torch.manual_seed(1)
    b = ref(x).patch_tokens
    torch.testing.assert_close(a, b)
    a.sum().backward()  # would raise "FlexAttention does not support backward on CPU"

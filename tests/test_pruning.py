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

"""The token layout's plan cache."""

import torch
from conftest import tiny_encoder

from hirespath.models import attention as A
from hirespath.models.attention import TokenLayout, sparse_attention, split_heads


def test_layout_plan_is_built_once_per_key():
    layout = TokenLayout.full_grid(2, (6, 5), 1, "cpu")
    builds = []

    def build(value):
        builds.append(value)
        return [value]

    first = layout.plan(("a", 1), lambda: build(1))
    assert layout.plan(("a", 1), lambda: build(2)) is first and builds == [1]
    assert layout.plan(("a", 2), lambda: build(3)) == [3] and builds == [1, 3]
    # a pruned layout has other positions: its plans are its own
    pruned = layout.select(torch.tensor([[0, 2, 4], [1, 3, 5]]))
    assert pruned.plan(("a", 1), lambda: build(4)) == [4] and builds == [1, 3, 4]
    assert layout.sparse_plan(2, 1) is layout.sparse_plan(2, 1)


def test_gather_kernel_reuses_the_layout_plan_across_blocks(monkeypatch):
    enc = tiny_encoder(attention="sparse", window=2)
    attn = enc.vit.blocks[0].attn
    layout = TokenLayout.full_grid(2, (6, 5), enc.num_prefix_tokens, "cpu")
    x = torch.randn(2, enc.num_prefix_tokens + 30, enc.embed_dim)
    built = []
    real = A.build_gather_chunks
    monkeypatch.setattr(A, "build_gather_chunks", lambda *a, **k: built.append(a) or real(*a, **k))
    with torch.no_grad():
        first = sparse_attention(attn, x, layout, 2, 1, chunk_keys=64)
        again = sparse_attention(attn, x, layout, 2, 1, chunk_keys=64, qkv=split_heads(attn, x))
        sparse_attention(attn, x, layout, 2, 1, chunk_keys=128)  # another chunking: another plan
    assert len(built) == 2
    assert torch.equal(first, again)

"""The attention-kernel registry and its selection policy, and the token layout's plan cache."""

import pytest
import torch
from conftest import tiny_encoder

from hirespath.models import attention as A
from hirespath.models.attention import (
    ATTENTION_KERNELS,
    FLEX_MAX_BLOCKS,
    TokenLayout,
    select_kernel,
    sparse_attention,
    split_heads,
)

GRID = (16, 16)  # 4×4 blocks of window 4


@pytest.mark.parametrize(
    "mode, backend, device, grid, window, training, dropout, expected",
    [
        ("dense", "auto", "cuda", GRID, 4, False, False, "dense"),
        ("eager", "flex", "cpu", GRID, 4, True, False, "eager"),
        # auto: flex for CUDA inference up to FLEX_MAX_BLOCKS blocks, gather elsewhere
        ("sparse", "auto", "cpu", GRID, 4, False, False, "sparse[gather]"),
        ("sparse", "auto", "cuda", GRID, 4, False, False, "sparse[flex]"),
        ("sparse", "auto", torch.device("cuda", 0), GRID, 4, False, False, "sparse[flex]"),
        ("sparse", "auto", "cuda", (FLEX_MAX_BLOCKS // 64, 64), 1, False, False, "sparse[flex]"),  # at the limit
        ("sparse", "auto", "cuda", (FLEX_MAX_BLOCKS // 64, 65), 1, False, False, "sparse[gather]"),  # above it
        ("sparse", "auto", "cuda", (FLEX_MAX_BLOCKS // 64 * 3, 64 * 3), 3, False, False, "sparse[flex]"),
        ("sparse", "auto", "cuda", GRID, 4, True, False, "sparse[gather]"),  # training
        ("sparse", "auto", "cuda", GRID, 4, False, True, "sparse[gather]"),  # attention dropout
        # explicit backends are honoured where they can run
        ("sparse", "gather", "cuda", GRID, 4, False, False, "sparse[gather]"),
        ("sparse", "flex", "cpu", GRID, 4, False, False, "sparse[flex]"),
        ("sparse", "flex", "cuda", (FLEX_MAX_BLOCKS // 64, 65), 1, False, False, "sparse[flex]"),
        ("sparse", "flex", "cuda", GRID, 4, True, False, "sparse[flex]"),  # CUDA has flex's backward
        ("sparse", "flex", "cpu", GRID, 4, True, False, "sparse[gather]"),  # no CPU backward
        ("sparse", "flex", "cuda", GRID, 4, True, True, "sparse[gather]"),  # flex has no attention dropout
        # varlen: CUDA inference only (flash attention; no dropout), gather elsewhere; not chosen by auto
        ("sparse", "varlen", "cuda", GRID, 4, False, False, "sparse[varlen]"),
        ("sparse", "varlen", "cuda", (FLEX_MAX_BLOCKS // 64, 65), 1, False, False, "sparse[varlen]"),
        ("sparse", "varlen", "cpu", GRID, 4, False, False, "sparse[gather]"),
        ("sparse", "varlen", "cuda", GRID, 4, True, False, "sparse[gather]"),
        ("sparse", "varlen", "cuda", GRID, 4, False, True, "sparse[gather]"),
        ("sparse", "varlen", "cuda", GRID, 16, False, False, "dense"),
        # one window covering the whole grid is dense attention, whatever the backend
        ("sparse", "auto", "cuda", GRID, 16, False, False, "dense"),
        ("sparse", "gather", "cpu", (7, 5), 7, True, False, "dense"),
        # so are 2 × 2 windows at radius 1 (each sees all four): a 560 px model's window 64 on a 1,792 px tile
        ("sparse", "auto", "cuda", (128, 128), 64, False, False, "dense"),
        ("sparse", "flex", "cpu", (16, 9), 8, False, False, "dense"),
        ("sparse", "auto", "cuda", (129, 128), 64, False, False, "sparse[flex]"),  # 3 windows down: sparse
        ("sparse", "auto", "cpu", (17, 16), 8, False, False, "sparse[gather]"),
    ],
)
def test_select_kernel_policy(monkeypatch, mode, backend, device, grid, window, training, dropout, expected):
    monkeypatch.setitem(A._VARLEN, "cuda", lambda *a: None)  # as with PyTorch >= 2.10 (a CUDA build or not)
    name, kernel = select_kernel(mode, backend, device, grid, window, training, dropout=dropout)
    assert name == expected
    assert kernel is ATTENTION_KERNELS[name]


@pytest.mark.parametrize(
    "radius, blocks, expected",
    [(0, 1, "dense"), (0, 2, "sparse[gather]"), (1, 2, "dense"), (1, 3, "sparse[gather]"), (2, 3, "dense"),
     (2, 4, "sparse[gather]")],
)  # fmt: skip
def test_select_kernel_dense_where_every_neighbourhood_is_the_grid(radius, blocks, expected):
    """Blocks within ``radius`` of each other all see one another when there are at most radius + 1 per side."""
    assert select_kernel("sparse", "auto", "cpu", (4 * blocks, 4 * blocks - 1), 4, radius=radius)[0] == expected


def test_sparse_with_every_neighbourhood_the_grid_equals_the_sparse_kernels(monkeypatch):
    """2 × 2 windows at radius 1: the encoder runs dense attention, with the outputs of the sparse kernel it replaces
    (which computes every pair of tokens there), pruned or not."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 14 * 8, 14 * 8)  # an 8 × 8 patch grid: 2 × 2 windows of 4
    ran = []

    def recording(*args, **kwargs):
        ran.append(select_kernel(*args, **kwargs)[0])
        return select_kernel(*args, **kwargs)

    for prune in (0.0, 0.5):
        enc = tiny_encoder(attention="sparse", window=4, prune_ratio=prune, prune_layer=2).eval()
        ran.clear()
        with torch.inference_mode():
            monkeypatch.setattr("hirespath.models.encoder.select_kernel", recording)
            dense_out = enc(x)
            monkeypatch.setattr("hirespath.models.encoder.select_kernel",
                                lambda *a, **k: ("sparse[gather]", ATTENTION_KERNELS["sparse[gather]"]))  # fmt: skip
            gather_out = enc(x)
        assert set(ran) == {"dense"}
        torch.testing.assert_close(dense_out.patch_tokens, gather_out.patch_tokens, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dense_out.cls, gather_out.cls, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "dtype, head_dim, expected",
    [(None, None, "sparse[varlen]"), (torch.bfloat16, 64, "sparse[varlen]"), (torch.float16, 256, "sparse[varlen]"),
     (torch.float32, 64, "sparse[gather]"), (torch.bfloat16, 264, "sparse[gather]"), (None, 60, "sparse[gather]")],
)  # fmt: skip
def test_varlen_policy_knows_what_flash_takes(monkeypatch, dtype, head_dim, expected):
    """Given the queries' dtype and head dim the policy names the kernel that runs (fp32 or an odd head dim: the
    varlen kernel would run gather), so the benchmark's columns and cost say what ran."""
    monkeypatch.setitem(A._VARLEN, "cuda", lambda *a: None)
    assert select_kernel("sparse", "varlen", "cuda", GRID, 4, dtype=dtype, head_dim=head_dim)[0] == expected


def test_varlen_needs_a_pytorch_with_varlen_attn(monkeypatch):
    monkeypatch.setitem(A._VARLEN, "cuda", None)  # PyTorch < 2.10
    assert select_kernel("sparse", "varlen", "cuda", GRID, 4)[0] == "sparse[gather]"


def test_registry_names():
    assert set(ATTENTION_KERNELS) == {"dense", "eager", "sparse[gather]", "sparse[flex]", "sparse[varlen]"}


@pytest.mark.parametrize(
    "mode, backend, words",
    [
        ("flash", "auto", ["attention must be one of", "'dense', 'eager', 'sparse'", "'flash'"]),
        ("sparse", "natten", ["sparse_backend must be one of", "'auto', 'gather', 'flex', 'varlen'", "'natten'"]),
        ("dense", "natten", ["sparse_backend must be one of"]),  # checked even where it would not be used
    ],
)
def test_select_kernel_bad_names(mode, backend, words):
    with pytest.raises(ValueError) as err:
        select_kernel(mode, backend, "cpu", GRID, 4)
    for w in words:
        assert w in str(err.value)


def test_bad_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="sparse_backend must be one of"):
        tiny_encoder(sparse_backend="natten")


@pytest.mark.parametrize(
    "kwargs, size, grad, expected",
    [
        (dict(attention="sparse", window=2), 14 * 6, False, "sparse[gather]"),
        (dict(attention="sparse", window=2), 14 * 6, True, "sparse[gather]"),
        (dict(attention="sparse", window=2, sparse_backend="flex"), 14 * 6, False, "sparse[flex]"),
        (dict(attention="sparse", window=2, sparse_backend="flex"), 14 * 6, True, "sparse[gather]"),
        (dict(attention="sparse", window=8), 14 * 6, False, "dense"),
        (dict(attention="eager"), 14 * 6, False, "eager"),
    ],
)
def test_encoder_runs_the_selected_kernel(monkeypatch, kwargs, size, grad, expected):
    enc = tiny_encoder(depth=3, **kwargs)
    calls = []
    for name, kernel in list(ATTENTION_KERNELS.items()):

        def spy(*args, _name=name, _kernel=kernel, **kw):
            calls.append(_name)
            return _kernel(*args, **kw)

        monkeypatch.setitem(ATTENTION_KERNELS, name, spy)
    with torch.set_grad_enabled(grad):
        enc(torch.randn(1, 3, size, size))
    assert calls == [expected] * 3


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

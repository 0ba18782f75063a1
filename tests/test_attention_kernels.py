"""Every sparse kernel path reachable on CPU equals the reference (fp32, 1e-4) on ragged pruned layouts with prefix
tokens: gather (plain loop and as CPU tasks, one chunk and many) and flex (uncompiled on CPU)."""

import pytest
import torch
from conftest import tiny_encoder

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


PATHS = {
    "gather": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[gather]"](*a, **kw),
    "gather-chunks": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[gather]"](*a, **kw, chunk_keys=k),
    "flex": lambda k, *a, **kw: ATTENTION_KERNELS["sparse[flex]"](*a, **kw),
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

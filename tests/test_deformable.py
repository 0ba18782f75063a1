"""models/deformable.py: the chunked deformable sampling equals transformers' own, and is what its modules call."""

import pytest
import torch
from transformers.models.mask2former import modeling_mask2former

from hirespath.models import deformable

SHAPES = [(13, 11), (7, 6), (4, 3)]


@pytest.mark.parametrize("path", ["gathered", "grid_sampled"])  # CPU; CUDA (run here on the CPU)
@pytest.mark.parametrize("small", [False, True])  # one chunk; many chunks of a few queries (uneven last)
def test_chunked_sampling_equals_the_stacked_one(monkeypatch, path, small):
    import hirespath.models.vit_adapter  # noqa: F401  (installs ours, keeping transformers' as deformable.shipped)

    monkeypatch.setitem(deformable.CHUNK_BYTES, "cpu", 3000 if small else 1 << 30)
    monkeypatch.setattr(deformable, "GATHER_ROWS", 40 if small else 1 << 30)
    sample = getattr(deformable, f"_{path}")
    B, H, d, Q, P = 2, 4, 8, 57, 4
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, H, d)
    # locations reach past the map on every side: zeros padding must match too
    locations = torch.rand(B, Q, H, len(SHAPES), P, 2) * 1.4 - 0.2
    weights = torch.softmax(torch.randn(B, Q, H, len(SHAPES) * P), -1).view(B, Q, H, len(SHAPES), P)
    ours = sample(value, SHAPES, locations, weights)
    ref = deformable.shipped(value, SHAPES, locations, weights)  # transformers' own, as installed over
    assert ours.shape == (B, Q, H * d)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_transformers_modules_call_the_chunked_sampling(monkeypatch):
    import hirespath.models.vit_adapter  # noqa: F401  (installs it)

    monkeypatch.setattr(deformable, "_gathered", lambda *args: "gathered")
    assert deformable.multi_scale_deformable_attention(torch.zeros(1, 1, 1, 1), [(1, 1)], None, None) == "gathered"

    assert modeling_mask2former.multi_scale_deformable_attention is deformable.multi_scale_deformable_attention
    assert deformable.shipped is not None and deformable.shipped.__module__ == modeling_mask2former.__name__


def test_gathered_sampling_has_grid_samples_gradients():
    """Training on CPU backpropagates through the gathered path: to the values, the attention weights and the
    sampling locations (through the bilinear weights), as through grid_sample."""
    torch.manual_seed(0)
    B, H, d, Q, P = 1, 2, 4, 23, 4
    S = sum(h * w for h, w in SHAPES)
    inputs = [torch.randn(B, S, H, d), torch.rand(B, Q, H, len(SHAPES), P, 2) * 1.4 - 0.2,
              torch.rand(B, Q, H, len(SHAPES), P)]  # fmt: skip
    grads = []
    for sample in (deformable._gathered, deformable._grid_sampled):
        leaves = [t.clone().requires_grad_() for t in inputs]
        value, locations, weights = leaves
        (sample(value, SHAPES, locations, weights) * torch.linspace(-1, 1, H * d)).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

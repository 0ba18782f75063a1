"""models/deformable.py: the chunked deformable sampling equals transformers' own, and is what its modules call."""

import pytest
import torch
from transformers.models.mask2former import modeling_mask2former

from hirespath.models import deformable

SHAPES = [(13, 11), (7, 6), (4, 3)]


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3000])  # one chunk; many chunks of a few queries (uneven last)
def test_chunked_sampling_equals_the_stacked_one(monkeypatch, chunk_bytes):
    import hirespath.models.vit_adapter  # noqa: F401  (installs ours, keeping transformers' as deformable.shipped)

    monkeypatch.setitem(deformable.CHUNK_BYTES, "cpu", chunk_bytes)
    B, H, d, Q, P = 2, 4, 8, 57, 4
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, H, d)
    # locations reach past the map on every side: zeros padding must match too
    locations = torch.rand(B, Q, H, len(SHAPES), P, 2) * 1.4 - 0.2
    weights = torch.softmax(torch.randn(B, Q, H, len(SHAPES) * P), -1).view(B, Q, H, len(SHAPES), P)
    ours = deformable.multi_scale_deformable_attention(value, SHAPES, locations, weights)
    ref = deformable.shipped(value, SHAPES, locations, weights)  # transformers' own, as installed over
    assert ours.shape == (B, Q, H * d)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_transformers_modules_call_the_chunked_sampling():
    import hirespath.models.vit_adapter  # noqa: F401  (installs it)

    assert modeling_mask2former.multi_scale_deformable_attention is deformable.multi_scale_deformable_attention
    assert deformable.shipped is not None and deformable.shipped.__module__ == modeling_mask2former.__name__

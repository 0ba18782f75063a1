"""Seconds of Mask2Former's semantic inference after the model (``SegmentationModel.semantic_probs``) for one
1,792 px tile: 100 query masks at 448 px upsampled to the tile, sigmoid, summed into 8 classes — the formula as it
was (an einsum per chunk of 16 queries) against the one in the code, best of 3, same inputs, and their largest
difference.

    python docs/benchmarks/cpu_semantic_probs.py
"""

import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from hirespath.heads.mask2former import SegmentationModel

torch.manual_seed(0)
out = SimpleNamespace(class_queries_logits=torch.randn(1, 100, 9), masks_queries_logits=torch.randn(1, 100, 448, 448))
size = (1792, 1792)


def einsum_per_chunk(chunk: int = 16) -> torch.Tensor:
    cls = out.class_queries_logits.softmax(-1)[..., :-1]
    total = cls.new_zeros(1, cls.shape[-1], *size)
    for q in range(0, cls.shape[1], chunk):
        masks = F.interpolate(out.masks_queries_logits[:, q : q + chunk], size=size, mode="bilinear",
                              align_corners=False)  # fmt: skip
        total += torch.einsum("bqc,bqhw->bchw", cls[:, q : q + chunk], masks.sigmoid())
    return total


def best(fn) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


t_old, old = best(einsum_per_chunk)
t_new, new = best(lambda: SegmentationModel.semantic_probs(out, size))
print(f"einsum per chunk {t_old:.2f} s; semantic_probs {t_new:.2f} s; max |difference| {(new - old).abs().max():.1e}")

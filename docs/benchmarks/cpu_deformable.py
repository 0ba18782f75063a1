"""One 1,792 px forward of the segment_speed model (UNI2-h narrowed to depth 12 / dim 384 / 6 heads, sparse w=8,
ViT-Adapter, Mask2Former with 100 queries, 6 pixel-decoder and 10 decoder layers) with the deformable sampling on
CPU as chunked ``grid_sample`` (the path CUDA runs) and as gathered rows (``embedding_bag``, the CPU path of
``models/deformable.py``), alternating, twice each; and the largest difference of the output masks.

    python docs/benchmarks/cpu_deformable.py
"""

import time

import torch

import hirespath
from hirespath.heads.mask2former import SegmentationModel
from hirespath.models import deformable

torch.manual_seed(0)
enc = hirespath.create_encoder("uni2_h", attention="sparse", window=8, depth=12, embed_dim=384, num_heads=6)
model = SegmentationModel(
    enc, num_classes=8, num_queries=100, hidden_dim=256, decoder_layers=10, pixel_decoder_layers=6
).eval()
gathered = deformable._gathered
x = torch.rand(1, 3, 1792, 1792)
outs = {}
with torch.inference_mode():
    model(x)
    for _ in range(2):
        for name, fn in (("grid_sample chunks", deformable._grid_sampled), ("gathered", gathered)):
            deformable._gathered = fn
            t = time.perf_counter()
            outs[name] = model(x)
            print(f"{name}: {time.perf_counter() - t:.2f} s", flush=True)
a, b = outs.values()
print("max |difference| masks", f"{(a.masks_queries_logits - b.masks_queries_logits).abs().max():.1e}")

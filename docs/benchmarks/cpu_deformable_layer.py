"""One deformable-attention layer's sampling on CPU (``models/deformable.py``, the gathered path), as the pixel
decoder runs it: levels at 1/8, 1/16 and 1/32 of a 1,792 px and of a 518 px tile, 8 heads × 32 channels, 4 points,
one query per cell; best of ``reps`` calls after a warm one. Prints seconds per call and a checksum of the output.

    python docs/benchmarks/cpu_deformable_layer.py 5
"""

import sys
import time

import torch

from hirespath.models import deformable
from hirespath.utils.cpu_memory import keep_freed_memory

keep_freed_memory()
reps = int(sys.argv[1])
for tile, shapes in ((1792, [(224, 224), (112, 112), (56, 56)]), (518, [(65, 65), (33, 33), (17, 17)])):
    torch.manual_seed(0)
    S = sum(h * w for h, w in shapes)
    B, H, d, P = 1, 8, 32, 4
    value = torch.randn(B, S, H, d)
    locations = torch.rand(B, S, H, len(shapes), P, 2) * 1.1 - 0.05  # some points past the edges
    weights = torch.softmax(torch.randn(B, S, H, len(shapes) * P), -1).view(B, S, H, len(shapes), P)
    with torch.inference_mode():
        out = deformable._gathered(value, shapes, locations, weights)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            deformable._gathered(value, shapes, locations, weights)
            times.append(time.perf_counter() - t)
    print(f"{tile} px tile: best {min(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)}); "
          f"checksum {out.double().sum():.6f}")  # fmt: skip

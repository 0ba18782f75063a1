"""Where a segment_speed forward spends its time per megapixel of tile, at (a) 518 px dense and (b) 1,792 px
sparse w=8, and (b) again with the attention made free (its output is the values: q·k and softmax skipped, the
projections kept), which bounds what any attention kernel could give (b).

The model is segment_speed's: UNI2-h narrowed to depth 12 / dim 384 / 6 heads, ViT-Adapter, Mask2Former with 100
queries, 6 pixel-decoder and 10 decoder layers, random weights; one process, the entries alternating, ``reps``
rounds, the best per entry. Seconds per megapixel of the tiles the model sees (overlap included).

    python docs/benchmarks/cpu_segment_components.py 2 docs/benchmarks/cpu_segment_components.csv
"""

import csv
import sys
import time
from collections import defaultdict

import torch

import hirespath
from hirespath.heads.mask2former import SegmentationModel
from hirespath.models import attention
from hirespath.utils.cpu_memory import keep_freed_memory

reps, out_csv = int(sys.argv[1]), sys.argv[2]
keep_freed_memory()  # as every task does: large activations reuse freed memory instead of faulting pages


def free_attention(attn, x, layout, qkv=None, **_):
    return attention.merge_heads(attn, x, (qkv or attention.split_heads(attn, x))[2])


def timed(times: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] += time.perf_counter() - t

    return wrapper


def build(att: str):
    torch.manual_seed(0)
    kw = {"attention": "sparse", "window": 8} if att == "sparse" else {"attention": "dense"}
    enc = hirespath.create_encoder("uni2_h", depth=12, embed_dim=384, num_heads=6, **kw)
    return SegmentationModel(
        enc, num_classes=8, num_queries=100, hidden_dim=256, decoder_layers=10, pixel_decoder_layers=6
    ).eval()


entries = [("518 dense", 518, "dense", False), ("1792 sparse", 1792, "sparse", False)]
entries.append(("1792 sparse, attention free", 1792, "sparse", True))
models = {att: build(att) for att in ("dense", "sparse")}
parts = ("encoder blocks", "adapter interactions", "pixel decoder", "transformer decoder", "class maps")
best: dict[str, dict] = {}
gather = attention.ATTENTION_KERNELS["sparse[gather]"]
for _ in range(reps):
    for name, size, att, free in entries:
        model = models[att]
        times: dict = defaultdict(float)
        a, m2f = model.adapter, model.m2f.model
        saved = (a.encoder.run_blocks, m2f.pixel_level_module.decoder.forward, m2f.transformer_module.forward)
        a.encoder.run_blocks = timed(times, "encoder blocks", saved[0])
        m2f.pixel_level_module.decoder.forward = timed(times, "pixel decoder", saved[1])
        m2f.transformer_module.forward = timed(times, "transformer decoder", saved[2])
        attention.ATTENTION_KERNELS["sparse[gather]"] = free_attention if free else gather
        n = 1 if size > 1000 else 8  # about the same pixels per entry
        x = torch.rand(1, 3, size, size)
        with torch.inference_mode():
            model(x)  # warm: plans, allocator
            times.clear()
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                out = model(x)
                times["forward"] += time.perf_counter() - t
                t = time.perf_counter()
                model.semantic_probs(out, (size, size))
                times["class maps"] += time.perf_counter() - t
            total = time.perf_counter() - t0
        del a.encoder.run_blocks  # back to the class's, as below
        del m2f.pixel_level_module.decoder.forward, m2f.transformer_module.forward  # back to the class's
        attention.ATTENTION_KERNELS["sparse[gather]"] = gather
        mpx = n * size * size / 1e6
        # the adapter's own work: the forward less what is timed inside it and after it
        times["adapter interactions"] = (
            times["forward"] - times["encoder blocks"] - times["pixel decoder"] - times["transformer decoder"]
        )
        row = {"entry": name, "total": total / mpx, **{p: times[p] / mpx for p in parts}}
        print(", ".join(f"{k} {v:.2f}" if isinstance(v, float) else v for k, v in row.items()), flush=True)
        if name not in best or row["total"] < best[name]["total"]:
            best[name] = row
with open(out_csv, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["entry", "total", *parts])
    w.writeheader()
    for row in best.values():
        w.writerow({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items()})
dense, sparse, free = (best[e[0]]["total"] for e in entries)
print(f"model seconds per Mpx, 518 dense / 1792 sparse: {dense / sparse:.3f}; / 1792 with free attention: "
      f"{dense / free:.3f}")  # fmt: skip

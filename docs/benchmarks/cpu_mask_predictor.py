"""Seconds of Mask2Former's transformer decoder (``transformer_module``) for one 1,792 px tile of the segment_speed
model (UNI2-h narrowed to depth 12 / dim 384 / 6 heads, sparse w=8, 100 queries, 10 decoder layers), with
transformers' mask predictor (every call at 1/4 of the image) and with hirespath's (attention masks at their own
size, ``heads/mask2former.py``), alternating, 3 times each, on the same captured inputs; and the largest difference
of their output masks and class logits.

    python docs/benchmarks/cpu_mask_predictor.py
"""

import time

import torch
from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskPredictor

import hirespath
from hirespath.heads.mask2former import SegmentationModel, _InferenceMaskPredictor

torch.manual_seed(0)
encoder = hirespath.create_encoder("uni2_h", attention="sparse", window=8, depth=12, embed_dim=384, num_heads=6)
model = SegmentationModel(encoder, num_classes=8, num_queries=100, hidden_dim=256, decoder_layers=10,
                          pixel_decoder_layers=6).eval()  # fmt: skip
module = model.m2f.model.transformer_module
captured = {}
hook = module.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
with torch.inference_mode():
    model(torch.rand(1, 3, 1792, 1792))
    hook.remove()
    outputs = {}
    for _ in range(3):
        for cls in (Mask2FormerMaskPredictor, _InferenceMaskPredictor):
            module.decoder.mask_predictor.__class__ = cls
            t = time.perf_counter()
            outputs[cls.__name__] = module(*captured["args"], **captured["kwargs"])
            print(f"{cls.__name__}: {time.perf_counter() - t:.2f} s", flush=True)
a, b = outputs.values()
print("max |difference|: masks", f"{(a.masks_queries_logits[-1] - b.masks_queries_logits[-1]).abs().max():.1e}",
      "hidden states", f"{(a.last_hidden_state - b.last_hidden_state).abs().max():.1e}")  # fmt: skip

"""Host seconds segment_slides spends writing a slide — blending the tiles, then the slide's closing (uint8 map,
pyramid, probability TIFF, polygons of every class, GeoJSON) — with the model simulated, so that only the host work
is timed: the tile function returns 8 classes of smooth blob probabilities computed from the tile's pixels (so
overlapping tiles agree, as a trained model's do, and every class has regions to trace). Generated slides of SIDE px
at 0.5 µm/px, 1,792 px tiles, overlap 128, batch 1, write_behind off (everything on the main thread).
``write_s`` is the runner's write stage (blending + closing); ``forward_s`` the simulated model.

    python docs/benchmarks/cpu_slide_closing.py [SIDE] [SLIDES] [LABEL]
"""

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import torch
from simulated_segmentation import generated_slides, simulated_checkpoint

from hirespath.configs import EmbedConfig
from hirespath.segmentation import consumer
from hirespath.slides import Runtime

side = int(sys.argv[1]) if len(sys.argv) > 1 else 7168
n_slides = int(sys.argv[2]) if len(sys.argv) > 2 else 2
label = sys.argv[3] if len(sys.argv) > 3 else ""


def blob_forward(model, class_index):
    def forward(x: torch.Tensor) -> np.ndarray:
        out = np.empty((x.shape[0], len(class_index), *x.shape[-2:]), np.float16)
        for i, img in enumerate(x):
            gray = img.float().mean(0).numpy()  # nuclei are dark: blurred darkness makes blobs around their clusters
            for k in range(len(class_index)):
                blur = cv2.GaussianBlur(gray, (0, 0), 4.0 + 3 * k)
                z = (blur.mean() - blur) / (blur.std() + 1e-6)
                out[i, k] = 1 / (1 + np.exp(-4 * (z - 0.5 + 0.1 * k)))
        return out

    return forward


consumer.probabilities_forward = blob_forward
seg = simulated_checkpoint()
with tempfile.TemporaryDirectory(dir=".") as tmp:
    out = Path(tmp)
    slides = generated_slides(out, side, n_slides)
    tiling = SimpleNamespace(size=1792, mpp=0.5, overlap=128, min_tissue=0.1)
    options = consumer.SegmentOptions(seam_check=False, overlay=False)
    reading = EmbedConfig(batch_size=1, num_workers=1, write_behind=False)
    runtime = Runtime(device="cpu", progress=False, rank=0, world_size=1)
    s = consumer.segment_slides(seg, slides, out / "job", tiling, reading, options, runtime)
    geojson = next((out / "job").rglob("s0.geojson"))
    import json

    features = json.loads(geojson.read_text())["features"]
    polygons = sum(len(f["geometry"]["coordinates"]) for f in features)
st = s["stage_seconds"]
print("label,side,slides,tiles,seconds,forward_s,write_s,write_s_per_slide,polygons_per_slide")
print(f"{label},{side},{s['slides_done']},{s['tiles']},{s['seconds']:.2f},{st['encode']:.2f},{st['write']:.2f},"
      f"{st['write'] / s['slides_done']:.2f},{polygons}")  # fmt: skip

"""What ``embed.write_behind`` hides, with the device simulated: the tile function waits ``FORWARD_S`` seconds per
batch without using the CPU (as a process waits for a GPU forward) and returns random class probabilities, so the
host work — reading, blending tiles into the on-disk map — is what is measured, inline or behind the next batch
(the probabilities are random but below the threshold: no polygons to trace, as they would be noise).
Three generated slides (segment_speed's kind, SIDE px), 1,792 px tiles, overlap 128, batch 1, 8 classes.
``write_s`` is the main thread's writing (with write_behind: only its waits); ``write_behind_s`` the writer and closer
threads' seconds (tiles blended; each slide's closing — finalize, pyramid, TIFF — while the next slide streams).

    python docs/benchmarks/cpu_write_behind.py [FORWARD_S] [SIDE] [OUT_DIR]
"""

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from simulated_segmentation import generated_slides, simulated_checkpoint

from hirespath.configs import EmbedConfig
from hirespath.segmentation import consumer
from hirespath.slides import Runtime

forward_s = float(sys.argv[1]) if len(sys.argv) > 1 else 0.3
side = int(sys.argv[2]) if len(sys.argv) > 2 else 7168
out = Path(sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp(prefix="write_behind_"))
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)


def simulated_forward(model, class_index):
    def forward(x: torch.Tensor) -> np.ndarray:
        time.sleep(forward_s)  # the host waits for the device
        return (0.4 * rng.random((x.shape[0], len(class_index), *x.shape[-2:]), dtype=np.float32)).astype(np.float16)

    return forward


consumer.probabilities_forward = simulated_forward
seg = simulated_checkpoint()
slides = generated_slides(out, side, 3)
tiling = SimpleNamespace(size=1792, mpp=0.5, overlap=128, min_tissue=0.1)
options = consumer.SegmentOptions(seam_check=False, overlay=False)
print("write_behind,forward_s,slides,tiles,seconds,encode_s,read_s,write_s,write_behind_s")
for behind in (False, True, False, True):
    reading = EmbedConfig(batch_size=1, num_workers=1, write_behind=behind)
    runtime = Runtime(device="cpu", progress=False, rank=0, world_size=1)
    job = Path(tempfile.mkdtemp(dir=out))
    s = consumer.segment_slides(seg, slides, job, tiling, reading, options, runtime)
    st = s["stage_seconds"]
    print(f"{behind},{forward_s},{s['slides_done']},{s['tiles']},{s['seconds']:.2f},{st['encode']:.2f},"
          f"{st['read']:.2f},{st['write']:.2f},{st['write_behind']:.2f}")  # fmt: skip

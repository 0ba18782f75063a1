"""Seconds and peak memory of building UNI2-h from a weights file, or a UNI2-h segmentation model from its
checkpoint (what every task pays once per process): one fresh process per measurement, alternating code versions.

    python docs/benchmarks/cpu_load_weights.py --save /tmp/uni2h.bin      # a UNI2-h-shaped file (2.7 GB, random)
    python docs/benchmarks/cpu_load_weights.py /tmp/uni2h.bin LABEL       # prints LABEL,seconds,peak RSS GB
    python docs/benchmarks/cpu_load_weights.py --segment RUN LABEL        # a `segment` run folder, e.g. one made by
        # tests/test_segment_slides.py's save_run(RUN, ["backbone=uni2_h", "attention=sparse", "resolution=224"])
The seconds include the imports (hirespath.segmentation imports timm up front, the code before imported it in the
load).
"""

import resource
import sys
import time

t = time.perf_counter()
if sys.argv[1] == "--segment":
    from hirespath.segmentation.model import load_segmentation

    load_segmentation(sys.argv[2])
else:
    import torch

    from hirespath.models.backbones import build_timm_model, get_backbone

    if sys.argv[1] == "--save":
        vit = build_timm_model(get_backbone("uni2_h"))
        torch.save({k: v.contiguous() for k, v in vit.state_dict().items()}, sys.argv[2])
        sys.exit()
    build_timm_model(get_backbone("uni2_h"), weights=sys.argv[1])
seconds = time.perf_counter() - t
print(f"{sys.argv[-1]},{seconds:.2f},{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")

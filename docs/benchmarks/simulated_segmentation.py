"""What the simulated-device segmentation benchmarks share (imported by cpu_write_behind.py, cpu_slide_closing.py):
a tiny 8-class SegPath checkpoint at 0.5 µm/px whose forward the script replaces, and generated slides."""

from pathlib import Path

import torch

import hirespath
from hirespath.benchmark.slide_throughput import synthetic_slide
from hirespath.data.segpath import CELL_TYPES
from hirespath.heads.mask2former import SegmentationModel
from hirespath.segmentation.model import SegmentationCheckpoint


def simulated_checkpoint() -> SegmentationCheckpoint:
    """The model is built (the runner needs one) but never run: the scripts replace its forward."""
    torch.manual_seed(0)
    model = SegmentationModel(hirespath.create_encoder("tiny", attention="sparse", window=8), num_classes=8,
                              num_queries=4, hidden_dim=32, decoder_layers=1, pixel_decoder_layers=1)  # fmt: skip
    return SegmentationCheckpoint(model.eval(), Path("simulated"), Path("."), None, list(CELL_TYPES), list(range(8)),
                                  0.5, 984, "simulated")  # fmt: skip


def generated_slides(out: Path, side: int, count: int) -> list[Path]:
    """``count`` slides of ``side`` px at 0.5 µm/px: one generated file and symlinks to it."""
    first = synthetic_slide(out / "s0.tiff", side, 0.5)
    slides = [first] + [first.with_name(f"s{i}.tiff") for i in range(1, count)]
    for extra in slides[1:]:
        if not extra.exists():
            extra.symlink_to(first.name)
    return slides

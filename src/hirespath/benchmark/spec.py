"""What one benchmark point is: an attention configuration (a plot line), its CSV columns and dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.encoder import HiResEncoder
from ..results import asked_backend

COLUMNS = [
    "backbone",
    "backbone_overrides",  # the preset's architecture changes (results.backbone_overrides_label), "" for none
    "attention",
    "window",
    "prune_ratio",
    "prune_layer",
    "dtype",
    "device",
    "resolution",
    "tokens",
    "seconds_per_image",
    "peak_memory_gb",
    "status",
    "tflops",
    "attn_memory_gb",
    "padding_ratio",  # padded / real attention work of the kernel that ran (costmodel.padding_ratio)
    "sparse_backend",
    "threads",
    "busy_processes",
    "cpu_parallel",
]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchConfig:
    """One line of the plot: an attention configuration on a backbone."""

    attention: str = "sparse"
    window: int = 8
    radius: int = 1
    prune_ratio: float = 0.0
    prune_layer: int = 4
    prune_score_tokens: str = "cls"
    sparse_backend: str = "auto"  # auto | gather | flex | varlen
    cpu_parallel: str = "auto"  # CPU inference: auto | tasks | ops (models/cpu_tasks.py)

    @classmethod
    def of_row(cls, row) -> BenchConfig:
        """The configuration of a CSV row (a dict or a pandas row); rows written before a column existed get its
        default."""
        get = row.get if isinstance(row, dict) else lambda k, d=None: getattr(row, k, d)
        cpu_parallel = get("cpu_parallel", "auto")
        return cls(
            attention=get("attention"),
            window=int(get("window")),
            prune_ratio=float(get("prune_ratio")),
            prune_layer=int(get("prune_layer")),
            sparse_backend=asked_backend(get("sparse_backend")),
            cpu_parallel=cpu_parallel if isinstance(cpu_parallel, str) and cpu_parallel else "auto",
        )

    @property
    def label(self) -> str:
        if self.attention != "sparse":
            name = self.attention
        else:
            name = (
                f"sparse w={self.window}"
                + (f" r={self.radius}" if self.radius != 1 else "")
                + (f" [{self.sparse_backend}]" if self.sparse_backend != "auto" else "")
            )
        prune = f" + prune {self.prune_ratio:g}@{self.prune_layer}" + (
            f" ({self.prune_score_tokens})" if self.prune_score_tokens != "cls" else ""
        )
        return (
            name
            + (prune if self.prune_ratio > 0 else "")
            + (f" [{self.cpu_parallel}]" if self.cpu_parallel != "auto" else "")
        )


def wrap_encoder(vit, preset, cfg: BenchConfig, sparse_backend: str = "auto") -> HiResEncoder:
    sparse_backend = cfg.sparse_backend if cfg.sparse_backend != "auto" else sparse_backend
    enc = HiResEncoder(
        vit,
        preset,
        attention=cfg.attention,
        window=cfg.window,
        radius=cfg.radius,
        prune_ratio=cfg.prune_ratio,
        prune_layer=cfg.prune_layer,
        prune_score_tokens=cfg.prune_score_tokens,
        sparse_backend=sparse_backend,
        cpu_parallel=cfg.cpu_parallel,
    )
    return enc

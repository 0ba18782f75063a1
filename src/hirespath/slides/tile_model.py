"""Any model as a tile function: precision, host→device copies and out-of-memory batch halving.

:class:`TileModel` takes uint8 tile batches from the readers and returns ``[(indices, output)]``: ``output`` is
whatever the wrapped ``forward`` returns for those tiles (``None`` for a single tile that does not fit). After an
out-of-memory error the batch is retried in halves and the smaller batch size is kept for the rest of the run (the
next batches would fail the same way).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..utils.errors import InputError
from ..utils.memory import is_oom

log = logging.getLogger("hirespath.slides")

PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None, torch.dtype | None]:
    """(name, autocast dtype, weights dtype). ``auto``: bf16 autocast on CUDA with bf16 support, fp32 elsewhere;
    ``bf16``/``fp16`` cast the weights (the benchmark's paper-style setting), ``*-mixed`` autocast."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("fp16", "fp16-mixed") and device.type != "cuda":
        raise InputError(f"precision={precision!r} needs a CUDA device (got {device}); use bf16-mixed or fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.split("-")[0])
    return (
        precision,
        (dtype if precision.endswith("-mixed") else None),
        (None if precision.endswith("-mixed") else dtype),
    )


class TileModel:
    """``forward(images)`` on batches of tiles: ``images`` arrive as uint8 B×3×H×W on the host and reach
    ``forward`` on ``device`` as floats in [0, 1] (in the weights' dtype), under autocast for ``*-mixed``.

    ``module`` is moved to ``device`` (and cast for ``bf16``/``fp16``); ``forward`` defaults to calling it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        precision: str,
        batch_size: int,
        forward: Callable[[torch.Tensor], Any] | None = None,
    ):
        self.module, self.device = module, torch.device(device)
        self.precision, self.autocast, self.weights_dtype = resolve_precision(precision, self.device)
        self.module.to(self.device).eval()
        if self.weights_dtype is not None:
            self.module.to(self.weights_dtype)
        self.forward = forward or module
        self.batch_size = int(batch_size)
        self.input_dtype = self.weights_dtype or torch.float32
        self._lock = threading.Lock()
        self.h2d_seconds = 0.0  # host→device copies (pinned, non-blocking, then synchronised to time them)

    def _run(self, images: torch.Tensor):
        t0 = time.perf_counter()
        x = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.h2d_seconds += time.perf_counter() - t0
        x = x.to(self.input_dtype).div_(255)
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return self.forward(x)

    def __call__(self, images: torch.Tensor) -> list[tuple[np.ndarray, Any]]:
        """[(indices into images, output) or (index, None) for a single tile that ran out of memory]. One call at a
        time: a slide closing behind the next one (its seam check) waits for the batch running now."""
        with self._lock:
            return self._call(images)

    def _call(self, images: torch.Tensor) -> list[tuple[np.ndarray, Any]]:
        results, start = [], 0
        while start < len(images):
            chunk = images[start : start + self.batch_size]
            try:
                results.append((np.arange(start, start + len(chunk)), self._run(chunk)))
                start += len(chunk)
            except Exception as err:  # noqa: BLE001 — only out-of-memory is handled here
                if not is_oom(err):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(chunk) == 1:
                    log.warning("out of memory on a single tile: skipping it (%s)", str(err).splitlines()[0])
                    results.append((np.arange(start, start + 1), None))
                    start += 1
                else:
                    self.batch_size = max(1, len(chunk) // 2)
                    log.warning("out of memory at batch size %d: retrying with %d", len(chunk), self.batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return results

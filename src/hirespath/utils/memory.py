"""Out-of-memory errors, recognised the same way everywhere (the benchmark's search, the embedding's batch halving)."""

from __future__ import annotations

import torch

_OOM_TYPES = (MemoryError, torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
# CUDA's and the host allocators' messages (PyTorch's CPU allocator, glibc, a subprocess's stderr)
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
                 "failed to allocate")  # fmt: skip


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the device or the host ran out of memory."""
    if isinstance(err, _OOM_TYPES):
        return True
    msg = str(err).lower()
    return any(s in msg for s in _OOM_MESSAGES)

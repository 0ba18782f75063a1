"""hirespath: pathology foundation models at resolutions far beyond 224 px."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["EncoderOutput", "HiResEncoder", "create_encoder", "get_backbone", "list_backbones", "__version__"]

# The encoder API is imported on first use (PEP 562), so `import hirespath` — and the `hirespath` CLI's help,
# version and config lookup — do not pay for importing torch and timm.
_LAZY = {"EncoderOutput", "HiResEncoder", "create_encoder", "get_backbone", "list_backbones"}

if TYPE_CHECKING:
    from .models import EncoderOutput, HiResEncoder, create_encoder, get_backbone, list_backbones


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(".models", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)

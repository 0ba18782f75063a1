"""hirespath: pathology foundation models at resolutions far beyond 224 px."""

from .models import EncoderOutput, HiResEncoder, create_encoder, get_backbone, list_backbones

__version__ = "0.1.0"
__all__ = ["EncoderOutput", "HiResEncoder", "create_encoder", "get_backbone", "list_backbones", "__version__"]

from . import wandb as _wandb_resolvers  # noqa: F401  (registers the hp.wandb_* config resolvers)
from .io import atomic_path, write_json, write_text

__all__ = ["atomic_path", "write_json", "write_text"]

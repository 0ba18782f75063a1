import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_encoder(**kwargs):
    """The tiny preset with LayerScale 1.0, so every block visibly changes the tokens."""
    import hirespath

    kwargs.setdefault("init_values", 1.0)
    torch.manual_seed(0)
    return hirespath.create_encoder("tiny", **kwargs).eval()

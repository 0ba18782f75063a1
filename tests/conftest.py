import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hirespath.tasks  # noqa: E402, F401  (registers the config groups' schemas and the hp.* resolvers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_encoder(**kwargs):
    """The tiny preset with LayerScale 1.0, so every block visibly changes the tokens."""
    import hirespath

    kwargs.setdefault("init_values", 1.0)
    torch.manual_seed(0)
    return hirespath.create_encoder("tiny", **kwargs).eval()


CONF_DIR = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")


def compose_task(config_name: str, overrides: list[str], output_dir, cache_dir=None):
    """Compose a task config as `@hydra.main` would (HydraConfig set, so ${hydra:...} resolves)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
        del cfg["hydra"]
    return cfg

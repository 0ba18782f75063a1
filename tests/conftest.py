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


def embed_kw(encoder, slides, job_dir, *, tile_size, tile_mpp, overlap=0, min_tissue=0.25, default_mpp=None,
             device="cpu", precision="auto", rank=None, world_size=None, progress=False, token_dtype=None,
             weights=None, **embed):  # fmt: skip
    """``embed_slides`` with the settings as keywords (the tiling's and EmbedConfig's field names), for tests."""
    import numpy as np

    from hirespath.configs import EmbedConfig, TilingConfig
    from hirespath.embeddings.features import embed_slides
    from hirespath.slides import Runtime

    if "lock_stale_s" in embed:
        embed["lock_stale_hours"] = embed.pop("lock_stale_s") / 3600
    tiling = TilingConfig(size=tile_size, mpp=tile_mpp, overlap=overlap, min_tissue=min_tissue)
    runtime = Runtime(device=device, precision=precision, rank=rank, world_size=world_size, progress=progress)
    return embed_slides(encoder, slides, job_dir, tiling, EmbedConfig(**embed), runtime, weights=weights,
                        default_mpp=default_mpp, token_dtype=token_dtype or np.float16)  # fmt: skip

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hirespath.tasks  # noqa: E402, F401  (registers the config groups' schemas and the hp.* resolvers)

# Tests that run a whole task (run_<task>(cfg), its Hydra entry, the CLI) or start other processes carry the
# `integration` marker: `pytest -m "not integration"` is the quick unit run. A file mapped to None is integration as
# a whole; otherwise only the tests named (their function names; a name missing from the file is a usage error).
INTEGRATION = {
    "test_bad_input.py": None,
    "test_cli.py": None,
    "test_ddp.py": None,
    "test_embed_slides_task.py": None,
    "test_grid_e2e.py": None,
    "test_launchers.py": None,
    "test_mil_task.py": None,
    "test_notebooks.py": None,
    "test_resume.py": None,
    "test_wandb.py": None,
    "test_benchmark.py": {
        "test_benchmark_task_writes_csv_and_plot",
        "test_embedding_benchmark_measures_tissue_throughput",
        "test_cpu_parallel_is_a_compare_key",
        "test_benchmark_under_load_uses_the_cores_left",
    },
    "test_config_validation.py": {"test_task_fails_before_compute", "test_plus_key_fails_through_the_entry_point"},
    "test_mil_bad_input.py": {
        "test_mil_task_stops_on_nan_features_and_writes_no_metrics",
        "test_ddp_every_rank_stops_on_a_nan_loss_of_one",
        "test_mil_default_workers_are_resolved_from_this_process_cores",
    },
    "test_panda.py": {"test_classify_end_to_end", "test_embedding_cache_hit_and_atomic_write"},
    "test_report.py": {"test_report_cli"},
    "test_results.py": {"test_results_and_report_import_without_torch"},
    "test_segpath.py": {"test_segment_task_end_to_end"},
    "test_slide_embedding.py": {"test_two_workers_embed_each_slide_exactly_once"},
}


def pytest_collection_modifyitems(config, items):
    checked = set()
    for item in items:
        file = item.path.name
        if file not in INTEGRATION:
            continue
        names = INTEGRATION[file]
        if names is not None and file not in checked:
            checked.add(file)
            missing = sorted(n for n in names if not callable(getattr(item.module, n, None)))
            if missing:
                raise pytest.UsageError(f"tests/conftest.py INTEGRATION names tests that {file} lacks: {missing}")
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than with two threads contending for a shared 2-core machine."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """Two intra-op threads, so that CPU-task code paths (several workers) run."""
    yield from _torch_threads(2)


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


def embed_kw(encoder, slides, job_dir, *, tile_size, tile_mpp, overlap=0, min_tissue=0.25, tissue_threshold=None,
             default_mpp=None, device="cpu", precision="auto", rank=None, world_size=None, progress=False,
             token_dtype=None, weights=None, **embed):  # fmt: skip
    """``embed_slides`` with the settings as keywords (the tiling's and EmbedConfig's field names), for tests."""
    import numpy as np

    from hirespath.configs import EmbedConfig, TilingConfig
    from hirespath.embeddings.features import embed_slides
    from hirespath.slides import Runtime

    if "lock_stale_s" in embed:
        embed["lock_stale_hours"] = embed.pop("lock_stale_s") / 3600
    tiling = TilingConfig(
        size=tile_size, mpp=tile_mpp, overlap=overlap, min_tissue=min_tissue, tissue_threshold=tissue_threshold
    )
    runtime = Runtime(device=device, precision=precision, rank=rank, world_size=world_size, progress=progress)
    return embed_slides(encoder, slides, job_dir, tiling, EmbedConfig(**embed), runtime, weights=weights,
                        default_mpp=default_mpp, token_dtype=token_dtype or np.float16)  # fmt: skip

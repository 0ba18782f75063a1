"""The smoke task: a tiny Lightning job that exercises launchers, loggers (W&B offline) and DDP end to end."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from ..modules.smoke_classifier import LinearClassifier
from ..results import METRICS_FILE, TEST_ACCURACY
from ..utils.hydra import instantiate_list
from ..utils.io import write_json
from ..utils.wandb import log_config, log_images
from ..viz.figures import pyplot, save_png

log = logging.getLogger("hirespath.smoke")


def make_blobs(n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def _scatter_png(x: torch.Tensor, y: torch.Tensor, path: Path) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], c=y, s=6, cmap="tab10")
    ax.set(title="smoke data (first two features)")
    return save_png(fig, path, dpi=80)


def run_smoke(cfg: DictConfig) -> dict:
    L.seed_everything(int(cfg.seed), workers=True)
    out_dir = Path(cfg.paths.output_dir)
    x, y = make_blobs(int(cfg.num_samples), int(cfg.num_features), int(cfg.num_classes), int(cfg.seed))
    cut = 3 * len(x) // 4
    train = DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=int(cfg.batch_size), shuffle=True)
    val = DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=int(cfg.batch_size))
    test = DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=int(cfg.batch_size))

    loggers = instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=instantiate_list(cfg.get("callbacks"))
    )
    model = LinearClassifier(int(cfg.num_features), int(cfg.num_classes), float(cfg.lr))
    log_config(loggers, cfg)
    trainer.fit(model, train, val)
    metrics = {k: float(v) for k, v in trainer.test(model, test, verbose=False)[0].items()}
    metrics["world_size"] = trainer.world_size
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / METRICS_FILE, metrics)
        log_images(loggers, "smoke/data", [_scatter_png(x[cut:], y[cut:], out_dir / "smoke_data.png")])
        log.info(
            "smoke: test accuracy %.3f (world size %d) → %s",
            metrics[TEST_ACCURACY],
            trainer.world_size,
            out_dir / METRICS_FILE,
        )
    return metrics


def main() -> None:
    """``python -m hirespath.tasks.smoke [overrides]``: the Hydra app ``hirespath smoke`` runs."""
    from .app import hydra_main

    hydra_main("smoke")


if __name__ == "__main__":
    main()

"""The processes of a slide task: ``trainer=ddp`` (or ``trainer.devices=N``) starts one per device through Lightning
Fabric, and the slides are spread over their ranks by :func:`~hirespath.slides.runner.run_slides` (per-slide locks,
so parallel jobs on one ``job_dir`` are safe too). One process (the default trainers) launches nothing."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from .runner import Runtime


def launch_workers(trainer: DictConfig, runtime: Runtime):
    """Launch the trainer config's processes (this call returns in each of them); returns ``(fabric, runtime)`` with
    this process's device, rank and world size, progress bars on rank 0 only. ``fabric.barrier()`` waits for all."""
    import lightning as L

    t = OmegaConf.to_container(trainer, resolve=True)
    fabric = L.Fabric(
        accelerator=t.get("accelerator", "auto"),
        devices=t.get("devices", 1),
        num_nodes=int(t.get("num_nodes", 1)),
        strategy=t.get("strategy", "auto"),
        precision=t.get("precision", "32-true"),
    )
    fabric.launch()
    rank = fabric.global_rank
    return fabric, dataclasses.replace(runtime, device=fabric.device, rank=rank, world_size=fabric.world_size,
                                       progress=runtime.progress and rank == 0)  # fmt: skip

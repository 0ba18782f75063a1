"""The processes of a slide task: ``trainer=ddp`` (or ``trainer.devices=N``) starts one per device through Lightning
Fabric, and the slides are spread over their ranks by :func:`~hirespath.slides.runner.run_slides` (per-slide locks,
so parallel jobs on one ``job_dir`` are safe too). One process (the default trainers) launches nothing."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from ..utils.errors import InputError
from ..utils.hydra import multirun_dir
from .runner import Runtime

T = TypeVar("T")


def launch_id() -> str | None:
    """The id the processes of one launch share (``Runtime.launch``): a SLURM array's job id, else a Hydra
    multirun's sweep folder (its jobs under joblib or submitit); None: none (:func:`launch_workers` gives DDP ranks
    rank 0's). A worker started hours after the others of its array still belongs to their overwrite."""
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-array:{array}"
    sweep = multirun_dir()
    return f"multirun:{sweep}" if sweep else None


def launch_workers(trainer: DictConfig, runtime: Runtime):
    """Launch the trainer config's processes (this call returns in each of them); returns ``(fabric, runtime)`` with
    this process's device, rank and world size, progress bars on rank 0 only. :func:`run_on_workers` runs the slides
    and waits for all."""
    import lightning as L

    t = OmegaConf.to_container(trainer, resolve=True)
    fabric = L.Fabric(
        accelerator=t.get("accelerator", "auto"),
        devices=t.get("devices", 1),
        num_nodes=int(t.get("num_nodes", 1)),
        strategy=t.get("strategy", "auto"),
        precision=t.get("precision", "32-true"),
    )
    _check_rank_start(fabric)
    fabric.launch()
    rank = fabric.global_rank
    launch = runtime.launch
    if fabric.world_size > 1:  # every rank takes rank 0's (the ranks of a run are one launch)
        launch = fabric.broadcast(launch or f"ddp:{uuid.uuid4().hex}", src=0)
    return fabric, dataclasses.replace(runtime, device=fabric.device, rank=rank, world_size=fabric.world_size,
                                       progress=runtime.progress and rank == 0, launch=launch)  # fmt: skip


def _check_rank_start(fabric) -> None:
    """Lightning starts the other ranks by running this process's command line again; a joblib job (a loky worker
    of ``hydra/launcher=joblib``) has none to run, and its ranks died with an unrelated parser error. Refused before
    any rank starts."""
    from hydra.core.hydra_config import HydraConfig

    launcher = getattr(getattr(fabric, "_strategy", None), "launcher", None)
    if fabric.world_size < 2 or type(launcher).__name__ != "_SubprocessScriptLauncher" or not multirun_dir():
        return  # a single run that names the joblib launcher does not use it
    if "joblib" in str(OmegaConf.select(HydraConfig.get(), "launcher._target_", default="")).lower():
        raise InputError(
            "trainer=ddp cannot start its ranks inside a joblib job (hydra/launcher=joblib): Lightning starts them by "
            "running the command line again, which a joblib worker does not have. Sweep with the basic launcher "
            "(the default) or hydra/launcher=submitit_slurm, or give each job one device (trainer.devices=1)"
        )


def run_on_workers(fabric, work: Callable[[], T], merge: Callable[[list[T]], T] | None = None) -> T:
    """``work()`` (this rank's slides), then every rank waits for the others, as a barrier before rank 0 reports.
    ``merge``: every rank gets the ranks' results merged by it (the run's summary, not rank 0's share of it).

    A rank whose work raised (a full disk, a bug) still meets the others there and tells them, then raises its own
    error; they stop with an error naming it. A barrier would have kept them waiting for a rank that is gone until
    torch's timeout (30 minutes, a SLURM job's devices idle all that while): Lightning's launcher stops the ranks when
    a child fails, not when rank 0 does, and ranks that ``srun`` starts have no such watch (torchrun's agent has)."""
    import torch

    try:
        result, error = work(), None
    except Exception as err:  # noqa: BLE001 — re-raised below, after the others know
        result, error = None, err
    if fabric.world_size > 1:
        flags = fabric.all_gather(torch.tensor([error is not None], dtype=torch.int32, device=fabric.device))
        failed = [rank for rank, flag in enumerate(flags.flatten().tolist()) if flag]
    else:
        failed = []
    if error is not None:
        raise error
    if failed:
        ranks = ", ".join(map(str, failed))
        raise InputError(
            f"rank {ranks} of {fabric.world_size} stopped with an error (its message is above); the slides every "
            "rank finished are kept: fix it and run the same command again to go on with the rest"
        )
    if fabric.world_size > 1:
        _end_process_group_at_exit()
    if merge is not None and fabric.world_size > 1:
        return merge(_gather_objects(fabric, result))
    return result


def _end_process_group_at_exit() -> None:
    """Gloo ranks whose process group was left to the interpreter's teardown aborted now and then after the
    collectives above ("terminate called without an active exception", exit status 134 for a finished run)."""
    import atexit

    atexit.unregister(_end_process_group)  # once per process, however often it is called
    atexit.register(_end_process_group)


def _end_process_group() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _gather_objects(fabric, obj) -> list:
    """Every rank's ``obj`` (pickled), through the tensor all_gather above."""
    import pickle

    import torch

    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = fabric.all_gather(torch.tensor([len(data)], dtype=torch.int64, device=fabric.device)).flatten().tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=fabric.device)
    padded[: len(data)] = data.to(fabric.device)
    rows = fabric.all_gather(padded).reshape(len(sizes), -1).cpu()
    return [pickle.loads(rows[i, :n].numpy().tobytes()) for i, n in enumerate(sizes)]

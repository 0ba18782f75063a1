"""The GPUs a task's config asks for, checked against this machine before any model is built or data read.

``trainer=gpu`` on a machine without a usable GPU (a login node, a CPU-only torch, ``CUDA_VISIBLE_DEVICES`` left
empty by a scheduler) otherwise fails deep inside Lightning ("No supported gpu backend found!") or torch ("Found no
NVIDIA driver"), after the model was built. Config checks stay independent of the machine (a config is valid
anywhere); this one runs where the task runs (on the compute node, under a SLURM launcher).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from .config import Problems, select

GPU_ACCELERATORS = ("gpu", "cuda")


def visible_gpus() -> tuple[int, str]:
    """(number of CUDA devices torch can use, why none when 0: in words, for an error message)."""
    import torch  # here: `hirespath --help` imports the tasks package but not torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), ""
    if torch.version.cuda is None:
        return 0, f"this torch {torch.__version__} is a CPU-only build"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return 0, f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    return 0, "torch finds no NVIDIA GPU or driver"


def requested_devices(devices) -> tuple[int, int | None]:
    """(GPUs needed, or 0 when not countable; the highest index asked for, or None) of Lightning's ``devices``:
    a count, ``-1``/``"auto"`` (all of them), a list of indices or a string ``"0,1"``."""
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            devices = [int(d) for d in text.split(",") if d.strip()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:
            return 0, None
    if isinstance(devices, list):
        return len(devices), max(devices, default=None)
    if isinstance(devices, int) and devices > 0:
        return devices, None
    return 0, None


def check_devices(cfg: DictConfig) -> None:
    """Refuse (ConfigValidationError) a GPU trainer or benchmark ``device`` this machine cannot give."""
    problems = Problems()
    accelerator = str(select(cfg, "trainer.accelerator") or "")
    device = str(select(cfg, "device") or "")  # the benchmark task's device: auto | cpu | cuda | cuda:N
    wants_trainer = accelerator in GPU_ACCELERATORS
    wants_bench = device.startswith("cuda")
    if not (wants_trainer or wants_bench):
        return
    import torch

    if accelerator == "gpu" and torch.backends.mps.is_available():  # Lightning's "gpu" is Apple's GPU there
        return
    count, why = visible_gpus()
    fix = "use trainer=cpu (or trainer.accelerator=auto), or run it on a machine with a GPU"
    if wants_trainer:
        needed, highest = requested_devices(select(cfg, "trainer.devices"))
        if count == 0:
            problems.add(f"trainer.accelerator={accelerator!r}: no CUDA GPU here ({why}); {fix}")
        elif highest is not None and highest >= count:
            problems.add(f"trainer.devices={select(cfg, 'trainer.devices')!r}: GPU index {highest} asked for, but "
                         f"{count} GPU(s) visible (indices 0..{count - 1})")  # fmt: skip
        elif needed > count:
            problems.add(f"trainer.devices={select(cfg, 'trainer.devices')!r}: {needed} GPUs asked for, but {count} "
                         "visible; give trainer.devices=-1 for all of them")  # fmt: skip
    if wants_bench:
        index = int(device.split(":")[1]) if ":" in device and device.split(":")[1].isdigit() else 0
        if count == 0:
            problems.add(f"device={device!r}: no CUDA GPU here ({why}); use device=cpu (or device=auto)")
        elif index >= count:
            problems.add(f"device={device!r}: {count} GPU(s) visible (cuda:0..cuda:{count - 1})")
    problems.raise_if_any("this machine cannot run the config")

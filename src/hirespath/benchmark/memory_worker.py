"""CPU peak-memory worker: one forward in a fresh process (earlier runs' allocator caches cannot hide the peak).

Runs as ``python -m hirespath.benchmark.memory_worker SPEC_JSON`` and prints one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from ..models.backbones import build_timm_model, get_backbone
from ..utils.memory import is_oom
from .spec import DTYPES, BenchConfig, wrap_encoder


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: build the encoder, then measure the peak RSS growth of one forward."""
    torch.manual_seed(spec["seed"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    preset = get_backbone(spec["backbone"])
    vit = build_timm_model(preset, weights=spec.get("weights"), **spec["overrides"])
    cfg = BenchConfig(**spec["config"])
    enc = wrap_encoder(vit, preset, cfg, spec.get("sparse_backend", "auto")).eval()
    images = torch.randn(spec["batch_size"], 3, spec["resolution"], spec["resolution"])
    # the program the benchmark times on CPU: fp32 weights, bf16 under autocast (it had cast the weights instead)
    cast = spec["dtype"] != "fp32"
    autocast = torch.autocast("cpu", dtype=DTYPES[spec["dtype"]]) if cast else contextlib.nullcontext()
    budget = spec.get("memory_budget_gb")
    _reset_peak_rss()
    before = _rss_bytes()
    if budget:
        # Cap the address space growth so an over-budget forward fails inside this worker, not the host.
        # RLIMIT_DATA counts the virtual data segment, so the cap is relative to its current size.
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        limit = int(_proc_status_bytes("VmData") + budget * 1e9)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        with torch.inference_mode(), autocast:
            enc(images)
    except Exception as err:  # noqa: BLE001 — anything else is re-raised below
        if is_oom(err):
            return {"status": "oom", "peak_memory_gb": float("nan")}
        raise
    peak = _proc_status_bytes("VmHWM")
    growth = max(0, peak - before) / 1e9
    if budget and growth > budget:
        return {"status": "oom", "peak_memory_gb": growth}
    return {"status": "ok", "peak_memory_gb": growth}


def cpu_peak_memory(spec: dict, timeout: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "hirespath.benchmark.memory_worker", json.dumps(spec)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137) or is_oom(RuntimeError(proc.stderr)):
            return {"status": "oom", "peak_memory_gb": float("nan")}
        raise RuntimeError(f"memory worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the CPU memory worker
    print(json.dumps(cpu_memory_worker(json.loads(sys.argv[1]))))

"""Benchmark: seconds per image, peak memory and the largest resolution, per attention configuration.

Timing: warm-up runs excluded, median of ``repeats`` timed forwards (CUDA synchronised). A sweep times the
configurations of one resolution in rounds, one forward of each per round, so that a machine that slows down or
speeds up for a while (another job, a shared host) slows every configuration alike and their ratios hold.
Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` — weights included, as a user
  would see it.
- CPU: the growth of peak RSS during one forward, measured in a fresh subprocess (so earlier runs' allocator
  caches do not hide it): the peak RSS (VmHWM, reset just before the forward) minus the resident size just
  before it. Weights are excluded there (they are resident before the forward).
An out-of-memory error (CUDA, or host: allocator failure, a budget ``memory_budget_gb`` exceeded, or the
worker killed) is recorded as status ``oom`` and the sweep goes on. Any other error of one configuration is logged
and recorded as status ``error``, that configuration is not run at the larger resolutions, and the others go on
(a lent GPU's minutes are not lost to one kernel failing); the task fails after writing what was measured.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch

from ..models.backbones import build_timm_model, check_resolution, get_backbone
from ..models.encoder import HiResEncoder
from ..results import backbone_overrides_label
from ..utils.io import atomic_path
from ..utils.memory import is_oom
from .costmodel import encoder_cost, inference_kernel, padding_ratio
from .memory_worker import cpu_peak_memory
from .rounds import in_rounds
from .spec import COLUMNS, DTYPES, BenchConfig, wrap_encoder

log = logging.getLogger("hirespath.benchmark")
K = TypeVar("K")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # CUDA memory APIs want an index
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def device_name(device: torch.device | str) -> str:
    """``cpu``, or the GPU's name: the CSV column that says which card gave the numbers."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("dtype=fp16 needs CUDA (autocast); on CPU use fp32 or bf16")
    return dtype


def _autocast(device: torch.device, dtype: str):
    # On CUDA the weights are cast to dtype already; autocast would only add fp32 LayerNorms and casts.
    if dtype == "fp32" or device.type == "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    encoders: dict[K, HiResEncoder],
    images: torch.Tensor,
    dtype: str,
    warmup: int,
    repeats: int,
    after_forward: Callable[[], None] | None = None,
) -> dict[K, float | BaseException]:
    """Median seconds of one forward of ``images`` through each encoder (warm-up excluded), timed in rounds of one
    forward each (``rounds.in_rounds``), so that every encoder's times span the same stretch of the machine's time.

    An encoder that fails (out of memory, or any other error) gets its error instead of a time and leaves the
    rounds; the others go on."""
    device = images.device

    def forward(encoder: HiResEncoder) -> float:
        _sync(device)
        t0 = time.perf_counter()
        encoder(images)
        _sync(device)
        return time.perf_counter() - t0

    def leaves_rounds(key: K, err: BaseException) -> bool:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    runs = {key: functools.partial(forward, encoder) for key, encoder in encoders.items()}
    with torch.inference_mode(), _autocast(device, dtype):
        times = in_rounds(runs, warmup + repeats, stops=leaves_rounds, after_each=after_forward)
    return {key: t if isinstance(t, BaseException) else statistics.median(t[warmup:]) for key, t in times.items()}


def failure_status(err: BaseException, label: str, resolution: int) -> str:
    """A configuration's row status after ``err``: ``oom``, or ``error`` (logged with its traceback)."""
    if is_oom(err):
        return "oom"
    log.error("%s at %d px failed: %s: %s", label, resolution, type(err).__name__, err, exc_info=err)
    return "error"


def cuda_peak_memory(encoder: HiResEncoder, images: torch.Tensor, dtype: str) -> float:
    device = images.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), _autocast(device, dtype):
        encoder(images)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


class Benchmark:
    """Shares one set of backbone weights between every configuration, so ratios compare like with like."""

    def __init__(
        self,
        backbone: str,
        overrides: dict | None = None,
        weights=None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 1,
        warmup: int = 1,
        repeats: int = 3,
        seed: int = 0,
        memory_budget_gb: float | None = None,
        sparse_backend: str = "auto",
        cpu_memory: bool = True,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.backbone = backbone
        self.weights = str(weights) if weights else None  # the CPU memory worker loads them too
        self.overrides = dict(overrides or {})
        self.batch_size, self.warmup, self.repeats, self.seed = batch_size, warmup, repeats, seed
        self.sparse_backend = sparse_backend
        self.cpu_memory = cpu_memory
        torch.manual_seed(seed)
        self.preset = get_backbone(backbone)
        vit = build_timm_model(self.preset, weights=weights, **self.overrides).eval()
        # bf16/fp16 weights on CUDA (what a user runs for speed); fp32 weights under autocast on CPU bf16.
        if self.device.type == "cuda" and self.dtype != "fp32":
            vit = vit.to(DTYPES[self.dtype])
        self.vit = vit.to(self.device)
        self.set_memory_budget(memory_budget_gb)

    def set_memory_budget(self, gb: float | None) -> None:
        """Points needing more than ``gb`` are recorded as oom (CUDA: allocator cap; CPU: worker RLIMIT_DATA)."""
        self.memory_budget_gb = gb
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory / 1e9
            torch.cuda.set_per_process_memory_fraction(min(1.0, (gb or total) / total), self.device)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    def check_resolution(self, resolution: int) -> None:
        check_resolution(resolution, self.patch_size)

    def row(self, cfg: BenchConfig, resolution: int, status: str = "ok") -> tuple[HiResEncoder, dict]:
        """The encoder of ``cfg`` on the shared weights, and its CSV row with the analytic cost (not yet measured)."""
        self.check_resolution(resolution)
        enc = wrap_encoder(self.vit, self.preset, cfg, self.sparse_backend).eval()
        dtype = DTYPES[self.dtype]  # the queries' (bf16 weights on CUDA, autocast on CPU)
        cost = encoder_cost(enc, resolution, dtype.itemsize, self.device.type, dtype)
        return enc, dict(
            backbone=self.backbone,
            backbone_overrides=backbone_overrides_label(self.overrides),
            attention=cfg.attention,
            window=cfg.window,
            prune_ratio=cfg.prune_ratio,
            prune_layer=cfg.prune_layer,
            dtype=self.dtype,
            device=self.device_name,
            resolution=resolution,
            tokens=cost.tokens,
            seconds_per_image=float("nan"),
            peak_memory_gb=float("nan"),
            status=status,
            tflops=cost.tflops,
            attn_memory_gb=cost.attn_memory_gb,
            padding_ratio=padding_ratio(enc, resolution, device=self.device.type, dtype=dtype),
            sparse_backend=self.kernel_column(enc, resolution),
            cpu_parallel=cfg.cpu_parallel,
        )

    def kernel_column(self, enc: HiResEncoder, resolution: int) -> str:
        """The ``sparse_backend`` column: empty for dense/eager; for sparse, the backend asked for, then ``:`` and
        the kernel ``select_kernel`` runs in inference when it differs (``auto:flex``, ``auto:gather``,
        ``varlen:gather`` in fp32; ``dense`` when every window's neighbourhood covers the grid)."""
        if enc.attention != "sparse":
            return ""
        grid = (resolution // self.patch_size,) * 2
        name = inference_kernel(enc, grid, self.device.type, DTYPES[self.dtype])
        ran = name.removeprefix("sparse[").removesuffix("]")
        return enc.sparse_backend if ran == enc.sparse_backend else f"{enc.sparse_backend}:{ran}"

    def measure(self, cfg: BenchConfig, resolution: int, timed: bool = True) -> dict:
        return self.measure_all([cfg], resolution, timed)[0]

    def measure_all(
        self,
        cfgs: list[BenchConfig],
        resolution: int,
        timed: bool = True,
        after_forward: Callable[[], None] | None = None,
    ) -> list[dict]:
        """The rows of several configurations at one resolution, on one input: the peak memory of each alone, then
        the seconds of those that fit, timed in interleaved rounds (``time_interleaved``)."""
        rows, fitting = [], {}
        images = None
        for i, cfg in enumerate(cfgs):
            enc, row = self.row(cfg, resolution)
            rows.append(row)
            try:
                if images is None:
                    param_dtype = next(self.vit.parameters()).dtype
                    images = torch.randn(
                        self.batch_size, 3, resolution, resolution, device=self.device, dtype=param_dtype
                    )
                if self.device.type == "cuda":
                    row["peak_memory_gb"] = cuda_peak_memory(enc, images, self.dtype)
                    if self.memory_budget_gb and row["peak_memory_gb"] > self.memory_budget_gb:
                        row["status"] = "oom"
                elif self.cpu_memory:
                    row.update(cpu_peak_memory(self._worker_spec(cfg, resolution)))
            except Exception as err:  # noqa: BLE001 — one configuration failing must not end the sweep
                row["status"] = failure_status(err, cfg.label, resolution)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            if row["status"] == "ok":
                fitting[i] = enc
            elif row["status"] == "oom":
                log.warning("%s at %d px: out of memory", cfg.label, resolution)
        if timed and fitting:
            try:
                seconds = time_interleaved(fitting, images, self.dtype, self.warmup, self.repeats, after_forward)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            for i, s in seconds.items():
                if isinstance(s, BaseException):
                    rows[i]["status"] = failure_status(s, cfgs[i].label, resolution)
                    if rows[i]["status"] == "oom":
                        log.warning("%s at %d px: out of memory", cfgs[i].label, resolution)
                else:
                    rows[i]["seconds_per_image"] = s / self.batch_size
        return rows

    def _worker_spec(self, cfg: BenchConfig, resolution: int) -> dict:
        return dict(
            backbone=self.backbone,
            weights=self.weights,
            overrides=self.overrides,
            config=asdict(cfg),
            dtype=self.dtype,
            batch_size=self.batch_size,
            resolution=resolution,
            seed=self.seed,
            memory_budget_gb=self.memory_budget_gb,
            threads=torch.get_num_threads(),
            sparse_backend=self.sparse_backend,
        )

    @property
    def device_name(self) -> str:
        return device_name(self.device)

    def fits(self, cfg: BenchConfig, resolution: int) -> bool:
        return self.measure(cfg, resolution)["status"] == "ok"

    def max_resolution(self, cfg: BenchConfig, start: int, limit: int, timed: bool = False) -> tuple[int, list[dict]]:
        """Largest multiple-of-patch resolution that fits: double until it fails, then bisect. A probe that fails
        otherwise than out of memory (status ``error`` in its row) ends the search: bisecting on a failure would
        report a size that says nothing about memory; the caller sees the row."""
        rows: list[dict] = []

        class _Failed(Exception):
            pass

        def probe(res: int) -> bool:
            row = self.measure(cfg, res, timed=timed)
            rows.append(row)
            log.info("max_resolution %s: %d px -> %s", cfg.label, res, row["status"])
            if row["status"] == "error":
                raise _Failed
            return row["status"] == "ok"

        try:
            return self._search(probe, start, limit), rows
        except _Failed:
            return 0, rows

    def _search(self, probe, start: int, limit: int) -> int:
        """The doubling-then-bisection of :meth:`max_resolution` over ``probe(resolution) -> fits``."""
        p = self.patch_size

        lo, hi = 0, None
        limit = limit // p * p
        res = min(max(p, start // p * p), limit)
        while True:
            if not probe(res):
                hi = res
                break
            lo = res
            if res >= limit:
                return lo  # fits up to the search limit
            res = min(res * 2, limit)
        while hi - lo > p:
            mid = (lo + hi) // 2 // p * p
            if mid <= lo:
                break
            if probe(mid):
                lo = mid
            else:
                hi = mid
        return lo


def sweep(
    bench: Benchmark, configs: Iterable[BenchConfig], resolutions: list[int], progress: bool = True
) -> list[dict]:
    """Every configuration at every resolution; rows ordered by configuration, then resolution. The configurations
    of one resolution are timed together (``Benchmark.measure_all``); a configuration is not run at resolutions
    larger than one where it ran out of memory (status ``oom``) or failed (``error``)."""
    from tqdm.auto import tqdm

    configs = list(configs)
    rows: dict[tuple[int, int], dict] = {}
    # configuration → (resolution, status) where it ran out of memory or failed
    failed_at: dict[str, tuple[int, str]] = {}
    per_resolution = len(configs) * (bench.warmup + bench.repeats)
    with tqdm(total=per_resolution * len(resolutions), desc="benchmark (forwards)", disable=not progress) as bar:
        for r, res in enumerate(resolutions):
            run = []
            for c, cfg in enumerate(configs):
                if cfg.label in failed_at and res > failed_at[cfg.label][0]:  # larger than a size that failed
                    rows[c, r] = bench.row(cfg, res, status=failed_at[cfg.label][1])[1]
                else:
                    run.append(c)
            measured = bench.measure_all([configs[c] for c in run], res, after_forward=lambda: bar.update(1))
            for c, row in zip(run, measured, strict=True):
                rows[c, r] = row
            bar.update((r + 1) * per_resolution - bar.n)  # the forwards of configurations out of memory
            for c, cfg in enumerate(configs):
                row = rows[c, r]
                if row["status"] != "ok":
                    failed_at.setdefault(cfg.label, (res, row["status"]))
                log.info(
                    "%-34s %5d px %7d tok  %s  %.3f s/img  %.2f GB  (analytic %.3g TFLOP)",
                    cfg.label,
                    res,
                    row["tokens"],
                    row["status"],
                    row["seconds_per_image"],
                    row["peak_memory_gb"],
                    row["tflops"],
                )
    return [rows[c, r] for c in range(len(configs)) for r in range(len(resolutions))]


def write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)


def configs_from(cfg) -> list[BenchConfig]:
    """The composed attention/pruner groups, or the explicit ``compare`` list (one plot line each)."""
    # the benchmark's own sparse_backend, else the attention group's sparse_backend (what tasks use)
    backend = str(cfg.get("sparse_backend", "auto"))
    backend = str(cfg.attention.get("sparse_backend", "auto")) if backend == "auto" else backend
    base = dict(
        sparse_backend=backend,
        attention=cfg.attention.mode,
        window=int(cfg.attention.window),
        radius=int(cfg.attention.radius),
        prune_ratio=float(cfg.pruner.prune_ratio),
        prune_layer=int(cfg.pruner.prune_layer),
        prune_score_tokens=str(cfg.pruner.prune_score_tokens),
        cpu_parallel="auto",
    )
    if not cfg.get("compare"):
        return [BenchConfig(**base)]
    out = []
    for item in cfg.compare:
        unknown = set(item) - set(base)
        if unknown:
            raise ValueError(f"compare entry {dict(item)} has unknown keys {sorted(unknown)}; valid: {sorted(base)}")
        out.append(BenchConfig(**{**base, **item}))
    return out


def summarize(rows: list[dict]) -> str:
    """Speed-up vs dense and eager, memory, analytic vs measured ratios — one line per (resolution, config)."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    lines = [
        f"{'resolution':>10} {'configuration':<34} {'s/img':>9} {'GB':>8} {'TFLOP':>8} "
        f"{'x dense':>8} {'(flops)':>8} {'x eager':>8}"
    ]
    for res, group in df.groupby("resolution"):
        ref = {
            a: group[(group.attention == a) & (group.prune_ratio == 0) & (group.status == "ok")]
            for a in ("dense", "eager")
        }
        for _, r in group.iterrows():
            label = BenchConfig.of_row(r).label
            cols = []
            for a in ("dense", "eager"):
                if len(ref[a]) and r.status == "ok":
                    cols.append(f"{ref[a].seconds_per_image.iloc[0] / r.seconds_per_image:8.2f}")
                    if a == "dense":
                        cols.append(f"{ref[a].tflops.iloc[0] / r.tflops:8.2f}")
                else:
                    cols.append(f"{'-':>8}")
                    if a == "dense":
                        cols.append(f"{'-':>8}")
            lines.append(
                f"{res:>10} {label:<34} {r.seconds_per_image:9.3f} {r.peak_memory_gb:8.3f} {r.tflops:8.3g} "
                + " ".join(cols)
                + ("" if r.status == "ok" else f"  [{r.status}]")
            )
    return "\n".join(lines)

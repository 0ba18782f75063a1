"""Benchmark: seconds per image, peak memory and the largest resolution, per attention configuration.

Timing: warm-up runs excluded, median of ``repeats`` timed forwards (CUDA synchronised).
Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` — weights included, as a user
  would see it.
- CPU: the growth of peak RSS during one forward, measured in a fresh subprocess (so earlier runs' allocator
  caches do not hide it): the peak RSS (VmHWM, reset just before the forward) minus the resident size just
  before it. Weights are excluded there (they are resident before the forward).
An out-of-memory error (CUDA, or host: allocator failure, a budget ``memory_budget_gb`` exceeded, or the
worker killed) is recorded as status ``oom`` and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from .costmodel import encoder_cost
from .models.backbones import build_timm_model, get_backbone
from .models.encoder import HiResEncoder, use_flex_by_default

log = logging.getLogger("hirespath.benchmark")

COLUMNS = ["backbone", "attention", "window", "prune_ratio", "prune_layer", "dtype", "device", "resolution",
           "tokens", "seconds_per_image", "peak_memory_gb", "status", "tflops", "attn_memory_gb",
           "sparse_backend"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchConfig:
    """One line of the plot: an attention configuration on a backbone."""

    attention: str = "sparse"
    window: int = 8
    radius: int = 1
    prune_ratio: float = 0.0
    prune_layer: int = 4
    prune_score_tokens: str = "cls"
    sparse_backend: str = "auto"  # auto | gather | flex

    @property
    def label(self) -> str:
        if self.attention != "sparse":
            name = self.attention
        else:
            name = f"sparse w={self.window}" + (f" r={self.radius}" if self.radius != 1 else "") + \
                (f" [{self.sparse_backend}]" if self.sparse_backend != "auto" else "")
        prune = f" + prune {self.prune_ratio:g}@{self.prune_layer}" + \
            (f" ({self.prune_score_tokens})" if self.prune_score_tokens != "cls" else "")
        return name + (prune if self.prune_ratio > 0 else "")


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


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    return any(s in msg for s in ("out of memory", "can't allocate memory", "not enough memory",
                                   "cannot allocate memory", "failed to allocate"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(encoder: HiResEncoder, images: torch.Tensor, dtype: str, warmup: int, repeats: int) -> float:
    """Median seconds of one forward of ``images`` (warm-up excluded)."""
    device = images.device
    times = []
    with torch.inference_mode(), _autocast(device, dtype):
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            encoder(images)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_peak_memory(encoder: HiResEncoder, images: torch.Tensor, dtype: str) -> float:
    device = images.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), _autocast(device, dtype):
        encoder(images)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


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
    enc = _wrap(vit, preset, cfg, spec.get("sparse_backend", "auto")).eval()
    if spec["dtype"] != "fp32":
        enc = enc.to(DTYPES[spec["dtype"]])
    images = torch.randn(spec["batch_size"], 3, spec["resolution"], spec["resolution"], dtype=next(enc.parameters()).dtype)
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
        with torch.inference_mode():
            enc(images)
    except Exception as err:  # noqa: BLE001 — anything else is re-raised below
        if _is_oom(err):
            return {"status": "oom", "peak_memory_gb": float("nan")}
        raise
    peak = _proc_status_bytes("VmHWM")
    growth = max(0, peak - before) / 1e9
    if budget and growth > budget:
        return {"status": "oom", "peak_memory_gb": growth}
    return {"status": "ok", "peak_memory_gb": growth}


def cpu_peak_memory(spec: dict, timeout: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "hirespath.benchmark", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137) or _is_oom(RuntimeError(proc.stderr)):
            return {"status": "oom", "peak_memory_gb": float("nan")}
        raise RuntimeError(f"memory worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wrap(vit, preset, cfg: BenchConfig, sparse_backend: str = "auto") -> HiResEncoder:
    sparse_backend = cfg.sparse_backend if cfg.sparse_backend != "auto" else sparse_backend
    enc = HiResEncoder(vit, preset, attention=cfg.attention, window=cfg.window, radius=cfg.radius,
                       prune_ratio=cfg.prune_ratio, prune_layer=cfg.prune_layer,
                       prune_score_tokens=cfg.prune_score_tokens, sparse_backend=sparse_backend)
    return enc


class Benchmark:
    """Shares one set of backbone weights between every configuration, so ratios compare like with like."""

    def __init__(self, backbone: str, overrides: dict | None = None, weights=None, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 1, warmup: int = 1, repeats: int = 3, seed: int = 0,
                 memory_budget_gb: float | None = None, sparse_backend: str = "auto", cpu_memory: bool = True):
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
        p = self.patch_size
        if resolution < p or resolution % p:
            lo = max(p, resolution // p * p)
            raise ValueError(f"resolution {resolution} is not a positive multiple of the patch size {p}; "
                             f"nearest valid: {lo} or {lo + p}")

    def row(self, cfg: BenchConfig, resolution: int, status: str = "ok") -> tuple[HiResEncoder, dict]:
        """The encoder of ``cfg`` on the shared weights, and its CSV row with the analytic cost (not yet measured)."""
        self.check_resolution(resolution)
        enc = _wrap(self.vit, self.preset, cfg, self.sparse_backend).eval()
        cost = encoder_cost(enc, resolution, bytes_per_element=2 if self.dtype != "fp32" else 4,
                            device=self.device.type)
        backend = ""
        if cfg.attention == "sparse":
            backend = enc.sparse_backend
            if backend == "auto":
                grid = (resolution // self.patch_size,) * 2
                backend = "auto:flex" if use_flex_by_default(self.device.type == "cuda", grid, enc.window) else "auto:gather"
        return enc, dict(backbone=self.backbone, attention=cfg.attention, window=cfg.window,
                         prune_ratio=cfg.prune_ratio, prune_layer=cfg.prune_layer, dtype=self.dtype,
                         device=self.device_name, resolution=resolution, tokens=cost.tokens,
                         seconds_per_image=float("nan"), peak_memory_gb=float("nan"), status=status,
                         tflops=cost.tflops, attn_memory_gb=cost.attn_memory_gb, sparse_backend=backend)

    def measure(self, cfg: BenchConfig, resolution: int, timed: bool = True) -> dict:
        enc, row = self.row(cfg, resolution)
        param_dtype = next(self.vit.parameters()).dtype
        try:
            images = torch.randn(self.batch_size, 3, resolution, resolution, device=self.device, dtype=param_dtype)
            if self.device.type == "cuda":
                row["peak_memory_gb"] = cuda_peak_memory(enc, images, self.dtype)
                if self.memory_budget_gb and row["peak_memory_gb"] > self.memory_budget_gb:
                    row["status"] = "oom"
                    return row
            elif self.cpu_memory:
                mem = cpu_peak_memory(self._worker_spec(cfg, resolution))
                row.update(mem)
                if row["status"] != "ok":
                    return row
            if timed:
                seconds = time_forward(enc, images, self.dtype, self.warmup, self.repeats)
                row["seconds_per_image"] = seconds / self.batch_size
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err):
                raise
            row["status"] = "oom"
            log.warning("%s at %d px: out of memory", cfg.label, resolution)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def _worker_spec(self, cfg: BenchConfig, resolution: int) -> dict:
        return dict(backbone=self.backbone, weights=self.weights, overrides=self.overrides, config=asdict(cfg),
                    dtype=self.dtype, batch_size=self.batch_size, resolution=resolution, seed=self.seed,
                    memory_budget_gb=self.memory_budget_gb, threads=torch.get_num_threads(),
                    sparse_backend=self.sparse_backend)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def fits(self, cfg: BenchConfig, resolution: int) -> bool:
        return self.measure(cfg, resolution)["status"] == "ok"

    def max_resolution(self, cfg: BenchConfig, start: int, limit: int, timed: bool = False) -> tuple[int, list[dict]]:
        """Largest multiple-of-patch resolution that fits: double until it fails, then bisect."""
        p = self.patch_size
        rows: list[dict] = []

        def probe(res: int) -> bool:
            row = self.measure(cfg, res, timed=timed)
            rows.append(row)
            log.info("max_resolution %s: %d px -> %s", cfg.label, res, row["status"])
            return row["status"] == "ok"

        lo, hi = 0, None
        limit = limit // p * p
        res = min(max(p, start // p * p), limit)
        while True:
            if not probe(res):
                hi = res
                break
            lo = res
            if res >= limit:
                return lo, rows  # fits up to the search limit
            res = min(res * 2, limit)
        while hi - lo > p:
            mid = (lo + hi) // 2 // p * p
            if mid <= lo:
                break
            if probe(mid):
                lo = mid
            else:
                hi = mid
        return lo, rows


def sweep(bench: Benchmark, configs: Iterable[BenchConfig], resolutions: list[int], progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    configs = list(configs)
    jobs = [(c, r) for c in configs for r in resolutions]
    rows = []
    oom_at: dict[str, int] = {}
    for cfg, res in tqdm(jobs, desc="benchmark", disable=not progress):
        if cfg.label in oom_at and res > oom_at[cfg.label]:
            row = bench.row(cfg, res, status="oom")[1]  # larger than a size that already ran out of memory
        else:
            row = bench.measure(cfg, res)
        if row["status"] == "oom":
            oom_at.setdefault(cfg.label, res)
        rows.append(row)
        log.info("%-34s %5d px %7d tok  %s  %.3f s/img  %.2f GB  (analytic %.3g TFLOP)", cfg.label, res,
                 row["tokens"], row["status"], row["seconds_per_image"], row["peak_memory_gb"], row["tflops"])
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd

    from .utils.io import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Time and memory vs resolution, log axes, one line per configuration."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from .utils.io import atomic_path

    df = pd.DataFrame(rows, columns=COLUMNS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    backend = df.sparse_backend.fillna("").astype(str).map(lambda b: "auto" if not b or b.startswith("auto") else b)
    for key, group in df.assign(backend=backend).groupby(["attention", "window", "prune_ratio", "prune_layer", "backend"],
                                                          sort=False):
        cfg = BenchConfig(attention=key[0], window=int(key[1]), prune_ratio=float(key[2]), prune_layer=int(key[3]),
                          sparse_backend=key[4])
        ok = group[group.status == "ok"]
        for ax, col in zip(axes, ("seconds_per_image", "peak_memory_gb")):
            (line,) = ax.plot(ok.resolution, ok[col], marker="o", label=cfg.label)
            oom = group[group.status == "oom"]
            if len(oom):
                ax.axvline(oom.resolution.min(), color=line.get_color(), ls=":", lw=1)
    # label the measured resolutions themselves (log-axis default ticks are powers of ten), skipping a label
    # that would overlap the previous one
    resolutions, labels, last = sorted(int(r) for r in df.resolution.unique()), [], 0
    for r in resolutions:
        labels.append(str(r) if r >= 1.25 * last else "")
        last = r if labels[-1] else last
    for ax, col, ylabel in zip(axes, ("seconds_per_image", "peak_memory_gb"), ("seconds per image", "peak memory (GB)")):
        ax.set_xscale("log")
        ax.set_xticks(resolutions, labels, rotation=45 if len(resolutions) > 5 else 0,
                      ha="right" if len(resolutions) > 5 else "center")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if (df[col] > 0).any():
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    device = df.device.iloc[0] if len(df) else ""
    fig.suptitle(title or f"{df.backbone.iloc[0] if len(df) else ''} on {device} ({df.dtype.iloc[0] if len(df) else ''}); dotted: first OOM")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


if __name__ == "__main__":  # the CPU memory worker
    print(json.dumps(cpu_memory_worker(json.loads(sys.argv[1]))))


def configs_from(cfg) -> list[BenchConfig]:
    """The composed attention/pruner groups, or the explicit ``compare`` list (one plot line each)."""
    # the benchmark's own sparse_backend, else the attention group's backend (what tasks use)
    backend = str(cfg.get("sparse_backend", "auto"))
    backend = str(cfg.attention.get("backend", "auto")) if backend == "auto" else backend
    base = dict(sparse_backend=backend, attention=cfg.attention.mode, window=int(cfg.attention.window), radius=int(cfg.attention.radius),
                prune_ratio=float(cfg.pruner.ratio), prune_layer=int(cfg.pruner.layer),
                prune_score_tokens=str(cfg.pruner.score_tokens))
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
    lines = [f"{'resolution':>10} {'configuration':<34} {'s/img':>9} {'GB':>8} {'TFLOP':>8} "
             f"{'x dense':>8} {'(flops)':>8} {'x eager':>8}"]
    for res, group in df.groupby("resolution"):
        ref = {a: group[(group.attention == a) & (group.prune_ratio == 0) & (group.status == "ok")]
               for a in ("dense", "eager")}
        for _, r in group.iterrows():
            label = BenchConfig(attention=r.attention, window=int(r.window), prune_ratio=float(r.prune_ratio),
                                prune_layer=int(r.prune_layer),
                                sparse_backend=(r.sparse_backend if isinstance(r.sparse_backend, str) and r.sparse_backend
                                                and not r.sparse_backend.startswith("auto") else "auto")).label
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
            lines.append(f"{res:>10} {label:<34} {r.seconds_per_image:9.3f} {r.peak_memory_gb:8.3f} {r.tflops:8.3g} "
                         + " ".join(cols) + ("" if r.status == "ok" else f"  [{r.status}]"))
    return "\n".join(lines)


def run_from_config(cfg) -> dict:
    """The benchmark task (tasks/benchmark.py): sweep, CSV, plot, optional max-resolution search."""
    from omegaconf import OmegaConf

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Benchmark(cfg.backbone.name, overrides=dict(cfg.backbone.get("overrides") or {}),
                      weights=cfg.backbone.weights, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                      warmup=cfg.warmup, repeats=cfg.repeats, seed=cfg.seed, memory_budget_gb=cfg.memory_budget_gb,
                      sparse_backend=cfg.sparse_backend, cpu_memory=cfg.cpu_memory)
    configs = configs_from(cfg)
    for r in cfg.resolutions:
        bench.check_resolution(int(r))
    rows = sweep(bench, configs, [int(r) for r in cfg.resolutions])
    write_csv(rows, out_dir / "benchmark.csv")
    plot(rows, out_dir / "benchmark.png")
    summary = summarize(rows)
    log.info("benchmark on %s, %s, batch %d:\n%s", bench.device_name, bench.dtype, bench.batch_size, summary)
    result = {"csv": str(out_dir / "benchmark.csv"), "plot": str(out_dir / "benchmark.png"), "rows": rows,
              "summary": summary}

    mr = cfg.get("max_resolution")
    if mr and mr.enabled:
        found, probes = [], []
        budget_bench = bench
        bench.set_memory_budget(mr.memory_budget_gb)
        bench.cpu_memory = True  # the search is about memory, so measure it on CPU too
        search = configs
        if mr.get("compare"):
            search = configs_from(OmegaConf.merge(cfg, {"compare": mr.compare}))
        for c in search:
            best, rows_c = budget_bench.max_resolution(c, int(mr.start), int(mr.limit))
            probes += rows_c
            ok = [r for r in rows_c if r["resolution"] == best and r["status"] == "ok"]
            found.append(dict(backbone=cfg.backbone.name, configuration=c.label, attention=c.attention,
                              window=c.window, prune_ratio=c.prune_ratio, prune_layer=c.prune_layer,
                              memory_budget_gb=mr.memory_budget_gb, max_resolution=best,
                              tokens=(best // budget_bench.patch_size) ** 2, sparse_backend=c.sparse_backend,
                              peak_memory_gb=ok[0]["peak_memory_gb"] if ok else float("nan"),
                              seconds_per_image=ok[0]["seconds_per_image"] if ok else float("nan"),
                              device=budget_bench.device_name, dtype=budget_bench.dtype,
                              search_limit=int(mr.limit)))
            log.info("largest resolution within %g GB for %s: %d px", mr.memory_budget_gb, c.label, best)
        import pandas as pd

        from .utils.io import atomic_path

        with atomic_path(out_dir / "max_resolution.csv") as tmp:
            pd.DataFrame(found).to_csv(tmp, index=False)
        write_csv(probes, out_dir / "max_resolution_probes.csv")
        result["max_resolution"] = found
    return result

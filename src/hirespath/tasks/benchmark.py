"""The benchmark task: time, memory and the largest resolution per attention configuration.

hirespath benchmark backbone=uni2_h attention=sparse pruner=global_attention 'resolutions=[224,448,896]'
hirespath benchmark experiment=table1_cost
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from ..benchmark.measure import Benchmark, configs_from, summarize, sweep, write_csv
from ..benchmark.plots import plot
from ..benchmark.slide_throughput import (
    benchmark_embedding,
    embed_configs_from,
    plot_embedding,
    summarize_embedding,
    synthetic_slide,
    write_embedding_csv,
)
from ..configs.model import arch_overrides
from ..results import BENCHMARK_FILE
from ..utils.io import atomic_path
from ..utils.threads import busy_processes, encoder_threads, torch_threads

log = logging.getLogger("hirespath.benchmark")


def run_embedding_benchmark(cfg, out_dir: Path) -> dict:
    """Tissue area embedded per second on one slide, per tiling × attention configuration (same weights)."""
    s, tile, embed = cfg.slides, cfg.tile, cfg.embed
    configs = embed_configs_from(cfg)
    slide = s.wsi or synthetic_slide(out_dir / "benchmark_slide.tiff", int(s.synthetic_side), float(tile.mpp))
    device = None if cfg.device == "auto" else cfg.device
    rows = benchmark_embedding(
        slide, configs, backbone=cfg.backbone.name, overrides=arch_overrides(cfg.backbone),
        weights=cfg.backbone.weights, tile_mpp=float(tile.mpp), min_tissue=float(tile.min_tissue),
        tissue_threshold=tile.get("tissue_threshold"),
        batch_size=int(embed.batch_size), num_workers=embed.num_workers, reader=str(embed.reader),
        threads=embed.threads, device=device, precision=str(s.precision),
        seed=int(cfg.seed), repeats=s.get("repeats", 1),
    )  # fmt: skip
    write_embedding_csv(rows, out_dir / "embedding_benchmark.csv")
    plot_embedding(rows, out_dir / "embedding_benchmark.png")
    summary = summarize_embedding(rows)
    tissue = next((r["tissue_mm2"] for r in rows if r["status"] == "ok"), float("nan"))
    log.info("whole-slide embedding of %s (%.2f mm² tissue):\n%s", slide, tissue, summary)
    csv, png = str(out_dir / "embedding_benchmark.csv"), str(out_dir / "embedding_benchmark.png")
    result = {"csv": csv, "plot": png, "rows": rows, "summary": summary, "tables": [csv], "plots": [png]}
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        result["failed"] = (
            f"embedding benchmark: {len(failed)} configuration(s) failed ("
            + ", ".join(f"{r['configuration']}: {r['error']}" for r in failed)
            + f"); the others are in {csv}"
        )
    return result


def run_benchmark(cfg) -> dict:
    """The benchmark task: ``mode=encoder`` sweeps resolutions (CSV, plot, optional max-resolution search);
    ``mode=slides`` measures whole-slide embedding throughput (tissue mm² per second); ``mode=segment`` whole-slide
    segmentation (``experiment=segment_speed``). With ``logger=wandb`` the CSVs go to W&B as tables, the plots as
    images."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _run(cfg, out_dir)
    log_results(cfg, result)
    if result.get("failed"):  # what was measured is written and logged; the run still fails, so a script sees it
        raise RuntimeError(result["failed"])
    return result


def log_results(cfg, result: dict) -> None:
    """Each CSV the run wrote as a W&B table (key: the file's stem), each plot as an image, the resolved config;
    loggers other than W&B keep the files."""
    from ..utils.hydra import instantiate_list
    from ..utils.wandb import log_config, log_images, log_table

    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:
        return
    log_config(loggers, cfg)
    for csv in result["tables"]:
        log_table(loggers, f"benchmark/{Path(csv).stem}", pd.read_csv(csv))
    log_images(loggers, "benchmark/plots", result["plots"])
    for lg in loggers:
        lg.finalize("success")


def _run(cfg, out_dir: Path) -> dict:
    if cfg.get("mode", "encoder") == "slides":
        return run_embedding_benchmark(cfg, out_dir)
    if cfg.get("mode", "encoder") == "segment":  # experiment=segment_speed
        from ..benchmark.segment_speed import run_segmentation_benchmark

        return run_segmentation_benchmark(cfg, out_dir)
    if cfg.get("mode", "encoder") != "encoder":
        raise ValueError(f"mode must be encoder, slides or segment, got {cfg.mode!r}")
    bench = Benchmark(
        cfg.backbone.name,
        overrides=arch_overrides(cfg.backbone),
        weights=cfg.backbone.weights,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        seed=cfg.seed,
        memory_budget_gb=cfg.memory_budget_gb,
        sparse_backend=cfg.sparse_backend,
        cpu_memory=cfg.cpu_memory,
    )
    configs = configs_from(cfg)
    for r in cfg.resolutions:
        bench.check_resolution(int(r))
    # the encoder under load: busy_processes spinning processes, and the thread policy (or `threads`) for the rest
    busy = int(cfg.get("busy_processes") or 0)
    threads = encoder_threads(cfg.get("threads"), busy)
    with busy_processes(busy), torch_threads(threads, f"{busy} busy process(es) beside the benchmark"):
        rows = sweep(bench, configs, [int(r) for r in cfg.resolutions])
    for row in rows:
        row.update(threads=threads, busy_processes=busy)
    write_csv(rows, out_dir / BENCHMARK_FILE)
    plot(rows, out_dir / "benchmark.png")
    summary = summarize(rows)
    log.info("benchmark on %s, %s, batch %d:\n%s", bench.device_name, bench.dtype, bench.batch_size, summary)
    result = {
        "csv": str(out_dir / BENCHMARK_FILE),
        "plot": str(out_dir / "benchmark.png"),
        "tables": [str(out_dir / BENCHMARK_FILE)],
        "plots": [str(out_dir / "benchmark.png")],
        "rows": rows,
        "summary": summary,
    }

    mr = cfg.get("max_resolution")
    if mr and mr.enabled:
        found, probes = [], []
        budget_bench = bench
        bench.set_memory_budget(mr.memory_budget_gb)
        bench.cpu_memory = True  # the search is about memory, so measure it on CPU too
        search = configs
        if mr.get("compare"):
            search = configs_from(OmegaConf.merge(cfg, {"compare": mr.compare}))
        search_failed = []
        for c in search:
            best, rows_c = budget_bench.max_resolution(c, int(mr.start), int(mr.limit))
            for row in rows_c:
                row.update(threads=threads, busy_processes=busy)
            probes += rows_c
            ok = [r for r in rows_c if r["resolution"] == best and r["status"] == "ok"]
            error = next((r for r in rows_c if r["status"] == "error"), None)
            if error is not None:  # the other configurations are still searched; the run fails at its end
                search_failed.append(f"{c.label} at {error['resolution']} px")
            found.append(
                dict(
                    backbone=cfg.backbone.name,
                    configuration=c.label,
                    attention=c.attention,
                    window=c.window,
                    prune_ratio=c.prune_ratio,
                    prune_layer=c.prune_layer,
                    memory_budget_gb=mr.memory_budget_gb,
                    max_resolution=best if error is None else None,
                    status="ok" if error is None else "error",
                    tokens=(best // budget_bench.patch_size) ** 2 if error is None else None,
                    sparse_backend=c.sparse_backend,
                    peak_memory_gb=ok[0]["peak_memory_gb"] if ok else float("nan"),
                    seconds_per_image=ok[0]["seconds_per_image"] if ok else float("nan"),
                    device=budget_bench.device_name,
                    dtype=budget_bench.dtype,
                    search_limit=int(mr.limit),
                )
            )
            if error is None:
                log.info("largest resolution within %s GB for %s: %d px", mr.memory_budget_gb, c.label, best)
        with atomic_path(out_dir / "max_resolution.csv") as tmp:
            pd.DataFrame(found).to_csv(tmp, index=False)
        write_csv(probes, out_dir / "max_resolution_probes.csv")
        result["max_resolution"] = found
        result["tables"] += [str(out_dir / "max_resolution.csv"), str(out_dir / "max_resolution_probes.csv")]
    failed = [r for r in rows if r["status"] == "error"]
    problems = []
    if failed:
        points = [f"{r['attention']} [{r['sparse_backend'] or '-'}] at {r['resolution']} px" for r in failed]
        problems.append(
            f"{len(failed)} benchmark point(s) failed other than out of memory ({', '.join(points[:6])}"
            f"{', ...' if len(points) > 6 else ''}): status 'error' in {out_dir / BENCHMARK_FILE}"
        )
    if mr and mr.enabled and search_failed:
        problems.append(
            f"the max-resolution search of {', '.join(search_failed)} failed other than out of memory: status "
            f"'error' in {out_dir / 'max_resolution.csv'} (its probes: max_resolution_probes.csv)"
        )
    if problems:
        result["failed"] = "; ".join(problems) + "; the errors: the log"
    return result


def main() -> None:
    """``python -m hirespath.tasks.benchmark [overrides]``: the Hydra app ``hirespath benchmark`` runs."""
    from .app import hydra_main

    hydra_main("benchmark")


if __name__ == "__main__":
    main()

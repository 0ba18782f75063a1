"""Benchmark task: CSV schema, plot, OOM handling, and the analytic cost model."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import hirespath
from hirespath.benchmark import measure as bm
from hirespath.benchmark.costmodel import _neighbourhood_keys, encoder_cost, inference_kernel, padding_ratio
from hirespath.benchmark.slide_throughput import embed_configs_from
from hirespath.benchmark.spec import asked_backend
from hirespath.models import attention
from hirespath.tasks.benchmark import run_benchmark

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _cfg(tmp_path, overrides):
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("benchmark", overrides=overrides, return_hydra_config=False)
    cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_benchmark_task_writes_csv_and_plot(tmp_path):
    cfg = _cfg(
        tmp_path,
        [
            "backbone=tiny",
            "resolutions=[56,112]",
            "repeats=1",
            "warmup=0",
            "cpu_memory=false",
            "compare=[{attention: dense, prune_ratio: 0.0},"
            "{attention: sparse, window: 2, prune_ratio: 0.5, prune_layer: 2}]",
        ],
    )
    result = run_benchmark(cfg)
    df = pd.read_csv(tmp_path / "benchmark.csv")
    for col in [
        "backbone",
        "attention",
        "window",
        "prune_ratio",
        "prune_layer",
        "dtype",
        "device",
        "resolution",
        "tokens",
        "seconds_per_image",
        "peak_memory_gb",
        "status",
    ]:
        assert col in df.columns
    assert len(df) == 4 and set(df.status) == {"ok"}
    assert list(df.tokens[:2]) == [16, 64]
    assert (df.seconds_per_image > 0).all()
    assert set(df.attention) == {"dense", "sparse"} and (df.device == "cpu").all() and (df.dtype == "fp32").all()
    assert (df.backbone_overrides == "init_values=1.0").all()  # the tiny preset's; a narrowed UNI2-h names its own
    png = (tmp_path / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "x dense" in result["summary"]


def test_benchmark_goes_to_wandb_as_tables_and_images(tmp_path):
    """``logger=wandb``: the CSVs as W&B tables (the max-resolution search's too), the plot as an image."""
    from conftest import compose_task

    from hirespath.utils.wandb import finish_runs, offline_runs

    cfg = compose_task("benchmark", ["backbone=tiny", "resolutions=[56]", "repeats=1", "warmup=0", "cpu_memory=false",
                                     "compare=[{attention: dense, prune_ratio: 0.0}]", "max_resolution.enabled=true",
                                     "max_resolution.start=56", "max_resolution.limit=112", "logger=wandb"],
                       tmp_path)  # fmt: skip
    result = run_benchmark(cfg)
    finish_runs()  # what task_wrapper does when the task returns
    (run,) = offline_runs(tmp_path)
    tables = {f"benchmark/{Path(t).stem}/_type" for t in result["tables"]}
    assert len(tables) == 3 and tables | {"benchmark/plots/_type"} <= run["history_keys"], sorted(run["history_keys"])
    assert run["finished"]


def test_segmentation_benchmark_plot_with_and_without_seams(tmp_path):
    import json

    from hirespath.benchmark.plots import plot_segmentation

    dice = json.dumps({b: {"a": 0.9, "b": 0.7} for b in ("linear", "crop")})
    rows = [dict(model="m", device="cpu", tile_size=t, overlap=128, attention=a, window=8, tiles=n, tissue_mm2=2.6,
                 mm2_per_s=v, speedup=v / 0.017, px_per_tissue_px=f, encode_s_per_mpx=e, seam_region=1792,
                 seam_dice_linear=0.8, seam_dice_crop=0.78, seam_dice_per_class=dice, seam_constant_classes=0)
            for t, a, n, v, f, e in ((518, "dense", 81, 0.017, 2.08, 6.95),
                                     (1792, "sparse", 4, 0.030, 1.23, 6.53))]  # fmt: skip
    plot_segmentation(rows, tmp_path / "seams.png")
    for r in rows:
        for k in ("seam_dice_linear", "seam_dice_crop", "seam_dice_per_class", "seam_constant_classes"):
            r.pop(k)
        r["seam_region"] = 0
    plot_segmentation(rows, tmp_path / "speed.png")
    for name in ("seams.png", "speed.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cpu_peak_memory_in_subprocess_grows_with_tokens(tmp_path):
    bench = bm.Benchmark("tiny", overrides={"depth": 2}, repeats=1, warmup=0)
    small = bench.measure(bm.BenchConfig(attention="eager"), 112)
    large = bench.measure(bm.BenchConfig(attention="eager"), 448)
    assert small["status"] == large["status"] == "ok"
    # eager holds a 4-head L×L fp32 matrix: 1033² · 4 heads · 4 B ≈ 17 MB at 448 px; far less at 112 px
    assert large["peak_memory_gb"] > small["peak_memory_gb"]
    assert large["peak_memory_gb"] > 0.015


def test_memory_worker_loads_the_benchmarked_weights(tmp_path):
    """The CPU memory worker runs the same weights as the timed model (pruning survivors depend on them)."""
    import hirespath

    src = hirespath.create_encoder("tiny", depth=2, init_values=1.0)
    path = tmp_path / "w.pth"
    torch.save(dict(src.vit.state_dict()), path)
    bench = bm.Benchmark("tiny", overrides={"depth": 2, "init_values": 1.0}, weights=path, repeats=1, warmup=0)
    spec = bench._worker_spec(bm.BenchConfig(prune_ratio=0.5, prune_layer=1), 112)
    assert spec["weights"] == str(path) and bm.cpu_peak_memory(spec)["status"] == "ok"
    torch.save({"not": torch.zeros(1)}, path)  # the worker really reads the file
    with pytest.raises(RuntimeError, match="does not match the architecture"):
        bm.cpu_peak_memory(spec)


def test_oom_is_recorded_and_the_sweep_goes_on(monkeypatch):
    from hirespath.models.encoder import HiResEncoder

    bench = bm.Benchmark("tiny", overrides={"depth": 2}, repeats=1, warmup=0, cpu_memory=False)
    real = HiResEncoder.forward

    def forward(self, images, *args, **kwargs):
        if images.shape[-1] >= 112:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(HiResEncoder, "forward", forward)
    rows = bm.sweep(bench, [bm.BenchConfig(attention="dense")], [56, 112, 224], progress=False)
    assert [r["status"] for r in rows] == ["ok", "oom", "oom"]
    assert math.isnan(rows[1]["seconds_per_image"])


def test_a_failing_configuration_is_recorded_and_the_others_go_on(monkeypatch, tmp_path, caplog):
    """A configuration that fails other than out of memory (a kernel a lent GPU runs for the first time) is logged,
    its rows say ``error`` (not run at larger sizes), the other configurations are measured, and the task writes
    the CSV, then fails naming the points."""
    from hirespath.models import attention

    real = attention.ATTENTION_KERNELS["sparse[gather]"]

    def gather(attn, x, layout, *args, **kwargs):
        if layout.positions.shape[1] < layout.grid[0] * layout.grid[1]:  # the pruned blocks
            raise ValueError("an unsupported layout")
        return real(attn, x, layout, *args, **kwargs)

    monkeypatch.setitem(attention.ATTENTION_KERNELS, "sparse[gather]", gather)
    cfg = _cfg(tmp_path, ["backbone=tiny", "resolutions=[56,112,168]", "repeats=1", "warmup=0", "cpu_memory=false",
                          "compare=[{attention: dense, prune_ratio: 0.0},"
                          "{attention: sparse, window: 2, prune_ratio: 0.5, prune_layer: 2}]"])  # fmt: skip
    with pytest.raises(
        RuntimeError,
        match=r"2 benchmark point\(s\) failed other than out of memory "
        r"\(sparse \[auto:gather\] at 112 px, sparse \[auto:gather\] at 168 px\)",
    ):
        run_benchmark(cfg)
    df = pd.read_csv(tmp_path / "benchmark.csv")
    assert list(zip(df.attention, df.resolution, df.status)) == [
        ("dense", 56, "ok"), ("dense", 112, "ok"), ("dense", 168, "ok"),
        ("sparse", 56, "ok"), ("sparse", 112, "error"), ("sparse", 168, "error"),  # 56 px: 2 × 2 windows, dense kernel
    ]  # fmt: skip
    assert (df[df.status == "ok"].seconds_per_image > 0).all() and df[
        df.status == "error"
    ].seconds_per_image.isna().all()
    assert sum("failed: ValueError: an unsupported layout" in r.message for r in caplog.records) == 1  # run once


def test_sweep_times_the_configurations_of_a_resolution_in_rounds(monkeypatch):
    """One forward of each configuration per round, so a machine's slow stretch hits them alike; one that runs
    out of memory in a round leaves the rounds, the others are still timed; rows keep configuration-major order."""
    from hirespath.models.encoder import HiResEncoder

    bench = bm.Benchmark("tiny", overrides={"depth": 2}, repeats=3, warmup=1, cpu_memory=False)
    real = HiResEncoder.forward
    calls = []

    def forward(self, images, *args, **kwargs):
        calls.append((self.attention, images.shape[-1]))
        if self.attention == "eager" and images.shape[-1] == 112 and len(calls) > 10:  # its second round there
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(HiResEncoder, "forward", forward)
    configs = [bm.BenchConfig(attention="dense"), bm.BenchConfig(attention="eager")]
    rows = bm.sweep(bench, configs, [56, 112], progress=False)
    assert calls[:8] == [("dense", 56), ("eager", 56)] * 4
    assert calls[8:] == [("dense", 112), ("eager", 112), ("dense", 112), ("eager", 112)] + [("dense", 112)] * 2
    assert [(r["attention"], r["resolution"], r["status"]) for r in rows] == [
        ("dense", 56, "ok"), ("dense", 112, "ok"), ("eager", 56, "ok"), ("eager", 112, "oom")
    ]  # fmt: skip
    assert all(r["seconds_per_image"] > 0 for r in rows[:3]) and math.isnan(rows[3]["seconds_per_image"])


def test_memory_budget_forces_real_oom_in_worker():
    """A real allocation failure under a tiny RLIMIT_DATA budget, caught inside the worker."""
    bench = bm.Benchmark("tiny", overrides={"depth": 1}, repeats=1, warmup=0, memory_budget_gb=0.01)
    row = bench.measure(bm.BenchConfig(attention="eager"), 1120)  # 6400² · 4 heads · 4 B = 655 MB of scores
    assert row["status"] == "oom"


def test_max_resolution_grows_then_bisects(monkeypatch):
    bench = bm.Benchmark("tiny", overrides={"depth": 1}, repeats=1, warmup=0, cpu_memory=False)

    def fake_measure(cfg, res, timed=True):
        return {
            "resolution": res,
            "status": "ok" if res <= 700 else "oom",
            "peak_memory_gb": 1.0,
            "seconds_per_image": 0.1,
        }

    monkeypatch.setattr(bench, "measure", fake_measure)
    best, probes = bench.max_resolution(bm.BenchConfig(), start=112, limit=10_000)
    assert best == 700  # the largest multiple of 14 that is <= 700
    assert [p["resolution"] for p in probes][:4] == [112, 224, 448, 896]


def test_bad_resolution_is_named():
    bench = bm.Benchmark("tiny", overrides={"depth": 1}, cpu_memory=False)
    with pytest.raises(
        ValueError, match="resolution 100 is not a positive multiple of the patch size 14; nearest valid: 98 or 112"
    ):
        bench.measure(bm.BenchConfig(), 100)


def test_cost_model_matches_hand_computation():
    with torch.device("meta"):
        enc = hirespath.create_encoder("tiny", attention="dense", depth=2)
    # tiny: D=96, SwiGLUPacked hidden 512 (fc1 96→512, fc2 256→96), qkv 96→288, proj 96→96
    lin = 96 * 288 + 96 * 96 + 96 * 512 + 256 * 96
    L = 9 + 16
    patch_embed = 2 * 3 * 14 * 14 * 96 * 16
    expected = 2 * (2 * lin * L + 4 * L * L * 96) + patch_embed
    assert encoder_cost(enc, 56).tflops * 1e12 == pytest.approx(expected)
    with torch.device("meta"):
        eager = hirespath.create_encoder("tiny", attention="eager", depth=2)
    # eager holds scores and softmax at once: 2 · heads · L² elements of 2 bytes, and writes its L × D output
    assert encoder_cost(eager, 56).attn_memory_gb * 1e9 == pytest.approx(2 * 4 * L * L * 2 + L * 96 * 2)
    # SDPA: its fp32 statistics (heads · L) and its output, counted as the sparse kernels count theirs (it had left
    # the output out: at 3,430 px dense SDPA seemed to hold 5.8 MB against flex's 738 MB)
    assert encoder_cost(enc, 56).attn_memory_gb * 1e9 == pytest.approx(4 * L * 4 + L * 96 * 2)
    # sparse on a 4×4 grid with window 2: every block neighbourhood covers the whole grid → dense patch keys
    assert _neighbourhood_keys((4, 4), 2, 1) == 16 * 16
    # 1-D check: 6×1 grid, window 2 → blocks of 2; neighbourhoods of 4, 6, 4 keys → 2·4 + 2·6 + 2·4
    assert _neighbourhood_keys((6, 1), 2, 1) == 28


def test_cost_model_reproduces_design_numbers():
    with torch.device("meta"):
        dense = hirespath.create_encoder("uni2_h", attention="dense")
        local = hirespath.create_encoder("uni2_h", attention="sparse", window=8)
        pruned = hirespath.create_encoder("uni2_h", attention="sparse", window=8, prune_ratio=0.6, prune_layer=4)
    assert encoder_cost(dense, 1344).tflops == pytest.approx(25.1, abs=0.06)
    assert encoder_cost(local, 1344).tflops == pytest.approx(13.3, abs=0.06)
    assert encoder_cost(pruned, 1344).tflops == pytest.approx(6.5, abs=0.06)
    assert encoder_cost(dense, 3430).tflops == pytest.approx(613, abs=0.6)
    assert encoder_cost(local, 3430).tflops == pytest.approx(86.7, abs=0.06)
    assert encoder_cost(pruned, 3430).tflops == pytest.approx(42.4, abs=0.06)
    assert encoder_cost(dense, 1400).tflops == pytest.approx(28.4, abs=0.06)
    assert encoder_cost(local, 1400).tflops == pytest.approx(14.4, abs=0.06)
    assert encoder_cost(pruned, 1400).tflops == pytest.approx(7.1, abs=0.06)
    assert encoder_cost(dense, 3430).tokens == 60_025


def test_cost_model_costs_the_selected_kernel():
    """The transient attention memory is the buffers of the kernel select_kernel runs on that device."""
    with torch.device("meta"):
        local = hirespath.create_encoder("uni2_h", attention="sparse", window=8)
        gather = hirespath.create_encoder("uni2_h", attention="sparse", window=8, sparse_backend="gather")
    N, L, D = 96 * 96, 96 * 96 + 9, 1536
    flex_bytes = 4 * N * D * 2  # CUDA inference, 144 blocks: flex's q, k, v and output slots
    gather_bytes = lambda keys: (L * D + 2 * keys * D) * 2  # noqa: E731  output rows + one chunk of K and V
    assert encoder_cost(local, 1344, device="cuda").attn_memory_gb * 1e9 == pytest.approx(flex_bytes)
    assert encoder_cost(local, 1344, device="cpu").attn_memory_gb * 1e9 == pytest.approx(gather_bytes(1 << 13))
    # a CUDA chunk (1 << 18 keys) would hold more than the 9·L keys of all neighbourhoods: 9·L bounds it
    assert encoder_cost(gather, 1344, device="cuda").attn_memory_gb * 1e9 == pytest.approx(gather_bytes(9 * L))
    # FLOPs do not depend on the kernel
    assert encoder_cost(local, 1344, device="cuda").tflops == encoder_cost(gather, 1344, device="cpu").tflops


def test_padding_ratio_column(monkeypatch):
    """padded / real attention work per row: 1 for dense, the gather kernel's chunk plans for sparse on CPU (just
    above 1 after pruning), flex's BlockMask tiles where it runs (half-window tiles after pruning: ~1.5 over the
    forward, where whole-window ones were ~3.6)."""
    with torch.device("meta"):
        pruned = hirespath.create_encoder("uni2_h", attention="sparse", window=8, prune_ratio=0.6, prune_layer=4)
        dense = hirespath.create_encoder("uni2_h", attention="dense")
    assert padding_ratio(dense, 1792, device="cpu") == 1.0
    for res in (1792, 3430):
        assert 1.0 < padding_ratio(pruned, res, device="cpu") < 1.15
    assert 1.2 < padding_ratio(pruned, 1792, device="cuda") < 1.6  # 256 blocks: flex on CUDA
    with torch.device("meta"):
        gather = hirespath.create_encoder(
            "uni2_h", attention="sparse", window=8, prune_ratio=0.6, prune_layer=4, sparse_backend="gather"
        )
    # CUDA gather chunks are larger and their keys aligned to 8: padded a little more than on CPU
    assert padding_ratio(pruned, 1792, device="cpu") < padding_ratio(gather, 1792, device="cuda") < 1.15
    with torch.device("meta"):
        varlen = hirespath.create_encoder(
            "uni2_h", attention="sparse", window=8, prune_ratio=0.6, prune_layer=4, sparse_backend="varlen"
        )
    assert padding_ratio(varlen, 1792, device="cpu") == padding_ratio(gather, 1792, device="cpu")  # gather ran
    monkeypatch.setitem(attention._VARLEN, "cuda", lambda *a: None)  # a PyTorch with varlen_attn
    assert padding_ratio(varlen, 1792, device="cuda") == 1.0  # ragged blocks, nothing padded
    assert padding_ratio(varlen, 1792, device="cuda", dtype=torch.bfloat16) == 1.0
    # fp32 queries: flash attention cannot take them and the varlen kernel runs gather; the column says so
    fp32 = padding_ratio(varlen, 1792, device="cuda", dtype=torch.float32)
    assert fp32 == padding_ratio(gather, 1792, device="cuda", dtype=torch.float32) > 1.0
    assert inference_kernel(varlen, (128, 128), "cuda", torch.float32) == "sparse[gather]"
    assert encoder_cost(varlen, 1792, 4, "cuda", torch.float32) == encoder_cost(gather, 1792, 4, "cuda")
    bench = bm.Benchmark("tiny", overrides={"depth": 2}, cpu_memory=False)
    row = bench.row(bm.BenchConfig(prune_ratio=0.5, prune_layer=1), 448)[1]
    assert 1.0 < row["padding_ratio"] < 1.15 and "padding_ratio" in bm.COLUMNS


def test_sparse_backend_column_is_the_selected_kernel():
    bench = bm.Benchmark("tiny", overrides={"depth": 1}, cpu_memory=False)
    column = lambda res, **kw: bench.row(bm.BenchConfig(**kw), res)[1]["sparse_backend"]  # noqa: E731
    assert column(448, attention="dense") == ""
    assert column(448) == "auto:gather"  # CPU
    assert column(448, sparse_backend="gather") == "gather"
    assert column(448, sparse_backend="flex") == "flex"  # inference: flex runs (uncompiled) on CPU too
    assert column(448, sparse_backend="varlen") == "varlen:gather"  # flash attention: CUDA only
    assert column(112) == "auto:dense"  # one 8×8 window covers the 8×8 grid
    assert column(112, sparse_backend="gather") == "gather:dense"
    assert column(224) == "auto:dense"  # 2 × 2 windows of 8 on the 16 × 16 grid: each sees all four
    bench.device = torch.device("cuda")  # the column only asks select_kernel; nothing runs on the device
    assert bench.kernel_column(bm.wrap_encoder(bench.vit, bench.preset, bm.BenchConfig()), 448) == "auto:flex"
    # the plot and the summary group rows by the backend asked for
    assert [asked_backend(c) for c in ("", float("nan"), "auto:dense", "gather:dense", "flex")] == [
        "auto",
        "auto",
        "auto",
        "gather",
        "flex",
    ]


def test_backend_of_the_attention_group_is_used_and_labels_are_distinct():
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("benchmark", overrides=["attention.sparse_backend=gather"])
    assert [c.sparse_backend for c in bm.configs_from(cfg)] == ["gather"]
    labels = {
        bm.BenchConfig(radius=1).label,
        bm.BenchConfig(radius=2).label,
        bm.BenchConfig(prune_ratio=0.6).label,
        bm.BenchConfig(prune_ratio=0.6, prune_score_tokens="all").label,
    }
    assert len(labels) == 4


def test_experiment_configs_compose():
    for exp in ("table1_cost", "cpu_speed", "cpu_load"):
        with initialize_config_dir(CONF, version_base="1.3"):
            cfg = compose("benchmark", overrides=[f"experiment={exp}"])
        configs = bm.configs_from(cfg)
        assert len(configs) >= 3
        if exp == "table1_cost":
            assert 3430 in cfg.resolutions
        if exp == "cpu_load":  # under one busy process, each configuration as CPU tasks and op-parallel
            assert cfg.busy_processes == 1 and {c.cpu_parallel for c in configs} == {"auto", "tasks", "ops"}


def test_embedding_benchmark_runs_its_configurations_in_rounds(tmp_path, monkeypatch):
    """slides.repeats=3: the encoder alone, then the slide end to end, one run of each configuration per round
    (warm-ups first); the median times reported; a repeats below 1 is refused before any model is built."""
    from hirespath.benchmark import slide_throughput as st

    encoder_calls, slide_calls = [], []
    encoder_seconds = {112: iter([5.0, 1.0, 3.0]), 448: iter([2.0, 6.0, 4.0])}
    real_encoder, real_embed = st._encoder_only_seconds, st.embed_slides

    def encoder_only(tile_encoder, images, batch_size):
        real_encoder(tile_encoder, images, batch_size)
        size = images.shape[-1]
        encoder_calls.append((size, len(images) <= batch_size))  # (tile size, warm-up)
        return 1.0 if len(images) <= batch_size else next(encoder_seconds[size])

    def embed(encoder, slides, job, tiling, *args, **kwargs):
        slide_calls.append(tiling.size)
        return real_embed(encoder, slides, job, tiling, *args, **kwargs)

    monkeypatch.setattr(st, "_encoder_only_seconds", encoder_only)
    monkeypatch.setattr(st, "embed_slides", embed)
    overrides = ["mode=slides", "backbone=tiny", "+backbone.overrides.depth=1", "device=cpu", "embed.num_workers=0",
                 "slides.synthetic_side=896", "tile.size=448", "embed.batch_size=2", "slides.repeats=3",
                 "slides.compare=[{tile_size: 112, attention: dense, prune_ratio: 0.0},"
                 "{attention: dense, prune_ratio: 0.0}]"]  # fmt: skip
    run_benchmark(_cfg(tmp_path, overrides))
    df = pd.read_csv(tmp_path / "embedding_benchmark.csv")
    assert encoder_calls == [(112, True), (448, True)] + [(112, False), (448, False)] * 3
    assert slide_calls == [112, 448] * 3
    assert list(df.seconds_encoder) == [3.0, 4.0] and list(df.repeats) == [3, 3]
    encoder_calls.clear()
    for bad in ("0", "2.5", "two"):
        with pytest.raises(ValueError, match=r"slides.repeats=.*: must be a whole number, at least 1"):
            run_benchmark(_cfg(tmp_path, [*overrides, f"slides.repeats={bad}"]))
    assert encoder_calls == []


def test_embedding_benchmark_keeps_the_configurations_that_ran(tmp_path, monkeypatch, caplog):
    """A configuration failing end to end (the last step of the GPU script) is logged and its row says so; the others
    are measured, written and drawn, then the task fails naming it."""
    import hirespath.benchmark.slide_throughput as st

    real_embed = st.embed_slides

    def embed(encoder, slides, job, tiling, *args, **kwargs):
        if tiling.size == 448:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_embed(encoder, slides, job, tiling, *args, **kwargs)

    monkeypatch.setattr(st, "embed_slides", embed)
    overrides = ["mode=slides", "backbone=tiny", "+backbone.overrides.depth=1", "device=cpu", "embed.num_workers=0",
                 "slides.synthetic_side=896", "tile.size=448", "embed.batch_size=2", "slides.repeats=2",
                 "slides.compare=[{tile_size: 112, attention: dense, prune_ratio: 0.0},"
                 "{attention: dense, prune_ratio: 0.0}]"]  # fmt: skip
    with pytest.raises(RuntimeError, match=r"embedding benchmark: 1 configuration\(s\) failed \(448 px, dense.*: "
                                           r"RuntimeError: CUDA error: an illegal memory access"):  # fmt: skip
        run_benchmark(_cfg(tmp_path, overrides))
    df = pd.read_csv(tmp_path / "embedding_benchmark.csv")
    assert list(df.status) == ["ok", "error"] and df.seconds_end_to_end[0] > 0 and math.isnan(df.seconds_end_to_end[1])
    assert (tmp_path / "embedding_benchmark.png").stat().st_size > 0
    assert sum("failed: RuntimeError: CUDA error" in r.message for r in caplog.records) == 1  # left the rounds


def test_embedding_benchmark_measures_tissue_throughput(tmp_path):
    """mode=slides (experiment embed_speed's shape): 224-style small dense tiles vs large dense vs large sparse +
    pruned tiles of one generated slide, same weights; CSV, plot, ratios against the first configuration."""
    cfg = _cfg(
        tmp_path,
        [
            "mode=slides",
            "backbone=tiny",
            "+backbone.overrides.depth=2",
            "pruner.prune_layer=1",
            "device=cpu",
            "slides.synthetic_side=1024",
            "tile.size=448",
            "embed.num_workers=0",
            "slides.compare=[{tile_size: 112, attention: dense, prune_ratio: 0.0},{attention: dense, prune_ratio: 0.0},"
            "{attention: sparse, window: 4, prune_ratio: 0.6, prune_layer: 1}]",
        ],
    )
    result = run_benchmark(cfg)
    df = pd.read_csv(tmp_path / "embedding_benchmark.csv")
    assert list(df.tile_size) == [112, 448, 448] and list(df.attention) == ["dense", "dense", "sparse"]
    assert df.tissue_mm2.nunique() == 1 and (df.tissue_mm2 > 0).all()  # the same slide's tissue for every row
    assert df.tiles[0] > df.tiles[1] == df.tiles[2]
    assert (df.seconds_end_to_end > 0).all() and (df.seconds_encoder > 0).all()
    assert df.speedup_end_to_end[0] == 1.0 and df.speedup_flops[0] == 1.0
    assert df.speedup_flops[2] > df.speedup_flops[1]  # sparse + pruning: fewer FLOPs per mm² than dense
    assert (tmp_path / "embedding_benchmark.png").stat().st_size > 0 and "x e2e" in result["summary"]
    with pytest.raises(ValueError, match="unknown keys"):
        embed_configs_from(OmegaConf.merge(cfg, {"slides": {"compare": [{"tile": 5}]}}))
    # reader and CPU execution are per-entry keys too (experiment=embed_readers)
    readers = embed_configs_from(
        OmegaConf.merge(
            cfg, {"slides": {"compare": [{"reader": "workers"}, {"reader": "threads", "cpu_parallel": "ops"}]}}
        )
    )
    assert [c.reader for c in readers] == ["workers", "threads"] and readers[1].cpu_parallel == "ops"
    assert readers[0].label.endswith("[workers reader]") and "[ops]" in readers[1].label


def test_cpu_parallel_is_a_compare_key(tmp_path):
    """experiment=cpu_load's shape: the same configuration as CPU tasks and op-parallel, one CSV line each."""
    cfg = _cfg(tmp_path, ["backbone=tiny", "resolutions=[112]", "repeats=1", "warmup=0", "cpu_memory=false",
                          "threads=2", "compare=[{attention: sparse, window: 2},"
                          "{attention: sparse, window: 2, cpu_parallel: ops}]"])  # fmt: skip
    result = run_benchmark(cfg)
    df = pd.read_csv(tmp_path / "benchmark.csv")
    assert list(df.cpu_parallel) == ["auto", "ops"] and (df.seconds_per_image > 0).all()
    assert "sparse w=2 + prune 0.6@4 [ops]" in result["summary"]
    assert bm.BenchConfig.of_row(df.iloc[1]).cpu_parallel == "ops"
    old_row = df.iloc[0].drop("cpu_parallel")  # a CSV written before the column existed
    assert bm.BenchConfig.of_row(old_row).cpu_parallel == "auto"


def test_benchmark_under_load_uses_the_cores_left(tmp_path):
    """busy_processes spin beside the sweep (a tile reader's load); the encoder gets the cores they leave."""
    import multiprocessing as mp

    from hirespath.utils.threads import available_cores

    cfg = _cfg(tmp_path, ["backbone=tiny", "resolutions=[56]", "repeats=1", "warmup=0", "cpu_memory=false",
                          "busy_processes=1"])  # fmt: skip
    before = torch.get_num_threads()
    run_benchmark(cfg)
    df = pd.read_csv(tmp_path / "benchmark.csv")
    assert (df.busy_processes == 1).all() and (df.threads == max(1, available_cores() - 1)).all()
    assert torch.get_num_threads() == before and not mp.active_children()


def test_one_out_of_memory_test_for_benchmark_and_embedding():
    from hirespath.utils.memory import is_oom

    assert is_oom(MemoryError()) and is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) and not is_oom(ValueError("x"))


def test_a_sweep_with_every_point_out_of_memory_still_plots(tmp_path):
    """An oom row keeps the peak it reached, but nothing of it is drawn: the plot's log axis came from those values
    and matplotlib refused it ("cannot be log-scaled"), ending the run without its plot or W&B upload."""
    from hirespath.benchmark.plots import plot
    from hirespath.benchmark.spec import COLUMNS

    row = dict.fromkeys(COLUMNS)
    row.update(backbone="tiny", attention="eager", window=8, prune_ratio=0.0, prune_layer=1, dtype="fp32",
               device="cpu", resolution=56, tokens=16, seconds_per_image=float("nan"), peak_memory_gb=0.0147,
               status="oom", sparse_backend="", cpu_parallel="auto")  # fmt: skip
    plot([row], tmp_path / "benchmark.png")
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"


def test_a_max_resolution_probe_that_fails_ends_that_search_and_keeps_the_rest(tmp_path, monkeypatch):
    """A probe failing other than out of memory ended the whole task at once: no max_resolution.csv, no probes, no
    W&B, the other configurations never searched. Now that search stops (status error), the others run, every file
    is written, and the run fails at its end naming it."""
    cfg = _cfg(tmp_path, ["backbone=tiny", "+backbone.overrides.depth=1", "resolutions=[56]", "repeats=1", "warmup=0",
                          "cpu_memory=false", "compare=[{attention: dense, prune_ratio: 0.0}]",
                          "max_resolution.enabled=true", "max_resolution.start=56", "max_resolution.limit=224",
                          "max_resolution.memory_budget_gb=1",
                          "max_resolution.compare=[{attention: eager, prune_ratio: 0.0},"
                          "{attention: dense, prune_ratio: 0.0}]"])  # fmt: skip
    real = bm.Benchmark.measure

    def measure(self, c, res, timed=True):
        row = real(self, c, res, timed=timed)
        if c.attention == "eager" and res > 56:
            row.update(status="error", seconds_per_image=float("nan"))
        return row

    monkeypatch.setattr(bm.Benchmark, "measure", measure)
    with pytest.raises(RuntimeError, match=r"max-resolution search of eager.* at 112 px failed other than out of"):
        run_benchmark(cfg)
    found = pd.read_csv(tmp_path / "max_resolution.csv")
    assert list(found.status) == ["error", "ok"] and math.isnan(found.max_resolution[0])
    assert found.max_resolution[1] == 224  # the dense search ran to its limit
    probes = pd.read_csv(tmp_path / "max_resolution_probes.csv")
    assert "error" in set(probes.status) and probes.threads.notna().all() and (probes.busy_processes == 0).all()


def test_benchmark_counts_and_budgets_are_checked_before_any_work(tmp_path):
    from hirespath.configs import ConfigValidationError, validate_config

    for override, message in (("repeats=0", r"repeats=0: must be a whole number >= 1"),
                              ("warmup=-1", r"warmup=-1: must be a whole number >= 0"),
                              ("batch_size=0", r"batch_size=0: must be a whole number >= 1"),
                              ("memory_budget_gb=0", r"memory_budget_gb=0: must be a number of GB > 0, or null"),
                              ("max_resolution.memory_budget_gb=-1", r"max_resolution.memory_budget_gb=-1: must be"),
                              ("max_resolution.limit=10", r"max_resolution.limit=10: must be a side in px >= the "
                                                          r"patch size \(14\)")):  # fmt: skip
        with pytest.raises(ConfigValidationError, match=message):
            validate_config(_cfg(tmp_path, ["backbone=tiny", override]), "benchmark")
    validate_config(_cfg(tmp_path, ["backbone=tiny", "warmup=0", "memory_budget_gb=null"]), "benchmark")


def test_the_cpu_memory_worker_runs_bf16_as_the_timing_does(monkeypatch):
    """On CPU, dtype=bf16 is timed with fp32 weights under autocast; the memory worker had cast the weights to bf16
    and run without autocast: its peak described another program."""
    from hirespath.benchmark import memory_worker

    seen = {}
    real = memory_worker.wrap_encoder

    def wrap(*args, **kwargs):
        enc = real(*args, **kwargs)
        enc.register_forward_pre_hook(
            lambda m, inp: seen.update(
                weights=next(m.parameters()).dtype, images=inp[0].dtype, autocast=torch.is_autocast_enabled("cpu")
            )
        )
        return enc

    monkeypatch.setattr(memory_worker, "wrap_encoder", wrap)
    bench = bm.Benchmark("tiny", overrides={"depth": 1}, dtype="bf16", repeats=1, warmup=0)
    assert memory_worker.cpu_memory_worker(bench._worker_spec(bm.BenchConfig(), 56))["status"] == "ok"
    assert seen == {"weights": torch.float32, "images": torch.float32, "autocast": True}

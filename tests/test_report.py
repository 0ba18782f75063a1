"""tasks/report.py on fake multirun directories laid out exactly as Hydra writes them."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from hirespath.report.tables import build_report, collect, job_info, method_label, pareto_front

ROOT = Path(__file__).resolve().parents[1]


def _job(
    sweep: Path,
    num: int,
    task: str,
    overrides: dict,
    metrics: dict | None = None,
    bench: list | None = None,
    legacy: bool = False,
):
    """One Hydra multirun job: <sweep>/<num>/.hydra/{config,hydra,overrides}.yaml + the task's outputs.

    Overrides name the pruning ratio ``pruner.prune_ratio``; ``legacy``: the job was made before the config keys
    became create_encoder's names (``pruner.ratio``/``layer``/``score_tokens``, ``attention.backend``)."""
    job = sweep / str(num)
    ratio = overrides.get("pruner.prune_ratio", 0.0)
    if legacy:
        overrides = {("pruner.ratio" if k == "pruner.prune_ratio" else k): v for k, v in overrides.items()}
        pruner = {"ratio": ratio, "layer": 4, "score_tokens": "cls"}
        attention_extra = {"backend": "auto"}
    else:
        pruner = {"prune_ratio": ratio, "prune_layer": 4, "prune_score_tokens": "cls"}
        attention_extra = {"sparse_backend": "auto"}
    cfg = {
        "task_name": task,
        "tags": [task],
        "seed": 42,
        "run_name": "${backbone.name}-${attention.mode}-w${attention.window}-p${pruner."
        + ("ratio" if legacy else "prune_ratio")
        + "}",
        "resolution": overrides.get("resolution", 224),
        "backbone": {"name": "tiny", "weights": None, "overrides": {"init_values": 1.0}},
        "attention": {
            "mode": overrides.get("attention", "sparse"),
            "window": overrides.get("attention.window", 8),
            "radius": 1,
            **attention_extra,
        },
        "pruner": pruner,
        "head": {"name": overrides.get("head", "linear_probe")},
        "paths": {"root_dir": "${hydra:runtime.cwd}", "output_dir": "${hydra:runtime.output_dir}"},
    }
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), job / ".hydra" / "config.yaml")
    OmegaConf.save(
        OmegaConf.create({"hydra": {"mode": "MULTIRUN", "job": {"num": num}}}), job / ".hydra" / "hydra.yaml"
    )
    OmegaConf.save(OmegaConf.create([f"{k}={v}" for k, v in overrides.items()]), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if bench is not None:
        pd.DataFrame(bench).to_csv(job / "benchmark.csv", index=False)
    return job


def _cls_metrics(acc, head="linear_probe"):
    return {
        "test/accuracy": acc,
        "test/balanced_accuracy": acc - 0.05,
        "test/f1_weighted": acc - 0.01,
        "test/auroc": acc + 0.3,
        "test/kappa": acc - 0.2,
        "test/num_slides": 10,
    }


def _bench_row(attention, ratio, res, secs, mem, status="ok", window=8):
    return {
        "backbone": "tiny",
        "attention": attention,
        "window": window,
        "prune_ratio": ratio,
        "prune_layer": 4,
        "dtype": "fp32",
        "device": "cpu",
        "resolution": res,
        "tokens": (res // 14) ** 2,
        "seconds_per_image": secs,
        "peak_memory_gb": mem,
        "status": status,
    }


@pytest.fixture
def grid(tmp_path):
    """classify multirun: resolution × {vanilla, ours} × {linear_probe, knn}; a table2 sweep; a benchmark; segment."""
    cls = tmp_path / "classify" / "multiruns" / "2026-01-01_10-00-00"
    cls.mkdir(parents=True)
    (cls / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    n = 0
    accs = {(224, "vanilla"): 0.44, (224, "ours"): 0.45, (448, "vanilla"): 0.48, (448, "ours"): 0.50}
    for (res, method), acc in accs.items():
        ov = {
            "resolution": res,
            "attention": "eager" if method == "vanilla" else "sparse",
            "pruner.prune_ratio": 0.0 if method == "vanilla" else 0.6,
        }
        for head, delta in (("linear_probe", 0.0), ("knn", -0.1)):
            _job(cls, n, "classify", {**ov, "head": head}, _cls_metrics(acc + delta))
            n += 1
    for ratio, acc in ((0.4, 0.47), (0.8, 0.46)):  # table 2 at the largest resolution, run before the key rename
        ov = {"resolution": 448, "attention": "sparse", "pruner.prune_ratio": ratio}
        _job(cls, n, "classify", ov, _cls_metrics(acc), legacy=True)
        n += 1
    for window, acc in ((2, 0.49), (16, 0.51)):  # table 3
        _job(
            cls,
            n,
            "classify",
            {"resolution": 448, "attention": "sparse", "attention.window": window, "pruner.prune_ratio": 0.6},
            _cls_metrics(acc),
        )
        n += 1
    bench = tmp_path / "benchmark" / "multiruns" / "2026-01-01_09-00-00"
    _job(
        bench,
        0,
        "benchmark",
        {"attention": "eager"},
        bench=[
            _bench_row("eager", 0.0, 224, 0.5, 1.5),
            _bench_row("eager", 0.0, 448, 2.0, 6.0),
            _bench_row("eager", 0.0, 896, float("nan"), float("nan"), "oom"),
        ],
    )
    _job(
        bench,
        1,
        "benchmark",
        {"attention": "sparse", "pruner.prune_ratio": 0.6},
        bench=[
            _bench_row("sparse", 0.6, 224, 0.4, 1.0),
            _bench_row("sparse", 0.6, 448, 1.0, 2.0),
            _bench_row("sparse", 0.6, 896, 3.0, 4.0),
        ],
    )
    seg = tmp_path / "segment" / "multiruns" / "2026-01-01_11-00-00"
    for i, (att, res, w, mpa) in enumerate(
        [
            ("eager", 112, 8, 0.63),
            ("sparse", 112, 8, 0.64),
            ("sparse", 224, 8, 0.66),
            ("sparse", 224, 2, 0.60),
            ("dense", 224, 8, 0.72),
        ]
    ):
        metrics = {"test/mpa": mpa, "test/iou": mpa - 0.1, "test/dice": mpa - 0.05, "test/cpa/Epithelium": mpa}
        if (att, res) != ("sparse", 224):  # the segment task may not log memory: then the benchmark's is used
            metrics["test/peak_memory_gb"] = res / 100
        _job(seg, i, "segment", {"resolution": res, "attention": att, "attention.window": w}, metrics)
    _job(
        bench,
        2,
        "benchmark",
        {"attention": "sparse", "pruner": "none"},
        bench=[_bench_row("sparse", 0.0, 224, 0.6, 3.33), _bench_row("sparse", 0.0, 224, 0.6, 9.0, window=2)],
    )
    # A broken job: unreadable metrics.json → skipped with a warning, the report goes on.
    bad = _job(seg, 9, "segment", {"resolution": 224})
    (bad / "metrics.json").write_text("{not json")
    return [cls, bench, seg]


def test_method_label():
    assert method_label("eager", 0.0) == "vanilla"
    assert method_label("dense", 0) == "vanilla"
    assert method_label("sparse", 0.6) == "ours"
    assert method_label("sparse", 0.0) == "sparse"
    assert method_label("sparse", 0.0, "segment") == "ours"
    assert method_label("dense", 0.5) == "dense+p0.5"


def test_job_info_reads_current_and_pre_rename_keys(tmp_path):
    """Runs made before the pruner keys became create_encoder's names (pruner.ratio, pruner.layer) still report."""
    new = _job(tmp_path / "new", 0, "classify", {"pruner.prune_ratio": 0.5})
    old = _job(tmp_path / "old", 0, "classify", {"pruner.prune_ratio": 0.5}, legacy=True)
    assert "pruner.ratio=0.5" in (old / ".hydra" / "overrides.yaml").read_text()
    for job in (new, old):
        info = job_info(job)
        assert info["prune_ratio"] == 0.5 and info["prune_layer"] == 4, (job, info)


def test_pareto_front():
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.6), (4, 0.6), (0.5, 0.3)]) == [(0.5, 0.3), (1, 0.5), (3, 0.6)]


def test_collect_reads_hydra_config(grid):
    with pytest.warns(UserWarning, match="metrics.json"):
        col = collect(grid)
    assert len(col.runs) == 8 + 2 + 2 + 5
    assert len(col.bench) == 8
    assert len(col.skipped) == 1 and "JSONDecodeError" in col.skipped[0][1]
    r = col.runs[(col.runs.resolution == 448) & (col.runs.method == "ours") & (col.runs["head"] == "knn")]
    assert len(r) == 1 and r["test/accuracy"].item() == pytest.approx(0.40)
    assert set(col.runs[col.runs.task == "segment"].method) == {"vanilla", "ours"}


def test_tables_and_figure(grid, tmp_path):
    out = tmp_path / "report"
    with pytest.warns(UserWarning):
        res = build_report(grid, out)
    t1 = pd.read_csv(out / "table1.csv")
    # 224/448 × vanilla/ours from classify, plus 896 from the benchmark only (vanilla OOM, ours measured).
    assert list(zip(t1.resolution, t1.method)) == [
        (224, "vanilla"),
        (224, "ours"),
        (448, "vanilla"),
        (448, "ours"),
        (896, "vanilla"),
        (896, "ours"),
    ]
    row = t1[(t1.resolution == 448) & (t1.method == "ours")].iloc[0]
    assert (
        row.lp_acc == pytest.approx(0.50) and row.lp_f1 == pytest.approx(0.49) and row.lp_auroc == pytest.approx(0.80)
    )
    assert row.knn_acc == pytest.approx(0.40) and row.knn_bal_acc == pytest.approx(0.35)
    assert row.seconds_per_image == pytest.approx(1.0) and row.peak_memory_gb == pytest.approx(2.0)
    van = t1[(t1.resolution == 448) & (t1.method == "vanilla")].iloc[0]
    assert van.attention == "eager" and van.peak_memory_gb == pytest.approx(6.0)
    oom = t1[(t1.resolution == 896) & (t1.method == "vanilla")].iloc[0]
    assert oom.bench_status == "oom" and pd.isna(oom.lp_acc)

    t2 = pd.read_csv(out / "table2.csv")
    assert list(t2.prune_ratio) == [0.4, 0.6, 0.8] and set(t2.resolution) == {448}
    assert list(t2.lp_acc.round(3)) == [0.47, 0.50, 0.46]
    t3 = pd.read_csv(out / "table3.csv")
    assert list(t3.window) == [2, 8, 16] and list(t3.lp_acc.round(3)) == [0.49, 0.50, 0.51]

    t4 = pd.read_csv(out / "table4.csv")
    assert list(zip(t4.resolution, t4.method, t4.attention)) == [
        (112, "vanilla", "eager"),
        (112, "ours", "sparse"),
        (224, "vanilla", "dense"),
        (224, "ours", "sparse"),
    ]
    assert t4.mpa.round(3).tolist() == [0.63, 0.64, 0.72, 0.66]
    assert t4.peak_memory_gb.round(2).tolist() == [1.12, 1.12, 2.24, 3.33]
    t5 = pd.read_csv(out / "table5.csv")
    assert list(t5.window) == [2, 8] and t5.dice.round(3).tolist() == [0.55, 0.61]

    md = (out / "report.md").read_text()
    assert "Table 1" in md and "| backbone | resolution | method |" in md and "figure1.png" in md
    assert (out / "table1.md").read_text().count("\n") == 2 + 6
    png = out / "figure1.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "JSONDecodeError" in (out / "skipped.csv").read_text()
    assert res["figure"] == str(png)


def test_report_cli(grid, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tasks" / "report.py"), *map(str, grid), f"output_dir={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": f"{ROOT / 'src'}"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "table1.csv").is_file() and (out / "figure1.png").is_file()


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        collect([tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="no metrics.json or benchmark.csv"):
        build_report([tmp_path], tmp_path / "out")


def test_vanilla_cost_is_eager_and_failed_jobs_are_listed(tmp_path):
    """`method=vanilla` accuracy runs use dense SDPA; Table 1's cost column is still eager's (the paper's vanilla)
    when the benchmark measured it. A job that died before writing metrics.json is listed, not silently absent."""
    cls, bench = tmp_path / "classify", tmp_path / "benchmark"
    _job(cls, 0, "classify", {"resolution": 448, "attention": "dense", "head": "knn"}, _cls_metrics(0.3, "knn"))
    _job(cls, 1, "classify", {"resolution": 896, "attention": "dense", "head": "knn"}, _cls_metrics(0.4, "knn"))
    _job(cls, 2, "classify", {"resolution": 1344, "attention": "dense", "head": "knn"})  # killed: no metrics.json
    _job(
        bench,
        0,
        "benchmark",
        {"attention": "eager"},
        bench=[
            _bench_row("eager", 0.0, 448, 2.0, 6.0),
            _bench_row("eager", 0.0, 896, float("nan"), float("nan"), "oom"),
        ],
    )
    _job(
        bench,
        1,
        "benchmark",
        {"attention": "dense"},
        bench=[_bench_row("dense", 0.0, 448, 0.25, 1.2), _bench_row("dense", 0.0, 896, 0.9, 1.9)],
    )
    with pytest.warns(UserWarning):
        col = collect([cls, bench])
    assert [Path(p).name for p, reason in col.skipped if "without metrics.json" in reason] == ["2"]
    with pytest.warns(UserWarning):
        build_report([cls, bench], tmp_path / "report")
    t1 = pd.read_csv(tmp_path / "report" / "table1.csv").set_index("resolution")
    assert t1.seconds_per_image[448] == pytest.approx(2.0) and t1.peak_memory_gb[448] == pytest.approx(6.0)
    assert t1.bench_status[896] == "oom"  # eager ran out of memory; dense's 0.9 s is not vanilla's cost


def test_ours_cost_is_the_default_kernels_on_the_runs_architecture(tmp_path):
    """Table 1's cost of "ours" came from the last matching benchmark row: table1_cost's forced-gather comparison
    entry (not the default kernel the accuracy runs used), or a narrowed model's row from a cpu_speed run passed
    beside it. Now: the default kernel's row on the runs' architecture; the narrowed model gets its own rows."""
    cls, bench = tmp_path / "classify", tmp_path / "benchmark"
    _job(cls, 0, "classify", {"resolution": 448, "attention": "sparse", "pruner.prune_ratio": 0.6},
         _cls_metrics(0.5))  # fmt: skip
    tiny = "init_values=1.0"  # the tiny preset's own override, in the runs and the benchmark alike
    ours = [
        {**_bench_row("sparse", 0.6, 448, 1.0, 2.0), "backbone_overrides": tiny, "sparse_backend": "auto:gather"},
        {**_bench_row("sparse", 0.6, 448, 9.0, 2.5), "backbone_overrides": tiny, "sparse_backend": "gather"},
    ]
    _job(bench, 0, "benchmark", {"attention": "sparse", "pruner.prune_ratio": 0.6}, bench=ours)
    narrowed = f"depth=12,embed_dim=384,{tiny},num_heads=6"
    _job(bench, 1, "benchmark", {"attention": "sparse", "pruner.prune_ratio": 0.6},
         bench=[{**_bench_row("sparse", 0.6, 448, 5.0, 0.5), "backbone_overrides": narrowed,
                 "sparse_backend": "auto:gather"}])  # fmt: skip
    build_report([cls, bench], tmp_path / "report")
    t1 = pd.read_csv(tmp_path / "report" / "table1.csv").set_index("backbone_overrides")
    assert sorted(t1.index) == sorted([tiny, narrowed])
    assert t1.seconds_per_image[tiny] == pytest.approx(1.0) and t1.lp_acc[tiny] == pytest.approx(0.5)
    assert t1.seconds_per_image[narrowed] == pytest.approx(5.0) and pd.isna(t1.lp_acc[narrowed])  # measured only


def test_a_preset_without_overrides_keeps_its_rows_beside_a_narrowed_one_and_an_old_csv(tmp_path):
    """The preset's "" (no overrides) reads back from benchmark.csv as NaN, which was taken for a file from before
    the column: Table 1 doubled its rows and costed them from the narrowed model's. A file from before the column
    adds no row where the runs have one."""
    from hirespath.benchmark.measure import write_csv
    from hirespath.benchmark.spec import COLUMNS

    cls, bench = tmp_path / "classify", tmp_path / "benchmark"
    for i, (att, ratio, acc) in enumerate((("eager", 0.0, 0.4), ("sparse", 0.6, 0.5))):
        job = _job(cls, i, "classify", {"resolution": 448, "attention": att, "pruner.prune_ratio": ratio},
                   _cls_metrics(acc))  # fmt: skip
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        cfg.backbone.overrides = {}  # UNI2-h as it ships
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")

    def rows(arch, eager, ours):
        return [{**dict.fromkeys(COLUMNS), **_bench_row("eager", 0.0, 448, *eager), "backbone_overrides": arch},
                {**dict.fromkeys(COLUMNS), **_bench_row("sparse", 0.6, 448, *ours), "backbone_overrides": arch,
                 "sparse_backend": "auto:gather"}]  # fmt: skip

    narrowed = "depth=12,embed_dim=384,num_heads=6"
    for i, arch, eager, ours in ((0, "", (3.0, 4.0), (1.0, 2.0)), (1, narrowed, (30.0, 0.4), (5.0, 0.5))):
        write_csv(rows(arch, eager, ours), _job(bench, i, "benchmark", {"attention": "sparse"}) / "benchmark.csv")
    old = pd.DataFrame(rows("", (7.0, 7.0), (7.0, 7.0))).drop(columns=["backbone_overrides"])
    old.to_csv(_job(bench, 2, "benchmark", {"attention": "sparse"}) / "benchmark.csv", index=False)
    build_report([cls, bench], tmp_path / "report")
    t1 = pd.read_csv(tmp_path / "report" / "table1.csv").fillna({"backbone_overrides": ""})
    got = [(a, m, acc if acc == acc else None, s) for a, m, acc, s in
           zip(t1.backbone_overrides, t1.method, t1.lp_acc, t1.seconds_per_image)]  # fmt: skip
    assert got == [("", "vanilla", 0.4, 3.0), ("", "ours", 0.5, 1.0), (narrowed, "vanilla", None, 30.0),
                   (narrowed, "ours", None, 5.0)], got  # fmt: skip


def test_report_warns_when_a_cell_averages_different_data(tmp_path):
    cls = tmp_path / "classify"
    for i, root in enumerate(("/data/panda", "/data/panda_synthetic")):
        job = _job(cls, i, "classify", {"resolution": 448, "attention": "dense", "head": "knn"}, _cls_metrics(0.4))
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        cfg.data = {"root": root}
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    with pytest.warns(UserWarning, match=r"knn averages runs at .*resolution.*448.* that differ in data_root"):
        build_report([cls], tmp_path / "report")

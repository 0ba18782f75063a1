"""The mil task end to end (tiny encoder, generated PANDA), the mil_tile_size grid, and the report's MIL table."""

import itertools
import json
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose_task
from omegaconf import OmegaConf
from test_mil import write_trident

from hirespath.data.mil import panda_slide_labels
from hirespath.slides import Ledger
from hirespath.tasks.mil import embed_panda_slides, run_mil

TINY = [
    "backbone=tiny",
    "+backbone.overrides.depth=2",
    "attention.window=4",
    "pruner.prune_layer=1",
    "tile.size=112",
    "tile.min_tissue=0.1",
    "embed.thumbnails=false",
    "embed.num_workers=0",
    "data.num_workers=0",
    "data.max_tiles_train=6",
    "trainer.max_epochs=2",
    "logger=csv",
    "figures.num_slides=2",
    "callbacks.early_stopping.patience=1",
]
HEAD = {"abmil": ["head=abmil", "head.hidden=16", "head.attention_hidden=8"], "mean_pool": ["head=mean_pool"]}


@pytest.fixture(scope="module")
def panda(tmp_path_factory):
    from hirespath.data.panda_synthetic import make_synthetic_panda

    return make_synthetic_panda(tmp_path_factory.mktemp("data") / "panda", num_slides=12, size=(384, 512), seed=2)


def _cfg(tmp_path, name, panda, *overrides):
    return compose_task("mil", [f"data.root={panda}", *TINY, *overrides], tmp_path / name, tmp_path / "cache")


def test_embeds_once_then_trains_both_heads_from_the_cache(tmp_path, panda, one_thread):
    """features_dir=null: the first run embeds the labelled slides (one has no slide file: skipped.csv says so),
    the second run (other head) reuses the cached features without embedding; both write the outputs."""
    labels = panda_slide_labels(panda, cache_dir=tmp_path / "cache")
    gone = labels.slide_id[labels.split == "train"].iloc[0]
    moved = tmp_path / "moved.tiff"
    (panda / "train_images" / f"{gone}.tiff").rename(moved)
    try:
        first = run_mil(_cfg(tmp_path, "abmil", panda, *HEAD["abmil"]))
        feat_dirs = list((tmp_path / "cache" / "slide_embeddings" / "20x_112px_0px_overlap").glob("features_*"))
        assert len(feat_dirs) == 1
        files = {p.name: p.stat().st_mtime_ns for p in feat_dirs[0].glob("*.h5")}
        second = run_mil(_cfg(tmp_path, "mean_pool", panda, *HEAD["mean_pool"]))
    finally:
        moved.rename(panda / "train_images" / f"{gone}.tiff")
    assert first["embed/slides_embedded"] == 11 and len(files) == 11
    assert second["embed/slides_embedded"] == 0  # no embedding work
    assert {p.name: p.stat().st_mtime_ns for p in feat_dirs[0].glob("*.h5")} == files
    cost = Ledger(feat_dirs[0]).timings()  # the features folder's ledger times every slide
    assert sorted(cost.slide) == sorted(f[:-3] for f in files) and (cost.seconds > 0).all()
    for name, m in (("abmil", first), ("mean_pool", second)):
        out = tmp_path / name
        saved = json.loads((out / "metrics.json").read_text())
        for key in ("test/accuracy", "test/balanced_accuracy", "test/f1_weighted", "test/auroc", "test/kappa"):
            low = -1 if key == "test/kappa" else 0
            assert np.isnan(saved[key]) or low <= saved[key] <= 1, (key, saved[key])
        # the cost of the cached embedding is reported by the run that did not embed, too
        assert saved["embed/seconds_per_slide"] == pytest.approx(cost.seconds.mean())
        assert saved["embed/slides_timed"] == 11 and saved["features/dim"] == 96
        pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
        test_ids = labels.slide_id[labels.split == "test"].tolist()
        assert pred.slide_id.tolist() == test_ids and saved["test/num_slides"] == len(test_ids)
        assert sorted(p.stem for p in (out / "attention").glob("*.h5")) == sorted(test_ids)
        assert [p.name for p in sorted((out / "figures").glob("attention_*.png"))] == [
            f"attention_{s}.png" for s in sorted(test_ids[:2])
        ]
        skipped = pd.read_csv(out / "skipped.csv", dtype={"slide_id": str})
        assert skipped.slide_id.tolist() == [gone] and skipped.split.tolist() == ["train"]
        assert skipped.reason[0] == f"not embedded: no slide file {panda / 'train_images' / gone}.tiff"
        assert m["test/kappa"] == saved["test/kappa"]
        assert list((out / "checkpoints").glob("epoch_*.ckpt"))  # the best checkpoint was kept (and tested)


def test_parallel_jobs_of_one_tiling_embed_once(tmp_path, panda, one_thread):
    """Two jobs of the same tiling start together: they share the slides through the per-slide locks (each slide
    embedded once), and each returns only when the folder is complete."""
    cfg = _cfg(tmp_path, "a", panda, *HEAD["abmil"])
    ids = panda_slide_labels(panda, cache_dir=tmp_path / "cache").slide_id.tolist()[:4]
    results = []

    def job():
        results.append(embed_panda_slides(cfg, ids))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0][0] == results[1][0]
    assert sum(info["embed/slides_embedded"] for _, info in results) == 4
    assert len(Ledger(results[0][0]).timings()) == 4 and len(list(results[0][0].glob("*.h5"))) == 4


def _features_dir(tmp_path, ids, dim=8, skip=()):
    d = tmp_path / "trident" / "20x_224px_0px_overlap" / "features_x"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in ids:
        if s not in skip:
            write_trident(d / f"{s}.h5", rng.normal(size=(int(rng.integers(3, 9)), dim)), encoder="x")
    return d


def test_explicit_features_dir(tmp_path, panda, one_thread):
    """TRIDENT-written files: no embedding, no encoder; a labelled slide without a file is listed as skipped."""
    labels = panda_slide_labels(panda, cache_dir=tmp_path / "cache")
    gone = labels.slide_id[labels.split == "val"].iloc[0]
    d = _features_dir(tmp_path, labels.slide_id, skip={gone})
    m = run_mil(_cfg(tmp_path, "run", panda, f"features_dir={d}", "monitor=val/kappa", *HEAD["mean_pool"]))
    assert m["embed/slides_embedded"] == 0 and m["embed/slides_timed"] == 0 and "embed/seconds_per_slide" not in m
    assert m["features/dim"] == 8 and m["test/num_slides"] == (labels.split == "test").sum()
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv", dtype={"slide_id": str})
    assert skipped.slide_id.tolist() == [gone] and skipped.reason[0] == f"no feature file {d}/{gone}.h5"
    assert not (tmp_path / "cache" / "slide_embeddings").exists()
    assert (tmp_path / "run" / "figures").is_dir() and (tmp_path / "run" / "predictions.csv").is_file()


def test_mixed_feature_files_are_refused_before_training(tmp_path, panda):
    labels = panda_slide_labels(panda, cache_dir=tmp_path / "cache")
    ids = labels.slide_id.tolist()
    d = _features_dir(tmp_path, ids[:-1])
    write_trident(d / f"{ids[-1]}.h5", np.zeros((4, 12)), encoder="x")
    with pytest.raises(ValueError, match="mixes feature dimensions") as err:
        run_mil(_cfg(tmp_path, "run", panda, f"features_dir={d}"))
    named = re.findall(r"(\w+)\.h5 has", str(err.value))
    assert len(named) == 2 and ids[-1] in named and set(named) <= set(ids), str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_bad_monitor_is_refused(tmp_path, panda):
    with pytest.raises(ValueError, match="valid: .*val/kappa"):
        run_mil(_cfg(tmp_path, "run", panda, "monitor=val/acc"))
    with pytest.raises(ValueError, match="must be 'max'"):
        run_mil(_cfg(tmp_path, "run", panda, "monitor=val/kappa", "monitor_mode=min"))


def test_tile_size_experiment_composes_for_every_grid_point(tmp_path):
    """The sweep as the basic sweeper expands it (seed from `seeds`): 3 tilings × 2 heads × 3 seeds, each point
    composing and validating, with the paired tile size / attention / pruner settings at 0.5 µm/px."""
    from hirespath.configs import validate_config

    base = compose_task("mil", ["experiment=mil_tile_size"], tmp_path)
    base_h = OmegaConf.load(__import__("pathlib").Path(__file__).parents[1] / "conf/experiment/mil_tile_size.yaml")
    params = OmegaConf.to_container(base_h.hydra.sweeper.params, resolve=False)
    assert params["seed"] == "${seeds}" and base.seeds == "0,1,2"
    axes = {k: str(v if k != "seed" else base.seeds).split(",") for k, v in params.items()}
    points = list(itertools.product(*axes.values()))
    assert len(points) == 18
    expected = {"t224_dense": (224, "dense", 0.0), "t1792_sparse": (1792, "sparse", 0.6),
                "t3430_sparse": (3430, "sparse", 0.6)}  # fmt: skip
    for point in points:
        overrides = [f"{k}={v}" for k, v in zip(axes, point)]
        cfg = compose_task("mil", ["experiment=mil_tile_size", "data.root=/data/panda", *overrides], tmp_path)
        validate_config(cfg)
        tiling, head, seed = point
        assert (cfg.tile.size, cfg.attention.mode, cfg.pruner.prune_ratio) == expected[tiling], point
        assert cfg.tile.mpp == 0.5 and cfg.head.name == head and cfg.seed == int(seed)
        assert cfg.tiling_name == tiling and cfg.backbone.name == "uni2_h" and cfg.features_dir is None
        assert cfg.tile.size % 14 == 0


def _mil_job(sweep, num, tiling, tile_size, head, seed, kappa, cost):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    cfg = {
        "task_name": "mil_tile_size",
        "seed": seed,
        "tiling_name": tiling,
        "tile": {"size": tile_size, "mpp": 0.5},
        "backbone": {"name": "uni2_h", "weights": "/w.bin"},
        "attention": {"mode": "dense" if tile_size == 224 else "sparse", "window": 8},
        "pruner": {"prune_ratio": 0.0 if tile_size == 224 else 0.6, "prune_layer": 4},
        "head": {"name": head},
        "data": {"name": "panda_slides", "root": "/data/panda"},
        "features_dir": None,
    }
    OmegaConf.save(OmegaConf.create(cfg), job / ".hydra" / "config.yaml")
    overrides = [f"mil_tiling={tiling}", f"head={head}", f"seed={seed}"]
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    metrics = {"test/kappa": kappa, "test/balanced_accuracy": kappa - 0.2, "test/accuracy": kappa - 0.1,
               "test/auroc": 0.9, "test/f1_weighted": 0.5, "test/num_slides": 10,
               "embed/seconds_per_slide": cost}  # fmt: skip
    (job / "metrics.json").write_text(json.dumps(metrics))


def test_report_mil_table(tmp_path):
    from hirespath.report.tables import build_report

    sweep = tmp_path / "logs" / "mil_tile_size" / "multiruns" / "x"
    n = 0
    kappas = {("t224_dense", 224): 0.80, ("t1792_sparse", 1792): 0.85}
    for (tiling, size), kappa in kappas.items():
        for head, delta in (("abmil", 0.0), ("mean_pool", -0.1)):
            for seed, noise in ((0, -0.01), (1, 0.01), (2, 0.0)):
                _mil_job(sweep, n, tiling, size, head, seed, kappa + delta + noise, size / 100 + seed)
                n += 1
    # a job that failed: listed, not silently missing
    (sweep / str(n) / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"task_name": "mil_tile_size", "head": {"name": "abmil"}}),
                   sweep / str(n) / ".hydra" / "config.yaml")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_report([sweep], tmp_path / "report")
    assert any("without metrics.json" in str(w.message) for w in caught)
    t = pd.read_csv(tmp_path / "report" / "mil.csv")
    assert list(zip(t.tiling, t["head"])) == [
        ("t224_dense", "abmil"),
        ("t224_dense", "mean_pool"),
        ("t1792_sparse", "abmil"),
        ("t1792_sparse", "mean_pool"),
    ]
    assert (t.seeds == 3).all()
    assert t.kappa.tolist() == pytest.approx([0.80, 0.70, 0.85, 0.75])
    assert t.kappa_std.tolist() == pytest.approx([0.01] * 4)
    assert t.bal_acc.tolist() == pytest.approx([0.60, 0.50, 0.65, 0.55])
    assert t.seconds_per_slide.tolist() == pytest.approx([3.24, 3.24, 18.92, 18.92])
    md = (tmp_path / "report" / "mil.md").read_text()
    assert "| t1792_sparse | 1792 | abmil | 3 | 0.850 ± 0.010 |" in md
    assert "Slide-level MIL" in (tmp_path / "report" / "report.md").read_text()
    assert not (tmp_path / "report" / "table1.csv").exists()  # MIL runs are not classification rows


def test_non_finite_feature_files_are_skipped_and_the_run_goes_on(tmp_path, panda, one_thread):
    """A training slide with 5 NaNs and a test slide all NaN: both go to skipped.csv with the reason, the others
    train and test, and the metrics, predictions and head weights are finite."""
    import torch

    labels = panda_slide_labels(panda, cache_dir=tmp_path / "cache")
    d = _features_dir(tmp_path, labels.slide_id)
    train_id, test_id = (labels.slide_id[labels.split == s].iloc[0] for s in ("train", "test"))
    feats = np.random.default_rng(1).normal(size=(6, 8))
    feats.reshape(-1)[[1, 5, 9, 13, 17]] = np.nan
    write_trident(d / f"{train_id}.h5", feats, encoder="x")
    write_trident(d / f"{test_id}.h5", np.full((4, 8), np.nan), encoder="x")
    m = run_mil(_cfg(tmp_path, "run", panda, f"features_dir={d}", *HEAD["abmil"]))
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv", dtype={"slide_id": str}).set_index("slide_id")
    assert skipped.reason.to_dict() == {
        train_id: f"5 non-finite feature values (NaN/inf) in {train_id}.h5; embed it again",
        test_id: f"32 non-finite feature values (NaN/inf) in {test_id}.h5; embed it again",
    }
    assert m["skipped_slides"] == 2 and m["test/num_slides"] == (labels.split == "test").sum() - 1
    assert np.isfinite(m["test/loss"]) and np.isfinite(m["test/kappa"])  # (AUROC: too few test slides per grade)
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"slide_id": str})
    assert test_id not in set(pred.slide_id) and pred.filter(like="p").notna().all().all()
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_every_embedding_option_reaches_the_engine(tmp_path, monkeypatch):
    """mil's embedding takes the tile and embed nodes as embed_slides does: reader, threads, tokens, encoder_tag, ...
    reach the engine, not dropped; the features go to the top-level job_dir."""
    import hirespath.tasks.mil as mil_task

    root = tmp_path / "panda"
    (root / "train_images").mkdir(parents=True)
    (root / "train_images" / "s1.tiff").write_bytes(b"")
    seen = {}

    def fake_ensure_features(encoder, slides, tiling, embed, runtime, *, job_dir, weights, default_mpp):
        seen.update(tiling=tiling, embed=embed, runtime=runtime, job_dir=job_dir)
        return Path(job_dir) / "20x_112px_0px_overlap" / "features_mytag", {"slides_done": 1, "seconds": 1.0}

    monkeypatch.setattr(mil_task, "ensure_features", fake_ensure_features)
    cfg = compose_task(
        "mil",
        [f"data.root={root}", *TINY, f"job_dir={tmp_path / 'jobs'}", "embed.reader=workers", "embed.threads=1",
         "embed.tokens=true", "embed.encoder_tag=mytag", "embed.overlay_tiles=0", "embed.features=mean",
         "embed.lock_stale_hours=2", "embed.batch_size=3"],
        tmp_path / "run",
    )  # fmt: skip
    feat_dir, info = embed_panda_slides(cfg, ["s1"])
    assert feat_dir == tmp_path / "jobs" / "20x_112px_0px_overlap" / "features_mytag"
    assert info == {"embed/slides_embedded": 1, "embed/seconds": 1.0}
    expected = dict(reader="workers", threads=1, tokens=True, encoder_tag="mytag", overlay_tiles=0, features="mean",
                    lock_stale_hours=2, batch_size=3, num_workers=0, thumbnails=False)  # fmt: skip
    assert {k: seen["embed"][k] for k in expected} == expected and Path(seen["job_dir"]) == tmp_path / "jobs"
    assert seen["tiling"].size == 112 and seen["runtime"].device == "cpu"

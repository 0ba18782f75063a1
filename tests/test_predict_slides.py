"""predict_slides: a trained mil run applied to its own features, to new slides (embedded with the run's encoder
settings) and to TRIDENT/CLAM files; heatmaps (PNG, token resolution, QuPath GeoJSON); the refusals."""

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_task, tiny_encoder
from omegaconf import OmegaConf
from test_mil import write_trident
from test_mil_task import HEAD, TINY

from hirespath.data.mil import panda_slide_labels
from hirespath.tasks.mil import run_mil
from hirespath.tasks.predict_slides import run_predict_slides
from hirespath.utils.errors import InputError
from hirespath.wsi import trident_h5
from hirespath.wsi.qupath import read_geojson


def _train(tmp, name, panda, *overrides):
    """A mil run as Hydra leaves it: the run dir with .hydra/config.yaml, checkpoints/, predictions.csv."""
    cfg = compose_task("mil", [f"data.root={panda}", *TINY, *overrides], tmp / name, tmp / "cache")
    (tmp / name / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, tmp / name / ".hydra" / "config.yaml")
    run_mil(cfg)
    return tmp / name


def _predict(tmp, name, *overrides):
    cfg = compose_task("predict_slides", list(overrides), tmp / name)
    return run_predict_slides(cfg), tmp / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Generated PANDA slides embedded with the tiny preset (sparse + pruned), an ABMIL trained on them."""
    from hirespath.data.panda_synthetic import make_synthetic_panda

    tmp = tmp_path_factory.mktemp("predict")
    panda = make_synthetic_panda(tmp / "panda", num_slides=12, size=(384, 512), seed=2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _train(tmp, "mil", panda, *HEAD["abmil"])
    finally:
        torch.set_num_threads(n)
    (features,) = (tmp / "cache" / "slide_embeddings").glob("*/features_*")
    return {"tmp": tmp, "panda": panda, "run": run, "features": features}


def _check_geojson(path, slide_w, slide_h, n_tiles, num_classes=6):
    objects = read_geojson(path)
    assert len(objects) == n_tiles
    for geom, props in objects:
        assert geom.is_valid and not geom.is_empty
        x0, y0, x1, y1 = geom.bounds
        assert 0 <= x0 < x1 <= slide_w and 0 <= y0 < y1 <= slide_h
        assert props["objectType"] == "detection"
        m = props["measurements"]
        assert 0 <= m["attention"] <= 1 and {f"p{c}" for c in range(num_classes)} <= set(m)


def test_own_features_give_the_runs_test_predictions(trained, one_thread):
    """The run's own features folder: its test slides get exactly the run's predictions; every slide gets a PNG and
    a valid GeoJSON inside the slide; labels add metrics.json."""
    run, tmp = trained["run"], trained["tmp"]
    labels = panda_slide_labels(trained["panda"], cache_dir=tmp / "cache")
    labels.to_csv(tmp / "labels.csv", index=False)
    m, out = _predict(tmp, "own", f"ckpt={run}", f"features_dir={trained['features']}", f"labels={tmp / 'labels.csv'}",
                      "heatmaps.num_slides=2")  # fmt: skip
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    ref = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    assert list(pred.columns) == ["pred", "p0", "p1", "p2", "p3", "p4", "p5", "n_tiles"]
    assert len(pred) == len(list(trained["features"].glob("*.h5"))) == m["num_slides"]
    mine = pred.loc[ref.index]
    assert (mine.pred == ref.pred).all() and (mine.n_tiles == ref.n_tiles).all()
    probs = [f"p{c}" for c in range(6)]
    np.testing.assert_allclose(mine[probs].to_numpy(), ref[probs].to_numpy(), rtol=0, atol=1e-6)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/num_slides"] == len(labels) and 0 <= saved["test/accuracy"] <= 1
    pngs = sorted((out / "heatmaps").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(pred.index[:2])
    for p in pngs:
        attrs, coords = trident_h5.read_coords(trained["features"] / f"{p.stem}.h5")
        _check_geojson(p.with_suffix(".geojson"), attrs["level0_width"], attrs["level0_height"], len(coords))
        from PIL import Image

        assert Image.open(p).size[0] > 100
    assert pd.read_csv(out / "skipped.csv").empty


def test_our_features_are_drawn_over_the_slides_they_record(trained, one_thread, tmp_path, monkeypatch, caplog):
    """features_dir= alone: our h5 files record the slide each was made from, so the heatmaps are drawn over those
    slides' thumbnails where they still are; where one is gone the run says to pass wsi_dir=."""
    import hirespath.viz.mil as viz

    drawn = {}
    draw = viz.attention_heatmap

    def spy(coords, attention, path, **kw):
        drawn[path.stem] = kw["slide_path"]
        return draw(coords, attention, path, **kw)

    monkeypatch.setattr(viz, "attention_heatmap", spy)
    feats = tmp_path / "feats"
    shutil.copytree(trained["features"], feats)
    first, second = sorted(p.stem for p in feats.glob("*.h5"))[:2]
    _predict(tmp_path, "over", f"ckpt={trained['run']}", f"features_dir={feats}", "heatmaps.num_slides=2")
    assert drawn == {s: trained["panda"] / "train_images" / f"{s}.tiff" for s in (first, second)}
    moved = tmp_path / "moved.tiff"
    shutil.move(trained["panda"] / "train_images" / f"{second}.tiff", moved)
    try:
        with caplog.at_level("WARNING", logger="hirespath"):
            _predict(tmp_path, "gone", f"ckpt={trained['run']}", f"features_dir={feats}", "heatmaps.num_slides=2")
    finally:
        shutil.move(moved, trained["panda"] / "train_images" / f"{second}.tiff")
    assert drawn[second] is None and drawn[first] is not None
    assert f"{second}.h5 was made from {trained['panda'] / 'train_images' / f'{second}.tiff'}, which is not there: " \
           "its heatmap is drawn without the slide (pass wsi_dir= or slides= to name where the slides are)" in \
           caplog.text, caplog.text  # fmt: skip


def test_new_slides_are_embedded_with_the_runs_encoder(trained, one_thread, tmp_path):
    """wsi_dir: the slides are embedded with the run's encoder, tiling and features (same folder name, same attrs,
    same numbers for a slide the run saw: token scores change nothing), predicted, with token heatmaps."""
    panda, run = trained["panda"], trained["run"]
    labels = panda_slide_labels(panda, cache_dir=trained["tmp"] / "cache")
    seen = labels.slide_id[labels.split == "test"].iloc[0]
    wsi = tmp_path / "new"
    wsi.mkdir()
    shutil.copy(panda / "train_images" / f"{seen}.tiff", wsi / f"{seen}.tiff")
    from hirespath.data.panda_synthetic import make_synthetic_panda

    other = make_synthetic_panda(tmp_path / "other", num_slides=1, size=(384, 512), seed=7)
    (new,) = (other / "train_images").glob("*.tiff")
    shutil.copy(new, wsi / "unseen.tiff")
    (wsi / "broken.tiff").write_bytes(b"not a slide")
    m, out = _predict(tmp_path, "run", f"ckpt={run}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job'}",
                      "heatmaps.resolution=token")  # fmt: skip
    (folder,) = (tmp_path / "job").glob("*/features_*")
    assert folder.relative_to(tmp_path / "job") == trained["features"].relative_to(trained["features"].parents[1])
    mine, ref = (trident_h5.read_features(d / f"{seen}.h5") for d in (folder, trained["features"]))
    np.testing.assert_array_equal(mine["features"], ref["features"])
    for k in ("encoder", "backbone", "attention", "window", "prune_ratio", "prune_layer", "resolution", "feature"):
        assert mine["features_attrs"][k] == ref["features_attrs"][k], k
    with h5py.File(folder / "unseen.h5") as f:
        rows, cols = f["token_scores"].attrs["grid"]
        assert f["token_scores"].shape == (f["features"].shape[0], rows * cols) and rows == cols == 112 // 14
        assert (f["token_scores"][:] >= 0).all() and (f["token_scores"][:] > 0).any()
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    assert sorted(pred.index) == sorted([seen, "unseen"]) and m["num_slides"] == 2
    runs = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    assert pred.pred[seen] == runs.pred[seen]
    np.testing.assert_allclose(pred.loc[seen, "p0":"p5"].to_numpy(float), runs.loc[seen, "p0":"p5"].to_numpy(float),
                               atol=1e-6)  # fmt: skip
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.slide_id.tolist() == ["broken"] and skipped.reason[0].startswith("not embedded")
    drawn = {p.name for p in (out / "heatmaps").iterdir()}
    assert drawn == {f"{s}.{e}" for s in pred.index for e in ("png", "geojson")}


def test_a_heatmap_is_not_drawn_over_another_slide_of_the_same_id(trained, one_thread, tmp_path, caplog):
    """features_dir= with wsi_dir= for the pictures: a slide of another cohort under a features file's id is not the
    slide its attention is about (the h5 records its slide file's size): drawn without it, and said."""
    from hirespath.data.panda_synthetic import make_synthetic_panda

    (h5,) = sorted(trained["features"].glob("*.h5"))[:1]
    other = make_synthetic_panda(tmp_path / "other", num_slides=1, size=(512, 640), seed=9)
    wsi = tmp_path / "cohort2"
    wsi.mkdir()
    shutil.copy(next((other / "train_images").glob("*.tiff")), wsi / f"{h5.stem}.tiff")
    with caplog.at_level("WARNING", logger="hirespath"):
        _predict(tmp_path, "run", f"ckpt={trained['run']}", f"features_dir={trained['features']}", f"wsi_dir={wsi}")
    said = [r.getMessage() for r in caplog.records if "drawn without the slide" in r.getMessage()]
    assert len(said) == 1 and h5.name in said[0] and str(wsi / f"{h5.stem}.tiff") in said[0]


def test_token_overlay_has_patch_resolution():
    from hirespath.viz.mil import token_overlay, token_values

    scores = np.arange(1, 17, dtype=float).reshape(1, 4, 4)
    values = token_values(np.array([0.5]), scores)
    assert values.sum() == pytest.approx(0.5) and values[0, 3, 3] == pytest.approx(0.5 * 16 / scores.sum())
    overlay = token_overlay(np.array([[0, 0]]), values, (64, 64), 1.0, 1.0, 64)
    assert len(np.unique(overlay)) == 16  # one value per patch cell of 16×16 px
    assert (overlay[:16, :16] == values[0, 0, 0]).all() and (overlay[48:, 48:] == values[0, 3, 3]).all()


@pytest.mark.parametrize("prune_ratio", [0.5, 0.0])
def test_encoder_token_scores_leave_outputs_unchanged(prune_ratio):
    """forward(token_scores=True): identical outputs, and one score per patch of the full grid (the pruner's scores
    at its layer: kept patches are the top scores; without pruning, the last block's prefix attention)."""
    enc = tiny_encoder(depth=3, attention="sparse", window=4, prune_ratio=prune_ratio, prune_layer=1)
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        plain, scored = enc(x), enc(x, token_scores=True)
    assert plain.token_scores is None and scored.token_scores.shape == (2, 4 * 6)
    for k in ("cls", "patch_tokens", "positions", "prefix_tokens"):
        assert torch.equal(getattr(plain, k), getattr(scored, k)), k
    s = scored.token_scores
    assert (s > 0).all() and (s.sum(1) <= 1 + 1e-5).all()  # attention shares of the patches (prefix keys aside)
    if prune_ratio:
        kept = scored.positions[..., 0] * 6 + scored.positions[..., 1]
        worst_kept = s.gather(1, kept).min(1).values
        dropped = torch.ones_like(s, dtype=torch.bool).scatter_(1, kept, False)
        assert ((s.masked_fill(~dropped, -1).max(1).values) <= worst_kept).all()


def _fingerprint(path, digest="d1g3st", size=1000):
    """A ``weights_fingerprint`` attr as embed_slides writes it."""
    return json.dumps({"path": path, "size": size, "mtime": 1, "digest": digest})


@pytest.fixture(scope="module")
def trident_run(tmp_path_factory):
    """A mean-pool run trained on TRIDENT-written 8-d features (encoder 'x'), no embedding."""
    from hirespath.data.panda_synthetic import make_synthetic_panda

    tmp = tmp_path_factory.mktemp("trident")
    panda = make_synthetic_panda(tmp / "panda", num_slides=12, size=(384, 512), seed=2)
    ids = panda_slide_labels(panda, cache_dir=tmp / "cache").slide_id
    d = tmp / "train_features"
    d.mkdir()
    rng = np.random.default_rng(0)
    for s in ids:
        write_trident(d / f"{s}.h5", rng.normal(size=(5, 8)), encoder="x", weights_fingerprint=_fingerprint("/a/x.bin"))
    run = _train(tmp, "run", panda, f"features_dir={d}", *HEAD["mean_pool"], "data.max_tiles_train=null")
    return run


def test_trident_and_clam_files(trident_run, tmp_path, capsys):
    d = tmp_path / "new"
    d.mkdir()
    rng = np.random.default_rng(1)
    write_trident(d / "t1.h5", rng.normal(size=(6, 8)), encoder="x")
    with h5py.File(d / "clam1.h5", "w") as f:  # CLAM's legacy file: features only
        f["features"] = rng.normal(size=(4, 8)).astype(np.float32)
    m, out = _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}", "heatmaps.resolution=token")
    pred = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert sorted(pred.index) == ["clam1", "t1"] and pred.n_tiles.to_dict() == {"clam1": 4, "t1": 6}
    assert (out / "heatmaps" / "t1.png").is_file() and not (out / "heatmaps" / "clam1.png").exists()
    assert "t1.h5 has no token_scores" in capsys.readouterr().out  # the fallback to tile resolution is said
    from hirespath.utils.wandb import finish_runs, offline_runs

    _predict(tmp_path, "wb", f"ckpt={trident_run}", f"features_dir={d}", "logger=wandb")
    finish_runs()  # what task_wrapper does when the task returns
    (run,) = offline_runs(tmp_path / "wb")
    keys = run["history_keys"]
    assert {"predictions/_type", "heatmaps/_type"} <= keys, sorted(keys)  # the table and the PNGs
    attrs, _ = trident_h5.read_coords(d / "t1.h5")
    _check_geojson(out / "heatmaps" / "t1.geojson", attrs["level0_width"], attrs["level0_height"], 6)


def test_a_clam_file_of_one_tile_gets_no_heatmap_of_a_guessed_size(trident_run, tmp_path, caplog):
    """CLAM's feature files record no tile size; with one tile there is no grid step to read it from either: no
    heatmap or GeoJSON of a 1 px tile, said why. Two tiles give the step."""
    from test_mil import write_clam

    d = tmp_path / "new"
    d.mkdir()
    rng = np.random.default_rng(1)
    write_clam(d / "one.h5", rng.normal(size=(1, 8)), np.array([[448, 224]]))
    write_clam(d / "two.h5", rng.normal(size=(2, 8)), np.array([[0, 0], [224, 0]]))
    with caplog.at_level("INFO", logger="hirespath"):
        _, out = _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}")
    assert sorted(pd.read_csv(out / "predictions.csv").slide_id) == ["one", "two"]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["two.geojson", "two.png"]
    assert "no heatmap for one: one.h5 gives no tile size (no coords attrs, one tile)" in caplog.text, caplog.text
    tiles = [geom.bounds for geom, _ in read_geojson(out / "heatmaps" / "two.geojson")]
    assert tiles == [(0, 0, 224, 224), (224, 0, 448, 224)]


def test_heatmaps_num_slides_counts_the_slides_drawn(trident_run, tmp_path):
    """``heatmaps.num_slides=1`` draws one heatmap when a slide has coords, though a CLAM file without coords
    comes first."""
    d = tmp_path / "new"
    d.mkdir()
    rng = np.random.default_rng(1)
    with h5py.File(d / "a_clam.h5", "w") as f:
        f["features"] = rng.normal(size=(4, 8)).astype(np.float32)
    write_trident(d / "b.h5", rng.normal(size=(6, 8)), encoder="x")
    _, out = _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}", "heatmaps.num_slides=1")
    assert pd.read_csv(out / "predictions.csv").slide_id.tolist() == ["a_clam", "b"]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["b.geojson", "b.png"]


def test_a_rerun_into_the_same_folder_leaves_only_its_own_heatmaps(trident_run, tmp_path, caplog, monkeypatch):
    """An output folder reused for another run (another model, fewer slides) holds that run's heatmaps only: the
    earlier run's PNGs and GeoJSONs would be dragged into QuPath beside them; so does a run stopped while drawing."""
    d = tmp_path / "new"
    d.mkdir()
    rng = np.random.default_rng(1)
    for s in ("a", "b", "c"):
        write_trident(d / f"{s}.h5", rng.normal(size=(6, 8)), encoder="x")
    _, out = _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}")
    assert len(list((out / "heatmaps").iterdir())) == 6
    (out / "heatmaps" / "notes.txt").write_text("mine")  # not a heatmap: kept
    (out / "heatmaps" / "legend.png").write_bytes(b"mine")  # nor a slide's: kept
    (d / "c.h5").unlink()
    with caplog.at_level("WARNING", logger="hirespath"):
        _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}", "heatmaps.num_slides=1")
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["a.geojson", "a.png", "legend.png", "notes.txt"]
    assert "removed the heatmaps of 2 slides an earlier run drew" in caplog.text, caplog.text
    _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}", "heatmaps.num_slides=0")
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["legend.png", "notes.txt"]
    # three slides drawn, then a run of two stopped while drawing its second: no heatmap of the first run's is left
    write_trident(d / "c.h5", rng.normal(size=(6, 8)), encoder="x")
    _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}")
    (d / "c.h5").unlink()
    import hirespath.viz.mil as viz

    draw, drawn = viz.attention_heatmap, []

    def stopped(*args, **kwargs):
        if drawn:
            raise KeyboardInterrupt
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(viz, "attention_heatmap", stopped)
    with pytest.raises(KeyboardInterrupt):
        _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}")
    monkeypatch.setattr(viz, "attention_heatmap", draw)
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["a.geojson", "a.png", "legend.png", "notes.txt"]
    _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}")
    assert sorted(p.stem for p in (out / "heatmaps").glob("*.png")) == ["a", "b", "legend"]


def test_trainer_ddp_is_said_to_run_as_one_process(trident_run, tmp_path, caplog):
    """predict_slides starts no ranks: trainer=ddp (2 devices) would run one process without a word, as if the
    slides were embedded on both. It says so, and what to do for several devices."""
    d = tmp_path / "new"
    d.mkdir()
    write_trident(d / "a.h5", np.random.default_rng(1).normal(size=(6, 8)), encoder="x")
    with caplog.at_level("WARNING", logger="hirespath"):
        _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}", "trainer=ddp")
    assert "predict_slides runs as one process on one device: trainer.devices=2 (strategy ddp) is not used" in (
        caplog.text
    ), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hirespath"):
        _predict(tmp_path, "out2", f"ckpt={trident_run}", f"features_dir={d}", "trainer=cpu")
    assert "one process" not in caplog.text
    with caplog.at_level("WARNING", logger="hirespath"):  # device indices, as Lightning reads them: two devices
        _predict(tmp_path, "out3", f"ckpt={trident_run}", f"features_dir={d}", "trainer=cpu", "trainer.devices='0,1'")
    assert "trainer.devices=0,1 (strategy auto) is not used" in caplog.text, caplog.text


def test_refusals(trident_run, tmp_path):
    """Another dimension, another encoder, the same encoder's name from another weights file, a checkpoint that is
    not a MIL one, a missing file: one clear error each, before any output."""
    wrong = tmp_path / "dim12"
    wrong.mkdir()
    write_trident(wrong / "a.h5", np.zeros((4, 12)), encoder="x")
    with pytest.raises(InputError, match=r"expects 8-dimensional features .* a\.h5 holds 12-dimensional"):
        _predict(tmp_path, "o1", f"ckpt={trident_run}", f"features_dir={wrong}")
    other = tmp_path / "enc_y"
    other.mkdir()
    write_trident(other / "a.h5", np.zeros((4, 8)), encoder="y")
    with pytest.raises(InputError, match=r"encoder: expects 'x', got 'y'"):
        _predict(tmp_path, "o2", f"ckpt={trident_run}", f"features_dir={other}")
    retrained = tmp_path / "weights_b"  # encoder 'x' by name, from a weights file of other content
    retrained.mkdir()
    write_trident(retrained / "a.h5", np.zeros((4, 8)), encoder="x", weights_fingerprint=_fingerprint("/a/x.bin", "b"))
    with pytest.raises(InputError, match=r"a\.h5 was made with another .* weights_digest: expects 'd1g3st', got 'b'"):
        _predict(tmp_path, "o6", f"ckpt={trident_run}", f"features_dir={retrained}")
    at10x = tmp_path / "trident_10x"  # TRIDENT's files say their scale by magnification alone
    at10x.mkdir()
    write_trident(at10x / "a.h5", np.zeros((4, 8)), encoder="x", coord_attrs={"target_magnification": 10})
    with pytest.raises(InputError, match=r"tile target_magnification: expects 20, got 10"):
        _predict(tmp_path, "o7", f"ckpt={trident_run}", f"features_dir={at10x}")
    copied = tmp_path / "weights_copy"  # the same weights from a copy elsewhere: predicted
    copied.mkdir()
    write_trident(copied / "a.h5", np.zeros((4, 8)), encoder="x", weights_fingerprint=_fingerprint("/node7/x.bin"))
    _predict(tmp_path, "copy", f"ckpt={trident_run}", f"features_dir={copied}")
    assert (tmp_path / "copy" / "predictions.csv").is_file()
    fake = tmp_path / "classify_run"
    (fake / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"task_name": "classify", "head": {"name": "knn"}}), fake / ".hydra/config.yaml")
    (fake / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, fake / "checkpoints" / "x.ckpt")
    with pytest.raises(InputError, match="not a MIL checkpoint: its run is task 'classify'"):
        _predict(tmp_path, "o3", f"ckpt={fake / 'checkpoints' / 'x.ckpt'}", f"features_dir={other}")
    shutil.copytree(trident_run / ".hydra", tmp_path / "mil_like" / ".hydra")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "mil_like" / "model.ckpt")
    with pytest.raises(InputError, match="not a MIL checkpoint: no head"):
        _predict(tmp_path, "o4", f"ckpt={tmp_path / 'mil_like' / 'model.ckpt'}", f"features_dir={other}")
    with pytest.raises(InputError, match="does not exist"):
        _predict(tmp_path, "o5", f"ckpt={tmp_path / 'nope.ckpt'}", f"features_dir={other}")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"))


def test_a_run_trained_on_given_features_embeds_new_slides_only_as_they_were_made(trained, trident_run, tmp_path):
    """A run trained with features_dir= has in its config the defaults, not how those features were made: new slides
    (wsi_dir=) are embedded only where the config would make the same features as the training files record, and
    refused before any slide is read otherwise (TRIDENT's encoder 'x'; CLAM's files, which record nothing)."""
    from test_mil import write_clam

    wsi = tmp_path / "new"
    wsi.mkdir()
    (one,) = sorted((trained["panda"] / "train_images").glob("*.tiff"))[:1]
    shutil.copy(one, wsi / one.name)
    with pytest.raises(InputError, match=r"trained on the features in .*train_features.*\(encoder: they have 'x', "
                                         r"the run's config would embed 'tiny_.*'.*pass features_dir="):  # fmt: skip
        _predict(tmp_path, "o1", f"ckpt={trident_run}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job1'}")
    clam = tmp_path / "clam"
    clam.mkdir()
    rng = np.random.default_rng(0)
    for s in panda_slide_labels(trained["panda"], cache_dir=trained["tmp"] / "cache").slide_id:
        write_clam(clam / f"{s}.h5", rng.normal(size=(4, 96)), np.arange(8).reshape(4, 2) * 112)
    run = _train(tmp_path, "clam_run", trained["panda"], f"features_dir={clam}", *HEAD["mean_pool"])
    with pytest.raises(InputError, match=r"trained on the features in .*clam, which do not record their encoder "
                                         r"\(CLAM's files record nothing.*pass features_dir="):  # fmt: skip
        _predict(tmp_path, "o2", f"ckpt={run}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job2'}")
    # older TRIDENT files: their tiling (the config's own, here) but no encoder name
    from hirespath.predict.mil import check_embedding_reproduces

    run_cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    tiling = {"patch_size": 112, "overlap": 0, "target_magnification": 20}
    with pytest.raises(InputError, match=r"do not record their encoder"):
        check_embedding_reproduces(run_cfg, {"dim": 96, "attrs": {}, "weights": {}, "tiling": tiling})
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "job1", "job2"))
    # features of our own embedding, made with the settings the run's config holds: embedded as they were
    run = _train(tmp_path, "given", trained["panda"], f"features_dir={trained['features']}", *HEAD["abmil"])
    _predict(tmp_path, "ok", f"ckpt={run}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job3'}")
    (made,) = (tmp_path / "job3").glob("*/features_*")
    mine, ref = (trident_h5.read_features(d / f"{one.stem}.h5")["features"] for d in (made, trained["features"]))
    np.testing.assert_array_equal(mine, ref)


def test_a_slide_without_tissue_does_not_stand_for_the_training_features(tmp_path):
    """A run of before features.json is checked against its training folder's first file; TRIDENT's file of a slide
    without tissue (features and coords (0,), no attrs) would make that check compare nothing."""
    from hirespath.predict.mil import expected_features

    d = tmp_path / "train_features"
    d.mkdir()
    with h5py.File(d / "a_empty.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((0,), np.float32))
        f.create_dataset("coords", data=np.array([], np.int32))
    write_trident(d / "b.h5", np.zeros((4, 8)), encoder="uni_v1")
    expected = expected_features(OmegaConf.create({"features_dir": str(d)}), 8)
    assert expected["attrs"] == {"encoder": "uni_v1"} and expected["tiling"]["patch_size"] > 0


def test_labels_are_checked_before_any_slide_and_never_cost_the_predictions(trident_run, tmp_path):
    """A missing labels file, or one listing a slide twice, was refused only after every slide was embedded and
    predicted, and then predictions.csv was never written; labels of another cohort lost the predictions too. Now
    the file is checked first, and predictions.csv (and metrics.json, labels or not) is written before the labels
    are compared with it."""
    d = tmp_path / "new"
    d.mkdir()
    write_trident(d / "t1.h5", np.random.default_rng(1).normal(size=(6, 8)), encoder="x")
    dup = tmp_path / "dup.csv"
    dup.write_text("slide_id,label\nt1,0\nt1,3\n")
    for labels, match in ((tmp_path / "nope.csv", "does not exist"), (dup, "'t1' appears more than once")):
        with pytest.raises(InputError, match=match):
            _predict(tmp_path, "o1", f"ckpt={trident_run}", f"features_dir={tmp_path / 'gone'}", f"labels={labels}")
        assert not (tmp_path / "o1").exists()  # refused before the (missing) features folder was looked at
    other = tmp_path / "other.csv"
    other.write_text("slide_id,label\nz9,0\n")
    with pytest.raises(InputError, match=r"none of its slides was predicted \(its slide ids e.g. \['z9'\], predicted "):
        _predict(tmp_path, "o2", f"ckpt={trident_run}", f"features_dir={d}", f"labels={other}")
    assert list(pd.read_csv(tmp_path / "o2" / "predictions.csv").slide_id) == ["t1"]
    assert (tmp_path / "o2" / "heatmaps" / "t1.png").is_file()  # and the heatmaps and counts
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["num_slides"] == 1
    _predict(tmp_path, "o3", f"ckpt={trident_run}", f"features_dir={d}")
    assert json.loads((tmp_path / "o3" / "metrics.json").read_text())["num_slides"] == 1


def test_only_the_slides_that_could_not_be_predicted_are_listed_as_skipped(trident_run, tmp_path):
    """One unreadable feature file listed every slide of the folder in skipped.csv, the predicted ones with an
    empty reason (pandas keeps the other rows' missing reasons as NaN, which is not None)."""
    d = tmp_path / "new"
    d.mkdir()
    for s in ("t1", "t2"):
        write_trident(d / f"{s}.h5", np.random.default_rng(1).normal(size=(6, 8)), encoder="x")
    (d / "broken.h5").write_bytes(b"not hdf5")
    m, out = _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={d}")
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.slide_id) == ["broken"] and skipped.reason.str.startswith("cannot read broken.h5").all()
    assert m["skipped_slides"] == 1 and sorted(pd.read_csv(out / "predictions.csv").slide_id) == ["t1", "t2"]


def test_a_slide_embedded_with_failed_tiles_is_predicted_not_listed_as_skipped(trained, one_thread, tmp_path):
    """The features folder's rows of a slide's failed tiles (tile N: ...) made predict_slides wsi_dir=... list the
    predicted slide as "not embedded", and count each row as a skipped slide."""
    from hirespath.slides import Ledger

    src = sorted((trained["panda"] / "train_images").glob("*.tiff"))[0]
    wsi = tmp_path / "new"
    wsi.mkdir()
    shutil.copy(src, wsi / src.name)
    opts = [f"ckpt={trained['run']}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job'}", "heatmaps.num_slides=0"]
    _predict(tmp_path, "first", *opts)
    (folder,) = (tmp_path / "job").glob("*/features_*")
    Ledger(folder).update_skipped([{"slide": src.stem, "path": str(src), "reason": f"tile {i}: unreadable"}
                                   for i in (3, 5)], done=[src.stem])  # what the runner records  # fmt: skip
    m, out = _predict(tmp_path, "again", *opts)
    assert list(pd.read_csv(out / "predictions.csv").slide_id) == [src.stem]
    assert pd.read_csv(out / "skipped.csv").empty and m["skipped_slides"] == 0


def test_a_job_dir_given_for_its_features_folder_is_refused_naming_the_folders_below(trident_run, tmp_path):
    from test_cli import run_cli

    feats = tmp_path / "job" / "20x_224px_0px_overlap" / "features_x"
    feats.mkdir(parents=True)
    write_trident(feats / "t1.h5", np.zeros((4, 8)), encoder="x")
    for grids in ("patches", "patches_cover_tissue"):  # the tilings' grids (embedding's, segmentation's): no features
        (tmp_path / "job" / "20x_224px_0px_overlap" / grids).mkdir()
        trident_h5.write_patches_h5(tmp_path / "job" / "20x_224px_0px_overlap" / grids / "t1_patches.h5",
                                    np.zeros((4, 2), dtype=np.int64), {"patch_size": 224})  # fmt: skip
    with pytest.raises(InputError, match=f"no <slide>.h5 feature files in .*; feature folders below it: {feats}$"):
        _predict(tmp_path, "o1", f"ckpt={trident_run}", f"features_dir={tmp_path / 'job'}")
    write_trident(feats / "t2.h5", np.zeros((4, 8)), encoder="y")  # two encoders in one folder: one line too
    proc = run_cli("predict_slides", f"ckpt={trident_run}", f"features_dir={feats}",
                   f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {feats} mixes 'encoder' attrs")


def test_the_run_records_what_it_was_trained_on(trident_run, trained, tmp_path):
    """features.json in the mil run: the training features' identity and weights digest, as trained; predict_slides
    checks against it even when the training folder is gone (its files could have been embedded again since)."""
    from hirespath.predict.mil import expected_features, run_config

    record = json.loads((trident_run / "features.json").read_text())
    assert record["attrs"] == {"encoder": "x"}
    assert record["tiling"] == {"patch_size": 224, "target_magnification": 20, "overlap": 0}
    assert record["weights"] == {"weights_size": 1000, "weights_digest": "d1g3st"}
    run_cfg = run_config(trident_run, trident_run / "checkpoints" / "x.ckpt")
    run_cfg.features_dir = str(tmp_path / "moved_away")
    expected = expected_features(run_cfg, 8, trident_run)
    assert expected["weights"] == record["weights"] and expected["attrs"] == {"encoder": "x"}
    own = json.loads((trained["run"] / "features.json").read_text())  # a run that embedded its slides itself
    assert own["features_dir"] == str(trained["features"].resolve()) and own["attrs"]["resolution"] == 112
    assert own["weights"] == {"weights_size": None, "weights_digest": None}  # random weights: nothing to compare


def test_another_tiling_of_the_runs_encoder_is_refused(trained, tmp_path):
    """Features of the run's encoder at another tile size or overlap: refused, naming the run's and the file's."""
    d = tmp_path / "t224"
    d.mkdir()
    src = next(trained["features"].glob("*.h5"))
    shutil.copy(src, d / src.name)
    with h5py.File(d / src.name, "r+") as f:
        f["features"].attrs["resolution"] = 224
        f["coords"].attrs["patch_size"] = 224
    with pytest.raises(InputError, match=r"resolution: expects 112, got 224; tile patch_size: expects 112, got 224"):
        _predict(
            tmp_path, "out", f"ckpt={next((trained['run'] / 'checkpoints').glob('epoch_*.ckpt'))}", f"features_dir={d}"
        )
    assert not (tmp_path / "out").exists()
    # the same tiles, overlapping (TRIDENT's --overlap): bags of 2-4x the tiles the model was trained on
    with h5py.File(d / src.name, "r+") as f:
        f["features"].attrs["resolution"] = 112
        f["coords"].attrs["patch_size"], f["coords"].attrs["overlap"] = 112, 56
    with pytest.raises(InputError, match=r"tile overlap: expects 0, got 56"):
        _predict(
            tmp_path, "out", f"ckpt={next((trained['run'] / 'checkpoints').glob('epoch_*.ckpt'))}", f"features_dir={d}"
        )


def test_cli_prints_one_line_for_a_bad_checkpoint(tmp_path):
    from test_cli import run_cli

    (tmp_path / "feats").mkdir()
    proc = run_cli("predict_slides", f"ckpt={tmp_path / 'missing.ckpt'}", f"features_dir={tmp_path / 'feats'}",
                   f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ckpt=") and "Traceback" not in proc.stderr


def test_heatmap_cost_benchmark_rows(tmp_path, one_thread):
    """Both ways on one generated slide: the token way draws patch cells from the 0-overlap tiles, CLAM's way embeds
    about 4× the tiles; seconds are measured for each."""
    from hirespath.benchmark.heatmap_cost import heatmap_cost

    enc = tiny_encoder(depth=2, attention="sparse", window=4, prune_ratio=0.5, prune_layer=1)
    df = heatmap_cost(enc, None, tmp_path, tile_size=112, generated_size=(448, 672)).set_index("method")
    assert list(df.index) == ["token", "clam_overlap50"] and (df.seconds > 0).all()
    assert df.cell_px_level0["token"] == 14 and df.cell_px_level0["clam_overlap50"] == 56
    assert df.tiles["clam_overlap50"] >= 3 * df.tiles["token"]
    assert (tmp_path / "token.png").is_file() and (tmp_path / "clam_overlap50.png").is_file()


def test_bad_heatmap_options_are_refused(trident_run, tmp_path):
    for option, match in (("heatmaps.resolution=patch", "must be one of tile, token"),
                          ("heatmaps.num_slides=-1", "null .every slide. or an integer >= 0"),
                          ("heatmaps.max_side=0", r"max_side=0: must be an integer in \[64, 8192\]"),
                          ("heatmaps.max_side=16384", r"max_side=16384: must be an integer in \[64, 8192\]"),
                          ):  # fmt: skip
        with pytest.raises(InputError, match=match):
            _predict(tmp_path, "out", f"ckpt={trident_run}", f"features_dir={tmp_path}", option)
    assert not (tmp_path / "out").exists()


def test_a_leica_scn_is_predicted_in_qupaths_image(trained, one_thread, tmp_path):
    """A Leica SCN (the glass; its scan a region of it, which QuPath shows): the prediction of the same scan saved as
    a plain TIFF, and its tile GeoJSON in QuPath's image: tiles moved to the scan's corner and cut at its edges, as
    the plain slide's are cut at the slide's (before, the SCN's edge tiles ran past QuPath's image onto the glass)."""
    import openslide
    from slide_formats import write_leica_scn

    from hirespath.data.panda_synthetic import write_pyramid

    src = sorted((trained["panda"] / "train_images").glob("*.tiff"))[0]
    with openslide.OpenSlide(src) as slide:
        mpp = float(slide.properties["openslide.mpp-x"])
        image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    attrs, _ = trident_h5.read_coords(next(trained["features"].glob("*.h5")))
    stride = int(attrs["patch_size_level0"])  # no overlap: the same tiles over the scan
    offset = (7 * stride, 3 * stride)
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_pyramid(wsi / "plain.tiff", image, mpp, compression="zlib", levels=(1, 4))
    write_leica_scn(wsi / "scan.scn", image, mpp, canvas=(20 * stride, 10 * stride), offset=offset, levels=(1, 4))
    _, out = _predict(tmp_path, "run", f"ckpt={trained['run']}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job'}")
    pred = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    probs = pred.loc[:, "p0":"p5"].astype(float)
    np.testing.assert_allclose(probs.loc["scan"], probs.loc["plain"], atol=1e-6)
    plain, scan = (read_geojson(out / "heatmaps" / f"{s}.geojson") for s in ("plain", "scan"))
    h, w = image.shape[:2]
    assert len(plain) == len(scan) == pred.n_tiles["plain"] and any(g.bounds[2] == w for g, _ in plain)
    for (a, _), (b, _) in zip(plain, scan):
        assert b.equals(a) and a.bounds[2] <= w and a.bounds[3] <= h
    # from the features alone (no slide to ask): where the embedding recorded QuPath's image, not on the glass
    (features,) = (tmp_path / "job").glob("*/features_*")
    _, alone = _predict(tmp_path, "alone", f"ckpt={trained['run']}", f"features_dir={features}")
    scan_alone = read_geojson(alone / "heatmaps" / "scan.geojson")
    assert len(scan_alone) == len(scan) and all(b.equals(a) for (a, _), (b, _) in zip(scan, scan_alone))


def test_a_slide_the_embedding_refused_is_not_predicted_from_another_cohorts_features(trained, one_thread, tmp_path):
    """Cohort B predicted into cohort A's job_dir, both with a slide "1": the embedding refuses B's 1 (its id holds
    A's features), but predict_slides then read every listed id from the folder and gave B's 1 A's prediction,
    its heatmap A's tiles over B's slide. A refused slide is listed as skipped, with the reason, and not predicted."""
    run, images = trained["run"], sorted((trained["panda"] / "train_images").glob("*.tiff"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(images[0], a / "1.tiff")
    shutil.copy(images[5], b / "1.tiff")
    shutil.copy(images[6], b / "2.tiff")
    assert (a / "1.tiff").stat().st_size != (b / "1.tiff").stat().st_size
    job = f"job_dir={tmp_path / 'job'}"
    _predict(tmp_path, "pa", f"ckpt={run}", f"wsi_dir={a}", job)
    m, out = _predict(tmp_path, "pb", f"ckpt={run}", f"wsi_dir={b}", job)
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    skipped = pd.read_csv(out / "skipped.csv", dtype={"slide_id": str})
    assert pred.slide_id.tolist() == ["2"] and m["num_slides"] == 1
    assert skipped.slide_id.tolist() == ["1"] and "is taken in" in skipped.reason[0]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["2.geojson", "2.png"]

"""Slide-level MIL: heads, per-slide h5 reading (TRIDENT/CLAM files), DataModule, LightningModule, outputs."""

import hashlib
import json
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from hirespath.data.mil import MILDataModule, collate_bags, panda_slide_labels, scan_feature_dir
from hirespath.heads.mil import ABMIL, MeanPool, create_mil_head
from hirespath.metrics.classification import classification_metrics
from hirespath.modules.mil import MONITOR_MODES, MILModule, read_attention, write_mil_outputs
from hirespath.utils.errors import InputError
from hirespath.viz.mil import attention_heatmap, attention_heatmaps, tile_overlay
from hirespath.wsi.trident_h5 import inspect_features, read_features

DIM = 16
TILE = 224  # level-0 tile side of the generated coords


def trident_save_h5(path, assets, attributes=None, mode="w"):
    """TRIDENT's ``trident.IO.save_h5``, as it writes: chunks of one row, maxshape (None, ...), dict attrs as JSON,
    None attrs as the string 'None'."""
    with h5py.File(path, mode) as f:
        for key, val in assets.items():
            ds = f.create_dataset(
                key, shape=val.shape, maxshape=(None,) + val.shape[1:], chunks=(1,) + val.shape[1:], dtype=val.dtype
            )
            ds[:] = val
            for k, v in ((attributes or {}).get(key) or {}).items():
                ds.attrs[k] = json.dumps(v) if isinstance(v, dict) else ("None" if v is None else v)


def grid_coords(n: int, cols: int = 8) -> np.ndarray:
    i = np.arange(n)
    return np.stack([(i % cols) * TILE, (i // cols) * TILE], 1).astype(np.int64)


def write_trident(path, feats, coords=None, encoder="tiny", coord_attrs=None, **feature_attrs):
    coords = grid_coords(len(feats)) if coords is None else coords
    coord_attrs = {
        "patch_size": TILE,
        "patch_size_level0": TILE,
        "level0_magnification": 20,
        "target_magnification": 20,
        "overlap": 0,
        "name": path.stem,
        "savetodir": None,
        "level0_width": 8 * TILE,
        "level0_height": int(coords[:, 1].max()) + TILE if len(coords) else TILE,
        **(coord_attrs or {}),
    }
    trident_save_h5(
        path,
        {"features": feats.astype(np.float32), "coords": coords},
        {"features": {"encoder": encoder, **feature_attrs}, "coords": coord_attrs},
    )


def write_clam(path, feats, coords):
    """CLAM's legacy feature file: features and coords, no attrs."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float32))
        f.create_dataset("coords", data=coords)


def make_bags(directory, n_per_split, rule, seed=0, marked=3):
    """Per-slide files and the label table. ``rule="marked"``: label 1 iff the bag holds ``marked`` tiles carrying a
    signal on feature 0 (the rest noise); ``"shift"``: every tile of a label-1 bag is shifted on feature 1."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows, marks = [], {}
    for split, n in n_per_split.items():
        for i in range(n):
            label = i % 2
            size = int(rng.integers(20, 60))
            feats = rng.normal(size=(size, DIM)).astype(np.float32)
            if rule == "marked" and label:
                idx = rng.choice(size, marked, replace=False)
                feats[idx, 0] += 6.0
                marks[f"{split}{i:03d}"] = idx
            if rule == "shift":
                feats[:, 1] += 1.0 if label else -1.0
            write_trident(directory / f"{split}{i:03d}.h5", feats)
            rows.append({"slide_id": f"{split}{i:03d}", "label": label, "split": split})
    return pd.DataFrame(rows), marks


def trainer(tmp_path, max_epochs, **kw):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(kw.get("callbacks")),
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **kw,
    )


def test_abmil_learns_marked_tile_rule_and_writes_outputs(tmp_path, one_thread):
    """Label set by 3 marked tiles in bags of 20–60 noise tiles: ABMIL through MILDataModule + Lightning reaches
    ≥ 0.9 test accuracy (chance 0.5), puts its attention on the marked tiles, and its outputs are written."""
    L.seed_everything(0)
    labels, marks = make_bags(tmp_path / "feats", {"train": 48, "val": 12, "test": 24}, "marked")
    dm = MILDataModule(tmp_path / "feats", labels, batch_size=4, max_tiles_train=40, seed=0)
    assert dm.feature_dim == DIM and dm.encoder == "tiny" and dm.num_classes == 2 and dm.skipped.empty
    head = {"hidden": 32, "attention_hidden": 16, "dropout": 0.0}
    model = MILModule("abmil", DIM, 2, lr=1e-2, weight_decay=1e-4, max_epochs=8, head_kwargs=head)
    tr = trainer(tmp_path, 8)
    tr.fit(model, datamodule=dm)
    assert "val/kappa" in tr.callback_metrics and "val/balanced_accuracy" in tr.callback_metrics
    (metrics,) = tr.test(model, datamodule=dm, verbose=False)
    assert metrics["test/accuracy"] >= 0.9, metrics
    assert set(metrics) >= {f"test/{k}" for k in ("loss", "accuracy", "balanced_accuracy", "f1_weighted", "auroc")}
    res = model.test_results
    assert [r["slide_id"] for r in res] == dm.split_rows("test").slide_id.tolist()
    # attention: on a positive bag the 3 marked tiles (≤ 15% of the tiles) take most of the weight
    mass = [r["attention"][marks[r["slide_id"]]].sum() for r in res if r["label"] == 1]
    assert np.median(mass) > 0.5, mass
    for r in res:
        assert r["attention"].shape == (len(r["coords"]),) and abs(r["attention"].sum() - 1) < 1e-5
        assert r["tile_size"] == TILE

    paths = write_mil_outputs(tmp_path / "out", res, num_classes=2)
    pred = pd.read_csv(paths["predictions"], dtype={"slide_id": str})
    assert list(pred.columns[:5]) == ["slide_id", "label", "pred", "p0", "p1"]
    assert len(pred) == 24 and np.allclose(pred[["p0", "p1"]].sum(axis=1), 1, atol=1e-5)
    assert (pred.pred == pred.label).mean() == pytest.approx(metrics["test/accuracy"])
    first = read_attention(paths["attention_dir"] / f"{res[0]['slide_id']}.h5")
    np.testing.assert_allclose(first["attention"], res[0]["attention"])
    np.testing.assert_array_equal(first["coords"], read_features(tmp_path / "feats" / "test000.h5")["coords"])
    assert first["tile_size"] == TILE and first["label"] == res[0]["label"]
    pngs = attention_heatmaps(paths["attention_dir"], tmp_path / "heatmaps", limit=2)
    assert len(pngs) == 2 and all(p.stat().st_size > 0 for p in pngs)


@pytest.mark.parametrize("slide_id", ["../up", "a\\b", ".hidden", "", "tab\there"])
def test_a_slide_id_that_cannot_name_its_attention_file_is_refused(tmp_path, slide_id):
    """The ids are checked as the slide listing checks them: an attention file never lands outside attention/
    or hidden."""
    result = {"slide_id": slide_id, "label": 0, "logits": np.zeros(2), "probs": np.array([0.5, 0.5]),
              "attention": np.ones(1, np.float32), "coords": np.zeros((1, 2)), "tile_size": 224}  # fmt: skip
    with pytest.raises(InputError, match="cannot name the output files"):
        write_mil_outputs(tmp_path / "out", [result], num_classes=2)
    assert not list((tmp_path / "out" / "attention").glob("*")) and not (tmp_path / "up.h5").exists()


def test_a_heatmap_limit_counts_the_slides_drawn(tmp_path):
    """``limit`` heatmaps are drawn when that many slides have coords: a CLAM file without coords sorted first
    does not take one of them (it used to, leaving ``figures.num_slides=1`` with no figure)."""

    def result(sid, coords):
        return {"slide_id": sid, "label": 0, "logits": np.zeros(2), "probs": np.array([0.5, 0.5]),
                "attention": np.full(2, 0.5, np.float32), "coords": coords, "tile_size": 224}  # fmt: skip

    no_coords = np.full((2, 2), -1)
    paths = write_mil_outputs(tmp_path / "out", [result("a", no_coords), result("b", np.array([[0, 0], [224, 0]])),
                                                 result("c", np.array([[0, 0], [0, 224]]))], num_classes=2)  # fmt: skip
    pngs = attention_heatmaps(paths["attention_dir"], tmp_path / "heatmaps", limit=1)
    assert [p.stem for p in pngs] == ["b"]
    assert [p.stem for p in attention_heatmaps(paths["attention_dir"], tmp_path / "all", limit=None)] == ["b", "c"]


def test_mean_pool_end_to_end_with_early_stopping_and_best_checkpoint(tmp_path, one_thread):
    """MeanPool on bags whose every tile is shifted by the label, batches of 3 bags with tile sampling, early
    stopping and checkpointing on val/kappa; the restored best checkpoint scores the test split."""
    L.seed_everything(1)
    labels, _ = make_bags(tmp_path / "feats", {"train": 30, "val": 8, "test": 12}, "shift", seed=1)
    dm = MILDataModule(tmp_path / "feats", labels, batch_size=3, max_tiles_train=10, seed=0)
    model = MILModule("mean_pool", DIM, 2, lr=1e-2, max_epochs=6)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/kappa", mode=MONITOR_MODES["val/kappa"]
    )
    stop = L.pytorch.callbacks.EarlyStopping("val/loss", mode=MONITOR_MODES["val/loss"], patience=3)
    tr = trainer(tmp_path, 6, callbacks=[ckpt, stop])
    tr.fit(model, datamodule=dm)
    assert ckpt.best_model_path
    best = MILModule.load_from_checkpoint(ckpt.best_model_path, weights_only=False)
    assert isinstance(best.head, MeanPool)
    (metrics,) = tr.test(best, datamodule=dm, verbose=False)
    assert metrics["test/accuracy"] >= 0.9 and metrics["test/kappa"] >= 0.75, metrics
    # mean pooling's attention is the pooling weight: uniform over each bag's tiles
    r = best.test_results[0]
    np.testing.assert_allclose(r["attention"], 1 / len(r["attention"]), rtol=1e-5)
    predicted = [row for batch in tr.predict(best, datamodule=dm) for row in batch]
    assert [p["slide_id"] for p in predicted] == [t["slide_id"] for t in best.test_results]
    np.testing.assert_allclose(
        np.stack([p["probs"] for p in predicted]), np.stack([t["probs"] for t in best.test_results])
    )


def test_sampling_training_bags_and_whole_eval_bags(tmp_path):
    labels, _ = make_bags(tmp_path / "feats", {"train": 2, "val": 2, "test": 2}, "shift")
    dm = MILDataModule(tmp_path / "feats", labels, max_tiles_train=7, max_tiles_eval=None)
    train = dm.dataset("train", train=True)
    a, b = train[0], train[0]
    assert len(a["features"]) == 7 and not torch.equal(a["coords"], b["coords"])  # a fresh subset every read
    whole = read_features(train.rows.path[0])
    pos = [np.flatnonzero((whole["coords"] == c.numpy()).all(1))[0] for c in a["coords"]]
    assert pos == sorted(pos)  # sampled tiles keep their file order, features match their coords
    np.testing.assert_array_equal(a["features"].numpy(), whole["features"][pos])
    test = dm.dataset("test")
    assert len(test[0]["features"]) == test.rows.n_tiles[0]
    dm2 = MILDataModule(tmp_path / "feats", labels, max_tiles_eval=5, seed=3)
    ev = dm2.dataset("val")
    assert torch.equal(ev[1]["coords"], ev[1]["coords"]) and len(ev[1]["coords"]) == 5  # the same subset each time


def test_reads_trident_and_clam_files(tmp_path):
    """Files as TRIDENT's save_h5 and CLAM write them (and the variants found in the wild: a 1×N×D features
    dataset, float16 features, no coords) read the same through read_features, the per-file inspection and the
    MIL bags."""
    rng = np.random.default_rng(0)
    d = tmp_path / "feats"
    d.mkdir()
    f1, f2 = rng.normal(size=(5, DIM)).astype(np.float32), rng.normal(size=(3, DIM)).astype(np.float32)
    f3, f4 = rng.normal(size=(4, DIM)).astype(np.float32), rng.normal(size=(2, DIM)).astype(np.float16)
    write_trident(d / "trident.h5", f1, encoder="uni_v1", resolution=224, prune_ratio=None,
                  weights_fingerprint={"size": 3, "mtime": 4})  # fmt: skip
    c2 = np.array([[0, 0], [512, 0], [0, 512]], dtype=np.int64)
    write_clam(d / "clam.h5", f2, c2)
    with h5py.File(d / "batched.h5", "w") as f:  # a leading batch axis: 1×N×D, coords int32
        f.create_dataset("features", data=f3[None])
        f.create_dataset("coords", data=grid_coords(4).astype(np.int32))
    with h5py.File(d / "nocoords.h5", "w") as f:
        f.create_dataset("features", data=f4)
    with h5py.File(d / "trident.h5") as f:  # the layout TRIDENT writes
        assert f["features"].chunks == (1, DIM) and f["features"].maxshape == (None, DIM)
        assert f["features"].attrs["prune_ratio"] == "None"
    np.testing.assert_array_equal(h5py.File(d / "trident.h5")["features"][:], f1)

    t = read_features(d / "trident.h5")
    np.testing.assert_array_equal(t["features"], f1)
    np.testing.assert_array_equal(t["coords"], grid_coords(5))
    assert t["features"].dtype == np.float32 and t["coords"].dtype == np.int64
    assert t["coords_attrs"]["patch_size_level0"] == TILE and t["coords_attrs"]["savetodir"] is None
    assert type(t["coords_attrs"]["patch_size_level0"]) is int  # numpy scalars as plain Python
    assert t["features_attrs"] == {
        "encoder": "uni_v1", "resolution": 224, "prune_ratio": None, "weights_fingerprint": '{"size": 3, "mtime": 4}'
    }  # fmt: skip
    c = read_features(d / "clam.h5")
    np.testing.assert_array_equal(c["features"], f2)
    np.testing.assert_array_equal(c["coords"], c2)
    assert c["coords_attrs"] == {} and c["features_attrs"] == {}
    b = read_features(d / "batched.h5")
    np.testing.assert_array_equal(b["features"], f3)
    assert b["coords"].dtype == np.int64 and (b["coords"] == grid_coords(4)).all()
    n = read_features(d / "nocoords.h5")
    assert n["features"].dtype == np.float32 and (n["features"] == f4.astype(np.float32)).all()
    assert n["coords"].shape == (2, 2) and (n["coords"] == -1).all() and n["coords"].dtype == np.int64
    info = {s: inspect_features(d / f"{s}.h5") for s in ("trident", "clam", "batched", "nocoords")}
    assert {s: (i["n_tiles"], i["dim"], i["tile_size"], i["nonfinite"]) for s, i in info.items()} == {
        "trident": (5, DIM, TILE, 0), "clam": (3, DIM, None, 0), "batched": (4, DIM, None, 0),
        "nocoords": (2, DIM, None, 0),
    }  # fmt: skip
    assert info["trident"]["features_attrs"] == t["features_attrs"]

    ids = ["trident", "clam", "batched", "nocoords"]
    labels = pd.DataFrame({"slide_id": ids, "label": [0, 1, 0, 1], "split": ["train", "val", "val", "val"]})
    dm = MILDataModule(d, labels, num_classes=6)
    assert dm.encoder == "uni_v1" and dm.num_classes == 6 and dm.skipped.empty
    assert dm.rows.set_index("slide_id").n_tiles.to_dict() == {"trident": 5, "clam": 3, "batched": 4, "nocoords": 2}
    bags = {item["slide_id"]: item for ds in (dm.dataset("train"), dm.dataset("val")) for item in ds}
    for s in ids:  # the MIL bag is what read_features reads
        ref = read_features(d / f"{s}.h5")
        np.testing.assert_array_equal(bags[s]["features"].numpy(), ref["features"])
        np.testing.assert_array_equal(bags[s]["coords"].numpy(), ref["coords"])
        assert bags[s]["features"].dtype == torch.float32 and bags[s]["coords"].dtype == torch.int64
    assert bags["trident"]["tile_size"] == TILE and bags["clam"]["tile_size"] is None
    item = bags["clam"]
    assert item["slide_id"] == "clam" and item["label"] == 1
    # CLAM's tile size is unknown from the file; the heatmap infers it from the coords grid
    png = attention_heatmap(item["coords"].numpy(), [0.2, 0.3, 0.5], tmp_path / "clam.png")
    assert png.is_file()


def test_missing_unreadable_and_empty_files_are_skipped(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "feats"
    d.mkdir()
    for name in ("a", "b", "c"):
        write_trident(d / f"{name}.h5", rng.normal(size=(4, DIM)))
    write_trident(d / "empty.h5", np.zeros((0, DIM)), coords=np.zeros((0, 2), np.int64))
    with h5py.File(d / "empty1d.h5", "w") as f:  # a slide without tissue, as TRIDENT saves it: features of shape (0,)
        f.create_dataset("features", data=np.zeros((0,), np.float32))
        f.create_dataset("coords", data=np.array([], np.int32))  # TRIDENT's np.array([]) of no tissue coords
    (d / "broken.h5").write_bytes(b"not an hdf5 file")
    with h5py.File(d / "nofeat.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    ids = ["a", "b", "c", "missing", "empty", "empty1d", "broken", "nofeat"]
    labels = pd.DataFrame({"slide_id": ids, "label": [0, 1, 0, 1, 0, 1, 0, 1], "split": ["train"] * 2 + ["val"] * 6})
    dm = MILDataModule(d, labels)
    assert dm.rows.slide_id.tolist() == ["a", "b", "c"]
    reasons = dm.skipped.set_index("slide_id").reason
    assert list(reasons.index) == ["missing", "empty", "empty1d", "broken", "nofeat"]
    assert "no feature file" in reasons["missing"] and "missing.h5" in reasons["missing"]
    assert "no tiles" in reasons["empty"] and reasons["empty1d"] == "no tiles in empty1d.h5 (empty 'features')"
    assert "cannot read broken.h5" in reasons["broken"]
    assert "no 'features' dataset" in reasons["nofeat"]
    assert dm.skipped.split.tolist() == ["val"] * 5
    batch = collate_bags([dm.dataset("val")[0]])
    assert batch["features"].shape == (1, 4, DIM)


def test_non_finite_features_are_skipped_with_the_count(tmp_path):
    """A training slide with 5 NaNs and a test slide all NaN (an fp16 overflow when embedding): both are listed as
    skipped with the count and the file, the others stay, and no bag the DataModule serves holds a NaN."""
    labels, _ = make_bags(tmp_path / "feats", {"train": 4, "val": 2, "test": 3}, "shift")
    d = tmp_path / "feats"
    feats = read_features(d / "train001.h5")["features"]
    feats.reshape(-1)[[0, 7, 20, 33, 40]] = [np.nan, np.inf, np.nan, -np.inf, np.nan]
    write_trident(d / "train001.h5", feats)
    write_trident(d / "test002.h5", np.full((6, DIM), np.nan))
    assert inspect_features(d / "train001.h5")["nonfinite"] == 5
    assert inspect_features(d / "test002.h5")["nonfinite"] == 6 * DIM
    dm = MILDataModule(d, labels)
    reasons = dm.skipped.set_index("slide_id").reason.to_dict()
    assert reasons == {
        "train001": "5 non-finite feature values (NaN/inf) in train001.h5; embed it again",
        "test002": f"{6 * DIM} non-finite feature values (NaN/inf) in test002.h5; embed it again",
    }
    assert dm.skipped.set_index("slide_id").split.to_dict() == {"train001": "train", "test002": "test"}
    assert len(dm.split_rows("train")) == 3 and len(dm.split_rows("test")) == 2
    for split in ("train", "val", "test"):
        for item in dm.dataset(split):
            assert torch.isfinite(item["features"]).all()


def test_mixed_feature_dimensions_or_encoders_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "dims"
    d.mkdir()
    write_trident(d / "s1.h5", rng.normal(size=(4, DIM)))
    write_trident(d / "s2.h5", rng.normal(size=(4, DIM)))
    write_trident(d / "s3.h5", rng.normal(size=(4, 2 * DIM)))
    labels = pd.DataFrame({"slide_id": ["s1", "s2"], "label": [0, 1], "split": ["train", "val"]})
    with pytest.raises(ValueError, match=r"mixes feature dimensions: s1\.h5 has 16, s3\.h5 has 32"):
        MILDataModule(d, labels)
    e = tmp_path / "encoders"
    e.mkdir()
    write_trident(e / "s1.h5", rng.normal(size=(4, DIM)), encoder="uni_v1")
    write_trident(e / "s2.h5", rng.normal(size=(4, DIM)), encoder="conch_v15")
    with pytest.raises(ValueError, match=r"mixes 'encoder' attrs: s1\.h5 has 'uni_v1', s2\.h5 has 'conch_v15'"):
        scan_feature_dir(e)
    r = tmp_path / "resolutions"  # hirespath: same encoder at another tile size is other features
    r.mkdir()
    write_trident(r / "s1.h5", rng.normal(size=(4, DIM)), resolution=224)
    write_trident(r / "s2.h5", rng.normal(size=(4, DIM)), resolution=1792)
    with pytest.raises(ValueError, match=r"'resolution' attrs: s1\.h5 has 224, s2\.h5 has 1792"):
        scan_feature_dir(r)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no <slide>.h5 feature files"):
        scan_feature_dir(tmp_path / "empty")
    # CLAM's training folder (pt_files, what its main.py reads) is named, and the h5_files beside it
    clam = tmp_path / "clam"
    (clam / "pt_files").mkdir(parents=True), (clam / "h5_files").mkdir()
    torch.save(torch.zeros(4, DIM), clam / "pt_files" / "s1.pt")
    with pytest.raises(InputError, match=rf"holds 1 \.pt files, CLAM's pt_files .*: give CLAM's h5_files folder "
                                         rf"{clam / 'h5_files'}, the same features"):  # fmt: skip
        scan_feature_dir(clam / "pt_files")


def test_an_evaluation_subset_is_the_slides_own_wherever_it_sits_in_the_table(tmp_path):
    """max_tiles_eval's tiles were drawn by the slide's row number: predict_slides over a whole folder drew other
    tiles for a test slide than mil's test split had, and its prediction changed with the folder's other slides."""
    from hirespath.data.mil import SlideFeatureDataset

    rng = np.random.default_rng(0)
    rows = []
    for s in ("a", "b", "c"):
        write_trident(tmp_path / f"{s}.h5", rng.normal(size=(40, DIM)))
        rows.append({"slide_id": s, "path": str(tmp_path / f"{s}.h5"), "label": 0})
    alone = SlideFeatureDataset(pd.DataFrame(rows[2:]), max_tiles=8, seed=3)[0]
    among = SlideFeatureDataset(pd.DataFrame(rows), max_tiles=8, seed=3)[2]
    assert among["slide_id"] == alone["slide_id"] == "c" and len(alone["features"]) == 8
    assert torch.equal(alone["features"], among["features"]) and torch.equal(alone["coords"], among["coords"])
    other_seed = SlideFeatureDataset(pd.DataFrame(rows[2:]), max_tiles=8, seed=4)[0]
    assert not torch.equal(alone["coords"], other_seed["coords"])  # still drawn, by the run's seed


def test_weights_are_compared_by_size_and_digest_not_by_path(tmp_path):
    """Slides embedded on several nodes, each from its own copy of the weights file (another path and mtime), hold
    the same features and train one model (embed_slides put them in one folder); another file of the same size
    (a fine-tuned copy) is refused by its digest. Files written before the digest compare by size."""
    rng = np.random.default_rng(0)

    def folder(name, *fingerprints):
        d = tmp_path / name
        d.mkdir()
        for k, fp in enumerate(fingerprints):
            write_trident(d / f"s{k}.h5", rng.normal(size=(4, DIM)), weights_fingerprint=fp)
        return d

    node = {"size": 10, "digest": "aa"}
    copies = folder("copies", {"path": "/node1/uni.bin", "mtime": 1, **node}, {"path": "/node2/uni.bin", "mtime": 2,
                    **node}, {"path": "/old/uni.bin", "mtime": 3, "size": 10})  # fmt: skip
    assert len(scan_feature_dir(copies)) == 3
    tuned = folder("tuned", {"path": "/a", "mtime": 1, "size": 10, "digest": "aa"},
                   {"path": "/a", "mtime": 1, "size": 10, "digest": "bb"})  # fmt: skip
    with pytest.raises(ValueError, match=r"mixes weights_digest: s0\.h5 has 'aa', s1\.h5 has 'bb'"):
        scan_feature_dir(tuned)
    other = folder("other", {"path": "/a", "mtime": 1, "size": 10}, {"path": "/a", "mtime": 1, "size": 12})
    with pytest.raises(ValueError, match=r"mixes weights_size: s0\.h5 has 10, s1\.h5 has 12"):
        scan_feature_dir(other)


def test_feature_scan_is_cached_and_rereads_only_changed_files(tmp_path, monkeypatch):
    """A rerun reads no h5 (the scan is kept beside them by size, mtime and inode); a rewritten file, a new one and
    an unreadable one (a read error may pass) are read again; a folder that cannot be written is scanned anyway."""
    import hirespath.data.mil as mil

    labels, _ = make_bags(tmp_path / "feats", {"train": 3, "val": 1, "test": 1}, "shift")
    d = tmp_path / "feats"
    (d / "broken.h5").write_bytes(b"not an h5 file")
    first = scan_feature_dir(d)
    assert (d / mil.SCAN_CACHE).is_file() and first.error.notna().sum() == 1
    read = []
    inspect = mil.trident_h5.inspect_features

    def counted(path, *args, **kwargs):
        read.append(Path(path).name)
        return inspect(path, *args, **kwargs)

    monkeypatch.setattr(mil.trident_h5, "inspect_features", counted)
    again = scan_feature_dir(d)
    pd.testing.assert_frame_equal(again, first)
    assert read == ["broken.h5"]  # an OSError is not cached
    read.clear()
    write_trident(d / "train001.h5", np.full((6, DIM), np.nan))  # rewritten
    write_trident(d / "extra.h5", np.ones((2, DIM)))  # new
    third = scan_feature_dir(d).set_index("slide_id")
    assert sorted(read) == ["broken.h5", "extra.h5", "train001.h5"]
    assert third.loc["train001"].error.startswith(f"{6 * DIM} non-finite") and third.loc["extra"].n_tiles == 2
    cached = json.loads((d / mil.SCAN_CACHE).read_text())["files"]
    assert "broken.h5" not in cached and cached["extra.h5"]["row"]["n_tiles"] == 2

    def read_only(path):
        raise PermissionError(f"read-only file system: {path}")

    (d / mil.SCAN_CACHE).unlink()
    monkeypatch.setattr(mil, "atomic_path", read_only)
    pd.testing.assert_frame_equal(scan_feature_dir(d).set_index("slide_id"), third)
    assert not (d / mil.SCAN_CACHE).exists()


def test_label_table_errors_name_the_bad_rows(tmp_path):
    write_trident(tmp_path / "a.h5", np.zeros((2, DIM)))
    ok = {"slide_id": ["a", "b"], "label": [0, 1], "split": ["train", "val"]}
    with pytest.raises(ValueError, match=r"label must be an integer.*b: 1\.5"):
        MILDataModule(tmp_path, pd.DataFrame({**ok, "label": [0, 1.5]}))
    with pytest.raises(ValueError, match=r"split must be one of.*b: 'valid'"):
        MILDataModule(tmp_path, pd.DataFrame({**ok, "split": ["train", "valid"]}))
    with pytest.raises(ValueError, match=r"lacks columns \['split'\]"):
        MILDataModule(tmp_path, pd.DataFrame({"slide_id": ["a"], "label": [0]}))
    with pytest.raises(ValueError, match="num_classes=2"):
        MILDataModule(tmp_path, pd.DataFrame({**ok, "label": [0, 5]}), num_classes=2)
    with pytest.raises(ValueError, match="no slide of the label table has a usable feature file"):
        MILDataModule(tmp_path, pd.DataFrame({**ok, "slide_id": ["x", "y"]}))
    with pytest.raises(ValueError, match="unknown MIL head 'transmil'; valid: abmil, mean_pool"):
        create_mil_head("transmil", DIM, 2)


@pytest.mark.parametrize("head", ["abmil", "mean_pool"])
def test_padding_does_not_change_a_bags_output(head):
    """A bag alone and the same bag padded (with garbage) in a batch with a bigger bag: same logits, attention 0 on
    padding, summing to 1 over the real tiles."""
    torch.manual_seed(0)
    net = create_mil_head(head, DIM, 3, **({"hidden": 32, "attention_hidden": 8} if head == "abmil" else {})).eval()
    small, big = torch.randn(5, DIM), torch.randn(12, DIM)
    alone = net(small[None])
    x = torch.randn(2, 12, DIM) * 100  # padding that would swamp the output if it leaked in
    x[0, :5], x[1] = small, big
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :5], mask[1] = True, True
    out = net(x, mask)
    torch.testing.assert_close(out.logits[0], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention[0, :5], alone.attention[0], atol=1e-6, rtol=1e-5)
    assert (out.attention[0, 5:] == 0).all()
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))
    torch.testing.assert_close(out.logits[1], net(big[None]).logits[0], atol=1e-5, rtol=1e-5)
    # through collate_bags (zero padding) the same
    items = [
        {"features": t, "coords": torch.zeros(len(t), 2, dtype=torch.long), "label": 0, "slide_id": s, "index": i}
        for i, (s, t) in enumerate((("s", small), ("b", big)))
    ]
    batch = collate_bags([{**it, "tile_size": None} for it in items])
    assert batch["mask"].sum(1).tolist() == [5, 12] and (batch["coords"][0, 5:] == -1).all()
    torch.testing.assert_close(net(batch["features"], batch["mask"]).logits[0], alone.logits[0], atol=1e-5, rtol=1e-5)
    # a bag without any tile does not produce NaN
    assert torch.isfinite(net(torch.randn(1, 4, DIM), torch.zeros(1, 4, dtype=torch.bool)).logits).all()


def test_bf16_autocast_keeps_attention_in_float32():
    net = ABMIL(DIM, 3, hidden=32, attention_hidden=8).eval()
    x, mask = torch.randn(2, 9, DIM), torch.ones(2, 9, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, mask)
    assert out.logits.dtype == torch.bfloat16 and out.attention.dtype == torch.float32
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))
    assert (out.attention[0, 4:] == 0).all()
    torch.testing.assert_close(out.logits.float(), net(x, mask).logits, atol=0.1, rtol=0.05)


def test_abmil_structure_matches_clam():
    """CLAM_SB's layers: Linear(D, 512) + ReLU + dropout, gated attention 512→256 (tanh ⊙ sigmoid) → 1, classifier."""
    net = ABMIL(1024, 6)
    assert [type(m).__name__ for m in net.fc] == ["Linear", "ReLU", "Dropout"] and net.fc[0].out_features == 512
    assert net.attention.attention_a[0].out_features == 256 and isinstance(
        net.attention.attention_b[1], torch.nn.Sigmoid
    )
    assert net.attention.attention_c.out_features == 1 and net.classifier.in_features == 512
    assert net.classifier.out_features == 6
    with pytest.raises(ValueError, match="B×N×D"):
        net(torch.randn(5, 1024))


def test_heatmap_over_slide_thumbnail_and_plain_canvas(tmp_path):
    from PIL import Image

    from hirespath.data.panda_synthetic import make_synthetic_panda

    root = make_synthetic_panda(tmp_path / "panda", num_slides=1, size=(384, 512), seed=0)
    slide = next((root / "train_images").glob("*.tiff"))
    coords = np.array([[x, y] for y in range(0, 384, 128) for x in range(0, 512, 128)], dtype=np.int64)
    att = np.linspace(0, 1, len(coords))
    att /= att.sum()
    on_slide = attention_heatmap(coords, att, tmp_path / "slide.png", tile_size=128, slide_path=slide, alpha=0.3)
    plain = attention_heatmap(coords, att, tmp_path / "plain.png", tile_size=128)
    missing = attention_heatmap(coords, att, tmp_path / "missing.png", tile_size=128, slide_path=tmp_path / "no.tiff")
    a, b, c = (np.asarray(Image.open(p).convert("RGB")) for p in (on_slide, plain, missing))
    assert a.shape == b.shape and not np.array_equal(a, b)  # the thumbnail shows through the overlay
    np.testing.assert_array_equal(b, c)  # an unreadable slide falls back to the plain canvas
    assert (np.abs(b.astype(int) - 255).sum(2) > 60).mean() > 0.2  # the tiles are coloured
    with pytest.raises(ValueError, match="no tile coords"):
        attention_heatmap(np.full((3, 2), -1), np.ones(3) / 3, tmp_path / "x.png")


def test_the_heatmap_of_a_thin_slide_is_as_long_as_a_wide_ones(tmp_path):
    """The figure's height grew with the slide's aspect: one column of 90 tiles (a needle biopsy) made a heatmap
    840 × 74,796 px, mostly blank, its colour bar and title tiny. Its long side is now a wide slide's."""
    from PIL import Image

    att = np.linspace(0.1, 1, 90)
    tall = attention_heatmap(np.stack([np.zeros(90, int), 224 * np.arange(90)], 1), att, tmp_path / "t.png", 224)
    wide = attention_heatmap(np.stack([224 * np.arange(90), np.zeros(90, int)], 1), att, tmp_path / "w.png", 224)
    (tw, th), (ww, wh) = Image.open(tall).size, Image.open(wide).size
    assert th > tw and th <= 1.2 * ww, ((tw, th), (ww, wh))
    # a long title (attention_heatmaps': slide, label, prediction, tiles) over the narrow figure is not cut off
    coords = np.stack([np.zeros(90, int), 224 * np.arange(90)], 1)
    titled = attention_heatmap(coords, att, tmp_path / "titled.png", 224, title="x" * 60)
    assert Image.open(titled).size[0] > tw + 100


def test_the_heatmap_shows_its_thumbnail_at_max_side(tmp_path):
    """predict_slides reads the thumbnail at heatmaps.max_side (2,048 px) but drew the figure at a fixed 120 dpi: the
    PNG was about 840 px on its long side whatever max_side said, so asking for more detail gave none. The figure's
    dpi now shows the thumbnail at its own pixels (and never below 120 dpi, for a small one)."""
    from PIL import Image

    coords = np.array([[x, y] for y in range(0, 3000, 250) for x in range(0, 4000, 250)], dtype=np.int64)
    att = np.random.default_rng(0).random(len(coords))
    sizes = {m: Image.open(attention_heatmap(coords, att, tmp_path / f"{m}.png", 250, max_side=m)).size
             for m in (256, 1024, 2048)}  # fmt: skip
    for m in (1024, 2048):
        w, h = sizes[m]
        assert m <= w <= 1.35 * m and 0.75 * m <= h <= 0.75 * 1.35 * m, (m, sizes[m])  # 4:3 and a colour bar
    assert 700 <= sizes[256][0] <= 1000  # small: the 120 dpi figure it always was


def test_heatmap_of_a_slide_qupath_crops_shows_its_scanned_region(tmp_path, monkeypatch):
    """A MIRAX/SCN slide's canvas can be several times its scanned region: the heatmap's background is the region
    QuPath shows (so the tissue fills the picture), the tiles drawn where they lie in it; a tile that starts before
    the region is drawn from its edge (a negative start had sliced from the far end: nothing drawn)."""
    from hirespath.data.panda_synthetic import make_synthetic_panda
    from hirespath.viz import mil as viz
    from hirespath.viz.mil import token_overlay

    root = make_synthetic_panda(tmp_path / "panda", num_slides=1, size=(384, 512), seed=0)
    slide = next((root / "train_images").glob("*.tiff"))
    whole, region = viz._thumbnail(slide, 256)
    assert region == (0, 0, 512, 384) and whole.shape[:2] == (192, 256)
    crop = (128, 64, 256, 256)
    monkeypatch.setattr(viz.qupath, "image_region", lambda s: crop)
    image, region = viz._thumbnail(slide, 256)
    assert region == crop and image.shape[:2] == (256, 256)  # the region at level 0: 256 px, the long side
    shown = whole[32:160, 64:192].astype(float)  # the same region in the whole slide's thumbnail (2× smaller)
    halved = image.reshape(128, 2, 128, 2, 3).mean((1, 3))
    assert np.abs(halved - shown).mean() < 6
    # tiles at level-0 (0, 0) and (128, 64), 128 px: in the crop's pixels (-128, -64) is outside, (0, 0) its corner
    coords = np.array([[0, 0], [128, 64]]) - np.array(crop[:2])
    overlay = tile_overlay(coords, np.array([0.2, 0.9]), (256, 256), 1.0, 1.0, 128)
    assert np.isnan(overlay[128:, :]).all() and np.isnan(overlay[:, 128:]).all()  # nothing wrapped to the far edges
    assert (overlay[:128, :128] == 0.9).all()
    straddling = tile_overlay(np.array([[-64, -64]]), np.array([0.7]), (256, 256), 1.0, 1.0, 128)
    assert (straddling[:64, :64] == 0.7).all() and np.isnan(straddling[64:, :]).all()
    tokens = token_overlay(np.array([[-64, -64]]), np.arange(4.0).reshape(1, 2, 2), (256, 256), 1.0, 1.0, 128)
    assert (tokens[:64, :64] == 3).all() and np.isnan(tokens[64:, :]).all()  # only the last patch lies inside
    png = attention_heatmap(np.array([[128, 64], [256, 192]]), np.array([0.4, 0.6]), tmp_path / "crop.png",
                            tile_size=128, slide_path=slide)  # fmt: skip
    assert png.stat().st_size > 0


def test_heatmap_thumbnail_of_a_one_level_slide_is_read_in_strips(tmp_path, monkeypatch):
    """OpenSlide's get_thumbnail reads its best level whole: for a one-level slide (a flat TIFF export), all of
    level 0 at once (10 GB RGBA for 50,000 px). The heatmap's background is read in strips, as the tissue
    thumbnails are, and has the asked-for long side."""
    from hirespath.data.panda_synthetic import write_pyramid
    from hirespath.viz import mil as viz
    from hirespath.wsi.reader import open_slide

    h, w = 3072, 4096  # 50 MB as RGBA, more than one strip (32 MB)
    gradient = np.linspace(40, 220, w, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(gradient, (h, w, 3)).astype(np.uint8)
    path = tmp_path / "flat.tiff"
    write_pyramid(path, image, 0.5, compression="jpeg", levels=(1,))
    reads = []

    def recording(p):
        slide = open_slide(p)
        real = slide.read_region

        def read_region(location, level, size):
            reads.append(size[0] * size[1] * 4)
            return real(location, level, size)

        slide.read_region = read_region
        return slide

    monkeypatch.setattr(viz, "open_slide", recording)
    thumb, region = viz._thumbnail(path, 512)
    assert region == (0, 0, w, h) and thumb.shape == (384, 512, 3)
    assert reads and max(reads) <= 32 << 20  # never the whole level
    assert abs(float(thumb[:, 0].mean()) - 40) < 6 and abs(float(thumb[:, -1].mean()) - 220) < 6  # its left, right


def test_panda_slide_labels_use_the_roi_tasks_split_file(tmp_path):
    from hirespath.data.panda import load_or_make_split, read_labels

    root = tmp_path / "panda"
    (root / "train_images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 60
    pd.DataFrame(
        {
            "image_id": [f"{i:08x}" for i in range(n)],
            "data_provider": rng.choice(["radboud", "karolinska"], n),
            "isup_grade": np.arange(n) % 6,
            "gleason_score": "3+3",
        }
    ).to_csv(root / "train.csv", index=False)
    cache = tmp_path / "cache"
    labels = panda_slide_labels(root, cache_dir=cache)
    # the path classify/extract use: cache/panda/<sha256 of the resolved root, 10 hex>/split_seed42.csv
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    split_csv = cache / "panda" / tag / "split_seed42.csv"
    assert split_csv.is_file()
    roi_split = load_or_make_split(root, split_csv, split_seed=42)
    assert labels.slide_id.tolist() == roi_split.image_id.tolist()
    assert labels.split.tolist() == roi_split.split.tolist() and labels.label.tolist() == roi_split.isup_grade.tolist()
    assert set(labels.split) == {"train", "val", "test"} and "data_provider" in labels
    # an existing split file is reused as is, not redrawn
    swapped = pd.read_csv(split_csv, dtype={"image_id": str})
    swapped["split"] = swapped.split.map({"train": "test", "test": "train", "val": "val"})
    swapped.to_csv(split_csv, index=False)
    again = panda_slide_labels(root, cache_dir=cache)
    assert (again.split.to_numpy() == swapped.split.to_numpy()).all()
    assert len(read_labels(root)) == n
    with pytest.raises(ValueError, match="needs split_csv or cache_dir"):
        panda_slide_labels(root)


class WriteOutputs(L.Callback):
    """What the mil task does after trainer.test: rank 0 writes the gathered per-slide results."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            write_mil_outputs(self.out_dir, pl_module.test_results, 2)


@pytest.mark.slow
def test_ddp_test_outputs_equal_single_process(tmp_path):
    """7 test slides over 2 gloo processes: every slide predicted once (no padding repeats), in the dataset's order,
    and the same metrics as one process."""
    labels, _ = make_bags(tmp_path / "feats", {"train": 4, "val": 2, "test": 7}, "shift")
    torch.manual_seed(0)
    model = MILModule("abmil", DIM, 2, head_kwargs={"hidden": 8, "attention_hidden": 4, "dropout": 0.0})
    metrics = {}
    for name, kw in (("single", {"devices": 1}), ("ddp", {"devices": 2, "strategy": "ddp_spawn"})):
        dm = MILDataModule(tmp_path / "feats", labels, batch_size=2)
        tr = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[WriteOutputs(tmp_path / name)],
            **kw,
        )
        (metrics[name],) = tr.test(model, datamodule=dm, verbose=False)
    single, ddp = (pd.read_csv(tmp_path / n / "predictions.csv", dtype={"slide_id": str}) for n in ("single", "ddp"))
    assert ddp.slide_id.tolist() == dm.split_rows("test").slide_id.tolist()
    pd.testing.assert_frame_equal(ddp, single, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "ddp" / "attention").glob("*.h5"))) == 7
    assert metrics["ddp"] == pytest.approx(metrics["single"], abs=1e-5)


def test_end_to_end_on_embedded_synthetic_panda_slides(tmp_path, one_thread):
    """Synthetic PANDA slides embedded by embed_slides (tiny encoder, sparse + pruned), PANDA labels on the ROI
    tasks' split, then ABMIL and mean pool: fit, test, predictions + attention files, heatmaps on the thumbnails.
    One labelled slide is not embedded: it is listed as skipped."""
    from conftest import embed_kw as embed_slides

    import hirespath
    from hirespath.data.panda_synthetic import make_synthetic_panda

    root = make_synthetic_panda(tmp_path / "panda", num_slides=12, size=(384, 512), seed=2)
    labels = panda_slide_labels(root, cache_dir=tmp_path / "cache")
    missing = labels.slide_id[labels.split == "train"].iloc[0]
    torch.manual_seed(0)
    enc = hirespath.create_encoder(
        "tiny", attention="sparse", window=4, prune_ratio=0.5, prune_layer=1, init_values=1.0, depth=2
    ).eval()
    slides = [root / "train_images" / f"{s}.tiff" for s in labels.slide_id if s != missing]
    summary = embed_slides(
        enc, slides, tmp_path / "job", tile_size=112, tile_mpp=0.5, min_tissue=0.1, batch_size=16, num_workers=0,
        progress=False, thumbnails=False, device="cpu",
    )  # fmt: skip
    dm = MILDataModule(summary["features_dir"], labels, batch_size=2, max_tiles_train=6, num_classes=6)
    assert dm.skipped.slide_id.tolist() == [missing] and len(dm.rows) == 11
    assert dm.feature_dim == enc.embed_dim and dm.encoder == summary["encoder"]
    for head in ("abmil", "mean_pool"):
        model = MILModule(head, dm.feature_dim, 6, lr=1e-3, max_epochs=2)
        tr = trainer(tmp_path / head, 2)
        tr.fit(model, datamodule=dm)
        (metrics,) = tr.test(model, datamodule=dm, verbose=False)
        paths = write_mil_outputs(tmp_path / head, model.test_results, num_classes=6)
        pred = pd.read_csv(paths["predictions"], dtype={"slide_id": str})
        # the logged test metrics are the ROI task's keys, computed on the written predictions
        probs = torch.tensor(pred[[f"p{c}" for c in range(6)]].to_numpy())
        again = classification_metrics(probs, torch.tensor(pred.label.to_numpy()), 6)
        assert {k: metrics[k] for k in again} == pytest.approx(again, abs=1e-4, nan_ok=True)
        assert pred.slide_id.tolist() == dm.split_rows("test").slide_id.tolist()
        assert list(pred.columns[3:9]) == [f"p{c}" for c in range(6)]
        sid = pred.slide_id.iloc[0]
        att = read_attention(paths["attention_dir"] / f"{sid}.h5")
        with h5py.File(dm.rows.set_index("slide_id").path[sid]) as f:
            np.testing.assert_array_equal(att["coords"], f["coords"][:])
            assert att["tile_size"] == int(f["coords"].attrs["patch_size_level0"])
        pngs = attention_heatmaps(
            paths["attention_dir"],
            tmp_path / head / "heatmaps",
            slide_path=lambda s: root / "train_images" / f"{s}.tiff",
        )
        assert [p.stem for p in pngs] == sorted(pred.slide_id)[:4]


def test_a_figure_killed_while_written_leaves_the_last_one(tmp_path, monkeypatch):
    """Every PNG (heatmaps, overlays, benchmark plots, reports) goes through ``save_png``: a run killed while
    writing one leaves the previous picture, or none, never half a file that a viewer then cannot open."""
    from matplotlib.figure import Figure

    from hirespath.viz.figures import pyplot, save_png
    from hirespath.viz.segmentation import segmentation_overlay

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = tmp_path / "plot.png"
    save_png(fig, path, close=False)
    first = path.read_bytes()
    ax.plot([1, 0])

    def killed(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        save_png(fig, path)
    assert path.read_bytes() == first and list(tmp_path.iterdir()) == [path]
    assert not plt.fignum_exists(fig.number)  # closed all the same
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(KeyboardInterrupt):
        segmentation_overlay(image, np.ones((32, 32)), np.zeros((32, 32)), "t", tmp_path / "overlay.png")
    assert list(tmp_path.iterdir()) == [path]

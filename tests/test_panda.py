"""PANDA: reader on generated pyramids, labels/splits, skip list, cache, heads and metrics, classify end to end."""

import functools
import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from hirespath.data.panda import check_panda_root, make_split, read_labels
from hirespath.data.panda_synthetic import make_synthetic_panda, write_pyramid
from hirespath.wsi.reader import open_slide, slide_mpp
from hirespath.wsi.rois import find_rois, locate_rois, read_roi
from hirespath.wsi.tissue import tissue_mask

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# the predict Trainer of extract_embeddings, as tasks build it from the trainer group (instantiate, _partial_)
CPU_TRAINER = functools.partial(L.Trainer, accelerator="cpu", enable_progress_bar=False)


@pytest.fixture(scope="module")
def panda_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("panda")
    make_synthetic_panda(root, num_slides=24, size=(512, 768), seed=1)
    return root


def test_generated_pyramid_reads_like_panda(panda_root):
    ids = pd.read_csv(panda_root / "train.csv").image_id
    path = panda_root / "train_images" / f"{ids[0]}.tiff"
    for reader in ("openslide", "tiffslide"):
        if reader == "openslide":
            slide = open_slide(path)
        else:
            import tiffslide

            slide = tiffslide.TiffSlide(str(path))
        assert slide.level_count == 3
        assert [round(d) for d in slide.level_downsamples] == [1, 4, 16]
        assert slide.dimensions == (768, 512)
        assert slide_mpp(slide) == pytest.approx(0.5, rel=1e-3)
        slide.close()
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == tifffile.COMPRESSION.JPEG
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert tif.pages[1].subfiletype == 1
    mask = open_slide(panda_root / "train_label_masks" / f"{ids[0]}_mask.tiff")
    red = np.asarray(mask.read_region((0, 0), 0, mask.dimensions))[..., 0]
    assert set(np.unique(red)) <= set(range(6)) and red.max() >= 1


def test_tissue_detection_and_roi(panda_root):
    ids = pd.read_csv(panda_root / "train.csv").image_id
    rois, mpp = locate_rois(panda_root / "train_images" / f"{ids[1]}.tiff", fov_um=128, count=2)
    assert mpp == pytest.approx(0.5) and len(rois) == 2
    assert all(r.size == 256 and r.tissue_fraction > 0.5 for r in rois)
    a, b = rois
    assert abs(a.x - b.x) >= 256 or abs(a.y - b.y) >= 256  # non-overlapping
    rgb = read_roi(panda_root / "train_images" / f"{ids[1]}.tiff", a, 112)
    assert rgb.shape == (112, 112, 3) and rgb.dtype == np.uint8
    assert tissue_mask(rgb).mean() > 0.5


def test_find_rois_picks_the_densest_window():
    mask = np.zeros((40, 40), bool)
    mask[30:38, 5:13] = True
    (roi,) = find_rois(mask, downsample=16, size0=128)
    assert (roi.x, roi.y) == (5 * 16, 30 * 16) and roi.tissue_fraction == 1.0


def test_bad_slides_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "panda"
    make_synthetic_panda(root, num_slides=12, size=(512, 768), seed=2)
    labels = pd.read_csv(root / "train.csv")
    ids = labels.image_id.tolist()
    (root / "train_images" / f"{ids[0]}.tiff").write_bytes(b"II*\x00garbage" * 10)  # corrupt
    write_pyramid(
        root / "train_images" / f"{ids[1]}.tiff", np.full((512, 768, 3), 243, np.uint8), 0.5, compression="jpeg"
    )  # blank glass: no tissue
    tifffile.imwrite(
        root / "train_images" / f"{ids[2]}.tiff",
        np.full((512, 768, 3), 200, np.uint8),
        tile=(256, 256),
        photometric="rgb",
    )  # no resolution tags: no mpp
    (root / "train_images" / f"{ids[3]}.tiff").unlink()  # missing
    from hirespath.data.panda import locate_all

    split = make_split(read_labels(root), seed=42)
    rois, skipped = locate_all(root, split, 128, 1, 0.05, tmp_path / "rois.csv")
    reasons = dict(zip(skipped.image_id, skipped.reason))
    assert set(reasons) == set(ids[:4])
    assert "cannot read" in reasons[ids[0]]
    assert "no tissue" in reasons[ids[1]]
    assert "microns-per-pixel" in reasons[ids[2]]
    assert "missing" in reasons[ids[3]]
    assert set(rois.image_id) == set(ids[4:])


def test_not_panda_root_and_bad_grades(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing train.csv, train_images/"):
        check_panda_root(tmp_path)
    (tmp_path / "train_images").mkdir()
    pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "data_provider": ["radboud"] * 3,
            "isup_grade": [1, 7, "x"],
            "gleason_score": ["3+3", "5+5", "negative"],
        }
    ).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(
        ValueError, match=r"isup_grade must be an integer 0–5; bad rows: row 3 \(b: '7'\), row 4 \(c: 'x'\)"
    ):
        read_labels(tmp_path)


def test_split_is_stratified_and_reproducible(panda_root):
    rng = np.random.default_rng(0)
    grades = rng.choice(6, size=600, p=[0.27, 0.25, 0.13, 0.12, 0.12, 0.11])
    labels = pd.DataFrame({"image_id": [f"s{i}" for i in range(600)], "isup_grade": grades})
    a, b = make_split(labels, seed=42), make_split(labels, seed=42)
    assert a.split.tolist() == b.split.tolist()
    assert a.split.value_counts().to_dict() == {"train": 420, "val": 90, "test": 90}
    counts = a.groupby(["isup_grade", "split"]).size().unstack(fill_value=0)
    totals = counts.sum(axis=1)
    for split, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert (abs(counts[split] - totals * frac) <= 1.5).all()  # stratified: per-grade shares kept
    assert not a.split.equals(make_split(labels, seed=7).split)
    assert read_labels(panda_root).gleason_score.isin(["negative"]).sum() == 0  # normalised to 0+0


def test_knn_matches_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    from hirespath.probes.knn import KNNClassifier

    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(300, 16, generator=g), torch.randint(0, 6, (300,), generator=g)
    xte = torch.randn(80, 16, generator=g)
    ours = KNNClassifier(k=20, center_l2=False, num_classes=6).fit(xtr, ytr)
    ref = KNeighborsClassifier(n_neighbors=20, metric="euclidean").fit(xtr.numpy(), ytr.numpy())
    np.testing.assert_allclose(ours.predict_proba(xte).numpy(), ref.predict_proba(xte.numpy()), atol=1e-6)
    assert (ours.predict(xte).numpy() == ref.predict(xte.numpy())).all()


def test_knn_centres_and_l2_normalises_by_default():
    """UNI's eval_knn (and conf/head/knn.yaml) centre on the train mean and L2-normalise; so does the default."""
    from sklearn.neighbors import KNeighborsClassifier

    from hirespath.probes.knn import KNNClassifier

    # Train mean (5, 5). The query's raw Euclidean neighbour is b (label 1), its neighbour by direction from the
    # origin is d (label 3, L2 without centring), its neighbour by direction from the train mean is a (label 0).
    xtr = torch.tensor([[15.0, 5], [5, 6], [-5, 5], [5, 4]])
    ytr = torch.tensor([0, 1, 2, 3])
    q = torch.tensor([[6.0, 5.5]])
    assert KNNClassifier(k=1, center_l2=False).fit(xtr, ytr).predict(q).tolist() == [1]
    assert KNNClassifier(k=1).fit(xtr, ytr).predict(q).tolist() == [0]

    g = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(300, 16, generator=g) + 2, torch.randint(0, 6, (300,), generator=g)
    xte = torch.randn(80, 16, generator=g) + 2
    mean = xtr.mean(0, keepdim=True)

    def cl2n(x):
        return torch.nn.functional.normalize(x - mean, dim=1).numpy()

    ref = KNeighborsClassifier(n_neighbors=20, metric="euclidean").fit(cl2n(xtr), ytr.numpy())
    ours = KNNClassifier(num_classes=6).fit(xtr, ytr)
    np.testing.assert_allclose(ours.predict_proba(xte).numpy(), ref.predict_proba(cl2n(xte)), atol=1e-6)


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    from hirespath.metrics.classification import classification_metrics

    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 6, (300,), generator=g)
    p = (torch.randn(300, 6, generator=g) + 2 * torch.nn.functional.one_hot(y, 6)).softmax(1)
    m = classification_metrics(p, y, 6)
    pred = p.argmax(1).numpy()
    assert m["test/accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert m["test/balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-6)
    assert m["test/f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-6)
    assert m["test/auroc"] == pytest.approx(roc_auc_score(y, p.numpy(), multi_class="ovr"), abs=1e-5)
    assert m["test/kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-5)


def test_lbfgs_probe_separates_separable_data():
    from hirespath.probes.linear_probe import fit_lbfgs

    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 3, (150,), generator=g)
    x = torch.randn(150, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float() * 3 + 10
    fc = fit_lbfgs(x, y, 3, l2=1e-4, max_iter=200)
    assert (fc(x).argmax(1) == y).float().mean() == 1.0


def test_uni_probe_minimises_unis_objective():
    """mahmoodlab/UNI's probe: raw features, C = D·K/100, cross-entropy + (1/C)·0.5·‖W‖ — stationary at the fit."""
    from hirespath.probes.linear_probe import fit_uni_probe

    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (200,), generator=g)
    x = torch.randn(200, 256, generator=g) + torch.nn.functional.one_hot(y, 256).float()
    fc = fit_uni_probe(x, y, 4)
    w, b = fc.weight.detach().requires_grad_(), fc.bias.detach().requires_grad_()
    cost = 256 * 4 / 100
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + (1 / cost) * 0.5 * w.norm()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4
    assert (fc(x).argmax(1) == y).float().mean() > 0.8


def test_adamw_probe_learns_badly_scaled_embeddings(tmp_path):
    """Embeddings with a large offset and scale (as some backbones give): the probe standardises them with the
    training statistics, stored in the checkpoint, and separates the classes."""
    from hirespath.modules.linear_probe import train_linear_probe

    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (90,), generator=g)
    x = (torch.randn(90, 16, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 16).float()) * 50 + 400
    model = train_linear_probe(
        (x[:60], y[:60]),
        (x[60:], y[60:]),
        3,
        lr=3e-2,
        weight_decay=0.0,
        max_epochs=50,
        patience=50,
        batch_size=32,
        seed=0,
        trainer=functools.partial(
            L.Trainer, accelerator="cpu", default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False
        ),
    )
    assert (model.predict_proba(x[60:]).argmax(1) == y[60:]).float().mean() >= 0.9
    torch.testing.assert_close(model.mean, x[:60].mean(0))


def _compose(overrides, out, cache):
    from conftest import compose_task

    return compose_task("classify", overrides, out, cache)


@pytest.mark.parametrize("head", ["knn", "linear_probe", "linear_probe_uni"])
def test_classify_end_to_end(panda_root, tmp_path, head, caplog):
    from hirespath.tasks.classify import run_classify

    head_args = {
        "knn": ["head=knn", "head.k=3"],
        "linear_probe": ["head=linear_probe", "head.max_epochs=3"],
        "linear_probe_uni": ["head=linear_probe", "head.solver=uni"],
    }[head]
    overrides = [
        f"data.root={panda_root}",
        "data.fov_um=192",
        "backbone=tiny",
        "resolution=112",
        *head_args,
        "logger=csv",
        "figures.num_rois=1",
        "attention.window=2",
        "pruner.prune_layer=2",
    ]
    # the cache is shared across both heads: the second run hits it
    cfg = _compose(overrides, tmp_path / "run", tmp_path.parent / "cache")
    metrics = run_classify(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test/accuracy", "test/balanced_accuracy", "test/f1_weighted", "test/auroc", "test/kappa"):
        assert key in saved and 0 <= saved[key] <= 1 or key == "test/kappa"
    assert saved == pytest.approx(metrics)
    assert saved["test/num_slides"] == 4
    assert (tmp_path / "run" / "skipped.csv").is_file()
    figs = list((tmp_path / "run" / "figures").glob("*.png"))
    assert any("pruned_tokens" in f.name for f in figs) and any("sparse_attention" in f.name for f in figs)
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert len(preds) == 4 and set(preds.columns) >= {"image_id", "data_provider", "label", "pred", "p0", "p5"}
    providers = pd.read_csv(panda_root / "train.csv").set_index("image_id").data_provider
    assert (preds.data_provider == providers.reindex(preds.image_id).to_numpy()).all()


def test_embedding_cache_hit_and_atomic_write(panda_root, tmp_path, caplog, monkeypatch):
    import logging

    from hirespath.embeddings import cache as ex
    from hirespath.tasks.extract import run_extract

    cfg = _compose(
        [f"data.root={panda_root}", "data.fov_um=192", "backbone=tiny", "resolution=56"],
        tmp_path / "run",
        tmp_path / "cache",
    )
    # a run killed while saving leaves no cache file behind
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith(".tmp") and "embeddings" in str(f) and "shard" not in str(f):
            Path(f).write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ex.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg)
    emb_dir = tmp_path / "cache" / "embeddings"
    assert not list(emb_dir.glob("*.pt")) and not list(emb_dir.glob("*.tmp"))
    monkeypatch.setattr(ex.torch, "save", real_save)
    with caplog.at_level(logging.INFO, logger="hirespath.embeddings"):
        first = run_extract(cfg)
        assert "cache miss" in caplog.text
        caplog.clear()
        second = run_extract(cfg)
        assert "cache hit" in caplog.text
    assert len(list(emb_dir.glob("*.pt"))) == 1
    torch.testing.assert_close(first["cls"], second["cls"])
    cfg.attention.window = 3  # anything that changes the numbers changes the key
    with caplog.at_level(logging.INFO, logger="hirespath.embeddings"):
        run_extract(cfg)
    assert len(list(emb_dir.glob("*.pt"))) == 2


def test_tissue_mask_ignores_pen_ink_and_black_fill():
    rng = np.random.default_rng(0)
    thumb = np.full((60, 90, 3), 240, np.uint8)  # glass
    thumb[10:50, 5:40] = (225, 150, 190)  # eosin-pink tissue
    thumb[20:30, 15:25] = (150, 115, 185)  # hematoxylin-dense tissue
    thumb[5:55, 48:56] = (30, 120, 50)  # green marker
    thumb[5:55, 60:68] = (40, 60, 160)  # blue marker
    thumb[:, 75:] = rng.integers(0, 12, (60, 15, 3))  # black scanner fill with noise
    mask = tissue_mask(thumb)
    assert mask[10:50, 5:40].all() and not mask[:, 40:].any() and not mask[:10].any()


def test_transparent_and_off_slide_pixels_read_as_glass(tmp_path):
    """A slide smaller than the field of view keeps the field's scale; what lies off the slide reads white."""
    rgba = np.zeros((256, 320, 4), np.uint8)
    rgba[64:192, 64:256] = (220, 140, 190, 255)  # tissue; the rest transparent black
    tifffile.imwrite(
        tmp_path / "small.tiff",
        rgba,
        tile=(64, 64),
        photometric="rgb",
        extrasamples=[2],
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    (roi,), _ = locate_rois(tmp_path / "small.tiff", fov_um=256)  # 512 px at 0.5 µm/px > the slide's 320 × 256
    assert roi.size == 512
    rgb = read_roi(tmp_path / "small.tiff", roi, 128)
    assert rgb.shape == (128, 128, 3) and rgb.reshape(-1, 3).min(0).min() > 100  # nothing black
    assert (rgb > 245).all(-1).mean() > 0.5  # glass around the tissue


def test_default_mpp_for_slides_without_resolution_tags(tmp_path):
    image = np.full((512, 768, 3), 240, np.uint8)
    image[100:400, 100:600] = (220, 140, 190)
    tifffile.imwrite(tmp_path / "nores.tiff", image, tile=(256, 256), photometric="rgb")
    with pytest.raises(Exception, match="set data.default_mpp"):
        locate_rois(tmp_path / "nores.tiff", fov_um=128)
    (roi,), mpp = locate_rois(tmp_path / "nores.tiff", fov_um=128, default_mpp=0.5)
    assert mpp == 0.5 and roi.size == 256


def test_split_follows_train_csv_and_exclusions(tmp_path):
    """The split file fixes who is in which split; labels and exclusions always come from the current files."""
    from hirespath.data.panda import load_or_make_split

    root = tmp_path / "panda"
    (root / "train_images").mkdir(parents=True)
    labels = pd.DataFrame(
        {
            "image_id": [f"s{i:02d}" for i in range(40)],
            "data_provider": "radboud",
            "isup_grade": [i % 6 for i in range(40)],
            "gleason_score": "3+3",
        }
    )
    labels.to_csv(root / "train.csv", index=False)
    split_csv = tmp_path / "split.csv"
    first = load_or_make_split(root, split_csv)
    pd.DataFrame({"image_id": ["s00", "s01"]}).to_csv(tmp_path / "exclude.csv", index=False)
    second = load_or_make_split(root, split_csv, tmp_path / "exclude.csv")
    assert set(second.image_id) == set(first.image_id) - {"s00", "s01"}
    assert second.set_index("image_id").split.equals(first.set_index("image_id").split.drop(["s00", "s01"]))
    labels.loc[labels.image_id == "s05", "isup_grade"] = 0  # a corrected label
    labels.to_csv(root / "train.csv", index=False)
    assert load_or_make_split(root, split_csv).set_index("image_id").isup_grade["s05"] == 0
    pd.concat([labels, labels.tail(1).assign(image_id="new")]).to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match="1 image_ids of train.csv have no split"):
        load_or_make_split(root, split_csv)


def test_roi_cache_resumes_and_drops_excluded_slides(panda_root, tmp_path):
    from hirespath.data.panda import locate_all

    split = make_split(read_labels(panda_root), seed=42)
    cache = tmp_path / "rois.csv"
    part, _ = locate_all(panda_root, split.iloc[:-3], 128, 1, 0.05, cache)  # a run stopped before the last 3
    rois, _ = locate_all(panda_root, split, 128, 1, 0.05, cache)
    assert set(rois.image_id) == set(split.image_id) and len(pd.read_csv(cache)) == len(split)
    fewer, _ = locate_all(panda_root, split.iloc[2:].assign(split="test"), 128, 1, 0.05, cache)
    assert set(fewer.image_id) == set(split.image_id[2:]) and (fewer.split == "test").all()


def test_killed_extraction_resumes_from_its_parts(panda_root, tmp_path, caplog, monkeypatch):
    import logging

    from conftest import tiny_encoder

    from hirespath.data import panda as panda_data
    from hirespath.data.panda import locate_all
    from hirespath.embeddings.cache import extract_embeddings

    split = make_split(read_labels(panda_root), seed=42)
    rois, _ = locate_all(panda_root, split, 128, 1, 0.05, tmp_path / "rois.csv")
    enc = tiny_encoder(attention="dense")
    kw = dict(batch_size=2, trainer=CPU_TRAINER, flush_every=1)
    fresh = extract_embeddings(enc, panda_root, rois, 56, tmp_path / "fresh", {"k": 1}, **kw)
    real_getitem = panda_data.PandaROIDataset.__getitem__

    def dies_at_10(self, i):
        if i == 10:
            raise RuntimeError("node lost")
        return real_getitem(self, i)

    monkeypatch.setattr(panda_data.PandaROIDataset, "__getitem__", dies_at_10)
    with pytest.raises(RuntimeError, match="node lost"):
        extract_embeddings(enc, panda_root, rois, 56, tmp_path / "cache", {"k": 1}, **kw)
    monkeypatch.setattr(panda_data.PandaROIDataset, "__getitem__", real_getitem)
    with caplog.at_level(logging.INFO, logger="hirespath.embeddings"):
        resumed = extract_embeddings(enc, panda_root, rois, 56, tmp_path / "cache", {"k": 1}, **kw)
    assert f"resuming: 10 of {len(rois)} ROIs already extracted" in caplog.text
    torch.testing.assert_close(resumed["cls"], fresh["cls"])
    assert not list((tmp_path / "cache" / "embeddings").glob(".*shards"))


def test_embedding_cache_is_per_roi(panda_root, tmp_path, caplog):
    """Excluding slides or correcting labels reuses the cache; new slides are the only ones extracted."""
    import logging

    from conftest import tiny_encoder

    from hirespath.data.panda import locate_all
    from hirespath.embeddings.cache import extract_embeddings

    split = make_split(read_labels(panda_root), seed=42)
    rois, _ = locate_all(panda_root, split, 128, 1, 0.05, tmp_path / "rois.csv")
    enc = tiny_encoder(attention="dense")
    kw = dict(batch_size=4, trainer=CPU_TRAINER)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="hirespath.embeddings"):
        part = extract_embeddings(enc, panda_root, rois.iloc[5:], 56, cache, {"k": 1}, **kw)
        assert f"cache miss: extracting {len(rois) - 5} of {len(rois) - 5} ROIs" in caplog.text
        caplog.clear()
        full = extract_embeddings(enc, panda_root, rois, 56, cache, {"k": 1}, **kw)
        assert f"cache update: extracting 5 of {len(rois)} ROIs" in caplog.text
        caplog.clear()
        relabelled = rois.iloc[::-1].assign(label=0, split="train")  # other order, labels and split
        again = extract_embeddings(enc, panda_root, relabelled, 56, cache, {"k": 1}, **kw)
        assert "cache hit" in caplog.text and "extracting" not in caplog.text
    torch.testing.assert_close(full["cls"][5:], part["cls"])
    torch.testing.assert_close(again["cls"], full["cls"].flip(0))
    assert again["image_id"] == rois.image_id.tolist()[::-1] and (again["label"] == 0).all()
    assert set(again["split"]) == {"train"} and not again["failed"]


def test_unreadable_roi_is_skipped_then_retried(tmp_path, caplog):
    """A slide that breaks between locating and extraction: listed as failed, the rest goes on; once the file is
    repaired the next run extracts just that ROI."""
    import logging
    import shutil

    from conftest import tiny_encoder

    from hirespath.data.panda import locate_all
    from hirespath.embeddings.cache import extract_embeddings

    root = tmp_path / "panda"
    make_synthetic_panda(root, num_slides=6, size=(384, 512), seed=4)
    split = make_split(read_labels(root), seed=42)
    rois, _ = locate_all(root, split, 128, 1, 0.05, tmp_path / "rois.csv")
    bad = root / "train_images" / f"{rois.image_id.iloc[2]}.tiff"
    shutil.copy(bad, tmp_path / "backup.tiff")
    bad.write_bytes(b"II*\x00" + bytes(64))
    enc = tiny_encoder(attention="dense")
    kw = dict(batch_size=2, trainer=CPU_TRAINER)
    emb = extract_embeddings(enc, root, rois, 56, tmp_path / "cache", {"k": 1}, **kw)
    assert (
        emb["failed"] == [2] and emb["errors"][0][0] == rois.image_id.iloc[2] and "cannot read" in emb["errors"][0][1]
    )
    assert torch.isnan(emb["cls"][2]).all() and not torch.isnan(emb["cls"][[0, 1, 3]]).any()
    shutil.copy(tmp_path / "backup.tiff", bad)
    with caplog.at_level(logging.INFO, logger="hirespath.embeddings"):
        emb = extract_embeddings(enc, root, rois, 56, tmp_path / "cache", {"k": 1}, **kw)
    assert f"cache update: extracting 1 of {len(rois)} ROIs" in caplog.text
    assert not emb["failed"] and not torch.isnan(emb["cls"]).any()

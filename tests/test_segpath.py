"""SegPath: reader, bad input, ViT-Adapter shapes, Mask2Former loss, partial labels, metrics, task end to end."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_task, tiny_encoder
from PIL import Image

from hirespath.configs import ConfigValidationError, validate_config
from hirespath.data.segpath import CELL_TYPES, SegPathError, index_segpath, load_pair
from hirespath.data.segpath_synthetic import make_synthetic_segpath
from hirespath.heads.mask2former import SegmentationModel
from hirespath.metrics.segmentation import SegPathMetrics
from hirespath.models.vit_adapter import ViTAdapter, interaction_groups
from hirespath.modules.segmentation import SegmentationModule
from hirespath.utils.io import write_json

TINY_HEAD = dict(
    num_queries=10,
    hidden_dim=64,
    decoder_layers=2,
    pixel_decoder_layers=1,
    train_num_points=1024,
    adapter=dict(heads=4, spm_inplanes=16),
)


@pytest.fixture(scope="module")
def segpath_root(tmp_path_factory):
    return make_synthetic_segpath(tmp_path_factory.mktemp("segpath"), images_per_split=1, size=168, seed=0)


def _model(**kw):
    # window 2: 4 × 4 windows on a 112 px input's 8 × 8 grid, so the sparse kernel runs (2 × 2 would be dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SegmentationModel(tiny_encoder(attention="sparse", window=2), num_classes=8, **{**TINY_HEAD, **kw})


def test_reader_indexes_every_archive(segpath_root):
    rows, skipped = index_segpath(segpath_root)
    assert len(rows) == 8 * 3 and skipped.empty
    assert set(rows.cell_type) == set(CELL_TYPES) and set(rows.split) == {"train", "val", "test"}
    assert rows.label.tolist() == [CELL_TYPES.index(c) for c in rows.cell_type]
    image, mask = load_pair(rows.image[0], rows["mask"][0])
    assert image.shape == (168, 168, 3) and set(np.unique(mask)) <= {0, 1}


def test_fileinfo_inside_folder(tmp_path):
    make_synthetic_segpath(tmp_path, images_per_split=1, size=56, fileinfo_in_folder=True)
    rows, _ = index_segpath(tmp_path)
    assert len(rows) == 24


def test_fileinfo_listing_masks_or_gzipped(tmp_path):
    """Zenodo's fileinfo may list the _mask.png files as rows too, and may arrive gzip-compressed as .csv."""
    import gzip

    root = make_synthetic_segpath(tmp_path, images_per_split=1, size=56)
    info_path = root / "panCK_fileinfo.csv"
    info = pd.read_csv(info_path)
    masks = info.assign(filename=info.filename.str.replace("_HE.png", "_mask.png"))
    text = pd.concat([info, masks]).to_csv(index=False)
    info_path.write_bytes(gzip.compress(text.encode()))
    rows, _ = index_segpath(root)
    assert len(rows) == 24 and (rows.image != rows["mask"]).all() and rows.image.str.endswith("_HE.png").all()
    masks.to_csv(info_path, index=False)
    with pytest.raises(SegPathError, match="panCK_fileinfo.csv lists no"):
        index_segpath(root)


def test_resized_masks_stay_aligned_with_the_image(tmp_path):
    """Nearest-exact sampling: a centred square keeps its centre when the tile is shrunk (nearest shifts it)."""
    from hirespath.data.segpath import SegPathDataset

    root = make_synthetic_segpath(tmp_path, images_per_split=1, size=168)
    rows, _ = index_segpath(root)
    mask = np.zeros((168, 168), np.uint8)
    mask[61:107, 61:107] = 1  # centre 83.5 px = 20.5 output pixels at 4× smaller (pixel i covers 4i … 4i+4)
    Image.fromarray(mask).save(rows["mask"][0])
    ds = SegPathDataset(rows.iloc[:1], resolution=42, mean=(0.5,) * 3, std=(0.5,) * 3)
    ys, xs = torch.nonzero(ds[0]["mask"], as_tuple=True)
    assert ys.float().mean() == pytest.approx(20.5) and xs.float().mean() == pytest.approx(20.5)  # nearest: 21


def test_bad_input_names_the_file(tmp_path):
    root = make_synthetic_segpath(tmp_path, images_per_split=1, size=56)
    rows, _ = index_segpath(root)
    mask_path = rows["mask"][0]
    Image.fromarray(np.full((56, 56), 7, np.uint8)).save(mask_path)
    with pytest.raises(SegPathError, match=r"mask values \[7\] outside \{0, 1, 255\}") as err:
        load_pair(rows.image[0], mask_path)
    assert mask_path in str(err.value)
    Image.fromarray(np.zeros((50, 56), np.uint8)).save(mask_path)
    with pytest.raises(SegPathError, match="mask is 56×50 but the image is 56×56"):
        load_pair(rows.image[0], mask_path)
    # a fileinfo row whose files are missing: an error naming it, or with skip_bad a listed skip
    info = pd.read_csv(root / "panCK_fileinfo.csv")
    info.loc[len(info)] = ["panCK_Epithelium_slide9_000001_000002_HE.png", "panCK", "train"]
    info.to_csv(root / "panCK_fileinfo.csv", index=False)
    with pytest.raises(SegPathError, match="panCK_Epithelium_slide9_000001_000002_HE.png: image file missing"):
        index_segpath(root)
    rows, skipped = index_segpath(root, skip_bad=True)
    assert len(skipped) == 1 and "slide9" in skipped.filename[0] and len(rows) == 24
    with pytest.raises(FileNotFoundError, match="holds no SegPath archive"):
        index_segpath(tmp_path / "panCK_Epithelium")


@pytest.mark.parametrize("size", [56, 112, 140])
def test_adapter_output_shapes(size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = ViTAdapter(tiny_encoder(attention="sparse", window=3), heads=4, spm_inplanes=16)
    feats = adapter(torch.randn(2, 3, size, size))
    assert [f.shape[1] for f in feats] == [96] * 4
    side = -(-size // 2)  # stem conv, stride 2 (padding 1: ceil)
    for f in feats:
        side = -(-side // 2)  # max-pool, then each stage halves again: strides 4, 8, 16, 32
        assert f.shape[-2:] == (side, side)


def test_adapter_refuses_pruning_and_splits_groups():
    with pytest.raises(ValueError, match="needs the full patch grid"):
        ViTAdapter(tiny_encoder(prune_ratio=0.5, prune_layer=2))
    assert interaction_groups(24) == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert interaction_groups(6) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    with pytest.raises(ValueError, match="at least 4"):
        interaction_groups(3)


def test_building_the_head_logs_no_backbone_warning():
    """The Mask2Former config's throw-away ResNet made transformers log, at every model build (every segment and
    segment_slides run), that the backbone "may not be compatible with Mask2Former": not the user's concern."""
    import logging

    from transformers import Mask2FormerConfig, ResNetConfig

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    transformers_logger = logging.getLogger("transformers")  # transformers' own handlers hold an earlier stderr
    transformers_logger.addHandler(handler)
    try:
        logging.Logger.warning_once.cache_clear()  # transformers logs each message once per process
        _model()
        assert not [m for m in said if "not a supported model" in m]
        logging.Logger.warning_once.cache_clear()
        Mask2FormerConfig(backbone_config=ResNetConfig())  # what the head builds, without the quieting: it logs
        assert [m for m in said if "Backbone resnet is not a supported model" in m]
    finally:
        transformers_logger.removeHandler(handler)


def test_a_head_built_in_another_thread_does_not_silence_this_one(monkeypatch):
    """The quieting holds in the building thread only: a logger level set around the build silenced every thread
    meanwhile, and two builds at once could leave it set for good."""
    import logging
    import threading

    from transformers import Mask2FormerConfig, ResNetConfig

    from hirespath.heads import mask2former as m2f_module

    inside, release, real = threading.Event(), threading.Event(), m2f_module.Mask2FormerConfig

    def held(*args, **kwargs):  # the other thread stays in the middle of its build
        config = real(*args, **kwargs)
        inside.set()
        release.wait(30)
        return config

    monkeypatch.setattr(m2f_module, "Mask2FormerConfig", held)
    other = threading.Thread(target=_model)
    other.start()
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert inside.wait(60)
        logging.Logger.warning_once.cache_clear()
        Mask2FormerConfig(backbone_config=ResNetConfig())  # this thread's own build of such a config: it logs
    finally:
        release.set()
        other.join()
        logging.getLogger("transformers").removeHandler(handler)
    assert [m for m in said if "Backbone resnet is not a supported model" in m]


def test_mask2former_forward_loss_backward():
    model = _model()
    x = torch.randn(2, 3, 112, 112)
    masks = torch.zeros(2, 112, 112, dtype=torch.long)
    masks[0, 20:60, 30:70] = 1
    out = model(x, masks, torch.tensor([2, 5]))  # image 1: nothing of its type, only negatives known
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    ignored = masks.clone()
    ignored[0, :10] = 255  # ignore pixels (mmseg's 255) train too: left out of matching and mask losses
    model.zero_grad()
    out = model(x, ignored, torch.tensor([2, 5]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model(x)
    probs = model.semantic_probs(out, (150, 150))
    assert probs.shape == (2, 8, 150, 150) and (probs >= 0).all()
    # one class per image, upsampled a few queries at a time: the same map
    one = model.semantic_probs(out, (150, 150), classes=torch.tensor([2, 5]), query_chunk=3)
    torch.testing.assert_close(one, probs[[0, 1], [2, 5]])


def _criterion_losses(criterion, logits, classes, masks, labels, valid, seed=0):
    """The criterion's losses for one fixed draw of the sampled points."""
    mask_labels = [(m == 1).float()[None] for m in masks]
    class_labels = [t.view(1) for t in labels]
    criterion.set_targets(labels, valid)
    torch.manual_seed(seed)
    try:
        return criterion(logits, classes, mask_labels, class_labels)
    finally:
        criterion.set_targets(None, None)


def test_attention_masks_at_their_size_give_transformers_outputs(monkeypatch):
    """At inference only the decoder's last mask prediction runs at 1/4 of the image; the others (attention masks
    only) are made at their own size. Outputs equal transformers' predictor, also with two threads at once."""
    import threading

    from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskPredictor

    torch.manual_seed(0)
    model = SegmentationModel(tiny_encoder(), num_classes=8, num_queries=20, hidden_dim=32, decoder_layers=4,
                              pixel_decoder_layers=1).eval()  # fmt: skip
    predictor = model.m2f.model.transformer_module.decoder.mask_predictor
    x = torch.rand(2, 3, 224, 224)
    full_size = []
    transformers_forward = Mask2FormerMaskPredictor.forward

    def spy(self, *args, **kwargs):
        full_size.append(1)
        return transformers_forward(self, *args, **kwargs)

    monkeypatch.setattr(Mask2FormerMaskPredictor, "forward", spy)
    with torch.no_grad():
        fast = model(x)
        assert len(full_size) == 1  # of 4 calls (one, then one per layer)
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.setdefault(k, model(x[k : k + 1]))) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        predictor.__class__ = Mask2FormerMaskPredictor  # transformers' own, every call at 1/4
        full_size.clear()
        reference = model(x)
        assert len(full_size) == 4
    for out in (fast, SimpleNamespace(**{k: torch.cat([getattr(results[i], k) for i in (0, 1)]) for k in
                                          ("masks_queries_logits", "class_queries_logits")})):  # fmt: skip
        torch.testing.assert_close(out.masks_queries_logits, reference.masks_queries_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.class_queries_logits, reference.class_queries_logits, atol=1e-5, rtol=1e-5)


def test_ignore_aware_loss_equals_transformers_without_ignore_pixels():
    """With every pixel labelled, the ignore-aware matcher and mask losses are transformers' own, number for number."""
    criterion = _model().m2f.criterion
    g = torch.Generator().manual_seed(0)
    logits, classes = torch.randn(2, 10, 28, 28, generator=g), torch.randn(2, 10, 9, generator=g)
    masks = (torch.rand(2, 112, 112, generator=g) > 0.6).long()
    labels = torch.tensor([1, 6])
    ours = _criterion_losses(criterion, logits, classes, masks, labels, torch.ones(2, 112, 112))
    reference = _criterion_losses(criterion, logits, classes, masks, labels, None)  # transformers' code path
    assert set(ours) == set(reference)
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], atol=1e-5, rtol=1e-5)


def test_ignored_pixels_do_not_change_the_loss():
    criterion = _model().m2f.criterion
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(2, 112, 112, dtype=torch.long)
    masks[0, 20:90, 10:60] = 1
    masks[1, 50:100, 30:110] = 1
    # confident predictions of ``masks``, so that relabelling a region matters to the loss
    logits = 6 * F.interpolate(masks[:, None].float(), size=(28, 28), mode="area").expand(-1, 10, -1, -1) - 3
    classes = torch.randn(2, 10, 9, generator=g)
    other = masks.clone()
    other[:, 40:80, 40:80] = 1 - other[:, 40:80, 40:80]  # labels flipped in a square...
    valid = torch.ones(2, 112, 112)
    valid[:, 36:84, 36:84] = 0  # ...that lies inside the ignored region
    labels = torch.tensor([0, 4])
    a = _criterion_losses(criterion, logits, classes, masks, labels, valid)
    b = _criterion_losses(criterion, logits, classes, other, labels, valid)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    # without the ignore region the flipped square does change the mask losses
    c = _criterion_losses(criterion, logits, classes, masks, labels, None)
    d = _criterion_losses(criterion, logits, classes, other, labels, None)
    assert float(d["loss_mask"] - c["loss_mask"]) > 0.01


def test_partial_label_loss_ignores_other_cell_types():
    """Unmatched queries are only pushed away from the labelled type: probability mass on any other type is free."""
    from hirespath.heads.mask2former import PartialLabelMask2FormerLoss

    loss_fn = _model().m2f.criterion
    assert isinstance(loss_fn, PartialLabelMask2FormerLoss)
    logits = torch.zeros(1, 3, 9)  # 3 queries, 8 classes + no-object
    indices = [(np.array([0]), np.array([0]))]
    labels = [torch.tensor([2])]
    loss_fn.labelled = torch.tensor([2])
    base = loss_fn.loss_labels(logits, labels, indices)["loss_cross_entropy"]
    other = logits.clone()
    other[0, 1, 5] = 8.0  # an unmatched query confidently predicts another (unlabelled) type
    same = logits.clone()
    same[0, 1, 2] = 8.0  # ... or the labelled type, which is known to be covered by the matched query
    l_other = loss_fn.loss_labels(other, labels, indices)["loss_cross_entropy"]
    l_same = loss_fn.loss_labels(same, labels, indices)["loss_cross_entropy"]
    assert l_other <= base + 1e-6  # not penalised (even less: mass moved away from type 2)
    assert l_same > base + 0.05  # penalised
    loss_fn.labelled = None


def test_training_steps_lower_the_loss(segpath_root):
    from hirespath.data.segpath_datamodule import SegPathDataModule

    torch.manual_seed(0)
    model = _model()
    dm = SegPathDataModule(str(segpath_root), 56, model.encoder.mean, model.encoder.std, batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(batch["image"], batch["mask"], batch["label"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] * 0.8


def _mmseg_reference(preds, targets, cells, n=8):
    """numpy transcription of mmseg's intersect_and_union + eval metrics, per cell type (foreground class)."""
    I, U, P, L = (np.zeros(n) for _ in range(4))  # noqa: E741 — mmseg's names
    for p, t, c in zip(preds, targets, cells):
        valid = t != 255
        p, t = p[valid], t[valid]
        inter = p[p == t]
        ai = np.histogram(inter, bins=2, range=(0, 1))[0][1]
        ap = np.histogram(p, bins=2, range=(0, 1))[0][1]
        al = np.histogram(t, bins=2, range=(0, 1))[0][1]
        I[c] += ai
        P[c] += ap
        L[c] += al
        U[c] += ap + al - ai
    seen = (P + L) > 0
    with np.errstate(divide="ignore", invalid="ignore"):  # x/0 is NaN (undefined) and left out, as mmseg's nanmean
        iou, dice, acc = I / U, 2 * I / (P + L), np.where(L > 0, I / L, np.nan)
    return {"iou": np.nanmean(iou[seen]), "dice": np.nanmean(dice[seen]), "mpa": np.nanmean(acc[seen]), "acc": acc}


def test_metrics_match_mmseg_formulas():
    rng = np.random.default_rng(0)
    preds, targets, cells = [], [], []
    m = SegPathMetrics()
    for i in range(16):
        t = (rng.random((20, 20)) > 0.6).astype(np.int64)
        t[0, :5] = 255
        p = np.where(rng.random((20, 20)) > 0.3, t % 255, 1 - t % 255)
        c = i % 8
        preds.append(p), targets.append(t), cells.append(c)
        m.update(torch.from_numpy(p), torch.from_numpy(t), c)
    ours = m.compute()
    ref = _mmseg_reference(preds, targets, cells)
    for k in ("iou", "dice", "mpa"):
        assert ours[f"test/{k}"] == pytest.approx(ref[k], abs=1e-9)
    assert len([k for k in ours if k.startswith("test/cpa/")]) == 8


def test_segment_task_end_to_end(segpath_root, tmp_path):
    from hirespath.tasks.segment import run_segment

    overrides = [
        f"data.root={segpath_root}",
        "backbone=tiny",
        "attention=sparse",
        "attention.window=64",
        "resolution=56",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "data.num_workers=0",
        "head.num_queries=10",
        "head.hidden_dim=64",
        "head.decoder_layers=2",
        "head.pixel_decoder_layers=1",
        "head.train_num_points=1024",
        "head.adapter.heads=4",
        "head.adapter.spm_inplanes=16",
        "logger=csv",
    ]
    cfg = compose_task("segment", overrides, tmp_path / "run")
    metrics = run_segment(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in (
        ["test/mpa", "test/iou", "test/dice"]
        + [f"test/cpa/{c}" for c in CELL_TYPES]
        + [f"test/iou/{c}" for c in CELL_TYPES]
        + [f"test/dice/{c}" for c in CELL_TYPES]
    ):
        assert key in saved and 0 <= saved[key] <= 1
    assert len(list((tmp_path / "run" / "overlays").glob("*.png"))) == 8  # one test tile per cell type
    # the fine-tuned backbone loads back from the Lightning checkpoint, for extraction with create_encoder
    import hirespath

    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    vit = {k.split("encoder.vit.", 1)[1]: v for k, v in state.items() if "encoder.vit." in k}
    enc = hirespath.create_encoder("tiny", weights=str(ckpt), init_values=1.0)
    assert vit and all(torch.equal(v, vit[k]) for k, v in enc.vit.state_dict().items())
    cfg_types = compose_task("segment", overrides + ["data.cell_types=[panCK_Epithelium,CD3CD20]"], tmp_path / "run3")
    with pytest.raises(ConfigValidationError, match=r"data.cell_types=\['panCK_Epithelium', 'CD3CD20'\]: must be"):
        validate_config(cfg_types)  # what task_wrapper runs first
    with pytest.raises(Exception, match=r"data.cell_types: unknown \['CD3CD20'\]; choose among"):
        run_segment(cfg_types)  # the DataModule refuses them too (Hydra's instantiate wraps its ValueError)
    cfg_pruned = compose_task("segment", overrides + ["pruner=global_attention"], tmp_path / "run2")
    with pytest.raises(ValueError, match="needs the full patch grid"):
        run_segment(cfg_pruned)


@pytest.mark.parametrize("exp,jobs", [("table4", 10), ("table5", 4)])
def test_segmentation_experiments_compose(exp, jobs):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("segment", overrides=[f"experiment={exp}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    n = 1
    for value in params.values():
        n *= len(str(value).split(","))
    assert n == jobs and cfg.pruner.prune_ratio == 0 and cfg.backbone.name == "uni2_h"
    # segment.yaml's own settings win over the trainer group's defaults (20 epochs)
    assert cfg.trainer.max_epochs == 50 and cfg.callbacks.model_checkpoint.monitor == "val/iou"


def test_optimizer_groups_and_deformable_attention_init():
    from hirespath.models.vit_adapter import MSDeformAttn
    from hirespath.modules.segmentation import layer_decay_groups

    model = _model()
    groups = layer_decay_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1, layer_decay=0.5)
    group_of = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in (
        "m2f.model.transformer_module.queries_embedder.weight",
        "m2f.model.transformer_module.level_embed.weight",
        "adapter.level_embed",
        "adapter.encoder.vit.pos_embed",
        "adapter.encoder.vit.blocks.0.norm1.weight",
    ):
        assert group_of[id(named[name])]["weight_decay"] == 0, name
    assert group_of[id(named["m2f.class_predictor.weight"])] == {
        **group_of[id(named["m2f.class_predictor.weight"])],
        "lr": 1e-4,
        "weight_decay": 0.05,
    }
    # encoder block i (of 6) at lr · 0.1 · 0.5^(6 − i)
    assert group_of[id(named["adapter.encoder.vit.blocks.5.attn.qkv.weight"])]["lr"] == pytest.approx(1e-5 * 0.5)
    assert group_of[id(named["adapter.encoder.vit.blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(1e-5 * 0.5**6)
    # the adapter's deformable attentions start as Deformable DETR's do: offsets from the bias grid only
    attns = [m for m in model.adapter.modules() if isinstance(m, MSDeformAttn)]
    assert len(attns) == 4 + 4 + 2
    for m in attns:
        assert m.sampling_offsets.weight.abs().max() == 0 and m.attention_weights.weight.abs().max() == 0
        assert m.sampling_offsets.bias.abs().max() >= 1


def test_every_trainable_parameter_gets_a_gradient():
    """DDP (without find_unused_parameters) needs every trainable parameter in the graph."""
    model = _model()
    masks = torch.zeros(1, 56, 56, dtype=torch.long)
    masks[0, 10:30, 10:30] = 1
    model(torch.randn(1, 3, 56, 56), masks, torch.tensor([1])).loss.backward()  # batch size 1: GroupNorm is fine
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_balanced_sampling_draws_each_cell_type_equally(tmp_path):
    from hirespath.data.segpath_datamodule import SegPathDataModule

    root = make_synthetic_segpath(tmp_path, images_per_split=1, size=56)
    info = pd.read_csv(root / "panCK_fileinfo.csv")
    extra = []
    for k in range(7):  # panCK gets 8 training tiles, every other type 1
        src = root / "panCK_Epithelium" / info.filename[0]
        name = info.filename[0].replace("_HE.png", f"{k}_HE.png")
        (root / "panCK_Epithelium" / name).write_bytes(src.read_bytes())
        (root / "panCK_Epithelium" / name.replace("_HE.png", "_mask.png")).write_bytes(
            src.with_name(info.filename[0].replace("_HE.png", "_mask.png")).read_bytes()
        )
        extra.append([name, "panCK", "train"])
    pd.concat([info, pd.DataFrame(extra, columns=info.columns)]).to_csv(root / "panCK_fileinfo.csv", index=False)
    dm = SegPathDataModule(str(root), 56, (0.5,) * 3, (0.5,) * 3, balance_types=True)
    loader = dm.train_dataloader()
    torch.manual_seed(0)
    drawn = torch.tensor([i for _ in range(100) for i in loader.sampler])
    labels = torch.tensor(loader.dataset.rows.label.to_numpy())[drawn]
    share = torch.bincount(labels, minlength=8).float() / len(labels)
    assert len(loader.dataset) == 15 and (share - 1 / 8).abs().max() < 0.03  # panCK would be 8/15 unbalanced


def _metrics_with_an_unlabelled_type():
    """Types 0 and 1 have ground-truth pixels; type 2 only predicted ones (its masks are all 0); 3–7 are not seen."""
    rng = np.random.default_rng(1)
    preds, targets, cells = [], [], []
    m = SegPathMetrics()
    for c in (0, 1, 2, 0, 1, 2):
        t = (rng.random((20, 20)) > 0.6).astype(np.int64) if c < 2 else np.zeros((20, 20), dtype=np.int64)
        t[0, :5] = 255
        p = (rng.random((20, 20)) > 0.5).astype(np.int64)
        preds.append(p), targets.append(t), cells.append(c)
        m.update(torch.from_numpy(p), torch.from_numpy(t), c)
    return m, _mmseg_reference(preds, targets, cells)


def test_cpa_without_ground_truth_is_undefined_and_left_out_of_mpa():
    m, ref = _metrics_with_an_unlabelled_type()
    ours = m.compute()
    a, b, c = CELL_TYPES[:3]
    assert np.isnan(ours[f"test/cpa/{c}"]) and np.isnan(ref["acc"][2])  # mmseg: I / L with L = 0
    assert ours[f"test/iou/{c}"] == 0 and ours[f"test/dice/{c}"] == 0  # predicted pixels, none right: defined, 0
    assert ours["test/mpa"] == pytest.approx((ours[f"test/cpa/{a}"] + ours[f"test/cpa/{b}"]) / 2, abs=1e-12)
    assert 0 < ours["test/mpa"] < 1
    for k in ("iou", "dice", "mpa"):
        assert ours[f"test/{k}"] == pytest.approx(ref[k], abs=1e-9)
    assert not any(t in k for k in ours for t in CELL_TYPES[3:])  # types not in the evaluated images: no entry


def test_undefined_cpa_is_null_in_metrics_json_and_not_logged(tmp_path):
    m, _ = _metrics_with_an_unlabelled_type()
    module = SegmentationModule(torch.nn.Identity())
    module._trainer = SimpleNamespace(world_size=1)
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    module._log_metrics(m, "test/")
    key = f"test/cpa/{CELL_TYPES[2]}"
    assert key not in logged and all(np.isfinite(v) for v in logged.values())  # loggers get defined values only
    assert set(module.computed) == set(logged) | {key}
    write_json(tmp_path / "metrics.json", module.computed)  # as run_segment writes it
    text = (tmp_path / "metrics.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.json"))
    assert saved[key] is None and saved["test/mpa"] == pytest.approx(logged["test/mpa"])

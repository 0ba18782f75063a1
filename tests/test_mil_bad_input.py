"""MIL on bad numbers and small machines: non-finite losses and outputs stop the run naming where (no metrics from
NaN), uniform attention draws in one colour, DataLoader workers fit the cores, thread re-choices log at DEBUG."""

import logging

import lightning as L
import numpy as np
import pytest
import torch
from test_mil import DIM, make_bags, trainer
from test_mil_task import HEAD, _cfg, _features_dir, panda  # noqa: F401  (panda: the module-scoped fixture)

import hirespath.data.mil as data_mil
from hirespath.data.mil import MILDataModule, panda_slide_labels
from hirespath.modules.mil import MILModule, NonFiniteError, predictions_frame
from hirespath.tasks.mil import run_mil
from hirespath.utils import threads
from hirespath.viz.mil import attention_heatmap, attention_scaled, is_uniform, tile_overlay

# ------------------------------------------------------------------------------------------ non-finite numbers


class NaNWeightsAt(L.Callback):
    """Sets every weight of the head to NaN when epoch ``epoch`` starts (a diverged head)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in module.head.parameters():
                    p.fill_(float("nan"))


def test_nan_weights_stop_training_naming_the_epoch(tmp_path):
    labels, _ = make_bags(tmp_path / "feats", {"train": 4, "val": 2, "test": 2}, "shift")
    dm = MILDataModule(tmp_path / "feats", labels, batch_size=2)
    model = MILModule("mean_pool", DIM, 2, max_epochs=3)
    tr = trainer(tmp_path, 3, callbacks=[NaNWeightsAt(1)])
    with pytest.raises(NonFiniteError) as err:
        tr.fit(model, datamodule=dm)
    msg = str(err.value)
    # epoch 0 trained 2 steps (4 slides, 2 per batch); the first step of epoch 1 is refused
    assert "MIL training stopped at epoch 1, step 2 (batch 0 of the epoch)" in msg, msg
    assert "the head's weights are not finite (classifier.1.weight, classifier.1.bias)" in msg, msg
    assert not model.test_metrics and not model.test_results


def test_nan_test_outputs_give_no_metrics_and_no_predictions(tmp_path):
    labels, _ = make_bags(tmp_path / "feats", {"train": 2, "val": 2, "test": 3}, "shift")
    dm = MILDataModule(tmp_path / "feats", labels, batch_size=2)
    model = MILModule("abmil", DIM, 2, head_kwargs={"hidden": 8, "attention_hidden": 4})
    with torch.no_grad():
        model.head.classifier.bias.fill_(float("inf"))  # inf − inf in the softmax: NaN probabilities
    with pytest.raises(NonFiniteError, match=r"test outputs are not finite for 3 of 3 slides at epoch 0 \(e\.g\. test"):
        trainer(tmp_path, 1).test(model, datamodule=dm, verbose=False)
    assert model.test_metrics == {} and model.test_results == []
    rows = [
        {"slide_id": "a", "label": 0, "probs": np.array([0.3, 0.7]), "attention": np.ones(2) / 2},
        {"slide_id": "b", "label": 1, "probs": np.array([np.nan, np.nan]), "attention": np.ones(3) / 3},
    ]
    with pytest.raises(NonFiniteError, match=r"probabilities of 1 slides are not finite \(e\.g\. b\)"):
        predictions_frame(rows, 2)


def _inject_nan_into(monkeypatch, slide_id: str) -> None:
    """NaN in one tile of ``slide_id``'s bag after the reader (as if a file held NaN the reader did not catch)."""
    collate = data_mil.collate_bags

    def poisoned(items):
        batch = collate(items)
        for k, sid in enumerate(batch["slide_id"]):
            if sid == slide_id:
                batch["features"][k, 0, 3] = float("nan")
        return batch

    monkeypatch.setattr(data_mil, "collate_bags", poisoned)


@pytest.mark.parametrize("split", ["train", "test"])
def test_mil_task_stops_on_nan_features_and_writes_no_metrics(tmp_path, panda, monkeypatch, split):  # noqa: F811
    labels = panda_slide_labels(panda, cache_dir=tmp_path / "cache")
    d = _features_dir(tmp_path, labels.slide_id)
    bad = labels.slide_id[labels.split == split].iloc[0]
    _inject_nan_into(monkeypatch, bad)
    cfg = _cfg(tmp_path, "run", panda, f"features_dir={d}", *HEAD["abmil"])
    with pytest.raises(NonFiniteError) as err:
        run_mil(cfg)
    msg = str(err.value)
    if split == "train":
        assert msg.startswith("MIL training stopped at epoch 0, step ") and "train/loss is nan" in msg, msg
        assert f"the features of slide(s) {bad} (1 of " in msg, msg
    else:
        assert f"MIL test outputs are not finite for 1 of {(labels.split == 'test').sum()} slides" in msg, msg
        assert f"(e.g. {bad})" in msg, msg
    for name in ("metrics.json", "predictions.csv", "attention", "figures"):
        assert not (tmp_path / "run" / name).exists(), name


class NaNOnRank1(MILModule):
    """Rank 1's second training batch gets a NaN feature: rank 0's own loss stays finite."""

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 1:
            batch["features"][0, 0, 0] = float("nan")
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_ddp_every_rank_stops_on_a_nan_loss_of_one(tmp_path):
    """Both ranks raise (the other rank is told it was another rank) instead of waiting on a collective."""
    labels, _ = make_bags(tmp_path / "feats", {"train": 8, "val": 2, "test": 2}, "shift")
    dm = MILDataModule(tmp_path / "feats", labels, batch_size=1)
    tr = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   num_sanity_val_steps=0)  # fmt: skip
    with pytest.raises(Exception, match="MIL training stopped at epoch 0, step 1 \\(batch 1 of the epoch\\)"):
        tr.fit(NaNOnRank1("mean_pool", DIM, 2), datamodule=dm)


# ------------------------------------------------------------------------------------------ uniform attention


def test_uniform_attention_is_one_colour():
    uniform = np.full(40, 1 / 40, dtype=np.float32)
    for scale in ("percentile", "minmax"):
        np.testing.assert_array_equal(attention_scaled(uniform, scale), np.full(40, 0.5))
    # softmax of equal scores in float32 rounds to weights that differ in the last bit: still uniform
    rounded = torch.zeros(1, 37).softmax(1)[0].numpy() * np.float32(1 + 1e-7) ** np.arange(37)
    assert is_uniform(rounded) and len(np.unique(rounded)) > 1
    np.testing.assert_array_equal(attention_scaled(rounded, "percentile"), np.full(37, 0.5))
    # ties share their mean percentile; distinct weights keep their ranks
    np.testing.assert_allclose(attention_scaled(np.array([0.1, 0.3, 0.3, 0.3]), "percentile"), [0, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(attention_scaled(np.array([0.4, 0.1, 0.2, 0.3]), "percentile"), [1, 0, 1 / 3, 2 / 3])
    assert not is_uniform(np.array([0.5, 0.5 + 1e-3]))
    with pytest.raises(ValueError, match="1 of 3 attention weights are not finite"):
        attention_scaled(np.array([0.5, np.nan, 0.5]), "percentile")


def test_mean_pool_heatmap_overlay_has_a_single_value(tmp_path):
    """The values drawn over the tiles of a mean-pool slide (MeanPool's own 1/n weights) are all one."""
    model = MILModule("mean_pool", DIM, 2)
    att = model(torch.randn(1, 24, DIM)).attention[0].numpy()
    coords = np.array([[x * 64, y * 64] for y in range(4) for x in range(6)])
    overlay = tile_overlay(coords, attention_scaled(att, "percentile"), (64, 96), 0.25, 0.25, 64)
    assert np.isfinite(overlay).all() and np.unique(overlay).tolist() == [0.5]
    ranked = tile_overlay(coords, attention_scaled(np.arange(24.0), "percentile"), (64, 96), 0.25, 0.25, 64)
    assert len(np.unique(ranked)) == 24  # non-uniform weights still spread over the colour map
    png = attention_heatmap(coords, att, tmp_path / "uniform.png", tile_size=64)
    assert png.stat().st_size > 0


# ------------------------------------------------------------------------------------------ small machines


def test_dataloader_workers_fit_the_cores(tmp_path):
    assert [threads.dataloader_workers(None, cores=c) for c in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    assert threads.dataloader_workers(6, cores=2) == 6  # an explicit count is the user's
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"data.num_workers must be an integer ≥ 0 .* got "):
            threads.dataloader_workers(bad, "data.num_workers")


def test_mil_default_workers_are_resolved_from_this_process_cores(tmp_path, panda, monkeypatch):  # noqa: F811
    from conftest import compose_task

    assert compose_task("mil", ["data.root=/x"], tmp_path).data.num_workers is None
    seen = []

    class Recording(MILDataModule):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("hirespath.tasks.mil.MILDataModule", Recording)
    monkeypatch.setattr(threads, "available_cores", lambda: 1)
    labels = panda_slide_labels(panda, cache_dir=tmp_path / "cache")
    d = _features_dir(tmp_path, labels.slide_id)
    cfg = _cfg(tmp_path, "run", panda, f"features_dir={d}", "data.num_workers=null", "trainer.max_epochs=1",
               "figures.num_slides=0", *HEAD["mean_pool"])  # fmt: skip
    run_mil(cfg)
    assert seen == [0]
    with pytest.raises(ValueError, match="data.num_workers must be an integer ≥ 0"):
        run_mil(_cfg(tmp_path, "bad", panda, f"features_dir={d}", "data.num_workers=-2"))
    assert not (tmp_path / "bad" / "skipped.csv").exists()  # refused before reading any features


def test_thread_re_choices_log_at_debug(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.DEBUG, logger="hirespath.threads"):
            with threads.torch_threads(1, "a reason"):
                policy = threads.AdaptiveThreads(None, readers=2, cores=4)
                for busy in (2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0):
                    policy.observe(reader_seconds=busy, wall_seconds=1.0)
        assert len(policy.chosen) >= 4  # down and back up
        info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        cores = threads.available_cores()
        assert info == [f"CPU threads: 1 intra-op for the encoder ({cores} cores available; a reason)"]
        assert len(debug) == len(policy.chosen) - 1 and all("→" in m for m in debug)
    finally:
        torch.set_num_threads(before)

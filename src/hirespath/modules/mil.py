"""Slide-level MIL as a LightningModule (ABMIL or mean pooling on bags of tile features) and its outputs.

Training: cross-entropy, AdamW, cosine learning-rate schedule over ``max_epochs``. Validation gathers every
slide's logits (over all DDP ranks; the MILDataModule's evaluation sampler never repeats a slide) and logs at
epoch end

    val/loss (mean cross-entropy over the val slides), val/accuracy, val/balanced_accuracy, val/f1_weighted,
    val/auroc, val/kappa (quadratic; PANDA's official metric)

— any of them can be the monitor of the EarlyStopping / ModelCheckpoint callbacks the task configures
(``MONITOR_MODES`` gives the mode: min for val/loss, max for the rest). Test logs the same keys under ``test/`` and
keeps ``test_results``: one dict per slide (slide_id, label, logits, probs, attention, coords, tile_size) in the
dataset's order, on every rank, which ``write_mil_outputs`` turns into predictions.csv and ``attention/<slide>.h5``.

Non-finite numbers stop the run with a ``NonFiniteError`` naming where they appeared: a training loss (checked every
step, over all DDP ranks, so every rank stops together) and validation / test logits (checked before any metric is
computed), so no metric, checkpoint score or prediction is ever made from NaN outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..heads.mil import MILOutput, create_mil_head
from ..metrics.classification import classification_metrics
from ..results import CLASSIFICATION_METRICS, LOSS, PREDICTIONS_FILE, VAL
from ..utils.io import atomic_path, new_h5
from ..wsi.listing import check_slide_id

log = logging.getLogger("hirespath.mil")

METRIC_KEYS = (LOSS, *CLASSIFICATION_METRICS)
MONITOR_MODES = {VAL + k: "min" if k == LOSS else "max" for k in METRIC_KEYS}


class NonFiniteError(FloatingPointError):
    """NaN or ±inf in a MIL loss or in the outputs metrics would be computed from."""


def monitor_mode(monitor: str, mode: str | None = None) -> str:
    """The mode (min/max) of a monitored key; InputError for a key the module does not log or the wrong mode."""
    from ..utils.errors import InputError

    if monitor not in MONITOR_MODES:
        raise InputError(f"monitor={monitor!r} is not logged by the MIL module; valid: {sorted(MONITOR_MODES)}")
    if mode is not None and mode != MONITOR_MODES[monitor]:
        raise InputError(f"monitor_mode={mode!r} with monitor={monitor}: it must be {MONITOR_MODES[monitor]!r} "
                         "(min for val/loss, max for the others); or leave monitor_mode=null")  # fmt: skip
    return MONITOR_MODES[monitor]


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_lists(items: list) -> list:
    """Concatenate a per-rank list of picklable items over all ranks (every rank gets the whole list)."""
    if _world_size() == 1:
        return list(items)
    out = [None] * _world_size()
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks stop together instead of the others
    waiting on a collective the stopped rank never joins)."""
    if _world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _nonfinite_cause(module: nn.Module, batch: dict) -> str:
    """Why a step's outputs are not finite: bad features in the batch, a head whose weights already are, or else
    (features and weights finite) an overflow in the head's arithmetic."""
    feats, mask = batch["features"], batch["mask"].bool()
    bad = [(sid, int((~torch.isfinite(f[m])).any(-1).sum()), int(m.sum()))
           for sid, f, m in zip(batch["slide_id"], feats, mask)]  # fmt: skip
    bad = [f"{sid} ({n} of {total} tiles)" for sid, n, total in bad if n]
    if bad:
        return (
            f"the features of slide(s) {', '.join(bad)} hold NaN or ±inf values; re-embed those slides or drop them "
            "from the label table (data.exclude)"
        )
    params = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    if params:
        return (
            f"the head's weights are not finite ({', '.join(params[:4])}{', ...' if len(params) > 4 else ''}): "
            "training diverged at an earlier step; try a lower optim.lr"
        )
    return (
        "features and weights are finite, so the head's arithmetic overflowed; "
        "try a lower optim.lr or trainer.precision=32-true"
    )


def _with_probs(rows: list[dict]) -> list[dict]:
    for r in rows:
        r["probs"] = torch.from_numpy(r["logits"]).softmax(0).numpy()
    return rows


class MILModule(L.LightningModule):
    """A MIL head (``head``: a name of ``hirespath.heads.mil.MIL_HEADS`` built with ``in_features``, ``num_classes``
    and ``head_kwargs``, or a ready nn.Module) trained with cross-entropy, AdamW and a cosine schedule.

    With a head given by name every argument is a hyperparameter, so ``MILModule.load_from_checkpoint(path)``
    rebuilds it; a head given as a module must be passed again to ``load_from_checkpoint``."""

    def __init__(
        self,
        head: str | nn.Module = "abmil",
        in_features: int | None = None,
        num_classes: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        max_epochs: int = 20,
        head_kwargs: dict | None = None,
    ):
        super().__init__()
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(f"MILModule needs num_classes ≥ 2, got {num_classes!r}")
        if isinstance(head, str):
            if in_features is None:
                raise ValueError(f"MILModule(head={head!r}) needs in_features (the tile feature dimension)")
            self.save_hyperparameters()
            self.head = create_mil_head(head, int(in_features), int(num_classes), **dict(head_kwargs or {}))
        else:
            self.save_hyperparameters(ignore=["head"])
            self.head = head
        self.num_classes = int(num_classes)
        self._val: list = []
        self._test: list = []
        self.test_results: list[dict] = []
        self.test_metrics: dict[str, float] = {}

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        return self.head(features, mask)

    def training_step(self, batch, batch_idx):
        out = self(batch["features"], batch["mask"])
        loss = nn.functional.cross_entropy(out.logits.float(), batch["label"])
        # one sync per step (bags are few per step): a NaN loss would otherwise train every weight into NaN
        if _any_rank(not bool(torch.isfinite(loss.detach())), loss.device):
            where = f"epoch {self.current_epoch}, step {self.global_step} (batch {batch_idx} of the epoch)"
            if torch.isfinite(loss.detach()):
                raise NonFiniteError(f"MIL training stopped at {where}: the loss is not finite on another DDP rank")
            raise NonFiniteError(
                f"MIL training stopped at {where}: train/loss is {float(loss.detach())} on slide(s) "
                f"{', '.join(map(str, batch['slide_id']))}: {_nonfinite_cause(self.head, batch)}"
            )
        bs = len(batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    # evaluation: per-slide rows collected on each rank, gathered and scored at epoch end
    def _rows(self, batch) -> list[dict]:
        out = self(batch["features"], batch["mask"])
        logits = out.logits.float().detach().cpu()
        att = out.attention.float().detach().cpu()
        n = batch["mask"].sum(1).cpu()
        return [
            {
                "index": int(batch["index"][k]),
                "slide_id": batch["slide_id"][k],
                "label": int(batch["label"][k]),
                "logits": logits[k].numpy(),
                "attention": att[k, : n[k]].numpy(),
                "coords": batch["coords"][k, : n[k]].cpu().numpy(),
                "tile_size": batch["tile_size"][k],
            }
            for k in range(len(logits))
        ]

    def _score(self, rows: list[dict], stage: str) -> dict[str, float]:
        if not rows:
            return {}
        logits = torch.from_numpy(np.stack([r["logits"] for r in rows]))
        bad = ~torch.isfinite(logits).all(1)
        if bad.any():  # rows are gathered: every rank raises alike
            ids = [str(r["slide_id"]) for r, b in zip(rows, bad) if b]
            when = "the sanity check" if self.trainer.sanity_checking else f"epoch {self.current_epoch}"
            raise NonFiniteError(
                f"MIL {stage} outputs are not finite for {len(ids)} of {len(rows)} slides at {when} "
                f"(e.g. {', '.join(ids[:5])}): no {stage} metrics are computed from NaN; check those slides' "
                "features for NaN/inf, or the head's weights"
            )
        target = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        metrics = {f"{stage}/loss": float(nn.functional.cross_entropy(logits, target))}
        metrics.update(classification_metrics(logits.softmax(1), target, self.num_classes, prefix=f"{stage}/"))
        # values are identical on every rank (computed from the gathered rows); sync only silences Lightning
        self.log_dict(metrics, prog_bar=False, sync_dist=self.trainer.world_size > 1)
        return metrics

    def on_validation_epoch_start(self):
        self._val = []

    def validation_step(self, batch, _):
        # the attention and coords are not needed for validation: keep only what the metrics use
        keep = ("index", "slide_id", "label", "logits")
        self._val += [{k: r[k] for k in keep} for r in self._rows(batch)]

    def on_validation_epoch_end(self):
        self._score(_gather_lists(self._val), "val")
        self._val = []

    def on_test_epoch_start(self):
        self._test = []

    def test_step(self, batch, _):
        self._test += self._rows(batch)

    def on_test_epoch_end(self):
        rows = sorted(_gather_lists(self._test), key=lambda r: r["index"])
        self.test_metrics = self._score(rows, "test")
        self.test_results = _with_probs(rows)
        self._test = []

    def predict_step(self, batch, _) -> list[dict]:
        """Per-slide dicts as in ``test_results`` (this rank's slides only)."""
        return _with_probs(self._rows(batch))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(self.hparams.max_epochs)))
        return [opt], [sched]


def predictions_frame(results: list[dict], num_classes: int | None = None) -> pd.DataFrame:
    """slide_id, label, pred, p0..p{K-1} (and n_tiles) from per-slide result dicts."""
    if not results:
        raise ValueError("no per-slide results to write (did the test loop run on any slide?)")
    probs = np.stack([np.asarray(r["probs"], dtype=np.float64) for r in results])
    k = num_classes or probs.shape[1]
    if probs.shape[1] != k:
        raise ValueError(f"results have {probs.shape[1]} class probabilities, num_classes={num_classes}")
    bad = ~np.isfinite(probs).all(1)
    if bad.any():
        ids = [str(r["slide_id"]) for r, b in zip(results, bad) if b]
        raise NonFiniteError(f"no predictions written: the probabilities of {len(ids)} slides are not finite "
                             f"(e.g. {', '.join(ids[:5])})")  # fmt: skip
    df = pd.DataFrame(
        {
            "slide_id": [r["slide_id"] for r in results],
            "label": [int(r["label"]) for r in results],
            "pred": probs.argmax(1),
        }
    )
    for c in range(k):
        df[f"p{c}"] = probs[:, c]
    df["n_tiles"] = [len(r["attention"]) for r in results]
    return df


def write_mil_outputs(out_dir: str | Path, results: list[dict], num_classes: int | None = None) -> dict[str, Path]:
    """``out_dir/predictions.csv`` (slide_id, label, pred, p0..pK, n_tiles) and ``out_dir/attention/<slide>.h5``
    per slide: datasets ``attention`` (N float32, sums to 1) and ``coords`` (N×2 int64 level-0 x, y; −1 where the
    feature file had none), attrs slide_id, label, pred, patch_size_level0 (when known). Returns the paths."""
    out_dir = Path(out_dir)
    df = predictions_frame(results, num_classes)
    with atomic_path(out_dir / PREDICTIONS_FILE) as tmp:
        df.to_csv(tmp, index=False)
    att_dir = out_dir / "attention"
    att_dir.mkdir(parents=True, exist_ok=True)
    for r, pred in zip(results, df.pred):
        name = check_slide_id(r["slide_id"], f"MIL outputs in {out_dir}")
        with atomic_path(att_dir / f"{name}.h5") as tmp:
            with new_h5(tmp) as f:
                f.create_dataset("attention", data=np.asarray(r["attention"], dtype=np.float32))
                f.create_dataset("coords", data=np.asarray(r["coords"], dtype=np.int64).reshape(-1, 2))
                f.attrs["slide_id"] = name
                f.attrs["label"] = int(r["label"])
                f.attrs["pred"] = int(pred)
                if r.get("tile_size") is not None:
                    f["coords"].attrs["patch_size_level0"] = int(r["tile_size"])
    log.info("wrote %s and %d attention files in %s", out_dir / PREDICTIONS_FILE, len(results), att_dir)
    return {"predictions": out_dir / PREDICTIONS_FILE, "attention_dir": att_dir}


def read_attention(path: str | Path) -> dict:
    """An ``attention/<slide>.h5`` written by ``write_mil_outputs``: attention, coords, tile_size, and its attrs."""
    import h5py

    with h5py.File(path, "r") as f:
        size = f["coords"].attrs.get("patch_size_level0")
        return {
            "attention": f["attention"][:],
            "coords": f["coords"][:],
            "tile_size": int(size) if size is not None else None,
            **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()},
        }

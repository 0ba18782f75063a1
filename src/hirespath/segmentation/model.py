"""A trained ``hirespath segment`` model rebuilt from its checkpoint and its run's saved config, nothing else.

A segment run folder holds ``.hydra/config.yaml`` (the composed config Hydra saved) and ``checkpoints/*.ckpt``
(Lightning: the ``SegmentationModule``'s ``state_dict``, the model under ``model.``). The backbone, attention,
adapter and head are instantiated from the config with random weights, then every weight comes from the checkpoint
(the backbone's original weights file is not needed).

The model's mpp: SegPath tiles are 984 px at 0.2208 µm/px and ``segment`` resizes them to ``resolution``, so the
model saw ``0.2208 · 984 / resolution`` µm/px (0.2208 at resolution=984, 0.388 at 560). Whole slides are tiled at
that mpp by default so that cells have the size they had in training.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..data.segpath import CELL_TYPES, MPP
from ..models.backbones import assignable_state, build_without_init
from ..utils.checkpoints import best_checkpoint, run_dir_of
from ..utils.errors import InputError

log = logging.getLogger("hirespath.segmentation")

SEGPATH_TILE_PX = 984  # every SegPath image is 984×984 px at 0.2208 µm/px
STATE_PREFIX = "model."  # SegmentationModule keeps the SegmentationModel as .model
HEAD_KEY = "model.m2f."  # a key only a segmentation checkpoint has
SEGMENTATION_HEAD = "hirespath.heads.mask2former.SegmentationModel"  # conf/head/mask2former.yaml's _target_


@dataclass
class SegmentationCheckpoint:
    """The rebuilt model and what the slide task needs to know about it."""

    model: torch.nn.Module  # hirespath.heads.mask2former.SegmentationModel, eval mode, on the CPU
    ckpt: Path
    run_dir: Path
    config: DictConfig  # the run's composed config (unresolved; read with OmegaConf.select)
    classes: list[str]  # the cell types it was trained on (output channels, in this order)
    class_index: list[int]  # their indices in the model's num_classes outputs
    mpp: float  # µm/px of the images it was trained on
    resolution: int
    tag: str  # default model tag: <run name>_<run folder>_<checkpoint stem>[_<attention, when not as trained>]
    trained_tag: str | None = None  # the tag as loaded (None: ``tag``)
    trained_attention: dict | None = None  # the encoder's attention as trained (None: the model's as loaded)

    def __post_init__(self) -> None:
        self.trained_tag = self.trained_tag or self.tag
        self.trained_attention = self.trained_attention or self.attention

    @property
    def patch_size(self) -> int:
        return int(self.model.encoder.patch_size)

    @property
    def attention(self) -> dict:
        """The encoder's attention now: ``mode``, ``window``, ``radius``, ``sparse_backend`` (the attention group)."""
        enc = self.model.encoder
        return {"mode": enc.attention, "window": enc.window, "radius": enc.radius, "sparse_backend": enc.sparse_backend}

    def use_attention(self, mode=None, window=None, radius=None, sparse_backend=None, warn: bool = True) -> None:
        """Run the encoder with another attention than it was trained with (None: the trained value, for each).

        The weights do not depend on it, so any mode fits the model (at 1,792 px dense attention is one 16k-token
        SDPA, sparse a window's neighbourhood). A result-changing difference (mode, or window / radius when sparse)
        is warned about, as a different ``tile.mpp`` is, and named in ``tag``: its outputs get their own folder;
        ``sparse_backend`` only picks the kernel (same outputs to float rounding)."""
        from ..models.attention import ATTENTION_CHECKS

        asked = {"mode": mode, "window": window, "radius": radius, "sparse_backend": sparse_backend}
        for key, check in ATTENTION_CHECKS:
            if asked[key] is not None:
                try:
                    check(asked[key])
                except (TypeError, ValueError) as err:
                    raise InputError(f"attention.{key}={asked[key]!r}: {err}") from err
        new = {k: self.trained_attention[k] if v is None else v for k, v in asked.items()}
        enc = self.model.encoder
        enc.attention, enc.window, enc.radius, enc.sparse_backend = (
            str(new["mode"]), int(new["window"]), int(new["radius"]), str(new["sparse_backend"]),
        )  # fmt: skip
        tag = attention_tag(new)
        suffix = tag if tag != attention_tag(self.trained_attention) else ""
        self.tag = f"{self.trained_tag}_{suffix}" if suffix else self.trained_tag
        if suffix and warn:
            log.warning("attention %s but the model was trained with %s (%s): its patch tokens see another context "
                        "than in training; outputs under the model tag %s", describe_attention(new),
                        describe_attention(self.trained_attention), self.ckpt.name, self.tag)  # fmt: skip


def attention_tag(attention: dict) -> str:
    """What of an attention changes the outputs, for a folder name: ``dense`` (eager too: the same attention),
    ``sparse-w8``, ``sparse-w8-radius2``."""
    if attention["mode"] != "sparse":
        return "dense"
    radius = int(attention["radius"])
    return f"sparse-w{int(attention['window'])}" + (f"-radius{radius}" if radius != 1 else "")


def describe_attention(attention: dict) -> str:
    if attention["mode"] != "sparse":
        return f"{attention['mode']} (every patch sees every patch)"
    return f"sparse, window {attention['window']}, radius {attention['radius']}"


def resolve_checkpoint(ckpt) -> Path:
    """``ckpt`` as given (a .ckpt file, or a segment run folder → its best checkpoint) or a clear InputError."""
    if ckpt is None or str(ckpt) == "":
        raise InputError("segment_slides needs ckpt=RUN/checkpoints/FILE.ckpt (or ckpt=RUN, a `segment` run folder)")
    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise InputError(f"ckpt={str(ckpt)!r}: no such file or folder; pass a `segment` run's checkpoint "
                         "(RUN/checkpoints/*.ckpt) or its run folder")  # fmt: skip
    if path.is_file():
        return path
    best = best_checkpoint(path, str(ckpt))
    log.info("ckpt=%s: using %s", ckpt, best)
    return best


def run_config_path(ckpt: Path) -> Path:
    """``RUN/.hydra/config.yaml`` of ``RUN/checkpoints/X.ckpt`` (or of a checkpoint lying in RUN itself)."""
    return run_dir_of(ckpt) / ".hydra" / "config.yaml"


def _state_dict(ckpt: Path) -> dict:
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 — pickles, zips, text: many exception types
        raise InputError(f"ckpt={str(ckpt)!r} is not a PyTorch/Lightning checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err  # fmt: skip
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(HEAD_KEY) for k in sd):
        what = (
            "a Lightning checkpoint without a Mask2Former head"
            if isinstance(sd, dict)
            else "not a Lightning checkpoint"
        )
        raise InputError(f"ckpt={str(ckpt)!r} is not a segmentation checkpoint ({what}); pass a checkpoint of "
                         "`hirespath segment` (RUN/checkpoints/*.ckpt)")  # fmt: skip
    return {k[len(STATE_PREFIX) :]: v for k, v in sd.items() if k.startswith(STATE_PREFIX)}


def load_segmentation(ckpt) -> SegmentationCheckpoint:
    """Rebuild the model of a ``segment`` run from ``ckpt`` (file or run folder) and the run's saved config."""
    from hydra.utils import instantiate

    from ..models.backbones import check_resolution

    path = resolve_checkpoint(ckpt)
    weights = _state_dict(path)  # first: a wrong file is named as such before its config is looked for
    cfg_path = run_config_path(path)
    if not cfg_path.is_file():
        raise InputError(
            f"ckpt={str(ckpt)!r}: the run's config {cfg_path} is missing; the model is rebuilt from "
            "the checkpoint and the config its `segment` run saved (keep the run folder whole)"
        )
    cfg = OmegaConf.load(cfg_path)
    # what the run trained, not its task_name: the paper's experiments name theirs (experiment=table5: table5)
    if (head := OmegaConf.select(cfg, "head._target_")) != SEGMENTATION_HEAD:
        raise InputError(f"{cfg_path} is not a `segment` run's config (task {cfg.get('task_name')!r}, head "
                         f"{head!r}; a segment run trains {SEGMENTATION_HEAD})")  # fmt: skip
    if float(OmegaConf.select(cfg, "pruner.prune_ratio", default=0) or 0) > 0:
        raise InputError(f"{cfg_path}: pruner.prune_ratio > 0; segmentation needs the full patch grid")
    with read_write(cfg), open_dict(cfg):
        cfg.backbone.weights = None  # every weight comes from the checkpoint
    resolution = int(cfg.resolution)
    names = OmegaConf.select(cfg, "data.cell_types")
    classes = list(CELL_TYPES) if names is None else [str(c) for c in names]

    def build() -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            encoder = instantiate(cfg.encoder)
            check_resolution(resolution, encoder.patch_size)
            return instantiate(cfg.head, encoder=encoder, num_classes=len(CELL_TYPES))

    # Every weight is in the checkpoint: the random init is skipped (seconds for UNI2-h, paid again by every job of a
    # SLURM array) and the model takes the checkpoint's tensors, copied out of its memory map (a checkpoint
    # rewritten by a running `segment` must not change under the model).
    model, assign = build_without_init(build)
    if assign:
        weights = assignable_state(weights, model.state_dict(), copy=True)
    try:
        model.load_state_dict(weights, strict=True, assign=assign)
    except RuntimeError as err:
        raise InputError(f"ckpt={str(path)!r} does not fit the model its run config {cfg_path} describes: "
                         f"{str(err).splitlines()[0][:300]}") from err  # fmt: skip
    model.eval()
    run_name = OmegaConf.select(cfg, "run_name", default=None, throw_on_resolution_failure=False)
    # the run folder's name (Hydra: its start time) tells apart runs of the same settings and checkpoint name
    run_dir = cfg_path.parent.parent
    parts = dict.fromkeys(p for p in (str(run_name or ""), run_dir.name, path.stem) if p)
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))
    return SegmentationCheckpoint(
        model=model, ckpt=path, run_dir=run_dir, config=cfg, classes=classes,
        class_index=[CELL_TYPES.index(c) for c in classes], mpp=MPP * SEGPATH_TILE_PX / resolution,
        resolution=resolution, tag=tag,
    )  # fmt: skip


def tile_probabilities(model, images01: torch.Tensor, class_index: list[int], query_chunk: int = 16) -> torch.Tensor:
    """Per-class probabilities B×C×H×W (float32) of uint8-derived images in [0, 1], at the images' own size:
    Mask2Former's semantic inference as ``segment`` evaluates it (``SegmentationModel.semantic_probs``)."""
    out = model(model.encoder.normalize(images01))
    size = tuple(images01.shape[-2:])
    return model.semantic_probs(out, size, query_chunk=query_chunk, class_index=class_index).clamp_(0, 1)

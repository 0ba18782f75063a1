"""Whole-slide embedding: the encoder as the slide runner's tile function, TRIDENT h5 files as its output.

:func:`embed_slides` runs every tissue tile of every slide through the encoder (:mod:`hirespath.slides`: listing,
locks, the tissue grid, tile readers, timings and the ledger) and writes one ``<slide>.h5`` per slide
(:mod:`hirespath.wsi.trident_h5`). :func:`ensure_features` is how the tasks that need a features folder get one
(mil and predict_slides embed first): it embeds what is missing and waits for slides other workers hold.

On disk (``<tiling>`` = :func:`~hirespath.wsi.trident_h5.tiling_tag`, e.g. ``20x_1792px_0px_overlap``)::

    job_dir/
      <tiling>/patches/<slide>_patches.h5          coords; reused by every encoder with the same tiling and mpp
      <tiling>/features_<encoder tag>/<slide>.h5   features + coords (+ tokens, token_scores); .lock while embedding
      <tiling>/features_<encoder tag>/config.json  what the folder's features depend on (checked on reuse)
      <tiling>/features_<encoder tag>/skipped.csv, timings.csv, summary.json   the folder's ledger
      <tiling>/thumbnails/<slide>.png              tissue outline + kept tiles (+ pruned tokens)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..slides.ledger import CONFIG, slide_lock
from ..slides.prepare import PreparedSlide, patches_attrs
from ..slides.provenance import recorded_slide
from ..slides.runner import Runtime, SlideJob, run_slides
from ..slides.tile_model import TileModel
from ..utils.errors import InputError
from ..utils.io import try_lock
from ..wsi import trident_h5
from ..wsi.listing import SlideSpec, as_specs
from ..wsi.tissue import check_tile_multiple

log = logging.getLogger("hirespath.embeddings")

FEATURES = ("cls", "mean", "cls+mean")


# ---------------------------------------------------------------------------------------------------------------
# the encoder's identity (its tag, attrs and weights fingerprint are in wsi.trident_h5, which writes them)


# what must match for features to share one features_<tag>/ folder (precision may differ: bf16 and fp32 give the
# same features within rounding; the weights file's size and sampled digest stand for the file, so a moved copy is
# accepted and another file of the same size, e.g. a fine-tuned copy of the weights, is not)
IDENTITY_KEYS = ("backbone", "attention", "window", "radius", "prune_ratio", "prune_layer", "prune_score_tokens",
                 "resolution", "vit_patch_size", "embed_dim", *trident_h5.ARCHITECTURE_KEYS, "feature")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# tile function and sink


def encoder_forward(encoder, features: str, tokens: bool, token_scores: bool = False):
    """images in [0, 1] → (features B×D float32, kept tokens per tile or None, positions per tile, patch grid,
    per-patch global-attention scores B×rows·cols float32 or None)."""

    def forward(x: torch.Tensor):
        # the keyword only when asked: any encoder module works without it, and the default path is untouched
        out = encoder(encoder.normalize(x), token_scores=True) if token_scores else encoder(encoder.normalize(x))
        parts = {"cls": [out.cls], "mean": [out.mean_patch], "cls+mean": [out.cls, out.mean_patch]}[features]
        feats = torch.cat([p.float() for p in parts], 1).cpu().numpy()
        # positions are small (N'×2 per tile) and feed the pruned-token overlays even without tokens
        toks = list(out.patch_tokens.float().cpu().numpy()) if tokens else None
        scores = out.token_scores.float().cpu().numpy() if token_scores else None
        return feats, toks, list(out.positions.cpu().numpy()), out.grid, scores

    return forward


class FeatureSink:
    """One slide's h5 file; non-finite feature rows (e.g. fp16 overflow) are refused, not written."""

    def __init__(self, writer: trident_h5.FeatureWriter, coords: np.ndarray, tokens: bool, overlays: int,
                 draw: Callable[[list], None] | None = None):  # fmt: skip
        self.writer, self.coords, self.tokens, self.overlays_left = writer, coords, tokens, overlays
        self.overlays: list[tuple[int, np.ndarray, np.ndarray, tuple[int, int]]] = []
        self.draw = draw  # the slide's pictures, given the overlays

    def add(self, tiles: np.ndarray, output, images: torch.Tensor) -> list[tuple[int, str]]:
        feats, toks, pos, patch_grid, scores = output
        finite = np.isfinite(feats).all(axis=1)
        refused = [(int(t), "features are not finite (NaN/inf; fp16 overflow? use bf16-mixed or fp32)")
                   for t in tiles[~finite]]  # fmt: skip
        if self.tokens:  # stored in the file's token dtype (float16: past ±65,504 a finite token would be inf)
            stored = self.writer.tok.dtype
            with np.errstate(over="ignore"):
                toks = [np.asarray(t, dtype=stored) for t in toks]  # as written (the writer casts no more)
            fits = np.array([bool(np.isfinite(t).all()) for t in toks]) & finite
            refused += [(int(t), f"tokens are not finite as {stored} (|value| too large for it)")
                        for t in tiles[finite & ~fits]]  # fmt: skip
            finite = fits
        keep = np.flatnonzero(finite)
        if len(keep):
            self.writer.append(
                feats[keep],
                self.coords[tiles[keep]],
                [toks[i] for i in keep] if self.tokens else None,
                [pos[i] for i in keep] if self.tokens else None,
                grid=patch_grid,
                token_scores=scores[keep] if scores is not None else None,
            )
        for i in keep[: max(0, self.overlays_left)]:
            self.overlays.append((int(tiles[i]), images[i].permute(1, 2, 0).numpy(), pos[i], patch_grid))
        self.overlays_left -= min(len(keep), max(0, self.overlays_left))
        return refused

    def close(self) -> dict:
        if self.writer.n == 0:
            self.writer.abort()
            from ..wsi.reader import SlideError

            raise SlideError("no tile could be embedded")  # the runner adds why (its tiles' reasons)
        t0 = time.perf_counter()
        if self.draw is not None:  # before the file appears: a run stopped after it would skip the slide, unpictured
            try:
                self.draw(self.overlays)
            except Exception as err:  # noqa: BLE001 — a picture (a folder of another user's) must not cost the slide
                log.warning("%s: its pictures could not be drawn (%s: %s); its features are kept",
                            self.writer.path.stem, type(err).__name__, err)  # fmt: skip
        drawn = time.perf_counter() - t0
        self.writer.close()
        return {"tiles": self.writer.n, "picture_seconds": drawn}

    def abort(self) -> None:
        self.writer.abort()


@dataclass
class EmbeddingConsumer:
    """The encoder and the TRIDENT h5 writer, plugged into :func:`hirespath.slides.run_slides`."""

    encoder: torch.nn.Module
    tile_function: TileModel
    folder: str
    identity: dict
    features_attrs: dict
    features: str
    tokens: bool
    thumbnails: bool
    overlay_tiles: int
    token_dtype: type = np.float16
    overwrite_hint: str = SlideJob.OVERWRITE
    token_scores: bool = False
    # a folder written before these were recorded cannot vouch for them: they are not added to its config.json
    unvouched_keys: tuple = trident_h5.ARCHITECTURE_KEYS
    _said_missing: bool = field(default=False, init=False, repr=False)  # a finished file was embedded again

    @property
    def needs_thumbnail(self) -> bool:
        return self.thumbnails

    def check_folder(self, out_dir: Path) -> None:
        """Refuse a folder of feature files another tool wrote (no ``config.json``; TRIDENT's ``features_conch_v15``
        when ``embed.encoder_tag`` names it): its files would count as finished slides and its new config.json would
        vouch for them, another encoder's features under this one's settings."""
        if (out_dir / CONFIG).is_file() or not out_dir.is_dir():
            return
        for path in sorted(out_dir.glob("*.h5"))[:1]:
            try:
                info = trident_h5.inspect_features(path, count_nonfinite=False)
            except (InputError, OSError):
                return  # a file the readers cannot use: the run's own checks name it
            attrs = info["features_attrs"]
            if "vit_patch_size" not in attrs or "feature" not in attrs:  # attrs every hirespath features file has
                raise InputError(
                    f"{out_dir} holds feature files hirespath did not write and no {CONFIG} (e.g. {path.name}: "
                    f"encoder {attrs.get('encoder', 'not named')}, features ({info['n_tiles']}, {info['dim']}); "
                    f"TRIDENT's?): they would count as finished slides of this encoder. Use another "
                    f"embed.encoder_tag or job_dir, or {SlideJob.OVERWRITE} to replace them"
                )

    def output_path(self, out_dir: Path, spec: SlideSpec) -> Path:
        return out_dir / f"{spec.slide_id}.h5"

    def is_finished(self, path: Path) -> bool:
        """The file exists (files appear only complete) and, when tokens / token scores are wanted, holds them."""
        return path.is_file() and self._missing(path) == []  # (None: unreadable)

    def _missing(self, path: Path) -> list[str] | None:
        """The wanted datasets (tokens, token_scores) the file at ``path`` lacks; None when it cannot be read."""
        wanted = [name for name, on in (("tokens", self.tokens), ("token_scores", self.token_scores)) if on]
        if not wanted:
            return []
        try:
            with h5py.File(path, "r") as f:
                return [name for name in wanted if name not in f]
        except OSError:
            return None

    def _say_embedded_again(self, path: Path) -> None:
        """A file of the folder that a slide's writer replaces and that lacks what this run asks for (mostly: a
        finished slide embedded again for it, ``embed.token_scores=true`` on a folder embedded without them, as long
        as the first time; also an overwrite's or a rescan's), said when the slide starts: the first in a warning,
        the rest at info level."""
        if not path.is_file() or not (missing := self._missing(path)):
            return
        said = (
            f"{path} has no {' or '.join(missing)} ({' and '.join(f'embed.{m}=true' for m in missing)} asks for them)"
        )
        if not self._said_missing:
            log.warning("%s: embedded again, as is every finished slide without them (each takes as long as the first "
                        "time)", said)  # fmt: skip
        else:
            log.info("%s: embedded again", said)
        self._said_missing = True

    def finished_mpp(self, path: Path) -> float | None:
        try:
            attrs, _ = trident_h5.read_coords(path)
            return float(attrs["level0_mpp"])
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def made_from(self, path: Path) -> dict | None:
        """The slide file the features of ``path`` were made from (the runner's rescan check for a slide without a
        timings.csv row: a run stopped before it)."""
        return recorded_slide(lambda: trident_h5.read_coords(path)[0], path)

    def open(self, spec: SlideSpec, prepared: PreparedSlide, path: Path) -> FeatureSink:
        self._say_embedded_again(path)
        grid = prepared.grid
        c_attrs = patches_attrs(spec.slide_id, grid, path.parent.parent, prepared.qupath_region, prepared.slide_bytes,
                                prepared.slide_path)  # fmt: skip
        attrs = {**self.features_attrs, "name": spec.slide_id, "savetodir": str(path.parent)}
        dim = self.encoder.embed_dim * (2 if self.features == "cls+mean" else 1)
        writer = trident_h5.FeatureWriter(path, dim, c_attrs, attrs, tokens=self.tokens, token_dtype=self.token_dtype,
                                          token_dim=self.encoder.embed_dim, token_scores=self.token_scores)  # fmt: skip
        pruned = getattr(self.encoder, "pruner", None) is not None and self.encoder.pruner.enabled
        overlays = self.overlay_tiles if pruned else 0
        draws = self._draws(path, prepared, overlays > 0)
        overlays = overlays if draws else 0
        draw = functools.partial(self._draw, spec, prepared, path) if draws else None
        return FeatureSink(writer, grid.coords, self.tokens, overlays, draw)

    def _thumb_path(self, out_path: Path, slide_id: str) -> Path:
        return out_path.parent.parent / trident_h5.THUMBNAILS / f"{slide_id}.png"

    def _draws(self, out: Path, prepared: PreparedSlide, pruned: bool) -> bool:
        """Whether the slide's pictures are wanted and one of them is missing (drawn by another encoder of the tiling,
        or by a run stopped between them), or the slide was tiled anew since they were drawn (other settings,
        another scan, an overwrite; by this run or one without pictures), so they show an old grid."""
        if not self.thumbnails or prepared.grid.thumbnail is None:
            return False
        thumb = self._thumb_path(out, out.stem)
        pictures = [thumb, *([self._pruned_path(thumb)] if pruned else [])]
        if not prepared.reused or not all(p.is_file() for p in pictures):
            return True
        try:  # the grid stored since (a run without pictures tiled the slide again: a rescan, other settings)
            tiled = prepared.patches.stat().st_mtime_ns if prepared.patches is not None else None
        except FileNotFoundError:
            tiled = None
        return tiled is not None and any(p.stat().st_mtime_ns < tiled for p in pictures)

    @staticmethod
    def _pruned_path(thumb: Path) -> Path:
        return thumb.with_name(f"{thumb.stem}_pruned.png")

    def finish(self, spec: SlideSpec, prepared: PreparedSlide, result: dict, out_dir: Path) -> None:
        """Nothing: the sink drew the slide's pictures before its file appeared."""

    def _draw(self, spec: SlideSpec, prepared: PreparedSlide, out: Path, overlays: list) -> None:
        from ..viz.thumbnails import save_pruned_overlays, save_thumbnail

        grid, thumb = prepared.grid, self._thumb_path(out, spec.slide_id)
        save_thumbnail(thumb, grid, f"{spec.slide_id}: {len(grid)} tiles of {grid.tile_size} px at "
                       f"{grid.tile_mpp:g} µm/px, {grid.tissue_area_mm2:.1f} mm² tissue")  # fmt: skip
        if overlays:
            title = f"{spec.slide_id}: pruned patches (red) of the first {len(overlays)} tiles"
            save_pruned_overlays(self._pruned_path(thumb), overlays, self.encoder.patch_size, title)


# ---------------------------------------------------------------------------------------------------------------
# the calls tasks use


def _consumer(encoder, job: SlideJob, embed, runtime: Runtime, weights, extra_attrs, token_dtype) -> EmbeddingConsumer:
    if embed.features not in FEATURES:
        raise InputError(f"embed.features must be one of {', '.join(FEATURES)}, got {embed.features!r}")
    check_tile_multiple(job.tiling.size, encoder.patch_size, "the encoder's")
    scores = bool(getattr(embed, "token_scores", False))
    tile_fn = TileModel(encoder, runtime.device, runtime.precision, job.batch_size,
                        forward=encoder_forward(encoder, embed.features, bool(embed.tokens), scores))  # fmt: skip
    tag = features_tag(encoder, embed, weights)
    attrs = trident_h5.encoder_attrs(encoder, tag=tag, features=embed.features, tile_size=int(job.tiling.size),
                                     weights=weights, precision=tile_fn.precision, extra=extra_attrs)  # fmt: skip
    fp = attrs["weights_fingerprint"]
    identity = {k: attrs[k] for k in IDENTITY_KEYS if k in attrs}  # an encoder module without a ViT: no depth
    identity.update(weights_size=fp["size"] if fp else None, weights_digest=fp["digest"] if fp else None,
                    tokens=bool(embed.tokens))  # fmt: skip
    return EmbeddingConsumer(
        encoder=encoder, tile_function=tile_fn, folder=f"features_{tag}", identity=identity, features_attrs=attrs,
        features=embed.features, tokens=bool(embed.tokens), thumbnails=bool(embed.thumbnails),
        overlay_tiles=int(embed.overlay_tiles), token_dtype=token_dtype, token_scores=scores,
    )  # fmt: skip


def features_tag(encoder, embed, weights=None) -> str:
    """The ``features_<tag>`` folder's tag: ``embed.encoder_tag`` or the encoder's own (trident_h5.encoder_tag)."""
    return embed.encoder_tag or trident_h5.encoder_tag(encoder, embed.features, weights)


def features_folder(encoder, job_dir, tiling, embed, weights=None) -> Path:
    """Where :func:`embed_slides` writes these features: ``<job_dir>/<tiling tag>/features_<tag>``."""
    return SlideJob(Path(job_dir), tiling).tiling_dir / f"features_{features_tag(encoder, embed, weights)}"


def embed_slides(encoder, slides, job_dir, tiling, embed, runtime: Runtime | None = None, *, weights=None,
                 default_mpp: float | None = None, extra_attrs: dict | None = None,
                 token_dtype=np.float16) -> dict:  # fmt: skip
    """Embed every tissue tile of ``slides`` into ``<job_dir>/<tiling>/features_<tag>/<slide>.h5``; returns the
    summary (``features_dir`` is the folder). ``weights``: the file the encoder was built from (recorded, and part
    of the folder's identity)."""
    runtime = (runtime or Runtime()).resolve()
    job = SlideJob.from_settings(job_dir, tiling, embed, default_mpp)
    consumer = _consumer(encoder, job, embed, runtime, weights, extra_attrs, token_dtype)
    random = random_weights(encoder, weights)
    summary = run_slides(slides, job, consumer, runtime, notes={"random_weights": random,
                         "precision": consumer.tile_function.precision})  # fmt: skip
    summary.update(features_dir=summary["output_dir"], encoder=consumer.folder.removeprefix("features_"),
                   embedded=summary["done"])  # fmt: skip
    return summary


def random_weights(encoder, weights) -> bool:
    """True (and a warning) when a preset with official weights runs without a weights file: its features are
    those of a random network (the folder name ends in ``-random``)."""
    preset = getattr(encoder, "preset", None)
    if weights or preset is None or not preset.checkpoint:
        return False
    log.warning("backbone %s has no weights file (backbone.weights=null): embedding with RANDOM weights. Download "
                "%s from %s and pass backbone.weights=FILE", preset.name, preset.checkpoint_file or "the checkpoint",
                preset.checkpoint)  # fmt: skip
    return True


def ensure_features(encoder, slides, tiling, embed, runtime: Runtime | None = None, *, job_dir, weights=None,
                    default_mpp: float | None = None, poll_s: float = 2.0) -> tuple[Path, dict]:  # fmt: skip
    """The features folder of ``slides`` for this encoder, tiling and feature kind: embeds what is missing, and
    waits for slides that other workers (parallel grid jobs over one folder) are embedding, so the folder is
    complete when it returns (but for the slides listed in its skipped.csv)."""
    specs = as_specs(slides)
    summary = embed_slides(encoder, specs, job_dir, tiling, embed, runtime, weights=weights, default_mpp=default_mpp)
    out_dir = Path(summary["features_dir"])
    held = summary["slides_locked_by_others"]
    embed = _NoOverwrite(embed)  # the passes after the first keep what it (and the other workers) replaced
    while held:
        log.info("waiting for %d slides other workers are embedding into %s", held, out_dir)
        locks = [slide_lock(out_dir / f"{s.slide_id}.h5") for s in specs]  # this call's slides only, not the folder's
        while any(_lock_live(p, embed) for p in locks if p.exists()):
            time.sleep(poll_s)
        again = embed_slides(encoder, specs, job_dir, tiling, embed, runtime, weights=weights,
                             default_mpp=default_mpp)  # fmt: skip
        summary["embedded"] += again["embedded"]
        summary["slides_done"] += again["slides_done"]
        held = again["slides_locked_by_others"]
    return out_dir, summary


class _NoOverwrite:
    """The embedding settings with ``overwrite`` off."""

    def __init__(self, embed):
        self._embed = embed

    def __getattr__(self, name: str):
        return False if name == "overwrite" else getattr(self._embed, name)


def _lock_live(path: Path, embed) -> bool:
    lock = try_lock(path, stale_s=float(embed.lock_stale_hours) * 3600)
    if lock is None:
        return True
    lock.release()
    return False

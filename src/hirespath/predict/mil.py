"""A trained MIL model (``hirespath mil``) applied to slide features: the model and what it was trained on, read from
its run; the features checked against that; per-slide predictions, attention, heatmaps (PNG and QuPath GeoJSON).

What the predict_slides task runs (:mod:`hirespath.tasks.predict_slides`); a library, so notebooks can call it too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..configs.heads import TASK_HEADS
from ..data.mil import TRAINED_ON, WEIGHTS_KEYS, SlideFeatureDataset, features_identity
from ..results import PREDICTIONS_FILE, TEST_LOSS, TEST_NUM_SLIDES
from ..utils.checkpoints import best_checkpoint, file_digest, run_dir_of
from ..utils.errors import InputError
from ..utils.io import read_csv_ids
from ..wsi import trident_h5

log = logging.getLogger("hirespath.predict_slides")

RESOLUTIONS = ("tile", "token")

# ----------------------------------------------------------------------------------------------- the trained model


def find_checkpoint(ckpt: str | Path) -> tuple[Path, Path]:
    """(checkpoint file, run directory) of ``ckpt``: a ``.ckpt`` file inside ``RUN/checkpoints/`` (or ``RUN/``), or
    a run directory (its best checkpoint: :func:`hirespath.utils.checkpoints.best_checkpoint`)."""
    if not ckpt:
        raise InputError("predict_slides needs ckpt=MILRUN/checkpoints/<file>.ckpt (or ckpt=MILRUN, a mil run dir)")
    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise InputError(f"ckpt={str(path)!r} does not exist; give a mil run's checkpoint or its run directory")
    if path.is_file():
        return path, run_dir_of(path)
    best = best_checkpoint(path, str(ckpt))
    return best, run_dir_of(best)


def run_config(run_dir: Path, ckpt: Path) -> DictConfig:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise InputError(f"{ckpt}: no run config {path}; predict_slides needs the checkpoint inside its mil run "
                         "directory (MILRUN/checkpoints/<file>.ckpt next to MILRUN/.hydra/config.yaml)")  # fmt: skip
    return OmegaConf.load(path)


def load_mil_head(ckpt: Path, run_cfg: DictConfig) -> tuple[torch.nn.Module, int, int]:
    """(head in eval mode, its input feature dimension, number of classes); InputError for a checkpoint that is not
    a mil run's."""
    task = run_cfg.get("task_name")
    head_name = OmegaConf.select(run_cfg, "head.name")
    if task != "mil" or head_name not in TASK_HEADS["mil"]:
        heads = ", ".join(TASK_HEADS["mil"])
        raise InputError(f"{ckpt} is not a MIL checkpoint: its run is task {task!r} with head {head_name!r}; "
                         f"predict_slides takes a `hirespath mil` run (heads {heads})")  # fmt: skip
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — a corrupt or foreign file surfaces as many exception types
        raise InputError(f"{ckpt} is not a MIL checkpoint: torch cannot read it ({err})") from err
    if not isinstance(state, dict):
        what = type(state).__name__
        raise InputError(f"{ckpt} is not a MIL checkpoint: it holds a {what}, not a Lightning checkpoint")
    weights = {k.removeprefix("head."): v for k, v in (state.get("state_dict") or {}).items() if k.startswith("head.")}
    classes = (state.get("hyper_parameters") or {}).get("num_classes")
    matrices = [v for v in weights.values() if v.ndim == 2]
    if not matrices or classes is None:
        raise InputError(f"{ckpt} is not a MIL checkpoint: no head.* weights or num_classes in it "
                         "(expected a Lightning checkpoint of hirespath's MILModule)")  # fmt: skip
    in_features = int(matrices[0].shape[1])  # the head's first layer reads the tile features
    head = instantiate(run_cfg.head, in_features=in_features, num_classes=int(classes))
    try:
        head.load_state_dict(weights)
    except RuntimeError as err:
        raise InputError(f"{ckpt}: its weights do not fit the run's head {head_name}: {err}") from err
    return head.eval(), in_features, int(classes)


# ----------------------------------------------------------------------------------------------- what it expects


def _light_encoder(run_cfg: DictConfig) -> SimpleNamespace:
    """The attributes features_tag reads, from the run's config (no model is built)."""
    from ..models.pruning import GlobalAttentionPruner

    a, p = run_cfg.attention, run_cfg.pruner
    return SimpleNamespace(
        preset=SimpleNamespace(name=str(run_cfg.backbone.name)),
        attention=str(a.mode),
        window=int(a.window),
        radius=int(a.get("radius", 1)),
        pruner=GlobalAttentionPruner(float(p.prune_ratio), int(p.prune_layer), str(p.get("prune_score_tokens", "cls"))),
    )


def expected_features(run_cfg: DictConfig, dim: int, run_dir: Path | None = None) -> dict:
    """What the model was trained on: ``dim``, ``source`` (in words), ``attrs`` (identity attrs of its features),
    ``weights`` (size and digest of the encoder's weights file) and ``tiling`` (target_mpp, patch_size): as the run
    recorded them when it trained (``features.json`` in ``run_dir``), else from the training folder's files when they
    are there, else from the run's encoder/tile/embed settings and weights file."""
    out = {"dim": dim, "attrs": {}, "weights": {}, "tiling": {}}
    recorded = Path(run_dir) / TRAINED_ON if run_dir is not None else None
    if recorded is not None and recorded.is_file():
        trained_on = json.loads(recorded.read_text())
        return {**out, **{k: trained_on.get(k) or {} for k in ("attrs", "weights", "tiling")},
                "source": f"the features in {trained_on.get('features_dir')}, as the run recorded them"}  # fmt: skip
    folder = run_cfg.get("features_dir")
    if not folder:
        try:
            return {**out, **config_features(run_cfg)}
        except Exception as err:  # noqa: BLE001 — a run config from another version: the dimension still checks
            log.warning("cannot read the run's encoder settings (%s); checking the feature dimension only", err)
            out["source"] = "the run's features"
        return out
    out["source"] = f"the features in {folder}"
    files = sorted(Path(folder).glob("*.h5")) if Path(folder).is_dir() else []
    for f in files:  # the first readable training file stands for the folder (scan_feature_dir refused mixes)
        try:
            if trident_h5.inspect_features(f, count_nonfinite=False)["n_tiles"] == 0:
                continue  # a slide without tissue: TRIDENT's file of it may record nothing of how the rest were made
            return {**out, **features_identity(f)}
        except (OSError, ValueError):
            continue
    return out


def config_features(run_cfg: DictConfig) -> dict:
    """What embedding with the run's config makes (``attrs``, ``tiling``, ``weights``, ``source``): the encoder,
    tile and embed settings and the weights file as they are now."""
    from ..embeddings.features import features_folder

    weights = OmegaConf.select(run_cfg, "backbone.weights")
    folder = features_folder(_light_encoder(run_cfg), "job", run_cfg.tile, run_cfg.embed, weights)
    tag = folder.name.removeprefix("features_")
    a, p = run_cfg.attention, run_cfg.pruner
    out = {"attrs": {"encoder": tag, "backbone": str(run_cfg.backbone.name), "attention": str(a.mode),
                     "window": int(a.window), "prune_ratio": float(p.prune_ratio), "prune_layer": int(p.prune_layer),
                     "resolution": int(run_cfg.tile.size), "feature": str(run_cfg.embed.features)},
           "tiling": {"target_mpp": float(run_cfg.tile.mpp), "patch_size": int(run_cfg.tile.size),
                      "overlap": int(run_cfg.tile.overlap)},
           "weights": {}, "source": f"features_{tag} at {run_cfg.tile.size} px, {run_cfg.tile.mpp} µm/px"}  # fmt: skip
    if weights and Path(str(weights)).is_file():  # as it is now (a run of before features.json)
        out["weights"] = {"weights_size": Path(str(weights)).stat().st_size, "weights_digest": file_digest(weights)}
    return out


def check_embedding_reproduces(run_cfg: DictConfig, expected: dict) -> None:
    """Before any slide is embedded for a run trained on given features (``features_dir=``: its config holds the
    defaults, not how those features were made): refused (InputError) unless embedding with the run's config makes
    what the training features record — the same encoder, settings, weights file and tiling."""
    given = run_cfg.get("features_dir")
    if not given:
        return  # the run embedded its slides itself, with this config
    how = (f"embed them as {given} was made (e.g. `hirespath embed_slides` with those settings, or the tool that "
           "made them) and pass features_dir=")  # fmt: skip
    if not expected["attrs"].get("encoder"):
        raise InputError(f"the model was trained on the features in {given}, which do not record their encoder "
                         f"(CLAM's files record nothing, older TRIDENT's their tiling only; or the folder is gone and "
                         f"the run, older than features.json, recorded nothing of it): new slides cannot be embedded "
                         f"like them here; {how}")  # fmt: skip
    made = config_features(run_cfg)
    bad = _differences(expected, made)
    trained_weights = expected.get("weights") or {}
    if not bad and trained_weights.get("weights_digest") and not made["weights"]:
        bad = [("weights", f"a file of digest {trained_weights['weights_digest']}", "none (random weights)")]
    if bad:
        what = "; ".join(f"{k}: they have {v!r}, the run's config would embed {g!r}" for k, v, g in bad)
        raise InputError(f"the model was trained on the features in {given}, given to it, not made by it; its config "
                         f"does not say how they were made ({what}). To predict new slides, {how}")  # fmt: skip


def _differences(want: dict, got: dict) -> list[tuple]:
    """(key, wanted, got) where features ``got`` (made, or to be made: ``attrs``, ``tiling``, ``weights``) differ
    from ``want`` in an identity attr or tiling key both set; else, the same encoder by name, where their weights
    files differ by content (a fine-tuned copy saved under the same name)."""
    a = {**want["attrs"], **{f"tile {k}": v for k, v in want["tiling"].items()}}
    b = {**got["attrs"], **{f"tile {k}": v for k, v in got["tiling"].items()}}
    bad = [(k, v, b[k]) for k, v in a.items() if b.get(k) is not None and not _same(v, b[k])]
    return bad or _other_weights(want.get("weights") or {}, got.get("weights") or {})


def _same(a, b) -> bool:
    try:
        return bool(np.isclose(float(a), float(b)))
    except (TypeError, ValueError):
        return str(a) == str(b)


def _other_weights(want: dict, got: dict) -> list[tuple]:
    """(key, expected, got) where the features' weights file differs from the model's by size or digest (either
    side unknown: random weights, files of other tools or of before digests — not compared)."""
    bad = []
    for key in WEIGHTS_KEYS:
        a, b = want.get(key), got.get(key)
        if a is None or b is None:
            continue
        a, b = (int(a), int(b)) if key == "weights_size" else (str(a), str(b))
        if a != b:
            bad.append((key, a, b))
    return bad


def check_features(files: pd.DataFrame, expected: dict, features_dir: Path) -> None:
    """Refuse (InputError) features the model cannot read or was not trained on, before any prediction."""
    ok = files[files.error.isna()]
    if ok.empty:
        return
    first = ok.iloc[0]
    name = Path(first.path).name
    if int(first.dim) != expected["dim"]:
        raise InputError(f"{features_dir}: the model expects {expected['dim']}-dimensional features "
                         f"({expected['source']}), but {name} holds {int(first.dim)}-dimensional ones; give the "
                         "features of the encoder the model was trained on (or wsi_dir= to embed with it)")  # fmt: skip
    bad = _differences(expected, features_identity(first.path))  # read as the training side was
    if bad:
        what = "; ".join(f"{k}: expects {v!r}, got {g!r}" for k, v, g in bad)
        raise InputError(f"{features_dir}: {name} was made with another encoder, weights file or tiling "
                         "than the model's "
                         f"({expected['source']}): {what}. Give features made like the model's, or wsi_dir= to "
                         "embed with its settings")  # fmt: skip


# ----------------------------------------------------------------------------------------------- embedding first


def embed_new_slides(run_cfg: DictConfig, specs, *, job_dir, trainer, default_mpp, token_scores: bool) -> Path:
    """The run's encoder, tiling and feature kind over ``specs`` into ``job_dir``; returns the features folder."""
    from ..embeddings.features import ensure_features
    from ..slides import Runtime
    from ..slides.launch import launch_id

    weights = OmegaConf.select(run_cfg, "backbone.weights")
    if weights and not Path(str(weights)).is_file():
        raise InputError(f"the run's backbone.weights={weights!r} does not exist; the slides must be embedded with "
                         "the weights the model was trained on")  # fmt: skip
    if not job_dir:
        raise InputError("wsi_dir/slides given: set job_dir=OUT (where the new slides' features are written)")
    runtime = Runtime.from_trainer(trainer, progress=False, rank=0, world_size=1, launch=launch_id())
    tile = OmegaConf.create(OmegaConf.to_container(run_cfg.tile, resolve=True))
    embed = OmegaConf.to_container(run_cfg.embed, resolve=True)
    embed.update(token_scores=bool(token_scores or embed.get("token_scores", False)))
    embed = SimpleNamespace(**embed)
    torch.manual_seed(int(run_cfg.get("seed", 42)))  # a random-weights backbone: the same weights as the run's
    encoder = instantiate(run_cfg.encoder)
    folder, _ = ensure_features(encoder, specs, tile, embed, runtime, job_dir=job_dir, weights=weights,
                                default_mpp=default_mpp)  # fmt: skip
    return folder


# ----------------------------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict(head: torch.nn.Module, rows: pd.DataFrame, max_tiles, seed: int) -> tuple[list[dict], list[tuple]]:
    """Per-slide dicts (slide_id, probs, attention, coords, tile_size, tiles: the feature rows used) and
    (slide_id, reason) for slides that could not be predicted. Bags one at a time: no padding."""
    ds = SlideFeatureDataset(rows.assign(label=-1), max_tiles=max_tiles, random=False, seed=seed)
    results, failed = [], []
    for i in range(len(ds)):
        sid = str(rows.slide_id.iloc[i])
        try:
            bag = ds[i]
            out = head(bag["features"][None])
            probs = out.logits.float().softmax(1)[0].numpy()
            if not np.isfinite(probs).all():
                raise ValueError("the model's outputs are not finite")
        except (OSError, ValueError, KeyError) as err:
            failed.append((sid, f"cannot predict: {err}"))
            log.warning("slide %s skipped: %s", sid, err)
            continue
        n = int(rows.n_tiles.iloc[i])
        subset = ds.tile_subset(n, sid)
        results.append({"slide_id": sid, "probs": probs, "attention": out.attention[0].float().numpy(),
                        "coords": bag["coords"].numpy(), "tile_size": bag["tile_size"], "path": rows.path.iloc[i],
                        "tiles": subset if subset is not None else np.arange(n)})  # fmt: skip
    return results, failed


def predictions_table(results: list[dict], num_classes: int) -> pd.DataFrame:
    probs = np.stack([r["probs"] for r in results]).astype(np.float64)
    df = pd.DataFrame({"slide_id": [r["slide_id"] for r in results], "pred": probs.argmax(1)})
    for c in range(num_classes):
        df[f"p{c}"] = probs[:, c]
    df["n_tiles"] = [len(r["attention"]) for r in results]
    return df


def read_labels(labels_csv, num_classes: int) -> pd.DataFrame:
    """The ``labels=`` CSV (slide_id, label: a class index of the model), checked before any slide is read."""
    path = Path(str(labels_csv))
    if not path.is_file():
        raise InputError(f"labels={str(path)!r} does not exist; give a CSV with columns slide_id, label")
    labels = read_csv_ids(path, "slide_id")
    if not {"slide_id", "label"} <= set(labels.columns):
        raise InputError(f"labels={str(path)!r} lacks columns slide_id, label (has {list(labels.columns)})")
    label = pd.to_numeric(labels.label, errors="coerce")
    bad = labels[label.isna() | (label < 0) | (label >= num_classes) | (label != label.round())]
    if len(bad):
        raise InputError(f"labels={str(path)!r}: label must be a class index 0…{num_classes - 1}; bad rows: "
                         + ", ".join(f"{r.slide_id}: {r.label!r}" for r in bad.head(5).itertuples()))  # fmt: skip
    dup = labels.slide_id[labels.slide_id.duplicated()]
    if len(dup):
        raise InputError(f"labels={str(path)!r}: slide_id {dup.iloc[0]!r} appears more than once "
                         f"({len(dup)} duplicates); give each slide one label")  # fmt: skip
    return labels.assign(label=label.astype(int))[["slide_id", "label"]]


def labelled_metrics(pred: pd.DataFrame, labels: pd.DataFrame, num_classes: int, source: str = "labels") -> dict:
    """Test metrics of the predicted slides that ``labels`` (:func:`read_labels`) holds."""
    from ..metrics.classification import classification_metrics

    joined = pred.merge(labels, on="slide_id")
    if joined.empty:
        raise InputError(f"{source}: none of its slides was predicted (its slide ids e.g. "
                         f"{labels.slide_id.head(3).tolist()}, predicted e.g. "
                         f"{pred.slide_id.head(3).tolist()})")  # fmt: skip
    probs = torch.tensor(joined[[f"p{c}" for c in range(num_classes)]].to_numpy())
    target = torch.tensor(joined.label.to_numpy(), dtype=torch.long)
    metrics = classification_metrics(probs, target, num_classes, prefix="test/")
    metrics[TEST_LOSS] = float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), target))
    metrics[TEST_NUM_SLIDES] = len(joined)
    return metrics


# ----------------------------------------------------------------------------------------------- heatmaps


def read_token_scores(path, tiles: np.ndarray) -> np.ndarray | None:
    """The ``token_scores`` rows of ``tiles`` (n×rows×cols), or None when the file has none."""
    import h5py

    with h5py.File(path, "r") as f:
        if "token_scores" not in f:
            return None
        ds = f["token_scores"]
        rows, cols = (int(v) for v in ds.attrs["grid"])
        picked = ds[:] if len(tiles) == ds.shape[0] else ds[np.sort(tiles)]  # (a subset only under max_tiles_eval)
        return np.asarray(picked, dtype=np.float64).reshape(len(tiles), rows, cols)


def tile_geojson(r: dict, path: Path, num_classes: int, region: tuple[int, int, int, int] | None = None) -> Path:
    """The slide's tiles as QuPath detections, measurements: attention, its percentile, p0..p{K-1}. ``region``:
    QuPath's image of the slide (x, y, width, height in level-0 px, ``qupath.image_region``), the tiles cut at its
    edges and moved to its corner (for a MIRAX or SCN slide, the scanned region; None: the slide's own
    coordinates, uncut)."""
    from shapely.geometry import box

    from ..viz.mil import attention_scaled, infer_tile_size
    from ..wsi.qupath import feature, write_geojson

    tile = float(r["tile_size"] or infer_tile_size(r["coords"]) or 1)
    rank = attention_scaled(r["attention"], "percentile")
    probs = {f"p{c}": float(r["probs"][c]) for c in range(num_classes)}
    bounds = box(region[0], region[1], region[0] + region[2], region[1] + region[3]) if region else None
    origin = (int(region[0]), int(region[1])) if region else (0, 0)
    feats = []
    for (x, y), a, q in zip(r["coords"], r["attention"], rank):
        geom = box(float(x), float(y), float(x) + tile, float(y) + tile)
        if bounds is not None:
            geom = geom.intersection(bounds)
            if geom.is_empty:
                continue
        feats.append(feature(geom, "detection", measurements={"attention": float(a), "attention_percentile": float(q),
                                                              **probs}, origin=origin))  # fmt: skip
    return write_geojson(path, feats)


def _qupath_region(slide_path, attrs: dict) -> tuple[int, int, int, int] | None:
    """QuPath's image of the slide (``qupath.image_region``); without the slide, as the feature file recorded it
    when embedded (coords attr ``qupath_region``), else the whole slide as the file gives its size (or None)."""
    from ..wsi import qupath
    from ..wsi.reader import SlideError

    if "qupath_region" in attrs:
        whole = tuple(int(v) for v in attrs["qupath_region"])
    else:
        whole = (0, 0, int(attrs["level0_width"]), int(attrs["level0_height"])) if "level0_width" in attrs else None
    if not slide_path:
        return whole
    try:
        return qupath.image_region(slide_path)
    except SlideError as err:
        log.warning("%s: tile GeoJSON in the slide's own level-0 coordinates (%s)", Path(slide_path).name, err)
        return whole


def _the_features_slide(slide, attrs: dict, features: Path):
    """``slide`` when the features may have been made from it; None (drawn without it, warned) when they record
    another file's size: a slide of another cohort under the same id, whose tissue the attention is not about."""
    from ..slides.provenance import path_to_record, slide_bytes

    if slide is None or "slide_bytes" not in attrs:  # TRIDENT's and CLAM's files do not record it
        return slide
    try:
        nbytes = slide_bytes(Path(slide))
    except OSError:
        return slide  # not there: the heatmap says so as before
    if nbytes != int(attrs["slide_bytes"]):
        made = attrs.get("slide_path")
        made = "an earlier file at that path" if made in (None, path_to_record(slide)) else made  # a rescan there
        log.warning("%s: its features were made from %s (%d bytes), not from %s (%d bytes), another file under the "
                    "same slide id: its heatmap is drawn without the slide", Path(features).name, made,
                    int(attrs["slide_bytes"]), slide, nbytes)  # fmt: skip
        return None
    return slide


def write_heatmaps(results: list[dict], pred: pd.DataFrame, slide_paths: dict, out_dir: Path, num_classes: int, *,
                   num_slides: int | None, resolution: str, max_side: int) -> list[Path]:  # fmt: skip
    """``heatmaps/<slide>.png`` and ``.geojson`` for all slides or the first ``num_slides`` that have coords;
    returns the PNGs."""
    from ..viz.mil import attention_heatmap, infer_tile_size

    pngs, unnamed = [], 0
    for r, row in zip(results, pred.itertuples()):
        if num_slides is not None and len(pngs) >= int(num_slides):
            break
        sid = r["slide_id"]
        if (r["coords"] < 0).all():
            log.info("no heatmap for %s: its feature file has no coords", sid)
            continue
        if not r["tile_size"] and infer_tile_size(r["coords"]) is None:  # not drawn as 1 px tiles
            log.info("no heatmap for %s: %s gives no tile size (no coords attrs, one tile)", sid, Path(r["path"]).name)
            continue
        scores = read_token_scores(r["path"], r["tiles"]) if resolution == "token" else None
        if resolution == "token" and scores is None:
            print(f"note: {Path(r['path']).name} has no token_scores (embed with embed.token_scores=true); "
                  f"{sid}'s heatmap is drawn per tile")  # fmt: skip
        attrs, _ = trident_h5.read_coords(r["path"])
        slide = slide_paths.get(sid) or _recorded_slide(attrs, r["path"])
        unnamed += slide is None
        slide = _the_features_slide(slide, attrs, r["path"])
        top = float(r["probs"][row.pred])
        title = (f"{sid}: predicted class {row.pred} (p={top:.2f}), {len(r['attention'])} tiles, "
                 f"{'patch' if scores is not None else 'tile'} resolution")  # fmt: skip
        pngs.append(
            attention_heatmap(
                r["coords"],
                r["attention"],
                out_dir / "heatmaps" / f"{sid}.png",
                tile_size=r["tile_size"],
                slide_path=slide,
                title=title,
                max_side=int(max_side),
                token_scores=scores,
            )  # fmt: skip
        )
        region = _qupath_region(slide, attrs)
        tile_geojson(r, out_dir / "heatmaps" / f"{sid}.geojson", num_classes, region)
    if unnamed:
        log.info("%d heatmaps drawn without their slides (their feature files name no slide that is there): pass "
                 "wsi_dir= or slides= to draw them over the slides' thumbnails", unnamed)  # fmt: skip
    return pngs


def _recorded_slide(attrs: dict, features: Path) -> Path | None:
    """The slide file our h5 records (coords attr ``slide_path``) where it still is (features_dir= alone: the
    heatmap is drawn over it); None for TRIDENT's and CLAM's files, which record none, and, said why, where it has
    gone."""
    from ..slides.provenance import recorded_path

    if not attrs.get("slide_path"):
        return None
    path = recorded_path(str(attrs["slide_path"]))
    if path.exists():
        return path
    log.warning("%s was made from %s, which is not there: its heatmap is drawn without the slide (pass wsi_dir= or "
                "slides= to name where the slides are)", Path(features).name, path)  # fmt: skip
    return None


def clear_earlier_heatmaps(out_dir: Path) -> set[str]:
    """A reused output folder (``hydra.run.dir``) holds one run's heatmaps: the slides an earlier run predicted
    there (its predictions.csv) lose theirs before this run replaces its predictions, so that none is taken for this
    run's (in QuPath too), even when this run stops while drawing. A user's own files there are left. Returns the
    slides whose heatmaps were removed."""
    try:
        slides = set(read_csv_ids(out_dir / PREDICTIONS_FILE, "slide_id").slide_id.astype(str))
    except (OSError, ValueError, KeyError, AttributeError):  # none, or not ours
        return set()
    folder = out_dir / "heatmaps"
    removed = set()
    for s in sorted(slides):
        for p in (folder / f"{s}.png", folder / f"{s}.geojson"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.add(s)
    return removed

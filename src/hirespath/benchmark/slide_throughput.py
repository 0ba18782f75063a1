"""Whole-slide embedding throughput: tissue area embedded per second, per tiling × attention configuration.

Every configuration embeds the same slide with the same backbone weights, in one run, through the real
``embed_slides`` engine (tissue grid, tile reading in DataLoader workers, encoder, h5 writing): the numerator is
the slide's tissue area (the same for every tile size), the denominator the wall time. Beside the end-to-end
number, ``encoder`` time is the same tiles pre-read into memory and encoded alone, so the pipeline's overhead is a
number too; the analytic FLOP ratio comes from the cost model.

The default comparison (``experiment=embed_speed``) is issue #15's: (a) 224 px tiles with dense attention (what
TRIDENT/CLAM do), (b) large tiles with dense attention (TRIDENT's ``--patch_encoder_img_size``), (c) the same large
tiles with sparse attention + pruning.
"""

from __future__ import annotations

import functools
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..configs import EmbedConfig, TilingConfig
from ..embeddings.features import embed_slides, encoder_forward
from ..models.backbones import build_timm_model, get_backbone
from ..slides import BACKGROUND, STAGES, Runtime, TileModel
from ..utils.io import atomic_path
from ..utils.memory import is_oom
from ..viz.figures import pyplot, save_png
from ..wsi.tile_readers import SlideTileDataset
from ..wsi.tissue import tile_grid
from .costmodel import encoder_cost
from .measure import configs_from, failure_status
from .rounds import check_repeats, in_rounds
from .spec import BenchConfig, wrap_encoder

log = logging.getLogger("hirespath.benchmark")

COLUMNS = [
    "backbone", "configuration", "tile_size", "tile_mpp", "attention", "window", "prune_ratio", "prune_layer",
    "device", "precision", "tiles", "tissue_mm2", "seconds_end_to_end", "seconds_encoder", "mm2_per_s_end_to_end",
    "mm2_per_s_encoder", "tflop_per_mm2", "speedup_end_to_end", "speedup_encoder", "speedup_flops",
    "pipeline_overhead", "reader", "num_workers", "threads", "repeats", *(f"stage_{s}_s" for s in STAGES + BACKGROUND),
    "status", "error",
]  # fmt: skip


@dataclass
class ThroughputConfig(BenchConfig):
    """A tiling + attention configuration: one row of the embedding benchmark."""

    tile_size: int = 1792
    reader: str | None = None  # threads | workers; None: the benchmark's slides.reader

    @property
    def label(self) -> str:
        return f"{self.tile_size} px, {super().label}" + (f" [{self.reader} reader]" if self.reader else "")


class _Prepared(NamedTuple):
    """One configuration of the embedding benchmark, ready to time."""

    cfg: ThroughputConfig
    encoder: torch.nn.Module
    grid: object  # wsi.tissue.TileGrid
    tile_encoder: TileModel
    images: torch.Tensor | None  # the slide's tiles pre-read into memory (None once the encoder is timed)


def embed_configs_from(cfg) -> list[ThroughputConfig]:
    """``slides.compare`` entries (tile_size, reader + the keys of the benchmark's ``compare``) over the composed
    groups."""
    base = asdict(configs_from(OmegaConf.merge(cfg, {"compare": None}))[0])
    base.update(tile_size=int(cfg.tile.size), reader=None)
    out = []
    for item in cfg.slides.get("compare") or [{}]:
        unknown = set(item) - set(base)
        if unknown:
            raise ValueError(
                f"slides.compare entry {dict(item)} has unknown keys {sorted(unknown)}; valid: {sorted(base)}"
            )
        out.append(ThroughputConfig(**{**base, **item}))
    return out


def synthetic_slide(path: Path, side_px: int = 1792, mpp: float = 0.5, seed: int = 0, margin: float = 0.05) -> Path:
    """A JPEG-tiled pyramidal TIFF of H&E-coloured tissue (with nuclei) over all but a ``margin`` of glass: a
    resection-like slide, so every tile size covers the same tissue and the comparison is about the encoder."""
    from ..data.panda_synthetic import NUCLEUS_RGB, TISSUE_RGB, _draw_disks, write_pyramid

    rng = np.random.default_rng(seed)
    img = np.full((side_px, side_px, 3), 243, dtype=np.float32)  # glass
    m = int(margin * side_px)
    inside = np.zeros((side_px, side_px), bool)
    inside[m : side_px - m, m : side_px - m] = True
    img[inside] = TISSUE_RGB + rng.normal(0, 4, size=(int(inside.sum()), 3))
    coords = np.argwhere(inside)
    _draw_disks(img, coords[rng.integers(0, len(coords), int(len(coords) * 0.004))], 1.6, NUCLEUS_RGB, inside)
    write_pyramid(path, np.clip(img, 0, 255).astype(np.uint8), mpp, compression="jpeg", levels=(1, 4, 16))
    return path


def _encoder_only_seconds(tile_encoder: TileModel, images: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for s in range(0, len(images), batch_size):
        tile_encoder(images[s : s + batch_size])
    if tile_encoder.device.type == "cuda":
        torch.cuda.synchronize(tile_encoder.device)
    return time.perf_counter() - start


def benchmark_embedding(
    slide,
    configs: list[ThroughputConfig],
    *,
    backbone: str,
    overrides: dict | None = None,
    weights=None,
    tile_mpp: float = 0.5,
    min_tissue: float = 0.25,
    tissue_threshold: float | None = None,
    batch_size: int = 4,
    num_workers: int | None = None,
    reader: str = "threads",
    threads: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    seed: int = 0,
    repeats: int = 1,
    progress: bool = True,
) -> list[dict]:
    """One row per configuration (see COLUMNS); speed-ups are relative to the first configuration.

    Encoder-only time: the slide's tiles pre-read into memory, encoded with the process's default threads (the
    encoder alone on the machine); end to end: ``embed_slides`` with ``reader``/``num_workers`` readers and its
    thread policy (``threads``). Each timed ``repeats`` times, the configurations in rounds (one run of each per
    round); the medians are reported. A configuration that fails (out of memory or otherwise) is logged, its row says
    so (``status``, ``error``) and the others are measured."""
    check_repeats(repeats, "slides.repeats")
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    preset = get_backbone(backbone)
    vit = build_timm_model(preset, weights=weights, **dict(overrides or {})).eval()
    prepared, failed = [], {}  # failed: configuration index → its error
    for c, cfg in enumerate(tqdm(configs, desc="embedding benchmark: reading the tiles", disable=not progress)):
        try:
            encoder = wrap_encoder(vit, preset, cfg).eval()
            grid = tile_grid(slide, cfg.tile_size, tile_mpp, 0, min_tissue, keep_images=False,
                             tissue_threshold=tissue_threshold)  # fmt: skip
            tile_encoder = TileModel(encoder, device, precision, batch_size,
                                     forward=encoder_forward(encoder, "cls", False))  # fmt: skip
            ds = SlideTileDataset(slide, grid.coords, grid.patch_size_level0, cfg.tile_size, level=grid.read_level)
            images = torch.stack([ds[i]["image"] for i in range(len(ds))])
            ds.close()
            _encoder_only_seconds(tile_encoder, images[:batch_size], batch_size)  # warm-up (allocator, kernels)
        except Exception as err:  # noqa: BLE001 — one configuration failing must not end the others
            failed[c] = err
            failure_status(err, cfg.label, cfg.tile_size)
            continue
        prepared.append(_Prepared(cfg, encoder, grid, tile_encoder, images))
    index = [c for c in range(len(configs)) if c not in failed]  # each prepared entry's configuration

    def leaves_rounds(i: int, err: BaseException) -> bool:  # logged with its configuration; the others go on
        failure_status(err, configs[index[i]].label, configs[index[i]].tile_size)
        return True

    def end_to_end(cfg: ThroughputConfig, encoder) -> dict:
        job = Path(tempfile.mkdtemp(prefix="hirespath_embed_bench_"))
        try:
            tiling = TilingConfig(size=cfg.tile_size, mpp=tile_mpp, overlap=0, min_tissue=min_tissue,
                                  tissue_threshold=tissue_threshold)  # fmt: skip
            embed = EmbedConfig(batch_size=batch_size, num_workers=num_workers, reader=cfg.reader or reader,
                                threads=threads, thumbnails=False)  # fmt: skip
            runtime = Runtime(device=device, precision=precision, rank=0, world_size=1, progress=False)
            summary = embed_slides(encoder, [slide], job, tiling, embed, runtime)
        finally:
            shutil.rmtree(job, ignore_errors=True)
        if summary["slides_done"] != 1:
            raise RuntimeError(f"{cfg.label}: the benchmark slide was not embedded: {summary['skipped']}")
        return summary

    # In rounds (rounds.py): the encoder alone on the pre-read tiles, then the slide end to end.
    with tqdm(total=2 * repeats * len(prepared), desc="embedding benchmark: runs", disable=not progress) as bar:
        alone = {i: functools.partial(_encoder_only_seconds, p.tile_encoder, p.images, batch_size)
                 for i, p in enumerate(prepared)}  # fmt: skip
        encoder_runs = in_rounds(alone, repeats, stops=leaves_rounds, after_each=lambda: bar.update(1))
        del alone
        prepared = [p._replace(images=None) for p in prepared]  # the tiles' memory back before the slide runs
        slide_runs = {i: functools.partial(end_to_end, p.cfg, p.encoder) for i, p in enumerate(prepared)
                      if not isinstance(encoder_runs[i], BaseException)}  # fmt: skip
        e2e_runs = in_rounds(slide_runs, repeats, stops=leaves_rounds, after_each=lambda: bar.update(1))
    by_config = {}
    for i, (cfg, encoder, grid, _, _) in enumerate(prepared):
        err = next((r for r in (encoder_runs[i], e2e_runs.get(i)) if isinstance(r, BaseException)), None)
        if err is not None:
            failed[index[i]] = err
            continue
        summaries = sorted(e2e_runs[i], key=lambda summary: summary["seconds"])
        summary = summaries[(len(summaries) - 1) // 2]  # the median run (the lower one of an even count)
        encoder_s = statistics.median(encoder_runs[i])
        stages = summary["stage_seconds"]
        tissue = grid.tissue_area_mm2
        cost = encoder_cost(encoder, cfg.tile_size, device=device.type)
        by_config[index[i]] = dict(
            backbone=backbone,
            configuration=cfg.label,
            tile_size=cfg.tile_size,
            tile_mpp=tile_mpp,
            attention=cfg.attention,
            window=cfg.window,
            prune_ratio=cfg.prune_ratio,
            prune_layer=cfg.prune_layer,
            device=str(device),
            precision=summary["precision"],
            tiles=len(grid),
            tissue_mm2=tissue,
            seconds_end_to_end=summary["seconds"],
            seconds_encoder=encoder_s,
            mm2_per_s_end_to_end=tissue / summary["seconds"],
            mm2_per_s_encoder=tissue / encoder_s,
            tflop_per_mm2=cost.tflops * len(grid) / tissue,
            pipeline_overhead=summary["seconds"] / encoder_s,
            reader=summary["reader"],
            num_workers=summary["num_workers"],
            threads="→".join(map(str, summary["threads"])),
            repeats=repeats,
            **{f"stage_{k}_s": stages[k] for k in STAGES + BACKGROUND},
            status="ok",
            error="",
        )  # fmt: skip
        log.info("%-44s %4d tiles  %.3f mm²/s end to end, %.3f mm²/s encoder", cfg.label, len(grid),
                 by_config[index[i]]["mm2_per_s_end_to_end"], by_config[index[i]]["mm2_per_s_encoder"])  # fmt: skip
    for c, err in failed.items():
        cfg = configs[c]
        by_config[c] = dict(backbone=backbone, configuration=cfg.label, tile_size=cfg.tile_size, tile_mpp=tile_mpp,
                            attention=cfg.attention, window=cfg.window, prune_ratio=cfg.prune_ratio,
                            prune_layer=cfg.prune_layer, device=str(device), repeats=repeats,
                            status="oom" if is_oom(err) else "error", error=f"{type(err).__name__}: {err}")  # fmt: skip
    rows = [by_config[c] for c in range(len(configs))]
    nan = float("nan")
    first = rows[0]
    for r in rows:
        r["speedup_end_to_end"] = r.get("mm2_per_s_end_to_end", nan) / first.get("mm2_per_s_end_to_end", nan)
        r["speedup_encoder"] = r.get("mm2_per_s_encoder", nan) / first.get("mm2_per_s_encoder", nan)
        r["speedup_flops"] = first.get("tflop_per_mm2", nan) / r.get("tflop_per_mm2", nan)
    return rows


def summarize_embedding(rows: list[dict]) -> str:
    lines = [f"{'configuration':<46} {'tiles':>5} {'mm²/s e2e':>10} {'mm²/s enc':>10} {'x e2e':>6} {'x enc':>6} "
             f"{'x flops':>7} {'e2e/enc':>7}"]  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['configuration']:<46} {r['status']}: {r['error']}")
            continue
        lines.append(
            f"{r['configuration']:<46} {r['tiles']:>5} {r['mm2_per_s_end_to_end']:>10.4f} "
            f"{r['mm2_per_s_encoder']:>10.4f} "
            f"{r['speedup_end_to_end']:>6.2f} {r['speedup_encoder']:>6.2f} {r['speedup_flops']:>7.2f} "
            f"{r['pipeline_overhead']:>7.2f}"
        )
    return "\n".join(lines)


def write_embedding_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)


def plot_embedding(rows: list[dict], path: Path, title: str = "") -> None:
    """Bars: tissue mm² per second end to end and encoder-only, per configuration."""
    plt = pyplot()

    df = pd.DataFrame(rows, columns=COLUMNS)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(df)), 4.2))
    x = np.arange(len(df))
    ax.bar(x - 0.2, df.mm2_per_s_end_to_end, 0.4, label="end to end")
    ax.bar(x + 0.2, df.mm2_per_s_encoder, 0.4, label="encoder only")
    for i, r in df.iterrows():
        if r.status != "ok":  # a configuration that failed: no bars
            ax.text(i, 0, r.status, ha="center", va="bottom", fontsize=8, color="tab:red")
            continue
        ax.text(i - 0.2, r.mm2_per_s_end_to_end, f"{r.speedup_end_to_end:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [c.replace(", ", "\n", 1) for c in df.configuration], fontsize=8)
    ax.set_ylabel("tissue mm² per second")
    ax.legend(fontsize=8)
    device = df.device.iloc[0] if len(df) else ""
    ax.set_title(title or f"{df.backbone.iloc[0] if len(df) else ''} on {device}: whole-slide embedding throughput")
    fig.tight_layout()
    save_png(fig, path)

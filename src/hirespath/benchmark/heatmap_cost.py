"""Seconds per slide for a fine MIL attention heatmap, two ways, on the same slide with the same encoder and tile size:

- ``token``: hirespath's — the slide's features already exist (embedded once with ``embed.token_scores=true``); read
  them, run the MIL head, draw the heatmap at patch resolution (tile attention × the patches' scores);
- ``clam_overlap50``: CLAM's ``create_heatmaps.py`` way — embed the slide again at 50 % overlap (about 4× the tiles),
  run the head, draw the heatmap per (overlapping) tile.

    python -m hirespath.benchmark.heatmap_cost --out docs/benchmarks/cpu_heatmap_cost.csv \
        --backbone uni2_h --override depth=12 embed_dim=384 num_heads=6 --tile-size 448

Without ``--slide`` a generated slide (``hirespath.data.panda_synthetic``) is written to the work folder. The MIL head
is an ABMIL with random weights: its cost does not depend on them. One row per way: tiles, the heatmap's cell side in
level-0 px, seconds (the embedding the token way reuses is reported as ``embed_seconds``, not counted).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..configs import EmbedConfig, TilingConfig
from ..embeddings.features import embed_slides
from ..heads.mil import ABMIL
from ..slides import Runtime
from ..viz.mil import attention_heatmap
from ..wsi import trident_h5


def _generated_slide(folder: Path, size=(1536, 2048), seed: int = 0) -> Path:
    from ..data.panda_synthetic import make_slide, write_pyramid

    image, _ = make_slide(3, size, np.random.default_rng(seed))
    path = folder / "slide.tiff"
    write_pyramid(path, image, 0.5, compression="jpeg")
    return path


def _predict_and_draw(path: Path, head: torch.nn.Module, png: Path, slide: Path, token: bool) -> int:
    data = trident_h5.read_features(path)
    scores = None
    if token:
        import h5py

        with h5py.File(path, "r") as f:
            rows, cols = (int(v) for v in f["token_scores"].attrs["grid"])
            scores = f["token_scores"][:].reshape(-1, rows, cols)
    with torch.no_grad():
        out = head(torch.from_numpy(data["features"])[None])
    size = data["coords_attrs"]["patch_size_level0"]
    attention_heatmap(data["coords"], out.attention[0].numpy(), png, tile_size=size, slide_path=slide,
                      token_scores=scores)  # fmt: skip
    return len(data["features"])


def heatmap_cost(encoder, slide: Path | None, work: Path, tile_size: int, tile_mpp: float = 0.5,
                 batch_size: int = 4, device: str = "cpu", precision: str = "fp32",
                 generated_size: tuple[int, int] = (1536, 2048)) -> pd.DataFrame:  # fmt: skip
    """The two ways' rows (method, tiles, cell_px_level0, seconds, embed_seconds) for one slide (``slide=None``: a
    generated one of ``generated_size`` px at 0.5 µm/px)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    slide = Path(slide) if slide else _generated_slide(work, generated_size)
    runtime = Runtime(device=device, precision=precision, rank=0, world_size=1, progress=False)
    torch.manual_seed(0)
    head = ABMIL(encoder.embed_dim, 6).eval()
    rows = []
    for method, overlap, token in (("token", 0, True), ("clam_overlap50", tile_size // 2, False)):
        tiling = TilingConfig(size=tile_size, mpp=tile_mpp, overlap=overlap, min_tissue=0.25)
        embed = EmbedConfig(batch_size=batch_size, num_workers=1, thumbnails=False, token_scores=token)
        start = time.perf_counter()
        summary = embed_slides(encoder, [slide], work / method, tiling, embed, runtime)
        embed_s = time.perf_counter() - start
        (h5,) = Path(summary["features_dir"]).glob("*.h5")
        start = time.perf_counter()
        n = _predict_and_draw(h5, head, work / f"{method}.png", slide, token)
        draw_s = time.perf_counter() - start
        level0 = trident_h5.read_coords(h5)[0]["patch_size_level0"]
        cell = level0 / (tile_size // encoder.patch_size) if token else level0 - overlap * level0 // tile_size
        seconds = draw_s if token else embed_s + draw_s  # the token way reuses features that exist anyway
        rows.append({"method": method, "tiles": n, "cell_px_level0": float(cell), "seconds": seconds,
                     "embed_seconds": embed_s, "slide": slide.name, "tile_size": tile_size})  # fmt: skip
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    from ..models.encoder import create_encoder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--slide", default=None, help="a slide file (default: a generated one)")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--override", nargs="*", default=[], help="timm overrides, e.g. depth=12 embed_dim=384")
    p.add_argument("--tile-size", type=int, default=448)
    p.add_argument("--prune-ratio", type=float, default=0.6)
    p.add_argument("--prune-layer", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    overrides = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (o.split("=", 1) for o in args.override)}
    torch.manual_seed(0)
    encoder = create_encoder(args.backbone, attention="sparse", window=8, prune_ratio=args.prune_ratio,
                             prune_layer=args.prune_layer, **overrides).eval()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hirespath_heatmap_cost_") as work:
        df = heatmap_cost(encoder, args.slide, Path(work), args.tile_size, device=args.device)
    df["backbone"] = args.backbone + "".join(f" {o}" for o in args.override)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(df.to_string(index=False))
    t = df.set_index("method").seconds
    print(f"token heatmap: {t['token']:.2f} s per slide, CLAM-style 50 % overlap: {t['clam_overlap50']:.2f} s "
          f"({t['token'] / t['clam_overlap50']:.1%})")  # fmt: skip


if __name__ == "__main__":
    main()

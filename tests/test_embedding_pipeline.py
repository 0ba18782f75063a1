"""Whole-slide embedding as a pipeline (issue #17): per-stage timing, streamed readers, the CPU thread policy."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import embed_kw as embed_slides
from test_slide_embedding import make_encoder, synthetic_image

from hirespath.data.panda_synthetic import write_pyramid
from hirespath.embeddings.features import encoder_forward
from hirespath.slides import BACKGROUND, STAGES, TileModel
from hirespath.utils.threads import AdaptiveThreads, available_cores, encoder_threads
from hirespath.wsi.tile_readers import SlideTileDataset, tile_batches
from hirespath.wsi.tissue import tile_grid
from hirespath.wsi.trident_h5 import read_features

KW = dict(tile_size=112, tile_mpp=0.5, min_tissue=0.25, batch_size=3, progress=False, thumbnails=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_wsi")
    paths = []
    for i in range(3):
        paths.append(root / f"p{i}.tiff")
        write_pyramid(paths[-1], synthetic_image(700, 500, seed=i), 0.5, compression="jpeg", levels=(1, 4))
    return paths


def test_stage_timings_cover_the_wall_time(slides, tmp_path):
    summary = embed_slides(make_encoder(), slides, tmp_path, num_workers=1, **KW)
    stages, wall = summary["stage_seconds"], summary["seconds"]
    assert set(stages) == set(STAGES + BACKGROUND)
    assert abs(sum(stages[s] for s in STAGES) - wall) <= 0.1 * wall  # the measured stages are the wall time
    assert abs(summary["untracked_seconds"]) <= 0.1 * wall
    assert stages["encode"] > 0 and stages["open"] > 0 and stages["tissue"] > 0 and stages["reader_read"] > 0
    timings = pd.read_csv(next(tmp_path.glob("*/features_*/timings.csv")))  # the features folder's ledger
    assert sorted(timings.slide) == ["p0", "p1", "p2"] and (timings.tiles > 0).all()
    per_slide = timings[[f"{s}_s" for s in STAGES]].sum(axis=1)
    # these slides take ~80 ms each: a few ms of scheduling between stages is 10 % of one (seen once under CI)
    np.testing.assert_allclose(per_slide, timings.seconds, rtol=0.1, atol=0.02)
    assert timings.seconds.sum() <= wall
    np.testing.assert_allclose(timings.tiles_per_s, timings.tiles / timings.seconds)
    assert summary["tiles_per_second"] > 0 and summary["tissue_mm2_per_second"] > 0


@pytest.mark.parametrize(("reader", "workers"), [("threads", 2), ("workers", 1), ("threads", 0)])
def test_streamed_reading_equals_reading_all_tiles_first(slides, tmp_path, reader, workers):
    enc = make_encoder()
    # the same thread count as the reference below (another count may sum in another order)
    embed_slides(enc, slides[:1], tmp_path, num_workers=workers, reader=reader, threads=torch.get_num_threads(), **KW)
    (h5,) = tmp_path.glob("*/features_*/p0.h5")
    stored = read_features(h5)
    streamed, coords = stored["features"], stored["coords"]
    grid = tile_grid(slides[0], 112, 0.5, 0, 0.25, keep_images=False)
    np.testing.assert_array_equal(coords, grid.coords)
    ds = SlideTileDataset(slides[0], grid.coords, grid.patch_size_level0, 112, level=grid.read_level)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])  # the whole slide in memory
    ds.close()
    tile_encoder = TileModel(
        enc, torch.device("cpu"), "fp32", KW["batch_size"], forward=encoder_forward(enc, "cls", False)
    )
    whole = np.concatenate([r[1][0] for s in range(0, len(images), 3) for r in tile_encoder(images[s : s + 3])])
    np.testing.assert_array_equal(streamed, whole)


def test_tile_batches_are_bounded_and_ordered(slides):
    grid = tile_grid(slides[1], 112, 0.5, 0, 0.25, keep_images=False)
    ds = SlideTileDataset(slides[1], grid.coords, grid.patch_size_level0, 112, level=grid.read_level)
    batches = list(tile_batches(ds, 4, reader="threads", num_workers=2, prefetch_batches=1))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(ds)))
    assert all(len(b["index"]) == 4 for b in batches[:-1]) and batches[0]["image"].dtype == torch.uint8
    with pytest.raises(ValueError, match="reader must be one of"):
        next(tile_batches(ds, 4, reader="processes"))


def test_a_png_is_decoded_once_for_all_reader_threads(tmp_path, monkeypatch):
    """PIL decodes a PNG/JPEG whole: reader threads share one decoded image (not one decode each), with the same
    tiles as reading them in the calling thread; a corrupt one is refused by name before any batch."""
    from PIL import Image

    from hirespath.wsi import tile_readers
    from hirespath.wsi.reader import SlideError

    Image.fromarray(synthetic_image(700, 500)).save(tmp_path / "region.png")
    grid = tile_grid(tmp_path / "region.png", 112, 0.5, 0, 0.0, keep_images=False, mpp=0.5)
    opened = []
    real_open = tile_readers.open_slide
    monkeypatch.setattr(tile_readers, "open_slide", lambda path: opened.append(path) or real_open(path))

    def tiles(workers: int) -> torch.Tensor:
        ds = SlideTileDataset(tmp_path / "region.png", grid.coords, grid.patch_size_level0, 112, level=0)
        try:
            return torch.cat([b["image"] for b in tile_batches(ds, 2, reader="threads", num_workers=workers)])
        finally:
            ds.close()

    threaded = tiles(3)
    assert len(opened) == 1 and len(threaded) == len(grid.coords) > 6
    assert torch.equal(threaded, tiles(0))
    (tmp_path / "cut.png").write_bytes((tmp_path / "region.png").read_bytes()[:5000])
    ds = SlideTileDataset(tmp_path / "cut.png", grid.coords, grid.patch_size_level0, 112, level=0)
    with pytest.raises(SlideError, match="cannot read cut.png"):
        next(tile_batches(ds, 2, reader="threads", num_workers=3))


def test_thread_policy_never_exceeds_the_cores():
    for cores in (1, 2, 8, 64):
        for readers in range(0, 10):
            n = encoder_threads(None, readers, cores=cores)
            assert 1 <= n <= cores and n == max(1, cores - readers)
        assert encoder_threads(100, 0, cores=cores) == cores
    assert encoder_threads(None, 0) == available_cores()
    with pytest.raises(ValueError, match="threads must be"):
        encoder_threads(0, 1)


def test_thread_policy_is_applied_and_restored(slides, tmp_path, caplog):
    before = torch.get_num_threads()
    with caplog.at_level("INFO", logger="hirespath.threads"):
        summary = embed_slides(make_encoder(), slides[:1], tmp_path, num_workers=1, threads=1, **KW)
    assert summary["threads"] == [1] and "CPU threads: 1 intra-op" in caplog.text
    assert torch.get_num_threads() == before


def test_adaptive_threads_follow_how_busy_the_readers_are():
    before = torch.get_num_threads()
    try:
        policy = AdaptiveThreads(None, readers=2, cores=4)
        assert policy.n == 4  # every core until the readers are measured busy
        for _ in range(3):
            policy.observe(reader_seconds=0.05, wall_seconds=1.0)  # readers idle 95 % of the time
        assert policy.n == 4
        for _ in range(4):
            policy.observe(reader_seconds=2.0, wall_seconds=1.0)  # both readers fully busy
        assert policy.n == 2 and torch.get_num_threads() == 2 and policy.chosen == [4, 3, 2]
        for _ in range(6):
            policy.observe(reader_seconds=9.0, wall_seconds=1.0)  # never more than the readers there are
        assert policy.n == 2
        for _ in range(6):
            policy.observe(reader_seconds=0.0, wall_seconds=1.0)
        assert policy.n == 4
        fixed = AdaptiveThreads(3, readers=1, cores=4)
        fixed.observe(0.0, 1.0)
        assert fixed.n == 3 and fixed.chosen == [3]
    finally:
        torch.set_num_threads(before)

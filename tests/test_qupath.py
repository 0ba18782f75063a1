"""QuPath GeoJSON: the properties QuPath reads, valid geometries, atomic files."""

import json

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from hirespath.wsi.qupath import feature, read_geojson, valid_geometry, write_geojson


def test_features_as_qupath_writes_them(tmp_path):
    region = MultiPolygon([box(0, 0, 10, 10).difference(box(3, 3, 5, 5)), box(20, 20, 30, 25)])
    tile = box(100, 100, 356, 356)
    path = write_geojson(tmp_path / "s.geojson", [
        feature(region, "annotation", "Epithelium", (255, 0, 0), {"Area µm^2": 12.5}),
        feature(tile, "detection", "tile", (0, 0, 255), {"attention": 0.3, "p1": float("nan")}),
    ])  # fmt: skip
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    ann, det = (f["properties"] for f in data["features"])
    assert ann == {"objectType": "annotation", "classification": {"name": "Epithelium", "color": [255, 0, 0]},
                   "measurements": {"Area µm^2": 12.5}}  # fmt: skip
    assert det["objectType"] == "detection" and det["measurements"] == {"attention": 0.3}  # NaN left out
    (g, _), (t, _) = read_geojson(path)
    assert g.equals(region) and g.area == region.area and len(g.geoms[0].interiors) == 1  # holes kept
    assert t.equals(tile)


def test_invalid_polygons_are_repaired():
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    assert not bowtie.is_valid
    fixed = valid_geometry(bowtie)
    assert fixed.is_valid and fixed.area == pytest.approx(50)
    assert feature(bowtie)["geometry"]["type"] in ("Polygon", "MultiPolygon")


def test_object_type_is_checked():
    with pytest.raises(ValueError, match="object_type must be one of"):
        feature(box(0, 0, 1, 1), "cells")


def test_objects_land_where_qupath_shows_a_slide_cropped_to_its_bounds(tmp_path):
    """QuPath's OpenSlide server crops a MIRAX-like slide to openslide.bounds-* (when both width and height differ)
    and counts pixels from that corner: objects are moved there; other slides keep the level-0 origin."""
    from types import SimpleNamespace

    from hirespath.wsi.qupath import image_origin, image_region

    def slide(props, size=(100_000, 220_000)):
        return SimpleNamespace(properties=props, dimensions=size)

    bounds = {"openslide.bounds-x": "2048", "openslide.bounds-y": "51200", "openslide.bounds-width": "80000",
              "openslide.bounds-height": "120000"}  # fmt: skip
    assert image_origin(slide(bounds)) == (2048, 51200)
    assert image_origin(slide({k.replace("openslide", "tiffslide"): v for k, v in bounds.items()})) == (2048, 51200)
    # spanning the full width, the region still starts at bounds-y in QuPath (only its downsamples differ)
    assert image_region(slide({**bounds, "openslide.bounds-x": "0", "openslide.bounds-width": "100000"})) == (
        0, 51200, 100_000, 120000)  # fmt: skip
    assert image_origin(slide({"openslide.mpp-x": "0.25"})) == (0, 0)
    assert image_origin(slide({**bounds, "openslide.bounds-x": "n/a"})) == (0, 0)
    assert image_region(slide(bounds)) == (2048, 51200, 80000, 120000)
    assert image_region(slide({"openslide.mpp-x": "0.25"})) == (0, 0, 100_000, 220_000)
    region = box(3000, 52000, 3100, 52100)
    ((geom, _),) = read_geojson(write_geojson(tmp_path / "b.geojson", [feature(region, origin=(2048, 51200))]))
    assert geom.equals(box(952, 800, 1052, 900))


def test_predict_slides_tile_geojson_region_of_a_slide_it_cannot_read(tmp_path, caplog):
    from hirespath.predict.mil import _qupath_region

    caplog.set_level("WARNING", logger="hirespath.predict_slides")
    size = {"level0_width": 800, "level0_height": 600}
    assert _qupath_region(None, size) == (0, 0, 800, 600) and _qupath_region(None, {}) is None
    assert _qupath_region(tmp_path / "gone.svs", size) == (0, 0, 800, 600)
    recorded = {**size, "qupath_region": np.array([30, 40, 500, 400])}  # as embedding wrote it: the SCN's scan
    assert _qupath_region(None, recorded) == _qupath_region(tmp_path / "gone.svs", recorded) == (30, 40, 500, 400)
    assert "gone.svs: tile GeoJSON in the slide's own level-0 coordinates (missing file" in caplog.text

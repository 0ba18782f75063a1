"""GeoJSON that QuPath opens (File → Import objects, or drag and drop), as QuPath itself exports it.

A ``FeatureCollection`` in QuPath's pixel coordinates: the slide's level-0 px, from the top-left of the image QuPath
shows — the slide's, except where QuPath crops a slide to its non-empty bounds (:func:`image_region`). Each
feature's ``properties`` hold ``objectType`` (``annotation`` for regions, ``detection`` or ``tile`` for scored
tiles), ``classification`` ``{"name": ..., "color": [r, g, b]}`` and, for detections, ``measurements``
``{name: number}`` (QuPath draws them as measurement maps). Geometries are checked with shapely and repaired when
invalid (QuPath refuses some invalid polygons; TIAToolbox's writer met that in #1057).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..utils.io import atomic_path

OBJECT_TYPES = ("annotation", "detection", "tile")


def image_region(slide) -> tuple[int, int, int, int]:
    """QuPath's image of the slide as (x, y, width, height) in the slide's level-0 px (an open slide or a path).

    QuPath's OpenSlide server crops a slide to the non-empty region OpenSlide reports (``openslide.bounds-*``:
    MIRAX, Leica SCN, ...) whenever all four bounds are there (its ``OpenslideImageServer``: the image is
    ``bounds-width`` × ``bounds-height`` and a tile is read at ``bounds-x/y`` plus its own position, also where the
    region spans the full width or height; its "cropped" test, both sizes differing, only changes how it computes
    the levels' downsamples), and its pixel coordinates start at that region's corner; objects written in the
    slide's own coordinates would land shifted by it, and those outside it outside the image. The whole slide for
    every other slide."""
    if isinstance(slide, (str, os.PathLike)):
        from .reader import open_slide

        handle = open_slide(slide)
        try:
            return image_region(handle)
        finally:
            handle.close()
    props, (width, height) = slide.properties, slide.dimensions
    for prefix in ("openslide", "tiffslide"):
        try:
            x, y, w, h = (int(props[f"{prefix}.bounds-{k}"]) for k in ("x", "y", "width", "height"))
        except (KeyError, ValueError, TypeError):
            continue
        return x, y, w, h
    return 0, 0, int(width), int(height)


def image_origin(slide) -> tuple[int, int]:
    """Where QuPath's image of the slide starts (:func:`image_region`): (0, 0) but for slides QuPath crops."""
    x, y, _, _ = image_region(slide)
    return x, y


def valid_geometry(geometry):
    """``geometry`` (shapely) made valid: ``make_valid`` keeps its area; only polygonal parts are kept."""
    import shapely

    if geometry.is_valid:
        return geometry
    return polygonal(shapely.make_valid(geometry))


def polygonal(geometry):
    """The polygonal parts of ``geometry`` (an overlay's result may hold lines or points where shapes touch), as a
    Polygon or MultiPolygon."""
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(geometry, (Polygon, MultiPolygon)):
        return geometry
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if isinstance(g, (Polygon, MultiPolygon))]
    polys = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    return MultiPolygon(polys) if len(polys) != 1 else polys[0]


def feature(
    geometry,
    object_type: str = "annotation",
    name: str | None = None,
    color: tuple[int, int, int] | None = None,
    measurements: Mapping[str, float] | None = None,
    properties: Mapping | None = None,
    origin: tuple[int, int] = (0, 0),
) -> dict:
    """One QuPath object: a shapely geometry (the slide's level-0 px, moved to QuPath's ``origin``: see
    :func:`image_origin`), its type, class (name + RGB colour) and measurements.
    Non-finite measurements are left out (JSON has no NaN and QuPath would refuse the file)."""
    from shapely import affinity
    from shapely.geometry import mapping

    if origin != (0, 0):
        geometry = affinity.translate(geometry, -origin[0], -origin[1])
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    props: dict = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": str(name), "color": [int(c) for c in (color or (255, 0, 0))]}
    if measurements:
        props["measurements"] = {str(k): float(v) for k, v in measurements.items() if math.isfinite(float(v))}
    props.update(properties or {})
    return {"type": "Feature", "geometry": mapping(valid_geometry(geometry)), "properties": props}


def write_geojson(path: str | Path, features: Iterable[dict]) -> Path:
    """A ``FeatureCollection`` written atomically (a killed run never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    collection = {"type": "FeatureCollection", "features": list(features)}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(collection, allow_nan=False))
    return path


def read_geojson(path: str | Path) -> list[tuple[object, dict]]:
    """(shapely geometry, properties) of every feature (what tests and users check a written file with)."""
    from shapely.geometry import shape

    data = json.loads(Path(path).read_text())
    if data.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection")
    return [(shape(f["geometry"]), f.get("properties", {})) for f in data["features"]]

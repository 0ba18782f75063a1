"""GeoJSON that QuPath opens (File → Import objects, or drag and drop), as QuPath itself exports it.

A ``FeatureCollection`` in level-0 pixel coordinates (origin top-left). Each feature's ``properties`` hold
``objectType`` (``annotation`` for regions, ``detection`` or ``tile`` for scored tiles), ``classification``
``{"name": ..., "color": [r, g, b]}`` and, for detections, ``measurements`` ``{name: number}`` (QuPath draws them as
measurement maps). Geometries are checked with shapely and repaired when invalid (QuPath refuses some invalid
polygons; TIAToolbox's writer met that in #1057).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..utils.io import atomic_path

OBJECT_TYPES = ("annotation", "detection", "tile")


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
) -> dict:
    """One QuPath object: a shapely geometry (level-0 px), its type, class (name + RGB colour) and measurements.
    Non-finite measurements are left out (JSON has no NaN and QuPath would refuse the file)."""
    from shapely.geometry import mapping

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

"""Class masks → valid shapely (Multi)Polygons with holes, on pixel edges, in row bands.

``cv2.findContours`` (RETR_CCOMP: outer borders and their holes) traces the centres of the border pixels (of the
mask at twice its resolution); growing each polygon by that half (half-)pixel with mitred corners puts its edges on
the pixel edges, so a polygon's area is the mask's pixel count (within a small error on diagonal steps) instead of
falling short by half its perimeter. Large maps are
traced in row bands (the bands' polygons share their cut edges exactly and are merged by a union), so a mask is never
held whole.
"""

from __future__ import annotations

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from ..wsi.qupath import valid_geometry


def _band_polygons(mask: np.ndarray, y0: int) -> list[Polygon]:
    # traced at twice the resolution (each pixel 2×2): the centre paths lie a quarter pixel inside the pixel edges
    # and diagonal staircases become 2-px steps, so growing by a quarter pixel puts every edge within 1/20 px² per
    # step of the true pixel edges (at the mask's own resolution, diagonals would be off by 0.2 px² per step)
    mask2 = np.repeat(np.repeat(mask.astype(np.uint8), 2, 0), 2, 1)
    contours, hierarchy = cv2.findContours(mask2, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polys = []
    for i, c in enumerate(contours):
        if hierarchy[i][3] != -1:  # a hole: added with its parent
            continue
        shell = (c[:, 0, :] + 0.5) / 2
        holes, j = [], hierarchy[i][2]
        while j != -1:
            holes.append((contours[j][:, 0, :] + 0.5) / 2)
            j = hierarchy[j][0]
        polys.append(_pixel_edges(shell, holes, y0))
    return [p for p in polys if not p.is_empty]


def _pixel_edges(shell: np.ndarray, holes: list[np.ndarray], y0: int):
    """The region whose border-pixel centres are ``shell`` (minus ``holes``), grown to the pixel edges."""
    outer = _grow(shell + (0, y0), 0.25)
    for h in holes:
        # a hole's contour runs through the centres of the (half-)pixels around it: the hole is that ring shrunk
        # by a quarter pixel
        hole = _grow(h + (0, y0), -0.25)
        if not hole.is_empty:
            outer = outer.difference(hole)
    return outer


def _grow(points: np.ndarray, d: float):
    """The polygon through ``points`` grown (d > 0) or shrunk by ``d`` px with mitred corners. Contours of
    8-connected pixels touch themselves (a bridge is traced there and back): made valid first, the area-less parts
    (lines, points) become their pixels' squares."""
    geom = shapely.make_valid(Polygon(points)) if len(points) >= 3 else shapely.MultiPoint(points)
    if d < 0:
        return shapely.buffer(geom, d, join_style="mitre", mitre_limit=2.0)
    return shapely.buffer(geom, d, cap_style="square", join_style="mitre", mitre_limit=2.0)


def mask_polygons(read_band, height: int, band: int = 1024, min_area: float = 0.0, simplify: float = 0.0):
    """The mask's regions as one valid (Multi)Polygon (or None when nothing is left), in mask pixel coordinates
    (x right, y down, pixel (0, 0) covering [0, 1]²). ``read_band(y0, y1)`` returns rows y0:y1 of the bool mask;
    parts and holes smaller than ``min_area`` px² are dropped (specks), then edges simplified by ``simplify`` px."""
    parts: list = []
    for y0 in range(0, height, band):
        parts += _band_polygons(np.ascontiguousarray(read_band(y0, min(y0 + band, height))), y0)
    if not parts:
        return None
    geom = shapely.unary_union(parts) if height > band else MultiPolygon(_flat(parts))
    geom = valid_geometry(geom)
    kept = []
    for p in _flat([geom]):
        if p.area < min_area:
            continue
        holes = [r for r in p.interiors if Polygon(r).area >= min_area]
        kept.append(Polygon(p.exterior, holes))
    if not kept:
        return None
    geom = MultiPolygon(kept)
    if simplify > 0:
        geom = shapely.simplify(geom, simplify, preserve_topology=True)
    geom = valid_geometry(geom)
    return geom if not geom.is_empty else None


def _flat(geoms) -> list[Polygon]:
    out = []
    for g in geoms:
        if isinstance(g, Polygon):
            out.append(g)
        elif hasattr(g, "geoms"):
            out += _flat(g.geoms)
    return [p for p in out if isinstance(p, Polygon) and not p.is_empty]

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
    parent = hierarchy[0][:, 3]
    is_hole = parent != -1
    # every contour at once (shapely's array functions: no Python loop per contour): a shell grown, a hole shrunk
    # by a quarter pixel, both with mitred corners
    regions = _regions([(c[:, 0, :] + 0.5) / 2 + (0, y0) for c in contours])
    grown = np.empty(len(regions), dtype=object)
    grown[~is_hole] = shapely.buffer(regions[~is_hole], 0.25, cap_style="square", join_style="mitre", mitre_limit=2.0)
    grown[is_hole] = shapely.buffer(regions[is_hole], -0.25, join_style="mitre", mitre_limit=2.0)
    holes: dict[int, list] = {}
    for j in np.flatnonzero(is_hole):
        if not grown[j].is_empty:
            holes.setdefault(int(parent[j]), []).append(grown[j])
    polys = [_with_holes(grown[i], holes.get(int(i), [])) for i in np.flatnonzero(~is_hole)]
    return [p for p in polys if not p.is_empty]


def _regions(rings: list[np.ndarray]) -> np.ndarray:
    """Each contour as the valid region it encloses. Contours of 8-connected pixels touch themselves (a bridge
    is traced there and back): made valid, the area-less parts (lines, points) are kept for the growing to turn
    into their pixels' squares."""
    sizes = np.array([len(r) for r in rings])
    out = np.empty(len(rings), dtype=object)
    ok = sizes >= 3
    if ok.any():
        coords = np.concatenate([r for r, k in zip(rings, ok) if k])
        index = np.repeat(np.arange(int(ok.sum())), sizes[ok])
        polys = shapely.polygons(shapely.linearrings(coords, indices=index))
        bad = ~shapely.is_valid(polys)
        polys[bad] = shapely.make_valid(polys[bad])
        out[ok] = polys
    for i in np.flatnonzero(~ok):
        out[i] = shapely.MultiPoint(rings[i])
    return out


def _with_holes(shell, holes: list):
    """``shell`` minus ``holes``. A hole lies inside its shell and apart from the shell's other holes (pixel
    edges), so the polygon is usually just the rings put together: one validity check instead of an overlay of the
    whole shell per hole (which made a region with thousands of holes take minutes); otherwise the overlay."""
    if not holes:
        return shell
    if (
        isinstance(shell, Polygon)
        and not shell.interiors
        and all(isinstance(h, Polygon) and not h.interiors for h in holes)
    ):
        poly = Polygon(shell.exterior, [h.exterior for h in holes])
        if poly.is_valid:
            return poly
    return shell.difference(shapely.union_all(holes))


def mask_polygons(read_band, height: int, band: int = 1024, min_area: float = 0.0, simplify: float = 0.0):
    """The mask's regions as one valid (Multi)Polygon (or None when nothing is left), in mask pixel coordinates
    (x right, y down, pixel (0, 0) covering [0, 1]²). ``read_band(y0, y1)`` returns rows y0:y1 of the bool mask;
    parts and holes smaller than ``min_area`` px² are dropped (specks), then edges simplified by ``simplify`` px."""
    (geom,) = masks_polygons(lambda y0, y1: read_band(y0, y1)[..., None], height, 1, band, min_area, simplify)
    return geom


def masks_polygons(
    read_band, height: int, masks: int, band: int = 1024, min_area: float = 0.0, simplify: float = 0.0
) -> list:
    """:func:`mask_polygons` of ``masks`` masks read together: ``read_band(y0, y1)`` returns rows y0:y1 as
    rows × W × masks bool, so a map on disk is read once for all its classes (not once per class). The masks are
    traced in parallel threads, one per core this process may use (OpenCV and shapely's array functions release
    the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..utils.threads import available_cores

    parts: list[list] = [[] for _ in range(masks)]
    with ThreadPoolExecutor(max(1, min(masks, available_cores())), thread_name_prefix="polygons") as pool:
        for y0 in range(0, height, band):
            block = read_band(y0, min(y0 + band, height))
            traced = pool.map(lambda k, b=block, y=y0: _band_polygons(np.ascontiguousarray(b[..., k]), y), range(masks))
            for k, polys in enumerate(traced):
                parts[k] += polys
        return list(pool.map(lambda p: _finished(p, band, height, min_area, simplify), parts))


def _finished(parts: list, band: int, height: int, min_area: float, simplify: float):
    """One mask's band polygons joined, specks and small holes dropped, simplified: a valid geometry or None."""
    if not parts:
        return None
    # no validity check here (a whole-MultiPolygon check was 18 % of this function): the bands' polygons are disjoint
    # and those touching across a band edge are unioned; the check after simplifying covers any exception
    kept = []
    for p in _joined_across_bands(parts, band, height):
        if p.area < min_area:
            continue
        rings = np.asarray(p.interiors, dtype=object)
        holes = rings[shapely.area(shapely.polygons(rings)) >= min_area] if len(rings) else rings
        kept.append(Polygon(p.exterior, list(holes)))
    if not kept:
        return None
    if simplify > 0:
        kept = _simplified(kept, simplify)
    geom = valid_geometry(MultiPolygon(kept))
    return geom if not geom.is_empty else None


def _simplified(polys: list[Polygon], tolerance: float) -> list[Polygon]:
    """Each ring simplified on its own (topology-preserving Douglas-Peucker); a polygon whose rings then cross is
    simplified whole. Ring by ring is >10× faster than GEOS's simplifier on a polygon with thousands of holes (its
    cost grows with the rings it checks against each other); it differs only where GEOS kept a vertex because another
    ring came within the tolerance, and validity is checked here instead."""
    rings = [[p.exterior, *p.interiors] for p in polys]
    every = np.asarray([r for rs in rings for r in rs], dtype=object)
    flat = shapely.simplify(every, tolerance, preserve_topology=True)
    out, k = [], 0
    for p, rs in zip(polys, rings):
        q = Polygon(flat[k], list(flat[k + 1 : k + len(rs)]))
        k += len(rs)
        # one ring simplified with its topology kept is a valid polygon; holes may now touch the shell
        out.append(q if len(rs) == 1 or q.is_valid else shapely.simplify(p, tolerance, preserve_topology=True))
    return _flat(out)


def _joined_across_bands(parts: list, band: int, height: int) -> list[Polygon]:
    """The bands' polygons with those cut by a band edge merged (a union of only them: the others lie inside
    their band, apart from every other polygon)."""
    if height <= band:
        return _flat(parts)
    parts = np.asarray(_flat(parts), dtype=object)
    _, miny, _, maxy = shapely.bounds(parts).T
    start = np.floor(miny / band) * band  # the band each polygon was traced in (its rows lie in [start, start + band])
    cut = ((miny <= start) & (start > 0)) | ((maxy >= start + band) & (start + band < height))
    return _touching_joined(parts[cut]) + list(parts[~cut])


def _touching_joined(polys: np.ndarray) -> list[Polygon]:
    """``polys`` with every group of touching ones replaced by its union: one small union per group instead of one
    union of them all (which overlays unrelated geometry again and again: 13 s of a 7,168 px map's 27)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(polys) == 0:
        return []
    i, j = shapely.STRtree(polys).query(polys, predicate="intersects")
    n, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(polys),) * 2), directed=False)
    order = np.argsort(label, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(label, minlength=n))[:-1])
    return _flat([polys[g[0]] if len(g) == 1 else shapely.union_all(polys[g]) for g in groups])


def _flat(geoms) -> list[Polygon]:
    out = []
    for g in geoms:
        if isinstance(g, Polygon):
            out.append(g)
        elif hasattr(g, "geoms"):
            out += _flat(g.geoms)
    return [p for p in out if isinstance(p, Polygon) and not p.is_empty]

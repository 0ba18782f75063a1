"""Class masks → valid shapely (Multi)Polygons with holes, on pixel edges, in row bands.

``cv2.findContours`` (RETR_CCOMP: outer borders and their holes) traces the centres of the border pixels (of the
mask at twice its resolution); growing each polygon by that half (half-)pixel with mitred corners puts its edges on
the pixel edges, so a polygon's area is the mask's pixel count (a corner point added at each diagonal step of the
tracing: :func:`_on_pixel_edges`) instead of falling short by half its perimeter. Large maps are traced in row
bands, so a mask is never held whole: a region still open at a band's bottom is carried into the next band (its rows
kept) and traced whole once it ends; only a region taller than ``CARRY_PIXELS`` / width rows is cut at a band edge,
and its pieces (which share their cut edges exactly) are merged by a union at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon

from ..wsi.qupath import valid_geometry


def _band_polygons(mask: np.ndarray, y0: int, check: bool = False) -> np.ndarray:
    """The regions of ``mask`` (rows from ``y0``) as polygons on pixel edges, with their holes. ``check``: every
    grown ring is checked for validity here (pieces of cut regions, which a union joins); without it the mask's
    geometry is checked once when finished (``_finished``)."""
    # only the rows that hold pixels: a band's mask of finished regions is often empty over the rows carried for
    # regions still open, and every step below costs per pixel
    rows = np.flatnonzero(mask.any(1))
    if not len(rows):
        return np.empty(0, dtype=object)
    rings, parent = _traced_rings(mask[rows[0] : rows[-1] + 1], y0 + int(rows[0]))
    if not rings:
        return np.empty(0, dtype=object)
    is_hole = parent != -1
    # every contour at once (array functions: no Python loop per contour): a shell grown, a hole shrunk by a quarter
    # pixel, both with mitred corners
    grown = _grown(rings, is_hole, check)
    holes: dict[int, list] = {}
    for j in np.flatnonzero(is_hole & ~shapely.is_empty(grown)):
        holes.setdefault(int(parent[j]), []).append(grown[j])
    # shells without holes as they are (no Python per polygon: a slide's class can have tens of thousands)
    shells = np.flatnonzero(~is_hole)
    polys = grown[shells]
    for k, i in enumerate(shells):
        if int(i) in holes:
            polys[k] = _with_holes(grown[i], holes[int(i)])
    return polys[~shapely.is_empty(polys)]


def _traced_rings(mask: np.ndarray, y0: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Every contour of ``mask`` (rows from ``y0``) as a ring of (x, y) pixel-centre paths in mask px, and each
    contour's parent (-1: an outer border; else the index of the border a hole lies in)."""
    # traced at twice the resolution (each pixel 2×2): the centre paths lie a quarter pixel inside the pixel edges,
    # so growing them by a quarter pixel puts their edges on the pixel edges (:func:`_on_pixel_edges` makes the
    # paths turn where the pixel edges do)
    mask = mask.astype(bool, copy=False)
    mask2 = cv2.resize(mask.view(np.uint8), (2 * mask.shape[1], 2 * mask.shape[0]), interpolation=cv2.INTER_NEAREST)
    _split_diagonal_bridges(mask, mask2)
    contours, hierarchy = cv2.findContours(mask2, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return [], np.empty(0, dtype=np.int64)
    return [(c + 0.5) / 2 + (0, y0) for c in _on_pixel_edges(contours, mask, mask2)], hierarchy[0][:, 3]


# how far a bridge's two pixels stay apart (mask px; see _on_pixel_edges): a negligible area, but no shared point
BRIDGE_GAP = 1e-4


def _on_pixel_edges(contours, mask: np.ndarray, mask2: np.ndarray) -> list[np.ndarray]:
    """The contours of the 2× mask (``findContours``' points) with a corner point added at every diagonal step, as
    float paths of 2× pixel centres. Border following steps diagonally past the inner pixel of a concave corner;
    grown, that step became a chamfer over the background pixel's corner (1/16 px² each: a class's polygons 0.2–1.5 %
    larger than its pixels, a class and its complement overlapping). Through the inner pixel, the grown path follows
    the pixel edges exactly. At a split diagonal bridge (:func:`_split_diagonal_bridges`) the step passes the quarter
    pixel cleared there instead: the path goes through it, ``BRIDGE_GAP`` short of the shared corner, so the upper
    pixel keeps its area (a 1 px diagonal line lost 10 %) and the two regions still share no point. Every contour at
    once (no Python per contour)."""
    p = np.concatenate(contours)[:, 0, :].astype(np.int64)
    ring = np.repeat(np.arange(len(contours)), [len(c) for c in contours])
    _, nxt = _ring_neighbours(ring, len(contours))
    d = p[nxt] - p
    # CHAIN_APPROX_SIMPLE keeps a diagonal run's ends only (a staircase of split bridges): one point per step
    run = np.where((d[:, 0] != 0) & (np.abs(d[:, 0]) == np.abs(d[:, 1])), np.abs(d[:, 0]), 1)
    if (run > 1).any():
        src = np.repeat(np.arange(len(p)), run)
        k = np.arange(len(src)) - np.repeat(np.cumsum(run) - run, run)
        p = p[src] + k[:, None] * np.sign(d[src])
        ring = ring[src]
        _, nxt = _ring_neighbours(ring, len(contours))
        d = p[nxt] - p
    diag = np.flatnonzero((np.abs(d[:, 0]) == 1) & (np.abs(d[:, 1]) == 1))
    h2, w2 = mask2.shape
    corners = []
    for cand in (p[diag] + d[diag] * (1, 0), p[diag] + d[diag] * (0, 1)):  # the step's two corner pixels
        x, y = np.clip(cand[:, 0], 0, w2 - 1), np.clip(cand[:, 1], 0, h2 - 1)
        inside = mask2[y, x] > 0
        corners.append((cand, inside, ~inside & mask[y // 2, x // 2]))  # (pixels, in the 2× mask, a cleared quarter)
    (c1, in1, cut1), (c2, in2, cut2) = corners
    take1 = cut1 | (in1 & ~cut2)
    add = (in1 ^ in2) | cut1 | cut2  # exactly one corner pixel inside, or a cleared quarter: a corner to add
    corner = np.where(take1[:, None], c1, c2).astype(np.float64)
    cut = np.where(take1, cut1, cut2)
    corner[cut] = _cleared(corner[cut])
    wedge = _wedge_edges(p, d, ring, mask, mask2)
    count = np.ones(len(p), dtype=np.int64)
    count[diag[add]] = 2
    count[wedge] = 3
    pos = np.cumsum(count) - count
    out = np.empty((int(count.sum()), 2))
    out[pos] = p
    out[pos[diag[add]] + 1] = corner[add]
    # a pixel whose two lower quarters were both cleared (bridged at both lower corners): the path along the bottom
    # of its upper half goes down through both quarters and back
    out[pos[wedge] + 1] = _cleared(p[wedge] + (0, 1))
    out[pos[wedge] + 2] = _cleared(p[nxt[wedge]] + (0, 1))
    # a corner continues the edge before or after its step: that edge's end point is no longer a vertex (as many
    # vertices as before, for the offsets, checks and simplifying that follow)
    ring = np.repeat(ring, count)
    prev, nxt = _ring_neighbours(ring, len(contours))
    into, onward = out - out[prev], out[nxt] - out
    straight = (into[:, 0] * onward[:, 1] == into[:, 1] * onward[:, 0]) & ((into * onward).sum(1) > 0)
    return np.split(out[~straight], np.cumsum(np.bincount(ring[~straight], minlength=len(contours)))[:-1])


def _cleared(quarters: np.ndarray) -> np.ndarray:
    """Cleared quarters' centres (2× px) moved towards their own pixel's centre by ``BRIDGE_GAP`` mask px per axis:
    the pixel's path passes there, so it keeps its area and shares no point with the pixel across the bridge."""
    return quarters - 2 * BRIDGE_GAP * np.where(quarters % 2 == 1, 1.0, -1.0)


def _wedge_edges(p: np.ndarray, d: np.ndarray, ring: np.ndarray, mask: np.ndarray, mask2: np.ndarray) -> np.ndarray:
    """The points of the 2× contours ``p`` (steps ``d`` to the next point, ``ring`` each point's contour) whose step
    runs along the bottom of a pixel that lost both lower quarters (:func:`_split_diagonal_bridges`; a 1 px ∧, a
    checkerboard): the pixel's upper half is all that is left, so the contour steps once across it (twice, there
    and back, when that half is the whole region: then only the first counts)."""
    wedge = mask & (mask2[1::2, 0::2] == 0) & (mask2[1::2, 1::2] == 0)
    if not wedge.any():
        return np.empty(0, dtype=np.int64)
    left = np.minimum(p[:, 0], p[:, 0] + d[:, 0])
    along = (d[:, 1] == 0) & (np.abs(d[:, 0]) == 1) & (p[:, 1] % 2 == 0) & (left % 2 == 0)
    i = np.flatnonzero(along)
    i = i[wedge[p[i, 1] // 2, left[i] // 2]]
    sizes = np.bincount(ring, minlength=int(ring.max()) + 1)
    second = (sizes[ring[i]] == 2) & (i > 0) & (ring[i - 1] == ring[i])  # a two-point ring's way back
    return i[~second]


def _ring_neighbours(ring: np.ndarray, rings: int) -> tuple[np.ndarray, np.ndarray]:
    """For points listed ring by ring (``ring``: each point's ring, non-decreasing), each point's previous and next
    point's index within its closed ring."""
    sizes = np.bincount(ring, minlength=rings)
    start = (np.cumsum(sizes) - sizes)[ring]
    end = start + sizes[ring] - 1
    i = np.arange(len(ring))
    return np.where(i == start, end, i - 1), np.where(i == end, start, i + 1)


def _split_diagonal_bridges(mask: np.ndarray, mask2: np.ndarray) -> None:
    """Pixels meeting only at a corner (a diagonal bridge) become separate regions: the quarter of the upper pixel
    at the shared corner is cleared in the 2× mask. A bridge made a contour that passes the corner twice, there
    and back, i.e. touches itself: an invalid ring whose repair (``make_valid``) grew faster than linearly with
    the region's size (3 s of a 4,096 px blob map's 6) and, on noisy masks, added 6 % of area. The traced path
    goes through the cleared quarter (:func:`_on_pixel_edges`; through both, for a pixel bridged at both lower
    corners: :func:`_wedge_edges`), so the upper pixel keeps its area."""
    if mask.shape[0] < 2 or mask.shape[1] < 2:
        return
    # a 2×2 window whose top pixels differ, bottom pixels differ and left pixels differ is a diagonal pair
    # (tl = br ≠ tr = bl): three comparisons and one scan instead of four masks per direction
    across = mask[:, :-1] ^ mask[:, 1:]
    r, c = np.nonzero(across[:-1] & across[1:] & (mask[:-1, :-1] ^ mask[1:, :-1]))
    down = mask[r, c]  # top-left set: ↘ (top-left and bottom-right); else ↙ (top-right and bottom-left)
    mask2[2 * r[down] + 1, 2 * c[down] + 1] = 0
    mask2[2 * r[~down] + 1, 2 * c[~down] + 2] = 0


GROW = 0.25  # px: from the traced centre paths (a quarter pixel inside the pixel edges, see above) to the edges
MITRE_LIMIT = 2.0  # a corner sharper than this (mitre length ÷ GROW) is bevelled, as GEOS's buffer does


def _grown(rings: list[np.ndarray], is_hole: np.ndarray, check: bool = True) -> np.ndarray:
    """The polygons of the traced rings, shells grown and holes shrunk by ``GROW`` with mitred corners: the offset
    of every ring computed at once (:func:`_offset_rings`; GEOS's buffer of each was 30 % of the tracing time). A
    ring whose offset is not good (a spike, an edge offset past its length, a hole shrunk away; with ``check`` also
    an invalid ring) and the degenerate ones (fewer than 3 points: lines and points) are grown by GEOS's buffer."""
    out = np.empty(len(rings), dtype=object)
    sizes = np.array([len(r) for r in rings], dtype=np.int64)
    fast = sizes >= 3
    if fast.any():
        idx = np.flatnonzero(fast)
        polys, ok = _offset_rings([rings[i] for i in idx], np.where(is_hole[idx], -GROW, GROW), check)
        out[idx[ok]] = polys[ok]
        fast[idx[~ok]] = False
    slow = np.flatnonzero(~fast)
    if len(slow):
        regions = _regions([rings[i] for i in slow])
        hole = is_hole[slow]
        out[slow[~hole]] = shapely.buffer(
            regions[~hole], GROW, cap_style="square", join_style="mitre", mitre_limit=MITRE_LIMIT
        )
        out[slow[hole]] = shapely.buffer(regions[hole], -GROW, join_style="mitre", mitre_limit=MITRE_LIMIT)
    return out


def _offset_rings(rings: list[np.ndarray], distance: np.ndarray, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Each closed ring (≥ 3 points) offset by its ``distance`` (> 0 outwards, < 0 inwards) as polygons, and which
    of them are good: every edge still pointing its way, no reversal at a vertex, and with ``check`` valid (13 % of
    the tracing time; no traced contour has failed it, so only the pieces of cut regions, which a union joins, are
    checked ring by ring). Each vertex moves to where its two edges' offset lines meet (a mitre); on the outside of
    a turn sharper than ``MITRE_LIMIT`` it becomes two points, the mitre cut at ``MITRE_LIMIT`` × |distance| from
    the vertex (a bevel, as GEOS's buffer makes)."""
    sizes = np.array([len(r) for r in rings], dtype=np.int64)
    start = np.cumsum(sizes) - sizes
    ring = np.repeat(np.arange(len(rings)), sizes)
    p = np.concatenate(rings).astype(np.float64)
    prev, nxt = _ring_neighbours(ring, len(rings))
    e = p - p[prev]  # edge k ends at vertex k
    length = np.hypot(e[:, 0], e[:, 1])
    good = np.ones(len(rings), bool)
    good[ring[length == 0]] = False  # a repeated point
    e /= np.where(length == 0, 1.0, length)[:, None]
    area2 = np.add.reduceat(p[prev, 0] * p[:, 1] - p[:, 0] * p[prev, 1], start)  # twice the signed area
    orient = np.sign(area2)
    good &= orient != 0
    # outward normals of the edge into each vertex (n1) and out of it (n2), times the ring's signed distance
    s = (distance * orient)[ring]
    n1 = np.stack([e[:, 1], -e[:, 0]], 1)
    n2 = n1[nxt]
    c = (n1 * n2).sum(1)
    good[ring[c < -1 + 1e-9]] = False  # the path turns back on itself (a spike): no mitre
    c = np.maximum(c, -1 + 1e-9)
    bis = n1 + n2
    mitre = p + s[:, None] * bis / (1 + c)[:, None]
    turn = e[:, 0] * e[nxt, 1] - e[:, 1] * e[nxt, 0]
    # on the outside of the offset (the turn away from the offset side) and sharper than the limit: bevelled
    bevel = (turn * s > 0) & (1 + c < 2 / MITRE_LIMIT**2)
    count = 1 + bevel
    pos = np.cumsum(count) - count
    out = np.empty((int(count.sum()), 2))
    out[pos] = mitre
    if bevel.any():
        b = np.flatnonzero(bevel)
        u = np.sign(s[b])[:, None] * bis[b] / np.linalg.norm(bis[b], axis=1)[:, None]  # from the vertex outwards
        t = np.stack([-u[:, 1], u[:, 0]], 1)
        m = MITRE_LIMIT * np.abs(s[b])
        for j, n in enumerate((n1[b], n2[b])):  # where the bevel line meets each edge's offset line
            h = (s[b] - m * (n * u).sum(1)) / (n * t).sum(1)
            out[pos[b] + j] = p[b] + m[:, None] * u + h[:, None] * t
    # each edge keeps its direction: one that reversed was offset past its length (a hole shrunk past nothing turns
    # round as a whole and stays a valid ring; a short edge between two deep corners makes a loop)
    moved = out[pos[nxt]] - out[pos + count - 1]
    good[ring[(moved * e[nxt]).sum(1) <= 0]] = False
    polys = shapely.polygons(shapely.linearrings(out, indices=np.repeat(ring, count)))
    if check:
        good[good] = shapely.is_valid(polys[good])
    return polys, good


def _regions(rings: list[np.ndarray]) -> np.ndarray:
    """Each contour as the valid region it encloses. With diagonal bridges split, contours do not touch
    themselves; any that still does is made valid, its area-less parts (lines, points) kept for the growing to
    turn into their pixels' squares."""
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
    """``shell`` minus ``holes``. A hole lies inside its shell and, with diagonal bridges split, shares no point with
    the shell or the shell's other holes, so the polygon is just the rings put together: no overlay of the whole
    shell per hole (which made a region with thousands of holes take minutes) and no validity check per polygon
    (a third of the tracing time on blob maps; the mask's final check in ``_finished`` covers any exception)."""
    if not holes:
        return shell
    if (
        isinstance(shell, Polygon)
        and not shell.interiors
        and all(isinstance(h, Polygon) and not h.interiors for h in holes)
    ):
        return Polygon(shell.exterior, [h.exterior for h in holes])
    return shell.difference(shapely.union_all(holes))


# a region open at a band's bottom is carried while its rows hold at most this many pixels (a band more if the band
# is larger): 32 MB of mask per class, ~0.3 GB while it is traced at 2× with its labels. Carried rows are labelled
# again with every band; shorter carries (more cuts, more unions) were no faster overall (docs/benchmarks.md)
CARRY_PIXELS = 1 << 25


def mask_polygons(read_band, height: int, band: int = 1024, min_area: float = 0.0, simplify: float = 0.0):
    """The mask's regions as one valid (Multi)Polygon (or None when nothing is left), in mask pixel coordinates
    (x right, y down, pixel (0, 0) covering [0, 1]²). ``read_band(y0, y1)`` returns rows y0:y1 of the bool mask;
    parts and holes smaller than ``min_area`` px² are dropped (specks), then edges simplified by ``simplify`` px."""
    (geom,) = masks_polygons(lambda y0, y1: read_band(y0, y1)[None], height, 1, band, min_area, simplify)
    return geom


def masks_polygons(
    read_band,
    height: int,
    masks: int,
    band: int = 1024,
    min_area: float = 0.0,
    simplify: float = 0.0,
    progress: Callable[[int], object] | None = None,
) -> list:
    """:func:`mask_polygons` of ``masks`` masks read together: ``read_band(y0, y1)`` returns rows y0:y1 as
    masks × rows × W bool (a class's rows contiguous), so a map on disk is read once for all its classes
    (``progress(rows)`` after each band). The
    masks are traced in parallel threads, one per core this process may use (OpenCV and shapely's array functions
    release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..utils.threads import available_cores

    tracers = [_BandTracer(band, CARRY_PIXELS, min_area) for _ in range(masks)]
    with ThreadPoolExecutor(max(1, min(masks, available_cores())), thread_name_prefix="polygons") as pool:
        for y0 in range(0, height, band):
            y1 = min(y0 + band, height)
            block, last = read_band(y0, y1), y1 == height
            list(pool.map(lambda t, k, b=block, y=y0, e=last: t.trace(np.ascontiguousarray(b[k]), y, e),
                          tracers, range(masks)))  # fmt: skip
            if progress is not None:
                progress(y1 - y0)
        return list(pool.map(lambda t: _finished(t.regions, t.pieces, min_area, simplify), tracers))


class _BandTracer:
    """One mask's row bands traced into polygons: ``regions`` (whole) and ``pieces`` (of regions cut at a band
    edge). A region reaching a band's bottom row is carried into the next band (its rows kept) and traced once it
    ends, without a union (unions of cut polygons were a third of the tracing time); one taller than
    ``carry_pixels`` / width rows (at least a band) is cut at the band's bottom, and what it continues into below
    is a piece (carried the same way): a region longer than that is a few pieces, one union at the end.
    Whole regions under ``min_area`` (specks) are dropped as each band is traced, not kept to the end: a noisy
    class map can hold hundreds of thousands of them (613,000 in one class of a 24,576 px map, 0.4 GB of polygons
    a class), where pieces are few and kept until joined."""

    def __init__(self, band: int, carry_pixels: int, min_area: float = 0.0):
        self.band, self.carry_pixels, self.min_area = band, carry_pixels, min_area
        self.regions: list[Polygon] = []
        self.pieces: list[Polygon] = []
        self.carry: np.ndarray | None = None  # rows of the regions still open, starting at row ``self.top``
        self.top = 0
        self.cuts: list[tuple[int, np.ndarray]] = []  # (row, the cut regions' pixels in the row above it)

    def trace(self, rows: np.ndarray, y0: int, last: bool) -> None:
        rows = rows.astype(bool, copy=False)
        m, top = (np.concatenate([self.carry, rows]), self.top) if self.carry is not None else (rows, y0)
        self.carry = None
        if (last or not m[-1].any()) and not self.cuts:  # nothing continues below and no pieces: no labelling
            self._keep(_band_polygons(m, top))
            return
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.view(np.uint8), connectivity=8)
        # with the labels at hand, specks are not even traced: a traced polygon's area is at most its pixel count
        # (less only by a split bridge's gap, or half a pixel bridged at both lower corners)
        speck = stats[:, cv2.CC_STAT_AREA] < self.min_area
        speck[0] = False  # background
        first = stats[:, cv2.CC_STAT_TOP]
        is_piece = np.zeros(n, bool)  # label → a piece of a cut region: 8-connected to its pixels above a cut
        for row, above in self.cuts:
            near = above.copy()
            near[1:] |= above[:-1]
            near[:-1] |= above[1:]
            is_piece[labels[row - top][near]] = True
        is_open = np.zeros(n, bool)  # label → reaches the bottom row: more rows may follow
        if not last:
            is_open[labels[-1]] = True
        is_open[0] = is_piece[0] = False  # background
        is_cut = is_open & (len(m) - first > max(self.band, self.carry_pixels // m.shape[1]))
        is_piece |= is_cut
        carried = is_open & ~is_cut
        speck &= ~is_open & ~is_piece  # only whole regions: a region going on below, or a piece, may yet grow
        if not is_piece.any() and not carried.any():
            self._keep(_band_polygons(m & ~speck[labels] if speck.any() else m, top))
            self.cuts = []
            return
        kind = np.where(carried, 2, np.where(is_piece, 1, np.where(speck, 3, 0))).astype(np.uint8)[labels]
        self._keep(_band_polygons(m & (kind == 0), top))
        if (kind == 1).any():
            self.pieces.extend(_band_polygons(kind == 1, top, check=True))
        if carried.any():
            start = int(first[carried].min())
            self.carry, self.top = np.ascontiguousarray(kind[start:] == 2), top + start
        # a cut line stays while rows at or below it are carried (a piece carried from it must be found again)
        self.cuts = [(r, e) for r, e in self.cuts if carried.any() and r >= self.top]
        if is_cut.any():
            self.cuts.append((top + len(m), is_cut[labels[-1]] & m[-1]))

    def _keep(self, polys: np.ndarray) -> None:
        """Whole regions, specks dropped (as ``_finished`` would drop them: regions are never joined)."""
        self.regions.extend(polys[shapely.area(polys) >= self.min_area] if self.min_area > 0 and len(polys) else polys)


def _finished(regions: list, pieces: list, min_area: float, simplify: float):
    """One mask's polygons, the pieces of cut regions joined, specks and small holes dropped, simplified: a valid
    geometry or None. Array functions throughout; Python loops only over polygons with holes."""
    polys = np.concatenate([_flat(regions), _touching_joined(_flat(pieces))])
    # no validity check here (a whole-MultiPolygon check was 18 % of this function): the regions are disjoint and
    # touching pieces are unioned; the check after simplifying covers any exception
    polys = polys[shapely.area(polys) >= min_area]
    if min_area > 0:
        for i in np.flatnonzero(shapely.get_num_interior_rings(polys) > 0):
            rings = np.asarray(polys[i].interiors, dtype=object)
            small = shapely.area(shapely.polygons(rings)) < min_area
            if small.any():
                polys[i] = Polygon(polys[i].exterior, list(rings[~small]))
    if not len(polys):
        return None
    if simplify > 0:
        polys = _simplified(polys, simplify)
    geom = valid_geometry(shapely.multipolygons(polys))
    return geom if not geom.is_empty else None


def _simplified(polys, tolerance: float) -> np.ndarray:
    """Each ring simplified on its own (:func:`_simplified_rings`); a polygon whose rings then cross each other is
    simplified whole. Ring by ring is >10× faster than GEOS on a polygon with thousands of holes (its cost grows
    with the rings it checks against each other); the result differs only where GEOS kept a vertex because another
    ring came within the tolerance, and validity is checked here instead."""
    polys = np.asarray(polys, dtype=object)
    out = np.empty(len(polys), dtype=object)
    simple = shapely.get_num_interior_rings(polys) == 0
    out[simple] = shapely.polygons(_simplified_rings(shapely.get_exterior_ring(polys[simple]), tolerance))
    for i in np.flatnonzero(~simple):
        p = polys[i]
        rings = _simplified_rings(np.asarray([p.exterior, *p.interiors], dtype=object), tolerance)
        q = Polygon(rings[0], list(rings[1:]))
        # a simple ring is a valid polygon; holes may now touch or cross the shell
        out[i] = q if q.is_valid else shapely.simplify(p, tolerance, preserve_topology=True)
    return _flat(out)


def _simplified_rings(rings: np.ndarray, tolerance: float) -> np.ndarray:
    """Plain Douglas-Peucker, 16× faster than GEOS's topology-preserving simplifier (0.05 s vs 0.9 s for a 4,096 px
    blob map's rings); a ring that then crosses itself or collapses is simplified with its topology kept."""
    flat = shapely.simplify(rings, tolerance, preserve_topology=False)
    bad = shapely.get_num_coordinates(flat) < 4
    bad[~bad] = ~shapely.is_valid(shapely.polygons(flat[~bad]))
    if bad.any():
        flat[bad] = shapely.simplify(rings[bad], tolerance, preserve_topology=True)
    return flat


def _touching_joined(polys: np.ndarray) -> np.ndarray:
    """``polys`` with every group of touching ones replaced by its union: one small union per group instead of one
    union of them all (which overlays unrelated geometry again and again: 13 s of a 7,168 px map's 27)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(polys) == 0:
        return polys
    i, j = shapely.STRtree(polys).query(polys, predicate="intersects")
    n, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(polys),) * 2), directed=False)
    order = np.argsort(label, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(label, minlength=n))[:-1])
    return _flat([polys[g[0]] if len(g) == 1 else shapely.union_all(polys[g]) for g in groups])


def _flat(geoms) -> np.ndarray:
    """The non-empty polygons of ``geoms`` (Polygons, MultiPolygons, collections of them), as an object array."""
    parts = np.asarray(geoms if isinstance(geoms, np.ndarray) else list(geoms), dtype=object)
    while len(parts) and (multi := shapely.get_type_id(parts) >= 4).any():  # Multi*, GeometryCollection
        parts = np.concatenate([parts[~multi], shapely.get_parts(parts[multi])])
    return parts[(shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)] if len(parts) else parts

"""Whole-slide segmentation as a consumer of the slide runner (:func:`hirespath.slides.run_slides`).

The runner lists, locks, tiles (the covering grid: ``<tiling>/patches_cover_tissue``), reads and batches;
this module supplies the tile function (the segmentation model's per-class probabilities of each tile, through
:class:`~hirespath.slides.tile_model.TileModel`) and the per-slide sink: tiles are blended into per-class
probability maps on disk (:mod:`.stitch`), and when the slide is done the sink writes, under
``<job_dir>/<tiling>/segmentation_<model tag>/``:

- ``<slide>_probs.tif``: the pyramidal probability TIFF (:mod:`.probs_tiff`);
- ``<slide>.geojson``: one QuPath annotation per class, a MultiPolygon with holes in level-0 px (:mod:`.polygons`,
  :mod:`hirespath.wsi.qupath`); written last, so it marks the slide finished;
- ``<slide>_overlay.png`` and a row per class in ``areas.csv`` (after the slide, as pictures; each row with the
  drawing settings its polygons were made with).

The polygons depend on the drawing settings (``DRAWING``: threshold, specks, simplification, clipping) but the
probability map does not: with ``segment.redraw=true`` a folder's drawing settings may change, and a slide whose
TIFF is finished is drawn again from it (:class:`RedrawSink`: no tile read, no model run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..slides.ledger import Ledger, OutputsSince
from ..slides.prepare import PreparedSlide
from ..slides.provenance import is_newer, recorded_slide
from ..slides.runner import Runtime, SlideJob, run_slides
from ..slides.tile_model import TileModel
from ..utils.checkpoints import file_digest
from ..utils.config import is_folder_name, is_number  # true/false are no numbers
from ..utils.errors import InputError
from ..wsi import qupath
from ..wsi.listing import SlideSpec
from .model import SegmentationCheckpoint, attention_tag, tile_probabilities
from .polygons import mask_polygons, masks_polygons
from .probs_tiff import MapLevel, pyramid, pyramid_shapes, read_description, write_probs_tiff
from .stitch import BLENDS, ProbabilityStitcher, blend_weights, to_uint8

log = logging.getLogger("hirespath.segmentation")

AREAS = "areas.csv"
# the options the GeoJSON, overlay and areas depend on, and the probability map does not
DRAWING = ("threshold", "min_area_um2", "simplify_px", "within_tissue")
AREA_COLUMNS = ["slide", "class", "area_mm2", "tissue_mm2", "fraction_of_tissue", *DRAWING]
REDRAW = (
    "segment.redraw=true draws the finished slides' polygons, overlays and areas again from their probability "
    "TIFFs (the model does not run)"
)
SEAMS = "seams.csv"
# the Dice is of the masks at that threshold (a redraw at another keeps the row of the run that measured it)
SEAM_COLUMNS = ["slide", "window_x", "window_y", "window_level0_px", "blend", "threshold", "mean_dice",
                "mean_abs_diff"]  # fmt: skip
# a slide's map at least this large (px per class) says each closing step as it ends: at 0.22 µm/px a resection's
# map is thousands of megapixels, and its pyramid, TIFF and polygons take minutes after the last tile
SAY_CLOSING_PX = 256 << 20
# one fixed colour per SegPath cell type (QuPath shows the class in it)
CLASS_COLORS = {
    "panCK_Epithelium": (220, 50, 50),
    "aSMA_SmoothMuscle": (240, 140, 20),
    "CD235a_RBC": (150, 0, 90),
    "CD45RB_Leukocyte": (40, 120, 230),
    "CD3CD20_Lymphocyte": (30, 180, 60),
    "ERG_Endothelium": (230, 210, 30),
    "MIST1_PlasmaCell": (0, 200, 200),
    "MNDA_MyeloidCell": (150, 80, 220),
}
# classes a model was trained on under other names: matplotlib's tab10, in class order
OTHER_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def class_colors(classes: list[str]) -> list[tuple[int, int, int]]:
    """Each class's colour in the GeoJSON, the probability TIFF's channels and the overlay."""
    return [CLASS_COLORS.get(n, OTHER_COLORS[i % len(OTHER_COLORS)]) for i, n in enumerate(classes)]


@dataclass
class SegmentOptions:
    """What is made of the probabilities (the ``segment`` node of conf/segment_slides.yaml)."""

    blend: str = "linear"  # linear | crop (stitch.py)
    threshold: float = 0.5
    min_area_um2: float = 50.0
    simplify_px: float = 1.0
    model_tag: str | None = None
    overlay: bool = True  # <slide>_overlay.png
    seam_check: bool = True  # the seam measure on the slides themselves, one extra forward per checked slide
    seam_check_share: float = 0.05  # checked slides' extra forwards ≤ this share of the tile forwards (1: all)
    within_tissue: bool = True  # polygons clipped to the tissue outline (the probability TIFF is not clipped)
    redraw: bool = False  # the drawing settings may differ from the folder's: finished slides are drawn again

    def drawing(self) -> dict:
        """The settings the polygons were drawn with (what ``areas.csv`` records per slide)."""
        return {"threshold": float(self.threshold), "min_area_um2": float(self.min_area_um2),
                "simplify_px": float(self.simplify_px), "within_tissue": bool(self.within_tissue)}  # fmt: skip

    def check(self) -> None:
        if self.blend not in BLENDS:
            raise InputError(f"segment.blend={self.blend!r}: must be one of {', '.join(BLENDS)}")
        if not (is_number(self.threshold) and 0 < self.threshold < 1):
            raise InputError(f"segment.threshold={self.threshold!r}: must be a probability in (0, 1)")
        if not (is_number(self.min_area_um2) and self.min_area_um2 >= 0):
            raise InputError(f"segment.min_area_um2={self.min_area_um2!r}: must be a number of µm² >= 0")
        if not (is_number(self.simplify_px) and self.simplify_px >= 0):
            raise InputError(f"segment.simplify_px={self.simplify_px!r}: must be a number of px >= 0 (0: none)")
        tag = self.model_tag
        if tag is not None and not is_folder_name(tag):
            raise InputError(f"segment.model_tag={tag!r}: must be null (the run's name) or a folder name (no '/'), "
                             "e.g. segpath_uni2h")  # fmt: skip
        share = self.seam_check_share
        if not (is_number(share) and 0 < share <= 1):
            raise InputError(f"segment.seam_check_share={share!r}: must be in (0, 1] (1: every slide; "
                             "segment.seam_check=false: none)")  # fmt: skip
        for key in ("overlay", "seam_check", "within_tissue", "redraw"):
            if not isinstance(getattr(self, key), bool):
                raise InputError(f"segment.{key}={getattr(self, key)!r}: must be true or false")


def probabilities_forward(model, class_index: list[int]):
    """The tile function's forward: images in [0, 1] → B×C×H×W float16 probabilities on the host."""

    def forward(x: torch.Tensor) -> np.ndarray:
        return tile_probabilities(model, x, class_index).to(torch.float16).cpu().numpy()

    return forward


EDGE = 2  # mask px the tissue outline goes past the mask's edge where tissue touches it


def tissue_outline(grid):
    """The tissue as a level-0 (Multi)Polygon: the grid's thumbnail mask with its outline smoothed (as thumbnails
    draw it), grown by the smoothing width so that no tissue at its border is cut, and every piece of the mask
    itself (grown by one mask px); None without a mask."""
    from scipy.ndimage import distance_transform_edt
    from shapely import affinity

    from ..viz.thumbnails import outline_sigma, smooth_outline_mask

    if grid.mask is None or not grid.mask.any():
        return None
    sigma = outline_sigma(grid.mask)
    smooth = smooth_outline_mask(grid.mask, sigma)
    # the smoothing drops fragments and strands narrower than about sigma (1/150 of the slide), which the grid
    # still tiles when they hold tissue: clipped to the smoothed outline alone, their predictions were lost. Both
    # are grown in the raster and traced once: buffering the traced mask's every stair step (round joins) gave an
    # outline of ~70,000 vertices that each class's polygons took on where they were clipped (10 s, 20 MB GeoJSON)
    # (grown from the pixels' edges, as shapely's buffer of the traced mask was: half a px more than from centres)
    grown = (distance_transform_edt(~smooth) <= sigma + 0.5) | (distance_transform_edt(~grid.mask) <= 1.5)
    # tissue at the mask's edge grows past it (as the buffer did), so that simplifying cuts no corner of its pixels
    grown = np.pad(grown, EDGE, mode="edge")
    outline = mask_polygons(lambda y0, y1: grown[y0:y1], grown.shape[0], band=grown.shape[0], simplify=0.5)
    dx, dy = grid.mask_downsample
    outline = affinity.translate(qupath.valid_geometry(outline), -EDGE, -EDGE)
    level0 = affinity.scale(outline, dx, dy, origin=(0, 0))
    return affinity.translate(level0, *grid.mask_origin)


@dataclass(frozen=True)
class MapGeometry:
    """Where the probability map lies: QuPath's image of the slide (``qupath.image_region``: the whole slide, or
    the scanned region of a MIRAX or SCN slide, whose canvas can be several times larger and empty) at the tiles'
    scale. Its pixel grid is the whole slide's at that scale, cut at whole pixels (``offset``), so a tile lands
    where it would on a map of the whole slide."""

    scale: float  # map px per slide level-0 px
    shape: tuple[int, int]  # (H, W) map px
    offset: tuple[int, int]  # (x, y): the map's (0, 0) is map px (x, y) of the whole slide's map
    mpp: float  # µm per map px

    @classmethod
    def of(cls, grid, region: tuple[int, int, int, int]) -> MapGeometry:
        scale = grid.tile_size / grid.patch_size_level0
        x, y, w, h = region
        ox, oy = math.floor(x * scale), math.floor(y * scale)
        shape = (math.ceil((y + h) * scale) - oy, math.ceil((x + w) * scale) - ox)
        return cls(scale, shape, (ox, oy), grid.slide_mpp / scale)

    @property
    def level0_origin(self) -> tuple[float, float]:
        """Slide level-0 px of the map's (0, 0)."""
        return self.offset[0] / self.scale, self.offset[1] / self.scale

    def to_map(self, x: float, y: float) -> tuple[int, int]:
        """The map px of slide level-0 px (x, y), on the whole slide's pixel grid (a tile's corner)."""
        return round(x * self.scale) - self.offset[0], round(y * self.scale) - self.offset[1]


class ClosingSteps:
    """``step(name)`` after each step of closing a slide: its seconds go into ``seconds[name]`` (the slide's
    ``closing_seconds`` in summary.json). A large map's pyramid, TIFF and polygons can take minutes after the last
    tile: each step is then logged as it ends, and ``bar(name, total)`` shows a step's progress (its rows)."""

    def __init__(self, slide_id: str, shape: tuple[int, int, int], progress: bool = True):
        self.slide_id, self.seconds, self._bar = slide_id, {}, None
        large = shape[1] * shape[2] >= SAY_CLOSING_PX
        self.say, self.show = (log.info if large else log.debug), large and progress
        self.say("%s: closing its %d × %d × %d px probability map", slide_id, *shape)
        self.last = time.perf_counter()

    def bar(self, name: str, total: int):
        """The progress callback of the step ``name`` (told the rows done, of ``total``), until the step ends."""
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=f"{self.slide_id}: {name}", unit="row", leave=False, disable=not self.show)
        return self._bar.update

    def __call__(self, name: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now
        self.say("%s: %s in %.1f s", self.slide_id, name, self.seconds[name])


class _SlideDrawing:
    """What both sinks of a slide share: where its map lies, and its polygons drawn from the map."""

    def __init__(self, consumer: SegmentationConsumer, spec: SlideSpec, prepared: PreparedSlide, path: Path):
        self.c, self.spec, self.grid, self.path = consumer, spec, prepared.grid, path
        self.made_from = {"slide_bytes": prepared.slide_bytes, "slide_path": prepared.slide_path}
        self.region = prepared.qupath_region  # QuPath's image of the slide: the whole slide, or its crop
        self.origin = self.region[:2]
        self.map = MapGeometry.of(self.grid, self.region)
        self.prefix = f".{path.name}.{uuid.uuid4().hex[:8]}"  # the runner removes .<output>.*.tmp of dead writers

    def _result(self, drawn: tuple, steps: ClosingSteps) -> dict:
        _, areas, outline_mm2, geoms = drawn
        return {"map_shape": list(self.map.shape), "map_mpp": self.map.mpp, "qupath_origin": self.origin,
                "areas_mm2": areas, "tissue_outline_mm2": outline_mm2, "class_geoms": geoms,
                "closing_seconds": steps.seconds}  # fmt: skip

    def _features(self, rows, step: ClosingSteps) -> tuple[list[dict], dict, float | None, list]:
        """One QuPath annotation per class from the map (``rows(y0, y1)``: its rows y0:y1, C×rows×W uint8), the
        classes' areas (mm²), the area (mm²) of the tissue outline the polygons were clipped to (None when they
        were not: ``within_tissue=false`` or no tissue mask), and each class's geometry in slide level-0 px (None
        when empty; for the overlay)."""
        import shapely
        from shapely import affinity

        c, level0 = self.c, 1 / self.map.scale
        ox, oy = self.map.level0_origin
        cut = c.options.threshold * 255
        x, y, w, h = self.region  # nothing predicted outside QuPath's image of the slide is shown
        slide_box, outline_mm2 = shapely.box(x, y, x + w, y + h), None
        if c.options.within_tissue and (outline := tissue_outline(self.grid)) is not None:
            slide_box = slide_box.intersection(outline)
            outline_mm2 = float(slide_box.area) * self.grid.slide_mpp**2 / 1e6
        min_px = c.options.min_area_um2 / self.map.mpp**2
        min_level0_px = c.options.min_area_um2 / self.grid.slide_mpp**2
        features, areas, level0_geoms = [], {}, []
        # rows traced at once: the map is read once for every class, ≤ 128 MB a band (×4 px at 2× resolution)
        band = int(np.clip((1 << 27) // (self.map.shape[1] * len(c.classes)), 64, 1024))
        geoms = masks_polygons(lambda y0, y1: rows(y0, y1) > cut, self.map.shape[0], len(c.classes), band=band,
                               min_area=min_px, simplify=c.options.simplify_px,
                               progress=step.bar("polygons", self.map.shape[0]))  # fmt: skip
        for name, color, geom in zip(c.classes, class_colors(c.classes), geoms):
            area_um2 = 0.0
            if geom is not None:
                # an overlay of valid geometries is valid (GEOS's OverlayNG): no second check of thousands of
                # polygons here (``qupath.feature`` checks what it writes)
                geom = affinity.affine_transform(geom, [level0, 0, 0, level0, ox, oy])  # map px → level-0 px
                geom = qupath.polygonal(geom.intersection(slide_box))
                # the clipping cuts pieces off polygons at the outline: those under min_area are specks too
                parts = shapely.get_parts(geom)
                geom = shapely.multipolygons(parts[shapely.area(parts) >= min_level0_px])
                area_um2 = float(geom.area) * self.grid.slide_mpp**2
            areas[name] = area_um2 / 1e6
            level0_geoms.append(geom if geom is not None and not geom.is_empty else None)
            if level0_geoms[-1] is None:
                continue
            if geom.geom_type == "Polygon":
                geom = shapely.MultiPolygon([geom])
            features.append(qupath.feature(geom, "annotation", name, color,
                                           measurements={"Area µm^2": area_um2}, origin=self.origin))  # fmt: skip
        return features, areas, outline_mm2, level0_geoms

    def abort(self) -> None:
        for p in self.path.parent.iterdir():  # by name, not glob: the slide id may hold [ ] * ?
            if p.name.startswith(f"{self.prefix}.") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)


class SegmentationSink(_SlideDrawing):
    """One slide: tiles blended into the on-disk map; on close the TIFF, then the GeoJSON (atomically)."""

    def __init__(self, consumer: SegmentationConsumer, spec: SlideSpec, prepared: PreparedSlide, path: Path):
        super().__init__(consumer, spec, prepared, path)
        weights = blend_weights(self.grid.tile_size, self.grid.overlap, consumer.options.blend)
        try:
            positions = [self._map_xy(t) for t in range(len(self.grid))]
            self.stitcher = ProbabilityStitcher(path.parent, self.prefix, self.map.shape, len(consumer.classes),
                                                weights, positions=positions)  # fmt: skip
        except BaseException:  # no sink for the runner to abort (and no stitcher to clean): its temporaries go here
            _SlideDrawing.abort(self)
            raise
        self.levels: list = []
        self.tiles = 0

    def add(self, tiles: np.ndarray, output: np.ndarray, images: torch.Tensor) -> list[tuple[int, str]]:
        refused = []
        for i, t in enumerate(tiles):
            if not np.isfinite(output[i]).all():
                refused.append((int(t), "probabilities are not finite (NaN/inf; fp16 overflow? use bf16-mixed)"))
                continue
            self.stitcher.add(*self._map_xy(t), output[i])
            self.tiles += 1
        return refused

    def _map_xy(self, tile: int) -> tuple[int, int]:
        return self.map.to_map(*self.grid.coords[tile])

    def _temp(self, name: str) -> Path:
        return self.path.parent / f"{self.prefix}.{name}.tmp"

    def close(self) -> dict:
        from ..wsi.reader import SlideError

        if not self.tiles:
            self.abort()
            raise SlideError("no tile could be segmented")  # the runner adds why (its tiles' reasons)
        shape = (len(self.c.classes), *self.map.shape)
        step = ClosingSteps(self.spec.slide_id, shape, self.c.progress)
        c, probs = self.c, self.stitcher.finalize()
        c.tiles_segmented += self.tiles
        step("map")
        shapes = pyramid_shapes(shape)
        self.levels = pyramid(
            probs, self.path.parent / self.prefix, step.bar("pyramid", sum(s[1] for s in shapes[:-1]))
        )
        step("pyramid")
        g = self.grid
        # precision: which slides of a folder ran in bf16 (it is not the folder's identity; as in embedding h5 attrs)
        extra = {"level0_mpp": g.slide_mpp, "level0_scale": self.map.scale, "level0_size": list(g.level0_size),
                 "level0_origin": list(self.map.level0_origin), "model": c.tag,
                 "precision": c.tile_function.precision, **self.made_from}  # fmt: skip
        tif_tmp = self._temp("tif")
        written = step.bar("probability TIFF", sum(s[0] * s[1] for s in shapes))
        write_probs_tiff(tif_tmp, self.levels, c.classes, class_colors(c.classes), self.map.mpp, extra,
                         name=self.spec.slide_id, progress=written)  # fmt: skip
        step("probability TIFF")
        drawn = self._features(lambda y0, y1: probs[:, y0:y1], step)
        step("polygons")
        seams = self._seams(probs) if c.options.seam_check else None
        encode_s = seams["seconds"] if seams else 0.0  # the window's forward is the model's time, not writing
        os.replace(tif_tmp, c.probs_path(self.path))
        qupath.write_geojson(self.path, drawn[0])  # last: the slide counts as finished once it exists
        self.stitcher.cleanup()
        self._remove_levels()
        return {
            "tiles": self.tiles,
            "seams": seams,
            "encode_seconds": encode_s,
            **self._result(drawn, step),
        }

    def _seams(self, probs: np.ndarray) -> dict | None:
        """The seam measure on this slide: one tile-sized window where four of its tiles overlap, predicted in one
        forward, against the stitched map there (None when the slide has no 2×2 block of tiles)."""
        from ..wsi.tile_readers import SlideTileDataset
        from .seams import compare, seam_window

        g, t0 = self.grid, time.perf_counter()
        where = seam_window(g.coords, g.stride_level0, g.tissue_fraction, self.map.scale)
        if where is None or not self.c.seam_check_due():
            return None
        ds = SlideTileDataset(self.spec.path, np.array([where]), g.patch_size_level0, g.tile_size, level=g.read_level)
        try:
            image = ds[0]["image"][None]
        finally:
            ds.close()
        (_, out), *_ = self.c.tile_function(image)
        if out is None:  # out of memory on the one tile: no measure rather than no slide
            return None
        one = to_uint8(np.asarray(out[0], np.float32))  # quantised as the stitched map is
        mx, my = self.map.to_map(*where[:2])  # the window's part on the map (all of it unless QuPath crops)
        x0, y0 = max(mx, 0), max(my, 0)
        x1, y1 = min(mx + g.tile_size, self.map.shape[1]), min(my + g.tile_size, self.map.shape[0])
        if x1 <= x0 or y1 <= y0:
            return None
        measure = compare(np.asarray(probs[:, y0:y1, x0:x1]), one[:, y0 - my : y1 - my, x0 - mx : x1 - mx],
                          self.c.classes, self.c.options.threshold)  # fmt: skip
        return {"window_level0": [int(where[0]), int(where[1]), int(g.patch_size_level0)], **measure,
                "seconds": time.perf_counter() - t0}  # fmt: skip

    def _remove_levels(self) -> None:
        for arr in self.levels[1:]:
            Path(arr.filename).unlink(missing_ok=True)
        self.levels = []

    def abort(self) -> None:
        self.stitcher.cleanup()
        super().abort()


class RedrawSink(_SlideDrawing):
    """A slide whose probability TIFF an earlier run finished: its GeoJSON, overlay and areas drawn again from the
    TIFF with this run's drawing settings (``segment.redraw=true``; or the GeoJSON of a run stopped after the
    TIFF). No tile is read and the model does not run."""

    takes_tiles = False

    def add(self, tiles: np.ndarray, output: np.ndarray, images: torch.Tensor) -> list[tuple[int, str]]:
        raise RuntimeError("a slide drawn again from its probability TIFF takes no tiles")

    def close(self) -> dict:
        from ..wsi.reader import SlideError

        c, tif = self.c, self.c.probs_path(self.path)
        step = ClosingSteps(self.spec.slide_id, (len(c.classes), *self.map.shape), c.progress)
        try:
            made = read_description(tif)
            level0 = MapLevel(tif)
        except (OSError, ValueError, KeyError) as err:
            raise SlideError(f"{tif} cannot be read to draw the slide again ({err}); remove it to segment the "
                             "slide again") from err  # fmt: skip
        with level0:
            wanted = (len(c.classes), *self.map.shape)
            old_mpp = made.get("level0_mpp")
            # the mpp first: another one also gives the map another size, and the size would hide why
            if old_mpp is not None and not math.isclose(float(old_mpp), self.grid.slide_mpp, rel_tol=1e-6):
                raise SlideError(f"{tif} was made from the slide at {float(old_mpp):g} µm/px, but it is "
                                 f"read at {self.grid.slide_mpp:g} µm/px now; remove it to segment again")  # fmt: skip
            if made.get("classes") != list(c.classes) or level0.shape != wanted:
                raise SlideError(f"{tif} holds a {' × '.join(map(str, level0.shape))} map of {made.get('classes')}, "
                                 f"not the {' × '.join(map(str, wanted))} map of {list(c.classes)} this run makes; "
                                 "remove it to segment the slide again")  # fmt: skip
            step("map")
            drawn = self._features(level0.rows, step)
        step("polygons")
        qupath.write_geojson(self.path, drawn[0])
        log.info("%s: drawn again from %s (%s)", self.spec.slide_id, tif.name,
                 ", ".join(f"{k} {v}" for k, v in c.options.drawing().items()))  # fmt: skip
        return {"tiles": 0, "redrawn": True, "seams": None, **self._result(drawn, step)}


@dataclass
class SegmentationConsumer:
    """The segmentation model and its outputs, plugged into :func:`hirespath.slides.run_slides`."""

    seg: SegmentationCheckpoint
    tile_function: TileModel
    options: SegmentOptions
    folder: str = ""
    identity: dict = field(default_factory=dict)
    overwrite_hint: str = SlideJob.OVERWRITE
    needs_thumbnail: bool = True
    progress: bool = True  # a large map's closing steps as progress bars
    reuse_maps: bool = True  # a slide with a finished probability TIFF is drawn from it (False: embed.overwrite)
    outputs_since: OutputsSince | None = None  # set by the runner: a TIFF older than its slide's mark is stale
    tables = (AREAS, SEAMS)  # the ledger tables it writes besides timings.csv (a class attribute, not a field)
    redraw_keys: tuple = DRAWING  # identity keys a redraw may change (slides.runner)
    redraw_hint: str = REDRAW
    tiles_segmented: int = field(default=0, init=False)  # by this worker, in this run
    seam_checks: int = field(default=0, init=False)
    _drawn: dict = field(default_factory=dict, init=False, repr=False)  # areas.csv's drawing per slide, cached

    @property
    def redraw(self) -> bool:
        return self.options.redraw

    def seam_check_due(self) -> bool:
        """Whether the slide just segmented gets the seam check (one extra forward): while this worker's checks stay
        within ``seam_check_share`` of its tile forwards. Large slides are all checked; of small biopsies, one in
        a few (4-tile slides at 0.05: every 5th, where checking each would add 25 %)."""
        if self.seam_checks + 1 > self.options.seam_check_share * self.tiles_segmented + 1e-9:
            return False
        self.seam_checks += 1
        return True

    @property
    def classes(self) -> list[str]:
        return self.seg.classes

    @property
    def tag(self) -> str:
        return self.options.model_tag or self.seg.tag

    def output_path(self, out_dir: Path, spec: SlideSpec) -> Path:
        return out_dir / f"{spec.slide_id}.geojson"

    def files_of(self, out_dir: Path, spec: SlideSpec) -> list[Path]:
        """Besides the GeoJSON (whose temporaries' names the TIFF's share): the overlay."""
        return [self.overlay_path(out_dir, spec.slide_id)]

    @staticmethod
    def overlay_path(out_dir: Path, slide_id: str) -> Path:
        return out_dir / f"{slide_id}_overlay.png"

    @staticmethod
    def probs_path(output: Path) -> Path:
        return output.with_name(output.name.removesuffix(".geojson") + "_probs.tif")

    def is_finished(self, path: Path) -> bool:
        """The GeoJSON and the TIFF are there, and areas.csv says the slide was drawn with this run's settings."""
        return path.is_file() and self.probs_path(path).is_file() and self.drawn_as_asked(path)

    def drawn_as_asked(self, path: Path) -> bool:
        """Whether ``areas.csv`` records the slide of ``path`` drawn with this run's drawing settings. A slide
        without rows there stopped before they were written, and one drawn otherwise is left from a redraw that
        stopped: both are drawn (again) from their TIFF."""
        drawn = self._drawn_rows(path)
        return drawn is not None and all(k in drawn and _same_setting(drawn[k], v)
                                         for k, v in self.options.drawing().items())  # fmt: skip

    def _drawn_rows(self, path: Path) -> dict | None:
        """The drawing settings ``areas.csv`` records for the slide of ``path``, None when it has no rows there."""
        table = Path(path.parent) / AREAS
        try:
            st = table.stat()
        except FileNotFoundError:
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._drawn.get("key") != key:  # read once per change, not once per slide
            rows = Ledger(path.parent).table(AREAS)
            columns = [k for k in DRAWING if k in rows.columns]
            first = rows.drop_duplicates("slide").set_index("slide")[columns]
            self._drawn = {"key": key, "slides": first.to_dict("index")}
        return self._drawn["slides"].get(path.name.removesuffix(".geojson"))

    def finished_mpp(self, path: Path) -> float | None:
        try:
            return float(read_description(self.probs_path(path))["level0_mpp"])
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def made_from(self, path: Path) -> dict | None:
        """The slide file the map of ``path`` was made from (the runner's rescan check for a slide without a
        timings.csv row: a redraw writes none)."""
        probs = self.probs_path(path)
        return recorded_slide(lambda: read_description(probs), probs)

    def open(self, spec: SlideSpec, prepared: PreparedSlide, path: Path) -> SegmentationSink | RedrawSink:
        # the map is finished (and made with the folder's settings): only its drawing is not
        since = self.outputs_since.of(spec.slide_id) if self.outputs_since is not None else None
        redraw = self.reuse_maps and is_newer(self.probs_path(path), since)
        if self._drawn_rows(path) is not None:
            # the rows of the drawing (and map) this one replaces go first: a run stopped between the new files and
            # their rows would otherwise leave the old areas marking the slide finished (an overwrite's old model)
            ledger = Ledger(path.parent)
            ledger.drop_rows(AREAS, [spec.slide_id])
            if not redraw:
                ledger.drop_rows(SEAMS, [spec.slide_id])
        return RedrawSink(self, spec, prepared, path) if redraw else SegmentationSink(self, spec, prepared, path)

    def run_facts(self, done: list[dict]) -> dict:
        """The seam measure over this worker's slides (each slide's is in ``done`` and seams.csv), and the drawing
        settings its polygons were made with (a redraw's differ from the run's before it)."""
        return {**seam_facts(done, self.options), "drawing": self.options.drawing()}

    def finish(self, spec: SlideSpec, prepared: PreparedSlide, result: dict, out_dir: Path) -> None:
        geoms, areas = result.pop("class_geoms", None), result.get("areas_mm2", {})
        # the fractions' tissue: the outline the polygons were clipped to (the mask smoothed and grown by its
        # smoothing width, so that no border tissue is cut), else the tissue mask: a class never covers > 100 %
        tissue = result.get("tissue_outline_mm2") or prepared.grid.tissue_area_mm2
        rows = [{"slide": spec.slide_id, "class": name, "area_mm2": a, "tissue_mm2": tissue,
                 "fraction_of_tissue": a / tissue if tissue and np.isfinite(tissue) else np.nan,
                 **self.options.drawing()}
                for name, a in areas.items()]  # fmt: skip
        ledger = Ledger(out_dir)
        seams = result.get("seams")
        if seams is not None:
            x, y, size = seams["window_level0"]
            row = {
                "slide": spec.slide_id,
                "window_x": x,
                "window_y": y,
                "window_level0_px": size,
                "blend": self.options.blend,
                "threshold": float(self.options.threshold),
                "mean_dice": seams["mean_dice"],
                "mean_abs_diff": seams["mean_abs_diff"],
                **{f"dice_{k}": v for k, v in seams["dice"].items()},
            }
            ledger.merge_rows(SEAMS, [row], [*SEAM_COLUMNS, *(f"dice_{k}" for k in self.classes)],
                              sort_by=["slide"])  # fmt: skip
        grid = prepared.grid
        if self.options.overlay and geoms is not None and grid.thumbnail is not None:
            from ..viz.segmentation import polygon_coverage, save_overlay

            thumbnail, bounds = _map_part(grid, MapGeometry.of(grid, prepared.qupath_region))  # QuPath's image

            # each class as much as its polygons cover a pixel: cells smaller than a pixel of the picture show;
            # filled at the size the picture is shown with
            def coverage(size: tuple[int, int]) -> list[np.ndarray]:
                return [polygon_coverage(g, size, bounds) for g in geoms]

            colors = class_colors(self.classes)
            title = (f"{spec.slide_id}: {self.tag}, {grid.tile_size} px tiles at {grid.tile_mpp:g} µm/px, "
                     f"overlap {grid.overlap} px ({self.options.blend})")  # fmt: skip
            save_overlay(self.overlay_path(out_dir, spec.slide_id), thumbnail, coverage, self.classes, colors, title,
                         [areas.get(n, 0.0) for n in self.classes])  # fmt: skip
        # last: the slide's rows mark it finished (is_finished), so a run stopped before them draws it again
        ledger.merge_rows(AREAS, rows, AREA_COLUMNS, sort_by=["slide", "class"])  # workers share it


def _same_setting(recorded, value) -> bool:
    """A drawing setting as areas.csv records it (a float, or a bool as pandas reads it back) equals ``value``."""
    if isinstance(value, bool):
        return str(recorded).strip().lower() in (("true", "1", "1.0") if value else ("false", "0", "0.0"))
    try:
        return math.isclose(float(recorded), float(value), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def _map_part(grid, geometry: MapGeometry) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The part of the slide's thumbnail the probability map covers (about all of it: both show QuPath's image of
    the slide, the map out to its whole pixels), and the level-0 box (x0, y0, x1, y1) of that part."""
    th, tw = grid.thumbnail.shape[:2]
    (dx, dy), (mx, my) = grid.mask_downsample, grid.mask_origin
    (x0, y0), (H, W) = geometry.level0_origin, geometry.shape
    x0, y0 = (x0 - mx) / dx, (y0 - my) / dy  # thumbnail px
    x1, y1 = x0 + W / geometry.scale / dx, y0 + H / geometry.scale / dy
    cols = slice(max(0, round(x0)), max(round(x0) + 1, min(tw, round(x1))))
    rows = slice(max(0, round(y0)), max(round(y0) + 1, min(th, round(y1))))
    box = (mx + cols.start * dx, my + rows.start * dy, mx + cols.stop * dx, my + rows.stop * dy)
    return grid.thumbnail[rows, cols], box


EAGER_WARN_GB = 1.0  # eager attention matrices per tile above this are warned about


def check_tiling_for_model(seg: SegmentationCheckpoint, tiling) -> None:
    """The tile size the model can take (a multiple of its patch size), before any slide is opened; eager attention
    whose matrices would be large at that size is warned about."""
    from ..wsi.tissue import check_tile_multiple, check_tiling

    size, p = int(tiling.size), seg.patch_size
    check_tiling(
        size,
        float(tiling.mpp),
        int(tiling.overlap),
        float(tiling.min_tissue),
        getattr(tiling, "tissue_threshold", None),
    )
    check_tile_multiple(size, p, "the model's", seg.ckpt.name)
    embed = seg.model.encoder.vit.patch_embed  # a ViT built with dynamic_img_size=false takes one size only
    if getattr(embed, "strict_img_size", False) and tuple(embed.img_size) != (size, size):
        fixed = tuple(embed.img_size)
        raise InputError(f"tile.size={size}: the model's backbone takes {fixed} px images only (it was trained "
                         f"with dynamic_img_size=false, {seg.ckpt.name}); use tile.size={fixed[0]}, or train with "
                         "dynamic_img_size=true (the presets' default)")  # fmt: skip
    if seg.attention["mode"] == "eager":  # the paper's "vanilla": its L × L matrices grow with the tile's side⁴
        from ..models.attention import eager_matrix_bytes

        enc = seg.model.encoder
        tokens = (size // p) ** 2 + enc.num_prefix_tokens
        gb = eager_matrix_bytes(enc.vit.blocks[0].attn.num_heads, tokens, 4) / 1e9  # fp32
        if gb > EAGER_WARN_GB:
            log.warning("attention eager at tile.size=%d holds %.3g GB of attention matrices per tile; "
                        "attention.mode=dense computes the same attention in memory linear in the tokens",
                        size, gb)  # fmt: skip


def segment_slides(seg: SegmentationCheckpoint, slides, job_dir, tiling, reading, options: SegmentOptions,
                   runtime: Runtime | None = None, *, default_mpp: float | None = None) -> dict:  # fmt: skip
    """Segment every slide of ``slides`` with ``seg``; returns the runner's summary (``output_dir``: the folder).

    ``tiling``: size, mpp (None: the model's), overlap, min_tissue, cover_tissue (default true: every tissue pixel
    is segmented, not only the ``min_tissue`` tiles'); ``reading``: the embed node's batch_size,
    num_workers, reader, threads, lock_stale_hours, overwrite."""
    from ..configs import TilingConfig

    options.check()
    if options.redraw and bool(getattr(reading, "overwrite", False)):
        raise InputError(
            "segment.redraw=true draws finished slides again from their probability TIFFs, "
            f"{SlideJob.OVERWRITE} segments every slide again with the model: pass one of them"
        )
    mpp = seg.mpp if tiling.mpp is None else float(tiling.mpp)
    if not math.isclose(mpp, seg.mpp, rel_tol=0.01):
        log.warning("tile.mpp=%g but the model was trained at %.4g µm/px (%s): cells will look %.2f× %s than in "
                    "training", mpp, seg.mpp, seg.ckpt.name, seg.mpp / mpp,
                    "larger" if mpp < seg.mpp else "smaller")  # fmt: skip
    tiling = TilingConfig(size=int(tiling.size), mpp=mpp, overlap=int(tiling.overlap),
                          min_tissue=float(tiling.min_tissue),
                          cover_tissue=bool(getattr(tiling, "cover_tissue", True)),
                          tissue_threshold=getattr(tiling, "tissue_threshold", None))  # fmt: skip
    check_tiling_for_model(seg, tiling)
    runtime = (runtime or Runtime()).resolve()
    job = SlideJob.from_settings(job_dir, tiling, reading, default_mpp)
    tile_fn = TileModel(seg.model, runtime.device, runtime.precision, job.batch_size,
                        forward=probabilities_forward(seg.model, seg.class_index))  # fmt: skip
    consumer = SegmentationConsumer(seg, tile_fn, options, progress=runtime.progress, reuse_maps=not job.overwrite)
    consumer.folder = f"segmentation_{consumer.tag}"
    consumer.identity = {
        "model": consumer.tag, "run": seg.run_dir.name, "checkpoint": seg.ckpt.name,
        "checkpoint_bytes": seg.ckpt.stat().st_size if seg.ckpt.is_file() else None,
        "checkpoint_digest": file_digest(seg.ckpt) if seg.ckpt.is_file() else None,  # retrained under one name
        "classes": list(seg.classes), "model_mpp": seg.mpp, "attention": attention_tag(seg.attention),
        "blend": options.blend, **options.drawing(),
    }  # fmt: skip
    _record_old_drawing(job.tiling_dir / consumer.folder, options)
    summary = run_slides(slides, job, consumer, runtime)
    summary.update(model=consumer.tag, precision=tile_fn.precision, tile_mpp=mpp, model_mpp=seg.mpp,
                   classes=list(seg.classes), attention=seg.attention)  # fmt: skip
    return summary


def _record_old_drawing(folder: Path, options: SegmentOptions) -> None:
    """areas.csv of an older version has no drawing columns: its slides were drawn with the folder's config.json
    settings (``within_tissue``, not recorded then, as asked now), written into its rows before any redraw changes
    config.json."""
    from ..slides.ledger import CONFIG

    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return
    Ledger(folder).add_missing_columns(AREAS, {**options.drawing(), **{k: config[k] for k in DRAWING if k in config}})


def seam_facts(done: list[dict], options: SegmentOptions) -> dict:
    """``{"seams": ...}``: the seam measure over the slides of ``done`` (a worker's, or a DDP run's merged) that
    were measured, or None."""
    measured = [d["seams"] for d in done if d.get("seams")]
    if not measured:
        return {"seams": None}
    dice = [m["mean_dice"] for m in measured if np.isfinite(m["mean_dice"])]
    return {"seams": {"slides": len(measured), "of_slides": len(done), "share": options.seam_check_share,
                      "blend": options.blend, "threshold": options.threshold,
                      "mean_dice": float(np.mean(dice)) if dice else None,
                      "mean_abs_diff": float(np.mean([m["mean_abs_diff"] for m in measured]))}}  # fmt: skip

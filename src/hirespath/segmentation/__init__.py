"""Whole-slide segmentation with a trained ``hirespath segment`` model (``hirespath segment_slides``).

``model``: the model rebuilt from a checkpoint and its run's config; ``stitch``: overlapping tiles blended into
on-disk probability maps; ``polygons``: masks → valid MultiPolygons with holes; ``probs_tiff``: the pyramidal
probability TIFF; ``consumer``: all of it as a slide-runner consumer (the overlay picture: ``viz.segmentation``).
"""

from .consumer import CLASS_COLORS, SegmentationConsumer, SegmentOptions, segment_slides
from .model import SegmentationCheckpoint, load_segmentation, tile_probabilities

__all__ = ["CLASS_COLORS", "SegmentOptions", "SegmentationCheckpoint", "SegmentationConsumer", "load_segmentation",
           "segment_slides", "tile_probabilities"]  # fmt: skip

"""The slide job runner: one loop that every whole-slide task runs on.

A slide task is a *consumer* (:class:`~hirespath.slides.runner.SlideConsumer`): a tile function (the encoder for
embedding; the segmentation model) and a sink per slide that writes the results (TRIDENT h5 features; the
probability pyramid, GeoJSON and overlay). :func:`~hirespath.slides.runner.run_slides` does the rest for all of them:
list → order by rank → check the output folder's identity → skip finished slides → take the per-slide lock →
prepare the tissue grid (the next slide's in a background thread) → stream tile batches from the readers → tile
function (batches halved on out-of-memory) → sink → ledger (``skipped.csv``, ``timings.csv``, ``summary.json`` of
the output folder), with per-stage wall times.

Modules: ``runner`` (the loop, :class:`Runtime`, :class:`SlideJob`), ``tile_model`` (precision, device copies,
out-of-memory halving around any model), ``prepare`` (the tissue grid of a slide, reusing the tiling's patches
file), ``ledger`` (the output folder's shared files), ``provenance`` (which slide file the outputs were made from:
rescans, clashes), ``leftovers`` (what killed writers left), ``write_behind`` (writing and closing in threads while
the device runs), ``summary`` (a run's summary from its workers'), ``launch`` (the workers of a task), ``stages``
(the stage table).
"""

from .ledger import Ledger
from .prepare import PreparedSlide
from .runner import Runtime, SlideConsumer, SlideJob, SlideSink, run_slides
from .stages import BACKGROUND, STAGES
from .tile_model import TileModel, resolve_precision

__all__ = [
    "BACKGROUND",
    "STAGES",
    "Ledger",
    "PreparedSlide",
    "Runtime",
    "SlideConsumer",
    "SlideJob",
    "SlideSink",
    "TileModel",
    "resolve_precision",
    "run_slides",
]

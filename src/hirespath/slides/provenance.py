"""Which slide file a folder's outputs were made from, and whether the listed one is it.

Each timings.csv row, patches file, h5 and probability TIFF records its slide file (:func:`path_to_record`: made
absolute, in UTF-8) and size (:func:`slide_bytes`). At a run's start :func:`replaced_slides` compares the listed
files with them: a slide rescanned under its name is made again, another cohort's slide under a finished slide's id
is refused (a clash), and the same file reached by another path (a copied cohort, a remount) stays finished.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ..wsi.listing import SlideSpec, dicom_files
from .ledger import IdentityMismatch, Ledger

log = logging.getLogger("hirespath.slides")

# the files of a MIRAX slide's folder (not a Finder copy's .DS_Store or ._Data0000.dat, Windows' Thumbs.db)
MIRAX_DATA = re.compile(r"(?i)(slidedat\.ini|index\.dat|data\d+\.dat)")


def path_to_record(path) -> str:
    """The slide file as its outputs record it: the path the run was given, made absolute (links are not
    resolved: a link pointed at a new export is a rescan of the slide it names), in UTF-8 (:func:`utf8_path`)."""
    return utf8_path(os.path.abspath(path))


def utf8_path(path) -> str:
    """``path`` as text that CSV files and h5 attributes take (UTF-8 only): a name that is not UTF-8 (its
    undecodable bytes are surrogates in Python) with those bytes escaped as ``\\xNN``; :func:`recorded_path` reads
    it back."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def recorded_path(text: str) -> Path:
    """The file a :func:`utf8_path` text names (a literal backslash in a name reads as an escape: POSIX names
    rarely hold one)."""
    if "\\" not in text:
        return Path(text)
    return Path(os.fsdecode(codecs.escape_decode(text.encode("utf-8"))[0]))


def slide_bytes(path: Path) -> int:
    """The size of a slide's file (a folder's: its files'), recorded with its grid: a slide replaced by another
    scan under the same name (a rescan, a re-export) has another size, whatever its pixel size."""
    if path.is_dir():  # DICOM: a folder of instances
        files = dicom_files(path)
    elif path.suffix.lower() == ".mrxs":  # its index; the images are in the folder of its name
        data = path.with_suffix("")
        files = [path, *(p for p in data.iterdir() if MIRAX_DATA.fullmatch(p.name))] if data.is_dir() else [path]
    else:
        files = [path]
    return sum(p.stat().st_size for p in files)


# a row's output_ns (the output's st_mtime_ns when the row was written; a CSV float, exact to 256 ns) is the file's
# while the two differ by less than this
SAME_OUTPUT_NS = 1000


def recorded_slide(read: Callable[[], dict], path: Path) -> dict | None:
    """The slide file an output records (``slide_bytes``, ``slide_path``) from ``read()``, the output's attributes
    (an h5's coords attrs, a TIFF's description); None when it records none (made before they were recorded) or is
    not there (not made yet). An output that cannot be read is named in a warning: its rescan is not noticed."""
    try:
        attrs = read()
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 — a corrupt output (broken OME-XML, h5) records nothing
        log.warning("%s: cannot read which slide file it was made from (%s); not checked for a rescan", path, err)
        return None
    if attrs.get("slide_bytes") is None:
        return None
    return {"slide_bytes": int(attrs["slide_bytes"]), "slide_path": attrs.get("slide_path")}


def check_finished_mpp(consumer, path: Path, spec: SlideSpec, how: str) -> None:
    """A finished slide was made at the mpp this run would use (an explicit ``mpp`` column value)."""
    if spec.mpp is None:
        return
    old = consumer.finished_mpp(path)
    if old is not None and not np.isclose(old, float(spec.mpp), rtol=1e-6):
        raise IdentityMismatch(
            f"{path} was made from {spec.slide_id} at {old:g} µm/px, but the slide list now gives mpp "
            f"{float(spec.mpp):g}. Use a new job_dir" + (f", or {how} to replace it" if how else "")
        )


def replaced_slides(
    specs: list[SlideSpec],
    ledger: Ledger,
    how: str,
    finished: Callable[[str], bool],
    recorded: Callable[[str], dict | None] | None = None,
    written: Callable[[str], int | None] | None = None,
) -> tuple[list[SlideSpec], dict[str, str], dict[str, int]]:
    """(replaced, clashes, moved) among the listed slides with a timings.csv row (``slide_bytes``, ``slide_path``; rows
    without them, from before they were recorded, are trusted).

    Replaced: the file has another size than the one the outputs were made from (a rescan or re-export under the
    same name, or a moved cohort rescanned since): its outputs are another image's, and are made again.
    Clashes, {slide id: why}: the outputs were made from another file that is still there as it was, and this one
    differs from it (two cohorts whose slides share names in one folder); not processed while those outputs are
    finished: they would be replaced by another slide's. The same file reached by another path (a copied cohort, a
    remount) stays finished.

    A slide without a timings.csv row (a run stopped between its outputs and its row; a redraw writes none) is
    judged by what its outputs record (``recorded(slide)``: the consumer's ``slide_bytes``/``slide_path``), and so
    is one whose row was written for another output than the one there now (``written(slide)``: the output's
    ``st_mtime_ns``, against the row's ``output_ns``): an overwrite stopped between the new output and its row.
    Moved, {slide id: ns}: rows whose output records what the row does, with another time (a copied job_dir, a
    redrawn GeoJSON): their ``output_ns`` to write, so that the output is read once."""
    if not specs:
        return [], {}, {}
    table = ledger.timings()
    with_rows = set(table.slide.astype(str))
    for column in ("slide_bytes", "slide_path", "output_ns"):
        if column not in table.columns:
            table[column] = np.nan
    table = table.assign(
        slide_bytes=pd.to_numeric(table["slide_bytes"], errors="coerce"),
        output_ns=pd.to_numeric(table["output_ns"], errors="coerce"),
    ).dropna(subset="slide_bytes")
    rows = table.drop_duplicates("slide", keep="last").set_index("slide")[["slide_bytes", "slide_path", "output_ns"]]
    replaced, clashes, moved = [], {}, {}
    for spec in specs:
        if spec.slide_id in rows.index:
            then, source = rows.at[spec.slide_id, "slide_bytes"], rows.at[spec.slide_id, "slide_path"]
            row_ns = rows.at[spec.slide_id, "output_ns"]
            if (
                recorded is not None and written is not None and np.isfinite(row_ns)
                and (ns := written(spec.slide_id)) is not None and abs(ns - row_ns) >= SAME_OUTPUT_NS
                and (facts := recorded(spec.slide_id)) and facts.get("slide_bytes") is not None
            ):  # fmt: skip
                if int(facts["slide_bytes"]) == int(then) and facts.get("slide_path") == source:
                    moved[spec.slide_id] = ns  # the row's output, its time changed (a copy, a redraw)
                then, source = facts["slide_bytes"], facts.get("slide_path")
        elif spec.slide_id not in with_rows and recorded is not None and (facts := recorded(spec.slide_id)):
            then, source = facts.get("slide_bytes"), facts.get("slide_path")
            if then is None:
                continue
        else:
            continue  # rows of an earlier version, without the size: trusted
        try:
            now = slide_bytes(spec.path)
        except OSError:
            continue  # not there: the run names it when it reads the slide (not at all: it is finished)
        then = int(then)
        if isinstance(source, str) and source and source != path_to_record(spec.path):
            original = recorded_path(source)
            if _still_there(original, then) and not (now == then and _same_start(original, spec.path)):
                if finished(spec.slide_id):
                    clashes[spec.slide_id] = (
                        f"slide id {spec.slide_id!r} is taken in {ledger.folder}: its outputs were made from "
                        f"{source} ({then} bytes), and {spec.path} ({now} bytes) is another file. Slide ids must "
                        f"be unique in a job_dir: give this cohort its own job_dir or rename the slide (or, if it is "
                        f"a rescan of the same slide, {how} slides=<a list of it> replaces its outputs)"
                    )
                continue
        if now != then:
            log.warning("%s was replaced since its outputs were made (%d bytes then, %d now): processing it again",
                        spec.path, then, now)  # fmt: skip
            replaced.append(spec)
    return replaced, clashes, moved


def output_ns(path: Path) -> int | None:
    """When ``path`` was last written (``st_mtime_ns``), None when it is not there."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _still_there(path: Path, nbytes: int) -> bool:
    """The file a slide's outputs were made from is still there, as it was (the same size)."""
    try:
        return slide_bytes(path) == nbytes
    except OSError:
        return False


def _same_start(a, b, nbytes: int = 1 << 16) -> bool:
    """Two slide files of one size begin with the same bytes (a copy): two scans differ in their headers (TIFF tags,
    dates, ImageDescription) and first tiles. Folders (DICOM) are compared by size alone."""
    a, b = Path(a), Path(b)
    if not (a.is_file() and b.is_file()):
        return True
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read(nbytes) == fb.read(nbytes)
    except OSError:
        return True


def is_newer(path: Path, since: int | None) -> bool:
    """``path`` exists and was written at or after ``since`` (ns, as ``Ledger.outputs_since``; None: any time)."""
    try:
        return path.stat().st_mtime_ns >= (since or 0)
    except FileNotFoundError:
        return False

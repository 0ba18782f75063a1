"""Which slides a run processes: a folder of slide files or a CSV list (TRIDENT's ``--custom_list_of_wsis``),
with an optional per-slide ``mpp`` column; each slide's id is its file stem (the output files' names), or for a DICOM
slide the name of its folder."""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..utils.errors import InputError
from ..utils.io import read_csv_ids

log = logging.getLogger("hirespath.slides")

# What OpenSlide (and tiffslide) open as one file. DICOM is not among them: a DICOM slide is a series of .dcm files
# (one or more per level, plus label and overview) kept in one folder, as IDC downloads and wsidicomizer lay them
# out, so the folder is the slide (globbing the files would list each level as a slide).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
COMPOUND_EXTENSIONS = (".ome.tiff", ".ome.tif")
ID_COLUMN = "slide_id"  # a CSV column naming a slide's outputs (else the file stem, or a DICOM folder's name)
DICOM_SUFFIX = ".dcm"


@dataclass(frozen=True)
class SlideSpec:
    """One slide to process: id (file stem, the output file names), path (a file, or a DICOM series' folder), and an
    mpp overriding the slide's."""

    slide_id: str
    path: Path
    mpp: float | None = None


def is_dicom_file(path: Path) -> bool:
    """A .dcm file, or a file named as PACS and DICOMweb exports name them (no extension, or a UID's last number:
    ``1.2.840.10008.5``) that starts as DICOM files do (``DICM`` after the 128-byte preamble)."""
    suffix = path.suffix.lower()
    if suffix == DICOM_SUFFIX:
        return not path.name.startswith(".") and path.is_file()
    if (suffix and not suffix[1:].isdigit()) or path.name.startswith(".") or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly in ``folder`` (:func:`is_dicom_file`), sorted (none if it is not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_dicom_file(p))


def slide_id_of(path: str | os.PathLike) -> str:
    """File name without its extension; ``x.ome.tiff`` → ``x`` (TRIDENT's compound-extension rule); a DICOM slide
    (its folder, or one of its DICOM files) → the folder's name, whole (series UIDs are full of dots)."""
    path = Path(path)
    if is_dicom_file(path):
        path = path.parent
    if path.is_dir():
        return path.name
    name = path.name
    for ext in COMPOUND_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _check_unique(specs: list[SlideSpec]) -> list[SlideSpec]:
    seen: dict[str, Path] = {}
    for s in specs:
        if s.slide_id in seen and os.path.abspath(seen[s.slide_id]) == os.path.abspath(s.path):
            raise InputError(f"{s.path} is listed twice; list each slide once")
        if s.slide_id in seen:
            raise InputError(
                f"two slides have the id {s.slide_id!r} (it names the output files): {seen[s.slide_id]} and "
                f"{s.path}; rename one, list only one of them, or give them ids in a slides= CSV column 'slide_id'"
            )
        seen[s.slide_id] = s.path
    return specs


def check_slide_id(value, where: str) -> str:
    """A slide id (the CSV's ``slide_id`` column, a label table's): it names the output files, so one file name,
    not hidden."""
    slide_id = str(value).strip()
    if not slide_id or slide_id.startswith(".") or re.search(r"[/\\\x00-\x1f]", slide_id):
        raise InputError(
            f"{where}: slide_id {slide_id!r} cannot name the output files (<slide_id>.h5, .geojson): give a name "
            "without '/', '\\' or control characters that does not start with '.' (e.g. a TCGA barcode)"
        )
    return slide_id


def _parse_mpp(value, where: str) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    try:
        mpp = float(value)
    except ValueError:
        mpp = float("nan")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise InputError(f"{where}: mpp {value!r} is not a positive number of microns per pixel (e.g. 0.25, 0.5)")
    from .reader import PLAUSIBLE_MPP, plausible_mpp  # (reader imports this module)

    lo, hi = PLAUSIBLE_MPP
    if not plausible_mpp(mpp):  # (a value inside that still interpolates a tile > 16x is caught per slide: prepare.py)
        hint = ": a magnification is not an mpp" if mpp >= hi else ""
        raise InputError(f"{where}: mpp {value!r} is not a scan's microns per pixel (between {lo:g} and {hi:g}; a "
                         f"40x scan ≈ 0.25, 20x ≈ 0.5{hint})")  # fmt: skip
    return mpp


def slide_extensions(value, key: str = "wsi_ext") -> tuple[str, ...] | None:
    """The file extensions a user gave (``wsi_ext=[.svs,.ndpi]``, or one as a string; the dot and case optional),
    as lower-case ``.ext``; None for None (the default: :data:`SLIDE_EXTENSIONS` and DICOM folders)."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
    hint = f"give e.g. {key}=[.svs,.ndpi] ({DICOM_SUFFIX}: folders of DICOM files; .png, .jpg: exported regions)"
    if not values:
        raise InputError(f"{key}={value!r}: {hint}")
    exts = []
    for v in values:
        ext = str(v).strip().lower() if isinstance(v, str) else ""
        ext = ext if ext.startswith(".") else f".{ext}"
        if not re.fullmatch(r"\.[a-z0-9][a-z0-9._-]*", ext):
            raise InputError(f"{key}: {v!r} is not a file extension; {hint}")
        exts.append(ext)
    return tuple(dict.fromkeys(exts))


# the columns a slide list may have (TRIDENT's custom list: wsi, mpp), matched whatever their case and spaces
LIST_COLUMNS = ("wsi", "path", "mpp", ID_COLUMN)


def _refuse_twins(slides_csv: Path, header: list[str]) -> None:
    """Two columns of the header that would both be read as one of :data:`LIST_COLUMNS` (``mpp`` and ``MPP``)."""
    for name in LIST_COLUMNS:
        if len(twins := [c for c in header if c.strip().lower() == name]) > 1:
            raise InputError(f"{slides_csv}: the columns {twins} are all read as {name!r}; keep one")


def _list_columns(slides_csv: Path, header) -> dict:
    """{column as written: the name it is read as}: ``" mpp"`` (a space after a comma) and ``MPP`` are ``mpp``. A
    column that is not read is named in a warning (a misspelt ``mpp`` would leave every slide at its metadata's)."""
    names = {c: (str(c).strip().lower() if str(c).strip().lower() in LIST_COLUMNS else c) for c in header}
    if unread := [c for c, n in names.items() if n not in LIST_COLUMNS]:
        log.warning("%s: the columns %s are not read (a slide list has 'wsi' or 'path', and optionally 'mpp' and "
                    "'%s')", slides_csv, unread, ID_COLUMN)  # fmt: skip
    return names


def list_slides(
    wsi_dir: str | os.PathLike | None = None,
    slides_csv: str | os.PathLike | None = None,
    extensions=None,
    recursive: bool = False,
    exclude: str | os.PathLike | None = None,
) -> list[SlideSpec]:
    """The slides of ``wsi_dir`` (files with one of ``extensions``, sorted) or of a CSV list.

    ``recursive`` goes into sub-folders, symlinked ones too (a cohort linked together from several disks), never
    into ``exclude`` (the run's ``job_dir``: its probability TIFFs are not slides). A symlink whose target is gone
    (storage not mounted) is listed: the engine skips it as a missing file, in skipped.csv.

    A DICOM slide is a folder holding its series' DICOM files (:func:`is_dicom_file`): each sub-folder of
    ``wsi_dir`` that holds them is one slide named after the folder (with ``recursive``, every such folder of the
    tree: IDC's collection/patient/study/series layout), and so is ``wsi_dir`` itself when it holds them.
    ``extensions`` (:func:`slide_extensions`, TRIDENT's ``--wsi_ext``): only files with these, and DICOM folders
    only when ``.dcm`` is among them; None: :data:`SLIDE_EXTENSIONS` and DICOM folders. A CSV's files are taken
    whatever their extension.

    The CSV (TRIDENT's ``--custom_list_of_wsis``) has a column ``wsi`` or ``path`` (a slide file, or a DICOM slide's
    folder or one of its files), relative to ``wsi_dir`` when given (else to the CSV's folder), optionally ``mpp``
    overriding the slide's own microns per pixel (empty cells keep it) and ``slide_id`` naming its outputs (empty
    cells: the file stem, or the DICOM folder's name). Listed files that do not exist stay in the list: the engine
    skips them as "missing file" and lists them in skipped.csv, so one typo does not stop a long run. Two slides
    with the same id are an error.
    """
    if slides_csv is None and wsi_dir is None:
        raise InputError("list_slides needs wsi_dir (a folder of slides) or slides_csv (a CSV with a 'wsi' column)")
    if slides_csv is not None:
        slides_csv = Path(slides_csv)
        if not slides_csv.is_file():
            raise InputError(
                f"slides={slides_csv}: no such file; give a CSV with a column 'wsi' (or 'path') naming the slide "
                "files, and optionally 'mpp' and 'slide_id'"
            )
        try:
            with open(slides_csv, newline="", encoding="utf-8-sig") as f:  # as written: pandas renames twins
                _refuse_twins(slides_csv, next(csv.reader(f), []))
            names = _list_columns(slides_csv, pd.read_csv(slides_csv, nrows=0).columns)
            id_column = next((c for c, name in names.items() if name == ID_COLUMN), ID_COLUMN)
            # ids as written: 0012 stays 0012, NA stays NA
            table = read_csv_ids(slides_csv, id_column).rename(columns=names)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise InputError(f"slides={slides_csv}: not a readable CSV ({err})") from err
        col = "wsi" if "wsi" in table.columns else "path" if "path" in table.columns else None
        if col is None:
            raise InputError(
                f"{slides_csv}: needs a column 'wsi' or 'path' naming the slide files; it has {list(table.columns)}"
            )
        base = Path(wsi_dir) if wsi_dir is not None else slides_csv.parent
        specs = []
        for i, row in table.iterrows():
            if pd.isna(row[col]) or not str(row[col]).strip():
                raise InputError(f"{slides_csv}, row {i + 2}: empty {col!r}")
            path = Path(str(row[col]).strip())
            path = path if path.is_absolute() else base / path
            if is_dicom_file(path):
                path = path.parent  # the series is the slide, whichever of its files is named
            mpp = _parse_mpp(row["mpp"], f"{slides_csv}, row {i + 2} ({path.name})") if "mpp" in table else None
            given = row[ID_COLUMN] if ID_COLUMN in table and not pd.isna(row[ID_COLUMN]) else ""
            slide_id = check_slide_id(given, f"{slides_csv}, row {i + 2}") if str(given).strip() else slide_id_of(path)
            specs.append(SlideSpec(slide_id, path, mpp))
        if not specs:
            raise InputError(f"{slides_csv} lists no slides")
        missing = [str(s.path) for s in specs if not s.path.exists()]
        if missing:
            log.warning(
                "%d of %d listed slides do not exist (they will be skipped), e.g. %s",
                len(missing),
                len(specs),
                missing[:3],
            )
        return _check_unique(specs)
    root = Path(wsi_dir)
    if not root.is_dir():
        raise InputError(f"wsi_dir={root} is not a folder")
    exts = slide_extensions(extensions) or (*SLIDE_EXTENSIONS, DICOM_SUFFIX)
    file_exts, want_dicom = tuple(e for e in exts if e != DICOM_SUFFIX), DICOM_SUFFIX in exts
    # nothing inside a hidden folder either (.Trash-1000/, .snapshot/, a tool's cache): copies, not the cohort
    entries = [p for p in (_walk(root, exclude) if recursive else root.iterdir())
               if not any(part.startswith(".") for part in p.relative_to(root).parts)]  # fmt: skip
    files = [p for p in entries if file_exts and p.name.lower().endswith(file_exts) and _file_or_gone(p)]
    if not want_dicom:
        dicom = set()
    elif recursive:
        dicom = {p.parent for p in entries if is_dicom_file(p)}
    else:
        dicom = {d for d in [root, *(p for p in entries if p.is_dir())] if dicom_files(d)}
    slides = sorted(files + [d for d in dicom if not any(part.startswith(".") for part in d.relative_to(root).parts)])
    if not slides:
        looked = [f"{', '.join(file_exts)} files"] if file_exts else []
        looked += ["folders of DICOM files"] if want_dicom else []
        raise InputError(
            f"no slides in {root} (looked for {' and '.join(looked)}{', recursively' if recursive else ''})"
            + _what_it_holds(entries)
            + ("" if recursive else _slides_below(root, file_exts))
        )
    return _check_unique([SlideSpec(slide_id_of(p), p) for p in slides])


def _what_it_holds(entries: list[Path]) -> str:
    """The extensions of the files that were not listed, most common first (a ``wsi_ext`` that names none of the
    cohort's: the one to pass instead), or ""."""
    counts = Counter(p.suffix.lower() for p in entries if p.suffix and p.is_file())
    if not counts:
        return ""
    held = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    more = f" and {len(held) - 6} more" if len(held) > 6 else ""
    return f"; it holds {', '.join(f'{ext} ({n})' for ext, n in held[:6])}{more} files"


def _slides_below(root: Path, file_exts: tuple) -> str:
    """A hint for a wsi_dir one level too high (PANDA's and make_synthetic's slides are in train_images/): the
    sub-folders that hold slide files, or ""."""
    below = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            n = sum(1 for f in sub.iterdir() if file_exts and f.name.lower().endswith(file_exts))
        except OSError:
            continue
        if n:
            below.append(f"{sub.name}/ ({n})")
    if not below:
        return ""
    return f"; slides are in {', '.join(below[:5])}: pass wsi_dir={root / below[0].split('/')[0]}, or recursive=true"


# a tiling folder of a job_dir (trident_h5.tiling_tag: 20x_1792px_256px_overlap, mpp0.6_1792px_0px_overlap)
TILING_FOLDER = re.compile(r"^(\d+(\.\d+)?x|mpp[0-9.e+-]+)_\d+px_\d+px_overlap$")


def _walk(root: Path, exclude: str | os.PathLike | None) -> list[Path]:
    """Every file and folder under ``root``, through symlinked folders (each real folder once: no loop), outside
    ``exclude``, hidden folders and the tiling folders of a job_dir (this run's when ``job_dir`` = ``wsi_dir``; an
    earlier run's anywhere in the tree, :func:`_holds_job_outputs`): probability TIFFs are not slides."""
    # job_dir = wsi_dir excludes the slides' folder itself: then its tiling folders (the outputs) are left out
    outputs_in_root = exclude is not None and os.path.realpath(exclude) == os.path.realpath(root)
    skip = {os.path.realpath(exclude)} - {os.path.realpath(root)} if exclude is not None else set()
    seen, found = set(), []
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or real in skip:
            dirs[:] = []
            continue
        seen.add(real)
        outputs = [d for d in dirs if _holds_job_outputs(Path(folder, d))]
        if outputs_in_root and folder == str(root):
            outputs += [d for d in dirs if TILING_FOLDER.match(d) and d not in outputs]
        elif outputs:
            log.info("not listing slides in %s: a job_dir's tiling folders (outputs of an earlier run)",
                     ", ".join(os.path.join(folder, d) for d in outputs))  # fmt: skip
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) not in skip
                   and d not in outputs]  # fmt: skip
        found += [Path(folder, n) for n in dirs + names]
    return found


def _holds_job_outputs(folder: Path) -> bool:
    """A tiling folder of some job_dir (its name, and a tiling's grids or a consumer's ledger inside), not a user's
    folder that happens to be named like one."""
    if not TILING_FOLDER.match(folder.name):
        return False
    try:
        inside = os.listdir(folder)
    except OSError:
        return False
    from .trident_h5 import PATCHES, PATCHES_COVER_TISSUE  # (here: a listing loads no h5py otherwise)

    return any(name in (PATCHES, PATCHES_COVER_TISSUE) or (name.startswith(("features_", "segmentation_"))
               and (folder / name / "config.json").is_file()) for name in inside)  # fmt: skip


def _file_or_gone(path: Path) -> bool:
    """A file, or a symlink whose target is gone (listed, so that the run names it instead of dropping it)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def as_specs(slides) -> list[SlideSpec]:
    """Paths or SlideSpecs → SlideSpecs (ids checked unique)."""
    return _check_unique([s if isinstance(s, SlideSpec) else SlideSpec(slide_id_of(s), Path(s)) for s in slides])

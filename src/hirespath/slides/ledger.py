"""The files an output folder keeps about its slides, shared by every worker writing into it.

One ledger per output folder (``<job_dir>/<tiling>/features_<encoder tag>/``, ``segmentation_<model tag>/``),
so two encoders (or models) in one ``job_dir`` keep their own rows::

    config.json    what every file of the folder depends on (tiling, encoder, features, ...): checked before a
                   finished slide is skipped; a mismatch is refused naming the setting
    skipped.csv    slide, path, reason, time, host, launch — slides (and tiles) that could not be processed; a
                   slide that later finishes leaves the list. Written (with its header) by every run. The other
                   workers of the launch that failed a slide do not try it again; a later launch does.
    timings.csv    one row per slide: tiles, seconds, the stages (see :mod:`hirespath.slides.stages`)
    summary.json   the folder's totals read off the disk, and every worker's own summary under ``workers``
    .outputs_since written when an overwrite run starts: outputs older than it were made with the replaced settings
                   and count as not finished, whoever finds them (a resume without overwrite too); the workers of
                   one launch (``Runtime.launch``) with the same settings keep the first one's. An overwrite with
                   the folder's own settings (a rescanned slide, a fix outside the settings) marks the slides it
                   lists only, each with its time: the folder's other slides stay finished

Every write is an atomic rewrite under a lock file, so parallel workers (DDP ranks, SLURM array tasks, joblib
jobs) lose no rows.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils.errors import InputError
from ..utils.io import atomic_path, exclusive_lock, read_csv_ids, remove_temporaries, temporaries_of, write_json
from .stages import BACKGROUND, STAGES

log = logging.getLogger("hirespath.slides")

SKIPPED_COLUMNS = ["slide", "path", "reason", "time", "host", "launch"]
# a slide's row: its stages' seconds (slides.stages), the readers, and the slide file its output was made from
TIMING_COLUMNS = [
    "slide", "rank", "host", "tiles", "tissue_mm2", "seconds", *(f"{s}_s" for s in STAGES + BACKGROUND),
    "tiles_per_s", "mm2_per_s", "reader", "num_workers", "threads", "slide_bytes",
    "slide_path", "output_ns",
]  # fmt: skip
CONFIG, SKIPPED, TIMINGS, SUMMARY = "config.json", "skipped.csv", "timings.csv", "summary.json"


def tile_reason(tile: int, x: int, y: int, why: str) -> str:
    """A skipped.csv reason for one tile of a slide that finished (:func:`whole_slide_rows` tells them apart)."""
    return f"tile {tile} at ({x}, {y}): {why}"


def whole_slide_rows(skipped: pd.DataFrame) -> pd.Series:
    """Which rows of skipped.csv are slides that failed, not tiles of a finished slide (:func:`tile_reason`)."""
    return ~skipped["reason"].str.startswith("tile ")


def slide_lock(output: Path) -> Path:
    """The lock a slide's output is made under (``<output>.lock``: its worker's host, pid and heartbeat)."""
    return output.with_name(output.name + ".lock")


OUTPUTS_SINCE = ".outputs_since"
CLOCK = "clock"  # file_system_now's probes, .clock.*.tmp
# what each folder lock's holder writes (every other lock: its own file): a temporary of one of them that the holder
# finds was left by a writer that stopped (a kill between the temporary and its rename)
WRITTEN_UNDER = {CONFIG: (CONFIG, OUTPUTS_SINCE, CLOCK)}


def _merge_lines(path: Path, new: pd.DataFrame, columns: list[str], sort_by: list[str] | None) -> bool:
    """``merge_rows`` on the file's lines, as text: the other slides' lines are kept as written, ``new``'s appended
    (formatted as pandas writes them), sorted by ``sort_by``'s fields: the file pandas would write. Parsing and
    re-formatting every number with pandas cost 0.30 s per slide at 10,000 slides (timings.csv; 0.03 s so), paid
    under the lock by every worker for each slide it finishes. False (nothing written) where a line cannot be split
    at its commas: quoted fields, a header other than ``columns``, a short line (the caller merges with pandas)."""
    text = path.read_text(encoding="utf-8")
    header, _, body = text.partition("\n")
    added = new.to_csv(index=False, header=False, lineterminator="\n")
    if header != ",".join(columns) or '"' in text or '"' in added or "\r" in text:
        return False
    at, keys = columns.index("slide"), [columns.index(k) for k in sort_by or []]
    split = max([at, *keys]) + 1  # no further than the fields needed
    drop = set(new["slide"].astype(str))
    rows = []  # (sort key, line), strings only: 100,000 lists of fields kept the garbage collector busy
    for lines, replaced in ((body.split("\n"), drop), (added.split("\n"), ())):
        for line in lines:
            if not line:  # the end of the file (or of the new rows): no row
                continue
            parts = line.split(",", split)
            if len(parts) < split:  # a line short of the fields (pandas says what is wrong)
                return False
            if parts[at] not in replaced:
                rows.append(("\x00".join(parts[k] for k in keys), line))  # NUL: sorts as the fields' tuple would
    if keys:
        rows.sort(key=lambda row: row[0])  # stable: rows equal in the sort fields keep their order, as below
    lines = [line for _, line in rows]
    with atomic_path(path) as tmp:
        tmp.write_text(header + "\n" + "".join(f"{line}\n" for line in lines), encoding="utf-8")
    return True


class IdentityMismatch(InputError):
    """The folder holds outputs made with other settings."""


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=0.0))
    return a == b


def _digest(identity: dict) -> str:
    """The settings of an identity as one string (equal settings, equal digest; numbers as JSON writes them)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def local_time() -> str:
    """This worker's clock as text, for the rows' ``time`` (not compared: the file server's clock decides ages)."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def file_system_now(folder: Path) -> int:
    """The folder's file system clock (ns), as it dates the outputs: the workers' own clocks do not enter."""
    fd, probe = tempfile.mkstemp(prefix=f".{CLOCK}.", suffix=".tmp", dir=folder)
    try:
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
        os.unlink(probe)


def _slides_only(mark: dict) -> bool:
    """A mark of some slides only, as written before ``since_ns`` was (it has no folder-wide time)."""
    return "slides" in mark and not {"since_ns", "settings", "time"} & set(mark)


@dataclass(frozen=True)
class OutputsSince:
    """Which outputs an overwrite replaced: a slide's output older than ``of(slide)`` (ns, the file system's clock;
    None: any age counts) is not finished. ``folder_ns``: every slide's (an overwrite with other settings);
    ``slides``: the slides an overwrite with the folder's own settings listed, each with its own time."""

    folder_ns: int | None = None
    slides: dict = field(default_factory=dict)

    def of(self, slide: str) -> int | None:
        own = self.slides.get(slide)
        return own if self.folder_ns is None else self.folder_ns if own is None else max(own, self.folder_ns)


class Ledger:
    """``config.json``, ``skipped.csv``, ``timings.csv`` and ``summary.json`` of one output folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._launch_failures: tuple = (None, {})  # (skipped.csv's stat, {(slide, launch): row}) for failed_in_launch
        self._swept: set[str] = set()  # the locks under which the temporaries of stopped writers were removed
        self.checked_settings: dict | None = None  # config.json as check_identity left it in an output-less folder
        self._unused_while_null: tuple = ()  # check_identity's, for check_settings_unchanged

    def sweep(self, names) -> None:
        """The temporaries stopped writers left of the tables ``names``, which a run that writes none of them would
        keep for good: removed under their lock where there is no lock file (a live writer holds it while its
        temporary exists). A lock file left too waits for the next writer, which judges it (no wait here, and no
        judging a holder's pid, which a sibling container's namespace can make look gone)."""
        for name in names:
            written = WRITTEN_UNDER.get(name, (name,))
            if not self._lock_path(name).exists() and any(temporaries_of(self.folder / f) for f in written):
                self._swept.discard(name)
                with self._locked(name):
                    pass

    def _lock_path(self, name: str) -> Path:
        return self.folder / f".{name}.lock"

    @contextlib.contextmanager
    def _locked(self, name: str):
        """Hold the folder lock of ``name``; the first time, remove what writers that stopped left under it."""
        with exclusive_lock(self._lock_path(name), f"another worker writing {name}", poll_s=0.05):
            if name not in self._swept:
                self._swept.add(name)
                remove_temporaries([self.folder / written for written in WRITTEN_UNDER.get(name, (name,))])
            yield

    # ------------------------------------------------------------------------------------------ identity
    def check_identity(self, identity: dict, overwrite: bool = False, how: str = "", redrawable: tuple = (),
                       redraw: bool = False, redraw_hint: str = "", launch: str | None = None,
                       unvouched: tuple = (), slides: list[str] | None = None,
                       implied: dict | None = None, unused_while_null: tuple = ()) -> OutputsSince:  # fmt: skip
        """Refuse outputs made with other settings; write ``config.json`` on first use (and with ``overwrite``).
        Returns :meth:`outputs_since`: the times (ns, the folder's file system clock) before which outputs are stale.
        An overwrite marks that time when it starts, once per ``launch`` (the id its workers share: a worker of the
        same launch and settings that starts later keeps the mark, so it does not redo what the others replaced);
        with the settings the folder already holds, it marks the ``slides`` it lists only (None: every slide).
        ``implied``: keys added to the identity later, with the value that every output made before had (a
        folder without the key is compared as if it held that value). ``unused_while_null``: keys that no output
        depends on while they are null (``default_mpp``: a slide without an mpp is skipped, not made): a value now
        where the folder holds null is recorded, and null now where it holds a value is accepted (the value stays).

        Keys in both the stored and the new identity must be equal; keys the stored one lacks (written by an older
        version) are added, but for ``unvouched`` ones: outputs made before they were recorded may have been made
        with other values, so they stay unrecorded (and unchecked) in that folder, said in a warning. ``how`` tells
        the user how to proceed (e.g. the overwrite option's name). Keys in ``redrawable`` only change what is drawn
        from the stored outputs: with ``redraw`` their new values replace the stored ones (the consumer draws its
        finished slides again), else ``redraw_hint`` says how to."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / CONFIG
        self._unused_while_null = tuple(unused_while_null)
        with self._config_locked():
            old = self.settings()
            # what the folder holds, keys it predates included
            held = None if old is None else {**{k: v for k, v in (implied or {}).items() if k in identity}, **old}
            settings = _digest(identity)
            if overwrite and not self._overwrite_started(launch, settings, held):
                if slides is not None and held is not None and _digest(held) == settings:
                    self._mark_slides(slides, launch)  # the folder's own settings: only the listed slides
                else:  # every output made before now is replaced, by this worker or any other
                    write_json(self.folder / OUTPUTS_SINCE, {"time": local_time(), "host": socket.gethostname(),
                                                             "launch": launch, "settings": settings,
                                                             "since_ns": file_system_now(self.folder)})  # fmt: skip
            if old is not None and not overwrite:
                asked = identity
                if unknown := [k for k in unvouched if k in identity and k not in old]:
                    log.warning("%s was written before its %s were recorded: its outputs are not checked against "
                                "this run's (a new job_dir or an overwrite checks them)", self.folder,
                                ", ".join(unknown))  # fmt: skip
                    identity = {k: v for k, v in identity.items() if k not in unknown}
                diff = {
                    k: (held[k], v)
                    for k, v in identity.items()
                    if k in held and not _same(held[k], v) and not (k in unused_while_null and None in (held[k], v))
                }
                drawing_only = bool(diff) and set(diff) <= set(redrawable)
                if diff and not (redraw and drawing_only):
                    changes = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                    if not self._holds_outputs():  # a run stopped before its first slide (a typo seen, Ctrl-C)
                        log.warning("%s holds no outputs yet: its settings are this run's (%s)", self.folder, changes)
                        write_json(path, asked)
                        return self.outputs_since()
                    other = "a new job_dir" + (f", or {how} to replace them" if how else "")
                    advice = (f"Only how they are drawn changed: {redraw_hint}. Or use {other}"
                              if drawing_only and redraw_hint else f"Use {other}")  # fmt: skip
                    raise IdentityMismatch(
                        f"{self.folder} holds outputs made with other settings ({changes}). {advice}"
                    )
                filled = [k for k in unused_while_null if k in old and old[k] is None and identity.get(k) is not None]
                if not diff and set(identity) <= set(old) and not filled:
                    return self.outputs_since()
            write_json(path, {**(old or {}), **identity} if not overwrite else identity)
            return self.outputs_since()

    def settings(self) -> dict | None:
        """What ``config.json`` holds now (None: no such file)."""
        try:
            return json.loads((self.folder / CONFIG).read_text())
        except FileNotFoundError:
            return None

    def check_settings_unchanged(self) -> None:
        """Refuse to go on when ``config.json`` no longer holds what :meth:`check_identity` left in it: another run
        with other settings took the folder over while it held no output yet (a slide task checks this under each
        slide's lock, whose file then stops any later takeover). Read under config.json's lock, so that a takeover's
        look at the folder and its write are both before or both after it. A run that found outputs there has
        nothing to check: no run takes such a folder over (a default_mpp another run records is not a takeover)."""
        if self.checked_settings is None:
            return
        with self._locked(CONFIG):
            then, now = self.checked_settings, self.settings() or {}
        # a default another run records where this one had none changes none of this run's outputs
        changed = [k for k in sorted(set(now) | set(then)) if then.get(k) != now.get(k)
                   and not (k in self._unused_while_null and then.get(k) is None)]  # fmt: skip
        if changed:
            changes = "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in changed)
            raise IdentityMismatch(
                f"{self.folder / CONFIG} was changed by another run after this one checked it ({changes}): this run "
                "stops, so that its outputs do not land under settings they were not made with"
            )

    @contextlib.contextmanager
    def _config_locked(self):
        """config.json's lock; on leaving, what the file holds is this run's :attr:`checked_settings` while the
        folder holds no output (another run may still take it over), else None."""
        with self._locked(CONFIG):
            try:
                yield
            finally:
                self.checked_settings = None if self._holds_outputs() else self.settings() or {}

    def _holds_outputs(self) -> bool:
        """Whether the folder holds anything but its ledger: an output, a slide's lock (a worker making one), or a
        file another tool wrote. Hidden files are the ledger's locks and the temporaries of writers that stopped."""
        ledger = {CONFIG, SKIPPED, TIMINGS, SUMMARY}
        with os.scandir(self.folder) as entries:  # the first output ends the look (a folder of 10,000 slides)
            return any(not (e.name in ledger or e.name.startswith(".")) for e in entries)

    def replace_slides(self, slides: list[str], launch: str | None = None) -> OutputsSince:
        """Mark the outputs of ``slides`` made before now as stale (their slide files were replaced since)."""
        with self._locked(CONFIG):
            self._mark_slides(slides, launch)
            return self.outputs_since()

    def _mark_slides(self, slides: list[str], launch: str | None) -> None:
        """Outputs of ``slides`` older than now are stale; a slide another worker of ``launch`` marked keeps its
        time (what that worker made since stays). Under the CONFIG lock."""
        mark = self._mark()
        marked, t = dict(mark.get("slides") or {}), file_system_now(self.folder)
        changed = "since_ns" not in mark  # an earlier version's mark (or none): its time, dated by its file, kept
        for slide in slides:
            if launch is None or (marked.get(slide) or {}).get("launch") != launch:
                marked[slide], changed = {"ns": t, "launch": launch}, True
        if changed:  # a worker of the launch that finds its slides marked rewrites nothing (10,000 slides: 1.4 MB)
            since = mark.get("since_ns") if "since_ns" in mark or _slides_only(mark) else self.outputs_since().folder_ns
            write_json(self.folder / OUTPUTS_SINCE, {**mark, "since_ns": since, "slides": marked})

    def _overwrite_started(self, launch: str | None, settings: str, stored: dict | None) -> bool:
        """An overwrite of these ``settings`` (their ``_digest``) already started in this launch (None: a launch of
        one process) and the folder still holds exactly them (``stored``: its config.json). A run in between that
        changed them (a redraw with another threshold) wrote outputs with its own: the overwrite must start again
        to replace those."""
        if launch is None or stored is None or _digest(stored) != settings:
            return False
        try:
            mark = json.loads((self.folder / OUTPUTS_SINCE).read_text())
        except (OSError, ValueError):  # none, or unreadable: mark again
            return False
        return isinstance(mark, dict) and mark.get("launch") == launch and mark.get("settings") == settings

    def _mark(self) -> dict:
        try:
            mark = json.loads((self.folder / OUTPUTS_SINCE).read_text())
        except (OSError, ValueError):
            return {}
        return mark if isinstance(mark, dict) else {}

    def outputs_since(self) -> OutputsSince:
        """Outputs whose files are older than its times (``st_mtime_ns``) were made before the folder's last
        overwrite started (or, for a slide an overwrite with the same settings listed, before that one). Times of
        the file system, like the outputs', so the workers' clocks do not enter."""
        path = self.folder / OUTPUTS_SINCE
        try:
            marked_at = path.stat().st_mtime_ns
        except FileNotFoundError:
            return OutputsSince()
        mark = self._mark()  # an earlier version's (no since_ns; empty or unreadable too): dated by its file
        folder_ns = mark["since_ns"] if "since_ns" in mark else None if _slides_only(mark) else marked_at
        slides = {k: int(v["ns"]) for k, v in (mark.get("slides") or {}).items() if isinstance(v, dict) and "ns" in v}
        return OutputsSince(int(folder_ns) if folder_ns is not None else None, slides)

    # ------------------------------------------------------------------------------------------ skipped.csv
    def update_skipped(self, rows: list[dict], done: list[str] = ()) -> None:
        """Merge rows (slide, path, reason): rows of the slides in ``rows`` and ``done`` are replaced — a slide that
        now finished leaves the list. The file always exists after a run (header only when nothing is skipped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / SKIPPED
        with self._locked(SKIPPED):
            old = self.skipped()
            drop = {r["slide"] for r in rows} | set(done)
            rows = [{"time": local_time(), "host": socket.gethostname(), **r} for r in rows]
            new = pd.concat(
                [old[~old["slide"].isin(drop)], pd.DataFrame(rows, columns=SKIPPED_COLUMNS)], ignore_index=True
            )
            if not path.exists() or len(new) != len(old) or drop & set(old["slide"]):
                with atomic_path(path) as tmp:
                    new.to_csv(tmp, index=False)

    def forget_slide_failures(self, slides: list[str]) -> None:
        """Drop the slide-level rows of ``slides``, which are finished on disk; their tiles' rows (``tile ...``)
        stay. A run killed between a slide's file and its bookkeeping (``write_behind`` renames a slide's file
        while the next one streams) left the slide listed as failed by an earlier run, and later runs skip it."""
        path = self.folder / SKIPPED
        if not path.is_file():
            return
        with self._locked(SKIPPED):
            old = self.skipped()
            stale = old["slide"].isin(set(slides)) & whole_slide_rows(old)
            if stale.any():
                with atomic_path(path) as tmp:
                    old[~stale].to_csv(tmp, index=False)

    def skipped(self) -> pd.DataFrame:
        path = self.folder / SKIPPED
        if not path.is_file():
            return pd.DataFrame(columns=SKIPPED_COLUMNS)
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
        return rows.reindex(columns=[*SKIPPED_COLUMNS, *(c for c in rows if c not in SKIPPED_COLUMNS)], fill_value="")

    def failed_in_launch(self, slide: str, launch: str | None) -> dict | None:
        """The row of ``slide`` failed by a worker of ``launch`` (the id the workers of one launch share), if any:
        the others do not try it again (on a SLURM array each task would read a corrupt slide, or run a slide too
        large for the GPU up to its failure, once more). A later launch (the rerun after a fix) tries it."""
        if not launch:
            return None
        try:  # asked twice per slide: the file is read again only when it was rewritten (atomically: a new inode)
            st = (self.folder / SKIPPED).stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return None
        if key != self._launch_failures[0]:
            rows = self.skipped()
            rows = rows[(rows["launch"] != "") & whole_slide_rows(rows)]
            self._launch_failures = (key, {(r["slide"], r["launch"]): r for r in rows.to_dict("records")})
        return self._launch_failures[1].get((slide, launch))

    # ------------------------------------------------------------------------------------------ timings.csv
    def update_timings(self, rows: list[dict], columns: list[str]) -> None:
        """Merge per-slide rows (a slide processed again replaces its row)."""
        self.merge_rows(TIMINGS, rows, columns)

    def merge_rows(self, name: str, rows: list[dict], columns: list[str], sort_by: list[str] | None = None) -> None:
        """Merge ``rows`` into the folder's table ``name`` (a CSV with a ``slide`` column): the slides in ``rows``
        replace all their earlier rows (one or many per slide), the others' rows stay."""
        if not rows:
            return
        path, new = self.folder / name, pd.DataFrame(rows, columns=columns)
        with self._locked(name):
            if path.is_file() and _merge_lines(path, new, columns, sort_by):
                return
            old = self.table(name)
            old = pd.DataFrame(columns=columns) if old is None else old
            table = pd.concat([old[~old["slide"].isin(set(new["slide"].astype(str)))], new], ignore_index=True)
            if sort_by:
                table = table.sort_values(sort_by, kind="stable")
            with atomic_path(path) as tmp:
                table.to_csv(tmp, index=False)

    def drop_rows(self, name: str, slides: list[str]) -> None:
        """Remove the rows of ``slides`` from the folder's table ``name`` (a slide being done again): on the file's
        lines as text where they split at commas (as ``merge_rows``: pandas would cost 0.3 s per slide at 10,000
        slides, under the lock, for every slide of an overwrite), else with pandas."""
        path, drop = self.folder / name, {str(s) for s in slides}
        if not path.is_file():
            return
        with self._locked(name):
            text = path.read_text(encoding="utf-8")
            header, _, body = text.partition("\n")
            fields = header.split(",")
            if "slide" in fields and '"' not in text and "\r" not in text:
                at = fields.index("slide")
                lines = [line for line in body.split("\n") if line]
                kept = [line for line in lines if (line.split(",", at + 1) + [""] * at)[at] not in drop]
                if len(kept) != len(lines):
                    with atomic_path(path) as tmp:
                        tmp.write_text(header + "\n" + "".join(f"{line}\n" for line in kept), encoding="utf-8")
                return
            table = self.table(name)
            keep = ~table["slide"].isin(drop)
            if not keep.all():
                with atomic_path(path) as tmp:
                    table[keep].to_csv(tmp, index=False)

    def set_values(self, name: str, column: str, values: dict) -> None:
        """Set ``column`` of the rows of the slides in ``values`` ({slide: value}) in the folder's table ``name``."""
        path = self.folder / name
        if not values or not path.is_file():
            return
        with self._locked(name):
            table = self.table(name)
            hit = table["slide"].isin(set(values))
            if hit.any():
                table[column] = table[column].astype(object) if column in table else None
                table.loc[hit, column] = table.loc[hit, "slide"].map(values)
                with atomic_path(path) as tmp:
                    table.to_csv(tmp, index=False)

    def table(self, name: str) -> pd.DataFrame | None:
        """The folder's table ``name`` (slide ids as written), None when there is none yet."""
        path = self.folder / name
        return read_csv_ids(path, "slide") if path.is_file() else None

    def add_missing_columns(self, name: str, values: dict) -> None:
        """Give the table ``name`` the columns of ``values`` it lacks (it was written by an older version), with
        those values in every row."""
        path = self.folder / name
        if not path.is_file():
            return
        with self._locked(name):
            table = read_csv_ids(path, "slide")
            if missing := {k: v for k, v in values.items() if k not in table.columns}:
                with atomic_path(path) as tmp:
                    table.assign(**missing).to_csv(tmp, index=False)

    def timings(self) -> pd.DataFrame:
        """The folder's timings.csv (a table with a ``slide`` column only when there is none yet)."""
        table = self.table(TIMINGS)
        return pd.DataFrame(columns=["slide"]) if table is None else table

    # ------------------------------------------------------------------------------------------ summary.json
    def update_summary(self, worker: dict, totals: Callable[[], dict]) -> dict:
        """Add this worker's summary (keyed by its ``worker`` id: host, pid, a random part) and the folder's
        ``totals()`` (counted off the disk by the caller, under the lock: the last writer has seen every worker's
        rows); returns the merged summary. Parallel workers each add theirs. An earlier worker's entry of a slide
        this one made again (an overwrite, a redraw) gets ``replaced_by``: this worker's id, so that no reader
        takes the two for the slide's."""
        path = self.folder / SUMMARY
        with self._locked(SUMMARY):
            old = json.loads(path.read_text()) if path.is_file() else {}
            workers = old.get("workers", {}) if isinstance(old.get("workers"), dict) else {}
            made = {d["slide"] for d in worker.get("done", [])}
            for entry in workers.values():
                for key in ("done", "embedded"):  # (embed_slides' name for the list)
                    for d in entry.get(key, []) if isinstance(entry, dict) else []:
                        if isinstance(d, dict) and d.get("slide") in made and "replaced_by" not in d:
                            d["replaced_by"] = worker["worker"]
            workers[worker["worker"]] = worker
            merged = {**totals(), "workers": workers}
            write_json(path, merged)
        return merged

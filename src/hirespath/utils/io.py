"""Atomic file writes: a killed run never leaves a half-written file that a later run would read; lock files; and
what a full disk looks like (an error naming the folder, not a process killed by SIGBUS)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import StorageError

# the folder takes no more (disk full, quota, read-only, a file size limit): every later write there fails too, so
# a run stops rather than skip slide after slide
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(path: Path) -> Path:
    """A new empty hidden file ``.<name>.*.tmp`` in ``path``'s folder (made if missing), to be renamed onto ``path``
    once complete, with the mode a plain open() would give it (mkstemp's is 0600; caches are shared on clusters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


# any temporary_beside name, or a writer's part of one (see temporaries_of)
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}(\.[a-z0-9]+)?\.tmp")


def temporaries_of(path: Path, names: list[str] | None = None) -> list[Path]:
    """The temporaries of writers of ``path`` in its folder: ``temporary_beside``'s ``.<name>.<token>.tmp`` and a
    writer's parts, ``.<name>.<token>.<part>.tmp`` (token: mkstemp's 8 random characters or 8 hex digits). Matched
    as text, not as a glob pattern: a slide id may hold ``[``, ``*`` or ``?``, and ``a[1]``'s pattern would take the
    files of a live writer of ``a1``. The token's length tells ``a.h5``'s ``.a.h5.<token>.tmp`` from slide
    ``a.h5``'s output ``a.h5.h5`` and its ``.a.h5.h5.<token>.tmp``."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}(\.[a-z0-9]+)?\.tmp")
    try:  # names: the folder's, listed once by a caller that asks for many files
        return [path.parent / n for n in (os.listdir(path.parent) if names is None else names) if pattern.fullmatch(n)]
    except FileNotFoundError:
        return []


def remove_temporaries(files: list[Path], names: list[str] | None = None) -> None:
    """The temporaries of writers of ``files`` that stopped (a kill between a temporary and its rename): for a caller
    that holds what every writer of them holds (a slide's or a table's lock), so no live writer has any; ``names``:
    their folder's, when already listed."""
    import logging

    for file in files:
        for tmp in temporaries_of(file, names):
            logging.getLogger("hirespath.io").info("removing %s, left by a writer that stopped", tmp)
            tmp.unlink(missing_ok=True)


def read_csv_ids(path, id_column: str, **kwargs):
    """``pd.read_csv`` with the ids in ``id_column`` as written: ``0012`` stays ``0012``, and the slide ids pandas
    would read as missing (``NA``, ``null``, ``nan``, ``None``) stay strings; an empty field is missing."""
    import pandas as pd

    table = pd.read_csv(path, dtype={id_column: str}, **kwargs)
    if id_column in table and table[id_column].isna().any():
        ids = pd.read_csv(path, usecols=[id_column], dtype=str, keep_default_na=False, **kwargs)[id_column]
        table[id_column] = ids.mask(ids == "")
    return table


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _full_errno(err: BaseException) -> int | None:
    """The errno of a full disk that ``err`` carries: an OSError's, or the ``errno = N`` HDF5 writes into the text
    of the RuntimeError h5py raises for a failed write."""
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
        return err.errno
    found = re.search(r"errno = (\d+)", str(err))
    return int(found.group(1)) if found and int(found.group(1)) in FULL_ERRNOS else None


def out_of_storage(err: BaseException | None) -> bool:
    """Whether ``err``, or an error it was raised from, says the disk is full, a quota exceeded or the file system
    read-only (tifffile, numpy and h5py raise OSError with that errno, h5py also RuntimeErrors that name it;
    wrappers keep it as the cause)."""
    return any(_full_errno(e) for e in _chain(err))


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.3g} MB"


def storage_error(
    err: BaseException, folder: str | os.PathLike | None = None, then: str = "Make room and run again"
) -> StorageError:
    """The error a run stops with when the folder of the file that failed (else ``folder``, the run's output
    folder: a patches file lives in a sibling folder) takes no more: what happened, the free space, and ``then``,
    what to do."""
    full = next(e for e in _chain(err) if _full_errno(e))
    filename = getattr(full, "filename", None) or next(iter(re.findall(r"filename = '([^']+)'", str(full))), None)
    own = Path(filename).parent if filename and Path(filename).is_absolute() else None
    folder = own or folder
    what = f"; writing {Path(filename).name}" if filename else ""
    try:
        free = f"; {_size(shutil.disk_usage(folder).free)} free" if folder else ""
    except OSError:
        free = ""
    return StorageError(
        f"cannot write to {folder or 'the output folder'}: {os.strerror(_full_errno(full))}{what}{free}. {then}"
    )


@contextmanager
def storage_errors(folder: str | os.PathLike, then: str = "Make room and run again"):
    """A full disk inside the block (:func:`out_of_storage`) is raised as :func:`storage_error`'s StorageError."""
    try:
        yield
    except Exception as err:
        if out_of_storage(err) and not isinstance(err, StorageError):
            raise storage_error(err, folder, then) from err
        raise


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def new_memmap(path: str | os.PathLike, dtype, shape):
    """``np.lib.format.open_memmap(path, "w+")``: a zero-filled, sparse .npy, to be *read* through the mapping and
    written with :func:`write_rows`.

    A store through a mapping into a page the disk has no block for (a full disk, or a user quota, which the free
    space a file system reports does not show) kills the process with SIGBUS ("Bus error", no message, no
    traceback); pwrite fails with an OSError instead, which the run reports as a StorageError."""
    import numpy as np

    try:
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    except BaseException:  # created, then its header or size refused (a file size limit): not left behind
        Path(path).unlink(missing_ok=True)
        raise


@contextmanager
def new_h5(path: str | os.PathLike):
    """``h5py.File(path, "w")`` that is flushed before it is closed, and discarded (:func:`discard_h5`) when that or
    the writing fails."""
    import h5py

    file = h5py.File(path, "w")
    try:
        yield file
        file.flush()
    except BaseException:
        discard_h5(file)
        raise
    file.close()


def discard_h5(file) -> None:
    """Close an h5py file whose content is thrown away, without writing it; a second call does nothing.

    After a write that failed (a full disk), HDF5 cannot close the file, and h5py, trying again when the object is
    freed or at exit, crashes the process (SIGSEGV). Pointing the file's descriptor elsewhere first
    (:func:`_discard_target`) lets the close's last writes succeed, to nowhere. Should the close fail all the same,
    the error is dropped (the content is not wanted) and the file is not closed again."""
    if getattr(file, "_hirespath_discarded", False) or not file.id.valid:
        return
    file._hirespath_discarded = True
    try:
        fd = file.id.get_vfd_handle()
        target = _discard_target()
        try:
            os.dup2(target, fd)
        finally:
            os.close(target)
    except Exception:  # noqa: BLE001 — closed already, or a driver without one descriptor: close as it is
        pass
    try:
        file.close()
    except Exception:  # noqa: BLE001 — a second try would crash the process; the content is thrown away anyway
        pass


def _discard_target() -> int:
    """Where a discarded h5 file's last writes go: an anonymous in-memory file, which can be extended as HDF5 extends
    a file that never got a row when closing it (/dev/null cannot: that close failed, and the next one crashed);
    /dev/null under a file-size limit (RLIMIT_FSIZE binds the in-memory file too, and the failed writes that led here
    may have reached it)."""
    try:
        import resource

        limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        limited = True
    if hasattr(os, "memfd_create") and not limited:
        return os.memfd_create("discarded-h5")
    return os.open(os.devnull, os.O_RDWR)


def write_rows(fd: int, arr, y0: int, x0: int, values) -> None:
    """``arr[:, y0:y0 + h, x0:x0 + w] = values`` for a C×H×W memmap ``arr`` (:func:`new_memmap`) of the file open
    as ``fd``, with pwrite: a row at a time, or a whole band of a plane when ``values`` spans the width. On a full
    disk an OSError, where the same store through the mapping is SIGBUS."""
    import numpy as np

    _, H, W = arr.shape
    values = np.ascontiguousarray(values, dtype=arr.dtype)
    full_width = (x0, values.shape[2]) == (0, W)  # then a plane's band is contiguous: one write
    for c, plane in enumerate(values):
        pieces = [(0, plane)] if full_width else enumerate(plane)
        for j, piece in pieces:
            data = memoryview(piece).cast("B")
            try:
                written = os.pwrite(fd, data, arr.offset + ((c * H + y0 + j) * W + x0) * arr.itemsize)
            except OSError as err:  # named, for the run's StorageError
                raise OSError(err.errno, err.strerror, str(arr.filename)) from err
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(arr.filename))


def _json_safe(obj):
    """NaN/inf (an undefined AUROC, say) become null: bare NaN is not JSON and strict parsers reject it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj, **kwargs) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps(_json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False, **kwargs) + "\n"
        )


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str = "", poll_s: float = 5.0, stale_s: float = 600.0):
    """Hold ``path`` as a lock file across processes and hosts (a shared file system): other holders wait.

    Parallel grid jobs (joblib, a SLURM array) that need the same expensive result take turns: the second one
    waits, then finds the result cached. The holder touches the file every ``stale_s / 4`` seconds; a lock whose
    holder process is gone (same host) or that has not been touched for ``stale_s`` seconds is taken over.
    """
    import logging
    import socket
    import time

    log = logging.getLogger("hirespath.io")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()}:{os.getpid()}"
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                raw, mtime_ns = path.read_text(), path.stat().st_mtime_ns
            except FileNotFoundError:
                continue  # released meanwhile
            holder, why = raw.strip(), _folder_lock_stale(raw, mtime_ns, stale_s)
            if why:
                if _remove_if_unchanged(path, (raw, mtime_ns)):
                    log.warning("took over the stale lock %s of %s (%s)", path, holder, why)
                else:
                    time.sleep(min(poll_s, 0.05))  # another waiter is taking it over
                continue
            if not waited:
                log.info("waiting for %s: %s holds %s", what or "another job", holder, path)
                waited = True
            time.sleep(poll_s)
            continue
        _fill_lock(fd, path, me)
        break
    beat = Heartbeat(path, stale_s / 4)
    try:
        yield
    finally:
        beat.stop()
        try:
            if path.read_text().strip() == me:
                path.unlink()
        except FileNotFoundError:
            pass


def _folder_lock_stale(raw: str, mtime_ns: int, stale_s: float) -> str | None:
    """Why an :func:`exclusive_lock` file with this content ("host:pid") and time is stale, None while held."""
    import socket
    import time

    host, _, pid = raw.strip().rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return "process gone"
    age = time.time() - mtime_ns / 1e9
    return f"untouched for {age:.0f} s" if age > stale_s else None


def _takeover_mutex(path: Path, text: str) -> Path | None:
    """``<path>.takeover``, created exclusively by the one worker taking the stale lock ``path`` over; None while
    another worker is (one left by a taker that died inside the few microseconds of a takeover is cleared after a
    minute)."""
    import time

    mutex = path.with_name(path.name + ".takeover")
    if _create_exclusive(mutex, text):
        return mutex
    try:
        if time.time() - mutex.stat().st_mtime > 60:
            mutex.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    return None


def _remove_if_unchanged(path: Path, judged: tuple[str, int]) -> bool:
    """Remove the stale lock ``path`` if it still is the file judged stale ((content, mtime_ns)), under a takeover
    mutex: every waiter judges a dead holder's lock stale at once, and one that removed it after another waiter had
    already taken it over removed that one's fresh lock (two holders, and rows of a shared CSV lost)."""
    mutex = _takeover_mutex(path, "")
    if mutex is None:
        return False
    try:
        try:
            if (path.read_text(), path.stat().st_mtime_ns) != judged:
                return False  # released, or taken over meanwhile
        except FileNotFoundError:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        mutex.unlink(missing_ok=True)


def _process_facts() -> dict:
    """What tells this process apart on its host beyond its pid (Linux; empty elsewhere): its pid namespace (a pid
    names this process only inside it), the host's boot, and its start in clock ticks since that boot."""
    facts = {}
    try:
        facts["pid_ns"] = os.readlink("/proc/self/ns/pid")  # right also through another namespace's /proc
        facts["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return facts
    if _own_proc() and (start := _start_ticks("self")) is not None:
        facts["pid_start"] = start
    return facts


def _own_proc() -> bool:
    """Whether /proc shows this pid namespace: without its own (unshare -fp without --mount-proc, a container given
    the host's), /proc/<pid> names other processes than this namespace's pids."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _start_ticks(pid: int | str) -> int | None:
    """When process ``pid`` started, in clock ticks since the boot (field 22 of /proc/<pid>/stat, after the name,
    which may hold spaces and parentheses); None where it cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _holder_gone(pid: int, info: dict) -> str | None:
    """Why the holder ``pid`` (on this host) of an item lock with content ``info`` is gone, None while it may live.
    Its pid is judged only in the pid namespace and boot it was written in: containers sharing a hostname (host
    networking) each have their own pids, and hosts sharing one (cloned VMs) their own boots, so another's holder is
    judged by its heartbeat alone, as one on another host. There, a pid now naming a process started after the
    holder's (pid reuse: a container restarted in a namespace of the same id) also means the holder is gone. Locks
    without these facts (older versions, TRIDENT's) are judged by the pid."""
    ns = info.get("pid_ns")
    if ns is not None:
        mine = _process_facts()
        if ns != mine.get("pid_ns") or info.get("boot_id") != mine.get("boot_id"):
            return None  # another namespace, or another boot (or host: every host's first namespace has one id)
    if not _pid_alive(pid):
        return "gone"
    start = info.get("pid_start")
    if ns is not None and start is not None and _own_proc() and _start_ticks(pid) not in (None, start):
        return "another process now (the pid was reused)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# an item lock's holder touches it every HEARTBEAT_S; one untouched for HEARTBEAT_MISSES beats has no live holder
# (a job killed on another node: SLURM's time limit, a preemption), so another worker takes it over in minutes
HEARTBEAT_S = 60.0
HEARTBEAT_MISSES = 10


class Heartbeat:
    """Touch ``path`` every ``every_s`` seconds from a daemon thread until ``stop`` (or the file is gone): its
    mtime says its holder is alive, whatever host it runs on."""

    def __init__(self, path: Path, every_s: float):
        import threading

        self.path, self._stopped = path, threading.Event()
        threading.Thread(target=self._run, args=(every_s,), daemon=True, name=f"heartbeat {path.name}").start()

    def _run(self, every_s: float) -> None:
        while not self._stopped.wait(every_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return
            except OSError:
                pass  # a file server's hiccup: the next beat tries again

    def stop(self) -> None:
        self._stopped.set()


class ItemLock:
    """A lock file held by this process (see :func:`try_lock`), touched by a :class:`Heartbeat` while held;
    ``release`` removes it only while it is still ours."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._beat = Heartbeat(path, HEARTBEAT_S)

    def release(self) -> bool:
        self._beat.stop()
        try:
            if json.loads(self.path.read_text()).get("token") != self.token:
                return False  # taken over meanwhile (we looked stale): the new holder's file stays
        except (FileNotFoundError, ValueError):
            return False
        self.path.unlink(missing_ok=True)
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self) -> str:
        return f"ItemLock({str(self.path)!r})"


def _lock_payload(token: str) -> str:
    import socket
    import time

    return json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(), "created_at": time.time(),
                       "token": token, "heartbeat_s": HEARTBEAT_S, **_process_facts()})  # fmt: skip


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    _fill_lock(fd, path, text)
    return True


def _fill_lock(fd: int, path: Path, text: str) -> None:
    """Write a new lock file's content; a lock that could not be written (a full disk) is removed, not left empty:
    an empty lock counts as held until it is stale (a day, for a slide)."""
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as err:
        path.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err


def lock_is_stale(path: str | os.PathLike, stale_s: float = 24 * 3600) -> tuple[bool, str]:
    """(stale, why) for an item lock: its pid is dead on this host; or its holder, which touches it every
    ``heartbeat_s`` (hirespath's locks), has not done so for ``HEARTBEAT_MISSES`` beats (or ``stale_s``, if
    shorter); or, for a lock without a heartbeat, it is older than ``stale_s`` seconds.

    That age comes from ``created_at`` (TRIDENT's lock content), else the file's mtime (an empty file may be a lock
    whose holder has not written it yet, so it is never stale before ``stale_s``).
    """
    import socket
    import time

    path = Path(path)
    try:
        raw, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return False, "released"
    try:
        info = json.loads(raw) if raw.strip() else {}
    except ValueError:
        info = {}
    pid, host = info.get("pid"), info.get("hostname")
    if host == socket.gethostname() and isinstance(pid, int) and (gone := _holder_gone(pid, info)):
        return True, f"pid {pid} on {host} is {gone}"
    beat = info.get("heartbeat_s")
    if isinstance(beat, (int, float)) and not isinstance(beat, bool) and beat > 0:
        silent, limit = time.time() - mtime, min(stale_s, HEARTBEAT_MISSES * beat)
        if silent > limit:
            return True, f"held by {host or '?'}:{pid or '?'}, not touched for {silent:.0f} s > {limit:.0f} s"
        return False, f"held by {host or '?'}:{pid or '?'}"
    created = info.get("created_at")
    age = time.time() - (float(created) if isinstance(created, (int, float)) else mtime)
    if age > stale_s:
        return True, f"held by {host or '?'}:{pid or '?'} for {age / 3600:.1f} h > {stale_s / 3600:.1f} h"
    return False, f"held by {host or '?'}:{pid or '?'}"


def try_lock(path: str | os.PathLike, stale_s: float = 24 * 3600) -> ItemLock | None:
    """Take the lock file ``path`` now, or return None when another live worker holds it (never waits).

    Per-item locks for work that many workers share (slides of an embedding job, DDP ranks, SLURM arrays on a
    shared file system). The file is created with O_CREAT|O_EXCL, so of several workers exactly one wins (TRIDENT's
    check-then-create let two win, PR #213); it holds JSON {pid, hostname, created_at, token}. A stale lock (pid
    dead on this host, or older than ``stale_s``) is taken over under a short takeover mutex (``<path>.takeover``,
    itself O_EXCL): the taker renames the stale file aside, checks it renamed the file it judged stale, and creates
    its own with O_EXCL — so two takers never both win, and a fresh lock created meanwhile is put back, not lost.
    """
    import logging
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    if _create_exclusive(path, _lock_payload(token)):
        return ItemLock(path, token)
    stale, why = lock_is_stale(path, stale_s)
    if not stale:
        return None
    mutex = _takeover_mutex(path, _lock_payload(token))
    if mutex is None:
        return None
    try:
        try:
            judged = path.read_text()
        except FileNotFoundError:
            judged = None
        if judged is not None:
            if not lock_is_stale(path, stale_s)[0]:
                return None  # refreshed meanwhile
            aside = path.with_name(f".{path.name}.{token}.stale")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                aside = None
            if aside is not None:
                if aside.read_text() != judged:
                    # we moved a lock created after our check (its holder released and another took it): put
                    # it back without clobbering (link fails if the path exists again)
                    try:
                        os.link(aside, path)
                    except FileExistsError:
                        pass
                    aside.unlink(missing_ok=True)
                    return None
                aside.unlink(missing_ok=True)
            logging.getLogger("hirespath.io").warning("taking over the stale lock %s (%s)", path, why)
        if _create_exclusive(path, _lock_payload(token)):
            return ItemLock(path, token)
        return None
    finally:
        mutex.unlink(missing_ok=True)

"""Atomic file writes: a killed run never leaves a half-written file that a later run would read."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the file the mode a plain open() would (caches are shared on clusters)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    import threading
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
                holder, age = path.read_text().strip(), time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            host, _, pid = holder.rpartition(":")
            dead = host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))
            if dead or age > stale_s:
                log.warning(
                    "taking over the stale lock %s of %s (%s)",
                    path,
                    holder,
                    "process gone" if dead else f"untouched for {age:.0f} s",
                )
                path.unlink(missing_ok=True)
                continue
            if not waited:
                log.info("waiting for %s: %s holds %s", what or "another job", holder, path)
                waited = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(stale_s / 4):
            try:
                os.utime(path)
            except FileNotFoundError:
                return

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        try:
            if path.read_text().strip() == me:
                path.unlink()
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True

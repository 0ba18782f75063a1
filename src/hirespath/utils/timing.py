"""The process's start-up time, so a task's stage table can add up to what the user waited.

Importing torch, Lightning and the task's modules takes seconds before a task's first stage starts; a task reports
:func:`startup_seconds` (called at its start) as a stage of its own.
"""

from __future__ import annotations

import os
import time

# The fallback's reference: hirespath.cli imports this module first thing, so where the process's start cannot be
# read this is about when the `hirespath` command started (the interpreter's own start-up is not counted then).
_IMPORTED = time.monotonic()


def _process_age_linux() -> float | None:
    """Seconds since this process was started, from /proc (Linux): its start time in clock ticks after boot, against
    CLOCK_BOOTTIME, the clock the kernel counts it on (suspend included)."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            stat = f.read()
        # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")"
        fields = stat[stat.rindex(b")") + 2 :].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, no CLOCK_BOOTTIME (not Linux)
        return None
    age = now - started
    return age if age >= 0 else None


def startup_seconds() -> float:
    """Seconds from the start of this process to now (the process's age; call it when the task starts).

    Read from /proc on Linux (10 ms resolution); elsewhere, the seconds since :mod:`hirespath.cli` (or this module)
    was first imported.
    """
    age = _process_age_linux()
    return age if age is not None else time.monotonic() - _IMPORTED

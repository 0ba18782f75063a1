"""Errors caused by the user's input, as opposed to bugs.

The ``hirespath`` command prints an :class:`InputError`'s message alone (no traceback) and exits with status 1;
``HYDRA_FULL_ERROR=1`` shows the traceback as for any other error.
"""


class InputError(ValueError):
    """A bad config value, a missing or unreadable input file, a malformed CSV: the message names the key or the
    file, the value, and what would be valid."""


class StorageError(InputError):
    """The output folder takes no more (disk full, quota exceeded, read-only file system, a file size limit): the
    run stops with this message instead of failing every slide that follows; what was finished is kept and a rerun
    resumes."""

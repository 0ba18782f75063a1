"""Compared runs in rounds: one run of each per round, so a machine that slows down or speeds up for a while
(another job, a shared host) slows every compared configuration alike and their ratios hold. The encoder sweep,
the whole-slide embedding and the whole-slide segmentation benchmarks all time this way."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..utils.errors import InputError

K = TypeVar("K")
T = TypeVar("T")


def in_rounds(
    runs: dict[K, Callable[[], T]],
    rounds: int,
    stops: Callable[[K, BaseException], bool] | None = None,
    after_each: Callable[[], None] | None = None,
) -> dict[K, list[T] | BaseException]:
    """Each run's results, ``rounds`` of them, called round after round in the order of ``runs``.

    A run whose error ``stops(key, err)`` accepts (e.g. out of memory; or any, logged with the run it came from)
    gets that error instead of its results and leaves the rounds; any other error raises. ``after_each`` is called
    after every call (a progress bar).
    """
    results: dict[K, list[T] | BaseException] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            done = results[key]
            if isinstance(done, BaseException):
                continue
            try:
                done.append(run())
            except Exception as err:  # noqa: BLE001 — re-raised unless ``stops`` takes it
                if stops is None or not stops(key, err):
                    raise
                results[key] = err
            finally:
                if after_each is not None:
                    after_each()
    return results


def check_repeats(value, key: str) -> int:
    """``value`` of the config key ``key`` as a number of rounds: a whole number, at least 1 (InputError naming it)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{key}={value!r}: must be a whole number, at least 1")
    return value

"""CPU thread policy: how many intra-op threads the encoder gets when tile readers share the machine.

Measured on 2 cores (docs/design.md, "CPU threads under load"): op-parallel PyTorch stalls every parallel region on a
descheduled thread, so with one other busy process sparse + pruning ran 4.53 s with 2 threads but 2.35 s with 1
(dense: 15.7 s vs 16.9 s). The encoder's CPU tasks (models/cpu_tasks.py) take most of that stall away
(docs/benchmarks.md, "CPU bar under load"); the encoder still gets the cores busy readers leave free, never more than
this process may use.

Logging: the count a run starts with is one INFO line; the adaptive policy's re-choices (one per change, dozens in a
run) are DEBUG, so they do not break the progress bars; their history is in the run's summary (``threads``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from .errors import InputError

log = logging.getLogger("hirespath.threads")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM allocation), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def encoder_threads(requested: int | None, busy_readers: int, cores: int | None = None) -> int:
    """Intra-op threads for the encoder: ``requested`` (capped at the cores), else the cores left after
    ``busy_readers`` reader threads/processes, at least 1."""
    cores = cores or available_cores()
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"threads must be ≥ 1 (or null for automatic), got {requested}")
        return min(int(requested), cores)
    return max(1, cores - max(0, int(busy_readers)))


def dataloader_workers(requested: int | None, key: str = "num_workers", cap: int = 4, cores: int | None = None) -> int:
    """DataLoader worker processes: ``requested``, or for None ``min(cap, cores − 1)`` (one core stays with the main
    process; more workers than cores only contend, and torch warns about each loader). ``key`` names the setting in
    the error."""
    if requested is None:
        return max(0, min(int(cap), (cores or available_cores()) - 1))
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise InputError(f"{key} must be an integer ≥ 0 (0: load in the main process) or null (automatic: "
                         f"min({cap}, cores − 1)), got {requested!r}")  # fmt: skip
    return requested


@contextlib.contextmanager
def torch_threads(n: int, why: str = ""):
    """Run the body with ``n`` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    log.info("CPU threads: %d intra-op for the encoder (%d cores available%s)", n, available_cores(),
             f"; {why}" if why else "")  # fmt: skip
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def _spin(stop) -> None:
    while not stop.is_set():
        pass


@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` processes spinning on a core each for the duration of the body: the load a tile reader (or another
    job) puts on the machine, so a benchmark can measure the encoder under it."""
    import multiprocessing as mp

    if n <= 0:
        yield
        return
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


class AdaptiveThreads:
    """The encoder's intra-op threads while tile readers run beside it, re-chosen from how busy they really are.

    Starts with every core (the first slide's tiles are read ahead while nothing else runs, and a reader mostly
    waits on the encoder: measured 0–2 % of a core for 224–1792 px JPEG tiles), then after every batch counts the
    readers' measured busy time per wall second (smoothed) and leaves the cores they really use: a reader busy
    more than a quarter of a core keeps its core (a busy reader next to a full-width sparse kernel is the slow case
    above). ``readers`` caps what they can take. With ``requested`` set the count is fixed.
    """

    def __init__(self, requested: int | None, readers: int, cores: int | None = None):
        self.cores = cores or available_cores()
        self.fixed = requested is not None
        self.readers = max(0, int(readers))
        self.n = encoder_threads(requested, 0, self.cores)
        self.busy: float | None = None
        self.chosen = [self.n]

    def observe(self, reader_seconds: float, wall_seconds: float) -> int:
        if self.fixed or wall_seconds <= 0:
            return self.n
        busy = reader_seconds / wall_seconds
        self.busy = busy if self.busy is None else 0.5 * self.busy + 0.5 * busy
        want = encoder_threads(None, min(self.readers, math.ceil(self.busy - 0.25)), self.cores)
        if want != self.n:
            log.debug("CPU threads: %d → %d intra-op (tile readers busy %.2f cores)", self.n, want, self.busy)
            torch.set_num_threads(want)
            self.n = want
            self.chosen.append(want)
        return self.n

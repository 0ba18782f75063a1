"""Writing behind the device (``SlideJob.write_behind``, on CUDA by default): a sink's ``add`` in one writer
thread while the tile function runs the next batch, and a slide's closing in one closer thread while the next slide
streams (the runner settles it before the next closing starts)."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import SlideSink


class WriteBehind:
    """A sink whose ``add`` runs in one background thread, in order, while the caller goes on (the tile function
    runs the next batch: on CUDA the GPU does not wait for the host's stitching or h5 appends). At most ``depth``
    batches wait; ``add`` returns the refusals of the batches finished so far, ``drain`` those of the rest. An error
    in a background add is raised by the next ``add`` or ``drain``."""

    def __init__(self, sink: SlideSink, depth: int = 2):
        self.sink, self.depth, self.seconds = sink, depth, 0.0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="slide-write")
        self.pending: deque[Future] = deque()

    def _add(self, tiles, output, images) -> list[tuple[int, str]]:
        t0 = time.perf_counter()
        try:
            return self.sink.add(tiles, output, images)
        finally:
            self.seconds += time.perf_counter() - t0

    def _collect(self, keep: int) -> list[tuple[int, str]]:
        refused = []
        while len(self.pending) > keep:
            refused += self.pending.popleft().result()
        return refused

    def add(self, tiles, output, images) -> list[tuple[int, str]]:
        self.pending.append(self.pool.submit(self._add, tiles, output, images))
        return self._collect(self.depth)

    def drain(self) -> list[tuple[int, str]]:
        return self._collect(0)

    def stop(self) -> None:
        """Wait for the add running now (before the sink is closed or aborted); drop those not started."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def closing_result(future: Future):
    """The result of a slide closing in the background. Interrupted meanwhile (Ctrl-C, SIGTERM), this waits for the
    closing to end before the interrupt goes on: the slide's lock is released after its files are written, or
    another worker would take the slide (and remove its live temporaries) while they are."""
    try:
        return future.result()
    except BaseException:
        if not future.done():
            futures_wait([future])
        raise

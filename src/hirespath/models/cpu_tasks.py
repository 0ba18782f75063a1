"""CPU inference as a few dynamic task loops instead of many small, statically split parallel regions.

PyTorch runs every op as its own OpenMP region, split evenly over the intra-op threads and closed by a barrier.
When something else takes a core (a tile reader, a DataLoader worker, another job), the thread sharing that core
is descheduled for milliseconds and every region waits for it. Measured on 2 cores with one other busy process
(narrowed UNI2-h, 1344 px, docs/design.md "CPU threads under load"): the sparse kernel's ~100 small regions per block
(index gathers, SDPA per chunk of blocks, MLP chunks) made sparse + pruning 2.6× slower, dense attention (a few
long regions) 1.7×.

Here the token-wise work of a block — q/k/v and output projections, MLP chunks, the sparse kernel's chunks of
blocks — is cut into tasks that single-threaded workers pull from one queue: a descheduled worker just takes fewer
tasks, and a block waits on its workers a handful of times instead of once per op. Each task computes exactly what
the op would for its rows (no reduction crosses tasks), so results do not depend on which worker ran what.

Only CPU inference uses it (autograd and CUDA keep the usual path), with as many workers as the intra-op threads
the thread policy chose (``torch.get_num_threads()`` when a block starts). The encoder's ``cpu_parallel``: ``auto``
(default) runs the blocks with the sparse kernel as tasks and dense/eager ones op-parallel (measured idle on 2 cores:
sparse + pruning 5 % faster as tasks, dense 0–15 % slower: its few long regions barely stall, and tasks add Python
overhead), ``tasks`` or ``ops`` forces one for every block.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
R = TypeVar("R")
CPU_PARALLEL_MODES = ("auto", "tasks", "ops")  # tasks: this module; ops: each op parallel on its own (PyTorch's way)

_active: contextvars.ContextVar[_Runner | None] = contextvars.ContextVar("hirespath_cpu_tasks", default=None)
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _single_threaded_worker() -> None:
    # OpenMP's and MKL's thread counts are per thread: this worker's ops run inline. PyTorch first sets a new
    # thread to the process default on its first op (lazily): trigger that now, or it would undo the 1 later.
    torch.get_num_threads()
    torch.set_num_threads(1)  # also sets the process default for new threads: ``_pool`` restores it


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            before = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="hirespath-cpu", initializer=_single_threaded_worker)
            started = threading.Barrier(workers)  # start every worker now, while nothing else runs
            list(pool.map(lambda _: started.wait(), range(workers)))
            torch.set_num_threads(before)  # the workers' set_num_threads(1) also changed the process default
            _pools[workers] = pool
        return _pools[workers]


@dataclass
class _Runner:
    pool: ThreadPoolExecutor
    workers: int
    inference: bool  # the caller's thread-local modes, re-entered in each worker
    autocast: bool
    autocast_dtype: torch.dtype

    def call(self, fn: Callable[[T], R], item: T) -> R:
        mode = torch.inference_mode() if self.inference else torch.no_grad()
        autocast = torch.autocast("cpu", dtype=self.autocast_dtype) if self.autocast else contextlib.nullcontext()
        with mode, autocast:
            return fn(item)


def check_cpu_parallel(mode: str) -> None:
    if mode not in CPU_PARALLEL_MODES:
        raise ValueError(f"cpu_parallel must be one of {CPU_PARALLEL_MODES}, got {mode!r}")


def tasks_wanted(device: torch.device, mode: str = "auto", sparse: bool = True) -> bool:
    """Whether a block on ``device`` runs as tasks: CPU inference with more than one intra-op thread, and
    ``mode`` tasks, or auto for a block running the ``sparse`` kernel."""
    check_cpu_parallel(mode)
    wanted = mode == "tasks" or (mode == "auto" and sparse)
    return wanted and device.type == "cpu" and not torch.is_grad_enabled() and torch.get_num_threads() > 1


@contextlib.contextmanager
def cpu_tasks(device: torch.device, mode: str = "auto", sparse: bool = True):
    """Within the body, ``map_tasks`` (and the helpers below) run on the worker pool when ``tasks_wanted``."""
    if _active.get() is not None or not tasks_wanted(device, mode, sparse):
        yield
        return
    workers = torch.get_num_threads()
    runner = _Runner(
        _pool(workers),
        workers,
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"),
        torch.get_autocast_dtype("cpu"),
    )
    token = _active.set(runner)
    # The caller's own ops between task loops (norms, residual adds) run single-threaded too: an OpenMP team left
    # spinning after them would take a core from the workers (measured: 224 px tiles 1.5× slower).
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(workers)
        _active.reset(token)


def map_tasks(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(item) for item in items]``, on the worker pool inside ``cpu_tasks`` (in order of ``items``)."""
    runner = _active.get()
    if runner is None:
        return [fn(item) for item in items]
    futures = [runner.pool.submit(runner.call, fn, item) for item in items]
    try:
        return [f.result() for f in futures]
    except BaseException:  # an error or Ctrl-C: drop the tasks not started yet
        for f in futures:
            f.cancel()
        raise


MIN_TASK_ROWS = 256  # rows (batch × tokens) per task: below this GEMMs lose efficiency and task overhead shows


def row_chunks(length: int, chunk: int, batch: int = 1) -> list[tuple[int, int]]:
    """``(start, end)`` chunks of ``range(length)`` tokens, at most ``chunk`` long. Inside ``cpu_tasks``, also
    about 4 per worker (the last tasks run while other workers idle), each at least ``MIN_TASK_ROWS`` rows of a
    ``batch``-image batch."""
    runner = _active.get()
    if runner is not None:
        per_task = max(-(-MIN_TASK_ROWS // batch), -(-length // (4 * runner.workers)))
        chunk = min(chunk, per_task)
    chunk = max(1, chunk)
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def map_rows(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 1 << 30) -> Tensor:
    """``fn(x)`` for a token-wise ``fn`` (B×L×D → B×L×D'), over chunks of tokens as tasks inside ``cpu_tasks``
    (each task writes its rows of the output); outside, one call."""
    spans = row_chunks(x.shape[1], chunk, x.shape[0]) if _active.get() is not None else []
    if len(spans) <= 1:
        return fn(x)
    out: list[Tensor] = []
    lock = threading.Lock()

    def run(span: tuple[int, int]) -> None:
        y = fn(x[:, span[0] : span[1]])
        with lock:  # the first task to finish allocates the output: fn decides its dtype (autocast) and width
            if not out:
                out.append(y.new_empty(*x.shape[:2], *y.shape[2:]))
        out[0][:, span[0] : span[1]] = y

    map_tasks(run, spans)
    return out[0]

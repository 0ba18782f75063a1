"""CPU inference as task loops (models/cpu_tasks.py): same results as op-parallel PyTorch, really on the workers,
off for autograd, and the process's thread setting left alone."""

import threading

import pytest
import torch
from conftest import tiny_encoder

from hirespath.models import cpu_tasks
from hirespath.models.cpu_tasks import cpu_tasks as cpu_tasks_ctx
from hirespath.models.cpu_tasks import map_rows, map_tasks, row_chunks


@pytest.fixture
def task_threads(monkeypatch):
    """Names of the threads that ran each task."""
    names = []
    call = cpu_tasks._Runner.call

    def spy(self, fn, item):
        names.append((threading.current_thread().name, torch.get_num_threads()))
        return call(self, fn, item)

    monkeypatch.setattr(cpu_tasks._Runner, "call", spy)
    return names


CONFIGS = [
    dict(attention="dense"),
    dict(attention="sparse", window=2),
    dict(attention="sparse", window=2, prune_ratio=0.5, prune_layer=1),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["dense", "sparse", "sparse+prune"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_tasks_give_the_same_tokens_as_ops(kwargs, autocast, two_threads, task_threads):
    enc = tiny_encoder(**kwargs)
    images = torch.randn(3, 3, 224, 224)
    outs = {}
    for mode in ("ops", "tasks"):
        enc.cpu_parallel = mode
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs[mode] = enc(images)
        if mode == "ops":
            assert task_threads == []
    # every task ran on a single-threaded pool worker, and there were tasks in every block
    assert len(task_threads) >= 3 * enc.depth
    assert {name.split("_")[0] for name, _ in task_threads} == {"hirespath-cpu"}
    assert {n for _, n in task_threads} == {1}
    ops, tasks = outs["ops"], outs["tasks"]
    assert torch.equal(ops.positions, tasks.positions)
    # each task computes what the op computes for its rows; single- and multi-threaded GEMMs may round
    # differently, nothing more
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tasks.patch_tokens, ops.patch_tokens, **tol)
    torch.testing.assert_close(tasks.cls, ops.cls, **tol)


def test_tasks_under_no_grad_and_thread_setting_kept(two_threads, task_threads):
    enc = tiny_encoder(attention="sparse", window=2)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # no_grad (not inference_mode) is re-entered in the workers too
        out = enc(images)
    assert task_threads and torch.get_num_threads() == 2
    assert not out.patch_tokens.requires_grad


def test_auto_runs_sparse_blocks_as_tasks_and_dense_ones_op_parallel(two_threads, task_threads):
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tiny_encoder(attention="dense")(images)
        assert task_threads == []
        tiny_encoder(attention="sparse", window=16)(images)  # one window covers the grid: dense kernel
        assert task_threads == []
        tiny_encoder(attention="sparse", window=2)(images)
    assert task_threads


def test_autograd_and_one_thread_keep_the_plain_path(two_threads, task_threads):
    enc = tiny_encoder(attention="sparse", window=2)
    images = torch.randn(2, 3, 224, 224, requires_grad=True)
    enc(images).cls.sum().backward()  # training path: ops as usual, gradients flow
    assert images.grad is not None and task_threads == []
    torch.set_num_threads(1)
    with torch.inference_mode():
        enc(images.detach())
    assert task_threads == []


def test_map_tasks_order_errors_and_nesting(two_threads):
    with torch.inference_mode(), cpu_tasks_ctx(torch.device("cpu")):
        assert map_tasks(lambda i: i * i, range(20)) == [i * i for i in range(20)]
        # a task that maps again runs its items inline (no pool inside the pool)
        assert map_tasks(lambda i: map_tasks(lambda j: (i, j), range(2)), range(3)) == [
            [(i, 0), (i, 1)] for i in range(3)
        ]

        def fail(i):
            if i == 3:
                raise ValueError("task 3 failed")
            return i

        with pytest.raises(ValueError, match="task 3 failed"):
            map_tasks(fail, range(8))
        x = torch.randn(2, 1000, 8)
        w = torch.randn(8, 5)
        assert torch.equal(map_rows(lambda t: t @ w, x), x @ w)
        spans = row_chunks(1000, 1 << 30, batch=2)
        assert len(spans) == 8 and spans[0] == (0, 128) and spans[-1][1] == 1000  # 4 per worker, ≥ 128 tokens
    # outside the context: one chunk as long as asked, and a plain loop
    assert row_chunks(1000, 1 << 30) == [(0, 1000)]
    with pytest.raises(ValueError, match="cpu_parallel must be one of"):
        tiny_encoder(cpu_parallel="threads")

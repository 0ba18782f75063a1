"""Launcher configs compose and instantiate; the joblib launcher runs a 2-job multirun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import hirespath.tasks  # noqa: F401  (registers the hp.* resolvers and the config schemas)

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
LAUNCHERS = sorted(p.stem for p in (ROOT / "conf" / "hydra" / "launcher").glob("*.yaml"))


def run_task(task: str, *args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1",
        "OMP_NUM_THREADS": "1",
    }
    # Own process group: on timeout every process of the task (DDP ranks, DataLoader workers) is killed, so a hung
    # multi-process task fails the test; subprocess.run would kill only the first and wait for the others' pipes.
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tasks" / f"{task}.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{task} did not finish in {timeout} s:\n{stdout[-2000:]}{stderr[-4000:]}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return done


def test_launcher_files_present():
    assert {"joblib", "submitit_slurm"} <= set(LAUNCHERS)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_composes_and_instantiates(launcher):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("smoke", overrides=[f"hydra/launcher={launcher}", "trainer=ddp"], return_hydra_config=True)
    lc = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert lc["_target_"].startswith("hydra_plugins.")
    if launcher == "submitit_slurm":
        # GPUs and tasks per node follow trainer.devices (one DDP process per GPU).
        assert lc["gpus_per_node"] == 2 and lc["tasks_per_node"] == 2
        for key in ("partition", "timeout_min", "mem_gb", "cpus_per_task"):
            assert key in lc
        assert lc["submitit_folder"].endswith("/.submitit/%j")
    launcher_obj = instantiate(cfg.hydra.launcher)
    assert type(launcher_obj).__name__ in {"JoblibLauncher", "SlurmLauncher"}


def test_launcher_typo_fails():

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(Exception) as err:
            compose(
                "smoke",
                overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partitoin=gpu"],
                return_hydra_config=True,
            )
    assert "partitoin" in str(err.value)


def test_joblib_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    run_task(
        "smoke",
        "-m",
        "hydra/launcher=joblib",
        "lr=0.05,0.2",
        "num_samples=128",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    metrics = sorted(sweep.glob("*/metrics.json"))
    assert [m.parent.name for m in metrics] == ["0", "1"]
    for m in metrics:
        assert 0.0 <= json.loads(m.read_text())["test/accuracy"] <= 1.0
    overrides = [OmegaConf.load(m.parent / ".hydra" / "overrides.yaml") for m in metrics]
    assert sorted(x for o in overrides for x in o if x.startswith("lr=")) == ["lr=0.05", "lr=0.2"]


def test_parallel_jobs_extract_shared_embeddings_once(tmp_path):
    """Two jobs started together (joblib, a SLURM array) needing the same embeddings: one extracts, the other
    waits on the cache lock and then hits the cache."""
    from hirespath.data.panda_synthetic import make_synthetic_panda

    root = make_synthetic_panda(tmp_path / "panda", num_slides=8, size=(384, 512), seed=5)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        str(ROOT / "tasks" / "extract.py"),
        f"data.root={root}",
        "data.fov_um=96",
        "backbone=tiny",
        "resolution=224",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    procs = [
        subprocess.Popen(
            [*args, f"hydra.run.dir={tmp_path / f'job{i}'}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert sum("cache miss" in o for o in outs) == 1 and sum("cache hit" in o for o in outs) == 1, outs
    assert not list((tmp_path / "cache" / "embeddings").glob("*.lock"))


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    from hirespath.utils.io import exclusive_lock

    lock = tmp_path / "x.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()}:{dead.stdout.strip()}")
    with exclusive_lock(lock, poll_s=0.1):
        assert lock.read_text() == f"{socket.gethostname()}:{os.getpid()}"
    assert not lock.exists()


def test_run_task_fails_a_task_that_does_not_finish(tmp_path):
    """The harness kills the task's whole process group on timeout and fails, instead of waiting on its pipes."""
    with pytest.raises(pytest.fail.Exception, match="did not finish in 1 s"):
        run_task("smoke", f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=1)

"""W&B in multiruns: offline by default, one finished run per job, grouped by multirun, named by overrides."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hirespath.utils.wandb import log_images, offline_runs

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env_extra=None, ok=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)  # offline must be the default, not something the test sets
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tasks" / "smoke.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_offline_multirun_one_finished_run_per_job(tmp_path):
    # The basic launcher runs both jobs in one process: a run left open by job 0 would leak into job 1.
    sweep = tmp_path / "logs" / "smoke" / "multiruns" / "2026-01-01_00-00-00"
    _run(
        [
            "-m",
            "logger=wandb",
            "lr=0.05,0.2",
            "num_samples=128",
            "trainer.max_epochs=1",
            "+resume=true",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    runs = offline_runs(sweep)
    assert len(runs) == 2
    assert sorted(Path(r["dir"]).parts[-3] for r in runs) == ["0", "1"]  # one run in each job directory
    assert len({r["id"] for r in runs}) == 2
    assert all(r["finished"] and r["exit_code"] == 0 for r in runs)
    assert {r["group"] for r in runs} == {"smoke-2026-01-01_00-00-00"}
    # Named by the job's overrides, minus those saying where/how it runs (logger=, trainer.*, hydra.*, resume).
    assert sorted(r["name"] for r in runs) == ["lr=0.05,num_samples=128", "lr=0.2,num_samples=128"]
    assert all(r["tags"] == ["smoke"] and r["job_type"] == "smoke" for r in runs)
    for r in runs:
        media = list(Path(r["dir"]).glob("files/media/images/smoke/*.png"))
        assert media, f"no logged image in {r['dir']}"
        config = Path(r["dir"]) / "files" / "config.yaml"
        if config.exists():  # written at finish: the resolved config, not interpolations
            assert "${" not in config.read_text()


def test_failed_job_finishes_its_run_as_failed(tmp_path):
    out = tmp_path / "run"
    proc = _run(["logger=wandb", "lr=-1", f"hydra.run.dir={out}"], tmp_path, ok=False)
    assert proc.returncode != 0
    runs = offline_runs(out)
    assert len(runs) == 1 and runs[0]["finished"] and runs[0]["exit_code"] != 0


def test_log_images_skips_non_wandb_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    assert log_images([CSVLogger(tmp_path)], "x", [np.zeros((4, 4, 3), np.uint8)]) == 0


def test_log_images_validates(tmp_path):
    class FakeWandb:
        pass

    from hirespath.utils import wandb as hw

    with pytest.raises(FileNotFoundError, match="missing.png"):
        hw._as_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="H×W"):
        hw._as_image(np.zeros((2, 2, 2, 2)))
    assert hw._as_image(np.ones((3, 5, 7), np.float32)).shape == (5, 7, 3)


def test_sigterm_stops_the_job(tmp_path):
    """kill / scancel send SIGTERM, which Lightning only records: the job (and a sweep) must stop, not train on."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tasks" / "smoke.py"),
            "trainer.max_epochs=100000",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = tmp_path / "run" / "csv" / "version_0" / "metrics.csv"  # written once training runs
    deadline = time.time() + 120
    while time.time() < deadline and not started.is_file():
        time.sleep(0.5)
    time.sleep(1)  # inside trainer.fit
    assert proc.poll() is None and started.is_file()
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM and time.time() - start < 30, proc.stdout.read()[-2000:]


def test_an_offline_log_read_while_it_is_written(tmp_path, caplog):
    """W&B's service writes an offline run's log while `finish` returns: reading it then can meet a last record cut
    short. It reads as the records before it (not finished yet), never a protobuf DecodeError; the wait for the exit
    record goes on until it comes (a multirun job crashed at its end on that error)."""
    import shutil

    import wandb

    from hirespath.utils.wandb import _wait_for_exit_record, read_offline_run

    run = wandb.init(mode="offline", dir=str(tmp_path), project="p", name="cut")
    for step in range(3):
        run.log({"loss": float(step)})
    run.finish()
    (whole,) = tmp_path.rglob("offline-run-*/*.wandb")
    _wait_for_exit_record(whole)  # the whole log to cut, as finish_runs waits for it (finish may return before)
    full = read_offline_run(whole.parent)
    data = whole.read_bytes()
    assert full["finished"] and full["history_keys"] >= {"loss"}
    cut_dir = tmp_path / "offline-run-cut"
    cut_dir.mkdir()
    finished, cuts = [], range(8, len(data), max(1, len(data) // 97))  # every ~1 %, most inside a record
    for cut in cuts:
        (cut_dir / whole.name).write_bytes(data[:cut])
        finished.append(read_offline_run(cut_dir)["finished"])
    assert not finished[0] and finished == sorted(finished)  # finished once the exit record is whole, not before
    (cut_dir / whole.name).write_bytes(data[: cuts[finished.index(True) - 1 if True in finished else -1]])
    _wait_for_exit_record(cut_dir / whole.name, timeout_s=0.2)  # gives up with a warning, does not raise
    assert "no exit record" in caplog.text
    shutil.copy(whole, cut_dir / whole.name)
    assert read_offline_run(cut_dir)["finished"]

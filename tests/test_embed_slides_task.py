"""The embed_slides task through Hydra: one process, then trainer=ddp (2 gloo ranks share the slides)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import compose_task
from test_launchers import run_task
from test_slide_embedding import synthetic_image

from hirespath.data.panda_synthetic import write_pyramid
from hirespath.tasks.embed_slides import run_embed_slides
from hirespath.utils.errors import InputError

TINY = [
    "backbone=tiny",
    "+backbone.overrides.depth=2",
    "tile.size=224",
    "attention.window=4",
    "pruner.prune_layer=1",
    "embed.num_workers=0",
    "embed.thumbnails=false",
]


@pytest.fixture(scope="module")
def wsi_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsis")
    for i in range(3):
        write_pyramid(root / f"s{i}.tiff", synthetic_image(600, 450, seed=i), 0.5, compression="jpeg", levels=(1, 4))
    return root


def _features(job, tag_glob="features_*"):
    (tdir,) = job.glob("20x_224px_0px_overlap")
    (fdir,) = tdir.glob(tag_glob)
    return {p.stem: p for p in fdir.glob("*.h5")}


def test_task_composes_and_embeds(wsi_dir, tmp_path):
    job = tmp_path / "job"
    cfg = compose_task("embed_slides", [f"wsi_dir={wsi_dir}", f"job_dir={job}", *TINY], tmp_path / "run")
    summary = run_embed_slides(cfg)
    assert summary["slides_done"] == 3 and summary["tiles"] > 0
    files = _features(job)
    assert sorted(files) == ["s0", "s1", "s2"]
    with h5py.File(files["s0"]) as f:
        assert f["features"].dtype == np.float32 and f["features"].shape[1] == 96
        assert f["features"].attrs["attention"] == "sparse" and int(f["coords"].attrs["patch_size"]) == 224


def test_task_needs_slides(tmp_path):
    cfg = compose_task("embed_slides", [f"job_dir={tmp_path}", *TINY], tmp_path / "run")
    with pytest.raises(ValueError, match="wsi_dir=DIR .* or slides=LIST.csv"):
        run_embed_slides(cfg)


def test_ddp_ranks_share_the_slides(wsi_dir, tmp_path):
    """trainer=ddp: two processes, every slide embedded exactly once, with the numbers of one process."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cfg = compose_task("embed_slides", [f"wsi_dir={wsi_dir}", f"job_dir={single}", *TINY], tmp_path / "run")
    run_embed_slides(cfg)
    run_task(
        "embed_slides",
        f"wsi_dir={wsi_dir}",
        f"job_dir={ddp}",
        *TINY,
        "trainer=ddp",
        f"hydra.run.dir={tmp_path / 'ddp_run'}",
        cwd=tmp_path,
        timeout=400,
    )
    (summary,) = ddp.glob("*/features_*/summary.json")  # the features folder's, both ranks' parts merged
    ranks = json.loads(summary.read_text())["workers"].values()
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert sorted(s for r in ranks for s in (e["slide"] for e in r["done"])) == ["s0", "s1", "s2"]
    a, b = _features(single), _features(ddp)
    assert sorted(a) == sorted(b)
    for slide in a:
        with h5py.File(a[slide]) as fa, h5py.File(b[slide]) as fb:
            np.testing.assert_array_equal(fa["coords"][:], fb["coords"][:])
            np.testing.assert_allclose(fa["features"][:], fb["features"][:], atol=1e-5, rtol=1e-5)


def test_ddp_inside_a_joblib_job_is_refused_before_any_rank_starts(wsi_dir, tmp_path):
    """Lightning starts the other ranks by running the command line again, which a joblib worker has not: the run
    died with "the following arguments are required: --pipe" and a SIGKILLed worker."""
    from test_cli import run_cli

    proc = run_cli("embed_slides", "-m", "hydra/launcher=joblib", "trainer=ddp", "trainer.accelerator=cpu",
                   f"wsi_dir={wsi_dir}", f"job_dir={tmp_path / 'job'}", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   cwd=tmp_path, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "trainer=ddp cannot start its ranks inside a joblib job" in out and "--pipe" not in out, out[-3000:]
    assert not list(tmp_path.glob("job/*/features_*/*.h5"))


def test_the_joblib_check_leaves_single_runs_and_other_launchers_alone():
    """Only a multirun's joblib job is refused: a single run that names the joblib launcher does not use it."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from hirespath.slides.launch import _check_rank_start

    _SubprocessScriptLauncher = type("_SubprocessScriptLauncher", (), {})
    fabric = SimpleNamespace(world_size=2, _strategy=SimpleNamespace(launcher=_SubprocessScriptLauncher()))
    conf = str(Path(__file__).parents[1] / "conf")
    for launcher, mode, refused in (("joblib", RunMode.MULTIRUN, True), ("joblib", RunMode.RUN, False),
                                    ("submitit_slurm", RunMode.MULTIRUN, False)):  # fmt: skip
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("smoke", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        cfg.hydra.mode = mode
        cfg.hydra.sweep.dir = "/tmp/sweep"
        HydraConfig.instance().set_config(cfg)
        try:
            if refused:
                with pytest.raises(InputError, match="inside a joblib job"):
                    _check_rank_start(fabric)
            else:
                _check_rank_start(fabric)
        finally:
            HydraConfig.instance().cfg = None


RANKS_SCRIPT = """
import sys

import lightning as L

from hirespath.slides.launch import run_on_workers

fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
failing = int(sys.argv[1])


def work():
    if fabric.global_rank == failing:
        raise OSError(28, "No space left on device")
    return f"slides of rank {fabric.global_rank} done"


print(f"rank {fabric.global_rank}: {run_on_workers(fabric, work, merge=' and '.join)}", flush=True)
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_a_rank_that_fails_does_not_leave_the_others_waiting(tmp_path, failing):
    """trainer=ddp: a rank whose slides stop with an error (a full disk, a bug) still meets the others where they
    wait for it, and tells them; they stop with an error that names it, instead of waiting at a barrier for a rank
    that is gone until torch's timeout (30 minutes; a SLURM job's GPUs idle all that while)."""
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(failing)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "No space left on device" in out, out[-3000:]
    assert f"rank {failing} of 2 stopped with an error" in out, out[-3000:]
    assert f"rank {1 - failing}: slides" not in out  # the healthy rank does not report success


def test_ranks_without_errors_all_finish(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), "-1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    both = "slides of rank 0 done and slides of rank 1 done"  # each rank gets the run's result, not its share
    assert f"rank 0: {both}" in proc.stdout and f"rank 1: {both}" in proc.stdout


def test_summary_and_per_slide_timings_go_to_wandb(wsi_dir, tmp_path):
    from hirespath.utils.wandb import finish_runs, offline_runs

    out = tmp_path / "run"
    cfg = compose_task("embed_slides", [f"wsi_dir={wsi_dir}", f"job_dir={tmp_path / 'job'}", *TINY, "logger=wandb"],
                       out)  # fmt: skip
    run_embed_slides(cfg)
    finish_runs()  # what task_wrapper does when the task returns
    (run,) = offline_runs(out)
    assert (
        run["finished"]
        and {"slide/encode_s", "slide/mm2_per_s", "embed/tiles", "embed/stage_seconds/read"} <= run["history_keys"]
    )

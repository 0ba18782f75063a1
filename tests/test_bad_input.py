"""Bad input, as a new user gives it (issue 18): each case fails with a message naming the file or value and what is
valid, config errors come before anything is extracted, and Ctrl-C / failures end the way the README says."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from hirespath.configs import ConfigValidationError
from hirespath.data.panda import load_or_make_split, read_labels
from hirespath.data.panda_synthetic import make_synthetic_panda
from hirespath.tasks import task_wrapper

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.fov_um=192", "backbone=tiny", "resolution=56", "attention.window=2", "pruner.prune_layer=2"]


@pytest.fixture(scope="module")
def panda_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("panda_bad")
    make_synthetic_panda(root, num_slides=12, size=(512, 768), seed=3)
    return root


def _copy_root(src: Path, dst: Path, with_images: bool = True) -> Path:
    import shutil

    (dst / "train_images").mkdir(parents=True)
    shutil.copy(src / "train.csv", dst / "train.csv")
    if with_images:
        for f in (src / "train_images").iterdir():
            os.symlink(f, dst / "train_images" / f.name)
    return dst


def _cfg(task, root, tmp_path, *overrides):
    from conftest import compose_task

    return compose_task(
        task, [f"data.root={root}", *TINY, "figures.num_rois=0", *overrides], tmp_path / "run", tmp_path / "cache"
    )


def _nothing_extracted(tmp_path):
    return not list((tmp_path / "cache").glob("embeddings/*.pt")) and not (tmp_path / "cache" / "panda").exists()


# 1. duplicate image_ids


def test_conflicting_duplicate_ids_are_refused_before_extraction(panda_root, tmp_path):
    from hirespath.tasks.classify import run_classify

    root = _copy_root(panda_root, tmp_path / "panda")
    labels = pd.read_csv(root / "train.csv")
    dup = labels.iloc[[0]].copy()
    dup["isup_grade"] = 5 if labels.isup_grade[0] != 5 else 0
    pd.concat([labels, dup]).to_csv(root / "train.csv", index=False)
    image_id = labels.image_id[0]
    with pytest.raises(ValueError) as err:
        task_wrapper(run_classify)(_cfg("classify", root, tmp_path, "head=knn", "head.k=3"))
    msg = str(err.value)
    assert str(root / "train.csv") in msg and image_id in msg, msg
    assert f"rows 2, {len(labels) + 2}: isup_grade {labels.isup_grade[0]}, {dup.isup_grade.iloc[0]}" in msg, msg
    assert not list((tmp_path / "cache").glob("embeddings/*.pt"))


def test_exact_duplicate_rows_are_dropped_with_a_warning(panda_root, tmp_path, caplog):
    root = _copy_root(panda_root, tmp_path / "panda", with_images=False)
    labels = pd.read_csv(root / "train.csv")
    pd.concat([labels, labels.iloc[[3]]]).to_csv(root / "train.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="hirespath.panda"):
        df = read_labels(root)
    assert len(df) == len(labels) and df.image_id.is_unique
    assert f"{labels.image_id[3]} (rows 5, {len(labels) + 2})" in caplog.text


def test_extract_runs_with_a_real_presets_empty_overrides(panda_root, tmp_path, monkeypatch):
    """Every real preset ships `backbone.overrides: {}`; extract's cache key read it with
    `OmegaConf.to_container(overrides or {})`, which raised on the plain {} that an empty (falsy) node gave: extract
    failed for uni, uni2_h, ... (these tests narrow the tiny preset, whose overrides are not empty). The model is
    swapped for the tiny one here; the config, and so the key, is uni's."""
    from conftest import tiny_encoder

    from hirespath.tasks import extract

    real = extract.instantiate

    def instantiate(node, *args, **kwargs):
        return (
            tiny_encoder()
            if str(node.get("_target_", "")).endswith("encoder_from_config")
            else real(node, *args, **kwargs)
        )

    monkeypatch.setattr(extract, "instantiate", instantiate)
    cfg = _cfg("extract", panda_root, tmp_path, "backbone=uni")
    assert cfg.backbone.name == "uni" and not cfg.backbone.overrides
    emb = extract.run_extract(cfg)
    assert len(emb["image_id"]) == 12 and not emb["failed"]


# 2. no usable slide; a split left empty


def test_root_without_usable_slides_errors_with_skipped_csv(panda_root, tmp_path):
    from hirespath.tasks.extract import run_extract

    root = _copy_root(panda_root, tmp_path / "panda", with_images=False)  # full train.csv, empty train_images/
    with pytest.raises(ValueError) as err:
        run_extract(_cfg("extract", root, tmp_path))
    skipped_csv = tmp_path / "run" / "skipped.csv"
    assert f"no usable slide under {root}: 12 of 12 skipped, reasons in {skipped_csv}" in str(err.value)
    skipped = pd.read_csv(skipped_csv)
    assert len(skipped) == 12 and skipped.reason.str.startswith("missing file").all()
    assert not list((tmp_path / "cache").glob("embeddings/*.pt"))
    # the slides added afterwards are read: a skip is remembered only for the file it was about
    for f in (panda_root / "train_images").iterdir():
        os.symlink(f, root / "train_images" / f.name)
    emb = run_extract(_cfg("extract", root, tmp_path))
    assert len(emb["image_id"]) == 12 and not emb["failed"]


def test_skipping_that_empties_the_test_split_is_refused(panda_root, tmp_path):
    from hirespath.tasks.classify import run_classify

    root = _copy_root(panda_root, tmp_path / "panda")
    cfg = _cfg("classify", root, tmp_path, "head=knn", "head.k=3")
    split = load_or_make_split(root, tmp_path / "split.csv")
    for image_id in split[split.split == "test"].image_id:
        (root / "train_images" / f"{image_id}.tiff").unlink()
    cfg.data.split_csv = str(tmp_path / "split.csv")
    with pytest.raises(ValueError, match=r"leaves the test split empty .*skipped and why are in .*skipped.csv"):
        run_classify(cfg)
    assert (tmp_path / "run" / "skipped.csv").is_file() and not list((tmp_path / "cache").glob("embeddings/*.pt"))


def test_split_file_leaving_a_split_or_a_grade_empty(panda_root, tmp_path):
    root = _copy_root(panda_root, tmp_path / "panda", with_images=False)
    split = load_or_make_split(root, tmp_path / "split.csv")
    split.assign(split="train").to_csv(tmp_path / "all_train.csv", index=False)
    with pytest.raises(ValueError, match=r"all_train.csv leaves the test split empty"):
        load_or_make_split(root, tmp_path / "all_train.csv")
    one_grade = split.copy()
    one_grade.loc[one_grade.isup_grade != 0, "split"] = "test"
    one_grade.loc[one_grade.isup_grade == 0, "split"] = "train"
    one_grade.to_csv(tmp_path / "one_grade.csv", index=False)
    with pytest.raises(ValueError, match=r"single ISUP grade \(0\) in the train split"):
        load_or_make_split(root, tmp_path / "one_grade.csv")
    split.assign(split=split.split.replace({"test": "tset"})).to_csv(tmp_path / "typo.csv", index=False)
    with pytest.raises(ValueError, match=r"typo.csv: split must be one of \['train', 'val', 'test'\]; bad rows: row"):
        load_or_make_split(root, tmp_path / "typo.csv")


# 3, 4, 7. options checked before anything is read or extracted


@pytest.mark.parametrize(
    "task, overrides, words",
    [
        ("classify", ["features=foo"], ["features='foo'", "'cls', 'mean', 'cls+mean'"]),
        ("extract", ["features=foo"], ["features='foo'"]),
        ("classify", ["head=mask2former"], ["head.name='mask2former'", "['knn', 'linear_probe']", "is for segment"]),
        ("classify", ["head=knn", "+head.kk=3"], ["head.kk: not a key of KNNHeadConfig", "did you mean head.k?"]),
        ("classify", ["head=knn", "head.k=0"], ["head.k=0", ">= 1"]),
        ("extract", ["data.default_mpp=-1"], ["data.default_mpp=-1.0", "microns per pixel, between 0.01 and 50"]),
        ("extract", ["data.default_mpp=500"], ["data.default_mpp=500.0", "a magnification is not an mpp"]),
        ("extract", ["data.min_tissue=1.5", "data.fov_um=0"], ["data.min_tissue=1.5", "data.fov_um=0"]),
        ("extract", ["extract.precision=bf16-mix"], ["extract.precision='bf16-mix'", "did you mean 'bf16-mixed'"]),
        (
            "extract",
            ["attention.mode=foo", "attention.window=0", "pruner.prune_ratio=1.0", "pruner.prune_layer=9"],
            ["attention.mode='foo'", "attention.window=0", "pruner.prune_ratio=1.0", "pruner.prune_layer=9", "[1, 5]"],
        ),
    ],
)
def test_config_errors_come_before_any_extraction(panda_root, tmp_path, task, overrides, words, caplog):
    from hirespath.tasks.classify import run_classify
    from hirespath.tasks.extract import run_extract

    cfg = _cfg(task, panda_root, tmp_path, *overrides)
    with caplog.at_level(logging.INFO), pytest.raises(ConfigValidationError) as err:
        task_wrapper({"classify": run_classify, "extract": run_extract}[task])(cfg)
    msg = str(err.value)
    for w in words:
        assert w in msg, msg
    assert _nothing_extracted(tmp_path) and "extracting" not in caplog.text
    assert not (tmp_path / "run" / "skipped.csv").exists()


def test_segment_refuses_classification_options():
    from conftest import compose_task

    cfg = compose_task("segment", ["head=knn", "data=panda"], "/nonexistent")
    from hirespath.configs import validate_config

    with pytest.raises(ConfigValidationError) as err:
        validate_config(cfg)
    assert "head.name='knn': must be one of ['mask2former']" in str(err.value)
    assert "data.name='panda': must be one of ['segpath']" in str(err.value)


def test_features_agree_with_the_code():
    """Validation accepts exactly the features the code computes."""
    from conftest import compose_task

    from hirespath.configs import validate_config
    from hirespath.embeddings.features import FEATURES as SLIDE_FEATURES
    from hirespath.tasks.classify import FEATURES

    assert FEATURES == SLIDE_FEATURES
    for features in FEATURES:
        validate_config(compose_task("classify", [f"features={features}"], "/nonexistent"), task="classify")
        validate_config(compose_task("embed_slides", ["wsi_dir=/", f"embed.features={features}"], "/x"), "embed_slides")


@pytest.mark.parametrize("overrides", [["num_slides=0"], ["num_slides=3"], ["dataset=pandas"]])
def test_make_synthetic_refuses_too_few_slides(tmp_path, overrides):
    from conftest import compose_task

    from hirespath.tasks.make_synthetic import run_make_synthetic

    cfg = compose_task("make_synthetic", [f"root={tmp_path / 'out'}", *overrides], tmp_path / "run")
    with pytest.raises(ConfigValidationError, match=r"num_slides=\d: must be an integer >= 4|dataset='pandas'"):
        task_wrapper(run_make_synthetic)(cfg)
    assert not (tmp_path / "out").exists()


# 5. messages that name the file and what is valid


def test_empty_and_header_only_train_csv(tmp_path):
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train.csv'} is empty; expected PANDA's train.csv: a header"):
        read_labels(tmp_path)
    (tmp_path / "train.csv").write_text("image_id,data_provider,isup_grade,gleason_score\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train.csv'} has a header but no rows"):
        load_or_make_split(tmp_path, tmp_path / "split.csv")


def test_bad_weights_files_are_named(tmp_path):
    import hirespath

    cases = {
        "empty.bin": (b"", "is empty (0 bytes"),
        "empty.safetensors": (b"", "is empty (0 bytes"),
        "text.bin": (b"error: not found\n", "is a text file (17 bytes, starting 'error: not found')"),
        "lfs.safetensors": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "Git LFS pointer"),
        "junk.pth": (bytes(range(256)) * 4, "could not read weights file"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as err:
            hirespath.create_encoder("tiny", weights=str(path))
        msg = str(err.value)
        assert str(path) in msg and words in msg and ".safetensors" in msg, msg
        assert not msg.rstrip().endswith(":"), msg


def test_encoder_state_dict_of_another_depth_names_preset_and_depth(tmp_path):
    import hirespath

    enc = hirespath.create_encoder("tiny", depth=2)
    torch.save(enc.state_dict(), tmp_path / "enc.pt")  # HiResEncoder's keys: vit.blocks.0...
    with pytest.raises(ValueError) as err:
        hirespath.create_encoder("tiny", weights=str(tmp_path / "enc.pt"))
    msg = str(err.value)
    assert "'vit." not in msg, msg  # compared under the model's own key names
    assert "the file holds a ViT of depth 2, dim 96" in msg and "backbone=tiny is depth 6" in msg, msg
    assert "backbone.overrides.depth=2" in msg, msg
    hirespath.create_encoder("tiny", depth=2, weights=str(tmp_path / "enc.pt"))  # what the hint says works


def test_truncated_tiff_is_named_truncated(panda_root, tmp_path):
    from hirespath.wsi.reader import SlideError
    from hirespath.wsi.rois import locate_rois

    image_id = pd.read_csv(panda_root / "train.csv").image_id[0]
    data = (panda_root / "train_images" / f"{image_id}.tiff").read_bytes()
    for frac in (0.5, 0.9):
        path = tmp_path / f"cut{frac}.tiff"
        path.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(SlideError, match=rf"truncated file cut{frac}.tiff: \d+ bytes, but its image data reaches"):
            locate_rois(path, 192)


# 6, 7. through the entry point: Ctrl-C exits 130 with the task's line; a traceback is printed once


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, **extra}


@pytest.mark.slow
@pytest.mark.parametrize("full_error", ["0", "1"])
def test_failure_prints_at_most_one_traceback_and_the_task_line(panda_root, tmp_path, full_error):
    """A train.csv that lists a slide twice with two grades: the user's input, so its message alone (one traceback
    with HYDRA_FULL_ERROR=1, never two); the task's line names the run folder, whose log keeps the traceback."""
    root = _copy_root(panda_root, tmp_path / "panda")
    labels = pd.read_csv(root / "train.csv")
    pd.concat([labels, labels.iloc[[0]].assign(isup_grade=(labels.isup_grade[0] + 1) % 6)]).to_csv(
        root / "train.csv", index=False
    )
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tasks" / "classify.py"),
            f"data.root={root}",
            *TINY,
            "head=knn",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run}",
        ],  # fmt: skip
        cwd=tmp_path,
        env=_env(HYDRA_FULL_ERROR=full_error),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert out.count("Traceback (most recent call last)") == (1 if full_error == "1" else 0), out
    assert f"task failed; outputs so far are in {run}: InputError: {root / 'train.csv'}" in out, out
    assert (f"error: {root / 'train.csv'}: image_ids listed more than once" in proc.stderr) == (full_error == "0")
    assert labels.image_id[0] in out
    log_file = next(run.glob("*.log"))  # the job's log file keeps the traceback
    assert "Traceback (most recent call last)" in log_file.read_text()


def test_a_stopped_slide_task_names_its_job_dir_as_where_its_outputs_are(tmp_path, caplog):
    """A slide task's outputs (what a rerun resumes) are in its job_dir; the stop line named only the run's log
    folder, where there are none."""
    import logging

    from omegaconf import OmegaConf

    from hirespath.utils import hydra

    cfg = OmegaConf.create({"task_name": "segment_slides", "job_dir": str(tmp_path / "seg"),
                            "paths": {"output_dir": str(tmp_path / "run")}})  # fmt: skip

    def stopped(cfg):
        raise KeyboardInterrupt

    def failed(cfg):
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR, logger="hirespath"):  # refused before any slide: no job_dir made
        with pytest.raises(RuntimeError):
            hydra._run(failed, cfg, hydra._done_marker(cfg), [])
    assert [r.getMessage() for r in caplog.records if "outputs so far" in r.getMessage()] == [
        f"task failed; outputs so far are in {tmp_path / 'run'} (this run's log; job_dir={tmp_path / 'seg'} was not "
        "made): RuntimeError: a bug"]  # fmt: skip
    caplog.clear()
    (tmp_path / "seg").mkdir()
    with caplog.at_level(logging.ERROR, logger="hirespath"):
        with pytest.raises(SystemExit) as exit_:
            hydra._run(stopped, cfg, hydra._done_marker(cfg), [])
        with pytest.raises(RuntimeError):
            hydra._run(failed, cfg, hydra._done_marker(cfg), [])
    assert exit_.value.code == 130
    where = f"outputs so far are in {tmp_path / 'seg'} (this run's log: {tmp_path / 'run'})"
    assert [r.getMessage() for r in caplog.records if "outputs so far" in r.getMessage()] == [
        f"task interrupted (SIGINT); {where}", f"task failed; {where}: RuntimeError: a bug"]  # fmt: skip
    # SIGTERM (SLURM's preemption) reaches the DataLoader workers too, and torch's "worker killed" error replaced
    # the stop: the run exited 1 as "task failed" where the README promises "task interrupted", status 143
    caplog.clear()

    def preempted(cfg):
        try:
            raise SystemExit(143)  # what the SIGTERM handler raises
        except SystemExit:
            raise RuntimeError("DataLoader worker (pid 16757) is killed by signal: Terminated.") from None

    with caplog.at_level(logging.ERROR, logger="hirespath"), pytest.raises(SystemExit) as exit_:
        hydra._run(preempted, cfg, hydra._done_marker(cfg), [signal.SIGTERM])
    assert exit_.value.code == 143
    assert [r.getMessage() for r in caplog.records if "outputs so far" in r.getMessage()] == [
        f"task interrupted (SIGTERM); {where} (while stopping: RuntimeError: DataLoader worker (pid 16757) is killed "
        "by signal: Terminated.)"]  # fmt: skip
    caplog.clear()  # mil's job_dir holds only the embeddings it reuses: its outputs are the run's
    mil = OmegaConf.merge(cfg, {"task_name": "mil", "job_dir": str(tmp_path / "cache")})
    with caplog.at_level(logging.ERROR, logger="hirespath"), pytest.raises(RuntimeError):
        hydra._run(failed, mil, hydra._done_marker(mil), [])
    assert f"task failed; outputs so far are in {tmp_path / 'run'}: RuntimeError" in caplog.text


@pytest.mark.slow
def test_ctrl_c_during_extraction_exits_130_with_the_task_line(panda_root, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tasks" / "extract.py"), f"data.root={panda_root}", "data.fov_um=192",
           "backbone=tiny", "attention=dense", "pruner=none", "resolution=1344", "extract.batch_size=1",
           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]  # fmt: skip
    log = tmp_path / "stdout.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 240
            while "extracting" not in log.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert "extracting" in log.read_text(), log.read_text()[-3000:]
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log.read_text()
    assert rc == 130, out[-3000:]
    assert f"task interrupted (SIGINT); outputs so far are in {run}" in out, out[-3000:]
    assert out.count("Traceback (most recent call last)") == 0, out[-3000:]


# 6. slide tasks (issue 25 items 9, 10, 12): config errors before any model, weights or slide


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if anything builds a ViT (the model and its weights come after validation)."""
    import hirespath.models.backbones as backbones
    import hirespath.models.encoder as encoder

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the config was validated")

    monkeypatch.setattr(backbones, "build_timm_model", built)
    monkeypatch.setattr(encoder, "build_timm_model", built)


def _slide_task(task, tmp_path, *overrides):
    from conftest import compose_task

    from hirespath.tasks.embed_slides import run_embed_slides
    from hirespath.tasks.mil import run_mil

    base = [f"wsi_dir={tmp_path}"] if task == "embed_slides" else [f"data.root={tmp_path}"]
    cfg = compose_task(task, [*base, *overrides], tmp_path / "run", tmp_path / "cache")
    run = {"embed_slides": run_embed_slides, "mil": run_mil}[task]
    with pytest.raises(ConfigValidationError) as err:
        task_wrapper(run)(cfg)
    return str(err.value)


@pytest.mark.parametrize("task", ["embed_slides", "mil"])
def test_tile_size_fails_before_the_model_is_built(task, tmp_path, no_model_built):
    msg = _slide_task(task, tmp_path, "backbone=uni2_h", "tile.size=230")
    assert "tile.size=230" in msg and "224 or 238" in msg, msg


def test_tile_error_comes_before_the_weights_error(tmp_path, no_model_built):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"not a checkpoint")
    msg = _slide_task("embed_slides", tmp_path, f"backbone.weights={bad}", "tile.mpp=0")
    assert "tile.mpp=0.0" in msg, msg


@pytest.mark.parametrize("task", ["embed_slides", "mil"])
def test_run_wide_embedding_options_fail_once_before_any_slide(task, tmp_path, no_model_built):
    msg = _slide_task(task, tmp_path, "embed.reader=foo", "embed.num_workers=-1")
    assert "embed.reader='foo'" in msg and "embed.num_workers=-1" in msg, msg
    assert not (tmp_path / "embeddings").exists() and not (tmp_path / "cache" / "slide_embeddings").exists()


@pytest.mark.parametrize("task", ["embed_slides", "mil"])
def test_job_dir_that_is_a_file_or_cannot_be_created(task, tmp_path, no_model_built):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    msg = _slide_task(task, tmp_path, f"job_dir={afile}")
    assert f"job_dir='{afile}': it is an existing file, not a folder" in msg, msg
    msg = _slide_task(task, tmp_path, f"job_dir={afile / 'sub' / 'job'}")
    assert f"it cannot be created: {afile} is a file, not a folder" in msg, msg


def test_missing_slides_csv_and_wsi_dir(tmp_path, no_model_built):
    from conftest import compose_task

    from hirespath.tasks.embed_slides import run_embed_slides

    for overrides, words in (
        ([f"slides={tmp_path / 'nope.csv'}"], ["slides=", "nope.csv", "does not exist", "column 'wsi'"]),
        ([f"wsi_dir={tmp_path / 'nope'}"], ["wsi_dir=", "does not exist"]),
        ([], ["give wsi_dir=DIR", "slides=LIST.csv"]),
    ):
        cfg = compose_task("embed_slides", overrides, tmp_path / "run")
        with pytest.raises(ConfigValidationError) as err:
            task_wrapper(run_embed_slides)(cfg)
        for w in words:
            assert w in str(err.value), str(err.value)


def test_mil_features_dir_must_exist(tmp_path, no_model_built):
    msg = _slide_task("mil", tmp_path, f"features_dir={tmp_path / 'nope'}")
    assert "features_dir=" in msg and "does not exist" in msg, msg


@pytest.mark.parametrize("head", ["knn", "linear_probe", "mask2former"])
def test_mil_refuses_other_tasks_heads(head, tmp_path, no_model_built):
    msg = _slide_task("mil", tmp_path, f"head={head}")
    assert f"head.name='{head}': must be one of ['abmil', 'mean_pool'] in the mil task" in msg, msg


@pytest.mark.parametrize(
    "gpus, cuda_build, visible, overrides, words",
    [
        (0, None, None, ["trainer.accelerator=gpu"], "trainer.accelerator='gpu': no CUDA GPU here (this torch"),
        (0, "12.8", "", ["trainer.accelerator=cuda"], "CUDA_VISIBLE_DEVICES='' hides every GPU); use trainer=cpu"),
        (0, "12.8", "0", ["trainer.accelerator=gpu"], "torch finds no NVIDIA GPU or driver"),
        (2, "12.8", None, ["trainer.accelerator=gpu", "trainer.devices=4"], "4 GPUs asked for, but 2 visible"),
        (2, "12.8", None, ["trainer.accelerator=gpu", "trainer.devices=[0,3]"], "GPU index 3 asked for, but 2"),
        (2, "12.8", None, ["trainer.accelerator=gpu", "trainer.devices='1,2'"], "GPU index 2 asked for"),
        (0, "12.8", None, ["+device=cuda"], "device='cuda': no CUDA GPU here"),
        (2, "12.8", None, ["+device=cuda:2"], "device='cuda:2': 2 GPU(s) visible"),
        (2, "12.8", None, ["trainer.accelerator=gpu", "trainer.devices=2", "+device=cuda:1"], None),
        (2, "12.8", None, ["trainer.accelerator=gpu", "trainer.devices=-1"], None),
        (2, "12.8", None, ["trainer.accelerator=gpu", "trainer.devices='0,1'"], None),
        (0, None, None, ["trainer.accelerator=cpu", "+device=auto"], None),
        (0, None, None, ["trainer.accelerator=auto"], None),
    ],
)
def test_gpus_asked_for_are_checked_against_the_machine(monkeypatch, gpus, cuda_build, visible, overrides, words):
    """trainer=gpu (or benchmark device=cuda) where torch sees no or fewer GPUs: one line saying why and what to
    use, before the task; what the machine has passes."""
    from hydra import compose, initialize_config_dir

    from hirespath.utils.devices import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("mil", overrides=list(overrides))
    if words is None:
        check_devices(cfg)
        return
    with pytest.raises(ConfigValidationError, match="this machine cannot run the config") as err:
        check_devices(cfg)
    assert words in str(err.value), str(err.value)

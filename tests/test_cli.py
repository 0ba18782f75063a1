"""The `hirespath` command: task list, errors, Hydra help, user config dirs, and the wheel run from elsewhere."""

import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from hirespath import cli

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_TASKS = {"classify", "extract", "embed_slides", "segment", "benchmark", "report", "make_synthetic", "smoke"}


def _env(pythonpath: Path | str) -> dict:
    """The user's environment: conftest.py sets HYDRA_FULL_ERROR=1 for the tests, a user has it unset."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "PYTHONPATH": str(pythonpath), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, cwd: Path, pythonpath=ROOT / "src", timeout: int = 300) -> subprocess.CompletedProcess:
    """`hirespath ARGS` as `python -m hirespath.cli ARGS` with the given import path; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "hirespath.cli", *args],
        cwd=cwd,
        env=_env(pythonpath),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python(code: str, cwd: Path | None = None, pythonpath=ROOT / "src") -> str:
    """stdout of `python -c CODE` with the given import path (must succeed)."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(pythonpath), capture_output=True, text=True)
    return _check(proc).stdout


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_help_lists_every_task(capsys):
    assert set(cli.TASKS) >= EXPECTED_TASKS
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = {m.group(1) for m in re.finditer(r"^  (\w+)  +\S", out, re.M)}
    assert listed == set(cli.TASKS)
    for name, task in cli.TASKS.items():  # one line each, with its summary
        assert re.search(rf"^  {name} +{re.escape(task.summary)}$", out, re.M)
    assert f"Configs: {ROOT / 'conf'}" in out  # a checkout uses its own conf/

    assert cli.main([]) == 2  # no arguments: the same list, as a usage error
    assert "  classify " in capsys.readouterr().err


def test_version_and_help_from_the_command_line(tmp_path):
    import hirespath

    assert _check(run_cli("--version", cwd=tmp_path)).stdout.strip() == f"hirespath {hirespath.__version__}"
    out = _check(run_cli("--help", cwd=tmp_path)).stdout
    assert all(f"  {name} " in out for name in EXPECTED_TASKS)
    # the task list comes fast: neither the CLI nor `import hirespath` imports torch
    assert python("import sys, hirespath.cli; print('torch' in sys.modules)").strip() == "False"


@pytest.mark.parametrize("arg", ["clasify", "--frobnicate"])
def test_unknown_task_is_a_clear_error(arg, capsys):
    assert cli.main([arg, "backbone=tiny"]) == 2
    err = capsys.readouterr().err
    assert f"unknown {'option' if arg.startswith('-') else 'task'} {arg!r}" in err
    assert "valid tasks: " + ", ".join(cli.TASKS) in err
    if arg == "clasify":
        assert "did you mean 'classify'" in err


def test_task_help_is_hydras_and_the_job_is_named_after_the_task(tmp_path):
    out = _check(run_cli("benchmark", "--help", cwd=tmp_path)).stdout
    assert "benchmark is powered by Hydra" in out
    assert re.search(r"^backbone: .*\btiny\b.*\buni2_h\b", out, re.M)
    hydra_cfg = yaml.safe_load(_check(run_cli("classify", "--cfg", "hydra", cwd=tmp_path)).stdout)["hydra"]
    assert hydra_cfg["job"]["name"] == "classify"  # the job log is classify.log, as with tasks/classify.py
    assert not list(tmp_path.iterdir())  # --help / --cfg run nothing


def test_task_functions_pickle_for_the_launchers():
    for name in cli.TASKS:
        fn = pickle.loads(pickle.dumps(cli.TaskFunction(name)))
        assert isinstance(fn, cli.TaskFunction) and fn.name == name
        assert fn.__module__ == cli.TASKS[name].run.split(":")[0]  # Hydra names the job after it


def _imported_after(code: str, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run CODE in a fresh interpreter; the heavy libraries it had imported when it exited (also by sys.exit)."""
    heavy = ("torch", "lightning", "torchmetrics", "timm")
    probe = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print('IMPORTED', *(m for m in {heavy!r} if m in sys.modules), file=sys.stderr))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe + code],
        cwd=cwd,
        env=_env(ROOT / "src"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(x for x in proc.stderr.splitlines() if x.startswith("IMPORTED"))
    return proc, set(line.split()[1:])


@pytest.mark.parametrize("args", [["--help"], ["classify", "--help"], ["mil", "--cfg", "job"]])
def test_help_imports_no_torch(args, tmp_path):
    """The task list and a task's Hydra help come in a fraction of a second: no torch, Lightning or torchmetrics."""
    code = f"import sys; sys.argv = ['hirespath', *{args!r}]; from hirespath.cli import main; sys.exit(main())"
    proc, heavy = _imported_after(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert heavy == set(), heavy
    if args[0] == "classify":
        assert "classify is powered by Hydra" in proc.stdout
    if args[0] == "mil":
        assert "head:" in proc.stdout  # the composed config


def test_startup_seconds_counts_from_the_process_start(tmp_path, monkeypatch):
    from hirespath.utils import timing

    # the interpreter slept 0.5 s before hirespath was imported: counted, as the user waited for it
    code = "import time; time.sleep(0.5); from hirespath.utils.timing import startup_seconds; print(startup_seconds())"
    assert 0.5 <= float(python(code, tmp_path)) < 60
    first = timing.startup_seconds()
    assert first > 0 and timing.startup_seconds() >= first
    # without /proc: the seconds since hirespath.cli (which imports timing) was imported
    monkeypatch.setattr(timing, "_process_age_linux", lambda: None)
    monkeypatch.setattr(timing, "_IMPORTED", timing.time.monotonic() - 2.0)
    assert 2.0 <= timing.startup_seconds() < 10


def test_task_modules_are_hydra_apps(tmp_path):
    """`python -m hirespath.tasks.<task>` is the task (what `hirespath <task>` runs), with the task's own argv rules."""
    (tmp_path / "runs").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "hirespath.tasks.report", "runs", "--cfg", "job"],
        cwd=tmp_path,
        env=_env(ROOT / "src"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert yaml.safe_load(_check(proc).stdout)["dirs"] == [str((tmp_path / "runs").resolve())]


def _fake_task(tmp_path: Path, error: str) -> str:
    """Code running a registered task whose function raises ``error`` (an expression), as `hirespath boom` would."""
    (tmp_path / "boom_task.py").write_text(
        f"from hirespath.utils.errors import InputError\n\n\ndef run_boom(cfg):\n    raise {error}\n"
    )
    return (
        "import sys; sys.path.insert(0, '.')\n"
        "from hirespath import cli\n"
        "cli.TASKS['boom'] = cli.Task('boom_task:run_boom', 'raises', config_name='smoke')\n"
        "cli.hydra_main('boom')\n"
    )


def _run_code(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=_env(ROOT / "src"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_input_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path):
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    code = _fake_task(tmp_path, "InputError('data.root=nowhere: no such directory; give a PANDA data root')")
    proc = _run_code(code, run_dir, cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: data.root=nowhere: no such directory; give a PANDA data root" in proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    # the job's log keeps the traceback
    assert "Traceback" in (tmp_path / "run" / "boom_task.log").read_text()

    # (HYDRA_FULL_ERROR=1 keeping the traceback: test_config_error_from_the_command_line)

    bug = _run_code(_fake_task(tmp_path, "RuntimeError('a bug')"), run_dir, cwd=tmp_path)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
    assert "error: " not in bug.stderr


def test_bad_labels_and_weights_files_are_one_line_from_the_command_line(tmp_path):
    """A PANDA train.csv with a bad grade, and a weights file that is empty (an interrupted download): the user's
    input, so the message alone (the weights' through Hydra's instantiation, which wrapped it in its own error)."""
    root = tmp_path / "root"
    (root / "train_images").mkdir(parents=True)
    (root / "train.csv").write_text("image_id,data_provider,isup_grade,gleason_score\na1,karolinska,7,3+3\n")
    proc = run_cli("mil", f"data.root={root}", "backbone=tiny", f"hydra.run.dir={tmp_path / 'o1'}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {root / 'train.csv'}: isup_grade must be an integer 0–5; bad rows: row 2 (a1: 7)" in proc.stderr
    from hirespath.data.panda_synthetic import write_pyramid

    (tmp_path / "slides").mkdir()
    write_pyramid(
        tmp_path / "slides" / "s.tiff", np.full((256, 256, 3), 200, np.uint8), mpp=0.5, compression="zlib", levels=(1,)
    )
    (tmp_path / "empty.bin").write_bytes(b"")
    weights = f"backbone.weights={tmp_path / 'empty.bin'}"
    proc = run_cli("embed_slides", f"wsi_dir={tmp_path / 'slides'}", f"job_dir={tmp_path / 'job'}", "backbone=tiny",
                   weights, f"hydra.run.dir={tmp_path / 'o2'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "full_key" not in proc.stderr, proc.stderr
    assert f"error: weights file '{tmp_path / 'empty.bin'}' is empty (0 bytes" in proc.stderr, proc.stderr


def test_config_error_from_the_command_line(tmp_path):
    """A value validate_config refuses: the message alone, status 1; HYDRA_FULL_ERROR=1 shows the traceback."""
    args = ("classify", "backbone=tiny", "resolution=230")
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "error: invalid configuration:\n  resolution=230: resolution 230 is not a positive multiple of the patch"
    ), proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr

    full = subprocess.run(
        [sys.executable, "-m", "hirespath.cli", *args],
        cwd=tmp_path,
        env={**_env(ROOT / "src"), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
    )
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigValidationError" in full.stderr

    # a multirun reports its failing job as Hydra does (which job, then the error)
    sweep = run_cli(
        "classify", "-m", "backbone=tiny", "resolution=230", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path
    )
    assert sweep.returncode == 1
    assert "Error executing job with overrides: ['backbone=tiny', 'resolution=230']" in sweep.stderr
    assert "resolution=230: resolution 230 is not a positive multiple" in sweep.stderr


def test_a_gpu_trainer_without_a_gpu_fails_before_the_task(tmp_path):
    """Every GPU hidden: the one-line error, no run output (Lightning's "No supported gpu backend found!" came
    after the model was built)."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hirespath.cli", "smoke", "trainer=gpu", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env={**_env(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    first, second = proc.stderr.splitlines()[:2]
    assert first == "error: this machine cannot run the config:" and "trainer.accelerator='gpu': no CUDA GPU" in second
    assert "Traceback" not in proc.stderr and not (run / "metrics.json").exists()


def test_registry_points_at_existing_functions():
    """Each entry's "module:function" exists (checked in the source: importing every task would take long)."""
    import ast
    import importlib.util

    for name, task in cli.TASKS.items():
        for ref in filter(None, (task.run, task.argv)):
            module, _, func = ref.partition(":")
            spec = importlib.util.find_spec(module)
            assert spec and spec.origin, f"{name}: no module {module}"
            defs = {n.name for n in ast.parse(Path(spec.origin).read_text()).body if isinstance(n, ast.FunctionDef)}
            assert func in defs, f"{name}: {module} defines no {func}"


def test_checkout_wrappers_are_the_cli():
    wrappers = {p.stem for p in (ROOT / "tasks").glob("*.py")}
    assert wrappers == set(cli.TASKS)
    for name in wrappers:
        src = (ROOT / "tasks" / f"{name}.py").read_text()
        assert f'main(["{name}", *sys.argv[1:]]' in src


def test_report_keeps_positional_directories(tmp_path):
    (tmp_path / "runs").mkdir()
    proc = run_cli("report", "runs", "--cfg", "job", cwd=tmp_path)
    assert yaml.safe_load(_check(proc).stdout)["dirs"] == [str((tmp_path / "runs").resolve())]
    bad = run_cli("report", "missing_dir", cwd=tmp_path)
    assert bad.returncode != 0 and "'missing_dir' is not a directory" in bad.stderr


def test_failure_exits_non_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("classify", "data.root=empty", "backbone=tiny", "resolution=112", cwd=tmp_path)
    assert proc.returncode != 0
    assert "'empty' is not a PANDA data root" in proc.stderr
    assert "`hirespath make_synthetic dataset=panda root=DIR` writes a small one" in proc.stderr


def test_ddp_ranks_rerun_the_same_command(tmp_path):
    """Lightning's DDP starts the other ranks by re-executing sys.argv: it must still name the task."""
    out = tmp_path / "ddp"
    args = ["smoke", "trainer=ddp", "num_samples=128", "trainer.max_epochs=1", f"hydra.run.dir={out}"]
    _check(run_cli(*args, cwd=tmp_path))
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def _readme_user_backbone() -> tuple[str, str, list[str]]:
    """The README's user config example: (file path, file text, command arguments after `hirespath`)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n# (my_configs/\S+\.yaml)\n(.*?)```", readme, re.S)
    assert block, "README: the --config-dir example (a ```yaml block starting with `# my_configs/...`) is missing"
    command = re.search(r"^hirespath (benchmark --config-dir my_configs .*?)(?:\s+#.*)?$", readme, re.M)
    assert command, "README: the `hirespath benchmark --config-dir my_configs ...` example is missing"
    return block.group(1), block.group(2), command.group(1).split()


def test_user_config_dir_adds_a_backbone_preset(tmp_path):
    """The README's example: a backbone file in the user's own config directory, selected like a packaged one."""
    path, text, args = _readme_user_backbone()
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(text)
    option = Path(path).stem
    assert args == ["benchmark", "--config-dir", "my_configs", f"backbone={option}"]

    job = yaml.safe_load(_check(run_cli(*args, "--cfg", "job", cwd=tmp_path)).stdout)
    user = yaml.safe_load(text)
    assert job["backbone"] == user and user["overrides"], job["backbone"]

    # and it runs (tiny settings): the narrowed architecture is the one measured
    _check(run_cli(*args, "resolutions=[112]", "repeats=1", "warmup=0", "cpu_memory=false", cwd=tmp_path))
    (csv,) = (tmp_path / "logs" / "benchmark" / "runs").glob("*/benchmark.csv")
    import pandas as pd

    row = pd.read_csv(csv).iloc[0]
    assert row["status"] == "ok" and row["backbone"] == user["name"]
    # UNI2-h at full size would cost ~0.1 TFLOP for 73 tokens; the narrowed one (depth 12, dim 384) ~0.002
    assert row["tflops"] < 0.01, row.to_dict()


def _wheel_sources(dst: Path) -> Path:
    """The files a wheel is built from, copied (an in-tree build would write build/ and *.egg-info here)."""
    import shutil

    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", dst / "src", ignore=ignore)
    shutil.copytree(ROOT / "conf", dst / "conf", ignore=ignore)
    return dst


def test_installed_wheel_runs_from_any_directory(tmp_path):
    """Non-editable install: the wheel ships the configs, and the tasks run with only it on the path."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    src = _wheel_sources(tmp_path / "src_copy")
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")]
    subprocess.run(build, check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("hirespath-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = {f"hirespath/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert confs and confs <= names, sorted(confs - names)
    assert "hirespath/cli.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hirespath = hirespath.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = python("import hirespath.cli as c; print(c.__file__); print(c.config_dir())", work, site).split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the installed copy, not the checkout

    # the console script pip wrote, then python -m hirespath.cli: synthetic data, then classify on the tiny preset
    script = site / "bin" / "hirespath"
    synthetic = ["make_synthetic", "dataset=panda", "root=data/panda", "num_slides=24", "slide_height=512"]
    proc = subprocess.run(
        [str(script), *synthetic, "slide_width=768"], cwd=work, env=_env(site), capture_output=True, text=True
    )
    _check(proc)
    assert (work / "data" / "panda" / "train.csv").is_file()
    tiny = ["backbone=tiny", "resolution=112", "data.fov_um=192", "attention.window=2", "pruner.prune_layer=2"]
    _check(run_cli("classify", "data.root=data/panda", *tiny, "head=knn", "head.k=3", cwd=work, pythonpath=site))

    (metrics,) = (work / "logs" / "classify" / "runs").glob("*/metrics.json")
    assert 0 <= json.loads(metrics.read_text())["test/accuracy"] <= 1
    assert (metrics.parent / "classify.log").is_file()
    assert (work / "cache" / "embeddings").is_dir()  # outputs under the current directory
    sources = yaml.safe_load((metrics.parent / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
    paths = [s["path"] for s in sources["config_sources"] if s["provider"] == "main"]
    assert paths == [str(site / "hirespath" / "conf")], sources["config_sources"]


def test_old_keys_and_other_tasks_heads_get_one_line_from_the_command_line(tmp_path):
    """What Hydra refuses at composition (an old key's name) or a head of another task: one message, no traceback."""
    old = run_cli("embed_slides", "wsi_dir=x", "features=cls", cwd=tmp_path, timeout=120)
    assert old.returncode == 1 and "features: renamed to embed.features; use embed.features=cls" in old.stderr
    head = run_cli("mil", "head=knn", cwd=tmp_path, timeout=120)
    assert head.returncode == 1 and "must be one of ['abmil', 'mean_pool']" in head.stderr, head.stderr
    for proc in (old, head):
        assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr


def test_tasks_of_a_slurm_array_started_in_one_second_get_run_folders_of_their_own(tmp_path, monkeypatch):
    """The run folder was named by the second alone: array tasks starting together shared it (one log for two
    tasks, one done.json overwriting the other). In a SLURM job its id ends the name; elsewhere nothing changes."""
    for job in ("4242", "4243", None):
        if job is None:
            monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        else:
            monkeypatch.setenv("SLURM_JOB_ID", job)
        proc = run_cli("smoke", "num_samples=64", "trainer.max_epochs=1", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "logs" / "smoke" / "runs").iterdir())
    assert [n.rsplit("_slurm", 1)[-1] for n in names if "_slurm" in n] == ["4242", "4243"]
    assert len(names) == 3 and all(len(n) == len("2026-01-01_12-00-00") for n in names if "_slurm" not in n)


def test_a_sweeps_folder_is_the_launchers_in_each_of_its_slurm_jobs(monkeypatch):
    """The submitit launcher's jobs rebuild the sweep's config in SLURM jobs of their own ids: the folder suffix is
    cached with the config (as ${now:} is), so every job writes under the sweep folder the launcher made."""
    import pickle

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.setenv("SLURM_JOB_ID", "555")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("smoke", return_hydra_config=True)
    made = OmegaConf.select(cfg, "hydra.sweep.dir")
    monkeypatch.setenv("SLURM_JOB_ID", "556")  # a job of the sweep
    assert made.endswith("_slurm555") and OmegaConf.select(pickle.loads(pickle.dumps(cfg)), "hydra.sweep.dir") == made

"""Every experiment and launcher config composes; grids have the paper's sizes; grids need -m."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hirespath.configs import ConfigValidationError, validate_config
from hirespath.utils.hydra import check_grid_is_multirun

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _compose(task, overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(task, overrides=overrides, return_hydra_config=True)


def _jobs(cfg) -> int:
    n = 1
    for value in cfg.hydra.sweeper.params.values():
        n *= len(str(value).split(","))
    return n


def _usage(exp: str) -> list[str]:
    """The command lines in the experiment file's header comment."""
    text = (Path(CONF_DIR) / "experiment" / f"{exp}.yaml").read_text()
    return re.findall(r"^#\s+((?:python tasks/\w+\.py|hirespath \w+) .*)$", text, flags=re.M)


@pytest.mark.parametrize("exp,jobs", [("table1", 36), ("table2", 10), ("table3", 8)])
def test_classification_grids(exp, jobs):
    cfg = _compose("classify", [f"experiment={exp}"])
    assert _jobs(cfg) == jobs and cfg.backbone.name == "uni2_h"
    if exp != "table1":
        assert cfg.resolution == 3430 and cfg.attention.mode == "sparse" and cfg.pruner.prune_ratio == 0.6


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_with_its_task(exp):
    """The task comes from the file's usage line; a grid's usage passes -m, and no file sets hydra.mode."""
    usage = _usage(exp)
    assert usage, f"conf/experiment/{exp}.yaml has no usage line"
    task = re.match(r"(?:python tasks/(\w+)\.py|hirespath (\w+))", usage[0]).group(1, 2)
    task = task[0] or task[1]
    cfg = _compose(task, [f"experiment={exp}"])
    raw = OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{exp}.yaml")
    assert OmegaConf.select(raw, "hydra.mode") is None, f"{exp}: the user passes -m; no hydra.mode in the file"
    grid = bool(cfg.hydra.sweeper.params)
    assert all((" -m " in u) == grid for u in usage), usage
    validate_config(cfg)


@pytest.mark.parametrize("method,mode,ratio", [("vanilla", "dense", 0.0), ("ours", "sparse", 0.6)])
def test_method_sets_attention_and_pruner(method, mode, ratio):
    cfg = _compose("classify", [f"method={method}"])
    assert cfg.attention.mode == mode and cfg.pruner.prune_ratio == ratio


@pytest.mark.parametrize("task", ["classify", "extract", "segment", "benchmark", "make_synthetic", "report"])
def test_root_configs_compose(task):
    assert _compose(task, []).task_name == task


def _check_grid(overrides, mode=None):
    from hydra.core.hydra_config import HydraConfig

    cfg = _compose("classify", overrides)
    if mode is not None:
        cfg.hydra.mode = mode
    HydraConfig().set_config(cfg)
    try:
        check_grid_is_multirun()
    finally:
        HydraConfig.instance().cfg = None  # leave no grid behind for later tests


def test_a_grid_launched_without_m_is_refused():
    """Without hydra.mode in the experiment, forgetting -m would run one point of the grid silently."""
    with pytest.raises(ConfigValidationError) as err:
        _check_grid(["experiment=table2"])
    msg = str(err.value)
    assert "add -m" in msg and "pruner.prune_ratio" in msg and "head" in msg, msg
    _check_grid(["experiment=table2"], mode="MULTIRUN")
    _check_grid(["experiment=table2", "pruner.prune_ratio=0.5", "head=knn"])  # one point, on purpose
    _check_grid([])  # no grid


def _script_benchmark_commands(script: Path) -> list[list[str]]:
    """The overrides of every ``tasks/benchmark.py`` run in a GPU script (a ``step NAME SECONDS FROM TO ARGS...``
    line or a direct call), continuation lines joined and the scripts' ``SEG`` command variables expanded."""
    import shlex

    text = script.read_text().replace("\\\n", " ")
    arrays = dict(re.findall(r"^(\w+)=\((.*)\)$", text, flags=re.M))
    strings = dict(re.findall(r'^(\w+)="(.*)"$', text, flags=re.M))
    commands = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or re.match(r"^\w+=", line) or '"$@"' in line:
            continue  # comments, variables' definitions, the step function's own call
        for name, body in arrays.items():
            line = line.replace(f'"${{{name}[@]}}"', body)
        for name, body in strings.items():
            line = line.replace(f"${name} ", body + " ")
        if line.startswith("step "):
            args = shlex.split(line)[5:]
        elif "tasks/benchmark.py" in line:
            args = shlex.split(line.split("tasks/benchmark.py", 1)[1])
        else:
            continue
        commands.append([a for a in args if "=" in a and not a.startswith((">", "2>"))])
    return commands


GPU_SCRIPTS = {"gpu_both_issues.sh": 4, "h200_run.sh": 3, "h200_run2.sh": 3}  # benchmark runs in each


@pytest.mark.parametrize("script", sorted(GPU_SCRIPTS))
def test_the_gpu_scripts_benchmark_runs_compose(script):
    """A lent GPU gives 15 minutes: a renamed key in a GPU script's overrides would spend them on an error. Each run
    of the scripts composes and validates here (as tasks/benchmark.py would there), its compare entries too."""
    from hirespath.benchmark.measure import configs_from
    from hirespath.benchmark.segment_speed import check_segment_bench

    commands = _script_benchmark_commands(Path(CONF_DIR).parent / "docs" / "benchmarks" / script)
    assert len(commands) == GPU_SCRIPTS[script]
    for overrides in commands:
        cfg = _compose("benchmark", overrides)
        validate_config(cfg)
        assert cfg.task_name in ("table1_cost", "segment_speed", "embed_speed")
        if script == "gpu_both_issues.sh":  # the GPU figures are full UNI2-h's (h200_run*.sh ran some narrowed)
            assert cfg.backbone.name == "uni2_h" and not cfg.backbone.overrides
        if cfg.task_name == "segment_speed":
            check_segment_bench(cfg.segment_bench)
        elif cfg.task_name == "table1_cost":
            assert configs_from(cfg)


def test_the_gpu_script_leaves_what_the_device_tool_brings_back(tmp_path):
    """The device tool brings back at most 8 files from $OUT: gpu_both_issues.sh left 11 (a PNG per step), so
    three of the 15-minute run's outputs would be lost. Run with stand-ins for the GPU machine's python3 and
    nvidia-smi, it leaves the log, the device, the utilisation, the four CSVs and one tar of the plots."""
    import shutil
    import tarfile

    repo = Path(CONF_DIR).parent
    (tmp_path / "repo" / "docs").mkdir(parents=True)
    shutil.copytree(repo / "docs" / "benchmarks", tmp_path / "repo" / "docs" / "benchmarks")
    stubs, out, runs = tmp_path / "stubs", tmp_path / "out", tmp_path / "runs"
    stubs.mkdir(), out.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA Stand-in, 1 MiB, 0'\n")
    (stubs / "python3").write_text("""#!/usr/bin/env bash
case "$*" in *"-m pip install"*|*"-c "*) exit 0;; esac
for a in "$@"; do case $a in hydra.run.dir=*) dir=${a#hydra.run.dir=};; esac; done
mkdir -p "$dir"
for f in benchmark segmentation_benchmark embedding_benchmark; do touch "$dir/$f.csv" "$dir/$f.png"; done
""")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    script = tmp_path / "repo" / "docs" / "benchmarks" / "gpu_both_issues.sh"
    script.write_text(script.read_text().replace("/tmp/", f"{runs}/"))  # each step's run folder, here
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(out)}
    subprocess.run(["bash", "docs/benchmarks/gpu_both_issues.sh"], cwd=tmp_path / "repo", env=env, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"table1_cost.csv", "segment_speed.csv", "segment_speed_3430.csv",
                                "embed_speed.csv", "plots.tar", "log.txt", "device.txt"} <= set(files)  # fmt: skip
    with tarfile.open(out / "plots.tar") as tar:
        assert {"table1_cost.png", "segment_speed.png", "segment_speed_3430.png", "embed_speed.png"} <= {
            Path(n).name for n in tar.getnames()
        }

"""+resume=true re-launched into the same sweep directory skips finished jobs and redoes the rest."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sweep(sweep: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tasks" / "smoke.py"),
            "-m",
            "lr=0.05,0.2",
            "num_samples=64",
            "trainer.max_epochs=1",
            f"hydra.sweep.dir={sweep}",
            *extra,
        ],
        cwd=sweep.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    _sweep(sweep)
    done = json.loads((sweep / "0" / "done.json").read_text())
    assert "lr=0.05" in done["overrides"]
    (sweep / "1" / "metrics.json").unlink()  # job 1 "was killed": no metrics, no done marker
    (sweep / "1" / "done.json").unlink()
    (sweep / "0" / "metrics.json").write_text('{"test/accuracy": -1}')  # would be overwritten by a re-run
    _sweep(sweep, "+resume=true")
    assert json.loads((sweep / "0" / "metrics.json").read_text()) == {"test/accuracy": -1}
    assert json.loads((sweep / "1" / "metrics.json").read_text())["test/accuracy"] >= 0
    assert (sweep / "1" / "done.json").is_file()


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
    """Written files get the mode a plain open() gives (not mkstemp's 0600), and no temporary file stays behind."""
    from hirespath.utils.io import atomic_path, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "done.json", {"ok": True})
        with atomic_path(tmp_path / "cache.pt") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    for name in ("done.json", "cache.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt", "done.json"]


def test_metrics_json_is_strict_json(tmp_path):
    """An undefined metric (AUROC on a one-class test set) is written as null, not as bare NaN."""
    import json
    import math

    from hirespath.utils.io import write_json

    write_json(tmp_path / "m.json", {"test/auroc": float("nan"), "test/accuracy": 0.5, "per": [math.inf, 1.0]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"test/auroc": None, "test/accuracy": 0.5, "per": [None, 1.0]}

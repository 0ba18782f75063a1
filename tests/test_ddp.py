"""Lightning DDP through Hydra (trainer=ddp): 2 CPU processes with gloo, one run directory, rank 0 writes."""

import json

from test_launchers import run_task


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    run_task("smoke", "trainer=ddp", "num_samples=128", "trainer.max_epochs=1", f"hydra.run.dir={out}", cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2

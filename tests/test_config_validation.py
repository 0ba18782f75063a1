"""validate_config: every bad shared key is reported at once, by key, value and valid range, before compute."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hirespath.configs import ConfigValidationError, validate_config
from hirespath.models.backbones import preset_geometry as backbone_geometry

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def _benchmark(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("benchmark", overrides=list(overrides))


def test_default_configs_pass():
    validate_config(_benchmark())
    validate_config(_benchmark("backbone=tiny", "attention=eager", "pruner=none", "resolutions=[14,28]"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        validate_config(compose("smoke"))
        validate_config(compose("report"))


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["attention.mode=sprase"], "attention.mode='sprase'", ["dense", "eager", "sparse", "did you mean 'sparse'"]),
        (["attention.window=0"], "attention.window=0", [">= 1"]),
        (["attention.radius=-1"], "attention.radius=-1", [">= 0"]),
        (["attention.sparse_backend=flash"], "attention.sparse_backend='flash'", ["auto", "gather", "flex"]),
        (["pruner.prune_ratio=1.0"], "pruner.prune_ratio=1.0", ["[0, 1)"]),
        (["pruner.prune_ratio=-0.1"], "pruner.prune_ratio=-0.1", ["[0, 1)"]),
        (["pruner.prune_layer=24"], "pruner.prune_layer=24", ["[1, 23]", "24-block model"]),
        (["backbone=tiny", "pruner.prune_layer=6"], "pruner.prune_layer=6", ["[1, 5]"]),
        (
            ["backbone=tiny", "+backbone.overrides.depth=2", "pruner.prune_layer=2"],
            "pruner.prune_layer=2",
            ["[1, 1]"],
        ),
        (["pruner.prune_score_tokens=registers"], "pruner.prune_score_tokens='registers'", ["cls", "all"]),
        (["resolutions=[224,450]"], "resolutions[1]=450", ["multiple of the patch size 14", "448 or 462"]),
        (
            ["backbone=uni", "resolutions=[224,300]"],
            "resolutions[1]=300",
            ["patch size 16", "uni patches", "288 or 304"],
        ),
        (["backbone.name=uni3"], "backbone.name='uni3'", ["uni2_h", "did you mean"]),
    ],
)
def test_bad_values_name_key_value_and_range(overrides, key, words):
    with pytest.raises(ConfigValidationError) as err:
        validate_config(_benchmark(*overrides))
    msg = str(err.value)
    assert key in msg, msg
    for w in words:
        assert w in msg, msg


def test_ratio_zero_ignores_layer():
    validate_config(_benchmark("pruner=none", "pruner.prune_layer=99"))


def test_all_errors_in_one_message():
    with pytest.raises(ConfigValidationError) as err:
        validate_config(_benchmark("attention.mode=flash", "attention.window=-2", "pruner.prune_ratio=2"))
    msg = str(err.value)
    assert "attention.mode" in msg and "attention.window" in msg and "pruner.prune_ratio" in msg


def test_resolution_and_named_groups(tmp_path):
    conf = tmp_path / "conf"
    for group, names in {"head": ["knn", "linear_probe"], "data": ["panda", "synthetic_panda"]}.items():
        (conf / group).mkdir(parents=True)
        for n in names:
            (conf / group / f"{n}.yaml").write_text(f"name: {n}\n")
    (conf / "task.yaml").write_text(
        "defaults:\n  - head: knn\n  - data: panda\n  - _self_\n"
        "backbone: {name: tiny, overrides: {}}\nresolution: 224\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        validate_config(compose("task"))
        cfg = compose("task", overrides=["resolution=100", "head.name=kNN", "data.name=pandas"])
        with pytest.raises(ConfigValidationError) as err:
            validate_config(cfg)
    msg = str(err.value)
    assert "resolution=100" in msg and "98 or 112" in msg
    assert "head.name='kNN'" in msg and "['knn', 'linear_probe']" in msg
    assert "data.name='pandas'" in msg and "did you mean 'panda'" in msg


def test_geometry_of_presets():
    assert backbone_geometry("uni2_h", {}) == (14, 24)
    assert backbone_geometry("uni", {}) == (16, 24)
    assert backbone_geometry("virchow2", {}) == (14, 32)
    assert backbone_geometry("h_optimus_0", {}) == (14, 40)
    assert backbone_geometry("tiny", {"depth": 2}) == (14, 2)


def test_task_fails_before_compute(tmp_path):
    """Through a real entry point: the error names the key, and no run directory output is produced."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tasks" / "smoke.py"),
            "+attention.mode=sprase",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode != 0
    assert "attention.mode='sprase'" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def _compose(task, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(task, overrides=list(overrides))


def _composition_error(task, *overrides) -> str:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _compose(task, *overrides)
    return f"{err.value}\n{err.value.__cause__}"


@pytest.mark.parametrize(
    "task, overrides, key, schema",
    [
        ("benchmark", ["pruner.prune_ratoi=0.5"], "pruner.prune_ratoi", "PrunerConfig"),
        ("benchmark", ["pruner.ratio=0.5"], "pruner.ratio", "PrunerConfig"),  # the key's name before the rename
        ("benchmark", ["pruner.layer=2"], "pruner.layer", "PrunerConfig"),
        ("benchmark", ["attention.backend=gather"], "attention.backend", "AttentionConfig"),
        ("benchmark", ["backbone.weight=model.bin"], "backbone.weight", "BackboneConfig"),
        ("classify", ["head=knn", "head.kk=3"], "head.kk", "KNNHeadConfig"),
        ("classify", ["head=linear_probe", "head.learning_rate=0.1"], "head.learning_rate", "LinearProbeHeadConfig"),
        ("classify", ["data.fov=512"], "data.fov", "PandaDataConfig"),
        ("segment", ["head.adapter.head=3"], "head.adapter.head", "AdapterConfig"),
        ("segment", ["data.max_items=3"], "data.max_items", "SegPathDataConfig"),
    ],
)
def test_unknown_key_of_a_group_fails_at_composition(task, overrides, key, schema):
    msg = _composition_error(task, *overrides)
    assert key in msg and schema in msg, msg


@pytest.mark.parametrize(
    "task, overrides, key",
    [
        ("benchmark", ["attention.window=eight"], "attention.window"),
        ("benchmark", ["pruner.prune_ratio=high"], "pruner.prune_ratio"),
        ("classify", ["head=knn", "head.center_l2=maybe"], "head.center_l2"),
        ("classify", ["data.rois_per_slide=1.5"], "data.rois_per_slide"),
        ("segment", ["data.cell_types=panCK_Epithelium"], "data.cell_types"),
    ],
)
def test_wrong_type_fails_at_composition(task, overrides, key):
    msg = _composition_error(task, *overrides)
    assert key in msg, msg


@pytest.mark.parametrize(
    "task, overrides, key, words",
    [
        ("classify", ["head=knn", "+head.kk=3"], "head.kk", ["KNNHeadConfig", "did you mean head.k?"]),
        ("benchmark", ["+pruner.ratio=0.5"], "pruner.ratio", ["PrunerConfig", "renamed to pruner.prune_ratio"]),
        ("benchmark", ["+attention.backend=gather"], "attention.backend", ["renamed to attention.sparse_backend"]),
        (
            "segment",
            ["+head.adapter.head=3"],
            "head.adapter.head",
            ["AdapterConfig", "did you mean head.adapter.heads?"],
        ),
        ("segment", ["++data.max_items=3"], "data.max_items", ["SegPathDataConfig", "max_items_per_type"]),
    ],
)
def test_plus_form_cannot_open_a_closed_group(task, overrides, key, words):
    """Hydra's +key / ++key force-add into a structured config; validate_config refuses the key before any task."""
    cfg = _compose(task, *overrides)
    with pytest.raises(ConfigValidationError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert f"{key}: not a key of" in msg, msg
    for w in words:
        assert w in msg, msg


def test_open_mappings_stay_open():
    """backbone.overrides holds any timm keyword: adding one is not a typo."""
    cfg = _compose("benchmark", "backbone=tiny", "+backbone.overrides.depth=2", "pruner.prune_layer=1")
    validate_config(cfg)
    assert cfg.backbone.overrides.depth == 2


def test_plus_key_fails_through_the_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tasks" / "classify.py"), "head=knn", "+head.kk=3", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode != 0
    assert "head.kk: not a key of KNNHeadConfig" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------- slide work


def _embed_cfg(*overrides):
    return _compose("embed_slides", "wsi_dir=/", *overrides)


def _problems(cfg, task) -> str:
    with pytest.raises(ConfigValidationError) as err:
        validate_config(cfg, task=task)
    return str(err.value)


def test_slide_configs_pass_and_share_the_nodes():
    """embed_slides, mil and the benchmark compose the same typed tile and embed nodes."""
    from omegaconf import OmegaConf

    from hirespath.configs import EmbedConfig, TilingConfig

    for task, cfg in (("embed_slides", _embed_cfg()), ("mil", _compose("mil")), ("benchmark", _compose("benchmark"))):
        validate_config(cfg, task=task)
        assert OmegaConf.get_type(cfg.tile) is TilingConfig and OmegaConf.get_type(cfg.embed) is EmbedConfig, task
    assert _compose("mil").tile.size == 224 and _compose("mil").embed.batch_size == 16
    assert _embed_cfg().tile.size == 1792 and _embed_cfg().embed.features == "cls"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["tile.size=230"], ["tile.size=230", "patch size 14", "224 or 238"]),
        (["backbone=uni", "tile.size=230"], ["tile.size=230", "patch size 16", "224 or 240"]),
        (["tile.size=0"], ["tile.size=0", "positive integer"]),
        (["tile.mpp=0"], ["tile.mpp=0.0", "µm per pixel"]),
        (["tile.mpp=-0.5"], ["tile.mpp=-0.5"]),
        (["tile.size=224", "tile.overlap=224"], ["tile.overlap=224", "[0, tile_size=224)"]),
        (["tile.min_tissue=1.5"], ["tile.min_tissue=1.5", "[0, 1]"]),
        (["tile.tissue_threshold=255"], ["tile.tissue_threshold=255.0", "[0, 255)", "Otsu"]),
        (["tile.tissue_threshold=-1"], ["tile.tissue_threshold=-1.0", "saturation in [0, 255)"]),
        (["embed.reader=foo"], ["embed.reader='foo'", "'threads', 'workers'"]),
        (["embed.num_workers=-1"], ["embed.num_workers=-1", ">= 0"]),
        (["embed.batch_size=0"], ["embed.batch_size=0", ">= 1"]),
        (["embed.threads=0"], ["embed.threads=0", "threads must be ≥ 1"]),
        (["embed.features=cls+max"], ["embed.features='cls+max'", "did you mean 'cls+mean'"]),
        (["embed.overlay_tiles=-1"], ["embed.overlay_tiles=-1", ">= 0"]),
        (["embed.lock_stale_hours=0"], ["embed.lock_stale_hours=0", "hours > 0"]),
        (["embed.encoder_tag=a/b"], ["embed.encoder_tag='a/b'", "folder name"]),
    ],
)
def test_bad_tiling_and_embedding_options(overrides, words):
    """Every tiling and embedding option is checked once, before any slide: today's per-slide failures."""
    msg = _problems(_embed_cfg(*overrides), "embed_slides")
    for w in words:
        assert w in msg, msg
    # the same nodes are checked in mil
    msg = _problems(_compose("mil", *overrides), "mil")
    assert words[0].split("=")[0] in msg, msg


def test_mils_feature_loaders_are_checked_with_the_rest():
    """mil's data.num_workers=-1 failed with a traceback after the config check, which had named the other
    problems only."""
    msg = _problems(_compose("mil", "data.num_workers=-1", "embed.batch_size=0"), "mil")
    assert "data.num_workers=-1" in msg and "embed.batch_size=0" in msg, msg
    validate_config(_compose("mil", "data.num_workers=null"), task="mil")


def test_mils_training_numbers_are_checked_before_any_slide_is_embedded():
    """They failed in torch (a raw traceback, not naming the key) after every slide of features_dir=null was
    embedded; max_epochs=0 tested an untrained head and wrote its metrics."""
    validate_config(_compose("mil", "head=mean_pool", "data.max_tiles_train=null"), task="mil")
    validate_config(_compose("mil", "head=abmil", "head.dropout=0"), task="mil")
    # what ran before stays valid: mean_pool's hidden 0 (none), an lr the task reads with float() (optim has no
    # schema: ${oc.env:LR} gives a string)
    validate_config(_compose("mil", "head=mean_pool", "head.hidden=0"), task="mil")
    validate_config(_compose("mil", "optim.lr='1e-4'"), task="mil")
    # the task reads these with float()/int() after embedding: null fails there; -1 epochs made the cosine
    # schedule switch the learning rate on and off each epoch
    msg = _problems(_compose("mil", "optim.lr=null", "optim.weight_decay=null", "trainer.max_epochs=-1"), "mil")
    for key in ("optim.lr=None", "optim.weight_decay=None", "trainer.max_epochs=-1"):
        assert key in msg, (key, msg)
    bad = ["head=abmil", "head.dropout=1.5", "head.hidden=0", "data.max_tiles_train=0", "data.batch_size=0",
           "optim.lr=-1", "optim.weight_decay=-0.1", "trainer.max_epochs=0"]  # fmt: skip
    msg = _problems(_compose("mil", *bad), "mil")
    for key in ("head.dropout=1.5", "head.hidden=0", "data.max_tiles_train=0", "data.batch_size=0", "optim.lr=-1",
                "optim.weight_decay=-0.1", "trainer.max_epochs=0"):  # fmt: skip
        assert key in msg, (key, msg)


@pytest.mark.parametrize("task", ["embed_slides", "segment_slides", "predict_slides"])
def test_slide_extensions_are_checked_before_any_slide(task):
    validate_config(_compose(task, "wsi_dir=/", "wsi_ext=[svs,.NDPI]"), task=task)
    msg = _problems(_compose(task, "wsi_dir=/", "wsi_ext=[svs,'*.tif']"), task)
    assert "wsi_ext: '*.tif' is not a file extension; give e.g. wsi_ext=[.svs,.ndpi]" in msg, msg
    validate_config(_compose(task, "wsi_dir=/", "recursive=true"), task=task)
    validate_config(_compose(task, "wsi_dir=/", "recursive=null"), task=task)  # null: off, as before
    msg = _problems(_compose(task, "wsi_dir=/", "recursive=no"), task)  # a string: bool("no") went down the tree
    assert "recursive='no': must be true or false" in msg, msg


def test_all_embedding_errors_at_once():
    msg = _problems(
        _embed_cfg("embed.reader=foo", "embed.num_workers=-1", "tile.mpp=0", "tile.size=230"), "embed_slides"
    )
    for key in ("embed.reader", "embed.num_workers", "tile.mpp", "tile.size"):
        assert key in msg, msg


@pytest.mark.parametrize(
    "task, overrides, old, new",
    [
        ("embed_slides", ["+features=cls"], "features", "embed.features=cls"),
        ("embed_slides", ["+reader=workers"], "reader", "embed.reader=workers"),
        ("embed_slides", ["+lock_stale_hours=1"], "lock_stale_hours", "embed.lock_stale_hours=1"),
        ("mil", ["+embed.job_dir=/tmp/x"], "embed.job_dir", "job_dir"),
        ("benchmark", ["+slides.tile_size=448"], "slides.tile_size", "tile.size=448"),
        ("benchmark", ["+slides.reader=workers"], "slides.reader", "embed.reader=workers"),
    ],
)
def test_moved_keys_name_their_new_place(task, overrides, old, new):
    cfg = _compose(task, *(["wsi_dir=/"] if task == "embed_slides" else []), *overrides)
    msg = _problems(cfg, task)
    assert old in msg and "renamed to" in msg and new in msg, msg


def test_old_keys_in_a_config_file_are_refused(tmp_path):
    """An experiment file written for the old layout (top-level keys) gets the did-you-mean too."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "old.yaml").write_text("# @package _global_\nbatch_size: 8\nthumbnails: false\n")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "embed_slides", overrides=["wsi_dir=/", f"hydra.searchpath=[file://{tmp_path}]", "experiment=old"]
        )
    msg = _problems(cfg, "embed_slides")
    assert "batch_size=8: renamed to embed.batch_size" in msg and "thumbnails=False: renamed to" in msg, msg


def test_composition_hint_for_the_cli():
    """What Hydra refuses at composition (a key that is no longer there, another task's head) gets our words."""
    from hirespath.configs import composition_hint

    assert "use embed.features=cls" in composition_hint("embed_slides", ["features=cls"])
    assert "use tile.size=224" in composition_hint("benchmark", ["slides.tile_size=224"])
    msg = composition_hint("mil", ["head=foo"])
    assert "['abmil', 'mean_pool']" in msg and "knn" not in msg and "mask2former" not in msg, msg
    msg = composition_hint("classify", ["head=mask2former"])
    assert "['knn', 'linear_probe']" in msg and "mask2former is for segment" in msg, msg
    assert composition_hint("mil", ["head=abmil", "tile.size=224"]) is None
    assert composition_hint("mil", ["head=abmil,mean_pool", "seed=choice(1,2)"]) is None  # a multirun's lists
    assert "head='knn'" in composition_hint("mil", ["head=abmil,knn"])


def test_task_heads_are_one_map():
    """Validation and messages take a task's heads from TASK_HEADS; every conf/head file belongs to one task."""
    from hirespath.configs import TASK_HEADS

    files = sorted(p.stem for p in (ROOT / "conf" / "head").glob("*.yaml"))
    assert sorted(h for heads in TASK_HEADS.values() for h in heads) == files
    assert TASK_HEADS["mil"] == ("abmil", "mean_pool")
    for task, heads in TASK_HEADS.items():
        for head in files:
            cfg = _compose(task if task != "mil" else "mil", f"head={head}")
            if head in heads:
                validate_config(cfg, task=task)
            else:
                msg = _problems(cfg, task)
                assert f"head.name='{head}': must be one of {list(heads)} in the {task} task" in msg, msg


def test_benchmark_compare_tile_sizes_and_precision():
    msg = _problems(_compose("benchmark", "slides.precision=fp8", "slides.compare=[{tile_size: 230}]"), "benchmark")
    assert "slides.precision='fp8'" in msg and "slides.compare[0].tile_size=230" in msg and "224 or 238" in msg, msg


def test_benchmark_checks_the_pruning_each_compare_entry_runs():
    """Entries that set their own prune_ratio/prune_layer are checked as they run, not the composed pruner (a
    3-block model was refused on the composed layer 4 that no entry of embed_speed or cpu_speed used)."""
    narrow = "backbone.overrides.depth=3"
    validate_config(_benchmark("experiment=embed_speed", narrow), "benchmark")  # entries: no pruning, 0.6 after 2
    validate_config(_benchmark("experiment=cpu_speed", narrow), "benchmark")
    msg = _problems(_compose("benchmark", "experiment=embed_speed", "backbone.overrides.depth=2"), "benchmark")
    assert "slides.compare[2].prune_layer=2" in msg and "[1, 1] for a 2-block model" in msg, msg
    assert "pruner.prune_layer" not in msg, msg
    # an entry that keeps the composed layer is checked with it; the search's own list too
    search = ["max_resolution.enabled=true", "max_resolution.compare=[{prune_ratio: 0.6, prune_layer: 7}]"]
    overrides = ["+backbone.overrides.depth=3", "compare=[{prune_ratio: 0.5}]", "pruner=none", *search]
    msg = _problems(_compose("benchmark", *overrides), "benchmark")
    assert "pruner.prune_layer=4" in msg and "max_resolution.compare[0].prune_layer=7" in msg, msg
    msg = _problems(_compose("benchmark", "compare=[{prune_ratio: 1.5}]"), "benchmark")
    assert "compare[0].prune_ratio=1.5" in msg, msg
    for bad in ("compare=[5]", "compare={a: 1}", "slides.compare=[dense]"):  # TypeErrors in the run before
        msg = _problems(_compose("benchmark", bad), "benchmark")
        assert f"{bad.split('=')[0]}=" in msg and "a list of mappings" in msg, msg


def test_config_errors_are_input_errors():
    from hirespath.utils.errors import InputError

    assert issubclass(ConfigValidationError, InputError)


def test_emptying_backbone_overrides_on_the_command_line_is_null_not_a_merge(tmp_path):
    """``backbone.overrides={}`` after an experiment that narrows the model (embed_speed: depth 12, width 384) is
    merged by Hydra and changes nothing: the GPU scripts meant for full UNI2-h ran the narrowed model. It is refused,
    naming ``null``, which gives the preset as it is."""
    from conftest import compose_task

    from hirespath.models.encoder import encoder_from_config

    cfg = compose_task("benchmark", ["experiment=embed_speed", "backbone.overrides={}"], tmp_path)
    assert dict(cfg.backbone.overrides) == {"depth": 12, "embed_dim": 384, "num_heads": 6}  # Hydra's merge
    with pytest.raises(ConfigValidationError, match=r"backbone.overrides=\{\}: Hydra merges.*overrides=null gives"):
        validate_config(cfg, "benchmark")
    cfg = compose_task("benchmark", ["experiment=embed_speed", "backbone.overrides=null"], tmp_path)
    validate_config(cfg, "benchmark")
    assert cfg.backbone.overrides is None and backbone_geometry("uni2_h", cfg.backbone.overrides)[1] == 24
    tiny = compose_task("benchmark", ["backbone=tiny", "backbone.overrides=null"], tmp_path)
    validate_config(tiny, "benchmark")
    import torch

    with torch.device("meta"):
        assert encoder_from_config(tiny.backbone, tiny.attention, tiny.pruner).embed_dim > 0  # the preset
    # where nothing is composed, {} is what it says
    validate_config(compose_task("benchmark", ["backbone=uni", "backbone.overrides={}"], tmp_path), "benchmark")


def test_the_adapter_groups_and_the_backbone_geometry_are_checked_before_building(tmp_path):
    """head.adapter.num_groups other than 4 crashed inside Mask2Former (2 or 3 maps for its 4 scales) or silently
    dropped groups (8); a backbone narrowed below 4 blocks, and a non-integer depth or patch size in
    backbone.overrides, ended in tracebacks. Each is named before anything is built."""
    from conftest import compose_task

    from hirespath.models.vit_adapter import interaction_groups

    def problems(*overrides):
        cfg = compose_task("segment", ["backbone=tiny", *overrides], tmp_path)
        with pytest.raises(ConfigValidationError) as err:
            validate_config(cfg, "segment")
        return str(err.value)

    assert "head.adapter.num_groups=2: must be 4 (one per output scale" in problems("head.adapter.num_groups=2")
    assert "backbone.overrides.depth=3: the ViT-Adapter's 4 interaction groups need at least 4" in problems(
        "+backbone.overrides.depth=3"
    )
    assert "backbone.overrides.depth='four': must be an integer" in problems("+backbone.overrides.depth=four")
    validate_config(compose_task("segment", ["backbone=tiny", "+backbone.overrides.depth=4"], tmp_path), "segment")
    with pytest.raises(ValueError, match=r"head.adapter.num_groups=8: must be 4"):
        interaction_groups(12, 8)


def test_backbone_overrides_read_as_a_plain_dict_whatever_the_preset(tmp_path):
    """Every real preset ships `overrides: {}`: an empty DictConfig is falsy, and extract's
    `OmegaConf.to_container(cfg.backbone.overrides or {})` raised on the plain {} (extract failed for uni, uni2_h,
    ...; the tests' tiny preset has overrides). null reads as {} too."""
    from conftest import compose_task

    from hirespath.configs.model import arch_overrides

    for overrides, expected in ((["backbone=uni"], {}), (["backbone=uni", "backbone.overrides=null"], {}),
                                (["backbone=tiny"], {"init_values": 1.0})):  # fmt: skip
        cfg = compose_task("extract", overrides, tmp_path)
        assert arch_overrides(cfg.backbone) == expected and type(arch_overrides(cfg.backbone)) is dict

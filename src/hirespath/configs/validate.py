"""``validate_config(cfg, task)``: every rule a composed config must meet, checked before any model is built or any
data is read, reported together as one :class:`~hirespath.utils.config.ConfigValidationError`.

Types and key names of the typed groups are Hydra's job at composition (the schemas of this package). This adds
what composition cannot see: keys force-added with ``+key=value`` or set under an old name, each group's value
ranges (by the checkers of the domain that owns the rule), the rules across groups (``pruner.prune_layer`` against
the backbone's depth, ``resolution`` and ``tile.size`` against its patch size), which head and data set the task
takes, and the paths of a slide job. Keys a config does not have are not checked, so every task's root config
goes through it.
"""

from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig

from ..utils.config import Problems, group_options, has_key, is_int, one_of, select, unknown_keys
from .data import TASK_DATA, check_data, check_make_synthetic
from .heads import TASK_HEADS, check_head, head_choices
from .model import RENAMED, Geometry, check_attention, check_backbone, check_patch_multiple, check_pruner
from .slides import (
    TASK_RENAMED,
    benchmark_entries,
    check_benchmark_slides,
    check_embed,
    check_job_paths,
    check_model_from_checkpoint,
    check_tile,
    renamed_keys,
    untyped_node_keys,
)

# Groups whose selected option's ``name`` must be one of the group's config files.
NAMED_GROUPS = ("head", "data")


def task_renamed(task: str | None) -> dict[str, str]:
    """Old key → new key for ``task`` (the encoder groups' renames hold for every task)."""
    return {**RENAMED, **TASK_RENAMED.get(task or "", {})}


def validate_config(cfg: DictConfig, task: str | None = None) -> None:
    """Check a task's config (``task``: the task it runs, default ``cfg.task_name``); raise one
    ConfigValidationError naming every bad key, its value and what is valid."""
    task = task or cfg.get("task_name")
    problems = Problems()
    renamed = task_renamed(task)
    if task == "segment_slides":
        check_model_from_checkpoint(cfg)

    reported = set()
    untyped = untyped_node_keys(cfg) if task == "segment_slides" else []
    for key, schema, fields in unknown_keys(cfg) + untyped:
        group, _, leaf = key.rpartition(".")
        if key in renamed:
            hint = f"renamed to {renamed[key]}"
        else:
            close = difflib.get_close_matches(leaf, fields, n=1)
            hint = f"did you mean {group + '.' if group else ''}{close[0]}?" if close else ""
        problems.add(f"{key}: not a key of {schema} (valid: {fields}){'; ' + hint if hint else ''}")
        reported.add(key)
    for old, new, value in renamed_keys(cfg, renamed):
        if old not in reported:
            problems.add(f"{old}={value!r}: renamed to {new}; use {new}={value}")

    geometry = check_backbone(cfg, problems)
    check_attention(cfg, problems, as_trained=task == "segment_slides")
    check_pruner(cfg, geometry, problems, benchmark_entries(cfg) if task == "benchmark" else None)
    _check_resolutions(cfg, geometry, problems)
    check_tile(cfg, geometry, problems)
    check_embed(cfg, problems)
    if task == "benchmark":
        check_benchmark_slides(cfg, geometry, problems)
    check_head(cfg, task, problems, geometry.depth)
    check_data(cfg, task, problems)
    _check_task_options(cfg, task, problems)
    check_job_paths(cfg, task, problems)

    from . import SCHEMAS

    for group in NAMED_GROUPS:
        if group in cfg and isinstance(cfg[group], DictConfig) and "name" in cfg[group]:
            options = group_options(group, hidden=[name for g, name, _ in SCHEMAS if g == group])
            value = select(cfg, f"{group}.name")
            if options and value not in options:
                problems.bad(f"{group}.name", value, one_of(value, options) + f" (the files in conf/{group}/)")
    problems.raise_if_any()


def _check_resolutions(cfg: DictConfig, geometry: Geometry, problems: Problems) -> None:
    if "resolution" in cfg and select(cfg, "resolution") is not None:
        check_patch_multiple(problems, "resolution", select(cfg, "resolution"), geometry)
    if "resolutions" in cfg and select(cfg, "resolutions") is not None:
        values = select(cfg, "resolutions")
        if not isinstance(values, list) or not values:
            problems.bad("resolutions", values, "a non-empty list of resolutions")
        else:
            for i, v in enumerate(values):
                check_patch_multiple(problems, f"resolutions[{i}]", v, geometry)


def _precisions() -> list[str]:
    """The precision strings Lightning's Trainer accepts (its ``_PRECISION_INPUT``)."""
    import typing

    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:  # a Lightning without it: leave the check to the Trainer
        return []

    def flat(t) -> list:
        args = typing.get_args(t)
        return [x for a in args for x in flat(a)] if args else [t]

    return list(dict.fromkeys(str(v) for v in flat(_PRECISION_INPUT) if isinstance(v, (str, int))))


def _check_task_options(cfg: DictConfig, task: str | None, problems: Problems) -> None:
    """Options of one task that no schema types: the ROI tasks' ``features``, ``extract.*``, ``figures.*``,
    make_synthetic's sizes."""
    if task in ("classify", "extract") and "features" in cfg:
        from ..embeddings.features import FEATURES

        features = select(cfg, "features")
        if features not in FEATURES:
            problems.bad("features", features, one_of(features, FEATURES))
    if isinstance(cfg.get("extract"), DictConfig):
        for key, low in (("extract.batch_size", 1), ("extract.num_workers", 0), ("extract.flush_every", 1)):
            value = select(cfg, key)
            if value is not None and not (is_int(value) and value >= low):
                problems.bad(key, value, f"an integer >= {low}")
        precision, valid = select(cfg, "extract.precision"), _precisions()
        if valid and str(precision) not in valid:
            problems.bad("extract.precision", precision, one_of(str(precision), valid))
    if isinstance(cfg.get("figures"), DictConfig):
        for key in ("num_rois", "num_slides"):  # classify/extract draw ROIs, mil draws slides
            if key in cfg.figures:
                n = select(cfg, f"figures.{key}")
                if not (is_int(n) and n >= 0):
                    problems.bad(f"figures.{key}", n, "an integer >= 0 (0: no figures)")
    if task == "mil":  # its feature loaders (embed.num_workers, the tile readers, is checked with the embed group)
        n = select(cfg, "data.num_workers")
        if n is not None and not (is_int(n) and n >= 0):
            problems.bad("data.num_workers", n, "an integer >= 0 (0: load in the main process) or null (automatic)")
        _check_mil_training(cfg, problems)
    if task == "make_synthetic":
        check_make_synthetic(cfg, problems)


def _check_mil_training(cfg: DictConfig, problems: Problems) -> None:
    """mil's head, bags and optimiser: checked here, not by torch after every slide was embedded."""
    mean_pool = select(cfg, "head.name") == "mean_pool"
    for key, low, nullable, what in (
        ("data.batch_size", 1, False, "bags per step"),
        ("data.max_tiles_train", 1, True, "tiles per training bag; null: every tile"),
        ("data.max_tiles_eval", 1, True, "tiles per val/test bag; null: every tile"),
        ("head.hidden", 0 if mean_pool else 1, mean_pool, "units of the hidden layer; mean_pool: null or 0 for none"),
        ("head.attention_hidden", 1, False, "units of the attention layer"),
    ):
        if not has_key(cfg, key):
            continue
        v = select(cfg, key)
        if not ((v is None and nullable) or (is_int(v) and v >= low)):
            problems.bad(key, v, f"an integer >= {low}{' or null' if nullable else ''} ({what})")
    epochs = select(cfg, "trainer.max_epochs") if has_key(cfg, "trainer.max_epochs") else 1
    if not (is_int(epochs) and epochs >= 1):  # (Lightning's -1, no limit: the cosine schedule spans max_epochs)
        problems.bad("trainer.max_epochs", epochs, "an integer >= 1 (0 tests an untrained head; the learning-rate "
                     "schedule spans max_epochs, so -1 for no limit is not supported)")  # fmt: skip
    dropout = select(cfg, "head.dropout") if has_key(cfg, "head.dropout") else 0.0
    if not (_as_float(dropout) is not None and 0 <= _as_float(dropout) < 1):
        problems.bad("head.dropout", dropout, "a probability in [0, 1)")
    for key, what in (("optim.lr", "> 0"), ("optim.weight_decay", ">= 0")):
        if not has_key(cfg, key):
            continue
        v = select(cfg, key)
        x = _as_float(v)  # optim has no schema: ${oc.env:LR} is the string '1e-4', which the task reads as float
        if not (x is not None and (x > 0 if what == "> 0" else x >= 0)):
            problems.bad(key, v, f"a number {what}")


def _as_float(v: Any) -> float | None:
    """``v`` as the task reads it (``float(v)``), or None where that fails (or for a bool)."""
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def composition_hint(task: str, overrides: list[str]) -> str | None:
    """A clearer message for a command line Hydra refused at composition, or None: an old key's name
    (``features=cls`` in embed_slides → ``embed.features``) or another task's head (``head=foo`` in mil lists the
    heads mil takes, not every file of conf/head/). For the CLI to print in place of Hydra's message."""
    renamed = task_renamed(task)
    lines: list[str] = []
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep:
            continue
        if key in renamed:
            lines.append(f"{key}: renamed to {renamed[key]}; use {renamed[key]}={value}")
        elif "(" in value:  # a sweep function (choice, range, glob): Hydra expands it
            continue
        elif key == "head" and task in TASK_HEADS:  # a multirun's comma list names several
            for v in (v for v in value.split(",") if v not in TASK_HEADS[task]):
                lines.append(f"head={v!r}: must be {head_choices(task, v)}")
        elif key == "data" and task in TASK_DATA:
            for v in (v for v in value.split(",") if v not in TASK_DATA[task]):
                lines.append(f"data={v!r}: must be {one_of(v, TASK_DATA[task])} in the {task} task")
    return "invalid configuration:\n  " + "\n  ".join(lines) if lines else None

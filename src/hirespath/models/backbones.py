"""Registry of pathology ViT presets built with timm, and strict loading of their official weights.

Each preset records what timm needs to build the exact architecture of an official checkpoint (the
kwargs the model card passes to ``timm.create_model``), plus what hirespath needs around it: the patch
size, how many prefix (global) tokens precede the patch tokens, the input normalisation and where the
official weights live. Nothing is ever downloaded: weights are always a local file.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked

from ..utils.config import one_of
from ..utils.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    timm_name: str
    kwargs: dict[str, Any]
    patch_size: int
    num_prefix_tokens: int  # CLS + registers, in that order, before the patch tokens
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    checkpoint: str | None = None  # hub repo of the official weights (never fetched here)
    checkpoint_file: str | None = None  # file name inside that repo
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, BackbonePreset] = {}


def register_backbone(preset: BackbonePreset) -> BackbonePreset:
    if preset.name in _REGISTRY:
        raise ValueError(f"backbone preset {preset.name!r} is already registered")
    _REGISTRY[preset.name] = preset
    return preset


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackbonePreset:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown backbone preset {name!r}; choose {one_of(name, list_backbones())}") from None


# timm's default depth of the architectures whose preset does not set it explicitly.
_TIMM_DEPTH = {
    "vit_large_patch16_224": 24,
    "vit_huge_patch14_224": 32,
    "vit_giant_patch14_224": 40,
    "vit_giant_patch14_dinov2": 40,
    "vit_giant_patch14_reg4_dinov2": 40,
}


def preset_geometry(name: str, overrides: dict | None = None) -> tuple[int, int | None]:
    """(patch size, depth or None if unknown) of a preset with its timm overrides, without building the model."""
    preset = get_backbone(name)
    overrides = overrides or {}
    patch = int(overrides.get("patch_size", preset.patch_size))
    depth = overrides.get("depth", preset.kwargs.get("depth", _TIMM_DEPTH.get(preset.timm_name)))
    return patch, (int(depth) if depth is not None else None)


class ResolutionError(ValueError):
    """An image size that is not a positive multiple of the patch size.

    ``nearest``: the two nearest valid sizes, ``(lo, hi)`` for a side, one such pair per side for an (H, W) size.
    """

    def __init__(self, message: str, size, patch: int, nearest: tuple):
        super().__init__(message)
        self.size, self.patch, self.nearest = size, patch, nearest


def nearest_multiples(size: int, patch: int) -> tuple[int, int]:
    """The valid sizes around ``size``: the largest positive multiple of ``patch`` not above it (at least
    ``patch``) and the next one."""
    lo = max(patch, size // patch * patch)
    return lo, lo + patch


def check_resolution(size: int | tuple[int, int], patch: int, what: str = "resolution", hint: str = "") -> None:
    """Raise ``ResolutionError`` (a ValueError) unless ``size`` — a side in pixels, or an (H, W) pair — is a
    positive multiple of the patch size ``patch`` on every side; the message names ``what``, the size, the patch
    size and the two nearest valid sizes (of each bad side), then ``hint`` in parentheses."""
    pair = isinstance(size, (tuple, list))
    sides = tuple(size) if pair else (size,)
    if len(sides) != (2 if pair else 1) or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in sides
    ):
        raise ValueError(f"{what} must be an integer number of pixels or an (H, W) pair of them, got {size!r}")
    bad = [i for i, s in enumerate(sides) if s < patch or s % patch]
    if not bad:
        return
    nearest = tuple(nearest_multiples(int(s), patch) for s in sides)
    labels = ("H ", "W ") if pair else ("",)
    valid = ", ".join(f"{labels[i]}{nearest[i][0]} or {nearest[i][1]}" for i in bad)
    raise ResolutionError(
        f"{what} {'×'.join(map(str, sides))} is not a positive multiple of the patch size {patch}; "
        f"nearest valid: {valid}" + (f" ({hint})" if hint else ""),
        size,
        patch,
        nearest if pair else nearest[0],
    )


_SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)

# UNI2-h: the kwargs of the MahmoodLab/UNI2-h model card.
register_backbone(
    BackbonePreset(
        name="uni2_h",
        timm_name="vit_giant_patch14_224",
        kwargs=dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
            **_SWIGLU,
        ),
        patch_size=14,
        num_prefix_tokens=9,
        checkpoint="MahmoodLab/UNI2-h",
        checkpoint_file="pytorch_model.bin",
        notes="ViT-giant/14, 681M parameters, 8 registers, SwiGLU, LayerScale; the paper's backbone.",
    )
)

# UNI (v1): ViT-L/16 with LayerScale, model card of MahmoodLab/UNI.
register_backbone(
    BackbonePreset(
        name="uni",
        timm_name="vit_large_patch16_224",
        kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        patch_size=16,
        num_prefix_tokens=1,
        checkpoint="MahmoodLab/UNI",
        checkpoint_file="pytorch_model.bin",
        notes="ViT-L/16, 303M parameters.",
    )
)

# Virchow2: config.json of paige-ai/Virchow2 (vit_huge_patch14_224, 4 registers) + the card's SwiGLU/SiLU.
register_backbone(
    BackbonePreset(
        name="virchow2",
        timm_name="vit_huge_patch14_224",
        kwargs=dict(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            reg_tokens=4,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            **_SWIGLU,
        ),
        patch_size=14,
        num_prefix_tokens=5,
        checkpoint="paige-ai/Virchow2",
        checkpoint_file="pytorch_model.bin",
        notes="ViT-H/14, 632M parameters, 4 registers. The card's embedding concatenates CLS and mean patch token.",
    )
)

# H-optimus-0: config.json of bioptimus/H-optimus-0 (vit_giant_patch14_reg4_dinov2), its own mean/std.
register_backbone(
    BackbonePreset(
        name="h_optimus_0",
        timm_name="vit_giant_patch14_reg4_dinov2",
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=True),
        patch_size=14,
        num_prefix_tokens=5,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        checkpoint="bioptimus/H-optimus-0",
        checkpoint_file="pytorch_model.bin",
        notes="ViT-g/14 (40 blocks), 1.1B parameters, 4 registers. The card builds it with dynamic_img_size=False; "
        "hirespath turns it on so position embeddings interpolate (state_dict unchanged).",
    )
)

# Prov-GigaPath tile encoder: config.json of prov-gigapath/prov-gigapath (DINOv2 giant at patch 16).
register_backbone(
    BackbonePreset(
        name="prov_gigapath",
        timm_name="vit_giant_patch14_dinov2",
        kwargs=dict(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            num_classes=0,
            dynamic_img_size=True,
        ),
        patch_size=16,
        num_prefix_tokens=1,
        checkpoint="prov-gigapath/prov-gigapath",
        checkpoint_file="pytorch_model.bin",
        notes="ViT-g (40 blocks) at patch 16, 1.1B parameters, no registers. The card builds it with "
        "dynamic_img_size=False; hirespath turns it on so position embeddings interpolate (state_dict unchanged).",
    )
)

# Tiny member of the UNI2-h family (registers, SwiGLU, LayerScale) for tests and demos. embed_dim 96 keeps
# SwiGLUPacked's hidden size even with UNI2-h's mlp_ratio (64 would not).
register_backbone(
    BackbonePreset(
        name="tiny",
        timm_name="vit_giant_patch14_224",
        kwargs=dict(
            img_size=224,
            patch_size=14,
            depth=6,
            num_heads=4,
            init_values=1e-5,
            embed_dim=96,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
            **_SWIGLU,
        ),
        patch_size=14,
        num_prefix_tokens=9,
        notes="UNI2-h family at depth 6, dim 96, 4 heads; random weights only.",
    )
)


def _is_hub_reference(weights: str) -> bool:
    return weights.startswith(("hf_hub:", "hf-hub:", "http://", "https://", "timm/"))


def resolve_weights(preset: BackbonePreset, weights: str | os.PathLike | None) -> Path | None:
    """Turn the user's ``weights`` argument into a local path, or explain how to get one."""
    if weights is None or weights is False:
        return None
    if weights is True or (
        isinstance(weights, str) and (weights in ("pretrained", "hub") or _is_hub_reference(weights))
    ):
        repo = preset.checkpoint or "<the model's hub repo>"
        fname = preset.checkpoint_file or "pytorch_model.bin"
        raise InputError(
            f"hirespath never downloads weights (got weights={weights!r} for {preset.name!r}). Download "
            f"{fname} from https://huggingface.co/{repo} on a machine with access, then pass its local path, "
            f"e.g. create_encoder({preset.name!r}, weights='/path/to/{fname}') or backbone.weights=/path/to/{fname}."
        )
    if isinstance(weights, str) and not weights.strip():
        raise InputError(
            f"weights={weights!r} is empty; pass None for random init or the path of a local checkpoint file"
        )
    path = Path(weights).expanduser()
    if path.is_dir():  # the model card's local_dir / an HF snapshot folder
        names = [n for n in (preset.checkpoint_file, "model.safetensors", "pytorch_model.bin") if n]
        found = [path / n for n in dict.fromkeys(names) if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"weights {str(path)!r} is a directory without any of {names}; pass the checkpoint file itself"
            )
        return found[0]
    # a bare hub id (MahmoodLab/UNI2-h): explain how to get the file; a relative file path (UNI2-h/model.bin) is
    # a file that is not there
    bare = isinstance(weights, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", weights)
    if bare and not path.exists() and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return resolve_weights(preset, "hf-hub:" + weights)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist{where}; pass a local .safetensors, .bin or .pth file in "
            f"timm's key layout (as {preset.checkpoint or 'the official repo'} ships it)."
        )
    return path


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")  # what read_state_dict reads
_VALID_WEIGHTS = "a state_dict in timm's key layout as .safetensors, or a torch .bin/.pth/.pt file"


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint at all (empty, a Git LFS pointer, a text or HTML page), or None."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes: an interrupted download or copy; fetch it again)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"version https://git-lfs"):
        return (
            f"is a Git LFS pointer ({size} bytes), not the weights: fetch the file itself "
            "(git lfs pull, or download it from the model's page)"
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:80] if text.strip() else ""
        return f"is a text file ({size} bytes, starting {first!r}), not a checkpoint (an error page saved as it?)"
    return None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in memory of their own: safetensors maps the file by default, and the tensors become the
    model's weights (``build_timm_model``), which must not change, or fault, when the file is rewritten."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.7: no backend argument
        return {k: v.clone() for k, v in load_file(str(path), device="cpu").items()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely (safetensors, or torch pickles with ``weights_only=True``)."""
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        why = _not_a_checkpoint(path)
        if why:
            raise InputError(f"weights file {str(path)!r} {why}; expected {_VALID_WEIGHTS}")
    if suffix == ".safetensors":
        try:
            state = _read_safetensors(path)
        except Exception as err:  # truncated files, another format under this suffix
            raise InputError(
                f"could not read weights file {str(path)!r} as safetensors ({type(err).__name__}: {err}): "
                f"truncated, or not a safetensors file? Expected {_VALID_WEIGHTS}"
            ) from err
    elif suffix in CHECKPOINT_SUFFIXES:  # the torch pickles
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickles holding code, truncated files, ...
            raise InputError(
                f"could not read weights file {str(path)!r} with torch.load(weights_only=True) "
                f"({type(err).__name__}: {err or 'no message'}): truncated, not a torch file, or a pickle holding "
                f"code rather than tensors? Expected {_VALID_WEIGHTS}"
            ) from err
    else:
        raise InputError(f"weights file {str(path)!r} has suffix {suffix!r}; use .safetensors, .bin, .pth or .pt")
    # Training checkpoints often wrap the weights; the official files do not, but unwrap the usual keys.
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {str(path)!r} does not hold a flat state_dict of tensors")
    return state


def strip_prefix(state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """Keys saved from a wrapper (DDP ``module.``, Lightning ``model.``, ``_orig_mod.``, HiResEncoder ``vit.``, ...):
    if no key matches the model but some key ends with one of the model's key names, keep the keys under that prefix
    (the prefix whose keys match the model best, so a ViT of another depth is compared key by key)."""
    if set(state) & set(own):
        return state
    anchors = ("pos_embed", "patch_embed.proj.weight", "cls_token", "norm.weight")
    best, best_overlap = state, 0
    for anchor in anchors:
        prefixes = {k[: -len(anchor)] for k in state if k.endswith("." + anchor)}
        for prefix in sorted(prefixes, key=len):
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if set(sub) == set(own):
                return sub
            overlap = len(set(sub) & set(own))
            if overlap > best_overlap:
                best, best_overlap = sub, overlap
    return best


def vit_geometry(state: dict) -> dict:
    """Depth, width and patch size of the ViT a state_dict holds (the keys timm's VisionTransformer uses)."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    out = {"depth": max(blocks) + 1 if blocks else None}
    for key, name in (("cls_token", "dim"), ("pos_embed", "dim"), ("patch_embed.proj.weight", "patch")):
        if key in state and name not in out:
            out[name] = int(state[key].shape[-1])
    return out


def _geometry_text(g: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in g.items() if v is not None)


def _listing(keys: list[str], n: int = 8) -> str:
    return f"({len(keys)}): {keys[:n]}" + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def _guess_preset(state: dict[str, torch.Tensor]) -> str | None:
    """The registered preset whose state_dict has exactly these keys and shapes (built on the meta device)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, preset in _REGISTRY.items():
        if preset.checkpoint is None:
            continue
        with torch.device("meta"):
            ref = timm.create_model(preset.timm_name, pretrained=False, **preset.kwargs).state_dict()
        if {k: tuple(v.shape) for k, v in ref.items()} == shapes:
            return name
    return None


def load_weights(
    model: torch.nn.Module, path: Path, preset: str | None = None, overrides: dict | None = None, assign: bool = False
) -> None:
    """Load ``path`` into ``model`` strictly, listing missing or unexpected keys on failure (and, given the
    ``preset`` name and its arch ``overrides``, how the file's ViT differs from the one built).

    ``assign``: the model's tensors become the file's (cast to the model's dtypes) instead of being copied into; a
    model built on the meta device is loaded that way."""
    own = model.state_dict()
    state = strip_prefix(read_state_dict(path), own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"weights file {str(path)!r} does not match the architecture:"]
        if missing:
            lines.append(f"  missing keys {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys {_listing(unexpected)}")
        if mismatched:
            lines.append(
                f"  shape mismatches ({len(mismatched)}): "
                + ", ".join(f"{k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:8])
                + (" ..." if len(mismatched) > 8 else "")
            )
        mine, theirs = vit_geometry(own), vit_geometry(state)
        built = f"backbone={preset}" + (f" with backbone.overrides={overrides}" if overrides else "") if preset else ""
        if preset and theirs != mine and any(v is not None for v in theirs.values()):
            lines.append(f"  the file holds a ViT of {_geometry_text(theirs)}; {built} is {_geometry_text(mine)}")
        guess = _guess_preset(state) if mismatched or missing else None
        if guess:
            lines.append(
                f"The file is the checkpoint of preset {guess!r}: set backbone={guess} "
                f"(in Python: create_encoder({guess!r}, weights=...))."
            )
        elif (
            preset
            and theirs.get("depth")
            and theirs.get("depth") != mine.get("depth")
            and ({k: v for k, v in theirs.items() if k != "depth"} == {k: v for k, v in mine.items() if k != "depth"})
        ):
            lines.append(
                f"Saved from {preset} at another depth? Set backbone.overrides.depth={theirs['depth']} "
                f"(in Python: create_encoder({preset!r}, depth={theirs['depth']}, weights=...))."
            )
        else:
            what = f"of preset {preset!r}" if preset else "of this preset"
            lines.append(f"Is it the checkpoint {what}, in timm's key layout (and without arch overrides)?")
        raise InputError("\n".join(lines))
    model.load_state_dict(assignable_state(state, own) if assign else state, strict=True, assign=assign)


def unsaved_tensors(model: torch.nn.Module) -> list[str]:
    """The tensors of ``model`` that its state_dict leaves out: non-persistent buffers, and tensors a module keeps
    as plain attributes (built on the meta device, these would stay there)."""
    saved = set(model.state_dict())
    names = [n for n, _ in (*model.named_parameters(), *model.named_buffers()) if n not in saved]
    for prefix, module in model.named_modules():
        names += [f"{prefix}.{a}".lstrip(".") for a, v in vars(module).items() if isinstance(v, torch.Tensor)]
    return names


def build_without_init(create: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, bool]:
    """``(model, on_meta)``: ``create()`` on the meta device, skipping its random init (seconds for UNI2-h) for a
    model whose every weight then comes from a file (``load_state_dict(assignable_state(...), assign=True)``); or,
    when it holds a tensor no state_dict carries, ``create()`` as usual (``on_meta`` False: load by copying)."""
    with torch.device("meta"):
        model = create()
    if unsaved_tensors(model):
        return create(), False
    return model, True


def assignable_state(state: dict, own: dict, copy: bool = False) -> dict:
    """``state`` as a model built on the meta device takes it (``assign=True``): each tensor contiguous, in the
    dtype of its key in ``own`` (the model's state_dict), copied when ``copy`` (out of a memory-mapped file); a
    tensor saved under several keys (modules shared between parents) is converted once and stays one tensor."""
    converted, out = {}, {}
    for key, value in state.items():
        if key not in own:  # unexpected: left for load_state_dict to report
            out[key] = value
            continue
        view = (value.data_ptr(), value.shape, value.stride(), own[key].dtype)
        if view not in converted:
            converted[view] = value.to(dtype=own[key].dtype, copy=copy).contiguous()
        out[key] = converted[view]
    return out


def build_timm_model(preset: BackbonePreset, weights=None, **arch_overrides) -> torch.nn.Module:
    """Build the preset's timm ViT: random init, or with every weight from a local checkpoint if one is given."""
    if "pretrained" in arch_overrides:
        if arch_overrides.pop("pretrained"):
            resolve_weights(preset, True)  # raises with instructions
    path = resolve_weights(preset, weights)
    kwargs = {**preset.kwargs, **arch_overrides}
    # timm's pretrained_cfg carries the preset's normalisation, so timm.data.resolve_data_config(model) agrees
    overlay = dict(mean=tuple(preset.mean), std=tuple(preset.std), **kwargs.pop("pretrained_cfg_overlay", {}))

    def create() -> torch.nn.Module:
        try:
            return timm.create_model(preset.timm_name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
        except AssertionError as err:  # timm's layers assert their shapes without a message
            dim, ratio = kwargs.get("embed_dim"), kwargs.get("mlp_ratio", 4.0)
            hint = ""
            if dim is not None and int(dim * ratio) % 2:
                hint = (f": its gated MLP splits int(embed_dim × mlp_ratio) = int({dim} × {ratio:g}) = "
                        f"{int(dim * ratio)} hidden units in two halves, so backbone.overrides.embed_dim must make "
                        "that even (e.g. 96)")  # fmt: skip
            raise InputError(
                f"timm cannot build {preset.name} ({preset.timm_name}) with backbone.overrides="
                f"{arch_overrides}{hint or f' (an assertion in its layers: {err!r})'}"
            ) from err

    if path is None:
        return create()
    # The file holds every weight: the random init is skipped (UNI2-h: 7 s on a 2-core CPU, and a second copy of
    # its 2.7 GB while the file's tensors are copied in).
    device = torch.empty(0).device  # where the caller builds (a ``with torch.device(...)`` block)
    model, on_meta = build_without_init(create)
    load_weights(model, path, preset.name, arch_overrides, assign=on_meta)
    return model.to(device) if on_meta and device.type != "cpu" else model

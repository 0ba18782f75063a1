"""The high-resolution encoder: a timm ViT run with dense, eager or sparse attention and token pruning."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

try:
    from timm.layers import Attention
except ImportError:  # timm < 1.0.16 keeps it in the ViT module
    from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from .attention import (
    PROJECTING_KERNELS,
    TokenLayout,
    check_kernel_names,
    check_radius,
    check_window,
    prefix_attention_probs,
    project_keys,
    select_kernel,
    split_heads,
)
from .backbones import BackbonePreset, build_timm_model, check_resolution, get_backbone, preset_geometry
from .cpu_tasks import check_cpu_parallel, cpu_tasks, map_tasks, row_chunks
from .pruning import GlobalAttentionPruner, check_prune_layer

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass
class EncoderOutput:
    cls: Tensor  # B×D final normed CLS token
    patch_tokens: Tensor  # B×N'×D final normed patch tokens that survived pruning
    positions: Tensor  # B×N'×2 long (row, col) of each surviving token in the patch grid
    grid: tuple[int, int]  # (rows, cols) of the full patch grid
    prefix_tokens: Tensor  # B×P×D final normed prefix tokens (CLS, then registers)
    # B×(rows·cols) fp32 global-attention score of every patch of the full grid, only with forward(token_scores=True):
    # the pruner's scores at its layer, or the last block's prefix attention when nothing is pruned
    token_scores: Tensor | None = None

    @property
    def mean_patch(self) -> Tensor:
        return self.patch_tokens.mean(dim=1)


@dataclass
class TokenState:
    """Tokens between blocks: what the stepwise API (``embed`` → ``run_blocks`` → ``finish``) passes along."""

    x: Tensor  # B×(P+N)×D
    layout: TokenLayout
    token_scores: Tensor | None = None  # B×(rows·cols), set by the scoring block when keep_scores
    keep_scores: bool = False  # record the token scores (forward(token_scores=True))


def _add_residual(x: Tensor, y: Tensor, layer_scale: nn.Module, drop_path: nn.Module, inplace: bool = False) -> Tensor:
    """``x + drop_path(layer_scale(y))``; in inference a LayerScale is applied by one fused addcmul (one pass over
    the tokens instead of two)."""
    gamma = getattr(layer_scale, "gamma", None)
    active_drop_path = drop_path.training and not isinstance(drop_path, nn.Identity)
    if torch.is_grad_enabled() or active_drop_path or not isinstance(gamma, Tensor) or gamma.ndim != 1:
        y = drop_path(layer_scale(y))
        return x.add_(y) if inplace else x + y
    return x.addcmul_(y, gamma) if inplace else torch.addcmul(x, y, gamma)


def check_attention_args(attention: str, window: int, radius: int, sparse_backend: str = "auto") -> None:
    check_kernel_names(attention, sparse_backend)
    check_window(window)
    check_radius(radius)


class HiResEncoder(nn.Module):
    """A timm ViT whose blocks run with the chosen attention and an optional token pruner.

    The timm model is kept intact as ``self.vit`` (its state_dict keys are the official ones); only the
    way its blocks are called changes.
    """

    def __init__(
        self,
        vit: nn.Module,
        preset: BackbonePreset | None = None,
        attention: str = "sparse",
        window: int = 8,
        radius: int = 1,
        prune_ratio: float = 0.0,
        prune_layer: int = 4,
        prune_score_tokens: str = "cls",
        resize_input: bool = False,
        mlp_chunk: int = 1 << 15,
        attn_chunk_keys: int | None = None,
        sparse_backend: str = "auto",
        cpu_parallel: str = "auto",
    ):
        super().__init__()
        check_attention_args(attention, window, radius, sparse_backend)
        check_cpu_parallel(cpu_parallel)
        for i, blk in enumerate(vit.blocks):
            missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
            if missing or not isinstance(blk.attn, Attention):
                raise ValueError(
                    f"block {i} ({type(blk).__name__}) is not a pre-norm timm Block with timm "
                    f"Attention (missing {missing}); hirespath supports those ViTs only"
                )
        # out.cls, the pruning scores and "final normed tokens" assume a CLS token first and the final vit.norm
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("the ViT has no class token (class_token=False); hirespath needs CLS as its first token")
        if not isinstance(getattr(vit, "fc_norm", nn.Identity()), nn.Identity):
            raise ValueError(
                "the ViT normalises with fc_norm (global_pool='avg'/'avgmax'...) instead of norm; build it "
                "with global_pool='token' or '' so the returned tokens are the final normed ones"
            )
        if getattr(getattr(vit, "patch_drop", None), "prob", 0) > 0:
            raise ValueError("patch_drop_rate > 0 drops tokens behind hirespath's layout; build the ViT without it")
        self.vit = vit
        self.preset = preset
        self.attention = attention
        self.window = window
        self.radius = radius
        self.pruner = GlobalAttentionPruner(prune_ratio, prune_layer, prune_score_tokens)
        self.pruner.check_depth(self.depth)
        self.resize_input = resize_input
        self.mlp_chunk = mlp_chunk
        self.attn_chunk_keys = attn_chunk_keys
        self.sparse_backend = sparse_backend
        self.cpu_parallel = cpu_parallel  # CPU inference: auto | tasks | ops (models/cpu_tasks.py)

    # --- facts about the backbone -------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preset.mean if self.preset else (0.485, 0.456, 0.406)

    @property
    def std(self) -> tuple[float, ...]:
        return self.preset.std if self.preset else (0.229, 0.224, 0.225)

    def normalize(self, images01: Tensor) -> Tensor:
        """Map images in [0, 1] to the backbone's input normalisation."""
        mean = torch.tensor(self.mean, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
        return (images01 - mean) / std

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}, window={self.window}, radius={self.radius}, pruner={self.pruner!r}"

    # --- stepwise API (used by forward, the ViT-Adapter and the benchmark) ----------------------
    def check_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalised B×3×H×W), got dtype {images.dtype}")
        in_chans = self.vit.patch_embed.proj.in_channels
        if images.ndim != 4 or images.shape[1] != in_chans:
            raise ValueError(f"images must have shape B×{in_chans}×H×W, got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        p = self.patch_size
        if self.resize_input:
            size = [max(p, round(s / p) * p) for s in (H, W)]
            if size != [H, W]:
                return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        check_resolution((H, W), p, "image size", hint="resize or crop, or build the encoder with resize_input=True")
        return images

    def embed(self, images: Tensor) -> TokenState:
        """Patch embedding, position embedding (interpolated to any grid) and prefix tokens, as timm does."""
        images = self.check_images(images)
        vit = self.vit
        x = vit.patch_embed(images)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return TokenState(x, TokenLayout.full_grid(x.shape[0], grid, self.num_prefix_tokens, x.device))

    def kernel(self, attn: nn.Module, x: Tensor, layout: TokenLayout) -> tuple[str, Callable[..., Tensor]]:
        """The attention kernel this block runs, ``(name, attend)`` from ``select_kernel``: ``attend(attn, x,
        layout, qkv=None, norm=None)`` with this encoder's window, radius and key chunk."""
        name, kernel = select_kernel(
            self.attention,
            self.sparse_backend,
            x.device,
            layout.grid,
            self.window,
            training=torch.is_grad_enabled(),
            dropout=attn.training and attn.attn_drop.p > 0,
            radius=self.radius,
        )
        return name, functools.partial(kernel, window=self.window, radius=self.radius, chunk_keys=self.attn_chunk_keys)

    def _mlp_chunk_tokens(self, blk: nn.Module, x: Tensor, cuda: bool | None = None) -> int:
        """Tokens per image in one MLP chunk, bounded by the size of the hidden activation (fc1's output);
        ``cuda``: the CUDA bound (default: where ``x`` is).

        On CPU a hidden activation of tens of MB is a fresh mmap per call whose page faults cost as much as fc1
        itself (measured: 35 ms of copy per 30 MB); chunks of ~8 MB reuse the heap and stay in cache. On CUDA the
        bound is 128 MB: a GLU MLP holds fc1's output and two half-width products at once, which at 32k tokens of
        UNI2-h (bf16) was 1.07 GB, above the flex attention call's peak. Rows (batch × tokens) per chunk: at least
        256 on CPU and 4,096 on CUDA so the GEMMs stay efficient."""
        hidden = getattr(getattr(blk.mlp, "fc1", None), "out_features", 4 * x.shape[-1])
        cap, least = ((128 << 20), 4096) if (x.is_cuda if cuda is None else cuda) else ((8 << 20), 256)
        rows = max(least, cap // (hidden * x.element_size()))
        return min(self.mlp_chunk, max(1, rows // x.shape[0]))

    def _mlp(self, blk: nn.Module, x: Tensor) -> Tensor:
        """Residual MLP; in inference it runs over token chunks to bound the hidden activation."""
        L = x.shape[1]
        chunk = self._mlp_chunk_tokens(blk, x)
        if torch.is_grad_enabled() or self.training:  # chunks would draw DropPath per chunk
            return _add_residual(x, blk.mlp(blk.norm2(x)), blk.ls2, blk.drop_path2)

        def run(span: tuple[int, int]) -> None:
            xs = x[:, span[0] : span[1]]
            _add_residual(xs, blk.mlp(blk.norm2(xs)), blk.ls2, blk.drop_path2, inplace=True)

        map_tasks(run, row_chunks(L, chunk, x.shape[0]))  # CPU tasks inside ``cpu_tasks``, else a loop
        return x

    def run_block(self, index: int, state: TokenState) -> TokenState:
        kernel, _ = select_kernel(
            self.attention, self.sparse_backend, state.x.device, state.layout.grid, self.window, radius=self.radius
        )
        with cpu_tasks(state.x.device, self.cpu_parallel, sparse=kernel.startswith("sparse")):
            return self._run_block(index, state)

    def _run_block(self, index: int, state: TokenState) -> TokenState:
        blk = self.vit.blocks[index]
        prunes_here = self.pruner.enabled and index + 1 == self.pruner.layer
        # recorded where the pruner scores, or at the last block when nothing is pruned (only when asked)
        scores_here = state.keep_scores and (prunes_here or (not self.pruner.enabled and index + 1 == self.depth))
        layout = state.layout
        kernel, attend = self.kernel(blk.attn, state.x, layout)
        if kernel in PROJECTING_KERNELS:
            # It projects into its own buffers and normalises chunk by chunk (flex): held through its call, the
            # normalised tokens or the pruning block's q/k/v would be the block's memory peak, so the scores
            # come first and are all that is kept (projecting twice costs one GEMM).
            if prunes_here or scores_here:
                scores = self.prune_scores(blk.attn, state.x, layout, norm=blk.norm1)
            y = attend(blk.attn, state.x, layout, norm=blk.norm1)
        else:
            h = blk.norm1(state.x)
            qkv = split_heads(blk.attn, h) if prunes_here or scores_here else None
            if qkv is not None:  # the pruning block's q/k also give the pruning scores: projected once
                scores = self.prune_scores(blk.attn, h, layout, qkv)
            y = attend(blk.attn, h, layout, qkv)
            del h, qkv  # not alive through the MLP
        x = _add_residual(state.x, y, blk.ls1, blk.drop_path1)
        del y
        state = replace(state, x=self._mlp(blk, x))
        if prunes_here or scores_here:
            if scores_here:
                state.token_scores = self._grid_scores(scores, layout)
            if prunes_here:
                state = self.prune(state, scores)
        return state

    @staticmethod
    def _grid_scores(scores: Tensor, layout: TokenLayout) -> Tensor:
        """B×N scores of the layout's tokens placed on the full patch grid (B×rows·cols, 0 where no token)."""
        rows, cols = layout.grid
        pos = layout.positions.to(scores.device)
        full = scores.new_zeros(scores.shape[0], rows * cols, dtype=torch.float32)
        return full.scatter_(1, pos[..., 0] * cols + pos[..., 1], scores.float())

    def prune_scores(
        self, attn: nn.Module, h: Tensor, layout: TokenLayout, qkv: tuple | None = None, norm: nn.Module | None = None
    ) -> Tensor:
        """B×N attention of the global tokens to each patch token in this block (O(N) memory).

        ``h``: the block's normalised tokens; ``qkv``: their projections when the caller has them, otherwise the
        prefix queries and the keys are projected here, the keys a chunk at a time (no whole q/k/v). ``norm``:
        ``h`` is the block's input instead, normalised a chunk at a time as well."""
        P = layout.num_prefix
        if qkv is not None:
            q, k, _ = qkv
            return self.pruner.scores(prefix_attention_probs(attn, q[:, :P], k), P)
        norm = nn.Identity() if norm is None else norm  # (an empty nn.Sequential is falsy)
        q_prefix = split_heads(attn, norm(h[:, :P]))[0]
        keys = lambda start, end: project_keys(attn, norm(h[:, start:end]))  # noqa: E731
        return self.pruner.scores(prefix_attention_probs(attn, q_prefix, keys, length=h.shape[1]), P)

    def prune(self, state: TokenState, scores: Tensor) -> TokenState:
        P = state.layout.num_prefix
        keep = self.pruner.select(scores)
        patches = state.x[:, P:].gather(1, keep[..., None].expand(-1, -1, state.x.shape[-1]))
        return replace(state, x=torch.cat([state.x[:, :P], patches], dim=1), layout=state.layout.select(keep))

    def run_blocks(self, state: TokenState, start: int = 0, end: int | None = None) -> TokenState:
        for i in range(start, self.depth if end is None else end):
            state = self.run_block(i, state)
        return state

    def finish(self, state: TokenState) -> EncoderOutput:
        x = self.vit.norm(state.x)
        P = state.layout.num_prefix
        return EncoderOutput(
            cls=x[:, 0],
            patch_tokens=x[:, P:],
            positions=state.layout.positions,
            grid=state.layout.grid,
            prefix_tokens=x[:, :P],
            token_scores=state.token_scores,
        )

    def forward(self, images: Tensor, token_scores: bool = False) -> EncoderOutput:
        """``token_scores=True``: also ``out.token_scores`` (the same tokens and outputs, one score per patch)."""
        state = self.embed(images)
        state.keep_scores = bool(token_scores)
        return self.finish(self.run_blocks(state))


def create_encoder(
    backbone: str = "uni2_h",
    attention: str = "sparse",
    window: int = 8,
    prune_ratio: float = 0.0,
    prune_layer: int = 4,
    weights=None,
    *,
    radius: int = 1,
    prune_score_tokens: str = "cls",
    resize_input: bool = False,
    sparse_backend: str = "auto",
    cpu_parallel: str = "auto",
    **arch_overrides,
) -> HiResEncoder:
    """Build a registry preset as a high-resolution encoder.

    ``weights``: None (random init) or the path of a local checkpoint in timm's key layout, loaded strictly.
    ``arch_overrides`` go to ``timm.create_model`` (e.g. ``depth=2, embed_dim=96, num_heads=4, init_values=1.0``).
    """
    preset = get_backbone(backbone)
    # Validate the cheap arguments before building a possibly billion-parameter model.
    check_attention_args(attention, window, radius, sparse_backend)
    check_cpu_parallel(cpu_parallel)
    GlobalAttentionPruner(prune_ratio, prune_layer, prune_score_tokens)
    check_prune_layer(prune_layer, preset_geometry(backbone, arch_overrides)[1], prune_ratio)
    vit = build_timm_model(preset, weights=weights, **arch_overrides)
    return HiResEncoder(
        vit,
        preset,
        attention=attention,
        window=window,
        radius=radius,
        prune_ratio=prune_ratio,
        prune_layer=prune_layer,
        prune_score_tokens=prune_score_tokens,
        resize_input=resize_input,
        sparse_backend=sparse_backend,
        cpu_parallel=cpu_parallel,
    )


def encoder_from_config(backbone, attention, pruner) -> HiResEncoder:
    """Build the encoder from the ``backbone``/``attention``/``pruner`` config groups (dicts or DictConfigs).

    The groups' keys are ``create_encoder``'s keyword names (``hirespath.configs``), passed through as they are;
    the one exception is ``attention.mode``, which is ``create_encoder``'s ``attention``."""
    attention = dict(attention)
    mode = attention.pop("mode")
    overrides = dict(backbone.get("overrides") or {})
    return create_encoder(
        backbone["name"], attention=mode, weights=backbone.get("weights"), **attention, **dict(pruner), **overrides
    )

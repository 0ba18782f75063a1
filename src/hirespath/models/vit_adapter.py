"""ViT-Adapter (Chen et al., 2023) on the hirespath encoder: multi-scale features at strides 4/8/16/32.

A convolutional spatial prior module (SPM) gives features at 1/4–1/32. The encoder's blocks run in
``len(groups)`` interaction groups; before each group an Injector adds SPM features (1/8, 1/16, 1/32) to the
patch tokens by multi-scale deformable attention, after it an Extractor pulls the patch tokens back into the
SPM features (then a ConvFFN; the last group is followed by ``extra_extractors`` more extractors, as in the
original). Only patch tokens are injected into / extracted from; prefix tokens pass through. The patch
grid (stride 14 for UNI2-h) is resized to each stride's grid where the two meet, as DINOv3's adapter does.
The deformable attention is transformers' module (the one its Mask2Former uses), sampling through
:mod:`.deformable` (query chunks, level by level: the same result without the full stacked samples in memory).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention as MSDeformAttn,
)

from . import deformable

deformable.install()  # the adapter's and the pixel decoder's deformable attention sample in query chunks


def _norm(channels: int) -> nn.GroupNorm:
    # The ViT-Adapter paper uses (Sync)BatchNorm; GroupNorm behaves the same at batch size 1 and under DDP.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.ReLU(inplace=True))


class SpatialPriorModule(nn.Module):
    def __init__(self, inplanes: int, embed_dim: int):
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn(3, inplanes, 2),
            _conv_bn(inplanes, inplanes, 1),
            _conv_bn(inplanes, inplanes, 1),
            nn.MaxPool2d(3, 2, 1),
        )
        self.conv2 = _conv_bn(inplanes, 2 * inplanes, 2)
        self.conv3 = _conv_bn(2 * inplanes, 4 * inplanes, 2)
        self.conv4 = _conv_bn(4 * inplanes, 4 * inplanes, 2)
        self.fc = nn.ModuleList(
            [nn.Conv2d(c, embed_dim, 1) for c in (inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes)]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [fc(c) for fc, c in zip(self.fc, (c1, c2, c3, c4))]


def _reference_points(shapes: list[tuple[int, int]], device) -> Tensor:
    """Centres of every cell of every grid, normalised to [0, 1]: (1, Σ h·w, 2) as (x, y)."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
    return torch.cat(refs)[None]


def _flatten(maps: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]], Tensor]:
    shapes = [tuple(m.shape[-2:]) for m in maps]
    flat = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
    sizes = torch.tensor([h * w for h, w in shapes], device=flat.device)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return flat, shapes, start


def _as_map(tokens: Tensor, shape: tuple[int, int]) -> Tensor:
    """B×(h·w)×C tokens as a contiguous B×C×h×w map. Contiguous: the transposed view is channels-last, and CPU
    bilinear upsampling of a channels-last input takes a slow path (alone: 1.3 s instead of 0.12 s to a 1,792 px
    tile's 1/4 map; with every map of the adapter contiguous a whole forward ran 2.5-4 % faster on CPU)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *shape).contiguous()


class _DeformCross(nn.Module):
    """query ← query + γ · MSDeformAttn(norm(query), norm(value)) over ``n_levels`` value grids."""

    def __init__(self, dim: int, heads: int, n_levels: int, n_points: int, init_gamma: float | None):
        super().__init__()
        self.q_norm, self.v_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, heads, n_levels, n_points)
        self.gamma = nn.Parameter(torch.full((dim,), init_gamma)) if init_gamma is not None else None
        self.n_levels = n_levels

    def forward(
        self,
        query: Tensor,
        query_shapes: list[tuple[int, int]],
        value: Tensor,
        value_shapes: list[tuple[int, int]],
        value_start: Tensor,
    ) -> Tensor:
        ref = _reference_points(query_shapes, query.device)[:, :, None].expand(query.shape[0], -1, self.n_levels, 2)
        out = self.attn(
            self.q_norm(query),
            encoder_hidden_states=self.v_norm(value),
            reference_points=ref,
            spatial_shapes_list=value_shapes,
            level_start_index=value_start,
        )[0]
        return out * self.gamma if self.gamma is not None else out


class _ConvFFN(nn.Module):
    """The extractor's feed-forward of ViT-Adapter (ConvFFN): norm → fc1 → 3×3 depthwise conv on each of the
    flattened levels' grids (one conv shared by the levels) → GELU → fc2."""

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = int(dim * ratio)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)

    def forward(self, x: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.fc1(self.norm(x))
        B, _, C = x.shape
        levels = x.split([h * w for h, w in shapes], dim=1)
        x = torch.cat(
            [
                self.dwconv(lv.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
                for lv, (h, w) in zip(levels, shapes)
            ],
            dim=1,
        )
        return self.fc2(F.gelu(x))


# interaction groups: each one's ViT features are added to one of the four output scales (strides 4 to 32)
ADAPTER_GROUPS = 4


def interaction_groups(depth: int, n: int = ADAPTER_GROUPS) -> list[tuple[int, int]]:
    """``n`` contiguous block ranges covering the depth (UNI2-h: [0–5], [6–11], [12–17], [18–23])."""
    if n != ADAPTER_GROUPS:
        raise ValueError(f"head.adapter.num_groups={n}: must be {ADAPTER_GROUPS} (one per output scale)")
    if depth < n:
        raise ValueError(f"the encoder has {depth} blocks; the adapter's {n} interaction groups need at least {n} "
                         "(backbone.overrides.depth)")  # fmt: skip
    edges = [round(i * depth / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


class ViTAdapter(nn.Module):
    """Wraps a hirespath encoder; ``forward(images)`` returns 4 maps (strides 4, 8, 16, 32) of ``embed_dim``."""

    def __init__(
        self,
        encoder,
        num_groups: int = 4,
        heads: int = 6,
        n_points: int = 4,
        spm_inplanes: int = 64,
        init_gamma: float = 0.0,
        add_vit_feature: bool = True,
        extra_extractors: int = 2,
        ffn_ratio: float = 0.25,
    ):
        super().__init__()
        if encoder.pruner.enabled:
            raise ValueError(
                "the ViT-Adapter needs the full patch grid: build the encoder with prune_ratio=0 "
                "(pruner=none); token pruning is for classification only"
            )
        self.encoder = encoder
        dim = encoder.embed_dim
        if dim % heads:
            heads = next(h for h in range(min(heads, dim), 0, -1) if dim % h == 0)
        self.groups = interaction_groups(encoder.depth, num_groups)
        self.spm = SpatialPriorModule(spm_inplanes, dim)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.injectors = nn.ModuleList([_DeformCross(dim, heads, 3, n_points, init_gamma) for _ in self.groups])
        self.extractors = nn.ModuleList([_DeformCross(dim, heads, 1, n_points, None) for _ in self.groups])
        self.ffns = nn.ModuleList([_ConvFFN(dim, ffn_ratio) for _ in self.groups])
        # the original's last interaction ends with extra extractors (SPM features attend to the last ViT map again)
        self.extra_extractors = nn.ModuleList(
            [_DeformCross(dim, heads, 1, n_points, None) for _ in range(extra_extractors)]
        )
        self.extra_ffns = nn.ModuleList([_ConvFFN(dim, ffn_ratio) for _ in range(extra_extractors)])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norms = nn.ModuleList([_norm(dim) for _ in range(4)])
        # The ViT's final norm (and any classifier head) is never used here: freeze it so DDP does not wait
        # for gradients that never come.
        for module in (encoder.vit.norm, getattr(encoder.vit, "fc_norm", None), getattr(encoder.vit, "head", None)):
            if module is not None:
                module.requires_grad_(False)
        self.add_vit_feature = add_vit_feature
        nn.init.normal_(self.level_embed, std=0.02)

    @property
    def channels(self) -> list[int]:
        return [self.encoder.embed_dim] * 4

    def forward(self, images: Tensor) -> list[Tensor]:
        enc = self.encoder
        c1, c2, c3, c4 = self.spm(images)
        c = [
            c2 + self.level_embed[0, :, None, None],
            c3 + self.level_embed[1, :, None, None],
            c4 + self.level_embed[2, :, None, None],
        ]
        c_flat, c_shapes, c_start = _flatten(c)
        state = enc.embed(images)
        grid = state.layout.grid
        P = state.layout.num_prefix
        vit_maps = []
        for (start, end), inj, ext, ffn in zip(self.groups, self.injectors, self.extractors, self.ffns):
            patches = state.x[:, P:] + inj(state.x[:, P:], [grid], c_flat, c_shapes, c_start)
            state.x = torch.cat([state.x[:, :P], patches], dim=1)
            state = enc.run_blocks(state, start, end)
            patches = state.x[:, P:]
            c_flat = c_flat + ext(c_flat, c_shapes, patches, [grid], c_start.new_zeros(1))
            c_flat = c_flat + ffn(c_flat, c_shapes)
            vit_maps.append(_as_map(patches, grid))
        for ext, ffn in zip(self.extra_extractors, self.extra_ffns):
            c_flat = c_flat + ext(c_flat, c_shapes, patches, [grid], c_start.new_zeros(1))
            c_flat = c_flat + ffn(c_flat, c_shapes)
        sizes = [h * w for h, w in c_shapes]
        c2, c3, c4 = (_as_map(m, s) for m, s in zip(c_flat.split(sizes, 1), c_shapes))
        c1 = c1 + F.interpolate(self.up(c2), size=c1.shape[-2:], mode="bilinear", align_corners=False)
        feats = [c1, c2, c3, c4]
        if self.add_vit_feature:
            feats = [
                f + F.interpolate(v, size=f.shape[-2:], mode="bilinear", align_corners=False)
                for f, v in zip(feats, vit_maps)
            ]
        return [norm(f) for norm, f in zip(self.norms, feats)]

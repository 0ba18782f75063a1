"""Mask2Former (Hugging Face transformers) fed by the ViT-Adapter, with a loss for SegPath's partial labels.

The pixel decoder, transformer decoder and Hungarian-matched mask loss are transformers' own; the backbone
slot of its pixel-level module is replaced by our ViT-Adapter (4 maps at strides 4/8/16/32).

Partial labels: a SegPath image is annotated for one cell type t only; other cell types in it are present
but unlabelled. The loss therefore supervises only what is known: the matched query is pulled to class t
and to t's mask (mask BCE + Dice on 12,544 importance-sampled points, as in Mask2Former); every unmatched
query is pushed away from class t only (−log(1 − p_t), weighted like the no-object class) instead of towards
"no object", so a query that finds an unlabelled cell type of another class is not penalised.

Ignore pixels (255, mmseg's convention): the Hungarian matching costs and the mask losses are computed over the
sampled points whose neighbourhood is labelled only; without ignore pixels everything is transformers' own code.
"""

from __future__ import annotations

import logging
import threading
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    Mask2FormerLoss,
    Mask2FormerMaskPredictor,
    Mask2FormerPixelDecoder,
    sample_point,
)

from ..models.vit_adapter import MSDeformAttn, ViTAdapter


def labelled_points(valid: Tensor, points: Tensor) -> Tensor:
    """1 where a sampled point's bilinear neighbourhood is wholly labelled, else 0. ``valid``: N×1×H×W (1 =
    labelled); ``points``: N×P×2 in [0, 1]. Border padding: the image edge is not an ignore region."""
    # fp32 whatever the training precision: in bf16, bilinear weights of an all-labelled neighbourhood can sum
    # to 0.996 and fail the test
    sampled = sample_point(valid.float(), points.float(), align_corners=False, padding_mode="border").squeeze(1)
    return (sampled > 0.999).float()


def weighted_pairwise_mask_costs(logits: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Mask2Former's pair-wise sigmoid-BCE and Dice matching costs (queries × targets) over sampled points,
    each target's points weighted (0 = ignored). With every weight 1 they equal transformers' pair-wise costs."""
    wt = weight * target
    n = weight.sum(1).clamp_min(1)
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    bce = (pos @ wt.T + neg @ (weight - wt).T) / n
    prob = logits.sigmoid()
    dice = 1 - (2 * prob @ wt.T + 1) / (prob @ weight.T + wt.sum(1)[None] + 1)
    return bce, dice


class IgnoreAwareHungarianMatcher(Mask2FormerHungarianMatcher):
    """transformers' matcher; with ``valid`` set, the mask costs skip points in ignored regions."""

    valid: Tensor | None = None  # B×H×W float, 1 = labelled (set by the loss before each call)

    @torch.no_grad()
    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        if self.valid is None:
            return super().forward(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        indices = []
        for i in range(masks_queries_logits.shape[0]):
            cost_class = -class_queries_logits[i].softmax(-1)[:, class_labels[i]]
            pred = masks_queries_logits[i][:, None]
            target = mask_labels[i].to(pred)[:, None]
            points = torch.rand(1, self.num_points, 2, device=pred.device)  # the same draw as transformers
            target = sample_point(target, points.repeat(len(target), 1, 1), align_corners=False).squeeze(1)
            logits = sample_point(pred, points.repeat(len(pred), 1, 1), align_corners=False).squeeze(1)
            weight = labelled_points(self.valid[i][None, None].to(pred.device), points).to(target).expand_as(target)
            cost_mask, cost_dice = weighted_pairwise_mask_costs(logits, target, weight)
            cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            big = torch.finfo(cost.dtype).max
            indices.append(linear_sum_assignment(torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).cpu()))
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


class PartialLabelMask2FormerLoss(Mask2FormerLoss):
    """Mask2Former's loss where unmatched queries are only told "not the labelled class", and ignore pixels
    (``valid``) are left out of the matching and the mask losses."""

    labelled: Tensor | None = None  # B: the cell type each image is annotated for (set before each call)
    valid: Tensor | None = None  # B×H×W float, 1 = labelled; None: no ignore pixels in the batch

    def __init__(self, config, weight_dict):
        super().__init__(config=config, weight_dict=weight_dict)
        self.matcher = IgnoreAwareHungarianMatcher(
            cost_class=config.class_weight,
            cost_dice=config.dice_weight,
            cost_mask=config.mask_weight,
            num_points=self.num_points,
        )

    def set_targets(self, labelled: Tensor | None, valid: Tensor | None) -> None:
        self.labelled = labelled
        self.valid = self.matcher.valid = valid

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks) -> dict[str, Tensor]:
        if self.valid is None:
            return super().loss_masks(masks_queries_logits, mask_labels, indices, num_masks)
        src_idx = self._get_predictions_permutation_indices(indices)
        tgt_idx = self._get_targets_permutation_indices(indices)
        pred_masks = masks_queries_logits[src_idx][:, None]
        target_masks = self._pad_images_to_max_in_batch(mask_labels)[0][tgt_idx][:, None]
        valid = self.valid.to(target_masks)[tgt_idx[0]][:, None]  # per image, shared by its targets
        with torch.no_grad():  # the same importance sampling as transformers
            points = self.sample_points_using_uncertainty(
                pred_masks,
                lambda logits: self.calculate_uncertainty(logits),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            labels = sample_point(target_masks, points, align_corners=False).squeeze(1)
            weight = labelled_points(valid, points).to(labels)
        logits = sample_point(pred_masks, points, align_corners=False).squeeze(1)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        bce = (bce * weight).sum(1) / weight.sum(1).clamp_min(1)
        prob = logits.sigmoid() * weight
        dice = 1 - (2 * (prob * labels).sum(1) + 1) / (prob.sum(1) + (labels * weight).sum(1) + 1)
        return {"loss_mask": bce.sum() / num_masks, "loss_dice": dice.sum() / num_masks}

    def loss_labels(self, class_queries_logits: Tensor, class_labels: list[Tensor], indices) -> dict[str, Tensor]:
        if self.labelled is None:
            return super().loss_labels(class_queries_logits, class_labels, indices)
        logp = class_queries_logits.float().log_softmax(-1)  # B×Q×(C+1)
        B, Q, _ = logp.shape
        matched = torch.zeros(B, Q, dtype=torch.bool, device=logp.device)
        target = torch.zeros(B, Q, dtype=torch.long, device=logp.device)
        for b, ((src, tgt), labels) in enumerate(zip(indices, class_labels)):
            matched[b, src] = True
            target[b, src] = labels[tgt].to(logp.device)
        t = self.labelled.to(logp.device)[:, None].expand(B, Q)
        loss_matched = -logp.gather(2, target[..., None])[..., 0]
        # log(1 − p_t) as the log-sum-exp of every other class (no 1 − p cancellation, finite gradients)
        not_t = torch.ones_like(logp, dtype=torch.bool).scatter_(2, t[..., None], False)
        loss_unmatched = -torch.logsumexp(logp.masked_fill(~not_t, float("-inf")), dim=-1)
        weight = torch.where(matched, 1.0, self.eos_coef)
        loss = torch.where(matched, loss_matched, loss_unmatched)
        return {"loss_cross_entropy": (weight * loss).sum() / weight.sum()}


# per thread (the seam check may run the model in a closer thread while the main thread runs the next slide):
# id(mask predictor) → the calls left in this forward and its pixel embeddings resized per attention-mask size
_FORWARD_STATE = threading.local()


class _InferenceMaskPredictor(Mask2FormerMaskPredictor):
    """transformers' mask predictor, but at inference the masks that only make the next decoder layer's attention
    mask are computed at that mask's size (1/32 to 1/8 of the image) from downsampled pixel embeddings, instead of
    at 1/4 and then downsampled: bilinear resizing is linear, so it commutes with the sum over channels. Only the
    decoder's last call (the model's output masks) runs at 1/4. The attention masks equal transformers' up to
    rounding (a logit within ~1e-6 of 0 may fall on the other side); training is transformers' code unchanged.
    The decoder's pre-hook (:func:`_start_decoder_forward`) starts each forward's count of calls."""

    def forward(self, outputs: Tensor, pixel_embeddings: Tensor, attention_mask_target_size=None):
        state = _FORWARD_STATE.__dict__.get(id(self))
        if state is not None:
            state.calls_left -= 1
        if self.training or state is None or state.calls_left <= 0 or attention_mask_target_size is None:
            _FORWARD_STATE.__dict__.pop(id(self), None)
            return super().forward(outputs, pixel_embeddings, attention_mask_target_size)
        size = tuple(attention_mask_target_size)
        if size not in state.resized:  # 3 sizes over the 9 calls: each downsampling done once
            state.resized[size] = F.interpolate(pixel_embeddings, size=size, mode="bilinear", align_corners=False)
        embeddings = self.mask_embedder(outputs.transpose(0, 1))
        outputs_mask = torch.einsum("bqc, bchw -> bqhw", embeddings, state.resized[size])
        # thresholded before it is repeated per head: one bool copy, not a float copy per head and its comparison
        below = (outputs_mask.sigmoid() < 0.5).flatten(2).unsqueeze(1)
        # a real tensor, not an expanded view: older transformers' decoders edit the mask in place
        return outputs_mask, below.repeat(1, self.num_heads, 1, 1).flatten(0, 1).detach()


def _start_decoder_forward(decoder: nn.Module, args) -> None:
    """The decoder's forward pre-hook: its mask predictor is called once, then once per layer."""
    _FORWARD_STATE.__dict__[id(decoder.mask_predictor)] = SimpleNamespace(calls_left=len(decoder.layers) + 1,
                                                                          resized={})  # fmt: skip


def _predict_attention_masks_at_their_size(decoder: nn.Module) -> None:
    """Swap the decoder's mask predictor for :class:`_InferenceMaskPredictor` (same weights and state-dict keys),
    where transformers' decoder has the layout it was written against; otherwise leave it as it is."""
    if type(getattr(decoder, "mask_predictor", None)) is not Mask2FormerMaskPredictor or not hasattr(decoder, "layers"):
        return
    decoder.mask_predictor.__class__ = _InferenceMaskPredictor
    decoder.register_forward_pre_hook(_start_decoder_forward)


class _AdapterBackbone(nn.Module):
    """What transformers' pixel-level module expects from a backbone: ``.channels`` and ``(x).feature_maps``."""

    def __init__(self, adapter: ViTAdapter):
        super().__init__()
        self.adapter = adapter
        self.channels = adapter.channels

    def forward(self, pixel_values: Tensor):
        return SimpleNamespace(feature_maps=self.adapter(pixel_values))


# What transformers logs while a SegmentationModel builds its Mask2Former config is dropped, in that thread only: a
# logger level set and restored around the build silenced every other thread meanwhile, and two threads building
# models at once (two segment_slides workers in one process) could leave Mask2Former's warnings off for good.
_building_config = threading.local()


class _QuietWhileBuilding(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_building_config, "active", False)


logging.getLogger("transformers.models.mask2former.configuration_mask2former").addFilter(_QuietWhileBuilding())


class SegmentationModel(nn.Module):
    """Encoder → ViT-Adapter → Mask2Former; ``semantic(images)`` gives per-class probability maps."""

    def __init__(
        self,
        encoder,
        num_classes: int = 8,
        num_queries: int = 100,
        hidden_dim: int = 256,
        decoder_layers: int = 10,
        pixel_decoder_layers: int = 6,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        no_object_weight: float = 0.1,
        adapter: dict | None = None,
        name: str = "mask2former",
    ):
        super().__init__()
        self.name = name  # the head's label (conf/head/mask2former.yaml builds it with hydra.utils.instantiate)
        # A throw-away tiny ResNet satisfies the config (the backbone slot is replaced right below); transformers
        # logs that a ResNet "may not be compatible with Mask2Former" at every build: not ours to heed.
        _building_config.active = True
        try:
            config = Mask2FormerConfig(
                backbone_config=ResNetConfig(
                    embedding_size=8,
                    hidden_sizes=[8, 8, 8, 8],
                    depths=[1, 1, 1, 1],
                    out_features=["stage1", "stage2", "stage3", "stage4"],
                ),
                num_labels=num_classes,
                num_queries=num_queries,
                hidden_dim=hidden_dim,
                feature_size=hidden_dim,
                mask_feature_size=hidden_dim,
                decoder_layers=decoder_layers,
                encoder_layers=pixel_decoder_layers,
                class_weight=class_weight,
                mask_weight=mask_weight,
                dice_weight=dice_weight,
                train_num_points=train_num_points,
                oversample_ratio=oversample_ratio,
                importance_sample_ratio=importance_sample_ratio,
                no_object_weight=no_object_weight,
                use_auxiliary_loss=True,
                num_attention_heads=8,
                dim_feedforward=4 * hidden_dim,
            )
        finally:
            _building_config.active = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deformable attention prefers power-of-2 head dims
            self.adapter = ViTAdapter(encoder, **dict(adapter or {}))
            m2f = Mask2FormerForUniversalSegmentation(config)
        pixel = m2f.model.pixel_level_module
        pixel.encoder = _AdapterBackbone(self.adapter)
        pixel.decoder = Mask2FormerPixelDecoder(config, feature_channels=self.adapter.channels)
        # modules built after post_init() keep torch.empty() memory (its level_embed, for one): initialise them
        pixel.decoder.apply(m2f._init_weights)
        # the adapter's deformable attentions need Deformable-DETR's init too (zero offsets weight + grid bias,
        # uniform attention weights); only them: _init_weights must not touch the (pretrained) encoder
        for mod in self.adapter.modules():
            if isinstance(mod, MSDeformAttn):
                m2f._init_weights(mod)
        m2f.criterion = PartialLabelMask2FormerLoss(config=config, weight_dict=m2f.weight_dict)
        _predict_attention_masks_at_their_size(m2f.model.transformer_module.decoder)
        self.m2f = m2f
        self.num_classes = num_classes

    @property
    def encoder(self):
        return self.adapter.encoder

    def forward(self, images: Tensor, masks: Tensor | None = None, labels: Tensor | None = None):
        """With ``masks`` (B×H×W in {0, 1, 255}) and ``labels`` (B cell types) the output carries the loss."""
        if masks is None:
            return self.m2f(pixel_values=images)
        valid = (masks != 255).float() if (masks == 255).any() else None
        mask_labels, class_labels = [], []
        for m, t in zip(masks, labels):
            fg = (m == 1).float()
            if fg.any():
                mask_labels.append(fg[None])
                class_labels.append(t.view(1).long())
            else:  # nothing of this cell type in the tile: only negatives are known
                mask_labels.append(fg.new_zeros(0, *fg.shape))
                class_labels.append(t.new_zeros(0).long())
        self.m2f.criterion.set_targets(labels, valid)
        try:
            return self.m2f(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels)
        finally:
            self.m2f.criterion.set_targets(None, None)

    @staticmethod
    def semantic_probs(
        out, size: tuple[int, int], classes: Tensor | None = None, query_chunk: int = 16, class_index=None
    ) -> Tensor:
        """Mask2Former's semantic inference: Σ_q softmax(class_q)[c] · sigmoid(mask_q), at ``size``.

        B×C×H×W (C: the classes ``class_index`` lists, else every class), or with ``classes`` (B class indices)
        B×H×W for each image's class only. The query masks are upsampled ``query_chunk`` at a time (100 masks of a
        1,792 px tile would take 1.3 GB) and summed by one matrix product per chunk into the classes, in place
        (an einsum per chunk copied the upsampled masks: 1.43 s → 0.81 s per 1,792 px tile, the same sums).
        """
        cls = out.class_queries_logits.float().softmax(-1)[..., :-1]  # drop "no object"
        if classes is not None:
            weight = cls.gather(-1, classes.view(-1, 1, 1).expand(-1, cls.shape[1], 1))  # B×Q×1
        else:
            weight = cls if class_index is None else cls[..., list(class_index)]  # B×Q×C
        total = cls.new_zeros(cls.shape[0], weight.shape[-1], size[0] * size[1])
        for q in range(0, cls.shape[1], query_chunk):
            masks = F.interpolate(
                out.masks_queries_logits[:, q : q + query_chunk].float(),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            total.baddbmm_(weight[:, q : q + query_chunk].transpose(1, 2), masks.sigmoid_().flatten(2))
        total = total.view(cls.shape[0], -1, *size)
        return total if classes is None else total[:, 0]

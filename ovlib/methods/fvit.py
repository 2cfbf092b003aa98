"""F-ViT: an open-vocabulary Faster R-CNN on a **frozen** CLIP ViT, built from torchvision's detection stack.

F-ViT is the detector CLIPSelf (ICLR'24), R-SC-CLIPSelf (Table 3) and SynCLIP use to show that a better dense
CLIP detects novel objects better. Facts below are read from ``wusize/CLIPSelf`` @1c7fe9c, ``F-ViT/``
(mmdet 2.x; ``configs/ov_coco/fvit_vitb16_upsample_fpn_bs64_3e_ovcoco_eva_original.py`` = CFG,
``models/evaclip_vit.py``, ``models/fvit_head.py``, ``models/custom_losses.py``); nothing is copied.

Architecture (:class:`FViT`):

* **Backbone** -- the CLIP image tower, frozen and run without gradients. The outputs of the blocks
  ``out_indices`` (ViT-B/16: 3, 5, 7, 11) are the taps; the **last block runs in the student's dense mode**
  (``evaclip_vit.py`` L95: ``forward_without_attn``, our ``x+v``; SynCLIP's copy uses ``forward_without_rcffn(x,
  mode='csa')``, our ``csa`` with ``scale=False`` and no residual/FFN), and its output is both the last tap and,
  after the tower's final norm + projection and L2 normalisation, the **VLM map** ``(B, C, h, w)`` that scores
  boxes against the text (:func:`ovlib.models.dense.dense_features`; the taps are read from the same forward by
  hooks, so the tower runs once).
* **Simple pyramid** (ViTDet style, ``evaclip_vit.py`` L26-36): tap ``i`` is resampled by ``scales[i]``: x4 =
  ConvT(2, s2) -> BN -> GELU -> ConvT(2, s2); x2 = ConvT; x1 = identity; x0.5 = max-pool 2 (ViT-B/16: strides 4, 8,
  16, 32). CLIPSelf uses SyncBN; one process here, so ``BatchNorm2d`` (the same statistics on one device).
* **FPN** -- torchvision ``FeaturePyramidNetwork`` with BN on its convolutions (CFG: ``norm_cfg`` SyncBN) and a
  stride-2 max-pooled extra level (mmdet ``num_outs=5``; torchvision ``LastLevelMaxPool``).
* **RPN** -- torchvision ``RegionProposalNetwork`` with a two-conv ``RPNHead``; one anchor size per level =
  ``anchor_scale`` x stride (CFG: scale 8, ratios 0.5/1/2), 2000 pre-NMS / 1000 post-NMS boxes, NMS 0.7; box loss
  **L1** on the encoded deltas (CFG ``L1Loss``; torchvision's default is smooth-L1 with beta 1/9).
* **RoI head** (:class:`OVRoIHeads`, a torchvision ``RoIHeads``) -- ``MultiScaleRoIAlign`` 7x7 on the first four
  levels, ``FastRCNNConvFCHead`` with 4 convs (256, BN) + 2 FCs (512) (CFG ``FViTBBoxHead``: ``num_shared_convs=4,
  num_shared_fcs=2, fc_out_channels=512``), class-agnostic box regression (stds 0.1/0.1/0.2/0.2 = torchvision's
  weights 10/10/5/5), **L1** box loss, 512 RoIs per image with 25 % positives at IoU 0.5, GT boxes added as
  proposals.
* **Classifier** (:class:`OVBoxPredictor`; ``fvit_head.py`` L95-109) -- no linear classes: ``relu(fc(x))`` (the ReLU
  is kept as in the code, its FIXME notwithstanding), L2-normalised, times a learnable temperature (init 50),
  against **fixed** CLIP text embeddings of the vocabulary with a "background" text embedding in column 0.
  Training sees the base vocabulary only: novel classes are outside the softmax (the code's class weight 0 sets
  their logits to -inf, :func:`fvit_cls_loss` gets the same by leaving them out), background has weight 0.6.
* **Open-vocabulary scores at test** (:func:`ov_ensemble`; ``fvit_head.py`` L111-119) -- the VLM box feature is a
  1x1 RoIAlign (adaptive sampling, ``aligned=True``: a box mean of the VLM map), renormalised;
  ``p_det = softmax(det logits)`` and ``p_vlm = softmax(vlm_temperature * cos)`` over background + vocabulary;
  base (and background) columns take ``p_det^(1-alpha) p_vlm^alpha``, novel columns ``p_det^(1-beta) p_vlm^beta``
  (CFG: alpha 0.1, beta 0.8, vlm_temperature 75), **not renormalised**; the background column is dropped, then
  score threshold 0.01, class-wise NMS 0.4, 100 boxes per image (CFG ``test_cfg.rcnn``).

Where torchvision and mmdet differ (stated, not hidden): torchvision's ``MultiScaleRoIAlign`` samples with
``aligned=False`` (mmdet's ``RoIAlign`` defaults to ``aligned=True``); its level mapper uses ``canonical_scale`` /
``canonical_level`` (set here to 14 x patch / log2(patch), which for patch 16 is torchvision's 224 / 4 and maps
boxes to levels exactly as mmdet's ``finest_scale=56``); the RPN's low-quality matching has no ``min_pos_iou``;
F-ViT normalises images with ImageNet statistics (CFG ``img_norm_cfg``) where ``image_mean``/``image_std`` default to
the CLIP's own here (both are options).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ovlib.models.adapter import ViTAdapter, vit_adapter
from ovlib.models.dense import DENSE_MODES, dense_features

__all__ = ["FViTConfig", "FViT", "OVBoxPredictor", "OVRoIHeads", "ov_ensemble", "fvit_cls_loss", "l1_box_loss",
           "default_out_indices"]

#: CLIPSelf's F-ViT taps of ViT-B/16 (12 blocks); :func:`default_out_indices` rescales them to any depth
FVIT_B16_TAPS = (3, 5, 7, 11)


def default_out_indices(num_blocks: int) -> tuple[int, ...]:
    """F-ViT's taps (3, 5, 7, 11 of 12 blocks) at the same relative depths of a ``num_blocks`` tower (distinct,
    ascending, the last block last): 12 -> (3, 5, 7, 11), 24 -> (7, 11, 15, 23), 4 -> (0, 1, 2, 3)."""
    idx = sorted({min(num_blocks - 1, max(0, round((i + 1) * num_blocks / 12) - 1)) for i in FVIT_B16_TAPS})
    for k in range(len(idx) - 2, -1, -1):  # a shallow tower: keep them distinct by stepping back
        if idx[k] >= idx[k + 1]:
            idx[k] = idx[k + 1] - 1
    return tuple(i for i in idx if i >= 0)


@dataclass(frozen=True)
class FViTConfig:
    """The F-ViT detector's options (defaults: CLIPSelf's OV-COCO ViT-B/16 config, CFG)."""

    out_indices: tuple[int, ...] | None = None  # None: :func:`default_out_indices` of the tower
    scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)  # resampling of each tap (powers of 2)
    dense_mode: str = "x+v"  # the last block's mode (the student's): F-ViT x+v, SynCLIP's copy csa
    dense_args: dict = field(default_factory=dict)  # switches of dense_features (e.g. {"scale": False})
    fpn_channels: int = 256
    anchor_scale: float = 8.0
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_convs: int = 2
    rpn_pre_nms: int = 2000
    rpn_post_nms: int = 1000
    rpn_nms: float = 0.7
    rpn_batch: int = 256
    rpn_pos_fraction: float = 0.5
    roi_size: int = 7
    head_convs: int = 4
    head_fcs: tuple[int, ...] = (512, 512)
    roi_batch: int = 512
    roi_pos_fraction: float = 0.25
    det_temperature: float = 50.0  # initial value of the learnable temperature of the detector's cosine logits
    vlm_temperature: float = 75.0
    alpha: float = 0.1  # VLM exponent of base (and background) columns
    beta: float = 0.8  # VLM exponent of novel columns
    bg_weight: float = 0.6
    score_thresh: float = 0.01
    nms: float = 0.4
    detections: int = 100
    min_size: int | None = None  # GeneralizedRCNNTransform resize (None: the images' own size)
    max_size: int | None = None
    image_mean: tuple[float, ...] | None = None  # None: the CLIP's (F-ViT's code uses ImageNet's)
    image_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.dense_mode not in DENSE_MODES:
            raise ValueError(f"FViTConfig.dense_mode {self.dense_mode!r} is not one of {DENSE_MODES}")
        if self.out_indices is not None and len(self.out_indices) != len(self.scales):
            raise ValueError(f"FViTConfig: {len(self.out_indices)} out_indices but {len(self.scales)} scales")
        for s in self.scales:
            if s <= 0 or abs(math.log2(s) - round(math.log2(s))) > 1e-9:
                raise ValueError(f"FViTConfig.scales must be powers of 2, got {s}")
        if not 0 <= self.alpha <= 1 or not 0 <= self.beta <= 1:
            raise ValueError(f"FViTConfig: alpha and beta must be in [0, 1], got {self.alpha}, {self.beta}")


# ------------------------------------------------------------------------------------------ pure functions
def ov_ensemble(p_det: torch.Tensor, p_vlm: torch.Tensor, novel: torch.Tensor, alpha: float, beta: float
                ) -> torch.Tensor:
    """F-ViT's geometric ensemble (``fvit_head.py`` L111-119): ``(N, 1 + C)`` scores from the detector's and the
    VLM's class probabilities ``(N, 1 + C)`` (column 0 background); ``novel (1 + C,)`` bool marks the novel
    columns. Base and background columns: ``p_det^(1-alpha) * p_vlm^alpha``; novel: ``p_det^(1-beta) *
    p_vlm^beta``. Not renormalised (as the code)."""
    if p_det.shape != p_vlm.shape or p_det.shape[-1] != novel.shape[0]:
        raise ValueError(f"ov_ensemble: shapes {tuple(p_det.shape)}, {tuple(p_vlm.shape)}, novel {tuple(novel.shape)}")
    if bool(novel[0]):
        raise ValueError("ov_ensemble: column 0 is background, it cannot be novel")
    a = torch.where(novel, torch.full_like(novel, beta, dtype=p_det.dtype),
                    torch.full_like(novel, alpha, dtype=p_det.dtype))  # (1 + C,)
    return p_det.pow(1 - a) * p_vlm.pow(a)


def fvit_cls_loss(logits: torch.Tensor, labels: torch.Tensor, bg_weight: float) -> torch.Tensor:
    """Softmax cross-entropy of the detector's ``(N, 1 + C)`` logits (column 0 background, ``C`` the training
    vocabulary) with class weights (background ``bg_weight``, classes 1), averaged over the ``N`` sampled RoIs (mmdet's
    ``avg_factor``; ``custom_losses.py`` L62-111 with ``F.cross_entropy(weight=...)`` and ``reduction='none'``)."""
    w = torch.ones(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    w[0] = bg_weight
    return F.cross_entropy(logits, labels, weight=w, reduction="none").sum() / max(labels.numel(), 1)


def l1_box_loss(deltas: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor, n: int) -> torch.Tensor:
    """L1 loss of the encoded box deltas ``(N, 4)`` of the ``positive (N,)`` samples, summed and divided by the
    number of sampled boxes ``n`` (mmdet ``L1Loss`` with ``avg_factor`` = sampled count, as torchvision divides)."""
    return (deltas[positive] - targets[positive]).abs().sum() / max(n, 1)


# ------------------------------------------------------------------------------------------------ modules
def _resample(dim: int, scale: float) -> nn.Module:
    if scale == 1:
        return nn.Identity()
    if scale < 1:
        return nn.MaxPool2d(kernel_size=round(1 / scale), stride=round(1 / scale))
    layers: list[nn.Module] = []
    for k in range(round(math.log2(scale))):
        if k:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


#: a student's own dense map: ``(adapter, normalised images (B, 3, H, W)) -> (B, C, h, w)`` (e.g. DenseRC's HSG
#: constructor); it must run the tower's blocks and project through ``ViTAdapter.final`` (the taps are read there)
DenseFn = Callable[[ViTAdapter, torch.Tensor], torch.Tensor]


class ClipPyramid(nn.Module):
    """Frozen CLIP tower -> (FPN maps ``OrderedDict[str, (B, F, h_l, w_l)]``, VLM map ``(B, C, h, w)``)."""

    def __init__(self, clip: nn.Module, cfg: FViTConfig, dense_fn: DenseFn | None = None):
        super().__init__()
        self.adapter: ViTAdapter = vit_adapter(clip)
        self.dense_fn = dense_fn
        visual = self.adapter.visual
        for p in visual.parameters():
            p.requires_grad_(False)
        self.visual = visual  # registered (it moves with .to()); its weights are never trained nor saved
        L = self.adapter.num_blocks
        self.out_indices = tuple(cfg.out_indices) if cfg.out_indices is not None else default_out_indices(L)
        if len(self.out_indices) != len(cfg.scales):
            raise ValueError(f"F-ViT: {len(self.out_indices)} taps {self.out_indices} but {len(cfg.scales)} scales")
        if any(not 0 <= i < L for i in self.out_indices) or list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f"F-ViT: out_indices {self.out_indices} must be distinct ascending blocks of 0..{L - 1}")
        self.cfg = cfg
        D = self.adapter.width
        self.patch = int(self.adapter.patch_size[0])
        self.resample = nn.ModuleList([_resample(D, s) for s in cfg.scales])
        self.fpn = FeaturePyramidNetwork([D] * len(cfg.scales), cfg.fpn_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=nn.BatchNorm2d)
        self.out_channels = cfg.fpn_channels
        #: strides of the FPN levels (the extra pooled level last), in input pixels
        self.strides = tuple(self.patch / s for s in cfg.scales) + (2 * self.patch / min(cfg.scales),)

    def train(self, mode: bool = True):
        super().train(mode)
        self.visual.eval()  # frozen: dropout off, whatever the detector's mode
        return self

    def forward(self, images: torch.Tensor) -> tuple[OrderedDict, torch.Tensor]:
        ad, L, P = self.adapter, self.adapter.num_blocks, self.adapter.num_prefix
        taps: dict[int, torch.Tensor] = {}

        def keep(i):
            def hook(_m, _inp, out):
                x = out if ad.batch_first else out.transpose(0, 1)
                taps[i] = x[:, P:]  # (B, N, D)
            return hook

        def keep_last(_m, inp):
            taps[L - 1] = inp[0]  # (B, N, D): the last block's dense-mode tokens, before the final norm

        final_norm = self.visual.ln_post if ad.family == "open_clip" else self.visual.trunk.norm
        hooks = [ad.blocks[i].register_forward_hook(keep(i)) for i in self.out_indices if i < L - 1]
        hooks.append(final_norm.register_forward_pre_hook(keep_last))
        try:
            with torch.no_grad():
                if self.dense_fn is not None:
                    vlm = F.normalize(self.dense_fn(ad, images), dim=1)  # (B, C, h, w)
                else:
                    vlm = dense_features(ad, images, self.cfg.dense_mode, normalize=True, **self.cfg.dense_args)
        finally:
            for h in hooks:
                h.remove()
        missing = [i for i in self.out_indices if i not in taps]
        if missing:
            raise RuntimeError(f"F-ViT: the dense map's forward did not pass blocks {missing} (the last tap is read "
                               "at the tower's final norm: a dense_fn must project through ViTAdapter.final)")
        h, w = vlm.shape[-2:]
        maps = OrderedDict()
        for k, (i, res) in enumerate(zip(self.out_indices, self.resample)):
            x = taps[i].detach().transpose(1, 2).reshape(images.shape[0], -1, h, w)  # (B, D, h, w)
            maps[str(k)] = res(x)
        return self.fpn(maps), vlm.detach()


class OVBoxPredictor(nn.Module):
    """Cosine classifier against fixed text embeddings + class-agnostic box deltas (``fvit_head.py`` L95-109)."""

    def __init__(self, in_features: int, embed_dim: int, temperature: float):
        super().__init__()
        self.cls = nn.Linear(in_features, embed_dim)
        self.reg = nn.Linear(in_features, 4)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.register_buffer("text", torch.zeros(0, embed_dim), persistent=False)  # (1 + C, D), row 0 background

    def set_text(self, text: torch.Tensor) -> None:
        """``text (1 + C, D)``: unit-norm embeddings, background first."""
        self.text = F.normalize(text.float(), dim=-1).to(self.cls.weight.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The RoI embeddings ``(N, D)``, unit norm, of RoI features ``x (N, in_features)``."""
        return F.normalize(F.relu(self.cls(x)), dim=-1)

    def logits(self, e: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``(N, 1 + C)`` cosine logits of embeddings ``e (N, D)`` against ``text (1 + C, D)``."""
        return e @ text.t() * self.log_temperature.exp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x (N, in_features)
        if self.text.shape[0] < 2:
            raise RuntimeError("F-ViT: no vocabulary set (FViT.set_vocabulary)")
        return self.logits(self.embed(x), self.text), self.reg(x)  # (N, 1 + C), (N, 4)


class OVRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with F-ViT's losses (weighted CE, L1) and its open-vocabulary test scores."""

    def __init__(self, *args, cfg: FViTConfig, vlm_stride: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg, self.vlm_stride = cfg, vlm_stride
        self.register_buffer("novel", torch.zeros(0, dtype=torch.bool), persistent=False)  # (1 + C,)

    def forward(self, features, proposals, image_shapes, targets=None, vlm_map=None, vocabularies=None):
        """Training: the losses. Test: the detections under the predictor's vocabulary, or -- with
        ``vocabularies``, a list of ``(text (1 + C, D), novel (1 + C,))`` -- a list of them, one per vocabulary,
        from one pass of the box head (proposals and boxes do not depend on the class names)."""
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))  # (N, F)
        if not self.training and vocabularies is not None:
            e, deltas = self.box_predictor.embed(x), self.box_predictor.reg(x)  # (N, D), (N, 4)
            vlm = self._vlm_features(vlm_map, proposals)
            boxes = self.box_coder.decode(deltas, proposals)[:, 0]  # (N, 4): class-agnostic
            return [self._detections(boxes, self._scores(self.box_predictor.logits(e, text), vlm, text, novel),
                                     proposals, image_shapes) for text, novel in vocabularies], {}
        logits, deltas = self.box_predictor(x)  # (N, 1 + C), (N, 4)
        if self.training:
            labels = torch.cat(labels)
            targets_ = torch.cat(regression_targets)  # (N, 4): encoded deltas to each RoI's matched box
            loss_cls = fvit_cls_loss(logits, labels, self.cfg.bg_weight)
            loss_box = l1_box_loss(deltas, targets_, labels > 0, labels.numel())
            return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        vlm = self._vlm_features(vlm_map, proposals)
        scores = self._scores(logits, vlm, self.box_predictor.text, self.novel)
        boxes = self.box_coder.decode(deltas, proposals)  # (N, 1, 4): class-agnostic
        return self._detections(boxes[:, 0], scores, proposals, image_shapes), {}

    def _vlm_features(self, vlm_map, proposals) -> torch.Tensor:
        """Unit-norm box means ``(N, C_clip)`` of the VLM map (a 1x1 adaptive RoIAlign)."""
        if vlm_map is None:
            raise ValueError("OVRoIHeads at test needs the VLM map")
        vlm = roi_align(vlm_map, proposals, output_size=1, spatial_scale=1.0 / self.vlm_stride, sampling_ratio=0,
                        aligned=True).flatten(1)  # (N, C_clip)
        return F.normalize(vlm, dim=-1)

    def _scores(self, logits, vlm, text, novel) -> torch.Tensor:
        p_vlm = (vlm @ text.t() * self.cfg.vlm_temperature).softmax(-1)  # (N, 1 + C)
        return ov_ensemble(logits.softmax(-1), p_vlm, novel, self.cfg.alpha, self.cfg.beta)

    def _detections(self, boxes, scores, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        """Per image: drop background, score threshold, class-wise NMS, top ``detections`` (mmdet
        ``multiclass_nms`` on the class-agnostic boxes)."""
        out = []
        for b, s, shape in zip(boxes.split([len(p) for p in proposals]), scores.split([len(p) for p in proposals]),
                               image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)  # (n, 4)
            C = s.shape[1] - 1
            s = s[:, 1:]  # (n, C)
            labels = torch.arange(1, C + 1, device=s.device).expand_as(s)
            b = b[:, None].expand(-1, C, 4)
            b, s, labels = b.reshape(-1, 4), s.reshape(-1), labels.reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
        return out


class _L1RPN(RegionProposalNetwork):
    """torchvision's RPN with mmdet's L1 box loss (F-ViT CFG ``rpn_head.loss_bbox = L1Loss``)."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(sampled_neg, dim=0))[0]])
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = (pred_bbox_deltas[pos] - regression_targets[pos]).abs().sum() / max(sampled.numel(), 1)
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
        return obj_loss, box_loss


class _Transform(GeneralizedRCNNTransform):
    """torchvision's normalise / resize / batch; ``min_size=None`` keeps every image at its own size."""

    def __init__(self, min_size: int | None, max_size: int | None, mean, std, size_divisible: int):
        super().__init__(min_size or 1, max_size or min_size or 1, mean, std, size_divisible=size_divisible)
        self.keep_size = min_size is None

    def resize(self, image, target=None):
        if self.keep_size:
            return image, target
        return super().resize(image, target)


class FViT(nn.Module):
    """F-ViT on a frozen CLIP (see the module docstring). ``forward(images, targets=None)`` takes a list of
    ``(3, H, W)`` float images in ``[0, 1]``; training returns the loss dict (``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``), evaluation a list of dicts (``boxes (K, 4)`` xyxy
    px of the input image, ``labels (K,)`` 1-based rows of the vocabulary, ``scores (K,)``).

    ``dense_fn`` replaces the dense mode by a student's own dense map (:data:`DenseFn`; DenseRC's HSG).
    :meth:`set_vocabulary` sets the classes: their text embeddings ``(C, D)``, the background's ``(D,)`` and which
    are novel. Train on the base vocabulary; evaluate on base + novel."""

    def __init__(self, clip: nn.Module, cfg: FViTConfig = FViTConfig(), dense_fn: DenseFn | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = ClipPyramid(clip, cfg, dense_fn)
        ad = self.backbone.adapter
        mean = cfg.image_mean or _clip_stat(clip, "mean")
        std = cfg.image_std or _clip_stat(clip, "std")
        self.transform = _Transform(cfg.min_size, cfg.max_size, list(mean), list(std),
                                    size_divisible=int(round(max(self.backbone.strides[:-1]))))
        strides = self.backbone.strides
        anchors = AnchorGenerator(tuple((int(round(cfg.anchor_scale * s)),) for s in strides),
                                  (tuple(cfg.aspect_ratios),) * len(strides))
        F_ = cfg.fpn_channels
        self.rpn = _L1RPN(anchors, RPNHead(F_, len(cfg.aspect_ratios), conv_depth=cfg.rpn_convs),
                          fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=cfg.rpn_batch,
                          positive_fraction=cfg.rpn_pos_fraction,
                          pre_nms_top_n={"training": cfg.rpn_pre_nms, "testing": cfg.rpn_pre_nms},
                          post_nms_top_n={"training": cfg.rpn_post_nms, "testing": cfg.rpn_post_nms},
                          nms_thresh=cfg.rpn_nms)
        names = [str(k) for k in range(len(cfg.scales))]
        level = round(math.log2(self.backbone.patch))
        pool = MultiScaleRoIAlign(names, cfg.roi_size, sampling_ratio=2, canonical_scale=14 * self.backbone.patch,
                                  canonical_level=level)
        head = FastRCNNConvFCHead((F_, cfg.roi_size, cfg.roi_size), [F_] * cfg.head_convs, list(cfg.head_fcs),
                                  norm_layer=nn.BatchNorm2d)
        predictor = OVBoxPredictor(cfg.head_fcs[-1], ad.out_dim, cfg.det_temperature)
        self.roi_heads = OVRoIHeads(pool, head, predictor, 0.5, 0.5, cfg.roi_batch, cfg.roi_pos_fraction, None,
                                    cfg.score_thresh, cfg.nms, cfg.detections, cfg=cfg, vlm_stride=self.backbone.patch)

    def set_vocabulary(self, text: torch.Tensor, background: torch.Tensor, novel: Sequence[bool] | torch.Tensor
                       ) -> None:
        """Classes ``text (C, D)`` (unit-norm CLIP text embeddings), the ``background (D,)`` embedding and the
        ``novel (C,)`` flags (test-time exponents)."""
        full, novel = self._vocabulary(text, background, novel)
        self.roi_heads.box_predictor.set_text(full)
        self.roi_heads.novel = novel

    def _vocabulary(self, text, background, novel) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text (1 + C, D)`` with the background first, unit norm, ``novel (1 + C,))`` on the model's device."""
        novel = torch.as_tensor(novel, dtype=torch.bool)
        if text.ndim != 2 or novel.shape != (text.shape[0],) or background.shape != (text.shape[1],):
            raise ValueError(f"set_vocabulary: text {tuple(text.shape)}, background {tuple(background.shape)}, "
                             f"novel {tuple(novel.shape)} do not fit (C, D), (D,), (C,)")
        dev = self.roi_heads.box_predictor.cls.weight.device
        full = F.normalize(torch.cat([background[None], text]).float(), dim=-1).to(dev)
        return full, torch.cat([torch.zeros(1, dtype=torch.bool), novel]).to(dev)

    @property
    def vocab_size(self) -> int:
        return self.roi_heads.box_predictor.text.shape[0] - 1

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The detector's own weights (the frozen CLIP left out): what a checkpoint stores."""
        frozen = {f"backbone.visual.{k}" for k in self.backbone.visual.state_dict()}
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.visual.")]
        if missing or unexpected:
            raise ValueError(f"F-ViT weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None,
                vocabularies: Sequence[tuple] | None = None):
        """Training: the loss dict. Test: per image a dict of ``boxes``, ``labels``, ``scores``; with
        ``vocabularies`` (a list of ``(text (C, D), background (D,), novel (C,))``, as :meth:`set_vocabulary` takes)
        a list of such lists, one per vocabulary, from one forward pass (only the scoring depends on the names)."""
        if self.training and targets is None:
            raise ValueError("F-ViT in training mode needs targets")
        vocabs = None if vocabularies is None else [self._vocabulary(*v) for v in vocabularies]
        original = [tuple(im.shape[-2:]) for im in images]
        batch, targets = self.transform(images, targets)
        x = batch.tensors  # (B, 3, H, W) normalised, padded to the size divisor
        side = max(x.shape[-2:])  # pad to a square (F-ViT's Pad(pad_to_square=True); EVA's RoPE needs square grids)
        x = F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))
        batch.tensors = x
        features, vlm = self.backbone(x)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets, vlm_map=vlm,
                                                vocabularies=vocabs)
        if self.training:
            return {**rpn_losses, **roi_losses}
        if vocabs is not None:
            return [self.transform.postprocess(d, batch.image_sizes, original) for d in detections]
        return self.transform.postprocess(detections, batch.image_sizes, original)


def _clip_stat(clip: nn.Module, which: str) -> tuple[float, ...]:
    """The CLIP's image normalisation (open_clip keeps it on ``visual.image_mean`` / ``image_std``)."""
    from ovlib.models.clip import OPENAI_MEAN, OPENAI_STD

    v = getattr(clip, "visual", clip)
    stat = getattr(v, f"image_{which}", None)
    return tuple(float(s) for s in (stat if stat is not None else (OPENAI_MEAN if which == "mean" else OPENAI_STD)))

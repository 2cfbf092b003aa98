"""Training recipes of R-SC-CLIPSelf (Qiu et al., ICLR'25) as :class:`~ovlib.methods.base.Distiller` s.

One distillation loop, five methods (``--method`` names in brackets):

* :class:`SCCLIPSelf` (``sc-clipself``): ``L_RLA + lambda L_SCD`` (Eq. 6), SCD targets = the frozen teacher's
  correlations of the same regions (teacher dense mode = the student's, ``x+v`` by default).
* :class:`RefinerStage` (``refiner``): stage 1, trains only the :class:`~ovlib.methods.refiner.Refiner` with the
  global-to-local objective (Eqs. 8, 9, 13; loss term ``g2l``). The student CLIP is frozen.
* :class:`RSCCLIPSelf` (``rsc-clipself``): stage 2, ``L_RLA + lambda L_R-SCD``: SCD targets from a trained,
  frozen Refiner (``method_args.refiner`` = its checkpoint), which never enters the RLA branch (§3.4).
* :class:`RSCV` (``rsc-v``): R-SCD alone, no RLA (visual-centric R-SC-V).
* :class:`RSCE2E` (``rsc-e2e``): end to end (§4.5): the student (RLA + R-SCD) and the Refiner (``g2l``) are
  trained together; the R-SCD targets are the Refiner's current outputs, detached.
* :class:`RegionText` (``regiontext``): RLA against the frozen text tower's embedding of each region's noun
  (at micro scale the region's GT category name in a prompt); ``rla_target="text"`` gives R-SC-RegionText
  with the SC classes.

Loss terms are unweighted (the trainer applies ``loss_weights``: ``scd`` = lambda, paper 0.2 for ViT-B, 0.4
for ViT-L). Options come from ``DistillConfig.method_args`` (see :class:`SCDConfig`, :class:`G2LConfig`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovlib.io import safe_load
from ovlib.methods.base import Distiller
from ovlib.methods.clipself import rla_loss
from ovlib.methods.refiner import (
    Refiner,
    cosine_tokens,
    crop_images,
    dense_tokens,
    infonce_tokens,
    local_box_generator,
    sample_local_boxes,
)
from ovlib.methods.scd import image_tokens, region_tokens, scd_loss
from ovlib.models import dense_features, roi_features, vit_adapter

__all__ = [
    "RSCE2E",
    "RSCV",
    "G2LConfig",
    "RSCCLIPSelf",
    "RefinerConfig",
    "RefinerStage",
    "RegionText",
    "SCCLIPSelf",
    "SCDConfig",
    "assign_image_nouns",
    "global_to_local_loss",
    "load_refiner",
    "text_region_loss",
    "untrained_refiner",
]


def _take(cls, options: dict[str, Any]):
    """Pop the fields of dataclass ``cls`` out of ``options`` and build it."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: options.pop(k) for k in list(options) if k in names})


@dataclass
class SCDConfig:
    """SCD settings (Eqs. 2-5). ``scd_grid``: RoIAlign output ``k`` (``L = k^2``); ``None`` = the teacher's native
    token grid (e.g. 14 for B/16 at 224 px, 8 for the micro CLIP) -- the grid a crop of the teacher has.
    ``scd_scope``: ``"local"`` (region grids, the paper's) or ``"global"`` (the whole image's token map, Tab. 14).
    ``scd_chunk``: rows per block for the bounded-memory loss (``None`` = naive)."""

    tau_s: float = 0.2
    tau_t: float = 0.2
    scd_grid: int | None = None
    scd_chunk: int | None = None
    scd_scope: str = "local"

    def __post_init__(self):
        if self.scd_scope not in ("local", "global"):
            raise ValueError(f"scd_scope must be 'local' or 'global', got {self.scd_scope!r}")


@dataclass
class G2LConfig:
    """Refiner training (Eqs. 8, 9, 13/14). ``crops``: C local boxes per image with sides ``U(crop_scale)`` of
    the image's; ``crop_grid``: token grid ``k`` of a crop (``None``: the teacher's native grid; the crop is
    resampled to ``k * patch`` px); ``direction``: ``"g2l"`` (paper) or ``"l2g"`` ablation (the Refiner sees the crop
    alone and is
    matched to the frozen CLIP's RoI tokens of the full image); ``objective``: ``"infonce"`` (Eq. 13) or
    ``"cosine"`` (Eq. 14); ``target_mode``: dense mode of the frozen CLIP for the targets (``vanilla``: the
    blocks the Refiner clones, unchanged)."""

    crops: int = 4
    crop_scale: tuple[float, float] = (0.3, 0.7)
    crop_grid: int | None = None
    objective: str = "infonce"
    tau: float = 0.1
    direction: str = "g2l"
    target_mode: str = "vanilla"
    crop_seed: int = 0

    def __post_init__(self):
        self.crop_scale = tuple(self.crop_scale)
        if self.objective not in ("infonce", "cosine"):
            raise ValueError(f"refiner objective must be 'infonce' or 'cosine', got {self.objective!r}")
        if self.direction not in ("g2l", "l2g"):
            raise ValueError(f"refiner direction must be 'g2l' or 'l2g', got {self.direction!r}")
        if self.crops < 1:
            raise ValueError(f"refiner crops must be >= 1, got {self.crops}")


@dataclass
class RefinerConfig:
    """Refiner architecture (see :class:`~ovlib.methods.refiner.Refiner`); paper: K=4, (4, 7) for B."""

    num_blocks: int = 4
    inter_layers: tuple[int, int] | None = (4, 7)
    region_cls: bool = True
    hidden: int | None = None
    late: bool = False

    def build(self, clip: nn.Module) -> Refiner:
        return Refiner(clip, self.num_blocks, self.inter_layers, self.region_cls, self.hidden, self.late)


def _reject_unknown(name: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - {"tokenizer", "categories"})  # the launcher's, for the base class
    if unknown:
        raise TypeError(f"method {name!r} got unknown option(s) {unknown} (DistillConfig.method_args)")


def _native_grid(model: nn.Module) -> int:
    g = vit_adapter(model).native_grid
    return int(g[0])


# ----------------------------------------------------------------------------------------------- pieces
def global_to_local_loss(refiner: Refiner, teacher: nn.Module, images: torch.Tensor, batch: dict[str, Any],
                         cfg: G2LConfig) -> torch.Tensor:
    """Eq. 9 over ``cfg.crops`` local boxes per image drawn from a generator seeded by the batch (image ids
    and region boxes), so a resumed run draws the same crops.

    g2l: ``pred = f_R(RoIAlign(f_I^A(X), b'))`` vs ``target`` = the frozen CLIP's dense tokens of the crop
    ``X'`` (the box's pixels resampled to ``k * patch`` px, encoded alone). l2g: roles of crop and image swapped.
    """
    if "image_ids" not in batch:
        raise ValueError("the refiner objective seeds its crops from batch['image_ids']; the batch has none "
                         f"(keys: {sorted(batch)})")
    B, _, H, W = images.shape
    k = cfg.crop_grid or _native_grid(teacher)
    patch = vit_adapter(teacher).patch_size[0]
    ids = torch.as_tensor(batch["image_ids"]).tolist()
    region_boxes = batch.get("boxes") or [None] * B
    lboxes = [sample_local_boxes(W, H, cfg.crops, cfg.crop_scale,
                                 local_box_generator(ids[b], region_boxes[b], cfg.crop_seed)).to(images.device)
              for b in range(B)]
    crops = crop_images(images, lboxes, k * patch)  # (B*C, 3, kp, kp) context-free crops
    if cfg.direction == "g2l":
        pred = refiner(images, lboxes, k)  # (R, L, C)
        with torch.no_grad():
            target = dense_tokens(dense_features(teacher, crops, cfg.target_mode, normalize=True))  # (R, L, C)
    else:
        full = [crops.new_tensor([[0.0, 0.0, k * patch, k * patch]]) for _ in range(crops.shape[0])]
        pred = refiner(crops, full, k)
        with torch.no_grad():
            target = region_tokens(dense_features(teacher, images, cfg.target_mode, normalize=True),
                                   lboxes, (H, W), k)
    if cfg.objective == "infonce":
        return infonce_tokens(pred, target, cfg.tau)
    return cosine_tokens(pred, target)


def load_refiner(source: str | Path | Refiner, clip: nn.Module) -> Refiner:
    """A frozen Refiner from a Refiner, a trainer checkpoint of the ``refiner`` method (its ``model`` entry,
    keys ``refiner.*``) or a bare Refiner ``state_dict``; loaded with ``weights_only=True``."""
    if isinstance(source, Refiner):
        ref = source
    else:
        if source is None or not Path(source).is_file():
            raise FileNotFoundError(f"Refiner checkpoint {source!r} not found: train the 'refiner' method first "
                                    "and pass its checkpoint as method_args.refiner")
        sd = safe_load(source)
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        prefix = "refiner." if any(k.startswith("refiner.") for k in sd) else ""
        ref = Refiner.from_state_dict(clip, sd, prefix)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def untrained_refiner(clip: nn.Module, method_args: dict[str, Any] | None = None) -> Refiner:
    """The control of every claim about a trained Refiner: the Refiner of a ``refiner`` recipe's ``method_args``
    (its architecture fields; the training ones -- crops, objective, ... -- are ignored) at its initialisation,
    frozen. Its blocks are the CLIP's last ``K`` and its heads start at zero, so on a whole image it *is* the
    CLIP's ``vanilla`` map (its target); on a tile of a wider image its blocks see the tile alone, so whatever
    it does to coupling by construction is not an effect of training."""
    args = dict(method_args or {})
    g2l = {f.name for f in dataclasses.fields(G2LConfig)}
    unknown = sorted(set(args) - g2l - {f.name for f in dataclasses.fields(RefinerConfig)} - {"refiner"})
    if unknown:
        raise ValueError(f"untrained_refiner: unknown refiner option(s) {unknown}")
    ref = _take(RefinerConfig, args).build(clip)
    return load_refiner(ref, clip)


def text_region_loss(rois: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                     class_index: dict[int, int]) -> tuple[torch.Tensor, int]:
    """RegionText RLA: ``1 - mean cos(roi_r, text[class of r])`` over regions with a label ``>= 0``.

    ``rois (R, C)``, ``labels (R,)`` category ids (-1 = unlabelled grid cell, excluded and counted),
    ``text (K, C)`` one embedding per category, ``class_index`` id -> row. Returns (loss, #excluded).
    """
    labels = torch.as_tensor(labels, device=rois.device)
    if labels.shape != rois.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match {rois.shape[0]} regions")
    keep = labels >= 0
    if not keep.any():
        raise ValueError("RegionText needs labelled regions (labels >= 0); every region of the batch is an "
                         "unlabelled grid cell -- use regions='gt_boxes'")
    unknown = sorted({int(v) for v in labels[keep].tolist()} - set(class_index))
    if unknown:
        raise ValueError(f"region labels {unknown} are not categories of the text embeddings")
    rows = torch.tensor([class_index[int(v)] for v in labels[keep].tolist()], device=rois.device)
    return rla_loss(rois[keep], text[rows]), int((~keep).sum())


def assign_image_nouns(crop_emb: torch.Tensor, counts: list[int], image_labels: list[torch.Tensor],
                       text: torch.Tensor, class_index: dict[int, int]) -> torch.Tensor:
    """RegionCLIP-style pseudo labels from image-level nouns: each region takes, among the category ids named
    for its image (``image_labels[b]``, e.g. the caption's nouns), the one whose text embedding is closest to
    the frozen teacher's embedding of the region's crop. ``crop_emb (R, C)``, ``counts`` regions per image,
    ``text (K, C)`` normalised. Returns ``(R,)`` category ids; -1 where the image names no category."""
    if sum(counts) != crop_emb.shape[0] or len(counts) != len(image_labels):
        raise ValueError(f"{crop_emb.shape[0]} crops, counts {counts}, {len(image_labels)} images do not agree")
    out = torch.full((crop_emb.shape[0],), -1, dtype=torch.long, device=crop_emb.device)
    emb = F.normalize(crop_emb.float(), dim=-1)
    start = 0
    for b, n in enumerate(counts):
        ids = [int(v) for v in torch.as_tensor(image_labels[b]).reshape(-1).tolist()]
        unknown = sorted(set(ids) - set(class_index))
        if unknown:
            raise ValueError(f"image_labels[{b}] has ids {unknown} that are not categories of the text embeddings")
        ids = sorted(set(ids))
        if ids and n:
            rows = torch.tensor([class_index[i] for i in ids], device=emb.device)
            best = (emb[start:start + n] @ text[rows].T).argmax(dim=1)  # (n,)
            out[start:start + n] = torch.tensor(ids, device=emb.device)[best]
        start += n
    return out


# ----------------------------------------------------------------------------------------------- methods
class _RLAMixin:
    """The RLA branch: crop CLS (CLIPSelf) or text of the region's category (RegionText)."""

    def _init_rla(self, rla_target: str, prompt: str, region_labels: str = "gt") -> None:
        if rla_target not in ("crop", "text"):
            raise ValueError(f"rla_target must be 'crop' or 'text', got {rla_target!r}")
        if region_labels not in ("gt", "image_nouns"):
            raise ValueError(f"region_labels must be 'gt' or 'image_nouns', got {region_labels!r}")
        self.rla_target, self.prompt, self.region_labels = rla_target, prompt, region_labels
        self._text: torch.Tensor | None = None
        self.unlabelled_regions = 0  # RegionText: regions excluded for lack of a label (counted, never silent)

    @torch.no_grad()
    def text_embeddings(self) -> tuple[torch.Tensor, dict[int, int]]:
        if not self.categories or self.tokenizer is None:
            raise ValueError(f"{self.name}: rla_target='text' needs the launcher's categories and tokenizer")
        dev = next(self.student.parameters()).device
        if self._text is None or self._text.device != dev:
            teacher = self.frozen["teacher"]
            toks = self.tokenizer([self.prompt.format(c["name"]) for c in self.categories]).to(dev)
            self._text = F.normalize(teacher.encode_text(toks).float(), dim=-1)  # (K, C)
        return self._text, {int(c["id"]): i for i, c in enumerate(self.categories)}

    def rla_term(self, dense: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["images"]
        rois = roi_features(dense, batch["boxes"], images.shape[-2:])  # (R, C)
        if self.rla_target == "crop":
            return rla_loss(rois, self.teacher_crop_cls(batch["crops"]))  # vs the crops' CLS (R, C), no grad
        text, index = self.text_embeddings()
        labels = batch["labels"]
        if self.region_labels == "image_nouns":  # labels from the image's nouns (captions), not the boxes
            crop_emb = self.teacher_crop_cls(batch["crops"])  # (R, C)
            labels = assign_image_nouns(crop_emb, [len(b) for b in batch["boxes"]], batch["image_labels"], text, index)
        loss, skipped = text_region_loss(rois, labels, text, index)
        self.unlabelled_regions += skipped
        return loss


@dataclass
class RLAOptions:
    """The RLA branch: the student's ``dense_mode``, the teacher's (``teacher_mode``, default the same), the target
    (``rla_target``: the crop's CLS or the class text through ``prompt``), and where region labels come from."""

    dense_mode: str = "x+v"
    teacher_mode: str | None = None
    rla_target: str = "crop"
    prompt: str = "a photo of a {}."
    region_labels: str = "gt"


@dataclass
class RefinerPath:
    """``refiner``: the trained Refiner's checkpoint (stage 1) whose outputs are the R-SCD targets."""

    refiner: Any = None


@dataclass
class RegionTextOptions:
    """RegionText's RLA on the class text: the student's ``dense_mode``, the ``prompt``, the region labels."""

    dense_mode: str = "x+v"
    prompt: str = "a photo of a {}."
    region_labels: str = "gt"


class _SCBase(_RLAMixin, Distiller):
    """Student dense map -> RLA (optional) + SCD against :meth:`targets`."""

    use_rla = True

    def __init__(self, student, frozen, dense_mode: str = "x+v", teacher_mode: str | None = None,
                 rla_target: str = "crop", prompt: str = "a photo of a {}.", region_labels: str = "gt",
                 **options: Any):
        scd = _take(SCDConfig, options)
        _reject_unknown(self.name, options)
        super().__init__(student, frozen, **options)
        self.dense_mode = dense_mode
        self.teacher_mode = teacher_mode or dense_mode
        self.scd = scd
        self._init_rla(rla_target, prompt, region_labels)

    def _scd_k(self) -> int:
        return self.scd.scd_grid or _native_grid(self.frozen["teacher"])

    def targets(self, images: torch.Tensor, boxes: list) -> torch.Tensor:  # (R, L, C) normalised, no grad
        raise NotImplementedError

    def scd_term(self, dense: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["images"]
        if self.scd.scd_scope == "local":
            zs = region_tokens(dense, batch["boxes"], images.shape[-2:], self._scd_k())  # (R, L, C)
        else:
            zs = image_tokens(dense)  # (B, h*w, C)
        with torch.no_grad():
            zt = self.targets(images, batch["boxes"])
        return scd_loss(zs, zt, self.scd.tau_s, self.scd.tau_t, self.scd.scd_chunk)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dense = dense_features(self.student, batch["images"], self.dense_mode, normalize=True)  # (B, C, h, w)
        out = {"rla": self.rla_term(dense, batch)} if self.use_rla else {}
        out["scd"] = self.scd_term(dense, batch)
        return out


class SCCLIPSelf(_SCBase):
    """SC-CLIPSelf (Eq. 6): RLA + SCD with the frozen teacher's own correlations as targets."""

    name = "sc-clipself"
    option_types = (RLAOptions, SCDConfig)
    loss_names = ("rla", "scd")

    def targets(self, images, boxes):
        teacher, mode = self.frozen["teacher"], self.teacher_mode
        dense = self.frozen_call(f"clip.dense:{mode}:normalized", teacher,
                                 lambda x: dense_features(teacher, x, mode, normalize=True), images)  # (B, C, h, w)
        if self.scd.scd_scope == "local":
            return region_tokens(dense, boxes, images.shape[-2:], self._scd_k())
        return image_tokens(dense)


class _RefinedTargets:
    def refined_targets(self, refiner: Refiner, images, boxes) -> torch.Tensor:
        if self.scd.scd_scope == "local":
            return F.normalize(refiner(images, boxes, self._scd_k()), dim=-1)  # (R, L, C)
        return image_tokens(refiner.dense(images))  # (B, h*w, C)


class RSCCLIPSelf(_RefinedTargets, _SCBase):
    """R-SC-CLIPSelf stage 2: RLA + R-SCD, targets from a trained, frozen Refiner (``refiner`` = checkpoint)."""

    name = "rsc-clipself"
    option_types = (RLAOptions, SCDConfig, RefinerPath)
    loss_names = ("rla", "scd")

    def __init__(self, student, frozen, refiner: str | Path | Refiner | None = None, **options: Any):
        super().__init__(student, frozen, **options)
        self.frozen["refiner"] = load_refiner(refiner, self.frozen["teacher"])

    def targets(self, images, boxes):
        """The frozen Refiner's targets, through the teacher-target cache: per image (global SCD) or per (image,
        box, grid) (local SCD; the Refiner treats every box on its own, so a box's tokens are a function of the
        image and the box only)."""
        ref = self.frozen["refiner"]
        if self.scd.scd_scope == "global":
            return image_tokens(self.frozen_call("refiner.dense:normalized", ref, ref.dense, images))  # (B, h*w, C)
        k = self._scd_k()
        if ref.late:  # the Late ablation refines whole images and RoIAligns the result: computed, not cached
            return self.refined_targets(ref, images, boxes)
        prefix, base, pmap = self.frozen_call("refiner.image", ref, ref.image_part, images)  # per image
        where = [(b, j) for b, bx in enumerate(boxes) for j in range(len(bx))]
        size = tuple(images.shape[-2:])

        def digests() -> list[str]:
            img = self.target_cache.image_digests(images)
            return [img[b] + boxes[b][j].detach().float().cpu().numpy().tobytes().hex() for b, j in where]

        def compute(idx: list[int]) -> torch.Tensor:  # fixed-size chunks of boxes, as run_chunked
            patch = vit_adapter(self.frozen["teacher"]).patch_size[0]
            C = self.chunk_rows((k * patch) ** 2) or len(idx)  # a k x k region costs like a crop of k patches
            out = []
            for s in range(0, len(idx), C):
                part = idx[s:s + C]
                n = len(part)
                part = part + [part[-1]] * (C - n)  # ascending: grouped by image, the padding last
                sel: dict[int, list[int]] = {}
                for i in part:
                    b, j = where[i]
                    sel.setdefault(b, []).append(j)
                bs = sorted(sel)
                z = ref.region_part(prefix[bs], base[bs], pmap[bs], [boxes[b][sel[b]] for b in bs], size, k)
                out.append(z[:n])
            return F.normalize(torch.cat(out), dim=-1)  # (R, L, C)

        return self.frozen_rows(f"refiner.tokens:k={k}", ref, len(where), digests, compute, images.device)


class RSCV(RSCCLIPSelf):
    """R-SC-V: R-SCD alone (no RLA branch), visual-centric fine-tuning."""

    name = "rsc-v"
    loss_names = ("scd",)
    use_rla = False


class RefinerStage(Distiller):
    """Stage 1: trains only the Refiner (cloned from the frozen teacher's last K blocks), loss ``g2l``."""

    name = "refiner"
    option_types = (RefinerConfig, G2LConfig)
    loss_names = ("g2l",)

    def __init__(self, student, frozen, **options: Any):
        arch = _take(RefinerConfig, options)
        g2l = _take(G2LConfig, options)
        _reject_unknown(self.name, options)
        super().__init__(student, frozen, **options)
        self.student.requires_grad_(False)  # stage 1 trains the Refiner only
        self.refiner = arch.build(self.frozen["teacher"])
        self.g2l = g2l

    def forward(self, batch):
        return {"g2l": global_to_local_loss(self.refiner, self.frozen["teacher"], batch["images"], batch, self.g2l)}


class RSCE2E(_RefinedTargets, _SCBase):
    """End-to-end R-SC-CLIPSelf: student (RLA + R-SCD from the live Refiner, detached) and Refiner (g2l)
    trained together from the start."""

    name = "rsc-e2e"
    option_types = (RLAOptions, SCDConfig, RefinerConfig, G2LConfig)
    loss_names = ("rla", "scd", "g2l")

    def __init__(self, student, frozen, **options: Any):
        arch = _take(RefinerConfig, options)
        g2l = _take(G2LConfig, options)
        super().__init__(student, frozen, **options)
        self.refiner = arch.build(self.frozen["teacher"])
        self.g2l = g2l

    def targets(self, images, boxes):
        return self.refined_targets(self.refiner, images, boxes)

    def forward(self, batch):
        out = super().forward(batch)
        out["g2l"] = global_to_local_loss(self.refiner, self.frozen["teacher"], batch["images"], batch, self.g2l)
        return out


class RegionText(_RLAMixin, Distiller):
    """RegionText RLA: each labelled region's RoI feature vs the frozen text embedding of its category name
    (``prompt.format(name)``); unlabelled regions (grid cells, label -1) are excluded and counted in
    :attr:`unlabelled_regions`. ``region_labels="gt"``: the batch's region labels (GT boxes);
    ``"image_nouns"``: pseudo labels from the image's nouns (``batch["image_labels"]``, e.g. the categories
    its captions mention), see :func:`assign_image_nouns` -- works with grid regions too."""

    name = "regiontext"
    option_types = (RegionTextOptions,)
    loss_names = ("rla",)

    def __init__(self, student, frozen, dense_mode: str = "x+v", prompt: str = "a photo of a {}.",
                 region_labels: str = "gt", **options):
        _reject_unknown(self.name, options)
        super().__init__(student, frozen, **options)
        self.dense_mode = dense_mode
        self._init_rla("text", prompt, region_labels)

    def forward(self, batch):
        dense = dense_features(self.student, batch["images"], self.dense_mode, normalize=True)
        return {"rla": self.rla_term(dense, batch)}

"""Protocol cards: the evaluation settings of each standard OVSS benchmark, as the public configs set them.

A :class:`ProtocolCard` holds, for one benchmark and one protocol family, the short side of the test resize
(mmseg ``Resize(scale=(2048, S), keep_ratio=True)``), the sliding window (crop, stride), the logit scale, the
background rule (probability threshold, SCLIP's area threshold, the names queried for the background class)
and the prompt templates. :meth:`ProtocolCard.ovss_config` turns it into the
:class:`~ovlib.eval.segmentation.OVSSConfig` that :func:`~ovlib.eval.segmentation.evaluate_ovss` runs, and
:meth:`ProtocolCard.as_dict` is stored next to every OVSS number (``python -m ovlib.eval.ovss``'s
``results.json``).

Families (read for facts only; values per benchmark in :data:`CARDS`):

* ``sclip`` -- ``wangf3014/SCLIP``: ``clip_segmentor.py`` defaults (``logit_scale=40``, ``prob_thd=0``,
  ``slide_crop=224``, ``slide_stride=112``, 80 OpenAI ImageNet templates from ``prompts/imagenet_template.py``),
  overridden by ``configs/cfg_<benchmark>.py`` (VOC21 ``logit_scale=65, prob_thd=0.1, area_thd=0.1``;
  Context60 and COCO-Object ``logit_scale=50, prob_thd=0.1``; short side 336, COCO-Stuff 448, Cityscapes
  560); background queries of ``configs/cls_voc21.txt`` / ``cls_coco_object.txt`` (26 stuff words) and
  ``cls_context60.txt`` ("background"). NACLIP and ClearCLIP start from the same segmentor
  (``reference/implementations.md`` §8.2-8.5).
* ``proxyclip`` -- ``mc-lan/ProxyCLIP``: ``proxyclip_segmentor.py`` defaults (``logit_scale=40``,
  ``prob_thd=0``, ``slide_crop=336``, ``slide_stride=112``, ``beta=1.2``, ``gamma=3.0``, the same 80 templates),
  ``configs/cfg_<benchmark>.py`` (VOC21 ``prob_thd=0.2``, Context60 0.15, COCO-Object 0.25; short side 336,
  Cityscapes and ADE 448; Cityscapes ``slide_crop=224, slide_stride=112``); background queries of
  ``configs/cls_voc21.txt`` (26 words), ``cls_coco_object.txt`` (17 words), ``cls_context60.txt``.

Background rule (both families, ``postprocess_result``): the background class is one more text query
(its names below); softmax over all queries, max over each class's names, argmax; a pixel whose max
probability is below ``prob_threshold`` becomes class 0. Benchmarks without background have no threshold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ovlib.eval.segmentation import OVSSConfig

__all__ = ["ProtocolCard", "CARDS", "PROTOCOLS", "protocol_card", "card_templates", "TEMPLATE_SETS"]

_STUFF26 = ("sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
            "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
            "floor", "hill", "rail", "fence")
_STUFF17 = ("sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
            "building", "cloud", "floor", "hill", "rail")


@dataclass(frozen=True)
class ProtocolCard:
    """One benchmark's evaluation settings under one protocol family (see the module docstring)."""

    benchmark: str
    protocol: str
    short_side: int
    slide_crop: int
    slide_stride: int
    logit_scale: float
    prob_threshold: float | None = None      # None: no background rule (the benchmark has no background)
    area_threshold: float | None = None      # SCLIP's area_thd (VOC21 only)
    background_names: tuple[str, ...] | None = None  # text queries of class 0, replacing the dataset's name
    max_long: int = 2048
    templates: str = "openai_imagenet_80"
    extra: tuple[tuple[str, Any], ...] = ()  # method settings of the family (e.g. ProxyCLIP's beta, gamma)
    source: str = ""

    @property
    def background_rule(self) -> str:
        if self.prob_threshold is None:
            return "none (no background class): every pixel takes the argmax class"
        rule = (f"class 0 is a text query ({len(self.background_names or ())} names); pixels whose max class "
                f"probability < {self.prob_threshold:g} -> class 0")
        if self.area_threshold is not None:
            rule += (f"; classes predicted on <= {self.area_threshold:g} of the foreground pixels are suppressed "
                     f"first")
        return rule

    def ovss_config(self) -> OVSSConfig:
        """The :class:`OVSSConfig` of this card (background index 0 where there is a background rule)."""
        bg = 0 if self.prob_threshold is not None else None
        return OVSSConfig(image_size=self.short_side, crop=self.slide_crop, stride=self.slide_stride,
                          logit_scale=self.logit_scale, prob_threshold=self.prob_threshold, background_index=bg,
                          resize="short", max_long=self.max_long, area_threshold=self.area_threshold)

    def replace(self, **changes: Any) -> ProtocolCard:
        """A copy with ``changes`` (e.g. a smaller short side for a quick check); the CLI records such changes
        as ``overrides`` next to the card in ``results.json``."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        d["background_names"] = list(self.background_names) if self.background_names else None
        d["background_rule"] = self.background_rule
        return d


def _family(protocol: str, source: str, base: dict[str, Any], per: dict[str, dict[str, Any]]
            ) -> dict[str, ProtocolCard]:
    return {b: ProtocolCard(benchmark=b, protocol=protocol, source=source, **{**base, **kw}) for b, kw in per.items()}


_SCLIP = _family(
    "sclip", "wangf3014/SCLIP:configs/cfg_<benchmark>.py, clip_segmentor.py",
    dict(short_side=336, slide_crop=224, slide_stride=112, logit_scale=40.0),
    {"voc21": dict(logit_scale=65.0, prob_threshold=0.1, area_threshold=0.1, background_names=_STUFF26),
     "voc20": {},
     "context60": dict(logit_scale=50.0, prob_threshold=0.1, background_names=("background",)),
     "context59": {},
     "coco_object": dict(logit_scale=50.0, prob_threshold=0.1, background_names=_STUFF26),
     "coco_stuff171": dict(short_side=448),
     "cityscapes": dict(short_side=560),
     "ade150": {}})

_PROXY = _family(
    "proxyclip", "mc-lan/ProxyCLIP:configs/cfg_<benchmark>.py, proxyclip_segmentor.py",
    dict(short_side=336, slide_crop=336, slide_stride=112, logit_scale=40.0,
         extra=(("beta", 1.2), ("gamma", 3.0))),
    {"voc21": dict(prob_threshold=0.2, background_names=_STUFF26),
     "voc20": {},
     "context60": dict(prob_threshold=0.15, background_names=("background",)),
     "context59": {},
     "coco_object": dict(prob_threshold=0.25, background_names=_STUFF17),
     "coco_stuff171": {},
     "cityscapes": dict(short_side=448, slide_crop=224, slide_stride=112),
     "ade150": dict(short_side=448)})

#: ``CARDS[protocol][benchmark]``.
CARDS: dict[str, dict[str, ProtocolCard]] = {"sclip": _SCLIP, "proxyclip": _PROXY}
PROTOCOLS = tuple(CARDS)


def protocol_card(benchmark: str, protocol: str = "sclip") -> ProtocolCard:
    if protocol not in CARDS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if benchmark not in CARDS[protocol]:
        raise ValueError(f"no {protocol} card for benchmark {benchmark!r}; have {sorted(CARDS[protocol])}")
    return CARDS[protocol][benchmark]


def _openai_imagenet_80() -> tuple[str, ...]:
    # the 80 prompt templates of CLIP's ImageNet zero-shot (SCLIP/ProxyCLIP prompts/imagenet_template.py), as
    # shipped by open_clip (zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES: one callable per template)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def _micro() -> tuple[str, ...]:
    from ovlib.models.text import MICRO_TEMPLATES

    return MICRO_TEMPLATES


TEMPLATE_SETS = {"openai_imagenet_80": _openai_imagenet_80, "micro": _micro}


def card_templates(name: str) -> tuple[str, ...]:
    """The prompt templates of a card's ``templates`` name (``"{}"`` marks the class name)."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; expected one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]()

"""Evaluation sizes of chapter 01 per profile (one place, keyed by profile, no globals in notebooks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ovlib.eval.region_cls import RegionClsConfig
from ovlib.eval.segmentation import OVSSConfig

__all__ = ["DenseEvalSettings", "dense_eval_settings", "CHAPTER01_MODES"]

#: Dense maps compared in chapter 01: CLIP's own last block and every training-free method by its preset name
#: (``ovlib.models.PRESETS``: each row named after a method carries that method's published switches).
CHAPTER01_MODES = ("vanilla", "maskclip", "clearclip", "declip-qq", "sclip", "synclip", "naclip")


@dataclass(frozen=True)
class DenseEvalSettings:
    export_size: int            # micro-world evaluation images (px); 0 = real data, not exported
    region: RegionClsConfig
    ovss: OVSSConfig
    ovss_images: int            # images for OVSS and k-means (a subset of the evaluation images)
    n_boot: int                 # bootstrap resamples for the 95 % intervals
    modes: tuple[str, ...] = field(default=CHAPTER01_MODES)  # dense modes or preset names
    templates: int = 0          # prompt templates kept for the class embeddings (0 = all of the set)


def dense_eval_settings(profile: str, eval_images: int, **sizes) -> DenseEvalSettings:
    """The profile's settings with ``sizes`` replacing some of them (a dry run's ``dry_run_settings.eval``,
    :func:`ovlib.config.dry_run_eval`): ``region`` / ``ovss`` (dicts of :class:`RegionClsConfig` /
    :class:`OVSSConfig` fields), ``ovss_images``, ``n_boot``, ``templates``."""
    ev = _profile_settings(profile, eval_images)
    unknown = sorted(set(sizes) - {"region", "ovss", "ovss_images", "n_boot", "templates"})
    if unknown:
        raise ValueError(f"dense_eval_settings: unknown size(s) {unknown}")
    upd = {k: v for k, v in sizes.items() if k not in ("region", "ovss")}
    if "region" in sizes:
        upd["region"] = dataclasses.replace(ev.region, **sizes["region"])
    if "ovss" in sizes:
        upd["ovss"] = dataclasses.replace(ev.ovss, **sizes["ovss"])
    return dataclasses.replace(ev, **upd)


def _profile_settings(profile: str, eval_images: int) -> DenseEvalSettings:
    """Region classification follows CLIPSelf's conventions by default (``RegionClsConfig``: normalise-then-pool,
    masks resized to the grid ``> 0``); a chapter scoring DeCLIP / SynCLIP students replaces ``pooling``.
    ``smoke``: everything tiny, three dense modes; ``micro``: 160-px scenes (20x20 grid of the patch-8 micro CLIP), 64-px
    teacher crops, sliding 64-px windows with stride 32 (the CLIP's native size, as SCLIP slides 224-px
    windows; the longest side is the scene's 160 px, ``resize="long"``); ``paper``: ViT-B/16 on COCO, 1024-px
    student images and 224-px crops (CLIPSelf), 448-px short side (``resize="short"``, SCLIP's
    ``Resize(scale=(2048, 448))``) with 224/112 windows (SCLIP-style OVSS)."""
    if profile == "smoke":
        return DenseEvalSettings(160, RegionClsConfig(image_size=160, crop_size=64, min_size=2.0),
                                 OVSSConfig(image_size=160, crop=64, stride=48, resize="long"),
                                 ovss_images=min(eval_images, 2),
                                 n_boot=50, modes=("vanilla", "maskclip", "sclip"))
    if profile == "micro":
        n = eval_images if eval_images > 0 else 400
        return DenseEvalSettings(160, RegionClsConfig(image_size=160, crop_size=64, min_size=2.0),
                                 OVSSConfig(image_size=160, crop=64, stride=32, resize="long"),
                                 ovss_images=min(n, 100),
                                 n_boot=1000)
    if profile == "paper":
        return DenseEvalSettings(0, RegionClsConfig(image_size=1024, crop_size=224, min_size=8.0, batch_size=2,
                                                    crop_batch=64),
                                 OVSSConfig(image_size=448, crop=224, stride=112, resize="short"),
                                 ovss_images=500, n_boot=1000)
    raise ValueError(f"unknown profile {profile!r}")

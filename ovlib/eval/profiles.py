"""Evaluation settings per profile: ``budgets.eval`` of ``params/PROFILE.yaml`` (validated by the parameter contract,
:data:`ovlib.config.SIZE_KEYS`) as typed configs; no sizes live in code or in the chapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ovlib.config import profile_sizes
from ovlib.eval.region_cls import RegionClsConfig
from ovlib.eval.segmentation import OVSSConfig

__all__ = ["DenseEvalSettings", "dense_eval_settings"]


@dataclass(frozen=True)
class DenseEvalSettings:
    export_size: int            # micro-world evaluation images (px); 0 = real data, not exported
    region: RegionClsConfig
    ovss: OVSSConfig
    ovss_images: int            # images for OVSS and k-means (a subset of the evaluation images)
    n_boot: int                 # bootstrap resamples for the 95 % intervals
    modes: tuple[str, ...]      # chapter 01's dense modes: "vanilla" or ovlib.models.PRESETS names
    templates: int = 0          # prompt templates kept for the class embeddings (0 = all of the set)


def dense_eval_settings(profile: str | Mapping[str, Any], eval_images: int, **sizes) -> DenseEvalSettings:
    """The evaluation settings of a profile (a name, or resolved parameters: ``budgets.eval``,
    :func:`ovlib.config.profile_sizes`) for ``eval_images`` evaluation images (0 = all: OVSS and k-means use
    ``ovss_images`` of them, else at most ``eval_images``), with ``sizes`` replacing some of them (a dry run's
    ``dry_run_settings.eval``, :func:`ovlib.config.dry_run_eval`): ``region`` / ``ovss`` (dicts of
    :class:`RegionClsConfig` / :class:`OVSSConfig` fields), ``ovss_images``, ``n_boot``, ``templates``.

    Region classification follows CLIPSelf's conventions unless a chapter replaces them (``RegionClsConfig``:
    normalise-then-pool, masks resized to the grid ``> 0``; a chapter scoring DeCLIP / SynCLIP students replaces
    ``pooling``); the profile files say what each profile's sizes are and why."""
    unknown = sorted(set(sizes) - {"region", "ovss", "ovss_images", "n_boot", "templates"})
    if unknown:
        raise ValueError(f"dense_eval_settings: unknown size(s) {unknown}")
    s = profile_sizes(profile, "eval")
    n = int(s["ovss_images"]) if eval_images <= 0 else min(int(s["ovss_images"]), int(eval_images))
    ev = DenseEvalSettings(int(s["export_size"]), RegionClsConfig(**s["region"]), OVSSConfig(**s["ovss"]),
                           ovss_images=n, n_boot=int(s["n_boot"]), modes=tuple(s["modes"]),
                           templates=int(s["templates"]))
    upd = {k: v for k, v in sizes.items() if k not in ("region", "ovss")}
    if "region" in sizes:
        upd["region"] = dataclasses.replace(ev.region, **sizes["region"])
    if "ovss" in sizes:
        upd["ovss"] = dataclasses.replace(ev.ovss, **sizes["ovss"])
    return dataclasses.replace(ev, **upd)

"""Training recipes as data: ``params/PROFILE.yaml`` ``recipes`` is a list of entries applied in order.

An entry is a mapping of :class:`~ovlib.train.distill.DistillConfig` fields plus optional selectors
``method`` and ``backbone`` (a name or a list of names); an entry applies when every selector it has matches
the run. Later entries override earlier ones, so a file reads from general to specific::

    recipes:
      - {lr: 1.0e-5, weight_decay: 0.1, epochs: 6, warmup_steps: 1000}        # every run
      - {backbone: EVA02-B-16, crop_size: 224, alpha: 0.7, student_size: 1024}  # one backbone
      - {method: declip, student_size: 560}                                    # one method
      - {method: declip, backbone: EVA02-L-14-336, batch_size: 2}              # both

``loss_weights`` and ``method_args`` dicts are merged key by key rather than replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ovlib.io import config_hash
from ovlib.methods import METHODS
from ovlib.train.distill import CACHE_FIELDS, DistillConfig

SELECTORS = ("method", "backbone")
MERGED = ("loss_weights", "method_args")


def _matches(sel: Any, value: str) -> bool:
    if sel is None:
        return True
    return value in ([sel] if isinstance(sel, str) else list(sel))


def resolve_recipe(recipes: Iterable[Mapping[str, Any]], method: str, backbone: str) -> dict[str, Any]:
    """Merge every matching entry in order; unknown field names are an error naming the entry."""
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    out: dict[str, Any] = {}
    for i, entry in enumerate(recipes):
        if not isinstance(entry, Mapping):
            raise ValueError(f"recipes[{i}] must be a mapping, got {type(entry).__name__}")
        unknown = sorted(set(entry) - fields - set(SELECTORS))
        if unknown:
            raise ValueError(f"recipes[{i}] has unknown field(s) {unknown}")
        if not (_matches(entry.get("method"), method) and _matches(entry.get("backbone"), backbone)):
            continue
        for k, v in entry.items():
            if k in SELECTORS:
                continue
            if k in MERGED:
                out[k] = {**out.get(k, {}), **(v or {})}
            else:
                out[k] = v
    return out


#: The profile's ``precision`` (``ovlib.config.PARAMS``) as a :class:`DistillConfig` ``amp``.
AMP_OF_PRECISION: dict[str, str] = {"fp32": "none", "bf16": "bf16", "auto": "auto"}


def distill_config(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any] = (),
                   out_dir: str | None = None) -> DistillConfig:
    """The run config of ``method`` under a resolved profile (``ovlib.config.resolve``) plus field overrides.

    ``steps_scale`` multiplies the recipe's ``max_steps`` (or ``epochs``); explicit overrides are taken as given.

    ``data_root``, ``seed`` and ``device`` come from the profile; ``backbone`` from the profile unless
    overridden; ``amp`` from the profile's ``precision`` (:data:`AMP_OF_PRECISION`) unless a recipe or an
    override pins it; ``out_dir`` defaults to ``cache_dir/runs/<method>-<backbone>-<hash of the config>``.
    """

    overrides = dict(overrides)
    backbone = overrides.get("backbone", params["backbone"])
    d: dict[str, Any] = {"method": method, "backbone": backbone, "data_root": params["data_root"],
                         "seed": params["seed"], "device": params["device"],
                         "amp": AMP_OF_PRECISION[params.get("precision", "auto")]}
    d.update(resolve_recipe(params.get("recipes", []), method, backbone))
    scale = float(params.get("steps_scale", 1.0))  # scales the recipe's budget, not an explicit override
    if scale != 1.0:
        if d.get("max_steps", 0):
            d["max_steps"] = max(1, round(d["max_steps"] * scale))
        else:
            d["epochs"] = max(1, round(d.get("epochs", DistillConfig.epochs) * scale))
    for k, v in overrides.items():
        d[k] = {**d.get(k, {}), **v} if k in MERGED and isinstance(v, Mapping) else v
    d.setdefault("out_dir", "")
    cfg = DistillConfig.from_dict(d)
    if cfg.method in METHODS:  # an unknown method is the launcher's error (it lists the implemented ones)
        METHODS[cfg.method].check_options(dict(cfg.method_args or {}))
    if out_dir:
        cfg.out_dir = out_dir
    elif not cfg.out_dir:
        key = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("out_dir", "device", "num_workers", *CACHE_FIELDS)}  # same hashes as before the cache
        cfg.out_dir = f"{params['cache_dir']}/runs/{method}-{backbone}-{config_hash(key)}"
    return cfg


def declip_as_synclip(params: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that make a DeCLIP run SynCLIP's baseline (chapter 04's "DeCLIP" row, chapter 06's DeCLIP
    student): SynCLIP's regions, thing-crop scale and content / context weights, DeCLIP's loss on the ``csa``
    context (SynCLIP's code baselines DeCLIP so), so that SynCLIP's additions are the only difference."""
    r = distill_config(params, "synclip")
    return {"regions": r.regions, "thing_crop_scale": r.thing_crop_scale, "method_args": {"mode": "csa"},
            "loss_weights": {"content": r.loss_weights.get("content", 1.0),
                             "context": r.loss_weights.get("context", 0.25)}}


def named_weights(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every named weight ``(model name, tag)`` a resolved profile uses: its ``models`` and, for every method and
    backbone its recipes name (plus the profile's ``backbone``), the resolved recipe's ``pretrained`` and
    ``vfm`` / ``vfm_pretrained``. Local paths and random initialisations (``None``) are not named weights."""
    from ovlib.models.clip import _looks_like_path

    recipes = params.get("recipes", [])
    methods, backbones = set(), {params["backbone"]}
    for e in recipes:
        for key, acc in (("method", methods), ("backbone", backbones)):
            sel = e.get(key)
            if sel is not None:
                acc.update([sel] if isinstance(sel, str) else sel)
    out: list[tuple[str, str]] = []

    def add(name, tag):
        if name and tag and not _looks_like_path(tag) and (name, tag) not in out:
            out.append((name, tag))

    for spec in params.get("models", {}).values():
        add(spec["name"], spec["pretrained"])
    for b in sorted(backbones):
        for m in sorted(methods) or ["clipself"]:
            r = resolve_recipe(recipes, m, b)
            add(b, r.get("pretrained"))
            add(r.get("vfm"), r.get("vfm_pretrained"))
    return out


def main(argv=None) -> int:
    """``python -m ovlib.train.recipes --profile paper [-p key=value]``: the local files ``weights_dir`` must hold."""
    import argparse

    from ovlib import config
    from ovlib.models.weights import WEIGHT_SUFFIXES, weight_stem

    ap = argparse.ArgumentParser(prog="python -m ovlib.train.recipes", description=main.__doc__)
    ap.add_argument("--profile", default="paper", choices=config.PROFILES)
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    params = config.resolve(args.profile, args.param, root=args.root)
    for name, tag in named_weights(params):
        print(f"{weight_stem(name, tag)}{WEIGHT_SUFFIXES[0]}\t{name} {tag}")
    from ovlib.models.clipseg import CLIPSEG_ARCHS

    cs = resolve_recipe(params.get("recipes", []), "synseg", params["backbone"]).get("method_args", {}).get("clipseg")
    if cs in CLIPSEG_ARCHS and cs != "micro-clipseg":  # SynSeg's CLIPSeg initialisation (never downloaded)
        print(f"{cs}.pth\tCLIPSeg decoder {cs} (SynSeg)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

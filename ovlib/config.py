"""The shared parameter contract of every chapter (``params/{smoke,micro,paper}.yaml``).

Every notebook's ``parameters`` cell holds these keys with their ``micro`` defaults; the runner injects
``params/PROFILE.yaml`` plus ``-p key=value`` overrides. A profile file must define exactly the keys of
:data:`PARAMS`; an unknown key, a missing key, a value of the wrong type or an unknown profile is a
:class:`ParamError` naming the file and the key.

Chapters that need a new knob add it here (with its type and a one-line meaning) and to the three
profile files, so the contract stays one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

PROFILES = ("smoke", "micro", "paper")


class ParamError(ValueError):
    """A parameter file or override does not satisfy the contract."""


@dataclass(frozen=True)
class Param:
    type: type | tuple[type, ...]
    doc: str
    choices: tuple[Any, ...] | None = None


#: key -> (type, meaning). ``int`` is accepted where ``float`` is asked for.
PARAMS: dict[str, Param] = {
    "profile": Param(str, "name of the profile (smoke | micro | paper)", PROFILES),
    "device": Param(str, "torch device for the chapter ('cpu', 'cuda', 'cuda:1', 'auto')"),
    "gpus": Param(int, "number of GPUs; > 1 runs training through torchrun"),
    "seed": Param(int, "base seed of every random thing"),
    "seeds": Param(int, "number of seeds for training-based table rows (mean ± std)"),
    "data_root": Param(str, "COCO-format root (micro-world export or real COCO 2017)"),
    "cache_dir": Param(str, "where checkpoints and intermediate results are cached, keyed by config hash"),
    "steps_scale": Param(float, "multiplies every training budget (steps/epochs) of the profile"),
    "eval_images": Param(int, "number of evaluation images (0 = the whole split)"),
    "allow_download": Param(bool, "may named pretrained weights be downloaded (needs internet)"),
    "backbone": Param(str, "CLIP backbone of the distillation chapters ('micro-clip', 'EVA02-B-16', 'ViT-B-16', ...)"),
    "recipes": Param(list, "training recipes, applied in order (see ovlib.train.recipes)"),
}


def _check_value(key: str, value: Any, where: str) -> Any:
    spec = PARAMS[key]
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise ParamError(f"{where}: parameter {key!r} must be {names}, got {type(value).__name__} {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ParamError(f"{where}: parameter {key!r} must be one of {list(spec.choices)}, got {value!r}")
    return value


def validate(params: Mapping[str, Any], where: str = "parameters", complete: bool = True) -> dict[str, Any]:
    """Check keys and types; return a new dict. ``complete`` requires every contract key."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ParamError(f"{where}: unknown parameter(s) {unknown}; known: {sorted(PARAMS)}")
    if complete:
        missing = sorted(set(PARAMS) - set(params))
        if missing:
            raise ParamError(f"{where}: missing parameter(s) {missing}")
    return {k: _check_value(k, v, where) for k, v in params.items()}


def profile_path(profile: str, root: str | Path = ".") -> Path:
    if profile not in PROFILES:
        raise ParamError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    return Path(root) / "params" / f"{profile}.yaml"


def load_profile(profile: str, root: str | Path = ".") -> dict[str, Any]:
    """Read and validate ``params/PROFILE.yaml``."""
    path = profile_path(profile, root)
    if not path.is_file():
        raise ParamError(f"parameter file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamError(f"{path}: must be a mapping of parameter: value")
    params = validate(data, where=str(path))
    if params["profile"] != profile:
        raise ParamError(f"{path}: 'profile' is {params['profile']!r} but the file is for {profile!r}")
    return params


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``3`` -> int, ``true`` -> bool, ``a/b`` -> str)."""
    if "=" not in item:
        raise ParamError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ParamError(f"override {item!r}: value is not valid YAML: {e}") from e
    if key in PARAMS and PARAMS[key].type is str and not isinstance(value, str):
        value = raw  # '0' for data_root stays a string
    return key, value


def resolve(profile: str, overrides: list[str] | Mapping[str, Any] = (), root: str | Path = ".") -> dict[str, Any]:
    """Profile file + overrides, validated. Overriding ``profile`` itself is refused."""
    params = load_profile(profile, root)
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    upd = dict(items)
    if "profile" in upd and upd["profile"] != profile:
        raise ParamError("use --profile to change the profile, not -p profile=...")
    params.update(validate(upd, where="overrides", complete=False))
    return params

"""The shared parameter contract of every chapter (``params/{smoke,micro,paper}.yaml``).

Every notebook's ``parameters`` cell holds these keys with their ``micro`` defaults; the runner injects
``params/PROFILE.yaml`` plus ``-p key=value`` overrides. A profile file must define exactly the keys of
:data:`PARAMS`; an unknown key, a missing key, a value of the wrong type or an unknown profile is a
:class:`ParamError` naming the file and the key.

Chapters that need a new knob add it here (with its type and a one-line meaning) and to the three
profile files, so the contract stays one table.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "budgets": Param(dict, "the profile's sizes: 'pretrain' and 'eval' (the library's, SIZE_KEYS; read through "
                           "profile_sizes), 'train' (named training budgets) and one entry per chapter "
                           "(see BUDGET_KEYS; read through ovlib.study.Study.budget)"),
    "models": Param(dict, "named models a chapter loads besides the recipes' backbones: role -> {name, pretrained}"),
    "weights_dir": Param(str, "local directory holding every named weight ('' = Hugging Face cache / download); "
                              "see ovlib.models.weights for the file names"),
    "precision": Param(str, "numerics of every training the chapter runs (pre-training of the micro backbones, "
                            "distillation): 'fp32'; 'bf16' (autocast: faster on GPUs and CPUs with AMX, different "
                            "numbers, see the README); 'auto' (bf16 on a GPU or an AMX CPU, else fp32)",
                       ("fp32", "bf16", "auto")),
    "dry_run": Param(bool, "run the profile's code path at the sizes of `dry_run_settings` (random weights, "
                           "<= 2 training steps)"),
    "dry_run_settings": Param(dict, "what a dry run changes: params / recipes / eval / random_init ({} = none)"),
}

#: The knobs a chapter may set under ``budgets: {NN: {...}}`` (key -> meaning). ``train`` holds named
#: training budgets (``name: {max_steps: ..., batch_size: ..., ...}``: DistillConfig overrides; steps are
#: multiplied by ``steps_scale``; ``{}`` = the recipe as it is) shared by every chapter, so a run trained
#: with the same named budget by two chapters is one run (ovlib.study). A chapter that needs a new knob adds
#: it here and to the three profile files.
BUDGET_KEYS: dict[str, dict[str, str]] = {
    "01": {"seeds": "training seeds of the chapter's main rows (0: the profile's 'seeds')"},
    "02": {
        "seeds": "training seeds of the main rows (0: the profile's 'seeds')",
        "region_images": "evaluation images of region classification (0: all)",
        "seg_images": "evaluation images of OVSS and k-means (0: the evaluation settings' default)",
        "eq7": "context aggregation (Eq. 7): targets, n_max, target_size, canvas",
        "cr_pairs": "image pairs of the coupling ratio",
        "tsne_per_class": "regions per class in the t-SNE figures",
        "variant_students": "Refiner variants that also teach a student (0 or 'all')",
        "n_ref_variants": "Refiner variants trained (null: all)",
        "taus": "SCD temperature pairs of Table 13 ([] skips the table)",
        "global_scd": "train Table 14's global R-SCD row",
        "k_list": "numbers of crops K of the Refiner's global-to-local loss",
        "extended": "also run the one-seed ablations beyond the headline claims: the Refiner variants (k_list, "
                    "cosine, L2G) and their students, the τ and global-SCD rows, E2E and R-SC-V",
        "explorer_images": "evaluation images offered by the affinity and region explorers",
        "tsne_iter": "t-SNE iterations of the feature figures",
        "workers": "processes that train the chapter's runs not yet in the shared cache side by side, sharing the "
                   "CPU threads (ovlib.study.Study.run_many, ovlib.parallel; 1: one after the other in the "
                   "notebook's process, the accelerator path)",
    },
    "03": {
        "seeds": "training seeds of the Table-5 rows (0: the profile's 'seeds')",
        "region_images": "evaluation images of region classification (0: all)",
        "seg_images": "evaluation images of OVSS and k-means (0: the evaluation settings' default)",
        "n_decomp": "crops of the cls-decomposition check",
        "n_grad": "images of the gradient analysis",
        "n_gate": "images of the HSG gate statistics",
        "gate_size": "image size of the gate statistics (0: the evaluation image size)",
        "vitb_size": "image size of the random ViT-B/16 bookkeeping check",
        "layers": "numbers of layers n swept",
        "lambdas": "coherence weights λ swept",
        "extras": "the unstated choices compared",
        "extended": "also run the one-seed sweeps of §3.7 (layers, lambdas, extras) beyond the headline claims",
        "dl_draws": "Monte-Carlo draws of the ΔL check",
        "bench": "step-time benchmark: image size, crop size, batch, boxes per image, pairs",
        "workers": "processes that train the chapter's runs not yet in the shared cache side by side, sharing the "
                   "CPU threads (ovlib.study.Study.run_many, ovlib.parallel; 1: one after the other in the "
                   "notebook's process, the accelerator path)",
    },
    "04": {
        "seeds": "training seeds of the main rows (0: the profile's 'seeds')",
        "region_images": "evaluation images of region classification, main rows (0: all)",
        "region_images_sweep": "evaluation images of region classification, sweep rows (0: all)",
        "seg_images": "evaluation images of OVSS, main rows (0: the evaluation settings' default)",
        "seg_images_sweep": "evaluation images of OVSS, sweep rows (0: the evaluation settings' default)",
        "cons_images": "evaluation images of the synonym map statistics (0: all)",
        "ks": "numbers of semantic tokens k swept",
        "ab": "spatial / semantic mixing pairs (alpha, beta) swept",
        "extras": "the further one-seed variants (loss l2, paper reading, held-out synonyms excluded, "
                  "teacher text = synonyms only)",
        "extended": "also run the one-seed sweeps of §4.9 (ks, ab, extras) beyond the headline claims",
        "explorer_images": "evaluation images offered by the attention explorer",
        "max_synonyms": "WordNet synonyms kept per COCO class (real data; SEViC-style corpus)",
        "workers": "processes that train the chapter's runs not yet in the shared cache side by side, sharing the "
                   "CPU threads (ovlib.study.Study.run_many, ovlib.parallel; 1: one after the other in the "
                   "notebook's process, the accelerator path)",
    },
    "05": {
        "seeds": "training seeds of the main rows (0: the profile's 'seeds')",
        "ablation_seeds": "training seeds of the loss ablation (the four removals and their reference)",
        "n_eval": "evaluation scenes of the main rows (0: the evaluation settings' default)",
        "n_eval_sweep": "evaluation scenes of the ablation and the extended rows (0: as n_eval)",
        "extended": "also run the one-seed rows: bounded-cosine reading, lr / weight sweep, diagnostics",
        "workers": "processes that train the chapter's runs not yet in the shared cache side by side, sharing the "
                   "CPU threads (ovlib.study.Study.run_many, ovlib.parallel; 1: one after the other in the "
                   "notebook's process, the accelerator path)",
    },
    "06": {
        "seeds": "detector seeds, one detector per student seed (0: the profile's 'seeds')",
        "students": "the students compared: {row: {method, budget}} (loaded from the shared run cache)",
        "split": "the vocabulary split: 'field' (the micro world's base / novel) or 'ov-coco' (48 / 17)",
        "train_images": "training images of the detector (0: the whole training export / file)",
        "eval_images": "evaluation images of the detectors (0: all of the evaluation split)",
        "region_images": "evaluation images of the students' region classification (0: all)",
        "detector": "the detector's training: steps (or epochs), batch_size, lr, weight_decay, warmup, grad_clip, flip",
        "fvit": "F-ViT options (ovlib.methods.fvit.FViTConfig fields) of the profile",
        "name_mode": "the synonym protocol of novel names at test (ovlib.models.text.NAME_MODES)",
        "region": "also evaluate the students' region classification (AP vs region accuracy)",
        "workers": "processes that train and evaluate the detectors side by side, sharing the CPU threads "
                   "(ovlib.parallel; 1: one after the other in the notebook's process, the accelerator path)",
    },
    # the recipe sweep (ovlib.sweep, `python -m ovlib.sweep`): not a chapter, it chooses the profile's recipes
    "recipes": {
        "split": "the tuning split the sweep evaluates on (never the chapters' evaluation split val2017)",
        "region_images": "tuning images of region classification (0: the profile's eval_images)",
        "seeds": "training seeds per sweep point (0: one)",
        "budget": "the named training budget (budgets.train) every point starts from: batch, boxes",
        "lrs": "learning rates swept",
        "steps": "step budgets swept (max_steps at steps_scale 1; warm-up a tenth)",
        "families": "family -> {tune: the method chosen on, shared: methods that take the choice, "
                    "also: methods swept for the record}",
    },
}


#: The library's profile-dependent sizes, ``budgets.pretrain`` and ``budgets.eval`` of every profile file (all keys
#: required; read through :func:`profile_sizes`): section -> key -> type, or a nested table of the same form.
#: ``pretrain``: the micro backbones' pre-training budgets at ``steps_scale == 1`` (:func:`ovlib.train.pretrain.
#: pretrain_configs`, :func:`ovlib.train.proxies.clipseg_config`; ``steps`` and ``warmup`` are scaled by
#: ``steps_scale``, at least ``min_steps``, the other keys replace fields of the trainer's config); ``eval``: the
#: evaluation settings (:func:`ovlib.eval.profiles.dense_eval_settings`; ``export_size`` > 0: the profile's data
#: is the micro world, exported at that size, see :func:`micro_world`).
_PRETRAIN_RUN: dict[str, Any] = {"steps": int, "warmup": int, "min_steps": int, "batch_size": int, "ckpt_every": int}
SIZE_KEYS: dict[str, dict[str, Any]] = {
    # vfm.objective: the micro VFM's self-supervised objective, "mae" (ovlib.train.mae) or "dense" (dense
    # self-distillation, ovlib.train.pretrain.DenseVfmPretrainConfig); see ovlib.train.pretrain.vfm_config
    "pretrain": {"clip": _PRETRAIN_RUN, "vfm": {**_PRETRAIN_RUN, "objective": str}, "clipseg": _PRETRAIN_RUN},
    "eval": {
        "export_size": int,   # px of the exported micro-world evaluation images; 0 = real data (COCO), not exported
        "region": {"image_size": int, "crop_size": int, "min_size": float, "batch_size": int, "crop_batch": int},
        "ovss": {"image_size": int, "crop": int, "stride": int, "resize": str},
        "ovss_images": int,   # images for OVSS and k-means (at most the evaluation images)
        "n_boot": int,        # bootstrap resamples of the 95 % intervals
        "modes": list,        # chapter 01's dense modes (vanilla or ovlib.models.PRESETS names)
        "templates": int,     # prompt templates kept for the class embeddings (0 = all of the set)
    },
}


def _check_sizes(value: Any, schema: Mapping[str, Any], where: str) -> None:
    """``value`` has exactly the keys of ``schema``, each of its type (a nested schema: a mapping of the same form)."""
    if not isinstance(value, Mapping):
        raise ParamError(f"{where} must be a mapping, got {type(value).__name__}")
    unknown, missing = sorted(set(value) - set(schema)), sorted(set(schema) - set(value))
    if unknown:
        raise ParamError(f"{where}: unknown key(s) {unknown}; known: {sorted(schema)}")
    if missing:
        raise ParamError(f"{where}: missing key(s) {missing}")
    for k, t in schema.items():
        v = value[k]
        if isinstance(t, Mapping):
            _check_sizes(v, t, f"{where}.{k}")
        elif not (isinstance(v, t) and not isinstance(v, bool)) and not (t is float and type(v) is int):
            raise ParamError(f"{where}.{k} must be {t.__name__}, got {type(v).__name__} {v!r}")


def _check_budgets(value: Mapping[str, Any], where: str) -> None:
    for ch, entry in value.items():
        if not isinstance(entry, dict):
            raise ParamError(f"{where}: budgets[{ch!r}] must be a mapping, got {type(entry).__name__}")
        if ch in SIZE_KEYS:
            _check_sizes(entry, SIZE_KEYS[ch], f"{where}: budgets.{ch}")
            continue
        if ch == "train":
            for name, ov in entry.items():
                if not isinstance(ov, dict):
                    raise ParamError(f"{where}: budgets['train'][{name!r}] must be a mapping of DistillConfig "
                                     f"overrides, got {type(ov).__name__}")
            continue
        if ch not in BUDGET_KEYS:
            raise ParamError(f"{where}: unknown chapter {ch!r} in budgets; known: "
                             f"{[*SIZE_KEYS, 'train', *BUDGET_KEYS]}")
        unknown = sorted(set(entry) - set(BUDGET_KEYS[ch]))
        if unknown:
            raise ParamError(f"{where}: unknown key(s) {unknown} in budgets[{ch!r}]; known: "
                             f"{sorted(BUDGET_KEYS[ch])}")


#: sections of ``dry_run_settings`` (a dry run changes sizes, step counts, data and weights; nothing else)
DRY_RUN_SECTIONS = {
    "params": "contract parameters replaced (not profile, recipes or the dry_run keys themselves)",
    "recipes": "recipe entries appended to the profile's recipes (later entries override)",
    "budgets": "merged into `budgets` (a chapter's keys given replace the profile's; a named training budget given "
               "replaces the profile's): sweeps cut to the fewest points that still run every code path, sizes",
    "eval": "evaluation sizes (ovlib.eval.profiles.dense_eval_settings keyword arguments)",
    "random_init": "true: every named weight (models, recipes) is randomly initialised, nothing is read",
    "cap": "the largest count a chapter's budget may use (images, pairs, draws, sweep values): dry_run_cap",
    "depth": "transformer blocks kept in every randomly initialised named tower (image, text, VFM; the first N): "
             "dry_run_depth",
}
#: keys of ``dry_run_settings.eval`` (see :func:`ovlib.eval.profiles.dense_eval_settings`)
DRY_RUN_EVAL_KEYS = ("region", "ovss", "ovss_images", "n_boot", "templates")
_DRY_RUN_FORBIDDEN = ("profile", "recipes", "dry_run", "dry_run_settings")


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
    if key == "budgets":
        _check_budgets(value, where)
    return value


def _check_models(models: Mapping[str, Any], where: str) -> None:
    for role, spec in models.items():
        if not isinstance(spec, Mapping) or set(spec) != {"name", "pretrained"} or not isinstance(spec["name"], str) \
                or not (spec["pretrained"] is None or isinstance(spec["pretrained"], str)):
            raise ParamError(f"{where}: models[{role!r}] must be {{name: str, pretrained: str or null}}, got {spec!r}")


def _check_dry_run_settings(s: Mapping[str, Any], where: str) -> None:
    w = f"{where}: dry_run_settings"
    unknown = sorted(set(s) - set(DRY_RUN_SECTIONS))
    if unknown:
        raise ParamError(f"{w} has unknown section(s) {unknown}; known: {sorted(DRY_RUN_SECTIONS)}")
    ps = s.get("params", {})
    if not isinstance(ps, Mapping):
        raise ParamError(f"{w}.params must be a mapping, got {type(ps).__name__}")
    bad = sorted(set(ps) & set(_DRY_RUN_FORBIDDEN))
    if bad:
        raise ParamError(f"{w}.params may not set {bad}")
    validate(ps, where=f"{w}.params", complete=False)
    rec = s.get("recipes", [])
    if s and (not isinstance(rec, list) or not rec or not all(isinstance(e, Mapping) for e in rec)):
        raise ParamError(f"{w}.recipes must be a non-empty list of mappings (it marks applied dry runs)")
    bud = s.get("budgets", {})
    if not isinstance(bud, Mapping):
        raise ParamError(f"{w}.budgets must be a mapping, got {type(bud).__name__}")
    _check_budgets(bud, f"{w}.budgets")
    ev = s.get("eval", {})
    if not isinstance(ev, Mapping) or sorted(set(ev) - set(DRY_RUN_EVAL_KEYS)):
        raise ParamError(f"{w}.eval must be a mapping with keys among {list(DRY_RUN_EVAL_KEYS)}, got {ev!r}")
    if not isinstance(s.get("random_init", False), bool):
        raise ParamError(f"{w}.random_init must be true or false")
    cap = s.get("cap", 1)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise ParamError(f"{w}.cap must be an int >= 1, got {cap!r}")
    depth = s.get("depth")
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ParamError(f"{w}.depth must be an int >= 1 or null, got {depth!r}")
    if depth is not None and not s.get("random_init"):
        raise ParamError(f"{w}.depth cuts random initialisations only: it needs random_init: true")


def validate(params: Mapping[str, Any], where: str = "parameters", complete: bool = True) -> dict[str, Any]:
    """Check keys and types; return a new dict. ``complete`` requires every contract key."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ParamError(f"{where}: unknown parameter(s) {unknown}; known: {sorted(PARAMS)}")
    if complete:
        missing = sorted(set(PARAMS) - set(params))
        if missing:
            raise ParamError(f"{where}: missing parameter(s) {missing}")
    out = {k: _check_value(k, v, where) for k, v in params.items()}
    if "models" in out:
        _check_models(out["models"], where)
    if "dry_run_settings" in out:
        _check_dry_run_settings(out["dry_run_settings"], where)
    return out


def apply_dry_run(params: Mapping[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parameters of a dry run (``params["dry_run"]`` true), else ``params`` unchanged.

    ``dry_run_settings.params`` replace contract values (except the keys in ``keep``: explicit overrides win),
    ``dry_run_settings.recipes`` are appended to ``recipes``, ``dry_run_settings.budgets`` are merged into
    ``budgets`` (a chapter's keys given replace the profile's, a named training budget given replaces the
    profile's) and, with ``random_init``, every ``models`` entry gets ``pretrained: null``. Applying it to
    parameters whose recipes already end with the dry-run recipes changes nothing (the notebook's
    :func:`ovlib.nb.setup` sees what the runner applied, explicit overrides included); so a dry-run block must
    hold at least one recipe entry (checked by the contract)."""
    out = dict(params)
    if not out.get("dry_run"):
        return out
    s = out.get("dry_run_settings") or {}
    if not s:
        raise ParamError(f"dry_run=true but profile {out.get('profile')!r} has no dry_run_settings")
    extra = [dict(e) for e in s.get("recipes", [])]
    rec = list(out.get("recipes", []))
    if extra and rec[-len(extra):] == extra:  # applied already (by the runner): explicit overrides stay
        return out
    out.update({k: v for k, v in s.get("params", {}).items() if k not in keep})
    out["recipes"] = rec + extra
    if s.get("budgets"):
        budgets = {k: dict(v) for k, v in (out.get("budgets") or {}).items()}
        for ch, entry in s["budgets"].items():
            if ch == "train":
                budgets["train"] = {**budgets.get("train", {}), **{n: dict(v) for n, v in entry.items()}}
            else:
                budgets[ch] = {**budgets.get(ch, {}), **entry}
        out["budgets"] = budgets
    if s.get("random_init"):
        out["models"] = {r: {**m, "pretrained": None} for r, m in out.get("models", {}).items()}
    return out


def dry_run_eval(params: Mapping[str, Any]) -> dict[str, Any]:
    """``dry_run_settings.eval`` of a dry run (keyword arguments of ``dense_eval_settings``), else ``{}``."""
    return dict((params.get("dry_run_settings") or {}).get("eval", {})) if params.get("dry_run") else {}


def dry_run_depth(params: Mapping[str, Any]) -> int | None:
    """``dry_run_settings.depth`` of a dry run (the blocks every randomly initialised named tower keeps:
    ``load_clip`` / ``load_vfm`` ``depth``), else ``None`` (full depth)."""
    if not params.get("dry_run"):
        return None
    depth = (params.get("dry_run_settings") or {}).get("depth")
    return None if depth is None else int(depth)


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
    missing = sorted(set(SIZE_KEYS) - set(params["budgets"]))
    if missing:
        raise ParamError(f"{path}: budgets lacks the section(s) {missing} (see ovlib.config.SIZE_KEYS)")
    if params["profile"] != profile:
        raise ParamError(f"{path}: 'profile' is {params['profile']!r} but the file is for {profile!r}")
    return params


#: the project root (``params/`` lives there): where :func:`profile_sizes` reads a profile given by name
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def profile_sizes(params: Mapping[str, Any] | str, section: str) -> dict[str, Any]:
    """The one reader of the library's profile-dependent sizes: ``budgets[section]`` (``section`` in
    :data:`SIZE_KEYS`: ``"pretrain"`` or ``"eval"``) of resolved parameters, or of ``params/PROFILE.yaml`` of the
    project (:data:`PROJECT_ROOT`) when ``params`` is a profile name. Returns a copy."""
    if section not in SIZE_KEYS:
        raise ParamError(f"unknown size section {section!r}; known: {sorted(SIZE_KEYS)}")
    if isinstance(params, str):
        where = str(profile_path(params, PROJECT_ROOT))
        params = load_profile(params, PROJECT_ROOT)
    else:
        where = f"parameters of profile {params.get('profile')!r}"
    sizes = (params.get("budgets") or {}).get(section)
    if sizes is None:
        raise ParamError(f"{where}: no budgets.{section} (see ovlib.config.SIZE_KEYS)")
    _check_sizes(sizes, SIZE_KEYS[section], f"{where}: budgets.{section}")
    return copy.deepcopy(dict(sizes))


def training_precision(params: Mapping[str, Any] | str) -> str:
    """The ``precision`` of every training (``PARAMS``: fp32 | bf16 | auto) of resolved parameters, or of
    ``params/PROFILE.yaml`` of the project when ``params`` is a profile name; ``"auto"`` where a mapping lacks it."""
    if isinstance(params, str):
        params = load_profile(params, PROJECT_ROOT)
    return str(params.get("precision", "auto"))


def micro_world(params: Mapping[str, Any] | str) -> bool:
    """Is the profile's data the micro world the book generates (``budgets.eval.export_size > 0``), rather than
    real images on disk (COCO)? Micro-world profiles export their splits before training and evaluation."""
    return profile_sizes(params, "eval")["export_size"] > 0


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


def _set_nested(params: Mapping[str, Any], upd: dict[str, Any], key: str, value: Any) -> None:
    """``upd[top] = params[top]`` (or the update so far) with ``value`` set at the dotted ``key``
    (``budgets.02.extended``); the path must exist in the profile, so a typo is an error, not a new knob."""
    top, *path = key.split(".")
    if top not in PARAMS or PARAMS[top].type is not dict:
        raise ParamError(f"override {key!r}: {top!r} is not a parameter holding a mapping")
    node = upd[top] = copy.deepcopy(upd.get(top, params.get(top) or {}))
    for i, part in enumerate(path[:-1]):
        if not isinstance(node.get(part), dict):
            raise ParamError(f"override {key!r}: the profile has no mapping {'.'.join([top, *path[:i + 1]])!r}")
        node = node[part]
    if path[-1] not in node:
        raise ParamError(f"override {key!r}: the profile has no key {key!r}")
    node[path[-1]] = value


def resolve(profile: str, overrides: list[str] | Mapping[str, Any] = (), root: str | Path = ".") -> dict[str, Any]:
    """Profile file + overrides, validated. Overriding ``profile`` itself is refused. A dotted key sets one entry of
    a mapping parameter (``budgets.02.extended=true``)."""
    params = load_profile(profile, root)
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    upd: dict[str, Any] = {}
    for key, value in items:
        if "." in key:
            _set_nested(params, upd, key, value)
        else:
            upd[key] = value
    if "profile" in upd and upd["profile"] != profile:
        raise ParamError("use --profile to change the profile, not -p profile=...")
    params.update(validate(upd, where="overrides", complete=False))
    return apply_dry_run(params, keep=tuple(upd))


def dry_run_cap(params: Mapping[str, Any]):
    """``cap(n)``: a chapter's count ``n`` (images, pairs, Monte Carlo draws) as is, or in a dry run at most
    ``dry_run_settings.cap`` (a count of 0 = "all" becomes the cap); ``cap(seq)`` keeps the first ``cap`` values of
    a sweep in a dry run (the first value is the one each sweep varies from)."""
    limit = int((params.get("dry_run_settings") or {}).get("cap", 0)) if params.get("dry_run") else 0

    def cap(n):
        if not limit:
            return n
        if isinstance(n, (list, tuple)):
            return type(n)(n[:limit])
        return limit if n <= 0 else min(int(n), limit)

    return cap

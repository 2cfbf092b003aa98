"""Recipes by a recorded sweep: each method family's learning rate and step budget, chosen on a tuning split.

``python -m ovlib.sweep --profile micro [--family clipself ...] [--out params/sweeps/micro.json]``

The micro recipes are not the papers' (their lr and steps are for EVA-CLIP on COCO at 8 GPUs), so the book
chooses them, and chooses them where a reader can check: on the micro world's ``test2017`` split, which shares no
scene with the training stream nor with the chapters' evaluation split ``val2017`` (``budgets.recipes.split``).

A *family* is a group of methods that the chapters compare with each other (``budgets.recipes.families``):
``tune`` is the method the choice is made on (the family's baseline, e.g. CLIPSelf for CLIPSelf / RegionText /
SC / R-SC / DenseRC), ``shared`` the methods that take the chosen lr, so methods compared with each other share
learning rate and budget (choosing on the baseline favours the baseline, never the papers' additions); ``also``
methods are swept for the record (how sensitive the additions are), not chosen on.

Every point -- (method, lr, step budget, seed) with the batch and box count of the named training budget
``budgets.recipes.budget`` -- is one run of the shared run cache (:meth:`ovlib.study.Study.run`; a chapter that
trains the same configuration loads it), evaluated by the chapter-01 region protocol on the tuning split. The
tuning metric is the mean Top-1 of boxes, thing masks and stuff masks (:data:`TUNE_METRIC`: R-SC's Table 1
columns, so a lr that buys boxes at the cost of stuff is not preferred). A family whose tuned method is not a
student (the R-SC Refiner: a module on the frozen CLIP, trained alone) declares ``metric: grouping``: the
colour-proof k-means mIoU (:data:`GROUP_METRIC`; every GT segment's mean colour moved to the image's, so colour
alone cannot group) of the module's dense map, since the chapters judge the Refiner by how its map groups; its
reference is the frozen CLIP's ``vanilla`` map (the Refiner's initialisation and target). A family whose tuned
method is a segmentation decoder (SynSeg: its decoder over the frozen CLIP, started from the micro CLIPSeg) declares
``metric: segmentation``: things + stuff mIoU of its masks (:data:`SEG_METRIC`, chapter 05's first protocol with
five views) on the tuning split's first ``region_images`` scenes. A family may also name
its own training ``budget`` (the Refiner's is ``refiner``) and its own ``lrs`` / ``steps`` grid. The choice of a
family is the lr with the highest mean tuning metric over seeds at the step budget the chapters train with (the
family's named budget's ``max_steps``, or the recipe's when the budget keeps it, when the grid has it); a tie goes
to the smaller lr. The other step budgets
of the grid are recorded beside it (``per_steps``, ``best``): what a larger budget would buy.

The record (points, choices, the profile's sweep settings, command, machine, commit, date) is written as JSON;
``tests/test_sweep.py`` checks that ``params/micro.yaml`` holds the recorded choices.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovlib.config import ParamError, resolve
from ovlib.eval._common import dense_fn_for_clip
from ovlib.eval.segmentation import evaluate_kmeans
from ovlib.io import atomic_write_text
from ovlib.methods.analysis import refiner_dense_fn
from ovlib.methods.rsc import load_refiner
from ovlib.models import vit_adapter
from ovlib.study import Study
from ovlib.train.pretrain import image_mean_std
from ovlib.train.recipes import distill_config

__all__ = ["GROUP_METRIC", "METRICS", "SEG_METRIC", "TOP1", "TUNE_METRIC", "SweepSpec", "choose", "main", "sweep",
           "tune_value"]

#: the region metrics averaged into the tuning metric (R-SC's Table 1 Top-1 columns)
TOP1 = ("boxes.top1", "thing.top1", "stuff.top1")
TUNE_METRIC = "region.top1"
#: the grouping families' tuning metric: k-means mIoU with every segment's mean colour equalised
GROUP_METRIC = "kmeans.equalized"
#: the segmentation families' tuning metric: SynSeg's things + stuff mIoU (argmax over every class, five views;
#: chapter 05's first protocol, :func:`ovlib.eval.synseg.evaluate_protocols`)
SEG_METRIC = "synseg.miou"
#: a family's ``metric`` -> the metric it is tuned on
METRICS = {"region": TUNE_METRIC, "grouping": GROUP_METRIC, "segmentation": SEG_METRIC}
#: the methods a ``grouping`` family can tune (their dense map is not a student's)
GROUPING_METHODS = ("refiner",)
#: the methods a ``segmentation`` family can tune (a decoder over the frozen CLIP, scored by its masks)
SEGMENTATION_METHODS = ("synseg",)
_FAMILY_KEYS = {"tune", "shared", "also", "metric", "budget", "lrs", "steps"}


@dataclass(frozen=True)
class SweepSpec:
    """``budgets.recipes`` of a profile, validated (see ``ovlib.config.BUDGET_KEYS["recipes"]``)."""

    split: str
    region_images: int
    seeds: tuple[int, ...]
    budget: str
    lrs: tuple[float, ...]
    steps: tuple[int, ...]
    families: Mapping[str, Mapping[str, Any]]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SweepSpec:
        where = f"params/{params['profile']}.yaml: budgets.recipes"
        b = dict((params.get("budgets") or {}).get("recipes") or {})
        if not b:
            raise ParamError(f"{where} is missing: the profile defines no recipe sweep")
        split = str(b.get("split", ""))
        if not split or split == "val2017":
            raise ParamError(f"{where}.split = {split!r}: the sweep must not choose on the evaluation split val2017")
        fams = dict(b.get("families") or {})
        if not fams:
            raise ParamError(f"{where}.families is empty: the profile takes its recipes as they are (no sweep)")
        for name, f in fams.items():
            unknown = sorted(set(f) - _FAMILY_KEYS)
            if unknown or "tune" not in f:
                raise ParamError(f"{where}.families.{name}: needs 'tune'; unknown key(s) {unknown}; "
                                 f"known: {sorted(_FAMILY_KEYS)}")
            metric = f.get("metric", "region")
            if metric not in METRICS:
                raise ParamError(f"{where}.families.{name}.metric = {metric!r}; known: {sorted(METRICS)}")
            only = {"grouping": GROUPING_METHODS, "segmentation": SEGMENTATION_METHODS}.get(metric)
            odd = [m for m in [f["tune"], *(f.get("also") or [])] if only is not None and m not in only]
            if odd:
                raise ParamError(f"{where}.families.{name}: metric {metric} tunes {list(only)} only, not {odd}")
            _grid(f.get("lrs"), f.get("steps"), f"{where}.families.{name}", optional=True)
        lrs, steps = _grid(b.get("lrs"), b.get("steps"), where)
        n = int(b.get("seeds") or 0) or 1
        return cls(split, int(b.get("region_images") or 0), tuple(int(params["seed"]) + i for i in range(n)),
                   str(b.get("budget") or "main"), lrs, steps, fams)


def _grid(lrs: Any, steps: Any, where: str, optional: bool = False) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """A lr grid and a step grid, validated (``optional``: either may be absent, i.e. the profile's)."""
    lr_t, st_t = tuple(float(x) for x in lrs or ()), tuple(int(x) for x in steps or ())
    for name, v, lo in (("lrs", lr_t, 0.0), ("steps", st_t, 0)):
        if (not v and not optional) or (v and min(v) <= lo):
            raise ParamError(f"{where}: {name} must be non-empty and positive, got {list(v)}")
    return lr_t, st_t


def tune_value(metrics: Mapping[str, float]) -> float:
    """The tuning metric of one evaluation: the mean of :data:`TOP1` (nan when one is missing)."""
    v = [float(metrics.get(k, float("nan"))) for k in TOP1]
    return float(np.mean(v)) if all(math.isfinite(x) for x in v) else float("nan")


def choose(points: Sequence[Mapping[str, Any]], family: str, method: str, steps: int | None = None
           ) -> dict[str, Any]:
    """The family's choice from its tune method's points: the lr with the highest mean tuning value (``tune``,
    the family's ``metric``) over seeds at the step budget ``steps`` (the one the chapters train with;
    ``None``: any budget of the grid); ties go to fewer steps, then the smaller lr. Also the best lr per step
    budget (``per_steps``) and the best (lr, steps) of the whole grid (``best``), which says what a larger budget
    would buy."""
    cells: dict[tuple[int, float], list[float]] = {}
    metrics = set()
    for p in points:
        if p["family"] == family and p["method"] == method:
            cells.setdefault((int(p["steps"]), float(p["lr"])), []).append(float(p["tune"]))
            metrics.add(p["metric"])
    means = {k: float(np.mean(v)) for k, v in cells.items() if all(math.isfinite(x) for x in v)}
    if not means:
        raise ValueError(f"sweep: no finite tuning value for family {family!r} (method {method!r})")
    if len(metrics) != 1:
        raise ValueError(f"sweep: family {family!r} mixes tuning metrics {sorted(metrics)}")

    def best(keys):
        return max(((k, means[k]) for k in keys), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))

    at = [k for k in means if steps is None or k[0] == int(steps)]
    if not at:
        raise ValueError(f"sweep: family {family!r} has no point at {steps} steps; "
                         f"swept: {sorted({k[0] for k in means})}")
    (st, lr), v = best(at)
    per_steps = {}
    for s_ in sorted({k[0] for k in means}):
        (_, l_), v_ = best([k for k in means if k[0] == s_])
        per_steps[str(s_)] = {"lr": l_, "tune": v_}
    (bst, blr), bv = best(list(means))
    return {"method": method, "metric": metrics.pop(), "lr": lr, "steps": st, "tune": v, "per_steps": per_steps,
            "best": {"lr": blr, "steps": bst, "tune": bv}}


def _scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def _grouping(study: Study, dense_fn: Callable, n_images: int) -> float:
    """:data:`GROUP_METRIC` of a dense map on the first ``n_images`` images of the tuning split (mIoU, %)."""
    bb = study.backbones()
    km = evaluate_kmeans(dense_fn, bb.dataset, image_size=bb.settings.region.image_size, n_images=n_images,
                         seed=int(study.params["seed"]), n_boot=1, patch=int(vit_adapter(bb.clip).patch_size[0]),
                         progress=False, colour="equalized")
    return float(km["miou"][0])


def _segmentation(study: Study, res: Mapping[str, Any] | None, n_images: int, device: str) -> float:
    """:data:`SEG_METRIC` of a trained SynSeg run (``res``) on the first ``n_images`` images of the tuning split
    (%); ``res=None``: its starting point, the recipe's decoder from its CLIPSeg initialisation, untrained (the
    reference a SynSeg run has to beat; chapter 05's "CLIPSeg initialisation" row)."""
    from ovlib.eval.synseg import evaluate_protocols, synseg_from_run, synseg_score_fn
    from ovlib.methods.synseg import SynSeg
    from ovlib.train.proxies import clipseg_weights

    bb = study.backbones()
    if res is None:
        args = dict(distill_config(study.params, "synseg", {}, out_dir="unused").method_args)
        state = clipseg_weights(study.params, args.get("clipseg"), bb.clip, bb.tokenizer, device=device)
        torch.manual_seed(int(study.params["seed"]))
        model = SynSeg(bb.clip, {}, tokenizer=bb.tokenizer, categories=bb.categories, clipseg_state=state, **args)
        model = model.to(device).eval()
    else:
        model = synseg_from_run(res, bb.clip, bb.tokenizer, bb.categories, device=device).eval()
    things = [c["id"] for c in bb.categories if c.get("isthing", 1)]
    out = evaluate_protocols(synseg_score_fn(model, bb.text, 5), bb.dataset, bb.class_ids, things, (),
                             image_size=bb.settings.ovss.image_size, resize=bb.settings.ovss.resize,
                             n_images=n_images, n_boot=1, seed=int(study.params["seed"]))
    return float(out["all"]["miou"][0])


def sweep(params: Mapping[str, Any], families: Sequence[str] | None = None, device: str = "cpu",
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or load from the run cache) every point of the requested families (default: all) and choose."""
    spec = SweepSpec.from_params(params)
    names = list(families or spec.families)
    unknown = [f for f in names if f not in spec.families]
    if unknown:
        raise ParamError(f"sweep: unknown family/ies {unknown}; the profile defines {sorted(spec.families)}")
    p = dict(params)
    b = dict(p.get("budgets") or {})
    b["recipes"] = {**b["recipes"], "region_images": spec.region_images}
    p["budgets"] = b
    study = Study(p, "recipes", device=device, split=spec.split, log=False)
    scale = float(params["steps_scale"])
    bb = study.backbones()
    # the frozen backbone on the tuning split: what training has to beat (no seed: deterministic)
    ev = study.evaluate("frozen CLIP", bb.clip, fixed=True, crops=False, ovss=False, kmeans=False)
    ref = {k: float(ev.point(k)) for k in TOP1}
    reference = {**ref, TUNE_METRIC: tune_value(ref)}
    log(f"[sweep] frozen CLIP: {TUNE_METRIC} {reference[TUNE_METRIC]:5.1f} (boxes {ref['boxes.top1']:5.1f}, "
        f"thing {ref['thing.top1']:5.1f}, stuff {ref['stuff.top1']:5.1f})")
    mean_std = image_mean_std(bb.clip)
    if any(spec.families[f].get("metric") == "grouping" for f in names):
        # the Refiner's initialisation and target (an untrained Refiner *is* this map on a whole image)
        reference[GROUP_METRIC] = _grouping(study, dense_fn_for_clip(bb.clip, "vanilla"), spec.region_images)
        log(f"[sweep] frozen CLIP vanilla map: {GROUP_METRIC} {reference[GROUP_METRIC]:5.1f}")
    if any(spec.families[f].get("metric") == "segmentation" for f in names):
        reference[SEG_METRIC] = _segmentation(study, None, spec.region_images, device)
        log(f"[sweep] SynSeg's CLIPSeg initialisation: {SEG_METRIC} {reference[SEG_METRIC]:5.1f}")
    points: list[dict[str, Any]] = []
    at: dict[str, int | None] = {}
    for fam in names:
        f = spec.families[fam]
        metric = METRICS[f.get("metric", "region")]
        budget = str(f.get("budget") or spec.budget)
        lrs, steps = _grid(f.get("lrs") or spec.lrs, f.get("steps") or spec.steps, fam)
        for method in [f["tune"], *(f.get("also") or [])]:
            for st in steps:
                n = _scaled(st, scale)
                for lr in lrs:
                    for seed in spec.seeds:
                        ov = {"lr": lr, "max_steps": n, "warmup_steps": max(1, n // 10)}
                        if metric == TUNE_METRIC:
                            r = study.run(method, seed=seed, budget=budget, row=f"{method}/{lr:g}/{st}",
                                          eval_kw={"crops": False, "ovss": False, "kmeans": False}, **ov)
                            m = {k: float(r.eval.point(k)) for k in TOP1}
                            value = tune_value(m)
                            shown = (f"(boxes {m['boxes.top1']:5.1f}, thing {m['thing.top1']:5.1f}, stuff "
                                     f"{m['stuff.top1']:5.1f}) ")
                        elif metric == SEG_METRIC:  # a SynSeg decoder's masks (SEGMENTATION_METHODS)
                            r = study.run(method, seed=seed, budget=budget, row=f"{method}/{lr:g}/{st}",
                                          evaluate=False, **ov)
                            m, shown = {}, ""
                            value = _segmentation(study, r.res, spec.region_images, device)
                        else:  # grouping: the Refiner's dense map (GROUPING_METHODS)
                            r = study.run(method, seed=seed, budget=budget, row=f"{method}/{lr:g}/{st}",
                                          evaluate=False, **ov)
                            refiner = load_refiner(r.res["weights"], bb.clip).to(device)
                            m, shown = {}, ""
                            value = _grouping(study, refiner_dense_fn(refiner, *mean_std), spec.region_images)
                        pt = {"family": fam, "method": method, "lr": lr, "steps": st, "max_steps": n,
                              "seed": seed, **m, "metric": metric, "tune": value, "trained_now": r.trained_now,
                              "train_s": r.train_s, "wall_s": r.wall_s}
                        points.append(pt)
                        log(f"[sweep] {fam:9s} {method:12s} lr {lr:<7g} steps {n:4d} seed {seed}: "
                            f"{metric} {value:5.1f} {shown}{'trained' if r.trained_now else 'loaded'} in "
                            f"{r.wall_s:.0f} s")
        # the choice is made at the step budget the chapters train with (the family budget's max_steps), if swept
        a = study.train_budget(budget).get("max_steps")
        # a budget without max_steps (e.g. synseg_main = {}) trains the recipe's own steps
        a_steps = round(a / scale) if a is not None else distill_config(p, f["tune"], {}, out_dir="unused").max_steps
        at[fam] = a_steps if a_steps in steps else None
    choices = {fam: {**choose(points, fam, spec.families[fam]["tune"], at[fam]),
                     "shared": list(spec.families[fam].get("shared") or [spec.families[fam]["tune"]])}
               for fam in names}
    return {"profile": params["profile"], "spec": {**asdict(spec), "families": dict(spec.families)},
            "tune_metric": f"{TUNE_METRIC} = mean of {', '.join(TOP1)} on {spec.split}; {GROUP_METRIC} = k-means "
                           f"mIoU with every segment's mean colour equalised, on {spec.split} (metric: grouping); "
                           f"{SEG_METRIC} = SynSeg's things + stuff mIoU (five views), on {spec.split} "
                           "(metric: segmentation)",
            "reference": reference, "points": points, "choices": choices}


def _provenance(argv: Sequence[str]) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() \
        else platform.processor()
    import torch

    return {"command": "python -m ovlib.sweep " + " ".join(argv), "commit": commit, "cpu": cpu,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m ovlib.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="micro")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="parameter override (as for python -m ovlib.book run)")
    ap.add_argument("--family", action="append", default=None, help="family to sweep (repeatable; default: all)")
    ap.add_argument("--out", default=None, help="record file (default: params/sweeps/PROFILE.json); families not "
                                                "swept keep their earlier record")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    params = resolve(a.profile, a.param)
    t = time.perf_counter()
    rec = sweep(params, a.family, device=a.device)
    out = Path(a.out or f"params/sweeps/{a.profile}.json")
    old = json.loads(out.read_text()) if out.is_file() else {}
    if old.get("profile") == rec["profile"]:  # merge: the families swept now replace their earlier record
        swept = set(rec["choices"])
        rec["points"] = [p for p in old.get("points", []) if p["family"] not in swept] + rec["points"]
        rec["choices"] = {**{k: v for k, v in old.get("choices", {}).items() if k not in swept}, **rec["choices"]}
        rec["runs"] = [r for r in old.get("runs", []) if not set(r.get("families", [])) <= swept]
        rec["reference"] = {**old.get("reference", {}), **rec["reference"]}
    rec.setdefault("runs", []).append({**_provenance(argv), "families": sorted(rec["choices"] if a.family is None
                                                                                   else a.family),
                                       "wall_s": round(time.perf_counter() - t, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(rec, indent=1) + "\n", out)
    for fam, c in rec["choices"].items():
        print(f"[sweep] {fam}: lr {c['lr']:g}, {c['steps']} steps ({c['metric']} {c['tune']:.1f} on "
              f"{rec['spec']['split']}); shared by {', '.join(c['shared'])}")
    print(f"[sweep] record: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build and run one distillation method from a profile: ``python -m ovlib.train`` and the notebooks' entry point.

``python -m ovlib.train --method clipself --profile micro [-p seed=1] [lr=1e-4 max_steps=50 ...]`` trains in one
process; ``torchrun --nproc-per-node N -m ovlib.train ...`` trains with DDP. Notebooks call :func:`launch`, which
trains in-process for one device and re-executes itself through torchrun when the profile asks for ``gpus > 1``.

``-p key=value`` overrides the profile's parameters (``ovlib.config``); bare ``key=value`` overrides fields of
the run's :class:`~ovlib.train.distill.DistillConfig`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ovlib import config as params_lib
from ovlib.train.distill import DistillConfig, Trainer, dist_info, lock_visual
from ovlib.train.recipes import distill_config


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def build_models(cfg: DistillConfig, params: Mapping[str, Any], needs: frozenset[str], teacher: bool = True):
    """Student, teacher (same weights; ``teacher=False``: none, a loader's build), the VFM if needed, and the
    tokenizer. Micro backbones come from the pre-training cache ("load if present, else train",
    :mod:`ovlib.train.pretrain`) unless ``cfg.pretrained`` names a file. Randomly
    initialised named models (``pretrained: null``, the dry run) are seeded by the profile's ``seed``, not the run's:
    like named weights, the base is the same for every run (and for the chapter's frozen CLIP)."""
    from ovlib.models import MICRO_CLIP_CONFIGS, load_clip, load_vfm
    from ovlib.models.vfm import MICRO_VFM_CONFIGS

    if cfg.backbone in MICRO_CLIP_CONFIGS and not cfg.pretrained:
        from ovlib.train.pretrain import pretrain_clip, pretrain_configs

        clip_cfg, _ = pretrain_configs(params, params["steps_scale"], params["seed"])
        student, tokenizer, _ = pretrain_clip(clip_cfg, params["cache_dir"], progress=False)
    else:
        student, tokenizer, _ = load_clip(cfg.backbone, pretrained=cfg.pretrained,
                                          allow_download=params["allow_download"], seed=int(params["seed"]),
                                          weights_dir=params.get("weights_dir") or None,
                                          depth=None if cfg.pretrained else params_lib.dry_run_depth(params))
    teacher = copy.deepcopy(student).eval().requires_grad_(False) if teacher else None  # None: a loader's build
    vfm = None
    if "vfm" in needs:
        if not cfg.vfm:
            raise ValueError(f"method {cfg.method!r} needs a VFM: set vfm=... in the recipe")
        if cfg.vfm in MICRO_VFM_CONFIGS and not cfg.vfm_pretrained:
            from ovlib.train.pretrain import pretrain_configs, pretrain_vfm

            _, vfm_cfg = pretrain_configs(params, params["steps_scale"], params["seed"])
            vfm = pretrain_vfm(vfm_cfg, params["cache_dir"], progress=False)[0]
        else:
            vfm = load_vfm(cfg.vfm, pretrained=cfg.vfm_pretrained, allow_download=params["allow_download"],
                           seed=int(params["seed"]), weights_dir=params.get("weights_dir") or None,
                           depth=None if cfg.vfm_pretrained else params_lib.dry_run_depth(params))
    return student, teacher, vfm, tokenizer


def build_trainer(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any] = (),
                  out_dir: str | None = None) -> Trainer:
    """Everything :func:`train` needs, built from a resolved profile."""
    from ovlib.data.distill import RegionDistillDataset, collate_regions
    from ovlib.methods import get_method
    from ovlib.models import vit_adapter
    from ovlib.train.pretrain import image_mean_std

    cfg = distill_config(params, method, overrides, out_dir)
    info = dist_info(cfg.device)
    method_cls = get_method(cfg.method)
    if params_lib.micro_world(params):
        from ovlib.data.microworld import ensure_microworld

        if cfg.max_images <= 0:
            raise ValueError("micro-world runs need max_images > 0 (the size of the exported training split)")
        if info.is_main:
            ensure_microworld(cfg.data_root, cfg.split, n=cfg.max_images, size=cfg.student_size,
                              seed=params["seed"], progress=False)
        _barrier(info.world)
    student, teacher, vfm, tokenizer = build_models(cfg, params, method_cls.needs)
    lock_visual(student, cfg.unlocked_blocks, cfg.lock_style)
    frozen = {"teacher": teacher}
    if vfm is not None:
        frozen["vfm"] = vfm
    mean, std = image_mean_std(student)
    vfm_kw = {}
    if vfm is not None:  # the VFM's grid equals the student's (reference §3.3), with the VFM's own normalisation
        grid = cfg.student_size // vit_adapter(student).patch_size[0]
        vfm_mean, vfm_std = image_mean_std(vfm)
        vfm_kw = dict(vfm_size=grid * int(vfm.patch_embed.patch_size[0]), vfm_mean=vfm_mean, vfm_std=vfm_std)
    if hasattr(method_cls, "build_dataset"):  # a method with its own data (SynSeg: images + caption labels)
        data, collate = method_cls.build_dataset(cfg, mean, std)
        categories = data.categories
    else:
        data = RegionDistillDataset(cfg.data_root, cfg.split, cfg.regions, cfg.student_size, cfg.crop_size,
                                    cfg.max_split, cfg.max_boxes, cfg.thing_crop_scale, mean, std, seed=cfg.seed,
                                    max_images=cfg.max_images, **vfm_kw)
        collate, categories = collate_regions, data.coco.categories
    # what a method may need besides images and regions: the tokenizer of the (frozen) text tower and the
    # dataset's categories (id, name, and for the micro world synonyms/definition) to turn label ids into text
    extra = {}
    if cfg.method_args.get("clipseg") is not None:  # SynSeg's CLIPSeg initialisation: micro, named file or path
        from ovlib.train.proxies import clipseg_weights, file_key

        # the micro CLIPSeg is keyed to the CLIP it is trained on: the profile's micro CLIP, else the run's weights
        key = None if not cfg.pretrained else f"{cfg.backbone}:{file_key(cfg.pretrained)}"
        state = clipseg_weights(params, cfg.method_args["clipseg"], student, tokenizer, device=info.device,
                                clip_key=key)
        if state is not None:
            extra["clipseg_state"] = state
    torch.manual_seed(cfg.seed)  # modules a method creates (Refiner, SynSeg decoder) start from the run's seed
    distiller = method_cls(student, frozen, tokenizer=tokenizer, categories=categories, **cfg.method_args, **extra)
    return Trainer(cfg, distiller, data, collate, teacher_state=teacher.state_dict(), info=info)


def train(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any] = (), out_dir: str | None = None,
          resume: bool = True) -> dict[str, Any]:
    """Train in this process (one device, or one rank under torchrun); returns the run summary and paths."""
    tr = build_trainer(params, method, overrides, out_dir)
    summary = tr.fit(resume=resume)
    return {**summary, "out_dir": str(tr.out), "results": str(tr.out / "results.json"),
            "weights": str(tr.out / "ensemble-final.pt")}


def launch(params: Mapping[str, Any], method: str, overrides: Mapping[str, Any] = (), out_dir: str | None = None,
           resume: bool = True) -> dict[str, Any]:
    """Notebook entry point: in-process when ``params["gpus"] <= 1``, else ``torchrun --nproc-per-node gpus``."""
    gpus = int(params.get("gpus", 1))
    if gpus <= 1:
        return train(params, method, overrides, out_dir, resume)
    cfg = distill_config(params, method, overrides, out_dir)
    ov = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in dict(overrides).items()]
    pv = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()
          if k not in ("profile", "recipes")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
           "-m", "ovlib.train", "--method", method, "--profile", params["profile"], "--out-dir", cfg.out_dir,
           *sum((["-p", p] for p in pv), []), *ov, *([] if resume else ["--no-resume"])]
    subprocess.run(cmd, check=True)
    res = json.loads((Path(cfg.out_dir) / "results.json").read_text())
    return {**res["train"], "out_dir": cfg.out_dir, "results": str(Path(cfg.out_dir) / "results.json"),
            "weights": str(Path(cfg.out_dir) / "ensemble-final.pt")}


def _parse_value(raw: str) -> Any:
    import yaml

    return yaml.safe_load(raw) if raw.strip() else ""


def main(argv: Sequence[str] | None = None) -> int:
    from ovlib.methods import METHODS

    ap = argparse.ArgumentParser(prog="python -m ovlib.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, choices=sorted(METHODS))
    ap.add_argument("--profile", default="micro", choices=params_lib.PROFILES)
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a profile parameter (params/PROFILE.yaml)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-resume", action="store_true", help="start from scratch even if out_dir has last.pt")
    ap.add_argument("--root", default=".", help="project root holding params/")
    ap.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="DistillConfig field overrides")
    args = ap.parse_args(argv)
    try:
        params = params_lib.resolve(args.profile, args.param, root=args.root)
        if params["dry_run"]:  # the shared COCO subset with derived instances and synthesised captions
            from ovlib.data.coco import dry_run_data

            params = dry_run_data(params)[0]
        overrides = {}
        for o in args.overrides:
            if "=" not in o:
                raise ValueError(f"override {o!r} must look like field=value")
            k, v = o.split("=", 1)
            overrides[k] = _parse_value(v)
        res = train(params, args.method, overrides, args.out_dir, resume=not args.no_resume)
    except (params_lib.ParamError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in res.items() if k != "final"}, default=str))
    return 0

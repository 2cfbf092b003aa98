"""Trials of the micro VFM's self-supervised objective, scored by chapter 01's k-means protocol.

Each trial trains a micro VFM (``pretrain_vfm`` / ``pretrain_vfm_dense``, cached like the book's own models)
and scores k-means mIoU on the chapter's evaluation images (160-px micro-world scenes, K = number of GT
segments, Hungarian matching), as is and with segment colours equalised (the measure colour cannot solve).
The no-model colour baseline is scored once. The record (JSON) holds, per trial: objective, steps, batch,
training wall seconds and process CPU seconds of the run that trained it (so the time of a cached model is
that of its own run), and both mIoU with 95 % intervals, and the point affinity inside / outside the query's object
(:func:`~ovlib.eval.segmentation.evaluate_object_affinity`). Chapter 01 renders the record as its trials table.

    python benchmarks/vfm_grouping.py --profile micro --out benchmarks/results/vfm_trials.json
    python benchmarks/vfm_grouping.py --profile smoke --out /tmp/vfm_trials.json   # seconds, for tests

Timings on a shared machine are inflated by the load; the record also stores ``os.getloadavg()`` at the end
of each training so a reader can judge.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ovlib.train.mae import MaeVfmPretrainConfig
from ovlib.train.pretrain import DinoPretrainConfig
from ovlib.train.proxies import DenseVfmPretrainConfig

#: the control: the micro VFM's architecture with its random initialisation (seed 0), no training at all
RANDOM_INIT = "random initialisation"

#: the trials: name -> (objective description, config). ``dense`` configs run ``pretrain_vfm_dense``, ``mae``
#: configs ``pretrain_vfm_mae`` (:mod:`ovlib.train.mae`), :data:`RANDOM_INIT` trains nothing.
TRIALS: dict[str, tuple[str, object]] = {
    "random-init": ("none: the ViT's random initialisation (the control: what training adds)", RANDOM_INIT),
    "mae": ("MAE: 75 % of the patches of whole 160-px scenes dropped, their per-patch normalised pixels predicted "
            "by a 2-block decoder", MaeVfmPretrainConfig()),
    "mae-150": ("MAE as `mae`, half the steps (150)", MaeVfmPretrainConfig(steps=150, warmup=15)),
    "mae-600": ("MAE as `mae`, twice the steps (600)", MaeVfmPretrainConfig(steps=600, warmup=60)),
    "mae-dec4": ("MAE as `mae`, a 4-block 128-d decoder (MAE §4.1: a deeper decoder leaves the encoder's last "
                 "block more abstract)", MaeVfmPretrainConfig(decoder_depth=4, decoder_dim=128)),
    "mae-m90-600": ("MAE as `mae`, 90 % of the patches dropped, 600 steps (the encoder sees 40 tokens)",
                    MaeVfmPretrainConfig(mask_ratio=0.9, steps=600, warmup=60)),
    "dino": ("DINO, CLS of 48/24-px multi-crops (the previous default)", DinoPretrainConfig()),
    "dense": ("dense self-distillation across 2 eval-scale views (64 px)", DenseVfmPretrainConfig()),
    "dense-100": ("dense self-distillation across 2 eval-scale views (64 px), a quarter of the steps",
                  DenseVfmPretrainConfig(steps=100, warmup=10)),
    "dense+mim": ("dense across views + iBOT masking (30 % of student tokens)",
                  DenseVfmPretrainConfig(mask_ratio=0.3)),
    "dense-96": ("dense across views, 96-px views (12x12 tokens), 24 pairs/step",
                 DenseVfmPretrainConfig(view_size=96, batch_size=24)),
    "dense-ms": (("dense across views of 0.5-2.5x the eval scale (a token of one view covers a whole part of "
                  "the other)"), DenseVfmPretrainConfig(view_scale=(0.5, 2.5))),
    "dense-ms+perm": ("dense-ms + colour permuted per view (channel shuffle p 0.5, grey p 0.2)",
                      DenseVfmPretrainConfig(view_scale=(0.5, 2.5), channel_shuffle=0.5, grayscale=0.2)),
    "dense-ms-100": ("dense self-distillation across 2 views of 0.5-2.5x the eval scale (64 px), 100 steps",
                     DenseVfmPretrainConfig(view_scale=(0.5, 2.5), steps=100, warmup=10)),
    "dense-ms+perm-100": (("dense self-distillation across 2 views of 0.5-2.5x the eval scale (64 px), "
                           "colour permuted per view (channel shuffle p 0.5, grey p 0.2), 100 steps"),
                          DenseVfmPretrainConfig(view_scale=(0.5, 2.5), channel_shuffle=0.5, grayscale=0.2,
                                                 steps=100, warmup=10)),
    "dense+perm": ("dense across views + colour permuted per view (channel shuffle p 0.5, grey p 0.2)",
                   DenseVfmPretrainConfig(channel_shuffle=0.5, grayscale=0.2)),
}


def _smoke(cfg):
    if cfg == RANDOM_INIT:
        return cfg
    if isinstance(cfg, MaeVfmPretrainConfig):
        return replace(cfg, steps=4, warmup=1, batch_size=8, scene_size=64, ckpt_every=1000)
    if isinstance(cfg, DenseVfmPretrainConfig):
        return replace(cfg, steps=4, warmup=1, batch_size=8, ckpt_every=1000)
    return replace(cfg, steps=4, warmup=1, batch_size=8, n_local=2, ckpt_every=1000)


def run(profile: str, names: list[str], cache_dir: str, data_root: str, n_images: int, out: Path,
        rescore_colour: bool = False) -> dict:
    from ovlib.data import CocoPanoptic, ensure_microworld
    from ovlib.eval._common import dense_fn_for_vfm
    from ovlib.eval.profiles import dense_eval_settings
    from ovlib.eval.segmentation import evaluate_kmeans, evaluate_object_affinity
    from ovlib.eval.unsupervised import mean_colour_dense
    from ovlib.models import load_vfm
    from ovlib.train.mae import pretrain_vfm_mae
    from ovlib.train.pretrain import pretrain_vfm
    from ovlib.train.proxies import pretrain_vfm_dense

    ev = dense_eval_settings(profile, 400)
    n_images = n_images or ev.ovss_images
    root = ensure_microworld(data_root, "val2017", n=max(n_images, 400 if profile == "micro" else n_images),
                             size=ev.export_size, seed=0, progress=False)
    ds = CocoPanoptic(root, "val2017")
    record = json.loads(out.read_text()) if out.is_file() else {"trials": {}}
    record.update(profile=profile, n_images=n_images, protocol="chapter 01 k-means (ovlib.eval.segmentation)")

    def score(fn, patch):
        r = {}
        for colour in ("as_is", "equalized"):
            k = evaluate_kmeans(fn, ds, image_size=ev.region.image_size, n_images=n_images, seed=0,
                                n_boot=ev.n_boot, patch=patch, progress=False, colour=colour)
            r[colour] = list(k["miou"])
        return r

    same_images = record.get("colour_baseline_images") == [profile, n_images]
    if rescore_colour or not same_images or "colour_baseline" not in record:  # no model: the same every run
        record["colour_baseline"] = score(lambda x: mean_colour_dense(x, 8), 8)
        record["colour_baseline_images"] = [profile, n_images]
    for name in names:
        desc, cfg = TRIALS[name]
        if profile == "smoke":
            cfg = _smoke(cfg)
        cpu0 = time.process_time()
        if cfg == RANDOM_INIT:
            vfm = load_vfm("micro-vfm", seed=0).eval()
            info = {"train_seconds": 0.0, "history": [{"loss": None}], "loaded": False}
        elif isinstance(cfg, MaeVfmPretrainConfig):
            vfm, info = pretrain_vfm_mae(cfg, cache_dir, progress=False)
        elif isinstance(cfg, DenseVfmPretrainConfig):
            vfm, info = pretrain_vfm_dense(cfg, cache_dir, progress=False)
        else:
            vfm, info = pretrain_vfm(cfg, cache_dir, progress=False)
        cpu = time.process_time() - cpu0
        conf = {"model": "micro-vfm", "seed": 0, "steps": 0} if cfg == RANDOM_INIT else asdict(cfg)
        prev = record["trials"].get(name, {})
        same = prev.get("config") == json.loads(json.dumps(conf))
        entry = {"objective": desc, "steps": conf["steps"], "batch": getattr(cfg, "batch_size", 0),
                 "train_seconds": info["train_seconds"], "config": conf,
                 # a model loaded from the cache: its run's CPU time and load are those recorded then, else unknown
                 "cpu_seconds": ((prev.get("cpu_seconds") if same else None) if info.get("loaded") else cpu),
                 "loadavg": ((prev.get("loadavg") if same else None) if info.get("loaded") else os.getloadavg()[0]),
                 "threads": ((prev.get("threads") if same else None) if info.get("loaded")
                             else torch.get_num_threads()),
                 "final_loss": info["history"][-1]["loss"],
                 **score(dense_fn_for_vfm(vfm), 8)}
        aff = evaluate_object_affinity(dense_fn_for_vfm(vfm), ds, image_size=ev.region.image_size, n_images=n_images,
                                       seed=0, n_boot=ev.n_boot, patch=8)
        entry["affinity_inside"], entry["affinity_outside"] = list(aff["inside"]), list(aff["outside"])
        record["trials"][name] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print(f"{name}: k-means {entry['as_is'][0]:.1f} equalized {entry['equalized'][0]:.1f} "
              f"train {entry['train_seconds']:.0f}s cpu {entry['cpu_seconds'] or 0:.0f}s", flush=True)
    return record


def main(argv=None) -> int:
    from _common import parse_trials, trials_parser  # the script's folder (sys.path[0] when run as a script)

    ap = trials_parser(__doc__, list(TRIALS), "benchmarks/results/vfm_trials.json")
    ap.add_argument("--n-images", type=int, default=0, help="0: the chapter's number of k-means images")
    ap.add_argument("--rescore-colour", action="store_true", help="score the colour baseline even if recorded")
    a = parse_trials(ap, list(TRIALS), argv)
    run(a.profile, a.trials, a.cache_dir, a.data_root, a.n_images, a.out, a.rescore_colour)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The micro proxies measured at chapter 01's protocol, without running the chapter: the grouping table (k-means
mIoU of every CLIP dense mode, the micro VFM and the no-model colour baseline, on the evaluation scenes as they
are and with segment colours equalised) and the micro CLIPSeg's OVSS mIoU on base and novel classes against
the training-free modes (things + stuff, argmax, no background). Everything comes from the profile's cache
("load if present, else train"), as in the chapters.

    python benchmarks/proxies_report.py --profile micro --out /tmp/proxies_report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def subset_miou(confs: np.ndarray, rows: list[int], n_boot: int, seed: int) -> tuple[float, float, float]:
    """mIoU (with its 95 % bootstrap interval over images) over the classes ``rows`` of summed confusions."""
    from ovlib.eval.metrics import miou_over
    from ovlib.stats import bootstrap_ci

    return bootstrap_ci(confs, lambda c: miou_over(c, rows), n_boot=n_boot, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="micro", choices=("smoke", "micro"))
    ap.add_argument("--cache-dir", default="data/cache")
    ap.add_argument("--data-root", default="data/microworld")
    ap.add_argument("--parts", nargs="*", default=["kmeans", "clipseg"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/proxies_report.json"))
    a = ap.parse_args(argv)

    from ovlib.data import CocoPanoptic, ensure_microworld
    from ovlib.eval import MICRO_TEMPLATES, text_embeddings
    from ovlib.eval._common import dense_fn_for_clip, dense_fn_for_vfm
    from ovlib.eval.profiles import dense_eval_settings
    from ovlib.eval.segmentation import evaluate_kmeans, evaluate_object_affinity, evaluate_ovss
    from ovlib.eval.synseg import evaluate_protocols, synseg_score_fn
    from ovlib.eval.unsupervised import mean_colour_dense
    from ovlib.methods.synseg import SynSeg
    from ovlib.train.pretrain import pretrain_clip, pretrain_configs, pretrain_vfm
    from ovlib.train.proxies import clipseg_config, pretrain_clipseg

    ev = dense_eval_settings(a.profile, 400)
    n_images = ev.ovss_images
    clip_cfg, vfm_cfg = pretrain_configs(a.profile, 1.0 if a.profile == "micro" else 0.01, 0)
    clip, tok, _ = pretrain_clip(clip_cfg, a.cache_dir, progress=False)
    clip.eval()
    root = ensure_microworld(a.data_root, "val2017", n=400 if a.profile == "micro" else 8, size=ev.export_size,
                             seed=0, progress=False)
    ds = CocoPanoptic(root, "val2017")
    out = json.loads(a.out.read_text()) if a.out.is_file() else {}
    out.update(profile=a.profile, n_images=n_images)

    if "kmeans" in a.parts:
        vfm, _ = pretrain_vfm(vfm_cfg, a.cache_dir, progress=False)
        fns = {f"CLIP `{m}`": (dense_fn_for_clip(clip, m), 8) for m in ev.modes}
        fns["micro VFM"] = (dense_fn_for_vfm(vfm), 8)
        fns["colour (mean RGB per patch, no model)"] = (lambda x: mean_colour_dense(x, 8), 8)
        km = {}
        for name, (fn, patch) in fns.items():
            km[name] = {c: list(evaluate_kmeans(fn, ds, image_size=ev.region.image_size, n_images=n_images, seed=0,
                                                n_boot=ev.n_boot, patch=patch, progress=False, colour=c)["miou"])
                        for c in ("as_is", "equalized")}
            print(f"{name:40s} k-means {km[name]['as_is'][0]:.1f} [{km[name]['as_is'][1]:.1f}, "
                  f"{km[name]['as_is'][2]:.1f}]  equalized {km[name]['equalized'][0]:.1f} "
                  f"[{km[name]['equalized'][1]:.1f}, {km[name]['equalized'][2]:.1f}]", flush=True)
            aff = evaluate_object_affinity(fn, ds, image_size=ev.region.image_size, n_images=n_images,
                                           n_boot=ev.n_boot, patch=patch)
            km[name]["affinity_inside"], km[name]["affinity_outside"] = list(aff["inside"]), list(aff["outside"])
            print(f"{'':40s} affinity inside {aff['inside'][0]:.3f} outside {aff['outside'][0]:.3f}", flush=True)
        out["kmeans"] = km
        out["vfm_config"] = type(vfm_cfg).__name__

    if "clipseg" in a.parts:
        cats = ds.categories
        class_ids = [c["id"] for c in cats]
        thing_ids = [c["id"] for c in cats if c.get("isthing", 1)]
        split = {c["id"]: c.get("split", "base") for c in cats}
        rows = {"base things": [i for i, c in enumerate(class_ids) if split[c] == "base"],
                "novel things": [i for i, c in enumerate(class_ids) if split[c] == "novel"],
                "stuff": [i for i, c in enumerate(class_ids) if split[c] == "stuff"]}
        text = text_embeddings(clip, tok, [c["name"] for c in cats], MICRO_TEMPLATES).cpu()
        cs_state, cs_info = pretrain_clipseg(clipseg_config(a.profile, 1.0 if a.profile == "micro" else 0.01, 0),
                                             clip, tok, a.cache_dir, progress=False)
        torch.manual_seed(0)
        model = SynSeg(clip, {}, tokenizer=tok, categories=cats, input_size=64, clipseg="micro-clipseg",
                       clipseg_state=cs_state).eval()
        # as chapter 01: CLIPSeg through SynSeg's five-view inference, the modes through the chapter's OVSS
        evals = {"micro CLIPSeg (5 views)": evaluate_protocols(
            synseg_score_fn(model, text, 5), ds, class_ids, thing_ids, (0.5,), image_size=ev.ovss.image_size,
            n_images=n_images, n_boot=ev.n_boot, seed=0)["all"]}
        res = {}
        for m in [None, *ev.modes]:
            name = "micro CLIPSeg (5 views)" if m is None else f"training-free `{m}`"
            r = evals[name] if m is None else evaluate_ovss(dense_fn_for_clip(clip, m), ds, text, class_ids,
                                                            ev.ovss, n_images=n_images, n_boot=ev.n_boot, seed=0)
            confs = r["confusion"]
            res[name] = {"all": list(r["miou"]),
                         **{k: list(subset_miou(confs, v, ev.n_boot, 0)) for k, v in rows.items()}}
            print(name, {k: f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]" for k, v in res[name].items()}, flush=True)
        out["clipseg"] = res
        out["clipseg_train_seconds"] = cs_info["train_seconds"]
    a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

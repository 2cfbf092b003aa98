"""How far chapter 01's headline numbers move when the micro backbones are pre-trained in bf16 instead of fp32.

    python scripts/precision_study.py [--device cpu|cuda] [--runs fp32:0 bf16:0 fp32:1] [--workers 3]
                                      [--profile micro] [--eval-images N] [--out PATH]

Each run ``PRECISION:SEED`` pre-trains the micro CLIP and the micro VFM of the profile (``budgets.pretrain`` and
its ``steps_scale``: chapter 01's configs) with ``precision`` forced (bf16 autocast or plain fp32;
``ovlib.train.pretrain``), then evaluates them exactly as chapter 01 does on the evaluation split of its seed:
region classification (Top-1 mean accuracy, per dense mode and the crop reference), OVSS mIoU and k-means mIoU
per mode, and the VFM's k-means. Runs go to their own cache and data folders, in ``--workers`` processes.
Evaluation is always fp32 (the chapters never autocast it). On CUDA, fp32 means fp32: TF32 is switched off for
matmuls and convolutions.

The report sets each bf16 number beside the fp32 run of the same seed and its 95 % bootstrap interval over the
evaluation images, and, when a second fp32 seed is given, the seed-to-seed change as the scale to judge it by.
``--out`` writes every number as JSON (``benchmarks/results/precision_*.json`` keeps the measured ones).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _parse_run(text: str) -> tuple[str, int]:
    precision, _, seed = text.partition(":")
    if precision not in ("fp32", "bf16") or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"a run is PRECISION:SEED with PRECISION fp32 or bf16, got {text!r}")
    return precision, int(seed)


def headline(job: dict) -> dict:
    """Chapter 01's headline numbers for one (precision, seed): ``{metric: [value, lo, hi]}`` plus timings."""
    import torch

    from ovlib.config import resolve
    from ovlib.data import CocoPanoptic, ensure_microworld
    from ovlib.eval import (
        MICRO_TEMPLATES,
        class_name_sets,
        extract_region_features,
        score_regions,
        summarize,
        text_embeddings,
    )
    from ovlib.eval._common import dense_fn_for_clip, dense_fn_for_vfm
    from ovlib.eval.profiles import dense_eval_settings
    from ovlib.eval.segmentation import evaluate_kmeans, evaluate_ovss
    from ovlib.models import vit_adapter
    from ovlib.train.pretrain import pretrain_clip, pretrain_configs, pretrain_vfm

    dev = torch.device(job["device"])
    if dev.type == "cuda":  # fp32 is fp32: no TF32 in matmuls or convolutions (the bf16 run autocasts explicitly)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(job["seed"])
    work = Path(job["work"]) / f"{job['precision']}-seed{job['seed']}"
    P = resolve(job["profile"], root=ROOT)
    eval_images = job["eval_images"] if job["eval_images"] is not None else P["eval_images"]
    t0 = time.perf_counter()
    clip_cfg, vfm_cfg = pretrain_configs(P, P["steps_scale"], job["seed"])  # chapter 01's configs
    clip_cfg, vfm_cfg = replace(clip_cfg, precision=job["precision"]), replace(vfm_cfg, precision=job["precision"])
    clip, tokenizer, _ = pretrain_clip(clip_cfg, work / "cache", device=dev, progress=False)
    t_clip = time.perf_counter() - t0
    vfm, _ = pretrain_vfm(vfm_cfg, work / "cache", device=dev, progress=False)
    t_pre = time.perf_counter() - t0
    clip.eval()
    vfm.eval()

    ev = dense_eval_settings(P, eval_images)
    root = ensure_microworld(work / "data", "val2017", n=eval_images, size=ev.export_size, seed=job["seed"],
                             progress=False)
    ds = CocoPanoptic(root, "val2017")
    class_ids = [c["id"] for c in ds.categories]
    names = class_name_sets(ds.categories, "main", seed=job["seed"])
    text = text_embeddings(clip, tokenizer, names, MICRO_TEMPLATES, this_is_prefix=False, device=dev).cpu()
    rf = extract_region_features(clip, ds, ev.region, modes=ev.modes, n_images=eval_images, device=dev)
    summ = summarize(score_regions(rf, text, class_ids), n_boot=ev.n_boot, seed=job["seed"])
    out: dict[str, list[float]] = {}
    for m in ev.modes:
        out[f"boxes.top1/{m}"] = list(summ[f"rois/{m}"]["thing.macc1"])
        out[f"thing_masks.top1/{m}"] = list(summ[f"maskpool/{m}"]["thing.macc1"])
        out[f"stuff_masks.top1/{m}"] = list(summ[f"maskpool/{m}"]["stuff.macc1"])
    out["boxes.top1/crop"] = list(summ["crops"]["thing.macc1"])
    patch = int(vit_adapter(clip).patch_size[0])
    for m in ev.modes:
        fn = dense_fn_for_clip(clip, m)
        out[f"ovss.miou/{m}"] = list(evaluate_ovss(fn, ds, text, class_ids, ev.ovss, n_images=ev.ovss_images,
                                                   n_boot=ev.n_boot, seed=job["seed"])["miou"])
        out[f"kmeans.miou/{m}"] = list(evaluate_kmeans(fn, ds, image_size=ev.region.image_size,
                                                       n_images=ev.ovss_images, seed=job["seed"], n_boot=ev.n_boot,
                                                       patch=patch)["miou"])
    vp = vfm.patch_embed.patch_size
    out["kmeans.miou/vfm"] = list(evaluate_kmeans(dense_fn_for_vfm(vfm), ds, image_size=ev.region.image_size,
                                                  n_images=ev.ovss_images, seed=job["seed"], n_boot=ev.n_boot,
                                                  patch=int(vp[0] if isinstance(vp, (tuple, list)) else vp))["miou"])
    return {"precision": job["precision"], "seed": job["seed"], "eval_images": eval_images,
            "metrics": {k: [float(x) for x in v] for k, v in out.items()},
            "seconds": {"clip_pretrain": t_clip, "pretrain": t_pre, "total": time.perf_counter() - t0},
            "threads": torch.get_num_threads()}


def compare(runs: list[dict]) -> tuple[list[dict], str]:
    """Rows ``{metric, seed, fp32 [v, lo, hi], bf16, delta, outside, seed_delta}`` for every bf16 run that has an
    fp32 run of its seed, and the report as a markdown table. ``outside``: the bf16 value lies outside the fp32
    run's 95 % interval. ``seed_delta``: another fp32 seed's value minus this seed's (the scale of seed noise)."""
    fp32 = {r["seed"]: r for r in runs if r["precision"] == "fp32"}
    rows = []
    for b in (r for r in runs if r["precision"] == "bf16"):
        ref = fp32.get(b["seed"])
        if ref is None:
            continue
        other = next((r for s, r in sorted(fp32.items()) if s != b["seed"]), None)
        for k, (v, lo, hi) in ref["metrics"].items():
            bv = b["metrics"][k][0]
            rows.append({"metric": k, "seed": b["seed"], "fp32": [v, lo, hi], "bf16": bv, "delta": bv - v,
                         "outside": not lo <= bv <= hi,
                         "seed_delta": None if other is None else other["metrics"][k][0] - v})
    lines = ["| metric | seed | fp32 [95 % interval] | bf16 | bf16 − fp32 | outside | another fp32 seed − fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        v, lo, hi = r["fp32"]
        sd = "" if r["seed_delta"] is None else f"{r['seed_delta']:+.1f}"
        lines.append(f"| {r['metric']} | {r['seed']} | {v:.1f} [{lo:.1f}, {hi:.1f}] | {r['bf16']:.1f} | "
                     f"{r['delta']:+.1f} | {'**yes**' if r['outside'] else 'no'} | {sd} |")
    n_out = sum(r["outside"] for r in rows)
    lines.append(f"\n{n_out} of {len(rows)} numbers moved outside the fp32 run's interval; largest |bf16 − fp32| "
                 f"{max((abs(r['delta']) for r in rows), default=0):.1f} points" +
                 ("" if not rows or rows[0]["seed_delta"] is None else
                  f"; largest |seed change| {max(abs(r['seed_delta']) for r in rows):.1f} points") + ".")
    return rows, "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="micro")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=_parse_run, nargs="+", default=[("fp32", 0), ("bf16", 0), ("fp32", 1)])
    ap.add_argument("--eval-images", type=int, default=None, help="default: the profile's eval_images")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel processes (threads split among them)")
    ap.add_argument("--work", default="data/precision_study", help="caches and evaluation data of the runs")
    ap.add_argument("--out", default=None, help="write every number as JSON here")
    a = ap.parse_args(argv)

    import torch

    from ovlib.parallel import map_processes

    jobs = [{"precision": p, "seed": s, "device": a.device, "profile": a.profile, "eval_images": a.eval_images,
             "work": str(Path(a.work).resolve())} for p, s in a.runs]
    if len(set(a.runs)) != len(a.runs):
        raise SystemExit(f"--runs: a run is given twice: {a.runs}")
    t0 = time.perf_counter()
    runs = map_processes(headline, jobs, workers=a.workers, label=lambda j: f"{j['precision']}:{j['seed']}")
    rows, report = compare(runs)
    dev = torch.device(a.device)
    result = {"profile": a.profile, "device": a.device, "eval_images": sorted({r["eval_images"] for r in runs}),
              "hardware": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or
              platform.machine(), "torch": torch.__version__, "runs": runs, "comparison": rows,
              "seconds": time.perf_counter() - t0}
    print(report)
    for r in runs:
        print(f"{r['precision']}:{r['seed']}: pre-training {r['seconds']['pretrain']:.0f} s, all "
              f"{r['seconds']['total']:.0f} s ({r['threads']} threads)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

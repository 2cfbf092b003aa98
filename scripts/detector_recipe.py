"""Chapter 06's micro detector recipe, chosen on the micro world's tuning split (test2017, never val2017).

    python scripts/detector_recipe.py [--lrs 3e-4 1e-3 3e-3] [--roi 64 32] [--steps 120] [--images 100]

Trains the F-ViT of ``params/micro.yaml`` (budgets["06"]) on the frozen micro CLIP for every (lr, RoIs per image)
point, in chapter 06's worker processes, and prints AP50 (novel, base, all) on the first ``--images`` scenes of
test2017 with the original class names. The chosen point is written into ``params/micro.yaml`` by hand, with
this command's output quoted there; the frozen CLIP decides the recipe, which every backbone then shares.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--roi", type=int, nargs="+", default=[64, 32],
                    help="RoIs sampled per image (FViTConfig.roi_batch)")
    ap.add_argument("--steps", type=int, default=None, help="detector steps (default: the profile's)")
    ap.add_argument("--images", type=int, default=100, help="tuning scenes evaluated")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)

    from ovlib.config import resolve
    from ovlib.data.detection import DetectionDataset, vocab_split
    from ovlib.data.microworld import ensure_microworld, export_hash
    from ovlib.eval.detector_runs import DetectorJob, run_detector_jobs
    from ovlib.methods.fvit import FViTConfig
    from ovlib.models.text import class_name_sets, text_embeddings
    from ovlib.study import Study
    from ovlib.train.detect import DetectorTrainConfig
    from ovlib.train.recipes import distill_config

    P = resolve("micro", root=ROOT)
    study = Study(P, "06", root=ROOT, log=False, split="test2017")  # the tuning split
    B = study.budget
    bb = study.backbones("clipself")
    R = distill_config(P, "clipself")
    train_root = ensure_microworld(R.data_root, R.split, n=R.max_images, size=R.student_size, seed=P["seed"],
                                   progress=False)
    data_key = export_hash(R.split, R.max_images, R.student_size, int(P["seed"]))
    inst = json.loads((Path(bb.dataset.root) / "annotations" / "instances_test2017.json").read_text())
    split = vocab_split(inst["categories"], B["split"])
    cats = {c["id"]: c for c in bb.categories}
    ds = DetectionDataset(train_root, R.split, keep=split.base, novel=split.novel)
    templates, this_is = study.prompts()
    names = class_name_sets([cats[c] for c in split.vocab], "main", seed=P["seed"])
    text = text_embeddings(bb.clip, bb.tokenizer, names, templates, this_is_prefix=this_is)
    bg = text_embeddings(bb.clip, bb.tokenizer, ["background"], templates, this_is_prefix=this_is)[0]
    fv0 = FViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in B["fvit"].items()})
    det = {k: v for k, v in B["detector"].items() if k not in ("steps", "epochs", "lr")}
    steps = a.steps or B["detector"]["steps"]
    novel = [c in split.novel for c in split.vocab]
    points = [(lr, roi) for roi in a.roi for lr in a.lrs]
    jobs = [DetectorJob(f"lr{lr:g}-roi{roi}", DetectorTrainConfig(clip=f"frozen:{bb.checkpoint}", data=data_key,
                                                                  fvit=replace(fv0, roi_batch=roi), steps=steps,
                                                                  lr=lr, seed=0, **det),
                        bb.clip, ds, text[:len(split.base)], bg, str(Path(P["cache_dir"]) / "detector-recipe"),
                        str(bb.dataset.root), "test2017", split, {"main": (text, bg, novel)}, max_images=a.images,
                        score_lo=fv0.score_thresh, n_boot=200) for lr, roi in points]
    t = time.perf_counter()
    res = run_detector_jobs(jobs, workers=a.workers)
    print(f"micro F-ViT on the frozen micro CLIP, {steps} steps x batch {det['batch_size']}, tuning split test2017 "
          f"({a.images} scenes), {len(jobs)} detectors in {time.perf_counter() - t:.0f} s ({a.workers} workers)")
    print("| lr | RoIs / image | train s | AP50 novel | AP50 base | AP50 all |\n|---|---|---|---|---|---|")
    for (lr, roi), r in zip(points, res):
        aps = [r.evals["main"].exact[f"ap50.{g}"] for g in ("novel", "base", "all")]
        print(f"| {lr:g} | {roi} | {r.info.get('train_seconds', float('nan')):.0f} | "
              + " | ".join(f"{v:.1f}" if math.isfinite(v) else "nan" for v in aps) + " |")


if __name__ == "__main__":
    main()

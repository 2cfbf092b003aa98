"""Trials of the micro CLIPSeg's conditioning, scored as chapter 01 scores the micro CLIPSeg (base / novel / stuff).

Each trial trains a micro CLIPSeg (:func:`ovlib.train.proxies.pretrain_clipseg`, cached like the book's own
models, on the profile's frozen micro CLIP) with one conditioning and scores OVSS mIoU (argmax over every class,
SynSeg's five-view inference, chapter 01's evaluation scenes) on the base classes it saw, the novel things it
never saw, and the stuff; plus, over the novel things of the first ``--diag-images`` scenes, the mean
probability of the novel class inside vs outside its object (does the decoder respond to a novel name at all?).
The record (JSON) holds, per trial: its description, config, training wall and process CPU seconds of the run
that trained it, the load average then, the three mIoU with 95 % intervals and the diagnostic. Chapter 01
renders it as its CLIPSeg trials table.

    python benchmarks/clipseg_transfer.py --profile micro --out benchmarks/results/clipseg_trials.json
    python benchmarks/clipseg_transfer.py --profile smoke --out /tmp/clipseg_trials.json   # seconds, for tests
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

#: name -> (description, ClipSegPretrainConfig fields over the profile's micro CLIPSeg config)
TRIALS: dict[str, tuple[str, dict]] = {
    "ensemble": ("text: the template ensemble of the class name for every prompt (the profiles' micro CLIPSeg)",
                 {"prompt": "ensemble", "with_visual": False}),
    "shuffle": ("text: one template drawn per prompt (CLIPSeg's `prompt: shuffle+`)",
                {"prompt": "shuffle", "with_visual": False}),
    "shuffle+visual": (("one template per prompt, mixed with a visual prompt's embedding, text weight U(0, 0.5), "
                        "half the prompts text alone (CLIPSeg's rd64-uni: with_visual, mix)"),
                       {"prompt": "shuffle", "with_visual": True}),
}

METRICS = ("mIoU", "mIoU base", "mIoU novel", "mIoU stuff")


def novel_response(model, ds, text: torch.Tensor, categories: list[dict], n_images: int) -> dict[str, float]:
    """Mean probability of each novel thing's class inside and outside its object (SynSeg's five views), over
    the novel things of the first ``n_images`` scenes, and how many there were."""
    import torch.nn.functional as F

    from ovlib.eval.synseg import predict_probs

    row = {c["id"]: r for r, c in enumerate(categories)}
    novel = {c["id"] for c in categories if c.get("split") == "novel"}
    inside, outside = [], []
    for i in range(min(n_images, len(ds))):
        it = ds[i]
        segs = [s for s in it["segments"] if s["category_id"] in novel]
        if not segs:
            continue
        img = torch.from_numpy(np.array(it["image"])).permute(2, 0, 1).float() / 255.0
        with torch.no_grad():
            probs = predict_probs(model, img, text, 5)  # (C, h, w)
        for s in segs:
            m = torch.from_numpy(np.asarray(s["mask"], dtype=bool))
            if tuple(m.shape) != tuple(probs.shape[-2:]):
                m = F.interpolate(m[None, None].float(), size=probs.shape[-2:])[0, 0] > 0.5
            if m.any() and (~m).any():
                p = probs[row[s["category_id"]]]
                inside.append(float(p[m].mean()))
                outside.append(float(p[~m].mean()))
    return {"inside": float(np.mean(inside)) if inside else float("nan"),
            "outside": float(np.mean(outside)) if outside else float("nan"), "objects": len(inside)}


def run(profile: str, names: list[str], cache_dir: str, data_root: str, out: Path, diag_images: int) -> dict:
    from ovlib.config import resolve
    from ovlib.data import CocoPanoptic, ensure_microworld
    from ovlib.eval.profiles import dense_eval_settings
    from ovlib.eval.synseg import ProtocolEval, class_groups, evaluate_protocols, synseg_score_fn
    from ovlib.methods.synseg import SynSeg
    from ovlib.models.text import MICRO_TEMPLATES, class_name_sets, text_embeddings
    from ovlib.train.pretrain import pretrain_clip, pretrain_configs
    from ovlib.train.proxies import clipseg_config, pretrain_clipseg

    P = resolve(profile, [f"cache_dir={cache_dir}", f"data_root={data_root}"])
    ev = dense_eval_settings(profile, P["eval_images"])
    clip_cfg, _ = pretrain_configs(P, P["steps_scale"], P["seed"])
    clip, tok, _ = pretrain_clip(clip_cfg, P["cache_dir"], progress=False)
    root = ensure_microworld(P["data_root"], "val2017", n=P["eval_images"], size=ev.export_size, seed=P["seed"],
                             progress=False)
    ds = CocoPanoptic(root, "val2017")
    cats = ds.categories
    class_ids = [c["id"] for c in cats]
    thing_ids = [c["id"] for c in cats if c.get("isthing", 1)]
    text = text_embeddings(clip, tok, class_name_sets(cats, "main", seed=P["seed"]), MICRO_TEMPLATES).cpu()
    groups = class_groups(cats)
    record = json.loads(out.read_text()) if out.is_file() else {"trials": {}}
    record.update(profile=profile, n_images=ev.ovss_images, protocol="chapter 01 CLIPSeg OVSS (ovlib.eval.synseg)")
    base_cfg = clipseg_config(P, P["steps_scale"], P["seed"])
    for name in names:
        desc, fields = TRIALS[name]
        cfg = replace(base_cfg, **fields)
        cpu0 = time.process_time()
        state, info = pretrain_clipseg(cfg, clip, tok, P["cache_dir"], progress=False)
        cpu = time.process_time() - cpu0
        conf = json.loads(json.dumps(asdict(cfg)))
        prev = record["trials"].get(name, {})
        same = prev.get("config") == conf
        torch.manual_seed(P["seed"])
        model = SynSeg(clip, {}, tokenizer=tok, categories=cats, input_size=clip_cfg.image_size,
                       clipseg="micro-clipseg", clipseg_state=state).eval()
        res = evaluate_protocols(synseg_score_fn(model, text, 5), ds, class_ids, thing_ids, (0.5,),
                                 image_size=ev.ovss.image_size, resize=ev.ovss.resize, n_images=ev.ovss_images,
                                 n_boot=ev.n_boot, seed=P["seed"])
        pe = ProtocolEval(res, groups)
        entry = {"description": desc, "steps": cfg.steps, "batch": cfg.batch_size, "config": conf,
                 "train_seconds": info["train_seconds"],
                 # a model loaded from the cache: its run's CPU time and load are those recorded then, else unknown
                 "cpu_seconds": ((prev.get("cpu_seconds") if same else None) if info.get("loaded") else cpu),
                 "loadavg": ((prev.get("loadavg") if same else None) if info.get("loaded") else os.getloadavg()[0]),
                 "final_loss": info["history"][-1]["loss"],
                 **{m: [float(x) for x in pe.interval(m, ev.n_boot, P["seed"])] for m in METRICS},
                 "novel_response": novel_response(model, ds, text, cats, diag_images)}
        record["trials"][name] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print(f"{name}: " + " ".join(f"{m} {entry[m][0]:.1f}" for m in METRICS)
              + f" | novel p in/out {entry['novel_response']['inside']:.3f}/{entry['novel_response']['outside']:.3f}"
              + f" | train {entry['train_seconds']:.0f}s", flush=True)
    return record


def main(argv=None) -> int:
    from _common import parse_trials, trials_parser  # the script's folder (sys.path[0] when run as a script)

    ap = trials_parser(__doc__, list(TRIALS), "benchmarks/results/clipseg_trials.json")
    ap.add_argument("--diag-images", type=int, default=40, help="scenes of the novel-response diagnostic")
    a = parse_trials(ap, list(TRIALS), argv)
    run(a.profile, a.trials, a.cache_dir, a.data_root, a.out, a.diag_images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Chapter 06's detector phase on two cores: one process with every thread, one detector after the other, against
``ovlib.parallel`` worker processes of one thread each, side by side (``ovlib.eval.detector_runs``).

The same jobs (the micro profile's F-ViT on a random micro CLIP: timing does not depend on the weights; a small
training export rendered once; ``steps`` training steps and a few evaluation images per detector) run both ways
in every round, back to back, into fresh caches, so each round's ratio compares the two under the same load.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def detector_jobs(root: Path, cache: Path, n_jobs: int, steps: int, eval_images: int):
    """``n_jobs`` detector jobs (seeds 0..n-1) with the micro profile's F-ViT and detector recipe."""
    from ovlib.config import load_profile
    from ovlib.data.detection import DetectionDataset, vocab_split
    from ovlib.eval.detector_runs import DetectorJob
    from ovlib.methods.fvit import FViTConfig
    from ovlib.models import load_clip
    from ovlib.train.detect import DetectorTrainConfig

    B = load_profile("micro", Path(__file__).resolve().parent.parent)["budgets"]["06"]
    fv = FViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in B["fvit"].items()})
    det = {k: v for k, v in B["detector"].items() if k not in ("steps", "epochs")}
    cats = json.loads((root / "annotations" / "instances_train2017.json").read_text())["categories"]
    sp = vocab_split(cats, "field")
    ds = DetectionDataset(root, "train2017", keep=sp.base, novel=sp.novel)
    clip, _, _ = load_clip("micro-clip", seed=0)
    g = torch.Generator().manual_seed(0)
    D = clip.visual.proj.shape[1]
    text = F.normalize(torch.randn(len(sp.vocab), D, generator=g), dim=-1)
    bg = F.normalize(torch.randn(D, generator=g), dim=-1)
    novel = [c in sp.novel for c in sp.vocab]
    return [DetectorJob(f"s{s}", DetectorTrainConfig(clip="bench-random", data="bench", fvit=fv, seed=s, steps=steps,
                                                     **det),
                        clip.eval(), ds, text[:len(sp.base)], bg, str(cache), str(root), "train2017", sp,
                        {"main": (text, bg, novel)}, max_images=eval_images, n_boot=20) for s in range(n_jobs)]


def rounds(repeats: int, n_jobs: int, steps: int, eval_images: int = 8, log=print) -> dict[str, list[float]]:
    """Wall seconds per round of the whole job list, ``serial`` (here, every thread) and ``workers`` (2 processes
    sharing the threads); the worker figure includes starting the processes."""
    from ovlib.data.microworld import ensure_microworld
    from ovlib.eval.detector_runs import run_detector_jobs

    out: dict[str, list[float]] = {"serial": [], "workers": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_microworld(Path(tmp) / "mw", "train2017", n=64, size=160, seed=0, progress=False)
        for r in range(repeats):
            for how, workers in (("serial", 1), ("workers", 2)):
                jobs = detector_jobs(root, Path(tmp) / f"cache-{r}-{how}", n_jobs, steps, eval_images)
                t = time.perf_counter()
                run_detector_jobs(jobs, workers=workers)
                out[how].append(time.perf_counter() - t)
                log(f"[detector] round {r}: {how} {out[how][-1]:.1f} s")
    return out

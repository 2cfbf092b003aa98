"""Jobs the fault-injection tests (tests/test_fault_tolerance.py) run in a subprocess and kill at a named instant
(``OVLIB_FAULT``, :func:`ovlib.io.fault_point`). Run as a script: ``python fault_jobs.py JOB ARGS...``; prints one
JSON line with what the test checks.

* ``train_or_load PROJECT ROOT STEPS`` -- the chapters' run cache (:func:`ovlib.eval.students.train_or_load`) of a
  tiny CLIPSelf run (smoke profile, the micro CLIP of ``PROJECT/micro.pt``);
* ``study PROJECT ROOT STEPS`` -- a study-layer run: :func:`ovlib.io.run_once` over train_or_load plus an
  evaluation that writes ``eval.json`` (fault point ``study.evaluate``: the evaluation is half done);
* ``pretrain_clip CACHE`` / ``pretrain_vfm CACHE`` -- a tiny micro CLIP / VFM pre-training
  (:mod:`ovlib.train.pretrain`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def tiny_pretrain_configs():
    """Tiny micro CLIP and micro VFM pre-trainings; the VFM's objective is the profiles' (MAE, ovlib.train.mae)."""
    from ovlib.train.mae import MaeVfmPretrainConfig
    from ovlib.train.pretrain import ClipPretrainConfig

    clip = ClipPretrainConfig(batch_size=4, steps=4, warmup=1, ckpt_every=1, precision="fp32")
    vfm = MaeVfmPretrainConfig(batch_size=4, steps=4, warmup=1, scene_size=32, ckpt_every=1, precision="fp32")
    return clip, vfm


def run_overrides(project: Path, steps: int) -> dict:
    return {"pretrained": str(project / "micro.pt"), "max_images": 8, "max_steps": steps, "save_every": 1,
            "batch_size": 2}


def main(argv: list[str]) -> dict:
    from ovlib import config
    from ovlib.io import atomic_write_text, fault_point, run_once

    job = argv[0]
    if job in ("train_or_load", "study"):
        from ovlib.eval.students import train_or_load

        project, root, steps = Path(argv[1]), Path(argv[2]), int(argv[3])
        params = config.resolve("smoke", root=project)
        if job == "train_or_load":
            res = train_or_load(params, "clipself", run_overrides(project, steps), root, "run")
            return {"trained_now": res["trained_now"], "out_dir": res["out_dir"], "weights": res["weights"]}
        study = root / "study"
        calls = study / "produce_calls.txt"  # how often the study's work ran (appended before it starts)

        def produce() -> dict:
            study.mkdir(parents=True, exist_ok=True)
            with open(calls, "a") as f:
                f.write("x\n")
            res = train_or_load(params, "clipself", run_overrides(project, steps), root, "run")
            from ovlib.io import safe_load

            w = safe_load(res["weights"])["model"]
            score = float(sum(v.double().sum() for v in w.values()))  # the "evaluation": a number of the weights
            part = study / "eval.json"
            part.write_text(json.dumps({"score": score})[:8])  # an evaluation half written ...
            fault_point("study.evaluate")  # ... when the process is killed
            atomic_write_text(json.dumps({"score": score}), part)
            return {"weights": res["weights"], "score": score}

        rec, produced = run_once(study, produce, requires=("eval.json",))
        return {"produced": produced, **rec}
    if job in ("pretrain_clip", "pretrain_vfm"):
        from ovlib.train.pretrain import pretrain_clip, pretrain_vfm

        clip_cfg, vfm_cfg = tiny_pretrain_configs()
        if job == "pretrain_clip":
            _, _, info = pretrain_clip(clip_cfg, argv[1], progress=False)
        else:
            _, info = pretrain_vfm(vfm_cfg, argv[1], progress=False)
        return {"loaded": info["loaded"], "path": info["path"], "steps": [h["step"] for h in info["history"]]}
    raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))

"""Cost of the dense feature modes relative to ``encode_image``.

    python benchmarks/bench_dense.py                       # ViT-B-16 at 448 px, CPU, batch 1
    python benchmarks/bench_dense.py --model EVA02-B-16 --size 448 --repeats 5

Random-init weights, eval mode, ``torch.no_grad``. Timing: all cases in one process, round-robin over
``--repeats`` rounds after a warm-up (so CPU contention from other processes hits every case alike); the
table gives the median and the minimum and their ratios to ``encode_image``. Memory: each case in a fresh
subprocess, the peak resident memory *added* by one cold call (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus the resident size before the call). Target: ``dense_features(mode="x+v")``
<= 1.05x ``encode_image``.
The ``x+v@224`` case uses a model built for 224 px, so the position embedding is interpolated to the grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_added_mib, reset_peak_rss

CASES = ["encode_image", "vanilla", "x+v", "v", "qq", "csa", "naclip", "multi-v", "x+v@224"]


def build_model(name: str, size: int):
    """Random-init CLIP built for ``size`` px, eval mode: an open_clip name or a registered micro config
    (``micro-clip``, rebuilt with ``image_size=size`` so that ``encode_image`` accepts the input)."""
    import dataclasses

    import open_clip
    import torch

    from ovlib.models import MICRO_CLIP_CONFIGS

    torch.manual_seed(0)
    if name in MICRO_CLIP_CONFIGS:
        return dataclasses.replace(MICRO_CLIP_CONFIGS[name], image_size=size).build().eval()
    return open_clip.create_model(name, force_image_size=size, pretrained_text=False).eval()


def _build(args, case):
    return build_model(args.model, 224 if case.endswith("@224") else args.size)


def make_call(model, case, x):
    """A no-argument callable running ``case`` (``encode_image`` or a dense mode, ``@suffix`` ignored) on x."""
    from ovlib.models import dense_features, vit_adapter

    mode = case.split("@")[0]
    if mode == "encode_image":
        return lambda: model.encode_image(x)
    ad = vit_adapter(model)
    return lambda: dense_features(ad, x, mode)


def round_robin(calls: dict, repeats: int, warmup: int = 1, sync=None) -> dict[str, list[float]]:
    """Seconds per call of every callable, round-robin over ``repeats`` rounds after ``warmup`` calls each,
    under ``torch.no_grad`` (CPU contention from other processes hits every case alike)."""
    import torch

    times = {c: [] for c in calls}
    with torch.no_grad():
        for _ in range(warmup):
            for f in calls.values():
                f()
        for _ in range(repeats):
            for c, f in calls.items():
                if sync:
                    sync()
                t = time.perf_counter()
                f()
                if sync:
                    sync()
                times[c].append(time.perf_counter() - t)
    return times


def memory_worker(args) -> dict:
    """Peak resident memory added by one cold call of ``args.case`` (fresh process)."""
    import torch

    torch.set_num_threads(args.threads)
    model = _build(args, args.case)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    call = make_call(model, args.case, x)
    with torch.no_grad():
        try:
            before = reset_peak_rss()
            out = call()
            peak = peak_added_mib(before)
        except OSError:
            out, peak = call(), float("nan")
    return {"case": args.case, "peak_mib": peak, "shape": tuple(out.shape)}


def timing(args, cases) -> dict:
    """Round-robin timing of all cases in one process (contention hits every case alike)."""
    import torch

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    models = {}
    calls = {}
    for case in cases:
        key = "224" if case.endswith("@224") else "native"
        if key not in models:
            models[key] = _build(args, case)
        calls[case] = make_call(models[key], case, x)
    return round_robin(calls, args.repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(memory_worker(args)))
        return
    cases = args.cases.split(",")
    if "encode_image" not in cases:
        cases.insert(0, "encode_image")
    mem = {}
    if not args.no_memory:
        for case in cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--model", args.model,
                   "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads)]
            res = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if res.returncode:
                raise SystemExit(f"case {case} failed:\n{res.stderr}")
            mem[case] = json.loads(res.stdout.strip().splitlines()[-1])
    times = timing(args, cases)
    base_med = statistics.median(times["encode_image"])
    base_min = min(times["encode_image"])
    print(f"{args.model} at {args.size} px, batch {args.batch}, CPU threads {args.threads}, {args.repeats} "
          f"round-robin repeats (random-init weights)")
    print(f"{'case':<14}{'median ms':>11}{'min ms':>9}{'ratio(med)':>12}{'ratio(min)':>12}{'peak +MiB':>11}")
    for c in cases:
        med, mn = statistics.median(times[c]), min(times[c])
        pk = mem[c]["peak_mib"] if c in mem else float("nan")
        print(f"{c:<14}{1e3 * med:>11.1f}{1e3 * mn:>9.1f}{med / base_med:>12.3f}{mn / base_min:>12.3f}{pk:>11.1f}")


if __name__ == "__main__":
    main()

"""Cost of SCD and the Refiner on top of CLIPSelf, and the memory of chunked SCD.

    python benchmarks/bench_scd.py                         # micro CLIP at 160 px + SCD memory at 64x64
    python benchmarks/bench_scd.py --vitb                  # also a random ViT-B-16 at 448 px
    python benchmarks/bench_scd.py --skip-steps --grid 64 --dim 1024

Step time: one training step's forward + backward (no optimiser) of ``clipself``, ``sc-clipself`` and
``rsc-clipself`` (frozen, untrained Refiner with the paper's architecture) on the same batch, all cases in one
process round-robin over ``--repeats`` rounds after a warm-up; median and ratio to ``clipself``.
Target: <= 1.25x for both.

SCD memory: global SCD over one ``grid x grid`` token map (``L = grid^2``, ``D = dim``), loss + backward, each
case in a fresh subprocess: peak resident memory *added* by the call (Linux ``VmHWM`` after resetting it via
``/proc/self/clear_refs``, minus the resident size before the call). Naive vs chunked (``--chunk`` rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def scd_memory_case(case: str, grid: int, dim: int, chunk: int) -> dict:
    import torch

    from ovlib.methods.scd import scd_loss

    torch.manual_seed(0)
    L = grid * grid
    zs = torch.nn.functional.normalize(torch.randn(1, L, dim), dim=-1).requires_grad_(True)
    zt = torch.nn.functional.normalize(torch.randn(1, L, dim), dim=-1)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    loss = scd_loss(zs, zt, chunk=None if case == "naive" else chunk)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"case": case, "L": L, "D": dim, "chunk": chunk if case != "naive" else None,
            "peak_added_mib": (peak - before) / 1024, "time_s": dt, "loss": float(loss)}


def _batch(size: int, crop: int, B: int, K: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(B):
        xy = torch.rand(K, 2, generator=g) * size * 0.6
        wh = size * 0.1 + torch.rand(K, 2, generator=g) * size * 0.3
        boxes.append(torch.cat([xy, xy + wh], 1))
    return {"images": torch.randn(B, 3, size, size, generator=g), "boxes": boxes,
            "crops": torch.randn(B * K, 3, crop, crop, generator=g),
            "image_ids": torch.arange(B), "labels": torch.full((B * K,), -1)}


def step_times(name: str, size: int, B: int, K: int, repeats: int, refiner_kw: dict) -> dict:

    from ovlib.methods.clipself import CLIPSelf
    from ovlib.methods.refiner import Refiner
    from ovlib.methods.rsc import RSCCLIPSelf, SCCLIPSelf
    from ovlib.models import load_clip, vit_adapter

    student, _, _ = load_clip(name, seed=0)
    teacher, _, _ = load_clip(name, seed=0)
    student.train()
    crop = vit_adapter(teacher).native_grid[0] * vit_adapter(teacher).patch_size[0]
    batch = _batch(size, crop, B, K)
    methods = {
        "clipself": CLIPSelf(student, {"teacher": teacher}),
        "sc-clipself": SCCLIPSelf(student, {"teacher": teacher}),
        "rsc-clipself": RSCCLIPSelf(student, {"teacher": teacher}, refiner=Refiner(teacher, **refiner_kw)),
    }

    def step(m):
        student.zero_grad(set_to_none=True)
        out = m(batch)
        sum(out.values()).backward()

    for m in methods.values():  # warm-up
        step(m)
    times = {k: [] for k in methods}
    for _ in range(repeats):
        for k, m in methods.items():
            t0 = time.perf_counter()
            step(m)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "size": size, "batch": B, "boxes_per_image": K, "repeats": repeats,
            "median_s": med, "ratio": {k: med[k] / med["clipself"] for k in med}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vitb", action="store_true", help="also a random ViT-B-16 at 448 px")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--memory-case", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_case:
        print(json.dumps(scd_memory_case(args.memory_case, args.grid, args.dim, args.chunk)))
        return
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu")
    if not args.skip_steps:
        runs = [("micro-clip", 160, 4, 6, {"num_blocks": 2, "inter_layers": (1, 2)})]
        if args.vitb:
            runs.append(("ViT-B-16", 448, 2, 6, {"num_blocks": 4, "inter_layers": (4, 7)}))
        for name, size, B, K, kw in runs:
            r = step_times(name, size, B, K, args.repeats, kw)
            print(f"\nstep time (fwd+bwd), {name} at {size} px, batch {B} x {K} boxes, median of {args.repeats}:")
            for k in r["median_s"]:
                print(f"  {k:14s} {r['median_s'][k] * 1000:9.1f} ms   {r['ratio'][k]:.2f}x clipself")
    print(f"\nSCD (global, one {args.grid}x{args.grid} map, D={args.dim}) loss+backward, fresh process each:")
    for case in ("naive", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--memory-case", case, "--grid", str(args.grid),
                              "--dim", str(args.dim), "--chunk", str(args.chunk)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {case:8s} chunk={r['chunk']!s:5s} peak added {r['peak_added_mib']:8.1f} MiB   "
              f"time {r['time_s']:.2f} s   loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()

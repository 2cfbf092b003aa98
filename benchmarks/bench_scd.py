"""Cost of SCD and the Refiner on top of CLIPSelf, and the memory of chunked SCD.

    python benchmarks/bench_scd.py                         # micro CLIP at 160 px + SCD memory at 64x64
    python benchmarks/bench_scd.py --vitb                  # also a random ViT-B-16 at 448 px
    python benchmarks/bench_scd.py --skip-steps --grid 64 --dim 1024

Step time: one training step's forward + backward (no optimiser) of ``clipself``, ``sc-clipself`` and
``rsc-clipself`` (frozen, untrained Refiner with the paper's architecture) on the same batch, all cases in one
process round-robin over ``--repeats`` rounds after a warm-up; median and ratio to ``clipself``, each method
with the teacher-target cache (:mod:`ovlib.train.targets`; the batch is fixed, so after the warm-up every frozen
output -- crop CLS, teacher dense map, Refiner tokens -- is a hit) and without it (every frozen network runs on
every step), the ratio taken to ``clipself`` in the same setting. Target (issues 13, 22): <= 1.25x for both,
with the cache (the trainer's default).

SCD memory: global SCD over one ``grid x grid`` token map (``L = grid^2``, ``D = dim``), loss + backward, each
case in a fresh subprocess: peak resident memory *added* by the call (Linux ``VmHWM`` after resetting it via
``/proc/self/clear_refs``, minus the resident size before the call). Naive vs chunked (``--chunk`` rows),
and DeCLIP/SynCLIP's context loss on the same grid for comparison (it has no chunked path).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_added_mib, reset_peak_rss

MEMORY_CASES = ("naive", "chunked", "context")


def scd_memory_case(case: str, grid: int, dim: int, chunk: int, heads: int | None = None) -> dict:
    """Peak resident memory *added* by one loss + backward over one ``grid x grid`` token map (call it in a
    fresh process). ``naive`` / ``chunked``: global SCD (:func:`ovlib.methods.scd.scd_loss`, ``chunk`` rows per
    block) on unit tokens ``(1, L, dim)``. ``context``: DeCLIP/SynCLIP's context loss (student ``qq`` cosine
    matrix from per-head ``q (1, heads, L, dim // heads)``, ``heads = dim // 64`` by default, vs a fixed teacher
    cosine matrix), which has no chunked path. Inputs (and the teacher matrix) are built before the peak is reset."""
    import torch

    from ovlib.methods.declip import context_loss, student_context_similarity
    from ovlib.methods.scd import scd_loss

    if case not in MEMORY_CASES:
        raise ValueError(f"memory case must be one of {MEMORY_CASES}, got {case!r}")
    torch.manual_seed(0)
    L = grid * grid
    if case == "context":
        heads = heads or max(1, dim // 64)
        q = torch.randn(1, heads, L, dim // heads).requires_grad_(True)
        t = torch.nn.functional.normalize(torch.randn(1, L, dim), dim=-1)
        teacher_sim = t @ t.transpose(1, 2)  # (1, L, L)
        del t
    else:
        zs = torch.nn.functional.normalize(torch.randn(1, L, dim), dim=-1).requires_grad_(True)
        zt = torch.nn.functional.normalize(torch.randn(1, L, dim), dim=-1)
    before = reset_peak_rss()
    t0 = time.perf_counter()
    if case == "context":
        loss = context_loss(student_context_similarity({"q": q}, "qq"), teacher_sim)
    else:
        loss = scd_loss(zs, zt, chunk=None if case == "naive" else chunk)
    loss.backward()
    dt = time.perf_counter() - t0
    return {"case": case, "L": L, "D": dim, "chunk": chunk if case == "chunked" else None,
            "peak_added_mib": peak_added_mib(before), "time_s": dt, "loss": float(loss.detach())}


def memory_subprocess(case: str, grid: int, dim: int, chunk: int) -> dict:
    """:func:`scd_memory_case` in a fresh Python process (so earlier allocations do not hide the peak)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-case", case, "--grid", str(grid),
                          "--dim", str(dim), "--chunk", str(chunk)], check=False, capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"memory case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _serve_memory() -> None:
    """``--memory-server``: import torch and ovlib once, then for every request line on stdin
    (``{"case", "grid", "dim", "chunk"}``) fork a child that runs :func:`scd_memory_case` and answer one JSON
    line. The server itself computes nothing, so every child starts from the same lean, freshly imported state
    and the peak it reports is not hidden by memory an earlier measurement left behind."""
    import ovlib.methods.declip
    import ovlib.methods.scd  # noqa: F401

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                res = scd_memory_case(**req)
            except BaseException as e:  # noqa: BLE001 -- report, never raise in a forked child
                res = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, (json.dumps(res) + "\n").encode())
            os._exit(0)
        os.close(w)
        data = b""
        while True:
            part = os.read(r, 65536)
            if not part:
                break
            data += part
        os.close(r)
        os.waitpid(pid, 0)
        sys.stdout.write(data.decode() if data else json.dumps({"error": "child died"}) + "\n")
        sys.stdout.flush()


class MemoryServer:
    """Client of ``--memory-server`` (one Python start-up for many fresh-process measurements)::

        with MemoryServer() as ms:
            r = ms.measure("chunked", grid=64, dim=512, chunk=256)
    """

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--memory-server"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        return self

    def measure(self, case: str, grid: int, dim: int, chunk: int) -> dict:
        self.proc.stdin.write(json.dumps({"case": case, "grid": grid, "dim": dim, "chunk": chunk}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"memory server exited (code {self.proc.poll()}) during case {case}")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"memory case {case} failed: {res['error']}")
        return res

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


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
    from ovlib.train.targets import TargetCache

    student, _, _ = load_clip(name, seed=0)
    teacher, _, _ = load_clip(name, seed=0)
    student.train()
    crop = vit_adapter(teacher).native_grid[0] * vit_adapter(teacher).patch_size[0]
    batch = _batch(size, crop, B, K)
    refiner = Refiner(teacher, **refiner_kw)
    methods = {}
    for tag, cache in (("", None), (" +cache", TargetCache(max_mb=1024))):
        for key, m in (("clipself", CLIPSelf(student, {"teacher": teacher})),
                       ("sc-clipself", SCCLIPSelf(student, {"teacher": teacher})),
                       ("rsc-clipself", RSCCLIPSelf(student, {"teacher": teacher}, refiner=refiner))):
            m.target_cache = cache
            methods[key + tag] = m

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
            "median_s": med, "ratio": {k: med[k] / med["clipself" + k[len(k.split(" ")[0]):]] for k in med}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vitb", action="store_true", help="also a random ViT-B-16 at 448 px")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--memory-case", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    ap.add_argument("--memory-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_server:
        _serve_memory()
        return
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
                print(f"  {k:20s} {r['median_s'][k] * 1000:9.1f} ms   {r['ratio'][k]:.2f}x clipself"
                      f"{' (both with the teacher cache)' if k.endswith('+cache') else ''}")
    print(f"\nSCD (global, one {args.grid}x{args.grid} map, D={args.dim}) loss+backward, fresh process each:")
    for case in MEMORY_CASES:
        r = memory_subprocess(case, args.grid, args.dim, args.chunk)
        print(f"  {case:8s} chunk={r['chunk']!s:5s} peak added {r['peak_added_mib']:8.1f} MiB   "
              f"time {r['time_s']:.2f} s   loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()

"""SynCLIP training-step time relative to DeCLIP on the same batch (target: SynCLIP <= 1.3x DeCLIP).

    python benchmarks/bench_synclip.py                     # micro CLIP + micro VFM, 160 px, batch 8, CPU
    python benchmarks/bench_synclip.py --batch 4 --boxes 10 --repeats 7 --device cuda

One step = the method's forward (all loss terms), the weighted sum, backward and an AdamW step on the
student. Random-init micro networks (the cost does not depend on the weights); a fixed batch: ``--batch``
images of ``--size`` px, ``--boxes`` GT boxes per image with 64-px teacher crops, the VFM proxy image on the
same grid, ``--labels`` image labels per image drawn from the micro world's classes (with synonyms and
definitions). Cases, round-robin over ``--repeats`` rounds after a warm-up so that CPU contention hits all
alike: ``declip-qq`` (DeCLIP ``main``), ``declip-csa`` (the same last block as SynCLIP), ``synclip``
(code reading: huber_kl, SAR k=7), ``synclip-nosar``, and ``clipself`` (issue 22's reference: DeCLIP and SynCLIP
<= 1.3x CLIPSelf); each case without and with (``+cache``) the teacher-target cache (:mod:`ovlib.train.targets`,
the trainer's default; the batch is fixed, so after the warm-up every frozen output -- crop CLS, VFM features,
the teacher's csa map -- is a hit). Prints the median and minimum per case and the ratios to ``declip-csa``,
``declip-qq`` and ``clipself`` in the same cache setting; ``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

BASE_CASES = ["clipself", "declip-qq", "declip-csa", "synclip", "synclip-nosar"]
CACHE_TAGS = ("", "+cache")
CASES = [c + t for t in CACHE_TAGS for c in BASE_CASES]


def build_batch(args, world, device):
    import torch


    g = torch.Generator().manual_seed(0)
    B, S, K = args.batch, args.size, args.boxes
    xy = torch.rand(B, K, 2, generator=g) * S * 0.6
    wh = 8 + torch.rand(B, K, 2, generator=g) * S * 0.35
    ids = [c.id for c in world.classes]
    labels = [torch.tensor(sorted({ids[int(i)] for i in torch.randint(len(ids), (args.labels,), generator=g)}))
              for _ in range(B)]
    grid = S // 8
    return {"images": torch.randn(B, 3, S, S, generator=g).to(device),
            "boxes": [torch.cat([xy[b], (xy[b] + wh[b]).clamp(max=S)], 1).to(device) for b in range(B)],
            "crops": torch.randn(B * K, 3, 64, 64, generator=g).to(device),
            "image_labels": labels,
            "vfm_images": torch.randn(B, 3, grid * 8, grid * 8, generator=g).to(device)}


def make_step(case, student, teacher, vfm, tok, cats, cache=None):
    import torch

    from ovlib.methods.clipself import CLIPSelf
    from ovlib.methods.declip import DeCLIP
    from ovlib.methods.synclip import SynCLIP

    s = copy.deepcopy(student)
    frozen = {"teacher": teacher, "vfm": vfm}
    if case == "clipself":
        m, w = CLIPSelf(s, {"teacher": teacher}), {"rla": 1.0}
    elif case == "declip-qq":
        m, w = DeCLIP(s, frozen, mode="qq"), {"content": 1.0, "context": 0.1}
    elif case == "declip-csa":
        m, w = DeCLIP(s, frozen, mode="csa"), {"content": 1.0, "context": 0.25}
    else:
        m = SynCLIP(s, frozen, tokenizer=tok, categories=cats, sar=case == "synclip")
        w = {"content": 1.0, "context": 0.25, "semantic": 0.1}
    m.train()
    m.target_cache = cache
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6)

    def step(batch):
        out = m(batch)
        loss = sum(w[k] * v for k, v in out.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--boxes", type=int, default=10)
    p.add_argument("--labels", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from ovlib.data.microworld import MicroWorld
    from ovlib.models import load_clip, load_vfm
    from ovlib.train.targets import TargetCache

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    world = MicroWorld(seed=0)
    cats = [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms), "definition": c.definition}
            for c in world.classes]
    student, tok, _ = load_clip("micro-clip", seed=0, device=dev)
    teacher, _, _ = load_clip("micro-clip", seed=0, device=dev)
    vfm = load_vfm("micro-vfm", seed=1, device=dev)
    batch = build_batch(args, world, dev)
    cache = TargetCache(max_mb=1024)
    steps = {c + t: make_step(c, student, teacher, vfm, tok, cats, cache if t else None)
             for t in CACHE_TAGS for c in BASE_CASES}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for c in CASES:  # warm-up (also fills SynCLIP's text cache, a one-off cost)
        steps[c](batch)
    times = {c: [] for c in CASES}
    cpu = {c: [] for c in CASES}  # process CPU seconds: less sensitive than wall time to other processes
    for _ in range(args.repeats):
        for c in CASES:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[c](batch)
            sync()
            times[c].append(time.perf_counter() - t0)
            cpu[c].append(time.process_time() - c0)
    med = {c: statistics.median(v) for c, v in times.items()}
    mn = {c: min(v) for c, v in times.items()}
    mcpu = {c: statistics.median(v) for c, v in cpu.items()}
    print(f"device={dev} size={args.size} batch={args.batch} boxes/img={args.boxes} labels/img<={args.labels} "
          f"repeats={args.repeats} threads={args.threads}")
    print(f"{'case':<21}{'median s':>10}{'min s':>10}{'cpu s':>10}{'med/declip-csa':>16}{'min/declip-csa':>16}"
          f"{'cpu/declip-csa':>16}{'med/declip-qq':>15}{'med/clipself':>14}")
    for c in CASES:
        t = c[len(c.split("+")[0]):]  # the cache tag: ratios within the same setting
        print(f"{c:<21}{med[c]:>10.4f}{mn[c]:>10.4f}{mcpu[c]:>10.3f}{med[c] / med['declip-csa' + t]:>16.3f}"
              f"{mn[c] / mn['declip-csa' + t]:>16.3f}{mcpu[c] / mcpu['declip-csa' + t]:>16.3f}"
              f"{med[c] / med['declip-qq' + t]:>15.3f}{med[c] / med['clipself' + t]:>14.3f}")
    ratio = med["synclip"] / med["declip-csa"]
    print(f"SynCLIP / DeCLIP(csa) median step time: {ratio:.3f}x (target <= 1.3x): "
          f"{'PASS' if ratio <= 1.3 else 'MISS'}; CPU-time ratio {mcpu['synclip'] / mcpu['declip-csa']:.3f}x")
    for m in ("declip-qq", "synclip"):
        r = med[m + "+cache"] / med["clipself+cache"]
        print(f"{m} / clipself with the teacher cache (the trainer's default): {r:.3f}x (target <= 1.3x): "
              f"{'PASS' if r <= 1.3 else 'MISS'}; without it {med[m] / med['clipself']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": med, "min_s": mn, "cpu_s": mcpu,
                       "ratio_synclip_declip_csa": ratio}, f, indent=1)
    return ratio


if __name__ == "__main__":
    main()

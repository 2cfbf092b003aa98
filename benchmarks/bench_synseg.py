"""SynSeg model: parameters, latency and FPS of one image at batch 1 (paper 002, Table I: 151M, 14 ms, 71 FPS
on an RTX 4090 -- the paper's numbers, printed beside ours for scale, not comparable hardware).

    python benchmarks/bench_synseg.py                       # micro CLIP, 34 micro-world classes, CPU
    python benchmarks/bench_synseg.py --classes 20 --repeats 20 --threads 2
    python benchmarks/bench_synseg.py --vit-b               # also a random ViT-B/16 at 224 px (slow on CPU)

Random-init weights (the cost does not depend on them), eval mode, ``torch.no_grad``. One "image" =
:func:`ovlib.methods.synseg.predict_probs` on a ``--size`` px image with ``--classes`` text anchors: the
five-view strategy (4 quadrants + the whole image, one batch of 5; the CLIP runs once per view, the decoder
once per (view, class) pair) and the single view. Cases run round-robin over ``--repeats`` rounds after a
warm-up; the table gives the median and min-max of wall time, the median process-CPU time, and FPS =
1 / median wall time. Parameters: total (frozen CLIP, both towers), the image tower, and the trainable part
(FiLM + reduces + transformer layers + upsampling + FSS projector).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PAPER = {"params_M": 151, "latency_ms": 14, "fps": 71}  # Table I, RTX 4090, ViT-B/16 at 224 px


def build(name: str, classes: int, size: int):
    import torch

    from ovlib.methods.synseg import SynSeg

    cats = [{"id": i + 1, "name": f"class {i}"} for i in range(classes)]
    if name.startswith("micro"):
        from ovlib.models import load_clip

        clip, _, _ = load_clip(name, seed=0)
    else:
        import open_clip

        torch.manual_seed(0)
        clip = open_clip.create_model(name, pretrained=None).eval()
    torch.manual_seed(0)
    model = SynSeg(clip, {}, tokenizer=None, categories=cats).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(classes, model.text_bank.shape[1], generator=g), dim=-1)
    image = torch.rand(3, size, size, generator=g)
    return model, text, image


def count(model) -> dict[str, float]:
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.student.visual.parameters())
    train = sum(p.numel() for p in model.decoder.parameters())
    return {"total_M": total / 1e6, "image_tower_M": visual / 1e6, "trainable_M": train / 1e6}


def measure(model, text, image, repeats: int) -> dict[str, dict[str, float]]:
    import torch

    from ovlib.methods.synseg import predict_probs

    cases = {"5 views": 5, "1 view": 1}
    for v in cases.values():  # warm-up
        predict_probs(model, image, text, views=v)
    wall = {c: [] for c in cases}
    cpu = {c: [] for c in cases}
    with torch.no_grad():
        for _ in range(repeats):
            for c, v in cases.items():
                t0, c0 = time.perf_counter(), time.process_time()
                predict_probs(model, image, text, views=v)
                wall[c].append(time.perf_counter() - t0)
                cpu[c].append(time.process_time() - c0)
    out = {}
    for c in cases:
        med = statistics.median(wall[c])
        out[c] = {"median_ms": 1e3 * med, "min_ms": 1e3 * min(wall[c]), "max_ms": 1e3 * max(wall[c]),
                  "cpu_ms": 1e3 * statistics.median(cpu[c]), "fps": 1.0 / med, "n": len(wall[c])}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=34, help="text anchors per image (micro world: 34)")
    p.add_argument("--size", type=int, default=160, help="image side in px before the views")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vit-b", action="store_true", help="also ViT-B-16 (random init) at 448 px, 224-px views")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    runs = [("micro CLIP", "micro-clip", args.size)]
    if args.vit_b:
        runs.append(("ViT-B/16", "ViT-B-16", 448))
    print(f"device=cpu threads={args.threads} classes={args.classes} repeats={args.repeats} batch=1 image")
    print(f"paper (Table I, RTX 4090, ViT-B/16): {PAPER['params_M']}M params, {PAPER['latency_ms']} ms, "
          f"{PAPER['fps']} FPS")
    results = {}
    for label, name, size in runs:
        model, text, image = build(name, args.classes, size)
        n = count(model)
        t = measure(model, text, image, args.repeats)
        results[label] = {"params": n, "timing": t, "size": size, "input_size": model.input_size}
        print(f"\n{label}: {size}-px image, {model.input_size}-px CLIP views; params total {n['total_M']:.2f}M "
              f"(image tower {n['image_tower_M']:.2f}M), trainable {n['trainable_M']:.3f}M")
        print(f"{'case':<10}{'median ms':>11}{'min-max ms':>17}{'cpu ms':>9}{'FPS':>8}")
        for c, r in t.items():
            print(f"{c:<10}{r['median_ms']:>11.1f}{r['min_ms']:>8.1f}-{r['max_ms']:<8.1f}{r['cpu_ms']:>9.1f}"
                  f"{r['fps']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "paper": PAPER, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()

"""Pre-training throughput on this machine: matmul peak (fp32/bf16), micro CLIP train step fp32 vs bf16
autocast, data stream samples/s with 0 vs 1 DataLoader workers, the resulting MFU, and real ``pretrain_clip``
runs end to end on the paths of :data:`PIPELINE_VARIANTS` (``inline`` rendering and the full text context, the
old path, vs pre-rendered ``shards`` with the full or the trimmed text context).

    python benchmarks/bench_pretrain.py [--batch 128] [--steps 6] [--skip-data] [--skip-steps] [--rounds 3]
    python benchmarks/bench_pretrain.py --rounds 1 --block 359 --variants inline,shards --skip-steps  # whole runs

Prints measured numbers and ratios of one run (no assertions; timings vary with the machine's load).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ovlib.models import load_clip
from ovlib.train.pretrain import clip_loss, clip_train_flops_per_sample, matmul_peak


def time_steps(model, tokenizer, batch: int, steps: int, bf16: bool, size: int = 64) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, size, size, generator=g)
    tok = tokenizer([f"a photo of a red thing number {i}" for i in range(batch)])
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            a = F.normalize(model.encode_image(imgs), dim=-1)
            b = F.normalize(model.encode_text(tok), dim=-1)
        loss = clip_loss(a, b, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def time_stream(batch: int, n_batches: int, workers: int, size: int = 64) -> float:
    from ovlib.train.pretrain import _stream_loader

    it = _stream_loader(0, size, batch, 0, workers)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return batch * n_batches / (time.perf_counter() - t0)


#: The pre-training paths ``pipeline_rounds`` times: name -> (data_pipeline, text_context). ``inline`` is the old
#: path (scenes rendered in the loop, the text tower over all its positions); ``shards`` the current default
#: (pre-rendered shards, the text tower trimmed to each batch's last end-of-text token); ``shards-full`` separates
#: the two changes.
PIPELINE_VARIANTS = {"inline": ("inline", "full"), "shards-full": ("shards", "full"), "shards": ("shards", "trim")}


def pipeline_rounds(cfg, rounds: int, block: int, log=lambda msg: None,
                    variants: tuple[str, ...] = tuple(PIPELINE_VARIANTS)) -> dict[str, list[float]]:
    """``rounds`` back-to-back rounds of real micro CLIP pre-trainings (``pretrain_clip``, fresh temporary
    cache each, ``1 + block`` steps of ``cfg``), one per variant (names of :data:`PIPELINE_VARIANTS`). Per round:

    * ``inline``: samples/s of steps 2 .. 1+block (scene rendering, captioning, tokenisation in the loop; the
      full text context): the old path;
    * ``shards-full`` / ``shards``: the same steps reading pre-rendered shards (the optimiser loop alone), with
      the full / the trimmed text context;
    * ``shards-full+render`` / ``shards+render``: those with the shard rendering of the run charged to the steps
      in proportion (``data_seconds * block / steps``; in these short runs that includes the start of the render
      processes, which a real run spreads over all its steps: the figure is a lower bound of the long-run rate);
    * ``render_s``: that rendering time (``info["data_seconds"]``, the ``shards`` runs), ``text_len``: the mean
      text positions of their timed steps (``info["history"]``), and ``bf16``: the runs' precision."""
    import dataclasses
    import tempfile

    from ovlib.train.pretrain import pretrain_clip

    cfg = dataclasses.replace(cfg, steps=1 + block, warmup=1, ckpt_every=10 ** 9)
    B = cfg.batch_size
    unknown = set(variants) - set(PIPELINE_VARIANTS)
    if unknown:
        raise ValueError(f"unknown pipeline variants {sorted(unknown)}; known: {list(PIPELINE_VARIANTS)}")
    out: dict[str, list[float]] = {"render_s": [], "text_len": [], "bf16": []}
    for name in variants:
        out[name] = []
        if name != "inline":
            out[f"{name}+render"] = []
    for r in range(rounds):
        for name in variants:
            pipe, text = PIPELINE_VARIANTS[name]
            run_cfg = dataclasses.replace(cfg, data_pipeline=pipe, text_context=text)
            with tempfile.TemporaryDirectory(prefix="ovbook-bench-pretrain-") as cache:
                _, _, info = pretrain_clip(run_cfg, cache, progress=False)
            secs = [h["seconds"] for h in info["history"]]  # cumulative; step 1 holds warm-up and rendering
            dt = secs[-1] - secs[0]
            out[name].append(block * B / dt)
            if pipe == "shards":
                out[f"{name}+render"].append(block * B / (dt + info["data_seconds"] * block / cfg.steps))
            if name == "shards":
                out["render_s"].append(info["data_seconds"])
                lens = [h["text_len"] for h in info["history"][1:]]
                out["text_len"].append(sum(lens) / len(lens))
            out["bf16"].append(float(bool(info["bf16"])))
        log(f"pretrain round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {out[n][-1]:.0f}" + (f" ({out[n + '+render'][-1]:.0f} with rendering)" if n != "inline" else "")
            for n in variants) + " samples/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--skip-steps", action="store_true",
                    help="no synthetic fp32/bf16 step timings (bf16 is very slow on a CPU without bf16 instructions); "
                    "the stream section, which compares with them, is left out too")
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end pretrain_clip rounds per pipeline (0: none)")
    ap.add_argument("--block", type=int, default=3, help="timed steps per end-to-end run (after one warm-up step); "
                    "359 times the micro CLIP's whole 360-step run")
    ap.add_argument("--variants", default=",".join(PIPELINE_VARIANTS),
                    help=f"comma-separated names of {list(PIPELINE_VARIANTS)}")
    a = ap.parse_args()
    torch.manual_seed(0)
    p32 = matmul_peak(torch.float32)
    p16 = matmul_peak(torch.bfloat16)
    print(f"threads {torch.get_num_threads()}  matmul peak fp32 {p32 / 1e9:.1f} GFLOP/s  bf16 {p16 / 1e9:.1f} GFLOP/s "
          f"(bf16/fp32 {p16 / p32:.2f}x)")
    model, tok, _ = load_clip("micro-clip")
    fps = clip_train_flops_per_sample(model, tok, 64)
    print(f"micro-clip training FLOPs/sample (3x forward, matmuls) {fps / 1e6:.1f} MFLOP")
    if not a.skip_steps:
        s32 = time_steps(model, tok, a.batch, a.steps, bf16=False)
        s16 = time_steps(model, tok, a.batch, a.steps, bf16=True)
        print(f"train step, synthetic batch {a.batch}: fp32 {s32:.0f} samples/s (MFU {100 * s32 * fps / p32:.1f} % of "
              f"the fp32 peak); bf16 autocast {s16:.0f} samples/s; bf16/fp32 {s16 / s32:.2f}x")
    if not a.skip_data and not a.skip_steps:
        d0 = time_stream(a.batch, 3, 0)
        d1 = time_stream(a.batch, 3, 1)
        best = max(s32, s16)
        print(f"micro-world stream alone: {d0:.0f} samples/s with 0 workers, {d1:.0f} with 1 worker (ratio "
              f"{d1 / d0:.2f}); best train step {best:.0f} samples/s -> with in-process data (0 workers) the "
              f"end-to-end rate is ~{1 / (1 / best + 1 / d0):.0f} samples/s")
    if a.rounds:
        from dataclasses import replace
        from statistics import median

        from ovlib.train.pretrain import pretrain_configs

        cfg = replace(pretrain_configs("micro")[0], batch_size=a.batch)
        variants = tuple(v for v in a.variants.split(",") if v)
        r = pipeline_rounds(cfg, a.rounds, a.block, log=print, variants=variants)
        old = median(r["inline"])
        print(f"pretrain_clip end to end, batch {a.batch}, median of {a.rounds} rounds: inline {old:.0f} samples/s; "
              + "; ".join(f"{n} {median(r[n]):.0f} ({median(r[n]) / old:.2f}x), with rendering amortised "
                          f"{median(r[n + '+render']):.0f} ({median(r[n + '+render']) / old:.2f}x)"
                          for n in variants if n != "inline"))


if __name__ == "__main__":
    main()

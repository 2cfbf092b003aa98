"""Pre-training throughput on this machine: matmul peak (fp32/bf16), micro CLIP train step fp32 vs bf16
autocast, data stream samples/s with 0 vs 1 DataLoader workers, the resulting MFU, and real ``pretrain_clip``
runs end to end under both data pipelines (``inline`` rendering vs pre-rendered ``shards``).

    python benchmarks/bench_pretrain.py [--batch 128] [--steps 6] [--skip-data] [--rounds 3]

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


def pipeline_rounds(cfg, rounds: int, block: int, log=lambda msg: None) -> dict[str, list[float]]:
    """``rounds`` back-to-back pairs of real micro CLIP pre-trainings (``pretrain_clip``, fresh temporary cache
    each, ``1 + block`` steps of ``cfg``) under the ``inline`` and the ``shards`` data pipeline. Per round:

    * ``inline``: samples/s of steps 2 .. 1+block (scene rendering, captioning, tokenisation in the loop);
    * ``shards``: the same steps reading pre-rendered shards (the optimiser loop alone);
    * ``shards+render``: ``shards`` with the shard rendering of the run charged to the steps in proportion
      (``data_seconds * block / steps``): the long-run end-to-end rate of the new pipeline;
    * ``render_s``: that rendering time (``info["data_seconds"]``) and ``bf16``: the run's precision."""
    import dataclasses
    import tempfile

    from ovlib.train.pretrain import pretrain_clip

    cfg = dataclasses.replace(cfg, steps=1 + block, warmup=1, ckpt_every=10 ** 9)
    B = cfg.batch_size
    out: dict[str, list[float]] = {"inline": [], "shards": [], "shards+render": [], "render_s": [], "bf16": []}
    for r in range(rounds):
        for pipe in ("inline", "shards"):
            with tempfile.TemporaryDirectory(prefix="ovbook-bench-pretrain-") as cache:
                _, _, info = pretrain_clip(dataclasses.replace(cfg, data_pipeline=pipe), cache, progress=False)
            secs = [h["seconds"] for h in info["history"]]  # cumulative; step 1 holds warm-up and rendering
            dt = secs[-1] - secs[0]
            out[pipe].append(block * B / dt)
            if pipe == "shards":
                out["shards+render"].append(block * B / (dt + info["data_seconds"] * block / cfg.steps))
                out["render_s"].append(info["data_seconds"])
            out["bf16"].append(float(bool(info["bf16"])))
        log(f"pretrain round {r + 1}/{rounds}: inline {out['inline'][-1]:.0f}, shards {out['shards'][-1]:.0f} "
            f"({out['shards+render'][-1]:.0f} with rendering) samples/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end pretrain_clip rounds per pipeline (0: none)")
    ap.add_argument("--block", type=int, default=3, help="timed steps per end-to-end run (after one warm-up step)")
    a = ap.parse_args()
    torch.manual_seed(0)
    p32 = matmul_peak(torch.float32)
    p16 = matmul_peak(torch.bfloat16)
    print(f"threads {torch.get_num_threads()}  matmul peak fp32 {p32 / 1e9:.1f} GFLOP/s  bf16 {p16 / 1e9:.1f} GFLOP/s "
          f"(bf16/fp32 {p16 / p32:.2f}x)")
    model, tok, _ = load_clip("micro-clip")
    fps = clip_train_flops_per_sample(model, tok, 64)
    print(f"micro-clip training FLOPs/sample (3x forward, matmuls) {fps / 1e6:.1f} MFLOP")
    s32 = time_steps(model, tok, a.batch, a.steps, bf16=False)
    s16 = time_steps(model, tok, a.batch, a.steps, bf16=True)
    print(f"train step, synthetic batch {a.batch}: fp32 {s32:.0f} samples/s (MFU {100 * s32 * fps / p32:.1f} % of the "
          f"fp32 peak); bf16 autocast {s16:.0f} samples/s; bf16/fp32 {s16 / s32:.2f}x")
    if not a.skip_data:
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
        r = pipeline_rounds(cfg, a.rounds, a.block, log=print)
        old, new, amort = median(r["inline"]), median(r["shards"]), median(r["shards+render"])
        print(f"pretrain_clip end to end, batch {a.batch}, median of {a.rounds} rounds: inline {old:.0f} samples/s, "
              f"shards {new:.0f} ({new / old:.2f}x), shards with rendering amortised {amort:.0f} ({amort / old:.2f}x)")


if __name__ == "__main__":
    main()

"""Pre-training throughput on this machine: matmul peak (fp32/bf16), micro CLIP train step fp32 vs bf16
autocast, data stream samples/s with 0 vs 1 DataLoader workers, and the resulting MFU.

    python benchmarks/bench_pretrain.py [--batch 128] [--steps 6] [--skip-data]

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-data", action="store_true")
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


if __name__ == "__main__":
    main()

"""A tiny, fully seeded distillation setup (micro CLIP, synthetic images/boxes/crops) for trainer tests.

Run as a script under torchrun it trains and writes the final student weights:
``python -m torch.distributed.run --nproc-per-node 2 tests/helpers/synthetic_distill.py OUT_DIR STEPS BATCH``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ovlib.methods import CLIPSelf
from ovlib.models import load_clip
from ovlib.train.distill import DistillConfig, Trainer, lock_visual


class SyntheticRegions(torch.utils.data.Dataset):
    """Random 32-px images with exactly ``boxes_per_image`` boxes (so per-rank region means equal the global mean)."""

    def __init__(self, n: int = 32, size: int = 32, crop: int = 64, boxes_per_image: int = 2, seed: int = 0):
        self.n, self.size, self.crop, self.k, self.seed, self.epoch = n, size, crop, boxes_per_image, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_000 + self.epoch * 10_000 + i)
        img = torch.randn(3, self.size, self.size, generator=g)
        xy = torch.rand(self.k, 2, generator=g) * self.size * 0.5
        wh = 4 + torch.rand(self.k, 2, generator=g) * self.size * 0.45
        boxes = torch.cat([xy, xy + wh], 1)  # (K, 4) xyxy px
        crops = torch.randn(self.k, 3, self.crop, self.crop, generator=g)
        return {"image": img, "boxes": boxes, "crops": crops}


def collate(items: list[dict]) -> dict:
    return {"images": torch.stack([it["image"] for it in items]),  # (B, 3, S, S)
            "boxes": [it["boxes"] for it in items],  # B x (K, 4)
            "crops": torch.cat([it["crops"] for it in items])}  # (R, 3, c, c)


def build(cfg: DistillConfig, model_seed: int = 0, n: int = 32) -> Trainer:
    torch.manual_seed(model_seed)
    student, _, _ = load_clip("micro-clip")
    torch.manual_seed(model_seed)
    teacher, _, _ = load_clip("micro-clip")
    lock_visual(student, cfg.unlocked_blocks, cfg.lock_style)
    method = CLIPSelf(student, {"teacher": teacher})
    return Trainer(cfg, method, SyntheticRegions(n=n), collate, teacher_state=teacher.state_dict())


def small_config(out_dir: str, **kw) -> DistillConfig:
    base = dict(out_dir=out_dir, batch_size=4, max_steps=6, lr=1e-3, warmup_steps=2, amp="none", device="cpu",
                log_every=1, seed=0, weight_decay=0.1)
    base.update(kw)
    return DistillConfig(**base)


if __name__ == "__main__":
    out, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tr = build(small_config(out, batch_size=batch, max_steps=steps))
    tr.fit(resume=False)
    if tr.info.is_main:
        torch.save(tr.method.state_dict(), Path(out) / "final_weights.pt")

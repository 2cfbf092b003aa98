"""F-ViT (ovlib.methods.fvit) and its training loop (ovlib.train.detect): math, wiring, training, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovlib.data.detection import DetectionDataset, vocab_split
from ovlib.data.microworld import ensure_microworld
from ovlib.methods.fvit import FViT, FViTConfig, default_out_indices, fvit_cls_loss, l1_box_loss, ov_ensemble
from ovlib.models import load_clip
from ovlib.models.dense import dense_features
from ovlib.train.detect import DetectorTrainConfig, batch_indices, hflip, train_detector

#: a small F-ViT on the micro CLIP (4 blocks, patch 8): levels at strides 8, 16 (+ the pooled 32)
SMALL = dict(out_indices=(2, 3), scales=(1.0, 0.5), fpn_channels=32, head_convs=2, head_fcs=(64, 64),
             rpn_pre_nms=300, rpn_post_nms=100, roi_batch=32, rpn_batch=64, anchor_scale=4.0)


@pytest.fixture(scope="module")
def clip():
    model, tok, _ = load_clip("micro-clip", seed=0)
    return model.eval(), tok


def _vocab(D, C, novel=()):
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    bg = F.normalize(torch.randn(D, generator=g), dim=-1)
    return text, bg, [i in novel for i in range(C)]


# ------------------------------------------------------------------------------------------ pure functions
def test_ov_ensemble_hand_case():
    p_det = torch.tensor([[0.5, 0.3, 0.2]])
    p_vlm = torch.tensor([[0.1, 0.2, 0.7]])
    novel = torch.tensor([False, False, True])
    got = ov_ensemble(p_det, p_vlm, novel, alpha=0.1, beta=0.8)
    want = [0.5 ** 0.9 * 0.1 ** 0.1, 0.3 ** 0.9 * 0.2 ** 0.1, 0.2 ** 0.2 * 0.7 ** 0.8]
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    assert ov_ensemble(p_det, p_vlm, novel, 0.0, 0.0)[0].tolist() == pytest.approx(p_det[0].tolist())  # detector only
    assert ov_ensemble(p_det, p_vlm, novel, 1.0, 1.0)[0].tolist() == pytest.approx(p_vlm[0].tolist())  # VLM only
    with pytest.raises(ValueError, match="background"):
        ov_ensemble(p_det, p_vlm, torch.tensor([True, False, False]), 0.1, 0.8)


def test_fvit_cls_loss_is_weighted_ce_over_the_sampled_rois():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1]])
    labels = torch.tensor([0, 1, 2])
    nll = -torch.log_softmax(logits, -1)[torch.arange(3), labels]
    want = (0.6 * nll[0] + nll[1] + nll[2]) / 3  # background weight 0.6, divided by the RoI count
    assert float(fvit_cls_loss(logits, labels, 0.6)) == pytest.approx(float(want), rel=1e-6)
    d, t = torch.tensor([[1.0, 2, 3, 4], [5, 5, 5, 5]]), torch.zeros(2, 4)
    assert float(l1_box_loss(d, t, torch.tensor([True, False]), 4)) == pytest.approx(10 / 4)


def test_default_out_indices():
    assert default_out_indices(12) == (3, 5, 7, 11)  # CLIPSelf's F-ViT ViT-B/16
    assert default_out_indices(24) == (7, 11, 15, 23)  # ... and its ViT-L/14 config
    assert default_out_indices(4) == (0, 1, 2, 3)
    assert default_out_indices(3) == (0, 1, 2)


def test_level_mapping_matches_mmdet_finest_scale():
    """torchvision's level mapper with canonical scale 14 x patch at level log2(patch) sends boxes to the levels
    mmdet's ``finest_scale=56`` (patch 16; 28 for patch 8) does."""
    from torchvision.ops.poolers import LevelMapper

    for patch, k_min in ((16, 2), (8, 1)):  # finest level: stride patch / 4 (scale 4)
        mapper = LevelMapper(k_min, k_min + 3, canonical_scale=14 * patch, canonical_level=int(math.log2(patch)))
        sizes = torch.linspace(4, 60 * patch, 400)
        boxes = torch.stack([torch.zeros_like(sizes), torch.zeros_like(sizes), sizes, sizes], 1)
        got = mapper([boxes]).numpy()
        finest = 56 * patch / 16
        want = np.clip(np.floor(np.log2(sizes.numpy() / finest + 1e-6)), 0, 3)
        # mmdet levels count from the finest map; torchvision's from k_min
        assert (got == want).mean() > 0.99  # equal but at the exact boundaries (eps conventions)


def test_ensemble_uses_beta_on_novel_columns_only(clip):
    model, _ = clip
    det = FViT(model, FViTConfig(**SMALL, score_thresh=0.0)).eval()
    D = det.backbone.adapter.out_dim
    text, bg, novel = _vocab(D, 3, novel=(2,))
    det.set_vocabulary(text, bg, novel)
    assert det.vocab_size == 3 and det.roi_heads.novel.tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="do not fit"):
        det.set_vocabulary(text, bg, [False])


# ------------------------------------------------------------------------------------------------ wiring
def test_backbone_taps_are_the_towers_own_block_outputs(clip):
    model, _ = clip
    det = FViT(model, FViTConfig(**{**SMALL, "dense_mode": "x+v"}))
    ad = det.backbone.adapter
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps, vlm = det.backbone(x)
        ref_vlm = dense_features(ad, x, "x+v", normalize=True)
        tok, grid = ad.embed(x)
        tok = ad.run_blocks(tok, 0, 3, ad.rope(grid))  # the input of the last block = output of block 2
    assert torch.allclose(vlm, ref_vlm, atol=1e-6)
    assert vlm.shape == (2, ad.out_dim, 8, 12)
    assert list(maps) == ["0", "1", "pool"]
    assert maps["0"].shape == (2, 32, 8, 12) and maps["1"].shape == (2, 32, 4, 6) and maps["pool"].shape[-2:] == (2, 3)
    # the tap of block 2, read by a hook, is the tower's own block-2 output (before the pyramid)
    taps = {}
    h = det.backbone.resample[0].register_forward_pre_hook(lambda m, inp: taps.setdefault("b2", inp[0]))
    with torch.no_grad():
        det.backbone(x)
    h.remove()
    want = tok[:, ad.num_prefix:].transpose(1, 2).reshape(2, -1, 8, 12)
    assert torch.allclose(taps["b2"], want, atol=1e-6)


def test_clip_stays_frozen_and_out_of_the_checkpoint(clip):
    model, _ = clip
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    det = FViT(model, FViTConfig(**SMALL)).train()
    text, bg, novel = _vocab(det.backbone.adapter.out_dim, 3)
    det.set_vocabulary(text, bg, novel)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([2])}] * 2
    losses = det(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.1)
    sum(losses.values()).backward()
    opt.step()
    assert all(p.grad is None for p in model.visual.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.visual.state_dict().items())
    assert not model.visual.training  # the tower stays in eval mode inside a training detector
    state = det.trainable_state()
    assert state and not any(k.startswith("backbone.visual.") for k in state)
    det2 = FViT(model, FViTConfig(**SMALL))
    det2.load_trainable_state(state)
    with pytest.raises(ValueError, match="do not fit"):
        det2.load_trainable_state({"nonsense": torch.zeros(1)})


def test_eval_outputs_labels_in_the_vocabulary(clip):
    model, _ = clip
    det = FViT(model, FViTConfig(**SMALL, score_thresh=0.0, detections=20)).eval()
    text, bg, novel = _vocab(det.backbone.adapter.out_dim, 5, novel=(3, 4))
    det.set_vocabulary(text, bg, novel)
    with torch.no_grad():
        out = det([torch.rand(3, 80, 112), torch.rand(3, 96, 96)])
    assert len(out) == 2 and all(len(o["boxes"]) == 20 for o in out)
    for o, (h, w) in zip(out, ((80, 112), (96, 96))):
        assert int(o["labels"].min()) >= 1 and int(o["labels"].max()) <= 5
        assert float(o["boxes"][:, [0, 2]].max()) <= w and float(o["boxes"][:, [1, 3]].max()) <= h
        assert float(o["scores"].max()) <= 1.0


def test_bad_config_is_a_clear_error(clip):
    with pytest.raises(ValueError, match="dense_mode"):
        FViTConfig(dense_mode="nope")
    with pytest.raises(ValueError, match="powers of 2"):
        FViTConfig(scales=(3.0, 1.0, 0.5, 0.25))
    with pytest.raises(ValueError, match="taps"):
        FViT(clip[0], FViTConfig(scales=(1.0, 0.5)))  # 4 default taps of the 4-block micro CLIP, 2 scales


# ------------------------------------------------------------------------------------------------ training
def test_batch_indices_are_epoch_permutations():
    seen = [i for s in range(5) for i in batch_indices(10, 4, s, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(10, 4, 2, seed=3) == batch_indices(10, 4, 2, seed=3)
    assert batch_indices(10, 4, 0, seed=3) != batch_indices(10, 4, 0, seed=4)


def test_hflip_mirrors_boxes():
    x = torch.arange(12.0).reshape(1, 3, 4).expand(3, 3, 4)
    y, t = hflip(x, {"boxes": torch.tensor([[0.0, 1.0, 1.0, 2.0]]), "labels": torch.tensor([1])})
    assert torch.equal(y[0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert t["boxes"].tolist() == [[3.0, 1.0, 4.0, 2.0]]


@pytest.fixture(scope="module")
def base_data(tmp_path_factory):
    root = ensure_microworld(tmp_path_factory.mktemp("fvit"), "train2017", n=12, size=96, seed=0, progress=False)
    sp = vocab_split(json.loads((root / "annotations" / "instances_train2017.json").read_text())["categories"],
                     "field")
    return root, sp, DetectionDataset(root, "train2017", keep=sp.base, novel=sp.novel)


@pytest.mark.slow
def test_detector_trains_at_smoke_and_its_loss_falls(clip, base_data, tmp_path):
    model, tok = clip
    root, sp, ds = base_data
    text, bg, _ = _vocab(model.visual.proj.shape[1], len(sp.base))
    cfg = DetectorTrainConfig(clip="random-0", data="test", fvit=FViTConfig(**SMALL), steps=16, batch_size=4,
                              lr=1e-3, warmup=2, ckpt_every=8)
    det, info = train_detector(cfg, model, ds, text, bg, tmp_path, progress=False)
    loss = [h["loss"] for h in info["history"]]
    assert len(loss) == 16 and all(math.isfinite(v) for v in loss)
    assert np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4])
    assert not det.training
    det2, info2 = train_detector(cfg, model, ds, text, bg, tmp_path, progress=False)  # from the cache
    assert info2["loaded"] and all(torch.equal(a, b) for a, b in
                                   zip(det.trainable_state().values(), det2.trainable_state().values()))


@pytest.mark.slow
def test_detector_training_resumes_exactly(clip, base_data, tmp_path):
    model, _ = clip
    _, sp, ds = base_data
    text, bg, _ = _vocab(model.visual.proj.shape[1], len(sp.base))
    cfg = DetectorTrainConfig(clip="random-0", data="test", fvit=FViTConfig(**SMALL), steps=6, batch_size=2,
                              lr=1e-3, warmup=2, ckpt_every=3)
    whole, info_w = train_detector(cfg, model, ds, text, bg, tmp_path / "a", progress=False)
    _, part = train_detector(cfg, model, ds, text, bg, tmp_path / "b", progress=False, max_steps=3)
    assert part["path"].endswith(".state.pt") and len(part["history"]) == 3
    resumed, info_r = train_detector(cfg, model, ds, text, bg, tmp_path / "b", progress=False)
    assert [h["loss"] for h in info_r["history"]] == pytest.approx([h["loss"] for h in info_w["history"]], rel=1e-5)
    for (k, a), b in zip(whole.trainable_state().items(), resumed.trainable_state().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_several_vocabularies_in_one_pass_equal_one_pass_each(clip):
    model, _ = clip
    det = FViT(model, FViTConfig(**SMALL, score_thresh=0.0, detections=30)).eval()
    D = det.backbone.adapter.out_dim
    a, bg, novel = _vocab(D, 4, novel=(3,))
    b = F.normalize(a + 0.5 * torch.randn(4, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        both = det(images, vocabularies=[(a, bg, novel), (b, bg, novel)])
        single = []
        for t in (a, b):
            det.set_vocabulary(t, bg, novel)
            single.append(det(images))
    assert len(both) == 2
    for got, want in zip(both, single):
        for k in ("boxes", "scores", "labels"):
            assert torch.allclose(got[0][k].float(), want[0][k].float(), atol=1e-5), k
    assert not torch.equal(both[0][0]["scores"], both[1][0]["scores"])  # the names matter


@pytest.mark.slow
def test_detector_jobs_in_worker_processes_equal_in_process(clip, base_data, tmp_path):
    """Chapter 06's jobs (ovlib.eval.detector_runs): two detectors trained and evaluated by two one-thread worker
    processes give the losses, cached weights and AP that the same jobs give here on one thread."""
    from ovlib.eval.detector_runs import DetectorJob, run_detector_jobs

    model, _ = clip
    root, sp, ds = base_data
    C = len(sp.vocab)
    text, bg, _ = _vocab(model.visual.proj.shape[1], C)
    novel = [c in sp.novel for c in sp.vocab]

    def jobs(cache):
        return [DetectorJob(f"s{s}", DetectorTrainConfig(clip="random-0", data="test", fvit=FViTConfig(**SMALL),
                                                         steps=3, batch_size=2, lr=1e-3, warmup=1, seed=s),
                            model, ds, text[:len(sp.base)], bg, str(cache), str(root), "train2017", sp,
                            {"main": (text, bg, novel)}, max_images=4, n_boot=20) for s in (0, 1)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = run_detector_jobs(jobs(tmp_path / "here"), workers=1)
    finally:
        torch.set_num_threads(threads)
    there = run_detector_jobs(jobs(tmp_path / "there"), workers=2)
    assert [r.threads for r in there] == [1, 1] and [r.name for r in there] == ["s0", "s1"]
    for a, b in zip(here, there):
        assert [h["loss"] for h in a.info["history"]] == pytest.approx([h["loss"] for h in b.info["history"]],
                                                                      rel=1e-5)
        assert a.evals["main"].exact == pytest.approx(b.evals["main"].exact, nan_ok=True)
    assert here[0].info["history"][0]["loss"] != pytest.approx(here[1].info["history"][0]["loss"])  # seeds differ

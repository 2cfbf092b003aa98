"""The micro proxies: dense self-supervised VFM and micro CLIPSeg (ovlib.train.proxies, ovlib.models.clipseg)."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovlib.io import safe_load
from ovlib.models.clipseg import (
    build_clipseg_decoder,
    clipseg_arch,
    clipseg_to_decoder_state,
    decoder_to_clipseg_state,
    load_clipseg_decoder,
    read_clipseg_checkpoint,
)
from ovlib.train.proxies import (
    ClipSegPretrainConfig,
    DenseVfmPretrainConfig,
    base_class_ids,
    clipseg_batches,
    clipseg_templates,
    colour_permute,
    dense_dino_loss,
    paired_views,
    pretrain_clipseg,
    pretrain_vfm_dense,
    vfm_tokens,
    view_correspondence,
)


# ------------------------------------------------------------------------------------------- geometry
def test_view_correspondence_hand_cases():
    g = 4
    box = torch.tensor([[10.0, 20.0, 42.0, 52.0]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    coords, valid = view_correspondence(box, no, box, no, g)
    centres = (torch.arange(g) + 0.5) / g * 2 - 1  # token centres in grid_sample coordinates
    torch.testing.assert_close(coords[0, :, :, 0], centres.view(1, g).expand(g, g))
    torch.testing.assert_close(coords[0, :, :, 1], centres.view(g, 1).expand(g, g))
    assert valid.all()
    # the same crop seen flipped: x mirrored, y unchanged
    coords_f, _ = view_correspondence(box, no, box, yes, g)
    torch.testing.assert_close(coords_f[..., 0], -coords[..., 0])
    torch.testing.assert_close(coords_f[..., 1], coords[..., 1])
    # view b shifted right by half a view: the left half of a's tokens fall outside b
    box_b = box + torch.tensor([[16.0, 0.0, 16.0, 0.0]])
    coords_s, valid_s = view_correspondence(box, no, box_b, no, g)
    assert valid_s[0, :, :2].logical_not().all() and valid_s[0, :, 2:].all()
    torch.testing.assert_close(coords_s[0, :, 2:, 0], coords[0, :, :2, 0])


def test_paired_views_agree_at_corresponding_points():
    # a smooth image: bilinear resampling is exact enough to compare the two views point by point
    H = W = 40
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    img = torch.stack([xx / W, yy / H, (xx + yy) / (H + W)])[None].repeat(2, 1, 1, 1)  # (2, 3, H, W)
    gen = torch.Generator().manual_seed(0)
    views, boxes, flips = paired_views(img, pairs=3, size=16, scale=(0.8, 1.2), generator=gen)
    assert views[0].shape == (6, 3, 16, 16) and boxes[1].shape == (6, 4) and flips[0].dtype == torch.bool
    coords, valid = view_correspondence(boxes[0], flips[0], boxes[1], flips[1], 16)
    sampled = F.grid_sample(views[1], coords, mode="bilinear", align_corners=False)  # (6, 3, 16, 16)
    inner = valid & (coords.abs() < 1 - 1 / 16).all(-1)  # within half a pixel of b's edge: zero padding mixes in
    err = (sampled - views[0]).abs().amax(1)[inner]
    assert err.numel() > 0 and float(err.max()) < 0.02


def test_dense_dino_loss_hand_case_and_mask():
    n, K, g = 2, 5, 3
    s = torch.zeros(n, K, g, g)
    t = torch.zeros(n, K, g, g)
    valid = torch.ones(n, g, g, dtype=torch.bool)
    c = torch.zeros(1, K)
    # uniform student against any teacher: H = log K
    assert float(dense_dino_loss(s, torch.randn(n, K, g, g), valid, c, 0.1, 0.04)) == pytest.approx(math.log(K))
    # brute force with masked tokens excluded
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(n, K, g, g, generator=gen), torch.randn(n, K, g, g, generator=gen)
    valid[0, 0, 0] = False
    ref, m = 0.0, 0
    for b in range(n):
        for i in range(g):
            for j in range(g):
                if valid[b, i, j]:
                    p = F.softmax((t[b, :, i, j] - c[0]) / 0.04, 0)
                    ref += float(-(p * F.log_softmax(s[b, :, i, j] / 0.1, 0)).sum())
                    m += 1
    assert float(dense_dino_loss(s, t, valid, c, 0.1, 0.04)) == pytest.approx(ref / m, rel=1e-5)
    assert float(dense_dino_loss(s, t, torch.zeros_like(valid), c, 0.1, 0.04)) == 0.0
    with pytest.raises(ValueError, match="dense_dino_loss"):
        dense_dino_loss(s, t[:, :, :2], valid, c, 0.1, 0.04)


def test_vfm_tokens_is_timm_forward_without_mask():
    from ovlib.models import load_vfm, vfm_patch_features

    vfm = load_vfm("micro-vfm")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vfm_tokens(vfm, x), vfm_patch_features(vfm, x, (4, 4)))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    tok = torch.randn(vfm.embed_dim)
    out = vfm_tokens(vfm, x, mask, tok)
    torch.testing.assert_close(out[1], vfm_tokens(vfm, x)[1])  # image 1 has no masked token
    assert not torch.allclose(out[0], vfm_tokens(vfm, x)[0])


# ------------------------------------------------------------------------------------------- dense VFM
_VFM = DenseVfmPretrainConfig(steps=20, warmup=2, batch_size=8, pairs_per_scene=4, scene_size=96, view_size=32,
                              out_dim=64, hidden_dim=64, mask_ratio=0.2, ckpt_every=1000, precision="fp32",
                              view_scale=(0.5, 2.0), channel_shuffle=0.5, grayscale=0.2)  # every option drawn


def test_dense_vfm_trains_caches_and_resumes_exactly(tmp_path):
    vfm, info = pretrain_vfm_dense(_VFM, tmp_path / "a", progress=False)
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # fresh scenes every step: compare means of 5 steps
    ck = safe_load(info["path"])  # weights_only=True
    assert set(ck["model"]) == set(vfm.state_dict())
    again, info2 = pretrain_vfm_dense(_VFM, tmp_path / "a", progress=False)
    assert info2["loaded"]
    _, part = pretrain_vfm_dense(_VFM, tmp_path / "b", progress=False, max_steps=3)
    assert part["path"].endswith(".state.pt")
    resumed, info3 = pretrain_vfm_dense(_VFM, tmp_path / "b", progress=False)
    assert [h["step"] for h in info3["history"]] == list(range(1, 21))
    for (n, p), (_, q) in zip(vfm.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)


def test_colour_permute_hand_cases():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 4, 4, generator=gen)
    # probability 0: untouched, and no random draw changes the views
    torch.testing.assert_close(colour_permute(x, 0.0, 0.0, torch.Generator().manual_seed(1)), x)
    # always shuffled: every view is its own channels in some order (the multiset of channels is kept)
    y = colour_permute(x, 1.0, 0.0, torch.Generator().manual_seed(1))
    for v, w in zip(x, y):
        perm = [int((v - w[c]).abs().flatten(1).sum(1).argmin()) for c in range(3)]
        assert sorted(perm) == [0, 1, 2]
        torch.testing.assert_close(w, v[perm])
    orders = {tuple(int((v - w[c]).abs().flatten(1).sum(1).argmin()) for c in range(3)) for v, w in zip(x, y)}
    assert len(orders) == 6  # 64 draws: every one of the 3! permutations occurs (p of a miss < 1e-4)
    # always grey: three equal channels holding the BT.601 luma
    g = colour_permute(x, 0.0, 1.0, torch.Generator().manual_seed(1))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(g[:, c], luma)
    with pytest.raises(ValueError, match="probabilities"):
        colour_permute(x, 1.5, 0.0, gen)


# ------------------------------------------------------------------------------------------- CLIPSeg
def _vitb16_clipseg_state(gen):
    """A state dict with the key names and shapes of CLIPSeg's released rd64-uni.pth (ViT-B/16: width 768,
    text 512, 3 levels, reduce_dim 64, 4 heads, feed-forward 2048, 16x16 transposed convolution)."""
    def r(*s):
        return torch.randn(*s, generator=gen) * 0.02

    sd = {"film_mul.weight": r(64, 512), "film_mul.bias": 1 + r(64), "film_add.weight": r(64, 512),
          "film_add.bias": r(64), "reduce.weight": r(64, 768), "reduce.bias": r(64),
          "trans_conv.weight": r(64, 1, 16, 16), "trans_conv.bias": r(1)}
    for i in range(3):
        sd.update({f"reduces.{i}.weight": r(64, 768), f"reduces.{i}.bias": r(64),
                   f"blocks.{i}.self_attn.in_proj_weight": r(192, 64), f"blocks.{i}.self_attn.in_proj_bias": r(192),
                   f"blocks.{i}.self_attn.out_proj.weight": r(64, 64), f"blocks.{i}.self_attn.out_proj.bias": r(64),
                   f"blocks.{i}.linear1.weight": r(2048, 64), f"blocks.{i}.linear1.bias": r(2048),
                   f"blocks.{i}.linear2.weight": r(64, 2048), f"blocks.{i}.linear2.bias": r(64),
                   f"blocks.{i}.norm1.weight": 1 + r(64), f"blocks.{i}.norm1.bias": r(64),
                   f"blocks.{i}.norm2.weight": 1 + r(64), f"blocks.{i}.norm2.bias": r(64)})
    return sd


def test_clipseg_decoder_forward_shapes_and_real_key_names(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = _vitb16_clipseg_state(gen)
    arch = clipseg_arch(sd)
    assert (arch.reduce_dim, arch.ff_dim) == (64, 2048)
    dec = load_clipseg_decoder(build_clipseg_decoder(768, 512, 3, (16, 16), arch), sd).eval()
    acts = [torch.randn(2, 1 + 14 * 14, 768, generator=gen) for _ in range(3)]
    text = F.normalize(torch.randn(2, 512, generator=gen), dim=-1)
    logits, X = dec(acts, text, (14, 14))
    assert logits.shape == (2, 224, 224) and X.shape == (2, 512, 14, 14)
    # CLIPSeg's FiLM, written out: a * film_mul(t) + film_add(t) on the deepest reduced level
    a = acts[-1] @ sd["reduces.0.weight"].T + sd["reduces.0.bias"]  # (2, L, 64)
    ref = a * (text @ sd["film_mul.weight"].T + sd["film_mul.bias"])[:, None] + (
        text @ sd["film_add.weight"].T + sd["film_add.bias"])[:, None]
    torch.testing.assert_close(dec.film(dec.reduces[0](acts[-1]), text), ref, rtol=1e-4, atol=1e-5)
    # round trip back to CLIPSeg's names (``reduce`` is unused by CLIPSeg's forward and not kept)
    back = decoder_to_clipseg_state(dec)
    assert set(back) == set(sd) - {"reduce.weight", "reduce.bias"}
    for k, v in back.items():
        torch.testing.assert_close(v, sd[k], rtol=1e-5, atol=1e-6, msg=k)
    # a file on disk, and the errors
    torch.save(sd, tmp_path / "rd64-uni.pth")
    assert set(read_clipseg_checkpoint(tmp_path / "rd64-uni.pth")) == set(sd)
    with pytest.raises(FileNotFoundError, match="rd64-uni.pth"):
        read_clipseg_checkpoint(tmp_path / "missing.pth")
    refined = {k: v for k, v in sd.items() if not k.startswith("trans_conv")}
    refined["trans_conv.0.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(ValueError, match="refined"):
        clipseg_to_decoder_state(refined, 512)
    with pytest.raises(ValueError, match="missing"):
        clipseg_to_decoder_state({"film_mul.weight": sd["film_mul.weight"]}, 512)


def test_clipseg_identity_film_hand_case():
    """film_mul = 1, film_add = 0 (zero weights): the conditioned decoder equals the unconditioned one, for
    any text; and the logits are the transposed convolution of that map."""
    gen = torch.Generator().manual_seed(1)
    dec = build_clipseg_decoder(32, 16, 2, (4, 4), clipseg_arch("micro-clipseg")).eval()
    sd = decoder_to_clipseg_state(dec)
    sd.update({"film_mul.weight": torch.zeros(64, 16), "film_mul.bias": torch.ones(64),
               "film_add.weight": torch.zeros(64, 16), "film_add.bias": torch.zeros(64)})
    load_clipseg_decoder(dec, sd)
    acts = [torch.randn(3, 1 + 9, 32, generator=gen) for _ in range(2)]
    t1, t2 = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    l1, _ = dec(acts, t1, (3, 3), project=False)
    l2, _ = dec(acts, t2, (3, 3), project=False)
    torch.testing.assert_close(l1, l2)
    fmap = dec._fmap(acts, None, (3, 3), None)  # (3, 64, 3, 3)
    assert l1.shape == (3, 12, 12)
    torch.testing.assert_close(l1, F.conv_transpose2d(fmap, dec.upsample.weight, dec.upsample.bias, stride=4)[:, 0])


def test_clipseg_stream_never_shows_novel_classes():
    from ovlib.data.microworld import MicroWorld

    world = MicroWorld(seed=0)
    novel = {c.id for c in world.classes if c.novel}
    assert novel and not novel & set(base_class_ids(world))
    cfg = ClipSegPretrainConfig(clip="x", batch_size=16, prompts_per_image=2, prompt="shuffle", with_visual=True)
    ids = [c.id for c in world.classes]
    seen, negatives, supports, text_only, mixed = set(), 0, 0, 0, 0
    for _, b in zip(range(6), clipseg_batches(cfg)):
        cats = set(b["category_id"].tolist())
        seen |= cats
        assert not cats & novel
        present = {ids[j] for j in b["present"].any(0).nonzero().flatten().tolist()}
        assert not present & novel  # no novel thing even as pixels
        for sid in b["scene_ids"].tolist():
            assert not {t.category_id for t in world.layout(sid).things} & novel
        negatives += int((b["masks"].flatten(1).sum(1) == 0).sum())
        for p, (o, c) in enumerate(zip(b["owner"].tolist(), b["category_id"].tolist())):
            sem = world.sample(int(b["scene_ids"][o]), cfg.image_size, annotations=False).semantic
            torch.testing.assert_close(b["masks"][p], torch.from_numpy(sem == c).float())
        # the supports (CLIPSeg's visual prompts) come from later base-only scenes that show the prompted class
        for c, j, w, o in zip(b["category_id"].tolist(), b["support_ids"].tolist(), b["text_weight"].tolist(),
                              b["owner"].tolist()):
            if j < 0:
                assert w == 1.0
                continue
            assert j > int(b["scene_ids"][o]) and not {t.category_id for t in world.layout(j).things} & novel
            assert int((world.sample(j, cfg.image_size, annotations=False).semantic == c).sum()) >= 4
            supports += 1
        w = b["text_weight"]
        assert ((w >= 0) & (w <= 1)).all() and not ((w > 0.5) & (w < 1)).any()  # U(0, 0.5) or text alone
        text_only += int((w == 1).sum())
        mixed += int((w < 1).sum())
        assert b["template"].min() >= 0 and b["template"].max() < len(clipseg_templates(cfg))
    assert negatives > 0 and len(seen) > 10
    assert supports > 0 and text_only > 0 and mixed > 0


def test_clipseg_stream_is_the_same_on_resume():
    cfg = ClipSegPretrainConfig(clip="x", batch_size=4, prompts_per_image=2, prompt="shuffle", with_visual=True)
    full = [b for _, b in zip(range(3), clipseg_batches(cfg))]
    resumed = next(clipseg_batches(cfg, start_step=2))
    for k, v in full[2].items():
        torch.testing.assert_close(resumed[k], v, msg=k)


def test_clipseg_ensemble_prompt_without_visual_is_text_alone():
    cfg = ClipSegPretrainConfig(clip="x", batch_size=4, prompt="ensemble", with_visual=False)
    b = next(clipseg_batches(cfg))
    assert "support" not in b and (b["template"] == 0).all() and (b["text_weight"] == 1).all()
    with pytest.raises(ValueError, match="prompt"):
        next(clipseg_batches(ClipSegPretrainConfig(clip="x", prompt="random")))


def test_highlight_crop_hand_case():
    from ovlib.data.regions import highlight_crop

    img = torch.rand(3, 10, 10)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:4, 3:7] = True  # a 2 x 4 object: box widened by 0.5 -> rows 1:5, cols 1:9 (4 x 8), padded to 8 x 8
    mean = (0.5, 0.4, 0.3)
    out = highlight_crop(img, mask, 8, mean, context=0.5, background=0.25)
    mu = torch.tensor(mean).view(3, 1, 1)
    expect = mu.expand(3, 8, 8).clone()
    expect[:, 2:6, :] = mu + 0.25 * (img[:, 1:5, 1:9] - mu)  # background: a quarter of its contrast
    expect[:, 3:5, 2:6] = img[:, 2:4, 3:7]  # the object unchanged, centred
    torch.testing.assert_close(out, expect)
    # blur: a constant image stays constant; the object's pixels are never blurred
    flat = torch.full((3, 10, 10), 0.7)
    expect = mu.expand(3, 8, 8).clone()  # the 2 x 4 box padded to 4 x 4, resized (nearest) to 8 x 8
    expect[:, 2:6] = 0.7
    torch.testing.assert_close(highlight_crop(flat, mask, 8, mean, context=0.0, background=1.0, blur=1.0), expect)
    with pytest.raises(ValueError, match="empty"):
        highlight_crop(img, torch.zeros(10, 10, dtype=torch.bool), 8, mean)


@pytest.mark.parametrize("conditioning", [{}, {"prompt": "shuffle", "with_visual": True}],
                         ids=["ensemble", "clipseg-mix"])
def test_clipseg_pretrain_trains_caches_resumes(tmp_path, clip_and_cats, conditioning):
    clip, tok, _ = clip_and_cats
    cfg = ClipSegPretrainConfig(clip="test", batch_size=4, steps=8, warmup=1, ckpt_every=1000, precision="fp32",
                                lr=3e-3, **conditioning)
    state, info = pretrain_clipseg(cfg, clip, tok, tmp_path / "a", progress=False)
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert set(safe_load(info["path"])["model"]) == set(state)  # weights_only=True
    assert "film_mul.weight" in state and "trans_conv.weight" in state
    _, info2 = pretrain_clipseg(cfg, clip, tok, tmp_path / "a", progress=False)
    assert info2["loaded"]
    pretrain_clipseg(cfg, clip, tok, tmp_path / "b", progress=False, max_steps=3)
    resumed, _ = pretrain_clipseg(cfg, clip, tok, tmp_path / "b", progress=False)
    for k in state:
        torch.testing.assert_close(state[k], resumed[k], msg=k)


def test_synseg_starts_from_clipseg_weights(tmp_path, clip_and_cats):
    from ovlib.methods.synseg import SynSeg

    clip, tok, cats = clip_and_cats
    dec = build_clipseg_decoder(128, 128, 3, (8, 8), clipseg_arch("micro-clipseg"))
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sd = decoder_to_clipseg_state(dec)
    torch.save(sd, tmp_path / "cs.pth")
    m = SynSeg(clip, {}, tokenizer=tok, categories=cats, input_size=64, clipseg=str(tmp_path / "cs.pth"))
    assert m.clipseg_loaded
    for k, v in decoder_to_clipseg_state(m.decoder).items():
        torch.testing.assert_close(v, sd[k], msg=k)
    m2 = SynSeg(clip, {}, tokenizer=tok, categories=cats, input_size=64, clipseg="micro-clipseg", clipseg_state=sd)
    assert m2.clipseg_loaded
    with pytest.raises(ValueError, match="clipseg_state"):
        SynSeg(clip, {}, tokenizer=tok, categories=cats, input_size=64, clipseg_state=sd)


def test_vfm_trials_script_writes_the_record_the_chapter_reads(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vfm_grouping.py"
    spec = importlib.util.spec_from_file_location("vfm_grouping", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "trials.json"
    mod.run("smoke", ["dense", "mae", "random-init"], str(tmp_path / "cache"), str(tmp_path / "mw"), 0, out)
    rec = json.loads(out.read_text())
    for name in ("dense", "mae", "random-init"):
        t = rec["trials"][name]
        for key in ("objective", "steps", "batch", "train_seconds", "cpu_seconds", "loadavg", "as_is", "equalized",
                    "affinity_inside", "affinity_outside"):
            assert key in t, key
        assert len(t["as_is"]) == 3 and 0 <= t["as_is"][0] <= 100
    assert rec["trials"]["random-init"]["steps"] == 0 and rec["trials"]["mae"]["steps"] == 4
    assert set(rec["colour_baseline"]) == {"as_is", "equalized"}


def test_clipseg_trials_script_writes_the_record_the_chapter_reads(tmp_path):
    """benchmarks/clipseg_transfer.py at smoke: every trial's record has what chapter 01's table reads, and the
    `ensemble` trial is the profile's micro CLIPSeg (the chapter's ★)."""
    import importlib.util
    import json
    from dataclasses import asdict

    from ovlib.config import resolve
    from ovlib.train.proxies import clipseg_config

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "clipseg_transfer.py"
    spec = importlib.util.spec_from_file_location("clipseg_transfer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "trials.json"
    mod.run("smoke", ["ensemble", "shuffle+visual"], str(tmp_path / "cache"), str(tmp_path / "mw"), out, 3)
    rec = json.loads(out.read_text())
    assert set(rec["trials"]) == {"ensemble", "shuffle+visual"} and rec["profile"] == "smoke"
    for t in rec["trials"].values():
        for key in ("description", "steps", "config", "train_seconds", "cpu_seconds", "loadavg", "novel_response",
                    *mod.METRICS):
            assert key in t, key
        assert len(t["mIoU novel"]) == 3 and 0 <= t["mIoU novel"][0] <= 100
        assert set(t["novel_response"]) == {"inside", "outside", "objects"}
    P = resolve("smoke", [f"cache_dir={tmp_path / 'cache'}"])
    mine = json.loads(json.dumps(asdict(clipseg_config(P, P["steps_scale"], P["seed"]))))
    assert rec["trials"]["ensemble"]["config"] == mine
    assert rec["trials"]["shuffle+visual"]["config"]["with_visual"]


def _budgets(profile: str) -> dict:
    """The profile file's budgets (its pre-training sizes among them), as resolved parameters carry them."""
    from ovlib.config import load_profile

    return load_profile(profile, Path(__file__).resolve().parents[1])["budgets"]


def test_clipseg_weights_resolves_every_profile_form(tmp_path, clip_and_cats):
    """SynSeg's CLIPSeg initialisation as the profiles name it: none, a named CLIPSeg file in weights_dir (the
    error names the file), a dry run with random weights, a path, and the micro CLIPSeg (cached)."""
    from ovlib.models.weights import WeightsUnavailable
    from ovlib.train.proxies import clipseg_weights

    clip, tok, _ = clip_and_cats
    params = {"profile": "paper", "steps_scale": 1.0, "seed": 0, "cache_dir": str(tmp_path), "weights_dir": ""}
    assert clipseg_weights(params, None, clip, tok) is None
    with pytest.raises(WeightsUnavailable, match=r"rd64-uni\.pth"):
        clipseg_weights(params, "rd64-uni", clip, tok)
    with pytest.raises(WeightsUnavailable, match=r"rd64-uni\.safetensors"):
        clipseg_weights({**params, "weights_dir": str(tmp_path)}, "rd64-uni", clip, tok)
    dry = {**params, "dry_run": True, "dry_run_settings": {"random_init": True}}
    assert clipseg_weights(dry, "rd64-uni", clip, tok) is None
    sd = _vitb16_clipseg_state(torch.Generator().manual_seed(0))
    torch.save(sd, tmp_path / "rd64-uni.pth")
    got = clipseg_weights({**params, "weights_dir": str(tmp_path)}, "rd64-uni", clip, tok)
    assert set(got) == set(sd) and torch.equal(got["film_mul.weight"], sd["film_mul.weight"])
    assert set(clipseg_weights(params, str(tmp_path / "rd64-uni.pth"), clip, tok)) == set(sd)
    # the micro CLIPSeg: trained once into cache_dir, then loaded (the smoke budget, cut short by a tiny scale)
    smoke = {**params, "profile": "smoke", "steps_scale": 0.01, "budgets": _budgets("smoke")}
    clip = copy.deepcopy(clip)  # pre-training freezes the CLIP it is given
    a = clipseg_weights(smoke, "micro-clipseg", clip, tok)
    assert "trans_conv.weight" in a and list(tmp_path.glob("micro-clipseg/*.pt"))
    b = clipseg_weights(smoke, "micro-clipseg", clip, tok)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_micro_clipseg_is_keyed_to_the_clip_it_was_trained_on(tmp_path, clip_and_cats):
    """A run whose CLIP comes from a file gets a micro CLIPSeg of its own (clip_key = the file's content hash),
    never the profile's cached one; file_key is the content, not the path."""
    from ovlib.train.proxies import clipseg_weights, file_key

    clip, tok, _ = clip_and_cats
    (tmp_path / "a.pt").write_bytes(b"weights")
    (tmp_path / "b.pt").write_bytes(b"weights")
    assert file_key(str(tmp_path / "a.pt")) == file_key(str(tmp_path / "b.pt")) != file_key("openai")
    params = {"profile": "smoke", "steps_scale": 0.01, "seed": 0, "cache_dir": str(tmp_path / "c"),
              "budgets": _budgets("smoke")}
    clip = copy.deepcopy(clip)
    clipseg_weights(params, "micro-clipseg", clip, tok)
    clipseg_weights(params, "micro-clipseg", clip, tok, clip_key="micro-clip:" + file_key(str(tmp_path / "a.pt")))
    assert len(list((tmp_path / "c" / "micro-clipseg").glob("micro-clipseg-*.pt"))) == 2

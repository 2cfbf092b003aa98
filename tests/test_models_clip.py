"""load_clip: micro registry, real BPE tokenizer, transforms, local checkpoints, offline named weights."""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ovlib.io import CheckpointError, atomic_save
from ovlib.models import (
    MICRO_CLIP_CONFIGS,
    CheckpointMismatch,
    MicroClipConfig,
    WeightsUnavailable,
    load_clip,
    register_micro_clip,
)
from ovlib.models.clip import OPENAI_MEAN, OPENAI_STD, _cached_open_clip_file, encode_text_trimmed, text_encoder


@pytest.fixture(scope="module")
def micro():
    return load_clip("micro-clip")


def test_micro_clip_config_and_forward(micro):
    model, tok, pre = micro
    v = model.visual
    assert v.patch_size == (8, 8) and v.image_size == (64, 64) and v.grid_size == (8, 8)
    assert len(v.transformer.resblocks) == 4 and v.transformer.width == 128
    assert v.transformer.resblocks[0].attn.num_heads == 4
    assert len(model.transformer.resblocks) == 3 and model.context_length == 32
    assert not model.training
    text = tok(["a red boat on the water", "grass"])
    assert text.shape == (2, 32) and text.dtype == torch.long
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, 64, 64))
        txt = model.encode_text(text)
    assert img.shape == (2, 128) and txt.shape == (2, 128)


def test_tokenizer_is_open_clip_bpe(micro):
    from open_clip.tokenizer import SimpleTokenizer

    _, tok, _ = micro
    ids = tok(["a photo of a cat"])[0]
    ref = SimpleTokenizer()
    assert ids[0] == ref.sot_token_id
    body = ref.encode("a photo of a cat")
    assert ids[1:1 + len(body)].tolist() == body and ids[1 + len(body)] == ref.eot_token_id
    assert (ids[2 + len(body):] == 0).all()
    assert len(ref.encoder) == 49408


def test_preprocess_normalises_with_openai_stats(micro):
    _, _, pre = micro
    img = Image.fromarray(np.full((80, 100, 3), 255, dtype=np.uint8))
    x = pre(img)
    assert x.shape == (3, 64, 64)
    want = (1 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(x[:, 32, 32], want)


def test_seeded_init_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _, _ = load_clip("micro-clip", seed=5)
    after = torch.rand(1)
    assert before == after  # the global RNG did not move
    b, _, _ = load_clip("micro-clip", seed=5)
    c, _, _ = load_clip("micro-clip", seed=6)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.visual.conv1.weight, c.visual.conv1.weight)


def test_random_init_of_a_named_model_is_built_once_and_copied(monkeypatch):
    """pretrained=None (the dry run): the seeded init is built once per process and seed; every call gets an
    independent deep copy, equal to a fresh build, and the global RNG does not move."""
    import open_clip

    from ovlib.models import clip as clip_mod

    monkeypatch.setattr(clip_mod, "_RANDOM_INITS", type(clip_mod._RANDOM_INITS)())
    calls = []
    real = open_clip.create_model_and_transforms
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: calls.append(a) or real(*a, **k))
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a, _, _ = load_clip("ViT-B-16", seed=3)
    b, _, _ = load_clip("ViT-B-16", seed=3)
    assert torch.rand(1) == before and len(calls) == 1  # one build for two calls; global RNG untouched
    w = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert a is not b and torch.equal(a.state_dict()[w], b.state_dict()[w])
    with torch.no_grad():
        a.visual.conv1.weight.add_(1.0)  # a copy: changing one leaves the other and the cached build alone
    c, _, _ = load_clip("ViT-B-16", seed=3)
    assert torch.equal(b.visual.conv1.weight, c.visual.conv1.weight)
    assert not torch.equal(a.visual.conv1.weight, c.visual.conv1.weight)
    d, _, _ = load_clip("ViT-B-16", seed=4)
    assert len(calls) == 2 and not torch.equal(c.state_dict()[w], d.state_dict()[w])
    clip_mod._RANDOM_INITS.clear()  # a fresh build equals the copies
    fresh, _, _ = load_clip("ViT-B-16", seed=3)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in c.state_dict().items())


@pytest.mark.parametrize("name", ["ViT-B-16", "EVA02-B-16"])
def test_a_dry_runs_depth_keeps_the_first_blocks_of_every_tower(name):
    """depth=N (dry_run_settings.depth): image and text towers keep their first N blocks, with the weights the
    full random init has there; the cut model still encodes images and text; named weights refuse a depth."""
    from ovlib.models import vit_adapter

    full, tok, _ = load_clip(name, seed=2)
    cut, _, _ = load_clip(name, seed=2, depth=3)
    text = (lambda m: m.text.transformer) if hasattr(full, "text") else (lambda m: m.transformer)
    assert vit_adapter(cut).num_blocks == 3 and vit_adapter(full).num_blocks == 12
    assert len(text(cut).resblocks) == 3 and len(text(full).resblocks) == 12
    fs, cs = full.state_dict(), cut.state_dict()
    assert set(cs) < set(fs) and all(torch.equal(v, fs[k]) for k, v in cs.items())
    dropped = {k.split("resblocks.")[-1].split("blocks.")[-1].split(".")[0] for k in set(fs) - set(cs)}
    assert dropped == {str(i) for i in range(3, 12)}  # exactly the blocks from the fourth on
    with torch.no_grad():
        img = cut.encode_image(torch.zeros(1, 3, 224, 224))
        txt = cut.encode_text(tok(["a photo of a cat."]))
    assert img.shape == txt.shape == (1, 512) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match="depth=3 cuts a random initialisation"):
        load_clip(name, pretrained="openai", depth=3)
    with pytest.raises(ValueError, match="exceeds the 12 blocks"):
        load_clip(name, seed=2, depth=13)


def test_a_dry_runs_depth_cuts_a_timm_vfm():
    from ovlib.models import load_vfm

    full = load_vfm("vit_small_patch14_dinov2.lvd142m", seed=1)
    cut = load_vfm("vit_small_patch14_dinov2.lvd142m", seed=1, depth=2)
    assert len(cut.blocks) == 2 and len(full.blocks) == 12
    fs = full.state_dict()  # the same architecture, the blocks from the third on absent
    assert {k: v.shape for k, v in cut.state_dict().items()} == \
        {k: v.shape for k, v in fs.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 2}
    with torch.no_grad():
        assert cut(torch.zeros(1, 3, 56, 56)).shape == (1, 384)
    with pytest.raises(ValueError, match="depth=2 cuts a random initialisation"):
        load_vfm("micro-vfm", depth=2)


def test_register_micro_variant():
    cfg = MicroClipConfig(vision_layers=2)
    register_micro_clip("micro-clip-test-l2", cfg, overwrite=True)
    try:
        m, _, _ = load_clip("micro-clip-test-l2")
        assert len(m.visual.transformer.resblocks) == 2
        with pytest.raises(ValueError, match="already registered"):
            register_micro_clip("micro-clip-test-l2", cfg)
    finally:
        MICRO_CLIP_CONFIGS.pop("micro-clip-test-l2")


def _perturbed_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "ddp", "safetensors"])
def test_local_checkpoint_round_trip(micro, tmp_path, wrap):
    model, _, _ = micro
    sd = _perturbed_state(model)
    path = tmp_path / ("ckpt.safetensors" if wrap == "safetensors" else "ckpt.pt")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        obj = {"state_dict": sd} if wrap == "state_dict" else sd
        if wrap == "ddp":
            obj = {"module." + k: v for k, v in sd.items()}
        atomic_save(obj, path)
    loaded, _, _ = load_clip("micro-clip", pretrained=str(path))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 64, 64)
    ref = model.__class__  # same class
    assert isinstance(loaded, ref)
    with torch.no_grad():
        assert not torch.allclose(loaded.encode_image(x), model.encode_image(x))


def test_mismatched_checkpoint_lists_keys(micro, tmp_path):
    model, _, _ = micro
    sd = dict(model.state_dict())
    sd.pop("visual.proj")
    sd["visual.extra"] = torch.zeros(1)
    sd["logit_scale"] = torch.zeros(3)
    atomic_save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatch) as e:
        load_clip("micro-clip", pretrained=str(tmp_path / "bad.pt"))
    msg = str(e.value)
    assert "visual.proj" in msg and "visual.extra" in msg and "logit_scale" in msg and "bad.pt" in msg


def test_checkpoint_of_another_architecture(micro, tmp_path):
    model, _, _ = micro
    atomic_save(model.state_dict(), tmp_path / "micro.pt")
    with pytest.raises(CheckpointMismatch, match="another shape"):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "micro.pt"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_clip("micro-clip", pretrained=str(path))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_clip("micro-clip", pretrained=str(tmp_path / "nope.pt"))


def test_offline_named_weight_fails_fast(monkeypatch):
    if _cached_open_clip_file("ViT-B-16", "openai") is not None:
        pytest.skip("ViT-B-16/openai is in the local cache here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        load_clip("ViT-B-16", pretrained="openai")
    assert time.perf_counter() - t < 20  # no download attempt, no network timeouts (model build only)
    msg = str(e.value)
    assert "'openai' for ViT-B-16 are not available offline" in msg
    assert "pretrained='/path/to/checkpoint.pt'" in msg and "ViT-B-16-quickgelu" in msg


def test_download_not_allowed(monkeypatch):
    if _cached_open_clip_file("EVA02-B-16", "merged2b_s8b_b131k") is not None:
        pytest.skip("cached here")
    with pytest.raises(WeightsUnavailable, match="allow_download=False"):
        load_clip("EVA02-B-16", pretrained="merged2b_s8b_b131k", allow_download=False)


def test_unknown_names_and_tags():
    with pytest.raises(ValueError, match="unknown CLIP model 'nope'"):
        load_clip("nope")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        load_clip("ViT-B-16", pretrained="nope")
    with pytest.raises(ValueError, match="no named weights"):
        load_clip("micro-clip", pretrained="openai")


# ------------------------------------------------------------------------ the trimmed text context
def _tokens(eots: list[int], L: int = 32, seed: int = 0) -> torch.Tensor:
    """Token rows like open_clip's tokenizer: start-of-text, random words, end-of-text (the highest id) at
    ``eots[b]``, zeros after it. ``(B, L)``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(len(eots), L, dtype=torch.long)
    for b, e in enumerate(eots):
        t[b, 0] = 49406
        t[b, 1:e] = torch.randint(1, 49000, (e - 1,), generator=g)
        t[b, e] = 49407
    return t


@settings(max_examples=12, deadline=None)
@given(eots=st.lists(st.integers(1, 31), min_size=1, max_size=5), seed=st.integers(0, 10))
def test_trimmed_text_equals_encode_text_and_its_gradients(micro, eots, seed):
    """encode_text_trimmed is encode_text up to rounding: features and the gradients of every parameter,
    whatever the end-of-text positions (the causal mask hides the padding from the pooled token)."""
    model = copy.deepcopy(micro[0]).train()
    text = _tokens(eots, seed=seed)
    w = torch.randn(len(eots), model.text_projection.shape[1], generator=torch.Generator().manual_seed(seed))
    grads = []
    for fn in (model.encode_text, lambda t: encode_text_trimmed(model, t)):
        model.zero_grad(set_to_none=True)
        out = fn(text)  # (B, D)
        (out * w).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, gf), (trim, gt) = grads
    assert trim.shape == full.shape == (len(eots), 128)
    torch.testing.assert_close(trim, full, rtol=1e-5, atol=1e-5)
    assert gf.keys() == gt.keys() and "token_embedding.weight" in gf and "visual.conv1.weight" not in gf
    for n in gf:  # to rounding on the scale of each gradient (sums of other lengths, other orders)
        assert (gt[n] - gf[n]).abs().max() <= 1e-5 * gf[n].abs().max() + 1e-8, n
    # the positions after the batch's last end-of-text token get no gradient either way
    assert not gf["positional_embedding"][max(eots) + 1:].any()


def test_trimmed_text_runs_only_up_to_the_last_end_of_text(micro, monkeypatch):
    model = micro[0]
    seen = []
    real = type(model.transformer).forward
    monkeypatch.setattr(type(model.transformer), "forward",
                        lambda self, x, attn_mask=None: seen.append(tuple(x.shape)) or real(self, x, attn_mask))
    with torch.no_grad():
        encode_text_trimmed(model, _tokens([3, 9, 5]))
        model.encode_text(_tokens([3, 9, 5]))
    assert seen == [(3, 10, 128), (3, 32, 128)]


def test_text_encoder_resolves_once_and_refuses_what_it_cannot_trim(micro):
    model = micro[0]
    assert text_encoder(model, "full") == model.encode_text
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(model, "trim")(_tokens([4, 7])), model.encode_text(_tokens([4, 7])))
    with pytest.raises(ValueError, match="text context must be one of"):
        text_encoder(model, "auto")
    other = copy.deepcopy(model)
    other.text_pool_type = "first"
    with pytest.raises(ValueError, match="pools the text with 'first'"):
        text_encoder(other, "trim")
    assert text_encoder(other, "full") == other.encode_text
    bidir = copy.deepcopy(model)
    bidir.attn_mask = torch.zeros_like(model.attn_mask)
    with pytest.raises(ValueError, match="not causal"):
        encode_text_trimmed(bidir, _tokens([4]))
    with pytest.raises(ValueError, match="not an open_clip CLIP"):
        encode_text_trimmed(torch.nn.Linear(2, 2), _tokens([4]))
    with pytest.raises(ValueError, match=r"must be \(B, L\)"):
        encode_text_trimmed(model, _tokens([4])[0])

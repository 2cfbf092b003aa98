import math

import pytest
import torch
import torch.nn.functional as F

from ovlib.models import load_clip
from ovlib.train.pretrain import (
    PRETRAIN_NO_DECAY,
    ClipPretrainConfig,
    DinoPretrainConfig,
    clip_loss,
    clip_train_flops_per_sample,
    dino_loss,
    multicrop,
    param_groups,
    pretrain_clip,
    pretrain_configs,
    pretrain_vfm,
    warmup_cosine,
)


def test_clip_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    ls = torch.tensor(math.log(10.0))
    ref = 0.0
    for i in range(5):
        row = [10.0 * float(a[i] @ b[j]) for j in range(5)]
        col = [10.0 * float(a[j] @ b[i]) for j in range(5)]
        ref += -row[i] + math.log(sum(math.exp(r) for r in row))
        ref += -col[i] + math.log(sum(math.exp(c) for c in col))
    assert float(clip_loss(a, b, ls)) == pytest.approx(ref / 10, rel=1e-5)
    # perfectly aligned, orthogonal pairs at a high temperature: loss -> 0
    eye = torch.eye(4)
    assert float(clip_loss(eye, eye, torch.tensor(math.log(100.0)))) < 1e-10
    ls = torch.tensor(0.0, requires_grad=True)
    clip_loss(eye, eye, ls).backward()
    assert ls.grad < 0  # raising the scale lowers the loss of aligned pairs


def test_dino_loss_matches_brute_force_and_skips_same_view():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 6, generator=g) for _ in range(4)]
    t = [torch.randn(3, 6, generator=g) for _ in range(2)]
    c = torch.randn(1, 6, generator=g)
    ref, n = 0.0, 0
    for ti in range(2):
        p = F.softmax((t[ti] - c) / 0.04, -1)
        for si in range(4):
            if si != ti:
                ref += float((-(p * F.log_softmax(s[si] / 0.1, -1)).sum(-1)).mean())
                n += 1
    assert float(dino_loss(s, t, c, 0.1, 0.04)) == pytest.approx(ref / n, rel=1e-5)
    assert n == 6


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_param_groups_exclude_norms_biases_scale_embeddings():
    from ovlib.models import load_clip

    model, _, _ = load_clip("micro-clip")
    decay, no = param_groups(model, 0.1, PRETRAIN_NO_DECAY)
    names = {id(p): n for n, p in model.named_parameters()}
    no_names = {names[id(p)] for p in no["params"]}
    assert "logit_scale" in no_names and "positional_embedding" in no_names
    assert "token_embedding.weight" in no_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no["params"]) == len(list(model.parameters()))


def test_multicrop_identity_and_determinism():
    x = torch.rand(2, 3, 16, 16)
    v = multicrop(x, 1, 16, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1.0, 1.0), flip=False,
                  sampling_ratio=1)[0]
    torch.testing.assert_close(v, x, atol=1e-5, rtol=0)  # full-image box at the same size
    a = multicrop(x, 3, 8, (0.2, 0.5), torch.Generator().manual_seed(3))
    b = multicrop(x, 3, 8, (0.2, 0.5), torch.Generator().manual_seed(3))
    assert len(a) == 3 and a[0].shape == (2, 3, 8, 8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_pretrain_configs_profiles():
    from ovlib.train.mae import MaeVfmPretrainConfig

    c, v = pretrain_configs("smoke", 0.01)
    assert c.steps == 30 and v.steps == 5
    assert isinstance(v, MaeVfmPretrainConfig) and isinstance(pretrain_configs("micro")[1], MaeVfmPretrainConfig)
    c2, _ = pretrain_configs("micro", 1.0)
    c3, _ = pretrain_configs("micro", 0.5)
    assert c3.steps == round(c2.steps * 0.5)
    with pytest.raises(ValueError, match="profile"):
        pretrain_configs("huge")
    with pytest.raises(ValueError, match="steps_scale"):
        pretrain_configs("micro", 0.0)


def test_vfm_config_follows_the_profiles_objective():
    """budgets.pretrain.vfm.objective picks the config class; the budget's other keys set its fields; an unknown
    objective names the choices."""
    import copy

    from ovlib.config import load_profile
    from ovlib.train.mae import MaeVfmPretrainConfig
    from ovlib.train.pretrain import DenseVfmPretrainConfig, dense_vfm_config, vfm_config

    P = load_profile("micro")
    mae = vfm_config(P)
    assert isinstance(mae, MaeVfmPretrainConfig) and mae.steps == P["budgets"]["pretrain"]["vfm"]["steps"]
    dense = copy.deepcopy(P)
    dense["budgets"]["pretrain"]["vfm"]["objective"] = "dense"
    d = vfm_config(dense, 0.5)
    assert isinstance(d, DenseVfmPretrainConfig) and d.steps == round(mae.steps * 0.5) and d.precision == "fp32"
    assert dense_vfm_config(P) == vfm_config(dense)  # the dense config with the profile's budget, any objective
    dense["budgets"]["pretrain"]["vfm"]["objective"] = "ibot"
    with pytest.raises(ValueError, match=r"'ibot' is not one of \(('dense', 'mae'|'mae', 'dense')\)"):
        vfm_config(dense)


def test_every_vfm_objective_is_registered_whatever_is_imported_first():
    """ovlib.train.mae registers "mae" with ovlib.train.pretrain (it builds on that module, so pretrain cannot import
    it); the ovlib.train package imports it, so a fresh interpreter that imports only the pre-training module
    already knows both objectives."""
    import subprocess
    import sys

    code = "from ovlib.train.pretrain import VFM_OBJECTIVES; print(sorted(VFM_OBJECTIVES))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['dense', 'mae']"


def test_profile_files_keep_the_pretraining_configs_and_their_cache_keys(repo_root):
    """The budgets moved from code (``_PROFILE_SIZES``, ``_DENSE_SMOKE``, ``clipseg_config``'s branch) to
    ``budgets.pretrain`` of the profile files without changing a config: the trained micro backbones in the caches
    stay valid. Expected: the configs the code built before the move (micro = the dataclass defaults; smoke = small
    batches and step floors at steps_scale 0.01) with the profile's ``precision`` (fp32 in micro and smoke since
    the precision study, which changed their keys once; ``auto``, the dataclass default, in paper), and the cache
    key of the micro CLIP the book trains. The micro VFM is MAE's config (``objective: mae``) since the VFM trials
    chose it, at 150 steps in micro since they showed MAE's grouping does not grow past them (the dataclass defaults
    otherwise): both changes retrained the VFM on purpose. The micro CLIP's key changed once more with
    ``text_context: trim`` (the same function computed with less work; its weights differ by rounding)."""
    from dataclasses import replace

    from ovlib import config
    from ovlib.io import config_hash
    from ovlib.train.mae import MaeVfmPretrainConfig
    from ovlib.train.proxies import ClipSegPretrainConfig, clipseg_config

    for profile, prec, vfm_steps in (("micro", "fp32", {"steps": 150, "warmup": 15}), ("paper", "auto", {})):
        c, v = pretrain_configs(profile, 1.0, 0)
        assert c == replace(ClipPretrainConfig(), precision=prec)
        assert v == replace(MaeVfmPretrainConfig(), precision=prec, **vfm_steps)
        assert clipseg_config(profile, 1.0, 0) == ClipSegPretrainConfig(clip=config_hash(c), precision=prec)
    # data/cache/micro-clip/micro-clip-79f7caf0d909.pt
    assert config_hash(pretrain_configs("micro", 1.0, 0)[0]) == "79f7caf0d909"
    c, v = pretrain_configs("smoke", 0.01, 0)
    assert c == replace(ClipPretrainConfig(), batch_size=16, ckpt_every=1000, steps=30, warmup=3, precision="fp32")
    assert v == replace(MaeVfmPretrainConfig(), batch_size=8, ckpt_every=1000, steps=5, warmup=1, precision="fp32")
    assert clipseg_config("smoke", 0.01, 0) == replace(ClipSegPretrainConfig(clip=config_hash(c)), batch_size=8,
                                                       ckpt_every=1000, steps=20, warmup=2, precision="fp32")
    c, v = pretrain_configs("micro", 0.5, 3)  # steps and warm-up scale; the seed sets the world's
    assert (c.steps, c.warmup, c.seed, c.world_seed) == (180, 18, 3, 3) and (v.steps, v.warmup) == (75, 7)
    # resolved parameters give what the profile name gives, and their budgets (an override) are the ones read
    p = config.resolve("micro", root=repo_root)
    assert pretrain_configs(p, 1.0, 0) == pretrain_configs("micro", 1.0, 0)
    p["budgets"]["pretrain"]["clip"]["batch_size"] = 64
    assert pretrain_configs(p, 1.0, 0)[0].batch_size == 64


def test_smoke_clip_pretraining_loss_decreases_and_caches(tmp_path):
    cfg, _ = pretrain_configs("smoke", 0.01)
    model, tok, info = pretrain_clip(cfg, tmp_path, progress=False)
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert not info["loaded"] and info["path"].endswith(".pt")
    assert info["matmul_peak"] > 0  # MFU of a cached model is against the peak of the run that trained it
    m2, _, info2 = pretrain_clip(cfg, tmp_path, progress=False)
    assert info2["loaded"]
    for (n, p), (_, q) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n


def test_trimmed_and_full_text_context_train_the_same_model_to_rounding(tmp_path):
    """``text_context``: "trim" and "full" are the same function (ovlib.models.clip.encode_text_trimmed), so two
    steps of each give the same losses and weights to rounding; the history records the text positions each step
    ran (the batch's last end-of-text token + 1 when trimmed, the context length otherwise); they are two cache
    entries; an unknown context is refused before anything is trained."""
    from dataclasses import replace

    from ovlib.io import config_hash

    cfg = ClipPretrainConfig(batch_size=8, steps=2, warmup=1, ckpt_every=1000, precision="fp32")
    out = {}
    for ctx in ("trim", "full"):
        c = replace(cfg, text_context=ctx)
        model, tok, info = pretrain_clip(c, tmp_path / ctx, progress=False)
        out[ctx] = (model, info)
    (m_t, i_t), (m_f, i_f) = out["trim"], out["full"]
    assert [h["text_len"] for h in i_f["history"]] == [32, 32]
    assert all(1 < h["text_len"] < 32 for h in i_t["history"])
    assert [h["loss"] for h in i_t["history"]] == pytest.approx([h["loss"] for h in i_f["history"]], rel=1e-5)
    # AdamW turns the rounding noise of gradients that are zero in exact arithmetic (the attention's key bias:
    # softmax does not see it) into steps of up to ~lr, so the weights agree to the optimiser's step size; the
    # rest to rounding
    sd_t, sd_f = m_t.state_dict(), m_f.state_dict()
    for n in sd_t:
        assert (sd_t[n] - sd_f[n]).abs().max() <= 2 * cfg.lr * cfg.steps, n
    assert sum(not torch.allclose(sd_t[n], sd_f[n], rtol=1e-4, atol=1e-5) for n in sd_t) <= len(sd_t) // 10
    assert config_hash(replace(cfg, text_context="trim")) != config_hash(replace(cfg, text_context="full"))
    with pytest.raises(ValueError, match="text context must be one of"):
        pretrain_clip(replace(cfg, text_context="short"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.pt"))


def test_clip_train_flops_count_the_text_positions_run():
    model, tok, _ = load_clip("micro-clip")
    full = clip_train_flops_per_sample(model, tok, 64)
    assert clip_train_flops_per_sample(model, tok, 64, text_len=32) == full
    short = [clip_train_flops_per_sample(model, tok, 64, text_len=n) for n in (4, 12, 20)]
    assert short[0] < short[1] < short[2] < full
    with pytest.raises(ValueError, match="text_len"):
        clip_train_flops_per_sample(model, tok, 64, text_len=33)


def test_clip_resume_equals_straight_run(tmp_path):
    cfg = ClipPretrainConfig(batch_size=4, steps=3, warmup=1, ckpt_every=1, precision="fp32")
    straight, _, _ = pretrain_clip(cfg, tmp_path / "a", progress=False)
    _, _, part = pretrain_clip(cfg, tmp_path / "b", progress=False, max_steps=2)
    assert part["path"].endswith(".state.pt") and len(part["history"]) == 2
    resumed, _, info = pretrain_clip(cfg, tmp_path / "b", progress=False)
    assert [h["step"] for h in info["history"]] == [1, 2, 3]
    for (n, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)


def test_smoke_dino_runs_and_caches(tmp_path):
    cfg = DinoPretrainConfig(batch_size=4, steps=3, warmup=1, n_local=2, global_size=32, local_size=16,
                             out_dim=64, precision="fp32")
    vfm, info = pretrain_vfm(cfg, tmp_path, progress=False)
    assert len(info["history"]) == 3 and all(math.isfinite(h["loss"]) for h in info["history"])
    assert info["history"][0]["ema"] == pytest.approx(0.996) and info["matmul_peak"] > 0
    vfm2, info2 = pretrain_vfm(cfg, tmp_path, progress=False)
    assert info2["loaded"]
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(vfm.forward_features(x), vfm2.forward_features(x))


def test_resolve_precision_and_matmul_peak():
    from ovlib.train.pretrain import forward_flops, matmul_peak, resolve_precision

    assert resolve_precision("fp32") is False and resolve_precision("bf16") is True
    assert isinstance(resolve_precision("auto"), bool)
    assert resolve_precision("auto") is resolve_precision("auto")  # one fact per process, never a timing
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")
    assert matmul_peak(torch.float32, n=64, seconds=0.05) > 0
    a, b = torch.zeros(3, 4), torch.zeros(4, 5)
    assert forward_flops(lambda: a @ b) == 2 * 3 * 4 * 5


def test_auto_precision_is_a_cpu_capability_not_a_timing():
    from ovlib.train.pretrain import cpu_has_amx_bf16

    amx = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n"
    assert cpu_has_amx_bf16(amx) is True
    assert cpu_has_amx_bf16(zen4) is False  # AVX512-BF16 alone: fp32 (bf16 near fp32's speed there)
    assert cpu_has_amx_bf16("model name\t: amx_bf16 in a name\n") is False  # only the flags line counts


@pytest.mark.parametrize("damage", ["truncated", "flipped", "other-config", "corrupt-state"])
def test_bad_cache_file_is_a_counted_rebuild_never_a_wrong_model(tmp_path, damage, caplog):
    """A truncated / bit-flipped / mismatched micro CLIP cache file, or a corrupt resumable state, is set aside
    (``*.corrupt-<k>``), counted and logged, and the model is rebuilt -- equal to the original."""
    from dataclasses import replace

    from ovlib.io import cache_path, load_cache, rebuild_counts, safe_load

    cfg = ClipPretrainConfig(batch_size=4, steps=3, warmup=1, ckpt_every=1, precision="fp32")
    model, _, info = pretrain_clip(cfg, tmp_path, progress=False)
    final = cache_path(tmp_path, cfg.model, cfg)
    assert info["path"] == str(final)
    if damage == "truncated":
        final.write_bytes(final.read_bytes()[: final.stat().st_size * 2 // 3])
    elif damage == "flipped":  # a flipped byte inside a weight: torch.load would read it without complaint
        w = model.state_dict()["visual.proj"].contiguous()
        blob = bytearray(final.read_bytes())
        i = blob.find(w.view(torch.uint8).numpy().tobytes())
        assert i >= 0
        blob[i + 1] ^= 0x40
        final.write_bytes(bytes(blob))
    elif damage == "other-config":  # a valid file of another recipe under this config's name
        other = replace(cfg, lr=cfg.lr / 2)
        pretrain_clip(other, tmp_path / "o", progress=False)
        final.write_bytes(cache_path(tmp_path / "o", other.model, other).read_bytes())
    else:  # stop before the end, then damage the resumable state: training starts over
        final.unlink()
        pretrain_clip(cfg, tmp_path, progress=False, max_steps=2)
        state = final.with_name(final.name[:-3] + ".state.pt")
        state.write_bytes(state.read_bytes()[:100])
    bad = final.with_name(final.name[:-3] + ".state.pt") if damage == "corrupt-state" else final
    before = rebuild_counts().get(bad.name, 0)
    with caplog.at_level("WARNING", logger="ovlib.io"):
        rebuilt, _, info2 = pretrain_clip(cfg, tmp_path, progress=False)
    assert not info2["loaded"] and [h["step"] for h in info2["history"]] == [1, 2, 3]
    assert rebuild_counts()[bad.name] == before + 1 and str(bad) in caplog.text
    assert bad.with_name(bad.name + ".corrupt-1").is_file()
    for (n, p), (_, q) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(p, q), n
    assert load_cache(final) is not None and safe_load(final)["info"]["config"]["lr"] == cfg.lr

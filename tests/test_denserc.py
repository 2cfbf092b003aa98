"""DenseRC: the construction (multi-v base, HSG, qk/qq ablations), its losses, and the Distiller.

Backbones: the micro CLIP (random, perturbed so every bias and LayerNorm is non-trivial) and, for the EVA
paths, a random EVA02-B-16 at 32 px. References are :func:`ovlib.models.dense_features` (pinned against raw
weights in ``test_models_dense.py``) or raw torch modules, never the code under test.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovlib.methods.clipself import rla_loss
from ovlib.methods.denserc import (
    CONSTRUCTS,
    HSG,
    DenseConstructor,
    DenseRC,
    DenseRCConfig,
    coherence_loss,
    denserc_dense_fn,
    load_constructor,
    semantics_loss,
    spatial_aggregate,
    vfm_similarity,
)
from ovlib.models import dense_features, load_clip, patch_correlation, roi_features, vit_adapter
from tests.helpers.method_batches import micro_nets, synthetic_method_batch
from tests.helpers.towers import perturb, shared_tower


@pytest.fixture(scope="module")
def micro():
    return perturb(load_clip("micro-clip", seed=0)[0], 1)


@pytest.fixture(scope="module")
def eva():
    return shared_tower("EVA02-B-16", 32, 4)


def _x(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ones(cons: DenseConstructor) -> DenseConstructor:
    """Gates forced to exactly 1 (sigmoid(1e4) == 1.0 in float32)."""
    with torch.no_grad():
        for lin in cons.hsg.proj:
            lin.weight.zero_()
            lin.bias.fill_(1e4)
    return cons


# ------------------------------------------------------------------------------------------------ config
def test_config_validation_and_layers():
    assert DenseRCConfig().layers(4) == [1, 2, 3]  # paper: last three
    assert DenseRCConfig(n_layers="all").layers(4) == [0, 1, 2, 3] == DenseRCConfig(n_layers=-1).layers(4)
    assert DenseRCConfig(base="v").layers(12) == [11]
    assert DenseRCConfig(n_layers=1).layers(12) == [11]
    for bad in (dict(base="vv"), dict(construct="kk"), dict(projection="x"), dict(gate_source="first"),
                dict(pool="mean"), dict(n_layers=0), dict(n_layers="some"), dict(base="v", n_layers=3),
                dict(base="x+v", construct="hsg")):
        with pytest.raises(ValueError):
            DenseRCConfig(**bad)
    with pytest.raises(ValueError, match="exceeds"):
        DenseRCConfig(n_layers=5).layers(4)
    opts = {"construct": "qq", "n_layers": 2, "tokenizer": None}
    cfg = DenseRCConfig.take(opts)
    assert (cfg.construct, cfg.n_layers) == ("qq", 2) and opts == {"tokenizer": None}


# ------------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("n", [1, 2, 3, "all"])
def test_hsg_with_unit_gates_is_the_ungated_multi_v_sum(micro, n):
    x = _x()
    ref = dense_features(micro, x, "multi-v", normalize=False, n_layers=4 if n == "all" else n)
    for kw in (dict(), dict(shared_gate=False), dict(gate_source="last")):
        cons = _ones(DenseConstructor.for_model(DenseRCConfig(construct="hsg", n_layers=n, **kw), micro))
        torch.testing.assert_close(cons(micro, x, normalize=False), ref, rtol=0, atol=1e-6)
    plain = DenseConstructor.for_model(DenseRCConfig(construct="none", n_layers=n), micro)
    torch.testing.assert_close(plain(micro, x, normalize=False), ref, rtol=0, atol=1e-6)


def test_hsg_gates_scale_heads_token_by_token(micro):
    """A gate of 0 on head h at token n removes exactly head h's value there (brute force on the last block)."""
    x = _x()
    cons = DenseConstructor.for_model(DenseRCConfig(construct="hsg", n_layers=1), micro)
    ad = vit_adapter(micro)
    stack = cons.values(micro, x)
    g = torch.rand(2, stack.z[0].shape[1], ad.num_heads, generator=torch.Generator().manual_seed(3))
    cons.gates = lambda s: [g]  # fixed gates (B, T, H)
    out = cons.construct(micro, stack)
    i, H, D = ad.num_blocks - 1, ad.num_heads, ad.width
    blk = micro.visual.transformer.resblocks[i]
    v = F.linear(stack.z[0], blk.attn.in_proj_weight[2 * D:], blk.attn.in_proj_bias[2 * D:])  # (B, T, D)
    gated = v * g.repeat_interleave(D // H, dim=-1)  # channel c belongs to head c // d
    y = blk.attn.out_proj(gated)
    ref = (micro.visual.ln_post(y) @ micro.visual.proj)[:, 1:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bases_v_and_x_plus_v_match_dense_modes(micro):
    x = _x()
    for base, mode in (("v", "v"), ("x+v", "x+v")):
        cons = DenseConstructor.for_model(DenseRCConfig(base=base, construct="none"), micro)
        torch.testing.assert_close(cons(micro, x), dense_features(micro, x, mode), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="value stack"):
        DenseConstructor.for_model(DenseRCConfig(base="x+v", construct="none"), micro).values(micro, x)


def test_qk_is_the_layers_own_attention(micro):
    """``qk`` with one layer: the last block's own nn.MultiheadAttention output (no residual, no FFN)."""
    x = _x()
    cons = DenseConstructor.for_model(DenseRCConfig(construct="qk", n_layers=1), micro)
    ad = vit_adapter(micro)
    tokens = ad.run_blocks(ad.embed(x)[0], 0, ad.num_blocks - 1)
    blk = micro.visual.transformer.resblocks[-1]
    z = blk.ln_1(tokens)
    y = blk.ls_1(blk.attn(z, z, z, need_weights=False)[0])
    ref = F.normalize((micro.visual.ln_post(y) @ micro.visual.proj)[:, 1:], dim=-1)
    torch.testing.assert_close(cons(micro, x).flatten(2).transpose(1, 2), ref, rtol=1e-5, atol=1e-5)


def test_qq_is_declips_unscaled_self_self_attention(micro):
    x = _x()
    for scale in (None, True):
        cons = DenseConstructor.for_model(DenseRCConfig(construct="qq", n_layers=1, attn_scale=scale), micro)
        ref = dense_features(micro, x, "qq", scale=bool(scale), residual=False, ffn=False)
        torch.testing.assert_close(cons(micro, x), ref, rtol=1e-5, atol=1e-5)


def test_spatial_aggregate_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 3, generator=g) for _ in range(3))
    out = spatial_aggregate(q, k, v, 0.5)
    for h in range(2):
        for i in range(5):
            w = torch.softmax(torch.stack([0.5 * (q[0, h, i] @ k[0, h, j]) for j in range(5)]), 0)
            torch.testing.assert_close(out[0, h, i], (w[:, None] * v[0, h]).sum(0))


def test_final_each_projection(micro):
    """``final_each``: every layer through the final norm + projection alone, summed in the joint space."""
    x = _x()
    own1 = DenseConstructor.for_model(DenseRCConfig(construct="none", n_layers=1), micro)
    each1 = DenseConstructor.for_model(DenseRCConfig(construct="none", n_layers=1, projection="final_each"), micro)
    torch.testing.assert_close(own1(micro, x), each1(micro, x), rtol=0, atol=1e-6)
    each3 = DenseConstructor.for_model(DenseRCConfig(construct="none", n_layers=3, projection="final_each"), micro)
    ad = vit_adapter(micro)
    stack = each3.values(micro, x)
    ref = sum(micro.visual.ln_post(ad.ls1(blk, ad.attn_out(blk, v))[:, 1:]) @ micro.visual.proj
              for blk, v in zip(stack.layers, stack.v))
    torch.testing.assert_close(each3.construct(micro, stack), ref, rtol=1e-5, atol=1e-5)
    own3 = DenseConstructor.for_model(DenseRCConfig(construct="none", n_layers=3), micro)
    assert not torch.allclose(own3(micro, x), each3(micro, x), atol=1e-3)


@pytest.mark.parametrize("construct", CONSTRUCTS)
def test_no_token_mixing_except_spatial_aggregation(micro, construct):
    """Perturbing token j of every used layer's LN(x) and values changes only token j -- unless A_p
    aggregates over space (qk, qq), where the other tokens move too."""
    x = _x(b=1)
    cons = DenseConstructor.for_model(DenseRCConfig(construct=construct), micro)
    if cons.hsg is not None:  # non-trivial gates
        with torch.no_grad():
            for lin in cons.hsg.proj:
                lin.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    stack = cons.values(micro, x)
    base = cons.construct(micro, stack)  # (1, N, C)
    j = 5  # patch index; token j + 1 (after cls)
    g = torch.Generator().manual_seed(2)
    stack.z = [z.clone() for z in stack.z]
    stack.v = [v.clone() for v in stack.v]
    for s in range(len(stack.layers)):
        stack.z[s][:, j + 1] += torch.randn(stack.z[s].shape[-1], generator=g)
        stack.v[s][:, :, j + 1] += torch.randn(stack.v[s].shape[1], stack.v[s].shape[-1], generator=g)
        for t in (stack.q, stack.k):
            if t[s] is not None:
                t[s] = t[s].clone()
                t[s][:, :, j + 1] += torch.randn(t[s].shape[1], t[s].shape[-1], generator=g)
    out = cons.construct(micro, stack)
    others = [i for i in range(out.shape[1]) if i != j]
    assert not torch.allclose(out[:, j], base[:, j], atol=1e-4)
    if construct in ("none", "hsg"):
        assert torch.equal(out[:, others], base[:, others])
    else:
        moved = (out[:, others] - base[:, others]).abs().amax(-1) > 0  # (1, N-1)
        assert moved.float().mean() > 0.5  # (unscaled qq can saturate a row's softmax on a random tower)


def test_hsg_adds_exactly_w_h(micro):
    student, teacher, vfm, _ = micro_nets()
    n_student = sum(p.numel() for p in student.parameters())
    D, H = vit_adapter(student).width, vit_adapter(student).num_heads
    for kw, extra in ((dict(construct="hsg"), D * H + H), (dict(construct="hsg", gate_source="last"), D * H + H),
                      (dict(construct="hsg", shared_gate=False), 3 * (D * H + H)),
                      (dict(construct="none"), 0), (dict(construct="qq"), 0), (dict(construct="qk"), 0)):
        m = DenseRC(copy.deepcopy(student), {"teacher": teacher, "vfm": vfm}, **kw)
        assert sum(p.numel() for p in m.parameters()) - n_student == extra, kw
    m = DenseRC(copy.deepcopy(student), {"teacher": teacher, "vfm": vfm})
    assert {n for n, _ in m.named_parameters() if not n.startswith("student.")} == {
        "constructor.hsg.proj.0.weight", "constructor.hsg.proj.0.bias"}
    hsg = HSG(D, H, bias_init=2.0)
    assert torch.allclose(hsg(torch.randn(1, 3, D)), torch.sigmoid(torch.tensor(2.0)).expand(1, 3, H))


def test_eva_hsg_unit_gates_and_unused_parameters(eva):
    x = _x(b=1)
    cons = _ones(DenseConstructor.for_model(DenseRCConfig(construct="hsg"), eva))
    ref = dense_features(eva, x, "multi-v", normalize=False, n_layers=3)
    torch.testing.assert_close(cons(eva, x, normalize=False), ref, rtol=1e-5, atol=1e-5)
    names = {id(p) for p in cons.unused_tower_parameters(eva)}
    last = eva.trunk.blocks[-1]
    assert {id(p) for p in last.attn.q_proj.parameters()} <= names and {id(p) for p in last.mlp.parameters()} <= names
    assert not ({id(p) for p in last.attn.v_proj.parameters()} & names)
    qq = DenseConstructor.for_model(DenseRCConfig(construct="qq"), eva)
    qq_names = {id(p) for p in qq.unused_tower_parameters(eva)}
    assert not ({id(p) for p in last.attn.q_proj.parameters()} & qq_names)
    assert {id(p) for p in last.attn.k_proj.parameters()} <= qq_names


# ------------------------------------------------------------------------------------------------ losses
def test_coherence_loss_is_mse_and_zero_for_identical():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 5, generator=g), torch.randn(2, 5, 5, generator=g)
    brute = sum(float(a[i, m, n] - b[i, m, n]) ** 2 for i in range(2) for m in range(5) for n in range(5)) / 50
    assert coherence_loss(a, b).item() == pytest.approx(brute, rel=1e-6)
    assert coherence_loss(a, a.clone()).item() == 0.0
    feats = torch.randn(2, 4, 3, 3, generator=g)
    scaled = coherence_loss(patch_correlation(feats), patch_correlation(feats * 3.0)).item()
    assert scaled == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError):
        coherence_loss(a, b[:, :4, :4])


def test_semantics_loss_is_clipself_rla():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert semantics_loss(s, t).item() == rla_loss(s, t).item()
    assert semantics_loss(t, 2 * t).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ distiller
@pytest.fixture(scope="module")
def nets():
    return micro_nets()


def _method(nets, **kw):
    student, teacher, vfm, _ = nets
    return DenseRC(copy.deepcopy(student), {"teacher": teacher, "vfm": vfm}, **kw)


def test_denserc_needs_vfm_and_rejects_unknown_options(nets):
    student, teacher, vfm, _ = nets
    with pytest.raises(ValueError, match="vfm"):
        DenseRC(copy.deepcopy(student), {"teacher": teacher})
    with pytest.raises(TypeError, match="unknown option"):
        DenseRC(copy.deepcopy(student), {"teacher": teacher, "vfm": vfm}, gates="x")
    b = synthetic_method_batch()
    del b["vfm_images"]
    with pytest.raises(KeyError, match="vfm_images"):
        _method(nets)(b)


@pytest.mark.parametrize("pool", ["normalize_first", "pool_first"])
def test_denserc_losses_match_manual_pipeline(nets, pool):
    _, teacher, vfm, _ = nets
    m = _method(nets, pool=pool, construct="none")
    b = synthetic_method_batch()
    out = m(b)
    assert set(out) == set(DenseRC.loss_names) == {"semantics", "coherence"}
    dense = dense_features(m.student, b["images"], "multi-v", normalize=False, n_layers=3)
    src = F.normalize(dense, dim=1) if pool == "normalize_first" else dense
    rois = F.normalize(roi_features(src, b["boxes"], (32, 32)), dim=-1)
    t = F.normalize(teacher.encode_image(b["crops"]), dim=-1)
    assert out["semantics"].item() == pytest.approx(1 - (rois * t).sum(-1).mean().item(), abs=1e-4)
    from ovlib.models import vfm_patch_features

    S_t = patch_correlation(vfm_patch_features(vfm, b["vfm_images"], (4, 4)))
    S_s = patch_correlation(dense)
    assert out["coherence"].item() == pytest.approx(((S_s - S_t) ** 2).mean().item(), rel=1e-3, abs=1e-6)


def test_denserc_resizes_student_to_vfm_grid(nets):
    m = _method(nets)
    b = synthetic_method_batch(vfm_size=48)  # VFM grid 6x6, student grid 4x4
    out = m(b)
    assert torch.isfinite(out["coherence"])
    S_t, grid = vfm_similarity(nets[2], b["vfm_images"])
    assert grid == (6, 6) and S_t.shape == (2, 36, 36)


@pytest.mark.parametrize("construct", CONSTRUCTS)
def test_every_trainable_parameter_gets_a_gradient(nets, construct):
    """What DDP needs: after one backward every parameter that requires grad has one (unused ones frozen)."""
    from ovlib.train.distill import lock_visual

    student, teacher, vfm, _ = nets
    student = copy.deepcopy(student)
    lock_visual(student, -1)  # as the launcher, before the method: text tower frozen, image tower trainable
    m = DenseRC(student, {"teacher": teacher, "vfm": vfm}, construct=construct)
    m.train()
    out = m(synthetic_method_batch())
    (out["semantics"] + 0.025 * out["coherence"]).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    if construct == "hsg":
        assert m.constructor.hsg.proj[0].weight.grad.abs().sum() > 0


def test_denserc_three_steps_decrease_on_fixed_batch(nets):
    m = _method(nets)
    teacher, vfm = nets[1], nets[2]
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    b = synthetic_method_batch()
    totals = []
    for _ in range(3):
        out = m(b)
        total = out["semantics"] + 0.025 * out["coherence"]
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    with torch.no_grad():
        out = m(b)
    totals.append((out["semantics"] + 0.025 * out["coherence"]).item())
    assert totals[-1] < totals[0], totals
    assert m.constructor.hsg.proj[0].weight.abs().sum() > 0  # W_H moved off its zero init
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in vfm.parameters())


def test_load_constructor_and_dense_fn_roundtrip(nets, tmp_path):
    m = _method(nets, construct="hsg", n_layers=2)
    with torch.no_grad():
        m.constructor.hsg.proj[0].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    torch.save({"model": m.state_dict()}, tmp_path / "ck.pt")
    cons = load_constructor(tmp_path / "ck.pt", m.student, construct="hsg", n_layers=2)
    x = torch.rand(1, 3, 32, 32)
    fn = denserc_dense_fn(m.student, cons)
    from ovlib.eval._common import normalize_images
    from ovlib.train.pretrain import image_mean_std

    ref = m.constructor(m.student, normalize_images(x, *image_mean_std(m.student)), normalize=True)
    torch.testing.assert_close(fn(x), ref)
    with pytest.raises(RuntimeError):  # wrong architecture: the gate weights do not fit
        load_constructor(tmp_path / "ck.pt", m.student, construct="hsg", shared_gate=False, n_layers=2)


def test_denserc_trains_through_the_launcher(tmp_path, repo_root):
    """The registered method end to end on the smoke profile (recipe lines passed as overrides here)."""
    from ovlib import config
    from ovlib.methods import METHODS
    from ovlib.models import load_vfm
    from ovlib.train.launch import train

    assert METHODS["denserc"] is DenseRC
    torch.save(load_clip("micro-clip", seed=0)[0].state_dict(), tmp_path / "clip.pt")
    torch.save(load_vfm("micro-vfm", seed=0).state_dict(), tmp_path / "vfm.pt")
    params = config.resolve("smoke", [f"data_root={tmp_path / 'mw'}", f"cache_dir={tmp_path / 'cache'}"],
                            root=repo_root)
    overrides = {"pretrained": str(tmp_path / "clip.pt"), "vfm_pretrained": str(tmp_path / "vfm.pt"),
                 "max_images": 6, "vfm": "micro-vfm", "loss_weights": {"semantics": 1.0, "coherence": 0.025},
                 "method_args": {"construct": "hsg", "n_layers": 3}}
    res = train(params, "denserc", overrides)
    assert res["steps"] == 3
    rec = [json.loads(ln) for ln in (Path(res["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(rec[-1][t]) for t in DenseRC.loss_names)
    student = load_clip("micro-clip", seed=0)[0]
    cons = load_constructor(res["weights"], student, construct="hsg", n_layers=3)
    assert cons.hsg.proj[0].weight.abs().sum() > 0  # the ensemble keeps the trained W_H


def test_gate_lr_mult_puts_w_h_in_its_own_group(nets):
    from ovlib.train.optim import param_groups

    m = _method(nets, construct="hsg", gate_lr_mult=50.0)
    groups = param_groups(m, 0.1, lr_mult=m.lr_multipliers(), base_lr=1e-4)
    fast = {id(p) for g in groups if g.get("lr_mult") == 50.0 for p in g["params"]}
    assert fast == {id(p) for p in m.constructor.hsg.parameters()}
    assert all(g["lr"] == pytest.approx(5e-3) for g in groups if "lr_mult" in g)
    assert _method(nets, construct="qq", gate_lr_mult=50.0).lr_multipliers() == {}  # no W_H without HSG
    with pytest.raises(ValueError, match="gate_lr_mult"):
        _method(nets, gate_lr_mult=0.0)


def test_table5_rows_train_at_one_learning_rate_and_the_multiplier_is_its_own_row():
    """Chapter 03's Table 5 at parity: merged over a recipe that trains W_H at 100x (params/micro.yaml), every
    construction's config has gate_lr_mult 1 (HSG included); the multiplier is a separate, labelled row."""
    from ovlib.methods.denserc import TABLE5, DenseRCConfig, table5_rows

    recipe = {"base": "multi-v", "construct": "hsg", "n_layers": 3, "gate_lr_mult": 100.0}
    rows, extra = table5_rows(recipe["gate_lr_mult"])
    assert list(rows) == ["x+v", "v", "multi-v", "qk", "qq", "HSG"] == list(TABLE5)
    assert {DenseRCConfig(**{**recipe, **args}).gate_lr_mult for args in rows.values()} == {1.0}
    assert list(extra) == ["HSG, W_H lr × 100"]
    cfg = DenseRCConfig(**{**recipe, **extra["HSG, W_H lr × 100"]})
    assert (cfg.construct, cfg.gate_lr_mult) == ("hsg", 100.0)
    assert table5_rows(1.0)[1] == {}  # the paper's single learning rate: no extra row
    with pytest.raises(ValueError, match="gate_lr_mult"):
        table5_rows(0.0)


def test_gate_statistics_are_per_image_means_and_stds_of_the_gate_maps(micro):
    from ovlib.methods.denserc import gate_statistics

    cons = DenseConstructor.for_model(DenseRCConfig(construct="hsg", n_layers=2), micro).eval()
    with torch.no_grad():
        for lin in cons.hsg.proj:  # gates that depend on the token
            lin.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    x1, x2 = _x(2, 32, 1), _x(3, 32, 2)
    mean, std = gate_statistics(cons, micro, [x1, x2])
    g = torch.cat([cons.gate_maps(micro, x1), cons.gate_maps(micro, x2)]).double()  # (5, n, N, H)
    assert mean.shape == std.shape == (5, 2, micro.visual.transformer.resblocks[0].attn.num_heads)
    torch.testing.assert_close(mean, g.mean(2))
    torch.testing.assert_close(std, g.std(2))
    assert float(std.max()) > 0
    with pytest.raises(ValueError, match="no images"):
        gate_statistics(cons, micro, [])

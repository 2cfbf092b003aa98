"""SynCLIP: SAR, SSA losses (huber_kl, l2) against hand/brute-force references, texts, and the Distiller."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlib.methods.synclip import (
    READINGS,
    SynCLIP,
    cosine_maps,
    huber_kl_loss,
    l2_row_loss,
    mae_loss,
    sar_aggregate,
    semantic_loss,
    semantic_texts,
)
from ovlib.models import dense_features
from tests.helpers.method_batches import micro_nets, synthetic_method_batch

CATS = [
    {"id": 1, "name": "dog", "synonyms": ["puppy", "canine"], "definition": "a domestic animal.", "split": "base"},
    {"id": 2, "name": "boat", "synonyms": ["ship"], "definition": "a small vessel", "split": "novel"},
    {"id": 5, "name": "grass", "synonyms": [], "definition": "green cover", "split": "stuff", "isthing": False},
]


# ------------------------------------------------------------------------------------------------ SAR
def test_sar_all_tokens_pure_spatial_is_mean_vfm_row():
    g = torch.Generator().manual_seed(0)
    B, T, M = 2, 3, 5
    a_sem = torch.randn(B, T, M, generator=g)
    vfm = torch.randn(B, M, M, generator=g)
    agg, spa = sar_aggregate(a_sem, vfm, topk=M, spa_ratio=1.0, sem_ratio=0.0)
    expect = vfm.mean(dim=1, keepdim=True).expand(B, T, M)  # mean over all rows, same for every text
    torch.testing.assert_close(agg, expect)
    torch.testing.assert_close(spa, expect)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 3), M=st.integers(1, 7), k=st.integers(1, 7),
       a=st.floats(0, 1), seed=st.integers(0, 1000))
def test_sar_brute_force(B, T, M, k, a, seed):
    k = min(k, M)
    g = torch.Generator().manual_seed(seed)
    a_sem = torch.randn(B, T, M, generator=g)
    vfm = torch.randn(B, M, M, generator=g)
    agg, spa = sar_aggregate(a_sem, vfm, topk=k, spa_ratio=a, sem_ratio=1 - a)
    for b in range(B):
        for t in range(T):
            top = sorted(range(M), key=lambda j: -float(a_sem[b, t, j]))[:k]
            ref = sum(vfm[b, j] for j in top) / k
            torch.testing.assert_close(spa[b, t], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(agg[b, t], a * ref + (1 - a) * a_sem[b, t], atol=1e-5, rtol=1e-5)


def test_sar_errors():
    with pytest.raises(ValueError, match="topk"):
        sar_aggregate(torch.zeros(1, 1, 3), torch.zeros(1, 3, 3), topk=4)
    with pytest.raises(ValueError, match="vfm_sim"):
        sar_aggregate(torch.zeros(1, 1, 3), torch.zeros(1, 4, 4))


# ------------------------------------------------------------------------------------------------ SSA losses
def test_ssa_zero_when_maps_equal():
    x = torch.randn(2, 3, 6)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    for kind in ("huber_kl", "l2", "mae"):
        assert semantic_loss(x, x.clone(), valid, kind).item() == pytest.approx(0.0, abs=1e-7)


def test_huber_kl_hand_computed():
    # one valid text (row 0), one padded row with garbage that must not count
    s = torch.tensor([[[0.0, 0.3], [5.0, -5.0]]])
    t = torch.tensor([[[0.05, 0.0], [-3.0, 9.0]]])
    valid = torch.tensor([[True, False]])
    # Huber_0.1: |d| = 0.05 < 0.1 -> 0.5 * 0.05^2 = 0.00125; |d| = 0.3 -> 0.1 * (0.3 - 0.05) = 0.025
    hb = 0.00125 + 0.025
    zp = 1 + math.exp(0.3)
    p = [1 / zp, math.exp(0.3) / zp]
    zq = math.exp(0.05) + 1
    q = [math.exp(0.05) / zq, 1 / zq]
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    assert huber_kl_loss(s, t, valid).item() == pytest.approx(hb + 0.1 * kl, rel=1e-6)
    # the reference form F.kl_div(q.log(), p, reduction="sum") is KL(p || q)
    ref = F.kl_div(torch.tensor(q, dtype=torch.float64).log(), torch.tensor(p, dtype=torch.float64),
                   reduction="sum").item()
    assert ref == pytest.approx(kl, rel=1e-6)
    # two valid copies -> same value (divided by the number of valid texts)
    s2, t2 = torch.cat([s[:, :1], s[:, :1]], 1), torch.cat([t[:, :1], t[:, :1]], 1)
    assert huber_kl_loss(s2, t2, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(hb + 0.1 * kl, rel=1e-6)


def test_l2_row_loss_brute_force_and_masking():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    valid = torch.tensor([[True, False, True], [False, True, False]])
    rows = [(b, i) for b in range(2) for i in range(3) if valid[b, i]]
    ref = sum(math.sqrt(sum((float(s[b, i, m]) - float(t[b, i, m])) ** 2 for m in range(5))) for b, i in rows) / 3
    assert l2_row_loss(s, t, valid).item() == pytest.approx(ref, rel=1e-5)
    s2 = s.clone()
    s2[~valid] = 100.0  # padded rows do not count
    assert l2_row_loss(s2, t, valid).item() == pytest.approx(ref, rel=1e-5)
    assert huber_kl_loss(s2, t, valid).item() == pytest.approx(huber_kl_loss(s, t, valid).item(), rel=1e-6)


def test_mae_loss_hand_case_is_the_papers_mean_absolute_error():
    """The paper's L+_semantic = 1/(nm) sum_ij |A_label - A_agg| on a hand case: n = 2 valid texts (one padded row
    of garbage ignored), m = 3 tokens; it differs from the code's l2 (row norms / n) on the same maps."""
    s = torch.tensor([[[0.5, 0.0, -0.2], [9.0, 9.0, 9.0]], [[0.1, 0.1, 0.1], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.2, 0.4, -0.2], [0.0, 0.0, 0.0]], [[0.0, 0.3, 0.1], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, False], [True, False]])
    # |diffs|: row (0, 0): 0.3, 0.4, 0.0; row (1, 0): 0.1, 0.2, 0.0 -> sum 1.0 over n * m = 2 * 3 entries
    assert mae_loss(s, t, valid).item() == pytest.approx(1.0 / 6.0, rel=1e-6)
    assert semantic_loss(s, t, valid, "mae").item() == pytest.approx(1.0 / 6.0, rel=1e-6)
    # the code's l2: (sqrt(0.09 + 0.16) + sqrt(0.01 + 0.04)) / 2 -- another number on the same maps
    l2 = (0.5 + math.sqrt(0.05)) / 2
    assert l2_row_loss(s, t, valid).item() == pytest.approx(l2, rel=1e-6)
    assert abs(l2 - 1.0 / 6.0) > 0.1
    # gradient of every valid entry: sign(diff) / (n m); padded rows get none
    x = s.clone().requires_grad_(True)
    mae_loss(x, t, valid).backward()
    want = torch.zeros_like(s)
    want[0, 0] = torch.tensor([1.0, -1.0, 0.0]) / 6
    want[1, 0] = torch.tensor([1.0, -1.0, 0.0]) / 6
    torch.testing.assert_close(x.grad, want)


def test_losses_with_no_valid_text_are_zero_with_grad():
    s = torch.randn(1, 2, 4, requires_grad=True)
    for kind in ("huber_kl", "l2", "mae"):
        v = semantic_loss(s, torch.randn(1, 2, 4), torch.zeros(1, 2, dtype=torch.bool), kind)
        assert v.item() == 0.0
        v.backward()
    with pytest.raises(ValueError, match="sem_loss"):
        semantic_loss(s, s, torch.ones(1, 2, dtype=torch.bool), "mse")


def test_cosine_maps():
    text = F.normalize(torch.randn(2, 3, 4), dim=-1)
    tok = F.normalize(torch.randn(2, 5, 4), dim=-1)
    ref = torch.stack([text[b] @ tok[b].T for b in range(2)])
    torch.testing.assert_close(cosine_maps(text, tok), ref)


# ------------------------------------------------------------------------------------------------ texts
def test_semantic_texts_format_and_corpus_fallback():
    from ovlib.data.synonyms import SynonymCorpus

    t = semantic_texts(CATS)
    assert t[1] == ("dog", "dog, a domestic animal, puppy, canine")
    assert t[2] == ("boat", "boat, a small vessel, ship")
    assert t[5] == ("grass", "grass, green cover")
    corpus = SynonymCorpus({"cat": {"synonyms": ["kitty"], "definition": "a feline"}})
    t2 = semantic_texts([{"id": 7, "name": "cat"}, {"id": 8, "name": "zebu"}], corpus)
    assert t2[7] == ("cat", "cat, a feline, kitty")
    assert t2[8] == ("zebu", "zebu")


# ------------------------------------------------------------------------------------------------ the Distiller
def synthetic_batch(B=2, size=32, K=2, seed=0):
    return synthetic_method_batch(B, size, K, seed, labels=(1, 2, 5, 1), image_labels=((1, 2, 1), (5,)))


@pytest.fixture(scope="module")
def nets():
    return micro_nets()


def make(nets, **kw):
    student, teacher, vfm, tok = nets
    return SynCLIP(copy.deepcopy(student), {"teacher": teacher, "vfm": vfm}, tokenizer=tok, categories=CATS, **kw)


def test_readings_and_option_errors(nets):
    m = make(nets)
    assert (m.sem_loss, m.topk, m.spa_ratio, m.sem_ratio, m.mode) == ("huber_kl", 7, 0.3, 0.7, "csa")
    p = make(nets, reading="paper")
    assert (p.sem_loss, p.spa_ratio, p.sem_ratio) == ("mae", 0.5, 0.5)  # the paper's 1/(nm) sum |.|
    o = make(nets, reading="paper", sem_loss="huber_kl", topk=3)
    assert (o.sem_loss, o.topk) == ("huber_kl", 3)
    assert set(READINGS) == {"code", "paper"}
    with pytest.raises(ValueError, match="reading"):
        make(nets, reading="blog")
    with pytest.raises(ValueError, match="tokenizer"):
        SynCLIP(copy.deepcopy(nets[0]), {"teacher": nets[1], "vfm": nets[2]}, categories=CATS)


def test_batch_texts_padding_dedupe_and_truncation(nets):
    m = make(nets, max_semantic=1)
    lab, sem = m.class_text_features(torch.device("cpu"))
    t_lab, t_sem, valid = m.batch_texts([torch.tensor([2, 1, 2]), torch.tensor([], dtype=torch.long),
                                         torch.tensor([99, 5])], torch.device("cpu"))
    assert valid.tolist() == [[True], [False], [True]]
    assert torch.equal(t_lab[0, 0], lab[m._row[2]]) and torch.equal(t_sem[2, 0], sem[m._row[5]])
    assert t_lab[1].abs().sum() == 0
    assert m.images_without_text == 1 and m.unknown_labels == 1
    # cached text features equal a direct teacher encoding of the strings
    teacher, tok = nets[1], nets[3]
    direct = F.normalize(teacher.encode_text(tok(["dog, a domestic animal, puppy, canine"])), dim=-1)
    torch.testing.assert_close(sem[m._row[1]], direct[0], atol=1e-5, rtol=1e-5)
    m2 = make(nets)
    _, _, valid2 = m2.batch_texts([torch.tensor([2, 1, 2])], torch.device("cpu"))
    assert valid2.tolist() == [[True, True]]


def test_semantic_maps_match_manual(nets):
    m = make(nets, topk=3)
    b = synthetic_batch()
    dense, _qkv = m.student_dense(b["images"])
    vfm_sim, _grid = m.vfm_similarity(b["vfm_images"])
    a_label, target, valid = m.semantic_maps(b, dense, vfm_sim)
    assert a_label.shape == target.shape == (2, 2, 16) and valid.tolist() == [[True, True], [True, False]]
    t_lab, t_sem, _ = m.batch_texts(b["image_labels"], torch.device("cpu"))
    s_tok = dense_features(m.student, b["images"], "csa", normalize=True, scale=False, residual=False, ffn=False,
                           rope=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(a_label[0], t_lab[0] @ s_tok[0].T, atol=1e-5, rtol=1e-5)
    t_tok = dense_features(m.frozen["teacher"], b["images"], "csa", normalize=True, scale=False, residual=False,
                           ffn=False, rope=False).flatten(2).transpose(1, 2)
    a_sem = t_sem[1:, :1] @ t_tok[1:].transpose(1, 2)  # image 1, its only text
    ref, _ = sar_aggregate(a_sem, vfm_sim[1:], 3, 0.3, 0.7)
    torch.testing.assert_close(target[1, 0], ref[0, 0], atol=1e-5, rtol=1e-5)
    assert target[1, 1].abs().sum() == 0 and a_label[1, 1].abs().sum() == 0
    # SSA only: target = A_sem
    m_nosar = make(nets, sar=False)
    _, target2, _ = m_nosar.semantic_maps(b, dense, vfm_sim)
    torch.testing.assert_close(target2[1, 0], a_sem[0, 0], atol=1e-5, rtol=1e-5)


def test_sar_rejects_grid_mismatch(nets):
    m = make(nets)
    b = synthetic_batch()
    b["vfm_images"] = torch.randn(2, 3, 48, 48)
    with pytest.raises(ValueError, match="VFM grid"):
        m(b)


@pytest.mark.parametrize("reading", ["code", "paper"])
def test_synclip_three_steps_decrease_on_fixed_batch(nets, reading):
    m = make(nets, reading=reading)
    m.train()
    w = {"content": 1.0, "context": 0.25, "semantic": 0.1}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    b = synthetic_batch()
    totals = []
    for _ in range(3):
        out = m(b)
        assert set(out) == {"content", "context", "semantic"}
        assert all(torch.isfinite(v) for v in out.values())
        total = sum(w[k] * v for k, v in out.items())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    with torch.no_grad():
        out = m(b)
    totals.append(sum(w[k] * v for k, v in out.items()).item())
    assert totals[-1] < totals[0], totals
    assert all(p.grad is None for p in m.frozen["teacher"].parameters())


def test_semantic_loss_alone_decreases(nets):
    """The semantic term has a gradient path to the student and is optimised on its own."""
    m = make(nets, reading="paper")
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    b = synthetic_batch()
    vals = []
    for _ in range(4):
        v = m(b)["semantic"]
        opt.zero_grad()
        v.backward()
        opt.step()
        vals.append(v.item())
    assert vals[-1] < vals[0], vals


def test_synclip_with_trainer(nets, tmp_path):
    """Integration: the shared Trainer weights the three terms (two steps, finite, checkpoint written)."""
    from ovlib.train.distill import DistillConfig, Trainer

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            b = synthetic_batch(B=1, seed=i)
            return {"image": b["images"][0], "boxes": b["boxes"][0], "crops": b["crops"],
                    "image_labels": torch.tensor([1, 5]), "vfm_image": b["vfm_images"][0]}

    def collate(items):
        return {"images": torch.stack([it["image"] for it in items]), "boxes": [it["boxes"] for it in items],
                "crops": torch.cat([it["crops"] for it in items]),
                "image_labels": [it["image_labels"] for it in items],
                "vfm_images": torch.stack([it["vfm_image"] for it in items])}

    cfg = DistillConfig(method="synclip", out_dir=str(tmp_path), batch_size=2, max_steps=2, lr=1e-4, warmup_steps=1,
                        amp="none", device="cpu", log_every=1, seed=0,
                        loss_weights={"content": 1.0, "context": 0.25, "semantic": 0.1})
    m = make(nets)
    tr = Trainer(cfg, m, DS(), collate, teacher_state=nets[1].state_dict())
    tr.fit(resume=False)
    assert any(tmp_path.iterdir())


def test_exclude_heldout_and_long_text_truncation(nets):
    cats = [{"id": 1, "name": "dog", "synonyms": ["puppy", "hound"], "heldout_synonyms": ["hound"],
             "definition": "a domestic animal"}]
    assert semantic_texts(cats)[1][1] == "dog, a domestic animal, puppy, hound"
    assert semantic_texts(cats, exclude_heldout=True)[1][1] == "dog, a domestic animal, puppy"
    long_def = " ".join(["very"] * 60) + " long definition"
    m = make(nets)
    m.texts = semantic_texts([{"id": 1, "name": "dog", "synonyms": [], "definition": long_def}])
    m._ids, m._row, m._text_cache = [1], {1: 0}, None
    assert nets[3]([m.texts[1][1]]).shape == (1, 32)  # the micro CLIP's context: the text is truncated
    _lab, sem = m.class_text_features(torch.device("cpu"))
    assert torch.isfinite(sem).all() and sem.shape[0] == 1


def test_forward_under_bf16_autocast(nets):
    m = make(nets)
    b = synthetic_batch()
    with torch.no_grad():
        ref = m(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(b)
    for k in ref:
        assert torch.isfinite(out[k]) and out[k].dtype == torch.float32
        assert out[k].item() == pytest.approx(ref[k].item(), rel=0.1, abs=0.02)


def test_synonyms_that_fit_and_teacher_text_coverage():
    """A whitespace tokenizer: "name, definition, syn_1, …" cut at context - 2 tokens."""
    from ovlib.methods.synclip import synonyms_that_fit, teacher_text_coverage

    class Tok:
        @staticmethod
        def encode(text):
            return text.split()

    bus = {"name": "bus", "definition": "a long vehicle.", "synonyms": ["coach", "omnibus", "autobus"],
           "heldout_synonyms": ["autobus"]}
    # "bus, a long vehicle" = 4 tokens; each synonym adds one
    assert synonyms_that_fit(Tok, bus, context=6) == 0
    assert synonyms_that_fit(Tok, bus, context=8) == 2
    assert synonyms_that_fit(Tok, bus, context=20) == 3
    assert synonyms_that_fit(Tok, bus, context=5) == -1  # even the definition is cut
    cov = teacher_text_coverage(Tok, [bus, {"name": "sky", "synonyms": []}], context=8)
    assert cov == {"synonyms": 3, "kept": 2, "cut_definition": 0, "no_synonym": 1, "classes": 2, "heldout": 1,
                   "heldout_kept": 0}
    assert teacher_text_coverage(Tok, [bus], context=20)["heldout_kept"] == 1

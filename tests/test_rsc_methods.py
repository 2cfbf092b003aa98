"""R-SC-CLIPSelf recipes through the shared trainer: every method runs 3 steps with finite losses, and the
invariants of each stage (what is trained, what is frozen, detached targets, seeded crops)."""

import math

import pytest
import torch

from ovlib.methods.refiner import Refiner
from ovlib.methods.rsc import (
    RSCE2E,
    RSCV,
    G2LConfig,
    RefinerStage,
    RegionText,
    RSCCLIPSelf,
    SCCLIPSelf,
    global_to_local_loss,
)
from ovlib.methods.scd import correlation_entropy, region_tokens
from ovlib.models import dense_features, load_clip
from ovlib.train.distill import DistillConfig, Trainer, lock_visual

CATS = [{"id": 1, "name": "red ball"}, {"id": 2, "name": "blue cube"}, {"id": 5, "name": "grass"}]


class Regions(torch.utils.data.Dataset):
    """Seeded random 48-px images with 2 boxes, 64-px teacher crops, labels and image ids."""

    def __init__(self, n=8, size=48, crop=64, k=2, seed=0):
        self.n, self.size, self.crop, self.k, self.seed, self.epoch = n, size, crop, k, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch * 100 + i)
        xy = torch.rand(self.k, 2, generator=g) * self.size * 0.5
        wh = 8 + torch.rand(self.k, 2, generator=g) * self.size * 0.4
        labels = torch.tensor([CATS[i % 3]["id"], -1 if i % 2 else CATS[(i + 1) % 3]["id"]])
        return {"image": torch.randn(3, self.size, self.size, generator=g), "boxes": torch.cat([xy, xy + wh], 1),
                "crops": torch.randn(self.k, 3, self.crop, self.crop, generator=g), "labels": labels,
                "image_id": 100 + i}


def collate(items):
    return {"images": torch.stack([it["image"] for it in items]), "boxes": [it["boxes"] for it in items],
            "crops": torch.cat([it["crops"] for it in items]), "labels": torch.cat([it["labels"] for it in items]),
            "image_labels": [it["labels"][it["labels"] >= 0] for it in items],
            "image_ids": torch.tensor([it["image_id"] for it in items])}


def _models():
    torch.manual_seed(0)
    student, tok, _ = load_clip("micro-clip")
    torch.manual_seed(0)
    teacher, _, _ = load_clip("micro-clip")
    return student, teacher, tok


def make(cls, **args):
    student, teacher, tok = _models()
    lock_visual(student, -1)
    return cls(student, {"teacher": teacher}, tokenizer=tok, categories=CATS, **args), teacher


def build(cls, out_dir, steps=3, **args):
    method, teacher = make(cls, **args)
    cfg = DistillConfig(out_dir=str(out_dir), batch_size=2, max_steps=steps, lr=1e-3, warmup_steps=1, amp="none",
                        device="cpu", log_every=1, seed=0, method=cls.name)
    return Trainer(cfg, method, Regions(), collate, teacher_state=teacher.state_dict())


SMALL = {"num_blocks": 2, "inter_layers": (1, 2), "hidden": 32, "crop_grid": 4}


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """The ``refiner`` recipe trained 3 steps; also the student/Refiner states before training."""
    out = tmp_path_factory.mktemp("refiner")
    tr = build(RefinerStage, out, **SMALL)
    s0 = {k: v.clone() for k, v in tr.method.student.state_dict().items()}
    r0 = {k: v.clone() for k, v in tr.method.refiner.state_dict().items()}
    tr.fit(resume=False)
    return tr, s0, r0


@pytest.fixture(scope="module")
def refiner_ckpt(stage_one):
    return stage_one[0].out / "last.pt"


def _run_and_check(tr, names):
    summary = tr.fit(resume=False)
    assert summary["steps"] == 3 and len(tr.history) == 3
    for rec in tr.history:
        for n in names:
            assert math.isfinite(rec[n]), (n, rec)
        assert math.isfinite(rec["loss"])
    return tr


RECIPES = [(SCCLIPSelf, {"scd_grid": 4}), (RSCE2E, {**SMALL, "scd_grid": 4}), (RegionText, {})]


@pytest.mark.parametrize("cls,args", RECIPES, ids=lambda v: getattr(v, "name", None) or "-")
def test_every_recipe_runs_three_finite_steps(cls, args, tmp_path):
    _run_and_check(build(cls, tmp_path, **args), cls.loss_names)  # refiner: the fixture; stage 2: below


def test_refiner_recipe_ran_three_finite_steps_and_trained_only_the_refiner(stage_one):
    tr, s0, r0 = stage_one
    assert len(tr.history) == 3 and all(math.isfinite(r["g2l"]) for r in tr.history)
    assert all(torch.equal(v, tr.method.student.state_dict()[k]) for k, v in s0.items())
    assert any(not torch.equal(v, tr.method.refiner.state_dict()[k]) for k, v in r0.items())


VARIANTS = [
    (SCCLIPSelf, {"scd_scope": "global", "scd_chunk": 5}),  # global SCD, chunked
    (SCCLIPSelf, {"scd_grid": 3, "rla_target": "text"}),  # SC-RegionText
    (RefinerStage, dict(SMALL, direction="l2g", objective="cosine")),  # ablations: L2G, Eq. 14
    (RefinerStage, dict(SMALL, late=True, inter_layers=None, region_cls=False)),  # "Late" RoIAlign (Eq. 12)
]


@pytest.mark.parametrize("cls,args", VARIANTS)
def test_variants_give_finite_losses_and_gradients(cls, args):
    method, _ = make(cls, **args)
    out = method(collate([Regions()[i] for i in range(2)]))
    assert set(out) == set(cls.loss_names)
    total = sum(out.values())
    assert math.isfinite(float(total.detach()))
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters() if p.requires_grad)


@pytest.mark.parametrize("cls", [RSCCLIPSelf, RSCV])
def test_stage_two_recipes_run_from_the_stage_one_checkpoint(cls, refiner_ckpt, tmp_path):
    tr = _run_and_check(build(cls, tmp_path, refiner=str(refiner_ckpt), scd_grid=4), cls.loss_names)
    assert set(tr.history[-1]) >= set(cls.loss_names)
    assert ("rla" in tr.history[-1]) == (cls is RSCCLIPSelf)
    ref = tr.method.frozen["refiner"]
    assert isinstance(ref, Refiner) and not any(p.requires_grad for p in ref.parameters())
    assert not any(k.startswith("refiner") for k in tr.method.state_dict())  # frozen: not in the student's state


def test_global_r_scd_uses_the_refined_whole_image_map(refiner_ckpt):
    method, _ = make(RSCCLIPSelf, refiner=str(refiner_ckpt), scd_scope="global", scd_chunk=7)
    batch = collate([Regions()[i] for i in range(2)])
    zt = method.targets(batch["images"], batch["boxes"])
    assert zt.shape == (2, 36, 128)  # 48 px / patch 8 = 6 x 6 tokens, the whole image
    assert torch.allclose(zt, method.frozen["refiner"].dense(batch["images"]).flatten(2).transpose(1, 2), atol=1e-6)
    out = method(batch)
    assert math.isfinite(float(out["scd"].detach())) and math.isfinite(float(out["rla"].detach()))


def test_sc_clipself_at_init_is_at_the_scd_optimum():
    method, teacher = make(SCCLIPSelf, scd_grid=4)
    batch = collate([Regions()[i] for i in range(2)])
    dense = dense_features(method.student, batch["images"], "x+v", normalize=True)
    scd = method.scd_term(dense, batch)
    params = [p for p in method.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(scd, params, allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-5
    zt = region_tokens(dense_features(teacher, batch["images"], "x+v"), batch["boxes"], (48, 48), 4)
    assert float(scd.detach()) == pytest.approx(float(correlation_entropy(zt)), abs=1e-5)


def test_e2e_targets_are_detached_and_both_parts_train():
    method, _ = make(RSCE2E, **SMALL, scd_grid=4)
    batch = collate([Regions()[i] for i in range(2)])
    out = method(batch)
    ref_params = [p for p in method.refiner.parameters() if p.requires_grad]
    g_scd = torch.autograd.grad(out["scd"], ref_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in g_scd)  # R-SCD does not train the Refiner
    g_g2l = torch.autograd.grad(out["g2l"], ref_params, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_g2l)
    st = [p for p in method.student.parameters() if p.requires_grad]
    g_rla = torch.autograd.grad(out["rla"], st, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_rla)


def test_refiner_crops_are_seeded_by_the_batch():
    method, teacher = make(RefinerStage, **SMALL)
    ds = Regions()
    b1 = collate([ds[0], ds[1]])
    cfg = G2LConfig(crop_grid=4)
    l1 = global_to_local_loss(method.refiner, teacher, b1["images"], b1, cfg)
    l2 = global_to_local_loss(method.refiner, teacher, b1["images"], b1, cfg)
    b3 = dict(b1, image_ids=torch.tensor([7, 8]))
    l3 = global_to_local_loss(method.refiner, teacher, b1["images"], b3, cfg)
    assert float(l1.detach()) == float(l2.detach()) and float(l1.detach()) != float(l3.detach())
    with pytest.raises(ValueError, match="image_ids"):
        global_to_local_loss(method.refiner, teacher, b1["images"], {"boxes": b1["boxes"]}, cfg)


def test_regiontext_counts_unlabelled_regions_and_rejects_unlabelled_batches():
    method, _ = make(RegionText)
    batch = collate([Regions()[i] for i in range(2)])  # item 1 has one label -1
    out = method(batch)
    assert math.isfinite(float(out["rla"].detach())) and method.unlabelled_regions == 1
    bad = dict(batch, labels=torch.full_like(batch["labels"], -1))
    with pytest.raises(ValueError, match="gt_boxes"):
        method(bad)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="scd_scope"):
        make(SCCLIPSelf, scd_scope="everywhere")
    with pytest.raises(ValueError, match="direction"):
        make(RefinerStage, **SMALL, direction="sideways")
    with pytest.raises(FileNotFoundError, match="refiner"):
        make(RSCCLIPSelf, refiner="/nonexistent/refiner.pt")
    with pytest.raises(TypeError):
        make(SCCLIPSelf, no_such_option=1)


def test_assign_image_nouns_picks_the_closest_named_category():
    from ovlib.methods.rsc import assign_image_nouns

    text = torch.eye(3)  # category rows 0, 1, 2 = ids 1, 2, 5
    index = {1: 0, 2: 1, 5: 2}
    crops = torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.0, 0.1], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])
    # image 0 names {1, 5}: region 0 is closest to id 2 overall but 2 is not named -> best named is 1
    labels = assign_image_nouns(crops, [2, 1, 1], [torch.tensor([1, 5]), torch.tensor([2, 5]), torch.tensor([])],
                                text, index)
    assert labels.tolist() == [1, 1, 5, -1]
    with pytest.raises(ValueError, match="not categories"):
        assign_image_nouns(crops, [4], [torch.tensor([9])], text, index)


def test_regiontext_from_image_nouns_runs_on_grid_cells():
    method, _ = make(RegionText, region_labels="image_nouns")
    batch = collate([Regions()[i] for i in range(2)])
    batch["labels"] = torch.full_like(batch["labels"], -1)  # grid cells: no box labels
    out = method(batch)
    assert math.isfinite(float(out["rla"].detach())) and method.unlabelled_regions == 0

"""ovlib.study: budgets from the profile file, claims and checks, Holm across headline claims, the ledger file and
the Claims ledger page generated from it (ovlib.book.ledger_page)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as ss

from ovlib import book, config
from ovlib.stats import holm, ratio_stat
from ovlib.study import LEDGER_FIELDS, Study, paper_numbers


class FakeEval:
    """What Study needs of an evaluation: ``point(metric)`` and ``per_image[metric] = (array, statistic)``."""

    def __init__(self, per_image: np.ndarray):
        self.per_image = {"m": (per_image, ratio_stat)}

    def point(self, metric):
        arr, f = self.per_image[metric]
        return f(arr.sum(0))


def _per_image(value: float, n: int = 12, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([value + noise * rng.standard_normal(n), np.ones(n)], 1)


@pytest.fixture
def project(tmp_path, repo_root):
    """A project root with the real params/, book/paper_numbers.yaml and _toc.yml + notebook sources."""
    root = tmp_path / "proj"
    shutil.copytree(repo_root / "params", root / "params")
    (root / "book").mkdir(parents=True)
    shutil.copy(repo_root / "book" / "paper_numbers.yaml", root / "book" / "paper_numbers.yaml")
    shutil.copy(repo_root / "_toc.yml", root / "_toc.yml")
    shutil.copytree(repo_root / "notebooks", root / "notebooks")
    return root


def _study(root: Path, chapter="02", **over) -> Study:
    p = config.resolve("smoke", over, root=root)
    return Study(p, chapter, root=root, log=False)


# ------------------------------------------------------------------------------------------------ budgets
def test_a_dry_run_study_evaluates_at_the_dry_run_sizes_with_its_budgets(project):
    """The paper profile's dry run: evaluation sizes, bootstrap replicates and budgets are the dry run's."""
    from ovlib.eval.profiles import dense_eval_settings

    p = config.resolve("paper", {"dry_run": True}, root=project)
    st = Study(p, "02", root=project, log=False)
    block = p["dry_run_settings"]
    assert st.eval_settings == dense_eval_settings(p, p["eval_images"], **block["eval"])
    assert st.eval_settings.region.image_size == block["eval"]["region"]["image_size"]
    assert st.n_boot == block["eval"]["n_boot"]
    assert st.eval_settings != dense_eval_settings(p, p["eval_images"])
    assert st.budget == {**config.resolve("paper", root=project)["budgets"]["02"], **block["budgets"]["02"]}
    assert len(st.seeds) == block["params"]["seeds"]
    # region classification reads the dry run's handful of images (the paper budget's 0 = the whole split)
    assert st.budget["region_images"] == 0 and st.region_images == block["params"]["eval_images"] > 0
    assert Study(config.resolve("paper", root=project), "02", root=project, log=False).region_images == 0


def test_budget_and_training_budgets_come_from_the_profile(project):
    st = _study(project)
    smoke = yaml.safe_load((project / "params" / "smoke.yaml").read_text())["budgets"]
    assert st.budget == smoke["02"]
    tb = st.train_budget("main")  # max_steps x steps_scale, at least 1; warm-up a tenth
    want = max(1, round(smoke["train"]["main"]["max_steps"] * st.params["steps_scale"]))
    assert tb["max_steps"] == want and tb["warmup_steps"] == max(1, want // 10)
    st2 = _study(project, steps_scale=1.0)
    assert st2.train_budget("main")["max_steps"] == smoke["train"]["main"]["max_steps"]
    with pytest.raises(config.ParamError, match="no training budget 'huge'"):
        st.train_budget("huge")
    with pytest.raises(config.ParamError, match="unknown chapter '99'"):
        _study(project, chapter="99")


def test_unknown_budget_key_names_the_file_and_the_key(project):
    path = project / "params" / "smoke.yaml"
    data = yaml.safe_load(path.read_text())
    data["budgets"]["02"]["main_stepz"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(config.ParamError, match=r"smoke\.yaml: unknown key\(s\) \['main_stepz'\] in budgets\['02'\]"):
        config.load_profile("smoke", project)
    data["budgets"]["02"].pop("main_stepz")
    data["budgets"]["07"] = {}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(config.ParamError, match="unknown chapter '07' in budgets"):
        config.load_profile("smoke", project)


# ------------------------------------------------------------------------------------------------ claims
def test_claims_kinds_holm_and_the_ledger_file(project):
    st = _study(project)
    for s in (0, 1, 2):  # three seeds: a paired claim
        st.record("A", FakeEval(_per_image(0.5 + 0.01 * s, noise=0.05, seed=s)), seed=s)
        st.record("B", FakeEval(_per_image(0.7 + 0.02 * s, noise=0.05, seed=10 + s)), seed=s)
        st.record("C", FakeEval(_per_image(0.52 + 0.01 * s, noise=0.05, seed=20 + s)), seed=s)
    st.record("one", FakeEval(_per_image(0.9, noise=0.05, seed=5)), seed=0)
    st.record("frozen", FakeEval(_per_image(0.4, noise=0.05, seed=6)), fixed=True)
    c1 = st.claim("ab", "B beats A", "A", "B", "m", +1, headline=True, paper_ref="rsc.t1.rsc.boxes", section="2.6")
    c2 = st.claim("ac", "C beats A", "A", "C", "m", +1, headline=True, section="2.6")
    c3 = st.claim("one", "one beats A", "A", "one", "m", +1, headline=True, section="2.2")
    c4 = st.claim("frozen", "B beats the frozen model", "frozen", "B", "m", +1, section="2.2")
    assert st.claim("absent", "a row never run", "A", "nope", "m") is None
    chk = st.check("identity", "an identity", 1e-9, section="2.4")
    bad = st.check("inequality", "a bound", -0.5, 0.0, relation=">=", section="2.4")
    with pytest.raises(ValueError, match="used twice"):
        st.claim("ab", "again", "A", "B", "m")
    assert c1.comparison.test.startswith("paired t") and c3.comparison.kind == "indicative"
    assert c1.comparison.p == pytest.approx(ss.ttest_rel(st.values("B", "m"), st.values("A", "m")).pvalue)
    assert c4.comparison.test.startswith("one-sample")
    path = st.ledger()
    assert path == project / "book" / "claims" / "02.json"
    doc = json.loads(path.read_text())
    entries = {e["id"]: e for e in doc["claims"]}
    assert list(entries) == ["ab", "ac", "one", "frozen", "identity", "inequality"]
    assert all(tuple(e) == LEDGER_FIELDS for e in entries.values())
    # Holm over the headline claims of kind "claim" (ab, ac); the indicative one is not in the family
    adj = holm([c1.comparison.p, c2.comparison.p])
    assert entries["ab"]["p_adjusted"] == pytest.approx(adj[0]) and entries["ac"]["p_adjusted"] == pytest.approx(adj[1])
    assert entries["one"]["p_adjusted"] is None and entries["one"]["verdict"] == "not resolved"
    assert entries["one"]["kind"] == "indicative" and entries["one"]["indication"] in ("higher", "lower", "none")
    assert entries["frozen"]["p_adjusted"] is None  # not a headline claim
    assert entries["ab"]["paper"] == "rsc" and entries["ab"]["paper_ref"] == "Tab. 1"
    assert entries["ab"]["paper_value"] == paper_numbers(project)["numbers"]["rsc.t1.rsc.boxes"]["value"]
    assert entries["ab"]["seeds_a"] == entries["ab"]["seeds_b"] == 3 and entries["frozen"]["seeds_a"] == 0
    assert (entries["identity"]["kind"], entries["identity"]["verdict"]) == ("check", "holds")
    assert entries["inequality"]["verdict"] == "reversed" and chk.verdict == "holds" and bad.verdict == "reversed"
    t = st.tally()
    assert t["indicative"] == 1 and t["checks_passed"] == 1 and t["checks_failed"] == 1
    assert sum(t[v] for v in ("holds", "reversed", "not resolved")) == 3
    assert "B beats A" in st.claims_table()
    summ = st.summary("test budget")
    assert "3 are claims judged on seeds" in summ and f"**{t['holds']} hold**" in summ and "(test budget)" in summ
    assert "1 checks passed, 1 failed" in summ
    for c in (c1, c2, c4):  # every judged claim that holds / is reversed is named, none that is not
        assert (c.text in summ) == (c.verdict in ("holds", "reversed"))


def test_precision_targets_seeds_needed_and_the_holm_held_back_claims(project):
    """Every headline claim's half-width against its target (1.5 for mIoU, 2.0 for other points), the seeds that
    would reach it, and the claims whose interval excludes 0 that Holm holds back -- in the ledger and the summary."""
    from ovlib.stats import Sample, seeds_to_reach

    def seeds(values):  # per-image [value, 1] with no image noise: the interval is the paired t interval
        return Sample(tuple(np.stack([np.full(8, v), np.ones(8)], 1) for v in values), ratio_stat, (0, 1, 2))

    st = _study(project)
    a = seeds([50.0, 51.0, 49.0])
    wide = st.claim("wide", "wide claim", a, seeds([54.0, 58.0, 50.0]), "kmeans.miou", headline=True)
    tight = st.claim("tight", "tight claim", a, seeds([53.0, 54.1, 51.9]), "boxes.top1", headline=True)
    held = st.claim("held", "held-back claim", a, seeds([52.0, 54.0, 53.0]), "boxes.top1", headline=True)
    st.check("identity", "an identity", 0.0)
    t2 = ss.t.ppf(0.975, 2)
    assert wide.comparison.half_width == pytest.approx(t2 * 3.0 / math.sqrt(3))  # diffs 4, 7, 1: sd 3
    assert (wide.target, tight.target) == (1.5, 2.0)
    assert (wide.meets_target, tight.meets_target, held.meets_target) == (False, True, False)
    assert wide.seeds_needed == seeds_to_reach(wide.comparison.extra, 1.5) and wide.seeds_needed > 3
    assert tight.seeds_needed == 3
    entries = {e["id"]: e for e in json.loads(st.ledger().read_text())["claims"]}
    assert entries["wide"]["half_width"] == pytest.approx(wide.comparison.half_width)
    assert entries["wide"]["meets_target"] is False and entries["tight"]["meets_target"] is True
    assert entries["identity"]["target"] is None and entries["identity"]["meets_target"] is None
    # diffs 2, 4, 3: p = 0.035 -- its interval excludes 0, yet Holm over the three headline claims holds it back
    assert held.comparison.ci_low > 0 and held.comparison.p < 0.05 and held.verdict == "not resolved"
    assert tight.verdict == "holds"
    summ = st.summary("test budget")
    assert "Precision: 1 of 3 headline claims reach their interval target" in summ
    assert "wide claim (±" in summ and "held-back claim (±" in summ and "tight claim (±" not in summ
    assert "not resolved after Holm's correction across the chapter's headline claims: held-back claim" in summ


def test_negligible_flag_claims_table_slices_and_paper_values(project):
    st = _study(project)
    for s in (0, 1, 2):  # B is clearly higher than A, by 0.2 (in the metric's unit)
        st.record("A", FakeEval(_per_image(0.5 + 0.01 * s, noise=0.01, seed=s)), seed=s)
        st.record("B", FakeEval(_per_image(0.7 + 0.01 * s, noise=0.01, seed=10 + s)), seed=s)
    st.negligible = 0.5  # the chapter's default: 0.2 < 0.5 is flagged
    c1 = st.claim_in("2.2", "B beats A", "A", "B", "m", paper_ref="rsc.t1.rsc.boxes")
    c2 = st.claim_in("2.3", "B beats A, finely", "A", "B", "m", negligible=0.1)  # 0.2 >= 0.1: not flagged
    assert c1.verdict == c2.verdict == "holds"  # the flag never changes a verdict
    assert c1.is_negligible and "negligible" in c1.describe() and not c2.is_negligible
    assert c1.paper_text == "Tab. 1: +3.9" and c2.paper_text == "–"
    full = st.claims_table()
    assert "| paper |" in full and "Tab. 1: +3.9" in full
    tail = st.claims_table(since=1)  # only the claims recorded after the first
    assert "finely" in tail and "B beats A |" not in tail and "| paper |" not in tail
    assert st.paper_value("rsc.t1.rsc.boxes") == paper_numbers(project)["numbers"]["rsc.t1.rsc.boxes"]["value"]
    assert isinstance(st.paper_value("synclip.table.ablation"), dict)  # a table of the paper
    with pytest.raises(KeyError, match="no reported number"):
        st.paper_value("nope")


def test_paper_table_cells_and_the_vfm_is_loaded_once(project, monkeypatch):
    import torch

    import ovlib.study as study_mod

    st = _study(project)
    t1 = st.paper_table("rsc.table.t1", slice(0, None, 2), "/")
    assert t1["CLIPSelf"] == "72.1/74.4/46.8"  # the three Top-1 of Tab. 1
    assert st.paper_table("rsc.table.t9", digits=2)["Refiner"] == "0.95"
    assert st.paper_table("rsc.table.t12")["4"] == "40.9 / 77.3 / 78.9 / 52.5"
    with pytest.raises(ValueError, match="not a table"):
        st.paper_table("rsc.t1.rsc.boxes")
    calls = []
    monkeypatch.setattr(study_mod, "pretrain_vfm", lambda cfg, cache, **kw: (calls.append("micro") or
                                                                             torch.nn.Linear(2, 2), None))
    monkeypatch.setattr(study_mod, "load_vfm", lambda **kw: calls.append(kw["name"]) or torch.nn.Linear(2, 2))
    v = st.vfm()
    assert st.vfm() is v and calls == ["micro"] and not v.training  # once, frozen
    assert not any(p.requires_grad for p in v.parameters())
    real_data = {**st.params["budgets"], "eval": {**st.params["budgets"]["eval"], "export_size": 0}}  # COCO, not micro
    paper = Study({**st.params, "profile": "paper", "budgets": real_data,
                   "models": {"vfm": {"name": "dinov2-b", "pretrained": None}}},
                  "02", root=project, log=False)
    paper.vfm()
    assert calls == ["micro", "dinov2-b"]


def test_a_run_with_a_vfm_is_keyed_by_the_vfm_it_distils_from(project, tmp_path, monkeypatch):
    """DeCLIP's run key holds the micro VFM checkpoint's content hash (a changed VFM objective or budget trains the
    run again); a recipe without a VFM keeps its key; a missing micro VFM is pre-trained first (Study.vfm)."""
    from ovlib.io import cache_path
    from ovlib.train.pretrain import pretrain_configs

    monkeypatch.setattr(Study, "_checkpoint_hash", lambda self, cfg: "the micro CLIP")
    st = _study(project, cache_dir=str(tmp_path / "cache"))
    _, vfm_cfg = pretrain_configs(st.params, st.params["steps_scale"], st.params["seed"])
    path = cache_path(st.params["cache_dir"], vfm_cfg.model, vfm_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"one VFM")
    _, e1 = st._run_key_parts("declip", 0, "main", {})
    _, c1 = st._run_key_parts("clipself", 0, "main", {})
    assert "vfm" in e1 and set(c1) == {"checkpoint", "data"}
    path.write_bytes(b"another VFM")
    _, e2 = _study(project, cache_dir=str(tmp_path / "cache"))._run_key_parts("declip", 0, "main", {})
    assert e2["vfm"] != e1["vfm"] and {k: v for k, v in e2.items() if k != "vfm"} == {
        k: v for k, v in e1.items() if k != "vfm"}
    path.unlink()
    calls = []
    monkeypatch.setattr(Study, "vfm", lambda self: calls.append(1) or path.write_bytes(b"a third VFM"))
    _, e3 = _study(project, cache_dir=str(tmp_path / "cache"))._run_key_parts("declip", 0, "main", {})
    assert calls == [1] and e3["vfm"] not in (e1["vfm"], e2["vfm"])


def test_a_synseg_run_is_keyed_by_the_clipseg_it_starts_from(project, tmp_path, monkeypatch):
    """SynSeg's run key holds its CLIPSeg initialisation: the micro CLIPSeg's config (a changed budget or
    conditioning trains the run again), a local checkpoint's content; a recipe without one keeps its key."""
    monkeypatch.setattr(Study, "_checkpoint_hash", lambda self, cfg: "the micro CLIP")
    _, micro = _study(project)._run_key_parts("synseg", 0, "main", {})
    _, longer = _study(project, **{"budgets.pretrain.clipseg.batch_size": 4})._run_key_parts("synseg", 0, "main", {})
    _, clipself = _study(project)._run_key_parts("clipself", 0, "main", {})
    assert micro["clipseg"].startswith("micro-clipseg:") and longer["clipseg"] != micro["clipseg"]
    assert "clipseg" not in clipself
    ck = tmp_path / "cs.pth"
    ck.write_bytes(b"one CLIPSeg")
    args = {"method_args": {"input_size": 64, "caption_pick": "one", "clipseg": str(ck)}}
    _, f1 = _study(project)._run_key_parts("synseg", 0, "main", args)
    ck.write_bytes(b"another CLIPSeg")
    _, f2 = _study(project)._run_key_parts("synseg", 0, "main", args)
    assert f1["clipseg"] != f2["clipseg"] and micro["clipseg"] not in (f1["clipseg"], f2["clipseg"])
    _, none = _study(project)._run_key_parts("synseg", 0, "main", {"method_args": {"clipseg": None}})
    assert "clipseg" not in none
    _, named = _study(project, weights_dir="")._run_key_parts("synseg", 0, "main",
                                                                {"method_args": {"clipseg": "rd64-uni"}})
    assert named["clipseg"] == "rd64-uni"  # no local file: the name (the trainer's error names the file)


def test_unknown_paper_reference_is_an_error(project):
    st = _study(project)
    st.record("A", FakeEval(_per_image(0.5)), seed=0)
    with pytest.raises(KeyError, match="no reported number 'nope'"):
        st.claim("x", "x", "A", "A", "m", paper_ref="nope")


# ------------------------------------------------------------------------------------------------ the page
def test_ledger_page_tables_links_and_totals(project):
    st = _study(project)
    for s in (0, 1, 2):
        st.record("A", FakeEval(_per_image(0.5, noise=0.01, seed=s)), seed=s)
        st.record("B", FakeEval(_per_image(0.9, noise=0.01, seed=9 + s)), seed=s)
    st.claim("ab", "B beats A", "A", "B", "m", headline=True, section="2.2")
    st.claim("ba", "A beats B", "A", "B", "m", expect=-1, headline=True, section="2.2")
    st.check("eq", "an identity", 0.0, section="2.4")
    st.ledger()
    page = book.ledger_page(project).read_text()
    assert "Headline claims judged on seeds: **1 held**, **1 reversed**, **0 not resolved** (of 2; 0 more" in page
    assert page.count("<tr><td>") == 3 and "check passed" in page
    # the same totals per paper: the chapter's paper, 1 held, 1 reversed, 0 not resolved, of 2
    assert re.search(r"^\| [^|\n]*Refining CLIP[^|\n]* \| 1 \| 1 \| 0 \| 2 \|$", page, re.M), page
    # the link points at the chapter page and the docutils id of its "## 2.2 ..." heading
    src = (project / "notebooks" / "02_refining_spatial_awareness.py").read_text()
    title = next(ln[5:] for ln in src.splitlines() if ln.startswith("# ## 2.2 "))
    from docutils.nodes import make_id

    assert f'href="02_refining_spatial_awareness.html#{make_id(title)}"' in page
    assert "Refining CLIP" in page  # the paper's title heads its table
    # precision: both headline claims have the same interval (the same two rows); its half-width is in the table
    ab = {c.id: c for c in st.claims}["ab"]
    n_ok = 2 if ab.meets_target else 0
    assert f"Precision: {n_ok} of 2 headline claims judged on seeds reach" in page
    assert page.count(f"±{ab.comparison.half_width:.1f} (≤ 2") == 2
    assert book._precision_cell({"kind": "claim", "half_width": 3.04, "target": 1.5, "meets_target": False,
                                 "seeds_needed": 7}) == "±3.0 (≤ 1.5; 7 seeds)"
    assert book._precision_cell({"kind": "claim", "half_width": 3.0, "target": 2.0, "meets_target": False,
                                 "seeds_needed": None}) == "±3.0 (≤ 2; –)"
    assert book._precision_cell({"kind": "check"}) == "–" and book._precision_cell({"kind": "claim"}) == "–"


def test_ledger_page_without_claims_says_so(project):
    page = book.ledger_page(project).read_text()
    assert "No chapter has written its claims yet" in page


def test_load_benchmark_and_named_clip(project, monkeypatch):
    import sys

    import torch

    import ovlib.study as study_mod
    from ovlib.study import load_benchmark

    bench = load_benchmark("bench_denserc")  # benchmarks/ beside the ovlib package of this checkout
    assert bench is not None and callable(bench.run) and hasattr(bench, "TARGET")
    assert any(p.endswith("benchmarks") for p in sys.path)  # its _common imports
    assert load_benchmark("no_such_bench") is None
    st = _study(project, "03")
    with pytest.raises(config.ParamError, match="no named model 'clip'"):
        st.named_clip("clip")

    class Bb:  # what named_clip needs of the chapter's backbones
        categories = [{"id": 1, "name": "cup"}, {"id": 2, "name": "boat"}]
        templates, this_is = ("a {}.",), False

    seen = {}
    monkeypatch.setattr(st, "backbones", lambda *a, **k: Bb)
    monkeypatch.setattr(study_mod, "load_clip", lambda **kw: (seen.update(kw) or torch.nn.Linear(2, 2), "tok", None))
    monkeypatch.setattr(study_mod, "text_embeddings",
                        lambda clip, tok, names, templates, this_is_prefix, device: torch.ones(len(names), 3))
    st.params["models"] = {"clip": {"name": "ViT-B-16", "pretrained": None}}
    clip, tok, text, name = st.named_clip("clip")
    assert seen["name"] == "ViT-B-16" and tok == "tok" and text.shape == (2, 3) and name == "ViT-B-16 (random init)"
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())

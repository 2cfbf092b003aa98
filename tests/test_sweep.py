"""ovlib.sweep: the recipe sweep's settings, its choice rule, a smoke sweep end to end (on the tuning split, through
the shared run cache) and the recorded micro sweep that params/micro.yaml must agree with."""

from __future__ import annotations

import json
import math

import pytest

from ovlib import config
from ovlib.config import ParamError
from ovlib.sweep import GROUP_METRIC, SEG_METRIC, TOP1, TUNE_METRIC, SweepSpec, choose, main, sweep, tune_value
from ovlib.train.recipes import distill_config


def _params(**recipes):
    p = config.resolve("smoke")
    p["budgets"] = {**p["budgets"], "recipes": {**p["budgets"]["recipes"], **recipes}}
    return p


def test_spec_from_the_profiles_and_its_errors():
    s = SweepSpec.from_params(config.resolve("micro"))
    assert s.split != "val2017" and s.lrs and s.steps and "clipself" in s.families
    with pytest.raises(ParamError, match="evaluation split val2017"):
        SweepSpec.from_params(_params(split="val2017"))
    with pytest.raises(ParamError, match=r"families.x: needs 'tune'; unknown key\(s\) \['tunes'\]"):
        SweepSpec.from_params(_params(families={"x": {"tunes": "clipself"}}))
    with pytest.raises(ParamError, match="families is empty: the profile takes its recipes as they are"):
        SweepSpec.from_params(config.resolve("paper"))
    with pytest.raises(ParamError, match="non-empty and positive"):
        SweepSpec.from_params(_params(lrs=[]))
    with pytest.raises(ParamError, match=r"families.x.metric = 'colour'; known: \['grouping', 'region', "
                                         r"'segmentation'\]"):
        SweepSpec.from_params(_params(families={"x": {"tune": "clipself", "metric": "colour"}}))
    with pytest.raises(ParamError, match=r"metric grouping tunes \['refiner'\] only, not \['clipself'\]"):
        SweepSpec.from_params(_params(families={"x": {"tune": "clipself", "metric": "grouping"}}))
    with pytest.raises(ParamError, match=r"metric segmentation tunes \['synseg'\] only, not \['declip'\]"):
        SweepSpec.from_params(_params(families={"x": {"tune": "synseg", "also": ["declip"], "metric": "segmentation"}}))
    with pytest.raises(ParamError, match=r"families.x: steps must be non-empty and positive, got \[0\]"):
        SweepSpec.from_params(_params(families={"x": {"tune": "refiner", "metric": "grouping", "steps": [0]}}))
    p = config.resolve("smoke")
    p["budgets"] = {k: v for k, v in p["budgets"].items() if k != "recipes"}
    with pytest.raises(ParamError, match="budgets.recipes is missing"):
        SweepSpec.from_params(p)


def test_tune_value_is_the_mean_of_the_three_top1():
    assert tune_value({"boxes.top1": 30.0, "thing.top1": 60.0, "stuff.top1": 0.0}) == 30.0
    assert math.isnan(tune_value({"boxes.top1": 30.0, "thing.top1": 60.0}))


def _pt(lr, steps, v, seed=0, method="clipself", family="f", metric=TUNE_METRIC):
    return {"family": family, "method": method, "lr": lr, "steps": steps, "seed": seed, "metric": metric, "tune": v}


def test_choose_takes_the_best_mean_over_seeds_at_the_chapters_steps_ties_to_fewer_steps_then_smaller_lr():
    pts = [_pt(1e-4, 100, 10.0), _pt(1e-3, 100, 40.0), _pt(1e-3, 100, 20.0, seed=1),  # mean 30
           _pt(3e-3, 100, 32.0), _pt(1e-3, 300, 31.0), _pt(1e-4, 300, 5.0),
           _pt(1e-2, 100, 99.0, method="sc-clipself"), _pt(1e-2, 100, 99.0, family="g")]  # not the tune method/family
    c = choose(pts, "f", "clipself")
    assert (c["lr"], c["steps"], c["tune"], c["metric"]) == (3e-3, 100, 32.0, TUNE_METRIC) and c["best"] == {
        "lr": 3e-3, "steps": 100, "tune": 32.0}
    assert c["per_steps"] == {"100": {"lr": 3e-3, "tune": 32.0}, "300": {"lr": 1e-3, "tune": 31.0}}
    # at the chapters' step budget: the best lr there, whatever a larger budget would prefer
    more = pts + [_pt(1e-2, 300, 50.0)]
    c3 = choose(more, "f", "clipself", steps=300)
    assert (c3["lr"], c3["steps"]) == (1e-2, 300)
    c1 = choose(more, "f", "clipself", steps=100)
    assert (c1["lr"], c1["steps"]) == (3e-3, 100) and c1["best"] == {"lr": 1e-2, "steps": 300, "tune": 50.0}
    tie = choose([_pt(1e-3, 300, 20.0), _pt(3e-4, 100, 20.0), _pt(1e-4, 100, 20.0)], "f", "clipself")
    assert (tie["lr"], tie["steps"]) == (1e-4, 100)
    with pytest.raises(ValueError, match="no finite"):
        choose([_pt(1e-3, 100, float("nan"))], "f", "clipself")
    with pytest.raises(ValueError, match="no point at 200 steps"):
        choose(pts, "f", "clipself", steps=200)
    with pytest.raises(ValueError, match="mixes tuning metrics"):
        choose([_pt(1e-3, 100, 1.0), _pt(1e-4, 100, 2.0, metric=GROUP_METRIC)], "f", "clipself")


@pytest.mark.slow
def test_a_smoke_sweep_runs_on_the_tuning_split_through_the_run_cache(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    over = [f"data_root={tmp_path / 'mw'}", f"cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "sweep.json"
    assert main(["--profile", "smoke", "--out", str(out), *sum((["-p", o] for o in over), [])]) == 0
    rec = json.loads(out.read_text())
    spec = rec["spec"]
    region = [p for p in rec["points"] if p["family"] == "clipself"]
    assert len(region) == len(spec["lrs"]) * len(spec["steps"]) == 2
    assert all(p["trained_now"] and set(TOP1) <= set(p) and p["metric"] == TUNE_METRIC for p in region)
    assert set(rec["reference"]) == {*TOP1, TUNE_METRIC, GROUP_METRIC, SEG_METRIC}
    # the segmentation family (SynSeg from its CLIPSeg initialisation): its masks' things + stuff mIoU, and the
    # untrained initialisation as the reference
    (seg,) = [p for p in rec["points"] if p["family"] == "synseg"]
    assert seg["method"] == "synseg" and seg["metric"] == SEG_METRIC and 0.0 <= seg["tune"] <= 100.0
    assert 0.0 <= rec["reference"][SEG_METRIC] <= 100.0 and rec["choices"]["synseg"]["metric"] == SEG_METRIC
    # the grouping family (the Refiner): its own budget and grid, its dense map's colour-proof k-means mIoU
    (ref,) = [p for p in rec["points"] if p["family"] == "refiner"]
    assert ref["method"] == "refiner" and ref["metric"] == GROUP_METRIC and 0.0 <= ref["tune"] <= 100.0
    assert not set(TOP1) & set(ref) and rec["choices"]["refiner"]["metric"] == GROUP_METRIC
    c = rec["choices"]["clipself"]
    assert c["lr"] in spec["lrs"] and c["shared"] == ["clipself"] and rec["runs"][0]["command"].endswith(
        f"--out {out} -p {over[0]} -p {over[1]}")
    # the tuning split was exported and evaluated on; the chapters' evaluation split was not touched
    assert (tmp_path / "mw" / "annotations" / "manifest_test2017.json").is_file()
    assert not (tmp_path / "mw" / "annotations" / "manifest_val2017.json").exists()
    # a second sweep loads every point from the shared run cache
    again = sweep(config.resolve("smoke", over), log=lambda s: None)
    assert not any(p["trained_now"] for p in again["points"])
    assert [p["tune"] for p in again["points"]] == [p["tune"] for p in rec["points"]]


def test_micro_recipes_hold_the_recorded_sweep_choices(repo_root):
    """params/micro.yaml's lr of every method a family shares is the lr its recorded sweep chose (re-run
    ``python -m ovlib.sweep --profile micro`` after changing the sweep or the recipes' other fields)."""
    rec = json.loads((repo_root / "params" / "sweeps" / "micro.json").read_text())
    p = config.resolve("micro", root=repo_root)
    spec = SweepSpec.from_params(p)
    assert rec["profile"] == "micro" and set(rec["choices"]) == set(spec.families)
    for fam, c in rec["choices"].items():
        assert c["method"] == spec.families[fam]["tune"]
        for m in spec.families[fam]["shared"]:
            assert distill_config(p, m, {}, out_dir="unused").lr == pytest.approx(c["lr"]), (fam, m)


def test_recipes_page_has_a_figure_and_a_table_per_family(tmp_path):
    from ovlib.book import RECIPES_PAGE, recipes_page

    pts = [{**_pt(lr, 100, v, family="clipself"), "boxes.top1": v, "thing.top1": v, "stuff.top1": v,
            "train_s": 3.0} for lr, v in ((1e-4, 10.0), (1e-3, 30.0))]
    rec = {"profile": "micro", "tune_metric": "t", "points": pts,
           "reference": {TUNE_METRIC: 9.0, "boxes.top1": 8.0, "thing.top1": 9.0, "stuff.top1": 10.0},
           "spec": {"split": "test2017", "region_images": 5, "lrs": [1e-4, 1e-3], "steps": [100], "seeds": [0],
                    "budget": "main"},
           "choices": {"clipself": {**choose(pts, "clipself", "clipself"), "shared": ["clipself", "denserc"]}},
           "runs": [{"command": "python -m ovlib.sweep", "families": ["clipself"], "commit": "abc", "date": "d",
                     "cpu": "c", "threads": 2, "wall_s": 60.0}]}
    (tmp_path / "params" / "sweeps").mkdir(parents=True)
    (tmp_path / "params" / "sweeps" / "micro.json").write_text(json.dumps(rec))
    text = recipes_page(tmp_path).read_text()
    assert (tmp_path / RECIPES_PAGE).is_file() and (tmp_path / "book" / "recipes" / "micro_clipself.png").is_file()
    assert "**Chosen: lr 0.001, 100 steps**" in text and "shared by `clipself`, `denserc`" in text
    assert "The frozen CLIP before training: 9.0 (boxes 8.0, thing 9.0, stuff 10.0)" in text
    assert text.count("<tr><td>clipself</td>") == 2 and "](recipes/micro_clipself.png)" in text
    assert "No recipe sweep" in recipes_page(tmp_path / "empty").read_text()
    # a grouping family: no region columns, the vanilla map as its reference
    gp = [{**_pt(lr, 150, v, method="refiner", family="refiner", metric=GROUP_METRIC), "train_s": 2.0}
          for lr, v in ((1e-4, 40.0), (1e-3, 45.0))]
    rec["points"] += gp
    rec["reference"][GROUP_METRIC] = 38.0
    rec["choices"]["refiner"] = {**choose(gp, "refiner", "refiner"), "shared": ["refiner"]}
    (tmp_path / "params" / "sweeps" / "micro.json").write_text(json.dumps(rec))
    text = recipes_page(tmp_path).read_text()
    assert (tmp_path / "book" / "recipes" / "micro_refiner.png").is_file()
    assert f"**Chosen: lr 0.001, 150 steps** ({GROUP_METRIC} 45.0" in text and "target): 38.0." in text
    assert "<tr><td>refiner</td><td>150</td><td>0.001</td><td>0</td><td>–</td><td>–</td><td>–</td><td>45.0</td>" in text

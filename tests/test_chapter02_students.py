"""ovlib.eval.students: config-keyed runs, loading a trained student, evaluating it (the comparisons behind a
chapter's verdicts are tested in tests/test_stats.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ovlib import config
from ovlib.eval.students import (
    METRICS,
    evaluate_student,
    load_student,
    run_key,
    train_or_load,
)


# --------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def env(tmp_path_factory, repo_root):
    """Smoke profile in a temp dir, a local micro CLIP file, a 3-image evaluation export."""
    from ovlib.data import CocoPanoptic, ensure_microworld
    from ovlib.eval import MICRO_TEMPLATES, class_name_sets, text_embeddings
    from ovlib.eval.profiles import dense_eval_settings
    from ovlib.models import load_clip

    tmp = tmp_path_factory.mktemp("ch02")
    clip, tok, _ = load_clip("micro-clip", seed=0)
    torch.save(clip.state_dict(), tmp / "clip.pt")
    params = config.resolve("smoke", [f"data_root={tmp / 'mw'}", f"cache_dir={tmp / 'cache'}"], root=repo_root)
    ov = {"pretrained": str(tmp / "clip.pt"), "max_images": 4, "max_steps": 2}
    root = ensure_microworld(tmp / "val", "val2017", n=3, size=160, seed=0, progress=False)
    ds = CocoPanoptic(root, "val2017")
    ids = [c["id"] for c in ds.categories]
    text = text_embeddings(clip.eval(), tok, class_name_sets(ds.categories, "main"), MICRO_TEMPLATES,
                           this_is_prefix=False)
    return {"tmp": tmp, "params": params, "ov": ov, "ds": ds, "ids": ids, "text": text, "clip": clip.eval(),
                "ev": dense_eval_settings("smoke", 3)}


def test_run_key_covers_the_config_and_the_micro_clip(env, repo_root):
    p = env["params"]
    k = run_key(p, "clipself", env["ov"])
    assert k == run_key(p, "clipself", dict(env["ov"]))
    assert k != run_key(p, "clipself", {**env["ov"], "lr": 3e-4})
    assert k != run_key(p, "sc-clipself", env["ov"])
    # without a pretrained file the micro CLIP's pre-training config (profile seed) is part of the key
    p1 = config.resolve("smoke", ["seed=1"], root=repo_root)
    p0 = config.resolve("smoke", root=repo_root)
    assert run_key(p0, "clipself", {"seed": 0}) != run_key(p1, "clipself", {"seed": 0})


def test_train_or_load_then_load_student_and_evaluate(env):
    from ovlib.io import safe_load
    from ovlib.models.clip import load_clip

    p, ov = env["params"], env["ov"]
    root = env["tmp"] / "runs"
    res = train_or_load(p, "clipself", ov, root, "CLIPSelf τ=0.2 s0")
    assert res["trained_now"] and res["steps"] == 2 and res["train_s"] > 0
    assert Path(res["out_dir"]).name.startswith("CLIPSelf_0.2_s0-")  # portable directory name
    again = train_or_load(p, "clipself", ov, root, "CLIPSelf τ=0.2 s0")
    assert not again["trained_now"] and again["out_dir"] == res["out_dir"]
    assert again["train_s"] == pytest.approx(res["train_s"])  # the log of the run that trained it

    student = load_student(p, res)
    sd = safe_load(res["weights"])["model"]
    for k, v in student.state_dict().items():
        assert torch.equal(v, sd["student." + k]), k
    base = load_clip("micro-clip", seed=0)[0]
    base.load_state_dict(torch.load(env["tmp"] / "clip.pt", weights_only=True))
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in student.state_dict().items()
               if k.startswith("visual."))  # training moved the image tower
    assert all(torch.allclose(v, base.state_dict()[k], atol=1e-6) for k, v in student.state_dict().items()
               if k.startswith("transformer."))  # the text tower never trains (alpha ensemble of equal weights)

    ev = evaluate_student(student, env["ds"], env["text"], env["ids"], env["ev"], name="clipself",
                          region_images=3, seg_images=1)
    assert set(ev.ci) == set(METRICS) and ev.n_regions > 0 and ev.seconds > 0
    for m, (arr, stat) in ev.per_image.items():
        pt = stat(np.asarray(arr, dtype=np.float64).sum(0))
        assert (math.isnan(pt) and math.isnan(ev.point(m))) or pt == pytest.approx(ev.point(m)), m


def test_evaluate_student_matches_the_chapter01_protocol_and_takes_a_dense_fn(env):
    from ovlib.eval import extract_region_features, score_regions, summarize
    from ovlib.eval._common import dense_fn_for_clip

    clip, ds, ev_s = env["clip"], env["ds"], env["ev"]
    ev = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, mode="x+v", region_images=3, ovss=False,
                          kmeans=False)
    rf = extract_region_features(clip, ds, ev_s.region, modes=("x+v",), n_images=3, progress=False)
    want = summarize(score_regions(rf, env["text"], env["ids"]), n_boot=ev_s.n_boot)
    assert ev.ci["boxes.top1"] == want["rois/x+v"]["thing.macc1"]
    assert ev.ci["stuff.top5"] == want["maskpool/x+v"]["stuff.macc5"]
    assert ev.ci["global.thing.top1"] == want["crops"]["thing.macc1"]
    assert "ovss.miou" not in ev.ci and "kmeans.miou" not in ev.ci
    # a dense extractor in place of the CLIP's mode gives the same numbers when it is the same map
    ev2 = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, dense_fn=dense_fn_for_clip(clip, "x+v"),
                           region_images=3, crops=False, ovss=False, seg_images=1)
    assert ev2.ci["boxes.top1"] == ev.ci["boxes.top1"] and "global.thing.top1" not in ev2.ci
    assert "kmeans.miou" in ev2.ci
    ev3 = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, region=False, ovss=False, seg_images=1,
                           keep_regions=True)
    assert set(ev3.ci) == {"kmeans.miou"} and ev3.ci["kmeans.miou"] == ev2.ci["kmeans.miou"]
    ev4 = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, region_images=2, crops=False, ovss=False,
                           kmeans=False, keep_regions=True)
    assert ev4.regions is not None and ev4.regions.features["maskpool/x+v"].shape[0] == ev4.n_regions
    # the colour-proof k-means: evaluate_kmeans with every segment's mean colour equalised, the same images and seed
    from ovlib.eval.segmentation import evaluate_kmeans
    from ovlib.eval.students import KMEANS_EQ

    ev5 = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, region=False, ovss=False, kmeans=False,
                           kmeans_equalized=True, seg_images=2)
    want = evaluate_kmeans(dense_fn_for_clip(clip, "x+v", normalize=False), ds, image_size=ev_s.region.image_size,
                           n_images=2, seed=0, n_boot=ev_s.n_boot, patch=8, progress=False, colour="equalized")
    assert set(ev5.ci) == {KMEANS_EQ} and ev5.ci[KMEANS_EQ] == want["miou"]
    arr, stat = ev5.per_image[KMEANS_EQ]
    assert stat(arr.sum(0)) == pytest.approx(float(np.mean(want["per_image"])))
    ev6 = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, region=False, ovss=False, kmeans_equalized=True,
                           seg_images=2)
    assert set(ev6.ci) == {"kmeans.miou", KMEANS_EQ} and ev6.ci[KMEANS_EQ] == want["miou"]


def test_evaluate_student_pooling_convention_is_a_field_and_recorded(env):
    """DeCLIP / SynCLIP students are scored pool-then-normalise (their own protocol), the CLIPSelf family
    normalise-then-pool; the result records the convention, the grid-mask rule and the dense spec."""
    import dataclasses

    from ovlib.eval import extract_region_features, score_regions, summarize
    from ovlib.eval.students import student_pooling
    from ovlib.methods import get_method

    assert get_method("declip").eval_pooling == get_method("synclip").eval_pooling == "pool-then-normalize"
    assert get_method("clipself").eval_pooling == get_method("denserc").eval_pooling == "normalize-then-pool"
    res = train_or_load(env["params"], "clipself", env["ov"], env["tmp"] / "runs", "CLIPSelf τ=0.2 s0")
    assert student_pooling(res) == "normalize-then-pool"
    clip, ds, ev_s = env["clip"], env["ds"], env["ev"]
    kw = dict(mode="synclip", region_images=3, crops=False, ovss=False, kmeans=False)
    a = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, **kw)
    b = evaluate_student(clip, ds, env["text"], env["ids"], ev_s, pooling="pool-then-normalize", **kw)
    assert a.protocol["pooling"] == "normalize-then-pool" and b.protocol["pooling"] == "pool-then-normalize"
    assert b.protocol["mask_grid"] == "resize" and b.protocol["dense"]["synclip"]["scale"] is False
    cfg = dataclasses.replace(ev_s.region, pooling="pool-then-normalize")
    rf = extract_region_features(clip, ds, cfg, modes=("synclip",), predictors=("rois", "maskpool"), n_images=3,
                                 progress=False)
    want = summarize(score_regions(rf, env["text"], env["ids"]), n_boot=ev_s.n_boot)
    assert b.ci["boxes.top1"] == want["rois/synclip"]["thing.macc1"]
    assert b.ci["stuff.top1"] == want["maskpool/synclip"]["stuff.macc1"]


def test_load_student_refuses_a_checkpoint_without_a_student(env, tmp_path):
    import json

    from ovlib.io import atomic_save

    res = train_or_load(env["params"], "clipself", env["ov"], env["tmp"] / "runs", "CLIPSelf τ=0.2 s0")
    assert not res["trained_now"]
    atomic_save({"model": {"refiner.arch": torch.zeros(6)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no 'student"):
        load_student(env["params"], {"results": res["results"], "weights": str(tmp_path / "bad.pt")})
    assert json.loads(Path(res["results"]).read_text())["config"]["method"] == "clipself"

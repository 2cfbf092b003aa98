"""Recipes as data (params/*.yaml) and the `python -m ovlib.train` entry point."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ovlib import config
from ovlib.train.recipes import distill_config, resolve_recipe


def test_resolve_recipe_order_selectors_and_merging():
    recipes = [
        {"lr": 1e-5, "loss_weights": {"a": 1.0}},
        {"backbone": "B", "lr": 2e-5},
        {"method": ["m1", "m2"], "loss_weights": {"b": 0.5}},
        {"method": "m1", "backbone": "B", "batch_size": 3},
    ]
    assert resolve_recipe(recipes, "m1", "B") == {"lr": 2e-5, "loss_weights": {"a": 1.0, "b": 0.5}, "batch_size": 3}
    assert resolve_recipe(recipes, "m3", "L") == {"lr": 1e-5, "loss_weights": {"a": 1.0}}
    with pytest.raises(ValueError, match=r"recipes\[0\] has unknown field\(s\) \['learning_rate'\]"):
        resolve_recipe([{"learning_rate": 1}], "m", "b")


@pytest.mark.parametrize("backbone,student,crop,alpha,blocks,tag", [
    ("EVA02-B-16", 1024, 224, 0.7, 12, "merged2b_s8b_b131k"),
    ("EVA02-L-14-336", 896, 336, 0.95, 24, "merged2b_s6b_b61k"),
])
def test_paper_profile_clipself_recipe_is_reference_13(repo_root, backbone, student, crop, alpha, blocks, tag):
    p = config.resolve("paper", [f"backbone={backbone}"], root=repo_root)
    c = distill_config(p, "clipself")
    assert (c.lr, c.weight_decay, c.epochs, c.warmup_steps) == (1e-5, 0.1, 6, 1000)
    assert (c.regions, c.max_split, c.max_boxes) == ("grid", 6, 20)
    got = (c.student_size, c.crop_size, c.alpha, c.unlocked_blocks, c.pretrained)
    assert got == (student, crop, alpha, blocks, tag)
    assert c.batch_size * p["gpus"] == 16  # 8 GPUs x 2
    assert c.data_root == "data/coco" and c.split == "train2017"


def test_paper_profile_declip_and_synclip_recipes_are_reference_13(repo_root):
    pb = config.resolve("paper", root=repo_root)
    pl = config.resolve("paper", ["backbone=EVA02-L-14-336"], root=repo_root)
    d_b, d_l = distill_config(pb, "declip"), distill_config(pl, "declip")
    assert (d_b.student_size, d_b.batch_size, d_b.loss_weights) == (560, 4, {"content": 1.0, "context": 0.1})
    assert d_b.vfm == "vit_base_patch14_reg4_dinov2.lvd142m" and d_l.vfm == "vit_large_patch14_reg4_dinov2.lvd142m"
    assert (d_l.student_size, d_l.batch_size, d_l.alpha) == (560, 2, 0.95)
    s_b, s_l = distill_config(pb, "synclip"), distill_config(pl, "synclip")
    assert (s_b.regions, s_b.thing_crop_scale, s_b.student_size, s_b.batch_size) == ("gt_boxes", 1.5, 560, 2)
    assert s_b.vfm == s_l.vfm == "vit_large_patch14_reg4_dinov2.lvd142m"  # SynCLIP B/16 uses DINOv2-L
    assert s_b.loss_weights == {"content": 1.0, "context": 0.25, "semantic": 0.1}
    assert s_l.loss_weights == {"content": 2.0, "context": 0.05, "semantic": 0.1}


def test_steps_scale_and_out_dir(repo_root):
    p = config.resolve("micro", ["steps_scale=0.5"], root=repo_root)
    c = distill_config(p, "clipself")
    assert c.max_steps == 200
    assert distill_config(p, "clipself", {"max_steps": 7}).max_steps == 7  # explicit values are not scaled
    c2 = distill_config(config.resolve("micro", root=repo_root), "clipself", {"lr": 3e-4})
    assert c.out_dir != c2.out_dir and c2.out_dir.startswith("data/cache/runs/clipself-micro-clip-")
    with pytest.raises(ValueError, match="unknown DistillConfig field"):
        distill_config(p, "clipself", {"lrate": 1})


def test_cli_trains_clipself_on_smoke_profile(tmp_path, repo_root):
    """`python -m ovlib.train` end to end: micro-world export, model from a local file, 3 steps, records."""
    from ovlib.models import load_clip

    shutil.copytree(repo_root / "params", tmp_path / "params")
    model, _, _ = load_clip("micro-clip", seed=0)
    torch.save(model.state_dict(), tmp_path / "micro.pt")
    cmd = [sys.executable, "-m", "ovlib.train", "--method", "clipself", "--profile", "smoke", "-p", "seed=1",
           f"pretrained={tmp_path / 'micro.pt'}", "max_images=8", "out_dir=run"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 3
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["config"]["seed"] == 1 and res["config"]["max_images"] == 8
    assert (tmp_path / "data" / "microworld-smoke" / "annotations" / "instances_train2017.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "ovlib.train", "--method", "clipself", "--profile", "smoke",
                          "lrate=1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown DistillConfig field(s) ['lrate']" in bad.stderr


@pytest.fixture(scope="module")
def launcher_env(tmp_path_factory, repo_root):
    """Smoke profile with data/cache in a temp dir and micro CLIP/VFM weights from local files."""
    from ovlib.models import load_clip, load_vfm

    tmp = tmp_path_factory.mktemp("launch")
    torch.save(load_clip("micro-clip", seed=0)[0].state_dict(), tmp / "clip.pt")
    torch.save(load_vfm("micro-vfm", seed=0).state_dict(), tmp / "vfm.pt")
    params = config.resolve("smoke", [f"data_root={tmp / 'mw'}", f"cache_dir={tmp / 'cache'}"], root=repo_root)
    overrides = {"pretrained": str(tmp / "clip.pt"), "vfm_pretrained": str(tmp / "vfm.pt"), "max_images": 6}
    return params, overrides


def _finite_terms(res, method):
    from ovlib.methods import METHODS

    rec = [json.loads(ln) for ln in (Path(res["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    terms = set(METHODS[method].loss_names)
    return terms <= set(rec[-1]) and all(math.isfinite(rec[-1][t]) for t in terms)


@pytest.mark.parametrize("method", ["clipself", "regiontext", "sc-clipself", "rsc-e2e", "declip", "synclip",
                                    "denserc", "synseg"])
def test_registered_methods_train_through_the_launcher(launcher_env, method):
    """A METHODS entry end to end: smoke recipe, micro-world export, models from local files, 3 finite steps."""
    from ovlib.train.launch import train

    params, overrides = launcher_env
    res = train(params, method, overrides)
    assert res["steps"] == 3 and _finite_terms(res, method)


def test_two_stage_refiner_then_rsc_through_the_launcher(launcher_env):
    """Stage 1 trains the Refiner; stage 2 (rsc-clipself, rsc-v) reads its checkpoint for the SCD targets."""
    from ovlib.methods import METHODS
    from ovlib.train.launch import train

    params, overrides = launcher_env
    stage1 = train(params, "refiner", overrides)
    assert stage1["steps"] == 3 and _finite_terms(stage1, "refiner")
    for method in ("rsc-clipself", "rsc-v"):
        res = train(params, method, {**overrides, "method_args": {"refiner": str(Path(stage1["out_dir"]) / "last.pt")}})
        assert res["steps"] == 3 and _finite_terms(res, method)
    untested = set(METHODS) - {"clipself", "regiontext", "sc-clipself", "rsc-e2e", "declip", "synclip", "refiner",
                               "rsc-clipself", "rsc-v", "denserc", "synseg"}
    assert not untested, f"methods without a launcher test: {untested}"


def _losses(res):
    return [{k: v for k, v in json.loads(ln).items() if k not in ("samples_per_s", "elapsed_s")}
            for ln in (Path(res["out_dir"]) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", [
    "clipself", "synclip", "synseg",
    *[pytest.param(m, marks=pytest.mark.slow)
      for m in ("regiontext", "sc-clipself", "rsc-e2e", "refiner", "declip", "denserc")],
])
def test_same_seed_gives_identical_metrics(launcher_env, tmp_path, method):
    """Determinism: two smoke runs of a method with the same seed log identical losses, step by step."""
    from ovlib.train.launch import train

    params, overrides = launcher_env
    a = train(params, method, overrides, out_dir=str(tmp_path / "a"))
    b = train(params, method, overrides, out_dir=str(tmp_path / "b"))
    assert _losses(a) == _losses(b) and len(_losses(a)) == 3

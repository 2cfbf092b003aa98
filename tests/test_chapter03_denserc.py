"""Chapter 03's evaluation hook: ``ovlib.eval.students.student_dense_fn`` gives a trained DenseRC run's own
``X_dense`` (the HSG constructor rebuilt from the run's ``method_args`` with its trained gates), and the CLIP's
dense mode for any other method."""

from __future__ import annotations

import torch

from ovlib import config
from ovlib.eval._common import dense_fn_for_clip, normalize_images
from ovlib.eval.students import load_student, student_dense_fn, train_or_load
from ovlib.methods.denserc import DenseConstructor, DenseRCConfig
from ovlib.models import load_clip, load_vfm
from ovlib.train.pretrain import image_mean_std


def test_student_dense_fn_rebuilds_the_trained_constructor(tmp_path, repo_root):
    clip = load_clip("micro-clip", seed=0)[0]
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    torch.save(load_vfm("micro-vfm", seed=0).state_dict(), tmp_path / "vfm.pt")
    params = config.resolve("smoke", [f"data_root={tmp_path / 'mw'}", f"cache_dir={tmp_path / 'cache'}"],
                            root=repo_root)
    ov = {"pretrained": str(tmp_path / "clip.pt"), "vfm_pretrained": str(tmp_path / "vfm.pt"), "max_images": 4,
          "max_steps": 2, "vfm": "micro-vfm", "loss_weights": {"semantics": 1.0, "coherence": 0.025},
          "method_args": {"construct": "hsg", "n_layers": 2, "projection": "final_each"}}
    res = train_or_load(params, "denserc", ov, tmp_path / "runs", "denserc hsg")
    student = load_student(params, res)
    fn = student_dense_fn(res, student)
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    out = fn(x)
    assert out.shape == (2, 128, 6, 6)  # micro CLIP: 128-d joint space, 48 px / patch 8
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 6, 6))  # unit tokens

    # the same map by hand: the run's config, the checkpoint's trained W_H (not the zero init)
    cfg = DenseRCConfig(construct="hsg", n_layers=2, projection="final_each")
    cons = DenseConstructor.for_model(cfg, student)
    sd = torch.load(res["weights"], weights_only=True)["model"]
    cons.load_state_dict({k[len("constructor."):]: v for k, v in sd.items() if k.startswith("constructor.")})
    assert cons.hsg.proj[0].weight.abs().sum() > 0
    with torch.no_grad():
        ref = cons(student, normalize_images(x, *image_mean_std(student)), normalize=True)
    torch.testing.assert_close(out, ref)
    # and it is not the untrained construction (gates at 0.5 everywhere)
    fresh = DenseConstructor.for_model(cfg, student)
    with torch.no_grad():
        untrained = fresh(student, normalize_images(x, *image_mean_std(student)), normalize=True)
    assert not torch.allclose(out, untrained)

    # a non-DenseRC run: the CLIP's own dense mode
    res_cs = train_or_load(params, "clipself", {"pretrained": str(tmp_path / "clip.pt"), "max_images": 4,
                                                "max_steps": 1}, tmp_path / "runs", "clipself")
    st_cs = load_student(params, res_cs)
    torch.testing.assert_close(student_dense_fn(res_cs, st_cs)(x), dense_fn_for_clip(st_cs, "x+v")(x))
    torch.testing.assert_close(student_dense_fn(res_cs, st_cs, mode="v")(x), dense_fn_for_clip(st_cs, "v")(x))

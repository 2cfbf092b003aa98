"""OVSS on the standard benchmarks: short-side resize, multi-name classes and SCLIP's background rules,
protocol cards, and the ``python -m ovlib.eval.ovss`` CLI on a written fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.benchmarks import write_benchmark

from ovlib.data.benchmarks import BENCHMARKS
from ovlib.eval.profiles import dense_eval_settings
from ovlib.eval.protocols import CARDS, card_templates, protocol_card
from ovlib.eval.segmentation import OVSSConfig, _resized, label_target, predict_labels, resized_size

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ resize (issue 18.3)
def test_short_side_resize_of_a_2to1_image():
    img = np.zeros((100, 200, 3), dtype=np.uint8)  # H = 100, W = 200
    assert tuple(_resized(img, 50, side="short").shape) == (3, 50, 100)  # short side 50, aspect kept
    assert tuple(_resized(img, 50, side="long").shape) == (3, 25, 50)  # the micro setting: longest side 50
    assert tuple(_resized(img, 50).shape) == (3, 25, 50)  # default stays "long"
    # mmcv rescale_size for scale=(2048, 336): factor min(2048/500, 336/375), sides int(x * f + 0.5)
    assert resized_size(375, 500, 336, "short") == (336, 448)
    assert resized_size(500, 333, 448, "short") == (673, 448)
    assert resized_size(100, 10000, 50, "short") == (20, 2048)  # the long side is capped at 2048
    with pytest.raises(ValueError, match="resize"):
        OVSSConfig(resize="middle")


def test_profiles_name_the_resize_side():
    assert dense_eval_settings("paper", 0).ovss.resize == "short"
    assert dense_eval_settings("paper", 0).ovss.image_size == 448
    assert dense_eval_settings("micro", 0).ovss.resize == "long"
    assert dense_eval_settings("smoke", 2).ovss.resize == "long"


# ------------------------------------------------------------------------------------------ labels
def test_multi_name_classes_take_the_max_over_their_names():
    # 3 queries, classes (0, 1, 1); one pixel; cos logits chosen so the class-1 names split the mass
    logits = torch.tensor([0.5, 0.45, 0.45]).view(3, 1, 1)
    p = torch.softmax(10 * logits.view(-1), 0)
    assert p[0] > p[1]  # class 0 wins by max over names although class 1's names sum to more
    assert predict_labels(logits, 10.0, query_class=[0, 1, 1]).item() == 0
    assert predict_labels(torch.tensor([0.5, 0.45, 0.55]).view(3, 1, 1), 10.0, query_class=[0, 1, 1]).item() == 1
    with pytest.raises(ValueError, match="query_class"):
        predict_labels(logits, 10.0, query_class=[0, 2, 2])


def test_area_threshold_and_background_rule():
    # 10 pixels, classes 0 (background), 1, 2; class 2 wins on 1 pixel of the 10 foreground pixels
    logits = torch.zeros(3, 1, 10)
    logits[1, 0, :9] = 1.0
    logits[2, 0, 9] = 1.0
    lab = predict_labels(logits, 5.0, background_index=0, area_threshold=0.1)
    # class 2 holds 1/10 <= 0.1 of the foreground: its probability is zeroed, pixel 9 falls to class 0 or 1
    assert lab[0, 9].item() != 2 and (lab[0, :9] == 1).all()
    lab = predict_labels(logits, 5.0, background_index=0, area_threshold=0.05)
    assert lab[0, 9].item() == 2
    # threshold: max prob softmax(5 * [0, 1, 0]) = e^5 / (e^5 + 2) ~ 0.987
    assert (predict_labels(logits, 5.0, prob_threshold=0.99, background_index=0) == 0).all()
    assert (predict_labels(logits, 5.0, prob_threshold=0.98, background_index=0) != 0).all()


def test_label_target_ignores_255_and_names_bad_values():
    t = label_target(np.array([[0, 2, 255]]), 3)
    assert t.tolist() == [[0, 2, -1]]
    with pytest.raises(ValueError, match="img7.png.*label value 3"):
        label_target(np.array([[3]]), 3, name="img7.png")


# ------------------------------------------------------------------------------------------ cards
def test_cards_cover_every_benchmark():
    for proto, cards in CARDS.items():
        assert set(cards) == set(BENCHMARKS), proto
        for b, card in cards.items():
            cfg = card.ovss_config()
            assert cfg.resize == "short" and cfg.image_size == card.short_side and cfg.crop == card.slide_crop
            has_bg = BENCHMARKS[b].has_background
            assert (card.prob_threshold is not None) == has_bg, (proto, b)
            assert (cfg.background_index == 0) == has_bg
            assert card.as_dict()["background_rule"].startswith("class 0" if has_bg else "none")
    sc = protocol_card("voc21", "sclip")
    assert (sc.logit_scale, sc.prob_threshold, sc.area_threshold, len(sc.background_names)) == (65.0, 0.1, 0.1, 26)
    assert protocol_card("cityscapes", "sclip").short_side == 560
    assert protocol_card("coco_stuff171", "sclip").short_side == 448
    px = protocol_card("coco_object", "proxyclip")
    assert (px.slide_crop, px.slide_stride, px.prob_threshold, len(px.background_names)) == (336, 112, 0.25, 17)
    assert dict(px.extra) == {"beta": 1.2, "gamma": 3.0}
    assert len(card_templates("openai_imagenet_80")) == 80
    assert all("{}" in t for t in card_templates("openai_imagenet_80"))
    with pytest.raises(ValueError, match="protocol"):
        protocol_card("voc21", "mystery")


# ------------------------------------------------------------------------------------------ CLI
def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_cli_prints_card_and_number(tmp_path):
    write_benchmark("voc21", tmp_path / "voc", n=2, seed=1)
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "ovlib.eval.ovss", "--benchmark", "voc21", "--root", str(tmp_path / "voc"),
           "--method", "sclip", "--backbone", "micro-clip", "--pretrained", "none", "--device", "cpu",
           "--set", "short_side=64", "--set", "slide_crop=64", "--set", "slide_stride=32", "--set", "templates=micro",
           "--n-boot", "10",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "protocol card: voc21 / sclip (with overrides)" in r.stdout
    assert "logit_scale       65.0" in r.stdout and "mIoU" in r.stdout
    rec = json.loads(out.read_text())
    pt, lo, hi = rec["miou"]
    assert 0.0 <= lo <= pt <= hi <= 100.0 and rec["n_images"] == 2
    assert rec["card"]["short_side"] == 64 and rec["overrides"] == {"short_side": 64, "slide_crop": 64,
                                                                    "slide_stride": 32, "templates": "micro"}
    assert rec["card"]["prob_threshold"] == 0.1 and rec["ovss_config"]["resize"] == "short"
    assert set(rec["per_class_iou"]) == {c[0] for c in BENCHMARKS["voc21"].classes}


def test_cli_proxyclip_in_process(tmp_path, capsys):
    from ovlib.eval.ovss import main

    write_benchmark("voc20", tmp_path, n=1, seed=2)
    rec = main(["--benchmark", "voc20", "--root", str(tmp_path), "--method", "proxyclip", "--backbone",
                "micro-clip", "--pretrained", "none", "--vfm", "micro-vfm", "--vfm-pretrained", "none",
                "--device", "cpu", "--set", "short_side=48", "--set", "slide_crop=48", "--set", "slide_stride=48",
                "--set", "templates=micro", "--n-boot", "5"])
    text = capsys.readouterr().out
    assert "voc20 / proxyclip" in text and "mIoU" in text
    assert rec["card"]["protocol"] == "proxyclip" and rec["card"]["extra"] == {"beta": 1.2, "gamma": 3.0}
    assert rec["card"]["prob_threshold"] is None and rec["vfm"] == "micro-vfm"
    assert np.isfinite(rec["miou"][0])


def test_cli_student_run_uses_its_weights(tmp_path, capsys):
    """``--student RUN_DIR``: the run's ``student.*`` weights are evaluated (the number equals a direct
    evaluation of those weights, and differs from the base weights')."""
    import dataclasses

    from ovlib.data.benchmarks import load_benchmark
    from ovlib.eval._common import dense_fn_for_clip
    from ovlib.eval.ovss import evaluate_benchmark, main
    from ovlib.models import load_clip
    from ovlib.models.clip import _micro_tokenizer
    from ovlib.train.distill import DistillConfig

    write_benchmark("context59", tmp_path / "data", n=1, seed=4)
    base, _, _ = load_clip("micro-clip", seed=0)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    student, _, _ = load_clip("micro-clip", seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    run = tmp_path / "run"
    run.mkdir()
    cfg = DistillConfig(method="clipself", backbone="micro-clip", pretrained=str(tmp_path / "base.pt"))
    (run / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    torch.save({"model": {f"student.{k}": v for k, v in student.state_dict().items()}}, run / "ensemble-final.pt")
    sets = ["--set", "short_side=32", "--set", "slide_crop=32", "--set", "slide_stride=32",
            "--set", "templates=micro"]
    rec = main(["--benchmark", "context59", "--root", str(tmp_path / "data"), "--student", str(run), "--profile",
                "smoke", "--device", "cpu", "--n-boot", "5", *sets])
    assert "context59 / sclip" in capsys.readouterr().out and rec["student_method"] == "clipself"
    card = protocol_card("context59", "sclip").replace(short_side=32, slide_crop=32, slide_stride=32,
                                                         templates="micro")
    ds = load_benchmark("context59", tmp_path / "data")
    direct = {}
    for name, m in (("student", student.eval()), ("base", base.eval())):
        r = evaluate_benchmark(dense_fn_for_clip(m, "x+v"), ds, m, _micro_tokenizer(m.context_length), card,
                               n_boot=5, progress=False)
        direct[name] = (r["miou"], r["per_class_iou"])
    assert rec["miou"] == pytest.approx(direct["student"][0])
    assert rec["per_class_iou"] == direct["student"][1] != direct["base"][1]

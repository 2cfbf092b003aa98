"""The book's training precision: one contract parameter (``precision``: fp32 | bf16 | auto) decides the
autocast of every training -- pre-training of the micro backbones and distillation -- fixed to fp32 in the micro
and smoke profiles (bf16 moves chapter 01's numbers: benchmarks/results/precision_h200.json), bf16-where-native
in paper; and the comparison of ``scripts/precision_study.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ovlib.config import ParamError, resolve, training_precision
from ovlib.train.pretrain import pretrain_configs
from ovlib.train.proxies import clipseg_config
from ovlib.train.recipes import distill_config

ROOT = Path(__file__).resolve().parent.parent


def test_profiles_fix_the_precision():
    assert resolve("micro", root=ROOT)["precision"] == "fp32"
    assert resolve("smoke", root=ROOT)["precision"] == "fp32"
    assert resolve("paper", root=ROOT)["precision"] == "auto"
    assert resolve("paper", ["dry_run=true"], root=ROOT)["precision"] == "fp32"  # the CPU dry run
    assert training_precision("micro") == "fp32" and training_precision({}) == "auto"
    with pytest.raises(ParamError, match="precision"):
        resolve("micro", ["precision=fp16"], root=ROOT)


@pytest.mark.parametrize("precision, amp", [("fp32", "none"), ("bf16", "bf16"), ("auto", "auto")])
def test_distillation_amp_follows_the_precision(precision, amp):
    P = resolve("micro", [f"precision={precision}"], root=ROOT)
    assert distill_config(P, "clipself").amp == amp
    assert distill_config(P, "clipself", {"amp": "fp16"}).amp == "fp16"  # an explicit override wins


def test_a_recipe_that_pins_amp_wins():
    P = resolve("micro", ["precision=bf16"], root=ROOT)
    P["recipes"] = [*P["recipes"], {"method": "clipself", "amp": "none"}]
    assert distill_config(P, "clipself").amp == "none"
    assert distill_config(P, "regiontext").amp == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretraining_configs_follow_the_precision(precision):
    P = resolve("smoke", [f"precision={precision}"], root=ROOT)
    clip_cfg, vfm_cfg = pretrain_configs(P, P["steps_scale"], P["seed"])
    assert clip_cfg.precision == vfm_cfg.precision == precision
    assert clipseg_config(P, P["steps_scale"], P["seed"]).precision == precision
    other = resolve("smoke", ["precision=" + ("bf16" if precision == "fp32" else "fp32")], root=ROOT)
    assert pretrain_configs(other, 1.0, 0)[0] != pretrain_configs(P, 1.0, 0)[0]  # another cache key


def _study():
    spec = importlib.util.spec_from_file_location("precision_study", ROOT / "scripts" / "precision_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_precision_study_compare_by_hand():
    runs = [{"precision": "fp32", "seed": 0, "metrics": {"a": [10.0, 9.0, 11.0], "b": [50.0, 40.0, 60.0]}},
            {"precision": "bf16", "seed": 0, "metrics": {"a": [12.5, 11.0, 14.0], "b": [49.0, 39.0, 59.0]}},
            {"precision": "fp32", "seed": 1, "metrics": {"a": [7.0, 6.0, 8.0], "b": [55.0, 45.0, 65.0]}},
            {"precision": "bf16", "seed": 2, "metrics": {"a": [0.0, 0.0, 0.0], "b": [0.0, 0.0, 0.0]}}]  # no fp32 pair
    rows, report = _study().compare(runs)
    assert [(r["metric"], r["seed"]) for r in rows] == [("a", 0), ("b", 0)]
    a, b = rows
    assert a["delta"] == pytest.approx(2.5) and a["outside"] and a["seed_delta"] == pytest.approx(-3.0)
    assert b["delta"] == pytest.approx(-1.0) and not b["outside"] and b["seed_delta"] == pytest.approx(5.0)
    assert "1 of 2 numbers moved outside" in report and "largest |bf16 − fp32| 2.5" in report


def test_precision_study_rejects_bad_runs():
    with pytest.raises(SystemExit):
        _study().main(["--runs", "fp16:0"])

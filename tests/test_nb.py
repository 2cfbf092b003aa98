"""The chapters' shared helpers (ovlib.nb): formats, tables, the setup contract."""

import math
from pathlib import Path

import pytest
import torch

from ovlib import config
from ovlib.nb import ci, ci_signed, ms, resolve_device, setup, table

ROOT = Path(__file__).resolve().parents[1]


def test_ci_formats_point_and_interval():
    assert ci((51.63, 49.41, 53.72)) == "51.6 [49.4, 53.7]"
    assert ci((1.0, 0.5, 1.5), digits=2) == "1.00 [0.50, 1.50]"
    assert ci((math.nan, 0, 1)) == "–"
    assert ci((2.0, math.nan, math.nan)) == "2.0"


def test_ci_signed_shows_signs():
    assert ci_signed((1.25, -0.3, 2.5)) == "+1.2 [-0.3, +2.5]"
    assert ci_signed((-3.0, math.inf, 1.0)) == "-3.0"


def test_ms_is_mean_and_sample_std():
    assert ms([1.0, 2.0, 3.0]) == "2.0 ± 1.0"
    assert ms([4.0]) == "4.0"
    assert ms([math.nan]) == "–"
    assert ms([1.0, math.nan, 3.0], digits=2) == "2.00 ± 1.41"


def test_table_shape_and_bad_row():
    assert table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        table(["a", "b"], [[1]])


def test_setup_validates_seeds_and_resolves_device():
    ns = dict(config.load_profile("smoke", root=ROOT))
    ns["device"] = "auto"
    P, dev = setup(ns)
    assert dev == resolve_device("auto") and P["profile"] == "smoke"
    a = torch.rand(3)
    setup(ns)
    assert torch.equal(a, torch.rand(3))  # setup seeds torch with P["seed"]
    bad = dict(ns)
    del bad["seed"]
    with pytest.raises(config.ParamError, match="seed"):
        setup(bad)

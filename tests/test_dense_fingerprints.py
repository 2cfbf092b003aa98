"""``dense_features`` still computes what it computed when tests/fixtures/dense_fingerprints.json was written.

The checksums (tests/helpers/dense_fingerprints.py explains them) catch an upgrade of torch / open_clip / timm that
changes a mode's output, and a one-line change of a mode's math; the failure names the tower, the mode and the
library versions then and now. After an intended change: ``make fingerprints``.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tests.helpers import dense_fingerprints as D


@pytest.fixture(scope="module")
def fixture_doc():
    return json.loads(D.FIXTURE.read_text())


@pytest.fixture(scope="module")
def computed():
    return D.compute()


def test_dense_features_match_their_fingerprints(fixture_doc, computed):
    ref = fixture_doc["fingerprints"]
    then, now = fixture_doc["generated_with"], D.versions()
    problems = []
    for key in sorted(set(ref) | set(computed)):
        if key not in ref:
            problems.append(f"{key}: no fingerprint (a new mode or preset?)")
        elif key not in computed:
            problems.append(f"{key}: fingerprinted but no longer computed (a mode or preset removed?)")
        else:
            diff = D.compare(ref[key], computed[key])
            if diff:
                tower, mode = key.split("/", 1)
                more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
                problems.append(f"tower {tower}, mode {mode}: " + "; ".join(diff[:3]) + more)
    assert not problems, (
        f"{len(problems)} dense_features fingerprint(s) changed:\n  " + "\n  ".join(problems)
        + "\nfingerprints generated with " + ", ".join(f"{k} {v}" for k, v in sorted(then.items()))
        + "\nthis run:                    " + ", ".join(f"{k} {v}" for k, v in sorted(now.items()))
        + f"\nIf the change is intended, regenerate: {fixture_doc['regenerate']}"
    )


def test_every_case_ran_on_every_tower(computed):
    errors = {k: v["error"] for k, v in computed.items() if "error" in v}
    assert not errors, (f"dense_features raised on a fingerprint case: {errors}; a mode that needs more inputs "
                        "gets them in tests/helpers/dense_fingerprints.py:cases(), then `make fingerprints`")


def test_fingerprints_tell_every_two_configurations_apart(fixture_doc):
    """The tolerances are tight enough that two cases whose outputs differ at all (on some tower) are told apart
    on some tower: a one-line change turning one mode's math into another's cannot pass. Cases with identical
    outputs everywhere are one configuration spelled twice (``preset:maskclip`` and ``x+v``)."""
    ref = fixture_doc["fingerprints"]
    names = sorted(n for n, kw in D.cases().items() if "_size" not in kw)  # the 64 px case differs in shape
    close = []
    for a, b in itertools.combinations(names, 2):
        pairs = [(ref[f"{t}/{a}"], ref[f"{t}/{b}"]) for t in D.TOWERS]
        if all(x == y for x, y in pairs):
            continue
        if not any(D.compare(x, y) for x, y in pairs):
            close.append((a, b))
    assert not close, f"different outputs that the fingerprint tolerances cannot tell apart: {close}"


def test_compare_tolerates_fp32_noise_but_not_a_small_change():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 3, generator=g)  # (B, C, h, w)
    ref = D.checksum(x)
    assert D.compare(ref, D.checksum(x * (1 + 1e-6))) == []
    assert D.compare(ref, D.checksum(x + 1e-6 * torch.randn(x.shape, generator=g))) == []
    assert D.compare(ref, D.checksum(x * 1.01))  # a 1 % change of scale
    swapped = D.checksum(x.transpose(2, 3).contiguous())  # same values, other places: plain sums agree
    assert swapped["sum"] == pytest.approx(ref["sum"]) and swapped["abs_sum"] == pytest.approx(ref["abs_sum"])
    assert any("weighted_sum" in d for d in D.compare(ref, swapped))
    assert D.compare(ref, D.checksum(x[:, :, :2])) == [f"shape {[2, 16, 2, 3]} != {[2, 16, 3, 3]}"]


def test_seeded_weights_depend_on_names_not_on_order():
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.nn.init.zeros_(b[0].weight)  # a different library initialisation
    D.seeded_weights(a, 5)
    D.seeded_weights(b, 5)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    c = D.seeded_weights(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)), 6)
    assert not torch.equal(c[0].weight, a[0].weight)  # another base seed, other weights
    assert torch.allclose(a[1].weight, torch.ones(4), atol=0.5) and not torch.equal(a[1].weight, torch.ones(4))

"""Study.run_many: the runs not in the shared cache trained side by side in worker processes (ovlib.parallel), each
once, the rest loaded; the same runs as Study.run one after the other (up to the floating-point order of threads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovlib import config
from ovlib.study import Study


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, repo_root):
    from ovlib.models import load_clip

    tmp = tmp_path_factory.mktemp("runmany")
    clip, _, _ = load_clip("micro-clip", seed=0)
    torch.save(clip.state_dict(), tmp / "clip.pt")
    p = config.resolve("smoke", [f"data_root={tmp / 'mw'}", f"cache_dir={tmp / 'cache'}"], root=repo_root)
    ov = {"pretrained": str(tmp / "clip.pt"), "max_images": 4, "max_steps": 3}
    return tmp, p, ov


def _study(p, repo_root, workers):
    p = {**p, "budgets": {**p["budgets"], "02": {**p["budgets"]["02"], "workers": workers}}}
    return Study(p, "02", root=repo_root, log=False)


def _losses(run) -> list[float]:
    return [r["loss"] for r in run.history if "loss" in r]


def test_run_many_trains_each_missing_run_once_in_workers_and_matches_run(smoke, repo_root):
    tmp, p, ov = smoke
    specs = [{"method": "clipself", "seed": s, "overrides": ov} for s in (0, 1)]
    specs.append({"method": "clipself", "seed": 0, "row": "again", "overrides": ov})  # the same run twice
    par = _study(p, repo_root, 2)
    par.runs_dir = tmp / "runs-workers"
    assert par.workers == 2
    runs = par.run_many(specs, evaluate=False)
    assert [r.row for r in runs] == ["clipself", "clipself", "again"] and [r.seed for r in runs] == [0, 1, 0]
    assert runs[0].res["out_dir"] == runs[2].res["out_dir"] != runs[1].res["out_dir"]
    # trained here (by this chapter's workers) once each; the repeated spec loads the same folder
    assert [r.trained_now for r in runs] == [True, True, False]
    assert all(json.loads((Path(r.res["out_dir"]) / "done.json").read_text()) for r in runs)
    # a second batch finds everything in the shared cache: nothing trains
    again = _study(p, repo_root, 2)
    again.runs_dir = par.runs_dir
    assert not any(r.trained_now for r in again.run_many(specs[:2], evaluate=False))
    # the serial path (one process, Study.run) trains the same runs: the same folders' names, the same losses up to
    # the floating-point order of one thread against several
    ser = _study(p, repo_root, 1)
    ser.runs_dir = tmp / "runs-serial"
    sruns = ser.run_many(specs[:2], evaluate=False)
    assert [Path(r.res["out_dir"]).name for r in sruns] == [Path(r.res["out_dir"]).name for r in runs[:2]]
    for a, b in zip(sruns, runs[:2]):
        assert np.allclose(_losses(a), _losses(b), rtol=1e-4, atol=1e-5) and len(_losses(a)) > 0


def test_run_many_rejects_a_bad_spec_and_an_accelerator_has_one_worker(smoke, repo_root):
    _, p, ov = smoke
    st = _study(p, repo_root, 2)
    with pytest.raises(ValueError, match="needs 'method'"):
        st.run_many([{"seed": 0}])
    with pytest.raises(ValueError, match=r"unknown: \['sede'\]"):
        st.run_many([{"method": "clipself", "sede": 1}])
    gpu = Study({**st.params}, "02", device="meta", root=repo_root, log=False)
    assert gpu.workers == 1 and _study(p, repo_root, 0).workers == 1

"""``benchmarks/run.py``: runs end to end (cheap sections, ``--quick``) and writes the documented JSON schema.

No timing assertions: timings depend on the machine and its load; targets are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
FIGURE_KEYS = {"section", "name", "unit", "median", "min", "max", "n", "samples", "target", "verdict", "note"}
VERDICTS = {"", "met", "met at median", "missed at median", "missed"}


def _run(tmp_path: Path, *args: str, timeout: int) -> tuple[dict, str]:
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    res = subprocess.run([sys.executable, str(RUN), "--quick", "--out", str(out), *args], check=False, cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text()), res.stdout


def _check_schema(data: dict, sections: set[str], repeats: int) -> None:
    assert data["schema"] == 1
    assert data["spread"] == "min-max"
    m = data["machine"]
    for k in ("cpu", "cores", "torch", "torch_threads", "python", "date", "loadavg_start", "loadavg_end"):
        assert k in m, k
    assert set(data["sections"]) == sections
    for s in data["sections"].values():
        assert s["seconds"] >= 0
    assert data["wall_s"] > 0
    figs = data["figures"]
    assert figs and {f["section"] for f in figs} == sections
    for f in figs:
        assert FIGURE_KEYS <= set(f), f
        assert f["n"] == len(f["samples"]) == repeats, f
        assert f["min"] <= f["median"] <= f["max"], f
        assert f["verdict"] in VERDICTS
        if f["target"] is not None:
            assert f["target"]["op"] in ("<=", ">=") and f["target"]["value"] > 0
            assert f["verdict"] != ""


def test_quick_cheap_sections(tmp_path):
    data, stdout = _run(tmp_path, "--only", "microworld,memory", "--repeats", "1", "--grid", "16", "--dim", "64",
                        timeout=120)
    _check_schema(data, {"microworld", "memory"}, repeats=1)
    names = {f["name"] for f in data["figures"]}
    assert "full scene 64 px, wall" in names
    assert {"SCD naive: peak added", "SCD chunked (256 rows): peak added", "SCD naive / chunked peak"} <= names
    # the printed table has one row per figure
    rows = [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| section")]
    assert len(rows) == len(data["figures"])
    mem = data["sections"]["memory"]["meta"]
    assert mem["grid"] == 16 and mem["dim"] == 64
    # naive and chunked SCD compute the same loss
    assert abs(mem["losses"]["naive"] - mem["losses"]["chunked"]) < 1e-4 * abs(mem["losses"]["naive"])


def test_unknown_section_is_an_error(tmp_path):
    res = subprocess.run([sys.executable, str(RUN), "--only", "nope", "--out", str(tmp_path / "x.json")], check=False,
                         cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown section" in res.stderr


@pytest.mark.slow
def test_quick_every_section(tmp_path):
    """Every method of ``METHODS`` steps through the trainer's loss on the synthetic batch; every section runs."""
    from ovlib.methods import METHODS

    data, _ = _run(tmp_path, "--repeats", "1", "--grid", "16", "--dim", "64", timeout=900)
    _check_schema(data, {"microworld", "pretrain", "methods", "dense", "memory", "detector", "runs"}, repeats=1)
    names = {f["name"] for f in data["figures"]}
    for m in METHODS:
        assert f"micro {m}: step time" in names
    assert {"micro synclip / declip", "micro clipself / clipself (noise floor)"} <= names
    assert {"micro CLIP pre-training, inline data, full text (old)",
            "micro CLIP pre-training, shards incl. rendering, trimmed text (new)",
            "micro CLIP pre-training, shards incl. rendering, full text",
            "new / old end to end (shards incl. rendering, trimmed text / inline, full text)",
            "trimmed / full text (both shards, optimiser loop)",
            "MFU inline, full text (old) vs bf16 matmul peak",
            "MFU shards incl. rendering, trimmed text (new) vs fp32 matmul peak"} <= names
    pre = data["sections"]["pretrain"]["meta"]
    assert pre["render_s"][0] > 0  # the shards were rendered by the run
    # the new path's FLOPs count the text positions it ran: fewer than the full context's
    assert 1 < pre["text_len"] < 32 and pre["flops_per_sample"]["trim"] < pre["flops_per_sample"]["full"]
    # chapter 06's detector phase and the chapters' distillation runs, each serial against two worker processes
    workers = [f for f in data["figures"] if f["name"] == "speed-up of the worker processes (serial / workers)"]
    assert sorted(f["section"] for f in workers) == ["detector", "runs"]

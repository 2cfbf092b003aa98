"""Kill the trainer with SIGKILL at a random step, resume, and reach bit-identical weights (CPU)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS = 8


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    from ovlib.models import load_clip

    root = tmp_path_factory.mktemp("ft")
    shutil.copytree(repo_root / "params", root / "params")
    model, _, _ = load_clip("micro-clip", seed=0)
    torch.save(model.state_dict(), root / "micro.pt")
    return root


def _cmd(root: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "ovlib.train", "--method", "clipself", "--profile", "smoke",
            f"pretrained={root / 'micro.pt'}", "max_images=8", f"max_steps={STEPS}", "save_every=1",
            "batch_size=2", f"out_dir={out}"]


ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _steps_logged(path: Path) -> int:
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(project):
    proc = subprocess.run(_cmd(project, "ref"), cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(project / "ref" / "last.pt")


def _kill_and_resume(project: Path, reference: dict, trial: int, kill_at: int) -> None:
    out = f"killed{trial}"
    p = subprocess.Popen(_cmd(project, out), cwd=project, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _steps_logged(project / out / "metrics.jsonl") < kill_at and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = _steps_logged(project / out / "metrics.jsonl")
    assert killed_at < STEPS, "the run finished before it could be killed"
    proc = subprocess.run(_cmd(project, out), cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _weights(project / out / "last.pt")
    assert got.keys() == reference.keys()
    diff = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not diff, f"trial {trial} (killed after step {killed_at}): weights differ in {diff[:5]}"
    steps = [json.loads(ln)["step"] for ln in (project / out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_sigkill_and_resume_is_bit_identical(project, reference):
    _kill_and_resume(project, reference, 0, kill_at=random.Random(0).randint(2, STEPS - 3))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(1, 6))
def test_sigkill_and_resume_is_bit_identical_five_trials(project, reference, trial):
    _kill_and_resume(project, reference, trial, kill_at=random.Random(trial).randint(1, STEPS - 2))

"""Crash safety: kill runs with SIGKILL, rerun them, and find exactly the weights and records of an uninterrupted run.

Two kinds of kills:

* by a timer, at a random step (the original trials);
* at a named instant, through ``OVLIB_FAULT`` (:func:`ovlib.io.fault_point`: the process SIGKILLs itself there;
  ``write:<file>`` instants leave the file's temporary copy -- or, for ``metrics.jsonl``, the record line -- half
  written). One test per instant of issue 25: before the first checkpoint, between a record and its checkpoint,
  during a checkpoint / record / alpha-ensemble / results write, between an ensemble and its checkpoint; the
  chapters' run cache (``train_or_load``) and a study-layer evaluation (``run_once``) killed before ``done.json``;
  the micro pre-training (``_RunLog``) killed before its first state, between a step and its state, during the
  state and final writes, and between the final write and the state's removal.

Every test asserts: the weights equal the uninterrupted run's bit for bit, the records hold steps 1..N exactly
once, and results files exist only for finished runs.

The jobs are single-threaded subprocesses (``OMP_NUM_THREADS=1``): the kill-and-rerun chains of a parametrized test's
selected instants run two at a time in a module fixture (both cores of a CI machine busy), and each test asserts on
its own chain's outcome -- what was on disk right after its kill, and the finished run.
"""

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

from ovlib.io import read_jsonl, safe_load

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


ENV = {k: v for k, v in os.environ.items() if k != "OVLIB_FAULT"}
ENV.update({"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
JOBS = Path(__file__).resolve().parent / "helpers" / "fault_jobs.py"


def _selected(request, test: str) -> list:
    """The ``instant`` / ``trial`` parameters of ``test``'s items selected in this session (marker and ``-k``
    selection applied), in collection order."""
    return [next(iter(it.callspec.params.values())) for it in request.session.items
            if getattr(it, "originalname", None) == test and hasattr(it, "callspec")]


def _two_at_a_time(fn, keys) -> dict:
    """``fn(key)`` for every key, two at a time: every job is a chain of single-threaded subprocesses
    (``OMP_NUM_THREADS=1``), so two chains keep both cores of a CI machine busy. Returns key -> future; the test
    owning a key calls ``.result()``, so a failure is reported by that test (and only by it)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        futures = {k: ex.submit(fn, k) for k in keys}
    return futures


def _result(futures: dict, key, fn):
    """The owning test's result: its future's, or ``fn(key)`` run now when the session did not select it above."""
    return futures[key].result() if key in futures else fn(key)


def _steps_logged(path: Path) -> int:
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def _weights(path: Path) -> dict:
    return safe_load(path)["model"]


def _same(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    diff = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diff, f"{what}: weights differ in {diff[:5]}"


#: the weight files of a finished smoke run (8 images, batch 2: epochs of 4 steps, alpha = 0.7 ensembles)
WEIGHT_FILES = ("last.pt", "ensemble-epoch1.pt", "ensemble-epoch2.pt", "ensemble-final.pt")


@pytest.fixture(scope="module")
def reference(project):
    proc = subprocess.run(_cmd(project, "ref"), cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(project / "ref" / "last.pt")


@pytest.fixture(scope="module")
def reference_files(project, reference):
    return {name: _weights(project / "ref" / name) for name in WEIGHT_FILES}


def _kill_and_resume(project: Path, reference: dict, trial: int, kill_at: int) -> None:
    """Kill a run by a timer once ``kill_at`` steps are logged, rerun it, compare with the reference."""
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


def _trial(project: Path, reference: dict):
    return lambda trial: _kill_and_resume(project, reference, trial, kill_at=random.Random(trial).randint(1, STEPS - 2))


@pytest.fixture(scope="module")
def five_trials(request, project, reference):
    return _two_at_a_time(_trial(project, reference),
                          _selected(request, "test_sigkill_and_resume_is_bit_identical_five_trials"))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(1, 6))
def test_sigkill_and_resume_is_bit_identical_five_trials(project, reference, five_trials, trial):
    _result(five_trials, trial, _trial(project, reference))


# ------------------------------------------------------------------------------------- kills at named instants
def _killed(cmd: list[str], cwd: Path, fault: str) -> None:
    """Run ``cmd`` with ``OVLIB_FAULT=fault`` and check it died by SIGKILL (i.e. the instant was reached)."""
    proc = subprocess.run(cmd, cwd=cwd, env={**ENV, "OVLIB_FAULT": fault}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, (f"{fault}: expected a SIGKILL, got rc {proc.returncode}",
                                                proc.stderr[-3000:])


def _ok(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _steps(path: Path) -> list[int]:
    recs, torn = read_jsonl(path)
    assert torn == 0
    return [r["step"] for r in recs]


def _check_finished_run(out: Path, reference_files: dict) -> dict:
    """Weights equal the uninterrupted run's, steps 1..N exactly once, results present; returns results.json."""
    for name, ref in reference_files.items():
        _same(_weights(out / name), ref, f"{out.name}/{name}")
    assert _steps(out / "metrics.jsonl") == list(range(1, STEPS + 1))
    assert not list(out.glob(".*.tmp")), "a half-written temporary file was left in the run directory"
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["steps"] == STEPS
    assert [r["step"] for r in [res["train"]["final"]]] == [STEPS]
    return res


# instant -> (OVLIB_FAULT spec, what must be on disk right after the kill)
TRAINER_INSTANTS = {
    # killed after step 1 was logged, before the first last.pt existed (the failing trial of issue 25)
    "before-first-checkpoint": "distill.recorded@1",
    # step 5 logged, its checkpoint not written (last.pt holds step 4)
    "between-record-and-checkpoint": "distill.recorded@5",
    # the 3rd last.pt write is cut: its temporary file is half written, last.pt holds step 2
    "during-checkpoint-write": "write:last.pt@3",
    # the 6th record is half written: metrics.jsonl ends in a torn line
    "during-record-write": "write:metrics.jsonl@6",
    # the epoch-1 alpha ensemble is half written (step 4, before the epoch-end checkpoint)
    "during-ensemble-write": "write:ensemble-epoch1.pt@1",
    # the epoch-1 ensemble is written, the epoch-end checkpoint not yet
    "between-ensemble-and-checkpoint": "distill.ensemble-saved@1",
    # every step trained and checkpointed, the final ensemble half written
    "during-final-ensemble-write": "write:ensemble-final.pt@1",
    # everything written but results.json, which is half written
    "during-results-write": "write:results.json@1",
}


def _trainer_kill(project: Path):
    """instant -> (run dir, what was on disk right after the kill, the rerun's log): kill at the instant, rerun."""
    def job(instant: str):
        out = project / f"at-{instant}"
        _killed(_cmd(project, out.name), project, TRAINER_INSTANTS[instant])
        recs, torn = read_jsonl(out / "metrics.jsonl")
        killed = {"results": (out / "results.json").is_file(), "last": (out / "last.pt").exists(),
                  "steps": [r["step"] for r in recs], "torn": torn, "tmp": bool(list(out.glob(".*.tmp")))}
        return out, killed, _ok(_cmd(project, out.name), project)
    return job


@pytest.fixture(scope="module")
def trainer_kills(request, project, reference_files):
    return _two_at_a_time(_trainer_kill(project), _selected(request, "test_trainer_killed_at_instant_resumes_exactly"))


@pytest.mark.parametrize("instant", [pytest.param(k, marks=[] if k in ("before-first-checkpoint",
                                                                        "during-record-write") else pytest.mark.slow)
                                     for k in TRAINER_INSTANTS])
def test_trainer_killed_at_instant_resumes_exactly(project, reference_files, trainer_kills, instant):
    fault = TRAINER_INSTANTS[instant]
    out, killed, log = _result(trainer_kills, instant, _trainer_kill(project))
    assert not killed["results"], "a killed run left a results file"
    if instant == "before-first-checkpoint":
        assert not killed["last"] and killed["steps"] == [1]
    if instant == "during-record-write":
        assert killed["torn"] == 1 and killed["steps"] == [1, 2, 3, 4, 5]
    if fault.startswith("write:") and not fault.startswith("write:metrics"):
        assert killed["tmp"], "the kill should leave a half-written temporary file"
    res = _check_finished_run(out, reference_files)
    if instant == "before-first-checkpoint":  # the old log is kept aside, named, and the new one starts at 1
        assert _steps(out / "stale-no-checkpoint-1" / "metrics.jsonl") == [1]
        assert res["recovery"]["set_aside"] == ["stale-no-checkpoint-1"]
    if instant == "during-record-write":  # dropped, counted, logged
        assert res["recovery"]["torn_records"] == 1
        assert "dropped a torn last record" in log
    if instant == "between-record-and-checkpoint":
        assert res["recovery"]["replayed_records_dropped"] == 1 and res["recovery"]["resumes"] == 1


def test_fresh_start_over_a_finished_run_keeps_its_records_aside(project, reference_files):
    out = project / "no-resume"
    _ok(_cmd(project, out.name), project)
    _ok(_cmd(project, out.name) + ["--no-resume"], project)
    _check_finished_run(out, reference_files)
    old = out / "stale-no-resume-1"
    assert sorted(p.name for p in old.iterdir()) == sorted(["metrics.jsonl", "results.json", *WEIGHT_FILES])
    assert _steps(old / "metrics.jsonl") == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------------------- the chapters' run cache
def _job(project: Path, *args: str, fault: str | None = None) -> dict | None:
    cmd = [sys.executable, str(JOBS), *args]
    if fault is not None:
        _killed(cmd, project, fault)
        return None
    out = _ok(cmd, project)
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


RUN_CACHE_INSTANTS = {
    "during-training": "distill.recorded@3",  # the run cache's training is killed mid-way
    "after-training-before-done": "run_once.produced@1",  # results.json written, done.json not yet
    "during-done-write": "write:done.json@1",  # done.json half written
}


def _cache_kill(project: Path):
    """instant -> (run dir, its files right after the kill, the rerun's record, a third call's record)."""
    def job(instant: str):
        root = project / f"cache-{instant}"
        _job(project, "train_or_load", str(project), str(root), str(STEPS), fault=RUN_CACHE_INSTANTS[instant])
        (out,) = [d for d in root.iterdir() if d.is_dir()]
        killed = {n: (out / n).is_file() for n in ("done.json", "results.json")}
        res = _job(project, "train_or_load", str(project), str(root), str(STEPS))
        done = json.loads((out / "done.json").read_text())
        return out, killed, res, done, _job(project, "train_or_load", str(project), str(root), str(STEPS))
    return job


@pytest.fixture(scope="module")
def cache_kills(request, project, reference_files):
    return _two_at_a_time(_cache_kill(project), _selected(request, "test_run_cache_killed_is_never_taken_as_finished"))


@pytest.mark.slow
@pytest.mark.parametrize("instant", list(RUN_CACHE_INSTANTS))
def test_run_cache_killed_is_never_taken_as_finished(project, reference_files, cache_kills, instant):
    out, killed, res, done, again = _result(cache_kills, instant, _cache_kill(project))
    assert not killed["done.json"]
    if instant == "during-training":
        assert not killed["results.json"]
    assert res["trained_now"] is (instant == "during-training")  # a finished, unmarked run is resumed at its end
    _check_finished_run(out, reference_files)
    assert done["steps"] == STEPS
    assert again["trained_now"] is False and again["out_dir"] == str(out)


@pytest.mark.slow
def test_study_killed_while_evaluating_is_redone(project, reference_files):
    root = project / "study-eval"
    _job(project, "study", str(project), str(root), str(STEPS), fault="study.evaluate@1")
    study = root / "study"
    assert not (study / "done.json").exists() and (study / "eval.json").is_file()  # a half-written evaluation
    (run,) = [d for d in root.iterdir() if d.is_dir() and d.name != "study"]
    assert (run / "done.json").is_file()  # the training run itself finished and is marked
    rec = _job(project, "study", str(project), str(root), str(STEPS))
    assert rec["produced"] is True
    assert (study / "produce_calls.txt").read_text().count("x") == 2  # the evaluation ran again
    assert json.loads((study / "eval.json").read_text())["score"] == rec["score"]
    _check_finished_run(run, reference_files)
    again = _job(project, "study", str(project), str(root), str(STEPS))
    assert again["produced"] is False and again["score"] == rec["score"]
    assert (study / "produce_calls.txt").read_text().count("x") == 2


# ------------------------------------------------------------------------------------- micro pre-training
@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory):
    """The uninterrupted tiny micro CLIP and micro VFM pre-trainings: final weights and histories."""
    cache = tmp_path_factory.mktemp("pretrain-ref")

    def ref(job: str):
        r = _job(cache, job, str(cache))
        ck = safe_load(r["path"])
        return ck["model"], [h["step"] for h in ck["info"]["history"]], Path(r["path"]).name
    return {job: f.result() for job, f in _two_at_a_time(ref, ("pretrain_clip", "pretrain_vfm")).items()}


def _state_name(final_name: str) -> str:
    return final_name[: -len(".pt")] + ".state.pt"


PRETRAIN_INSTANTS = {  # tiny runs of 4 steps with a state saved after every step but the last
    "before-first-state": ("pretrain_clip", "pretrain.recorded@1"),
    "between-step-and-state": ("pretrain_clip", "pretrain.recorded@3"),
    "during-state-write": ("pretrain_clip", "write:{state}@2"),
    "during-final-write": ("pretrain_clip", "write:{final}@1"),
    "between-final-and-state-removal": ("pretrain_clip", "pretrain.final-written@1"),
    "vfm-between-step-and-state": ("pretrain_vfm", "pretrain.recorded@3"),
}


def _pretrain_kill(tmp_path_factory, pretrain_reference):
    """instant -> (its cache dir, whether the final file existed right after the kill, the rerun's record)."""
    def job_at(instant: str):
        job, spec = PRETRAIN_INSTANTS[instant]
        final_name = pretrain_reference[job][2]
        cache = tmp_path_factory.mktemp(f"pre-{instant}")
        _job(cache, job, str(cache), fault=spec.format(state=_state_name(final_name), final=final_name))
        final_after_kill = next(cache.rglob(final_name), None) is not None
        return cache, final_after_kill, _job(cache, job, str(cache))
    return job_at


@pytest.fixture(scope="module")
def pretrain_kills(request, tmp_path_factory, pretrain_reference):
    return _two_at_a_time(_pretrain_kill(tmp_path_factory, pretrain_reference),
                          _selected(request, "test_pretraining_killed_at_instant_resumes_exactly"))


@pytest.mark.slow
@pytest.mark.parametrize("instant", list(PRETRAIN_INSTANTS))
def test_pretraining_killed_at_instant_resumes_exactly(tmp_path_factory, pretrain_reference, pretrain_kills, instant):
    job, _ = PRETRAIN_INSTANTS[instant]
    ref_model, ref_steps, final_name = pretrain_reference[job]
    cache, final_after_kill, r = _result(pretrain_kills, instant, _pretrain_kill(tmp_path_factory, pretrain_reference))
    assert final_after_kill is (instant == "between-final-and-state-removal")
    ck = safe_load(r["path"])
    _same(ck["model"], ref_model, f"{job} after a kill at {instant}")
    assert [h["step"] for h in ck["info"]["history"]] == ref_steps == list(range(1, len(ref_steps) + 1))
    assert not list(cache.rglob(_state_name(final_name))), "the resumable state outlived the final file"

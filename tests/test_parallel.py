"""ovlib.parallel: independent jobs in spawned worker processes (results in job order, threads never
oversubscribed, a failing job named) and chapter 06's detector jobs run the same in a worker as in-process."""

from __future__ import annotations

import os

import pytest
import torch

from ovlib.parallel import map_processes, plan_workers


def _job(x):  # module level: a spawned worker imports it by name
    return {"x": x, "sq": x * x, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "t": torch.full((3,), float(x))}


def _fails(x):
    if x == 2:
        raise ValueError("job two is bad")
    return x


def test_plan_workers_never_oversubscribes():
    assert plan_workers(jobs=10, workers=2, threads=2) == (2, 1)
    assert plan_workers(jobs=10, workers=4, threads=2) == (2, 1)  # no more processes than threads
    assert plan_workers(jobs=1, workers=2, threads=2) == (1, 2)  # one job: here, on every thread
    assert plan_workers(jobs=10, workers=2, threads=8) == (2, 4)
    assert plan_workers(jobs=10, workers=0, threads=2) == (1, 2)
    with pytest.raises(ValueError, match="workers"):
        plan_workers(3, -1)


def test_in_process_when_one_worker():
    out = map_processes(_job, [1, 2, 3], workers=1)
    assert [o["sq"] for o in out] == [1, 4, 9]
    assert {o["pid"] for o in out} == {os.getpid()}


@pytest.mark.slow
def test_worker_processes_keep_job_order_and_split_threads():
    out = map_processes(_job, list(range(5)), workers=2, threads=2)
    assert [o["sq"] for o in out] == [0, 1, 4, 9, 16]
    assert all(torch.equal(o["t"], torch.full((3,), float(o["x"]))) for o in out)  # tensors come back
    assert os.getpid() not in {o["pid"] for o in out}
    assert {o["threads"] for o in out} == {1}  # 2 processes x 1 thread on 2 threads


@pytest.mark.slow
def test_a_failing_job_is_named():
    with pytest.raises(RuntimeError, match=r"job 2 failed.*job two is bad"):
        map_processes(_fails, [0, 1, 2, 3], workers=2, threads=2, label=str)

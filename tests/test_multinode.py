"""Multi-node DDP: two torchrun "nodes" on localhost (``--nnodes 2``, node ranks 0 and 1, a static rendezvous on
127.0.0.1, gloo) train the synthetic distillation run of ``tests/helpers/synthetic_distill.py``.

The two-node run must give exactly the weights of a one-node, two-process run (same world size, same ranks, same
gloo all-reduce: only the launch differs), and the weights of one process with the same global batch up to the
summation-order tolerance argued in ``test_distill.py``. The SLURM script (``scripts/slurm_paper.sh``) launches
the paper recipes the same way, one torchrun per node.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.synthetic_distill import build, small_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "tests" / "helpers" / "synthetic_distill.py")
STEPS, BATCH = 4, 2  # per rank: global batch 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_node_gloo_launch_equals_one_node_and_one_process(tmp_path):
    port = _free_port()
    out2 = tmp_path / "two_nodes"
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               SCRIPT, str(out2), str(STEPS), str(BATCH)]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    out1 = tmp_path / "one_node"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           SCRIPT, str(out1), str(STEPS), str(BATCH)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two = torch.load(out2 / "final_weights.pt", weights_only=True)
    one_node = torch.load(out1 / "final_weights.pt", weights_only=True)
    assert two.keys() == one_node.keys()
    assert all(torch.equal(two[k], one_node[k]) for k in two), "two nodes differ from one node x 2 processes"
    assert _losses(out2) == _losses(out1) and len(_losses(out2)) == STEPS

    single = build(small_config(str(tmp_path / "single"), max_steps=STEPS, batch_size=2 * BATCH))
    single.fit(resume=False)
    ref = single.method.state_dict()
    worst = max(float((two[k] - ref[k]).abs().max()) for k in ref if ref[k].is_floating_point())
    assert worst < 1e-4, worst  # DDP's summation order (see test_distill.py)
    start = build(small_config(str(tmp_path / "x"))).method.state_dict()
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref if ref[k].is_floating_point())
    assert moved > 1e-3  # training changed the weights: the comparisons are not vacuous


def test_slurm_script_launches_one_torchrun_per_node():
    """The SLURM script is valid bash and starts torchrun with the node count, the node rank of each task and the
    first node as rendezvous (what the two-node test above exercises on localhost)."""
    script = REPO / "scripts" / "slurm_paper.sh"
    assert script.is_file()
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for needle in ("--nnodes", "--node-rank", "SLURM_NODEID", "--master-addr", "srun", "-m ovlib.train",
                   "--profile paper"):
        assert needle in text, needle

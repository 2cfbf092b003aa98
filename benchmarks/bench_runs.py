"""The chapters' distillation runs on two cores: one process with every thread, one run after the other, against
``Study.run_many``'s worker processes of one thread each, side by side (``ovlib.parallel``).

The same batch of runs (micro profile recipes; a micro CLIP pre-trained for the profile's minimum steps -- timing
does not depend on the weights; ``steps`` training steps each) trains both ways in every round, back to back, into
fresh run folders, so each round's ratio compares the two under the same load. Both ways include what each really
pays: the serial path shares one in-memory teacher-target cache across its runs, the workers one per worker; the
worker figure includes starting the processes and building one trainer per method before them
(``Study._warm_caches``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _study(tmp: Path, workers: int):
    from ovlib import config
    from ovlib.study import Study

    root = Path(__file__).resolve().parent.parent
    p = config.resolve("micro", {"steps_scale": 0.001, "cache_dir": str(tmp / "cache"),
                                 "data_root": str(tmp / "data")}, root=root)
    p["budgets"] = {**p["budgets"], "02": {**p["budgets"]["02"], "workers": workers}}
    return Study(p, "02", root=root, log=False)


def specs(methods: tuple[str, ...], seeds: int, steps: int) -> list[dict]:
    """One spec per (method, seed): the micro ``main`` budget with ``steps`` steps."""
    ov = {"max_steps": steps, "warmup_steps": max(1, steps // 10)}
    return [{"method": m, "seed": s, "budget": "main", "overrides": ov} for m in methods for s in range(seeds)]


def rounds(repeats: int, methods: tuple[str, ...] = ("clipself", "declip"), seeds: int = 2, steps: int = 30,
           log=print) -> dict[str, list[float]]:
    """Wall seconds per round of the whole batch, ``serial`` (``workers: 1``: here, every thread) and ``workers``
    (``workers: 2``)."""
    out: dict[str, list[float]] = {"serial": [], "workers": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = _study(tmp, 1)
        warm.run_many(specs(methods, 1, 1), evaluate=False)  # the micro CLIP / VFM / export, outside the timing
        for r in range(repeats):
            for how, workers in (("serial", 1), ("workers", 2)):
                st = _study(tmp, workers)
                st.runs_dir = tmp / f"runs-{r}-{how}"
                t = time.perf_counter()
                st.run_many(specs(methods, seeds, steps), evaluate=False)
                out[how].append(time.perf_counter() - t)
                log(f"[runs] round {r}: {how} {out[how][-1]:.1f} s")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    print(rounds(a.repeats, seeds=a.seeds, steps=a.steps))

"""Where a method's training step spends its time: one profiled step per method (torch.profiler, CPU).

    python benchmarks/profile_methods.py                              # CLIPSelf family, DeCLIP, SynCLIP, DenseRC
    python benchmarks/profile_methods.py --methods clipself,denserc --teacher-cache on --threads 1

The step is ``benchmarks/run.py``'s (the trainer's ``_loss`` under the recipe's autocast, backward, AdamW) on
the micro setting's synthetic batch (160 px, 8 images x 10 boxes, 64-px crops). Every frozen-network call of a
method goes through :meth:`ovlib.methods.base.Distiller.frozen_call` / ``frozen_rows``; they are labelled
``frozen <kind>`` here, so the table splits each step into the frozen networks (teacher crops, teacher dense maps,
Refiner, VFM) and everything else (the student's forward and backward, the losses, the optimiser). With
``--teacher-cache on`` the batch has been seen once, so every frozen output is a cache hit. Per method: the
minimum over ``--rounds`` profiled steps of each label's CPU time. Under load the absolute times are inflated;
the split is what this script is for.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT = "clipself,sc-clipself,rsc-clipself,declip,synclip,denserc"


def _label_frozen_calls() -> None:
    """Wrap ``Distiller.frozen_call`` / ``frozen_rows`` in ``record_function("frozen <kind>")``."""
    from torch.profiler import record_function

    from ovlib.methods.base import Distiller

    for name in ("frozen_call", "frozen_rows"):
        fn = getattr(Distiller, name)

        def wrapped(self, kind, *a, _fn=fn, **k):
            with record_function(f"frozen {kind}"):
                return _fn(self, kind, *a, **k)

        setattr(Distiller, name, functools.wraps(fn)(wrapped))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=DEFAULT)
    p.add_argument("--teacher-cache", choices=("on", "off"), default="off")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import run as R
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(a.threads)
    _label_frozen_calls()
    spec = R.MethodBench("micro", "micro-clip", "micro", 160, 64, 8, 10,
                         {"num_blocks": 2, "inter_layers": (1, 2), "hidden": 512})

    def profiled(make, timed, methods, repeats, label, log):
        for m in methods:
            step = make(m)
            step()  # warm-up (fills the cache when it is on)
            best: dict[str, float] = {}
            for _ in range(a.rounds):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    with record_function("step"):
                        step()
                for e in prof.key_averages():
                    if e.key == "step" or e.key.startswith("frozen "):
                        best[e.key] = min(best.get(e.key, float("inf")), e.cpu_time_total / 1e3)
            frozen = sum(v for k, v in best.items() if k != "step")
            print(f"{m}: step {best['step']:.0f} ms CPU, frozen networks {frozen:.0f} ms "
                  f"({frozen / best['step']:.0%}), the rest {best['step'] - frozen:.0f} ms")
            for k, v in sorted(best.items(), key=lambda kv: -kv[1]):
                if k != "step":
                    print(f"    {k:58s} {v:8.1f} ms")
        return {}

    R._paired = profiled
    print(f"teacher cache {a.teacher_cache}, {a.threads} thread(s), min of {a.rounds} profiled steps per method")
    R.method_steps(spec, a.methods.split(","), 1, teacher_cache=a.teacher_cache == "on", log=lambda s: None)


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmark scripts and ``benchmarks/run.py``: summaries of repeated measurements,
machine information, and the peak-resident-memory probe used by the memory benchmarks.

Spread convention (every figure): the median of ``n`` repeated measurements and their minimum and maximum
(``min-max``; with ``n = 5`` an inter-quartile range would rest on two or three points).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SPREAD = "min-max"


def summarize(samples: Iterable[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "samples"}`` of repeated measurements (NaNs are dropped)."""
    xs = [float(x) for x in samples if not math.isnan(float(x))]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "samples": []}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "samples": xs}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios ``num[i] / den[i]`` of measurements taken back to back in the same round, so that a
    burst of load from other processes hits numerator and denominator alike."""
    if len(num) != len(den):
        raise ValueError(f"paired_ratios: {len(num)} numerators vs {len(den)} denominators")
    return [a / b for a, b in zip(num, den)]


def verdict(s: dict[str, Any], target: float | None, higher_is_better: bool = False) -> str:
    """Compare a summary with a target: ``met`` (the whole min-max range is on the good side), ``met at median``,
    ``missed at median`` or ``missed`` (the whole range on the bad side); ``""`` without a target."""
    if target is None or not s.get("n"):
        return ""
    good = (lambda x: x >= target) if higher_is_better else (lambda x: x <= target)
    lo_ok, med_ok, hi_ok = good(s["min"]), good(s["median"]), good(s["max"])
    if lo_ok and hi_ok:
        return "met"
    if med_ok:
        return "met at median"
    if not lo_ok and not hi_ok:
        return "missed"
    return "missed at median"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load, torch/python versions, date (UTC); the GPU name where CUDA is available."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------ peak resident memory
def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak resident size (``VmHWM``) to the current one through ``/proc/self/clear_refs``
    and return the current resident size in KiB; raises ``OSError`` where the kernel does not allow it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def peak_added_mib(before_kib: int) -> float:
    """Peak resident memory added since :func:`reset_peak_rss` returned ``before_kib``, in MiB."""
    return (status_kib("VmHWM") - before_kib) / 1024


def trials_parser(doc: str, trials: Sequence[str], out: str) -> argparse.ArgumentParser:
    """The command line of the micro proxies' trial scripts (``vfm_grouping.py``, ``clipseg_transfer.py``):
    ``--profile`` (smoke | micro), ``--trials`` (default: all), ``--cache-dir``, ``--data-root``, ``--out``
    (default ``out``); a script adds its own options, then parses with :func:`parse_trials`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--profile", default="micro", choices=("smoke", "micro"))
    ap.add_argument("--trials", nargs="*", default=list(trials))
    ap.add_argument("--cache-dir", default="data/cache")
    ap.add_argument("--data-root", default="data/microworld")
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap


def parse_trials(ap: argparse.ArgumentParser, trials: Sequence[str], argv: Sequence[str] | None = None
                 ) -> argparse.Namespace:
    """Parse ``argv``; an unknown trial name is an error listing the known ones."""
    a = ap.parse_args(argv)
    unknown = sorted(set(a.trials) - set(trials))
    if unknown:
        ap.error(f"unknown trial(s) {unknown}; choose from {sorted(trials)}")
    return a

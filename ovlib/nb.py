"""What every chapter's setup cell and tables share: the parameter contract -> ``(P, device)``, Markdown output,
Markdown tables, and the two number formats of the book (``point [lo, hi]`` intervals, ``mean ± std`` over seeds).

Plain functions, no state; a chapter imports them instead of re-defining them::

    from ovlib.nb import ci, md, ms, setup, table
    P, DEV = setup(globals())
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovlib import config

__all__ = ["setup", "to_project_root", "resolve_device", "md", "table", "ci", "ci_signed", "ms"]


def resolve_device(device: str) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_project_root() -> Path | None:
    """A chapter opened from ``notebooks/`` (JupyterLab, Binder) runs there, but its paths (``data_root``,
    ``cache_dir``, ``params/``) are relative to the project root, where the book's runner executes it: change to
    that root. Returns the new working directory, or ``None`` when nothing changed."""
    cwd = Path.cwd()
    root = cwd.parent
    if cwd.name == "notebooks" and (root / "_toc.yml").is_file() and (root / "params").is_dir():
        os.chdir(root)
        return root
    return None


def setup(namespace: Mapping[str, Any]) -> tuple[dict, torch.device]:
    """Validate the contract keys of a notebook's parameters cell (``globals()``), seed torch with ``P["seed"]``
    and resolve the device. A missing key is a :class:`ovlib.config.ParamError` naming it. A chapter opened from
    ``notebooks/`` works from the project root (:func:`to_project_root`)."""
    moved = to_project_root()
    if moved is not None:
        print(f"working directory: {moved} (the project root, as the book's runner uses)")
    missing = [k for k in config.PARAMS if k not in namespace]
    if missing:
        raise config.ParamError(f"the parameters cell lacks the contract key(s) {missing}")
    P = config.apply_dry_run(config.validate({key: namespace[key] for key in config.PARAMS}))
    torch.manual_seed(P["seed"])
    return P, resolve_device(P["device"])


def md(text: str) -> None:
    """Display ``text`` as Markdown (imported lazily so the module works outside IPython)."""
    from IPython.display import Markdown, display
    display(Markdown(text))


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; every row must have ``len(header)`` cells."""
    out = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        r = list(r)
        if len(r) != len(header):
            raise ValueError(f"table: row {i} has {len(r)} cells, the header {len(header)}: {r!r}")
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def _interval(t, digits: int, sign: str) -> str:
    pt, lo, hi = (float(v) for v in t)
    if not np.isfinite(pt):
        return "–"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{pt:{sign}.{digits}f}"
    return f"{pt:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def ci(t, digits: int = 1) -> str:
    """``'pt [lo, hi]'`` of a ``(point, low, high)`` triple; ``'–'`` for a non-finite point, the point alone when
    the interval is not finite."""
    return _interval(t, digits, "")


def ci_signed(t, digits: int = 1) -> str:
    """:func:`ci` with explicit signs, for differences (``'+1.2 [-0.3, +2.5]'``)."""
    return _interval(t, digits, "+")


def ms(values: Iterable[float], digits: int = 1) -> str:
    """``'mean ± std'`` (sample std, ddof 1) over the finite values; the mean alone for one value, ``'–'`` for none."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return "–"
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else "")

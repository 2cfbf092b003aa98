"""Fingerprints of ``dense_features`` (ovlib/models/dense.py): every mode and preset, three towers, one input.

An upgrade of torch, open_clip or timm has changed dense outputs silently before (CLIP-DINOiser pinned its
versions after exactly that, ``wysoczanska/clip_dinoiser`` issue 10). ``tests/test_dense_fingerprints.py``
recomputes these checksums and compares them with the committed ``tests/fixtures/dense_fingerprints.json``.

* Towers (image towers only, fp32, CPU): the micro CLIP, open_clip ``ViT-B-16`` and ``EVA02-B-16`` (timm's Eva
  trunk with RoPE), built at 48 px (a 6x6 / 3x3 / 3x3 grid). Their weights do **not** come from the libraries'
  initialisers (which may change between releases without changing any forward): every parameter is redrawn
  from a generator seeded by a hash of its own name (:func:`seeded_weights`), so a fingerprint depends only on
  the architecture, the parameter names and the forward math.
* Input: two seeded N(0, 1) images at 48 px, plus one case at 64 px per tower (position-embedding interpolation).
* Keys ``tower/mode`` for every mode of :data:`~ovlib.models.dense.DENSE_MODES` with its defaults,
  ``tower/preset:NAME`` for every :data:`~ovlib.models.dense.PRESETS` entry, ``tower/x+v@64px``; outputs are not
  L2-normalised (``normalize=False``), so a change of scale shows.
* Per key: the shape, the sum, the sum of absolute values, a weighted sum with fixed pseudo-random weights (a
  transpose or a permutation leaves plain sums unchanged, not this one) and eight values at fixed positions.

Regenerate (after an intended change of a mode or a deliberate upgrade; the file records the versions):
``make fingerprints`` (= ``python -m tests.helpers.dense_fingerprints --write``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dense_fingerprints.json"
IMAGE_SIZE = 48
INTERP_SIZE = 64
BATCH = 2
N_VALUES = 8
LIBRARIES = ("torch", "open_clip_torch", "timm", "numpy")

#: Tolerances. fp32 on CPU differs between builds, thread counts and BLAS kernels by ~1e-6 relative; a one-line
#: change of a mode's math (a missing scale, residual, normalisation, a transposed product) moves these
#: checksums by far more than 1e-3 relative. Sums are compared relative to the sum of absolute values, single
#: values relative to the root mean square of the map (a sum can be near zero).
RTOL_SUM = 2e-4
RTOL_VALUE = 2e-3


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def _name_seed(name: str, base: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def seeded_weights(module: nn.Module, base: int) -> nn.Module:
    """Redraw every parameter from a generator seeded by (``base``, its name): 1-D ``*weight`` (norms, layer
    scales) ``1 + 0.1 N``, other 1-D tensors (biases) ``0.05 N``, the rest ``N / sqrt(fan_in)`` (fan-in = the
    product of all but the first dimension; position/class embeddings: ``0.5 N``)."""
    for name, p in module.named_parameters():
        g = torch.Generator().manual_seed(_name_seed(name, base))
        z = torch.randn(p.shape, generator=g, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() <= 1:
            if leaf in ("weight", "gamma") or leaf.startswith("ls") or "scale" in leaf:
                new = 1.0 + 0.1 * z
            else:
                new = 0.05 * z
        elif "pos" in leaf or "cls" in leaf or "class" in leaf or "token" in leaf:
            new = 0.5 * z
        else:
            fan_in = max(1, p[0].numel())
            new = z / fan_in**0.5
        p.copy_(new.to(p.dtype))
    return module.eval()


def _open_clip_visual(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import open_clip

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(name, force_image_size=IMAGE_SIZE, pretrained_text=False)
        return model.visual

    return make


def _micro_visual() -> nn.Module:
    from ovlib.models.clip import MicroClipConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MicroClipConfig(image_size=IMAGE_SIZE).build().visual


#: tower name -> (builder of the image tower, weight seed)
TOWERS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "micro-clip": (_micro_visual, 1),
    "ViT-B-16": (_open_clip_visual("ViT-B-16"), 2),
    "EVA02-B-16": (_open_clip_visual("EVA02-B-16"), 3),
}


def fixed_images(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20261203 + size)
    return torch.randn(BATCH, 3, size, size, generator=g)  # (B, 3, H, W)


def checksum(out: torch.Tensor) -> dict[str, Any]:
    """Shape, sums and a few values of ``out (B, C, h, w)`` in float64."""
    x = out.detach().double().flatten()
    g = torch.Generator().manual_seed(7)
    w = torch.rand(x.numel(), generator=g, dtype=torch.float64)
    idx = torch.linspace(0, x.numel() - 1, N_VALUES).round().long()
    return {
        "shape": list(out.shape),
        "sum": x.sum().item(),
        "abs_sum": x.abs().sum().item(),
        "weighted_sum": (x * w).sum().item(),
        "rms": x.pow(2).mean().sqrt().item(),
        "values": {str(i): x[i].item() for i in idx.tolist()},
    }


def cases() -> dict[str, dict[str, Any]]:
    """``key -> dense_features kwargs`` for the modes and presets present in ovlib now."""
    from ovlib.models.dense import DENSE_MODES, PRESETS, VFM_MODES

    out: dict[str, dict[str, Any]] = {m: {"mode": m} for m in DENSE_MODES}
    out.update({f"preset:{k}": dict(v) for k, v in PRESETS.items()})
    out[f"x+v@{INTERP_SIZE}px"] = {"mode": "x+v", "_size": INTERP_SIZE}
    # VFM-assisted modes (ProxyCLIP) take fixed VFM patch features on a grid of their own
    out.update({m: {"mode": m, "_vfm": True} for m in VFM_MODES})
    return out


def fixed_vfm_features() -> torch.Tensor:
    g = torch.Generator().manual_seed(20261204)
    return torch.randn(BATCH, 16, 4, 4, generator=g)  # (B, C', h', w'): a VFM grid unlike the CLIP's


def compute(towers: dict[str, tuple[Callable[[], nn.Module], int]] | None = None) -> dict[str, Any]:
    """Every ``tower/case`` checksum; a case a tower cannot run is recorded as ``{"error": message}``."""
    from ovlib.models.dense import dense_features

    torch.manual_seed(0)
    results: dict[str, Any] = {}
    for tname, (make, seed) in (towers or TOWERS).items():
        visual = seeded_weights(make(), seed)
        for cname, kwargs in cases().items():
            kw = dict(kwargs)
            size = kw.pop("_size", IMAGE_SIZE)
            if kw.pop("_vfm", False):
                kw["vfm_features"] = fixed_vfm_features()
            try:
                with torch.no_grad():
                    out = dense_features(visual, fixed_images(size), normalize=False, **kw)
            except (TypeError, ValueError) as e:  # e.g. a mode that needs inputs this generic case lacks
                results[f"{tname}/{cname}"] = {"error": f"{type(e).__name__}: {e}"}
                continue
            results[f"{tname}/{cname}"] = checksum(out)
    return results


def compare(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Human-readable differences of one key's checksums (empty when within tolerance)."""
    if "error" in expected or "error" in got:
        return [] if expected == got else [f"expected {expected}, got {got}"]
    if expected["shape"] != got["shape"]:
        return [f"shape {got['shape']} != {expected['shape']}"]
    bad = []
    scale = max(expected["abs_sum"], 1e-12)
    for k in ("sum", "abs_sum", "weighted_sum"):
        if abs(got[k] - expected[k]) > RTOL_SUM * scale:
            bad.append(f"{k} {got[k]:.8g} != {expected[k]:.8g} (tolerance {RTOL_SUM * scale:.3g})")
    tol = RTOL_VALUE * max(expected["rms"], 1e-12)
    for i, v in expected["values"].items():
        if abs(got["values"][i] - v) > tol:
            bad.append(f"value[{i}] {got['values'][i]:.8g} != {v:.8g} (tolerance {tol:.3g})")
    return bad


def document(results: dict[str, Any]) -> dict[str, Any]:
    return {
        "regenerate": "make fingerprints  (= python -m tests.helpers.dense_fingerprints --write)",
        "generated_with": versions(),
        "image_size": IMAGE_SIZE,
        "batch": BATCH,
        "fingerprints": results,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"write {FIXTURE.name} (default: compare and report)")
    args = ap.parse_args(argv)
    results = compute()
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        tmp = FIXTURE.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(document(results), indent=1, sort_keys=True) + "\n")
        tmp.replace(FIXTURE)
        errors = [k for k, v in results.items() if "error" in v]
        print(f"wrote {len(results)} fingerprints to {FIXTURE}" + (f"; cases that raised: {errors}" if errors else ""))
        return 0
    ref = json.loads(FIXTURE.read_text())["fingerprints"]
    n_bad = 0
    for key in sorted(set(ref) | set(results)):
        if key not in ref or key not in results:
            print(f"{key}: only in {'the fixture' if key in ref else 'this run'}")
            n_bad += 1
            continue
        diff = compare(ref[key], results[key])
        if diff:
            n_bad += 1
            print(f"{key}: " + "; ".join(diff))
    print(f"{n_bad} of {len(results)} fingerprints differ")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""One standard OVSS benchmark, one method, one number with its protocol card.

``python -m ovlib.eval.ovss --benchmark voc21 --root DIR --method sclip [--backbone ViT-B-16 --pretrained openai]``
evaluates a training-free method (``vanilla``, any :data:`ovlib.models.dense.PRESETS` name such as ``maskclip``,
``sclip``, ``clearclip``, ``naclip``, or ``proxyclip`` with ``--vfm``) or, with ``--student RUN_DIR``, a trained
student of ``ovlib.train`` (its dense map: ``--method`` then names the student's dense mode or preset, default
``clipself`` = ``x+v``; DenseRC runs use their constructor), on a benchmark of :mod:`ovlib.data.benchmarks`
under a protocol card of :mod:`ovlib.eval.protocols` (``--protocol``; default: the method's own card where
there is one, else SCLIP's, the common protocol of the training-free papers). It prints the card and mIoU
(with a 95 % bootstrap interval over images) and, with ``--out``, writes ``results.json``: the number, the
per-class IoU, the card (with any ``--set`` overrides), the model and the data.

Text: one embedding per class name (mean of the card's templates' unit-norm embeddings, renormalised); the
background class is queried with the card's background names; the softmax runs over all names and each class
takes the max over its names (SCLIP/ProxyCLIP ``postprocess_result``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ovlib.eval.protocols import PROTOCOLS, ProtocolCard, card_templates, protocol_card
from ovlib.eval.segmentation import evaluate_ovss

__all__ = ["method_dense_fn", "benchmark_queries", "evaluate_benchmark", "main", "TRAINING_FREE"]


def _training_free() -> tuple[str, ...]:
    from ovlib.models.dense import PRESETS

    return ("vanilla", *PRESETS, "proxyclip")


TRAINING_FREE = _training_free()


def method_dense_fn(method: str, model: Any, vfm: Any = None, card: ProtocolCard | None = None
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) in [0, 1] -> (B, C, h, w)`` unit-norm dense map of a training-free ``method``
    (``proxyclip`` needs ``vfm``; its beta/gamma come from a proxyclip ``card`` where given)."""
    from ovlib.eval._common import dense_fn_for_clip, dense_fn_for_proxyclip
    from ovlib.models.dense import DENSE_MODES, PRESETS

    if method == "proxyclip":
        if vfm is None:
            raise ValueError("method 'proxyclip' needs a VFM (--vfm)")
        extra = dict(card.extra) if card is not None and card.protocol == "proxyclip" else {}
        return dense_fn_for_proxyclip(model, vfm, beta=extra.get("beta", 1.2), gamma=extra.get("gamma", 3.0))
    if method in PRESETS or method in DENSE_MODES:
        return dense_fn_for_clip(model, method)  # a preset carries all its switches (dense_spec)
    raise ValueError(f"unknown method {method!r}; expected one of {TRAINING_FREE} or a dense mode {DENSE_MODES}")


def benchmark_queries(classes: Sequence[Sequence[str]], card: ProtocolCard, has_background: bool
                      ) -> tuple[list[str], list[int]]:
    """The text queries (one per name) and each query's class; class 0's names are the card's background
    names where the benchmark has a background class and the card sets them."""
    names, owner = [], []
    for c, group in enumerate(classes):
        if c == 0 and has_background and card.background_names:
            group = card.background_names
        for n in group:
            names.append(n)
            owner.append(c)
    return names, owner


@torch.no_grad()
def evaluate_benchmark(dense_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Any, model: Any,
                       tokenizer: Callable, card: ProtocolCard, n_images: int = 0, n_boot: int = 1000, seed: int = 0,
                       device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """mIoU of ``dense_fn`` on a :class:`~ovlib.data.benchmarks.BenchmarkDataset` under ``card``. Returns the
    JSON-ready record (``miou``/``macc`` as ``[point, lo, hi]`` percent, ``per_class_iou``, ``card``)."""
    from ovlib.models.text import text_embeddings

    if card.benchmark != dataset.name:
        raise ValueError(f"card is for {card.benchmark!r} but the dataset is {dataset.name!r}")
    names, owner = benchmark_queries(dataset.classes, card, dataset.has_background)
    text = text_embeddings(model, tokenizer, names, card_templates(card.templates), device=device)  # (Q, D)
    cfg = card.ovss_config()
    res = evaluate_ovss(dense_fn, dataset, text, list(range(dataset.num_classes)), cfg, n_images=n_images,
                        n_boot=n_boot, seed=seed, progress=progress, query_class=owner)
    iou = res["iou"]
    per = {dataset.classes[c][0]: (None if iou is None or iou[c] != iou[c] else float(iou[c]))
           for c in range(dataset.num_classes)}
    return {"benchmark": dataset.name, "split": dataset.split, "n_images": int(res["confusion"].shape[0]),
            "miou": [float(v) for v in res["miou"]], "macc": [float(v) for v in res["macc"]],
            "per_class_iou": per, "card": card.as_dict(), "ovss_config": res["protocol"]}


def _parse_set(items: Sequence[str], card: ProtocolCard) -> dict[str, Any]:
    import yaml

    fields = {f.name: f for f in dataclasses.fields(ProtocolCard)}
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set {it!r} must look like key=value")
        k, raw = it.split("=", 1)
        if k not in fields or k in ("benchmark", "protocol", "source", "extra"):
            raise ValueError(f"--set {k!r}: not a card setting; choose from "
                             f"{[f for f in fields if f not in ('benchmark', 'protocol', 'source', 'extra')]}")
        v = yaml.safe_load(raw)
        if k == "background_names" and v is not None:
            v = tuple(v) if isinstance(v, list) else (str(v),)
        out[k] = v
    return out


def _tokenizer_for(model: Any, backbone: str) -> Callable:
    import open_clip

    from ovlib.models import MICRO_CLIP_CONFIGS
    from ovlib.models.clip import _micro_tokenizer

    if backbone in MICRO_CLIP_CONFIGS:
        return _micro_tokenizer(int(getattr(model, "context_length", MICRO_CLIP_CONFIGS[backbone].context_length)))
    return open_clip.get_tokenizer(backbone)


def _pretrained(v: str | None) -> str | None:
    return None if v is None or v.lower() in ("", "none", "random") else v


def _load_student(run_dir: Path, profile: str, method: str, device: str):
    from ovlib.config import resolve
    from ovlib.eval.students import load_student, student_dense_fn
    res = {"results": str(run_dir / "results.json"), "weights": str(run_dir / "ensemble-final.pt")}
    for p in res.values():
        if not Path(p).is_file():
            raise FileNotFoundError(f"--student {run_dir}: {p} does not exist (a finished ovlib.train run has both "
                                    f"results.json and ensemble-final.pt)")
    params = resolve(profile, root=Path(__file__).resolve().parents[2])
    cfg = json.loads(Path(res["results"]).read_text())["config"]
    model = load_student(params, res, device)
    # a preset name (its switches, incl. the position-embedding interpolation) or a bare dense mode
    return model, _tokenizer_for(model, cfg["backbone"]), student_dense_fn(res, model, method), cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from ovlib.data.benchmarks import BENCHMARKS, load_benchmark

    ap = argparse.ArgumentParser(prog="python -m ovlib.eval.ovss", description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    ap.add_argument("--root", required=True, help="the benchmark's directory in its MMSeg layout")
    ap.add_argument("--split", default="val")
    ap.add_argument("--method", default=None, help=f"training-free: {', '.join(TRAINING_FREE)}; with --student: "
                    "the student's dense mode (default clipself = x+v)")
    ap.add_argument("--backbone", default="ViT-B-16", help="open_clip name or micro config (default ViT-B-16)")
    ap.add_argument("--pretrained", default="openai", help="open_clip tag, local file, or 'none' (random init)")
    ap.add_argument("--student", default=None, help="a finished ovlib.train run directory instead of --backbone")
    ap.add_argument("--profile", default="paper", help="parameter profile of a --student run (default paper)")
    ap.add_argument("--vfm", default="vit_base_patch14_reg4_dinov2.lvd142m", help="VFM of proxyclip (timm or micro)")
    ap.add_argument("--vfm-pretrained", default="hub", help="'hub', a local file, or 'none'")
    ap.add_argument("--protocol", default=None, choices=PROTOCOLS, help="card family (default: the method's own)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a card setting (recorded in results.json), e.g. short_side=224")
    ap.add_argument("--n-images", type=int, default=0, help="first N images (0 = all)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--allow-download", action="store_true", help="may named weights be downloaded")
    ap.add_argument("--out", default=None, help="write the record to this results.json")
    a = ap.parse_args(argv)

    from ovlib.models import load_clip, load_vfm

    method = a.method or ("clipself" if a.student else "sclip")
    protocol = a.protocol or (method if method in PROTOCOLS else "sclip")
    card = protocol_card(a.benchmark, protocol)
    overrides = _parse_set(a.set, card)
    card = dataclasses.replace(card, **overrides) if overrides else card
    dataset = load_benchmark(a.benchmark, a.root, a.split)

    vfm = None
    if a.student:
        model, tokenizer, fn, run_cfg = _load_student(Path(a.student), a.profile, method, a.device)
        what = {"student": str(a.student), "student_method": run_cfg.get("method"), "backbone": run_cfg["backbone"],
                "dense_mode": method}
    else:
        model, tokenizer, _ = load_clip(a.backbone, pretrained=_pretrained(a.pretrained), device=a.device,
                                        allow_download=a.allow_download)
        if method == "proxyclip":
            vfm = load_vfm(a.vfm, pretrained=_pretrained(a.vfm_pretrained), device=a.device,
                           allow_download=a.allow_download)
        fn = method_dense_fn(method, model, vfm, card)
        what = {"method": method, "backbone": a.backbone, "pretrained": _pretrained(a.pretrained),
                "vfm": a.vfm if vfm is not None else None,
                "vfm_pretrained": _pretrained(a.vfm_pretrained) if vfm is not None else None}
        if _pretrained(a.pretrained) is None:
            print(f"note: {a.backbone} has random weights (--pretrained none): the number says nothing about the "
                  f"method", file=sys.stderr)
    device = a.device

    def on_device(images: torch.Tensor) -> torch.Tensor:
        return fn(images.to(device))

    rec = evaluate_benchmark(on_device, dataset, model, tokenizer, card, n_images=a.n_images, n_boot=a.n_boot,
                             seed=a.seed, device=device)
    rec = {**what, "root": str(a.root), **rec, "overrides": {k: (list(v) if isinstance(v, tuple) else v)
                                                            for k, v in overrides.items()}}
    print(f"protocol card: {card.benchmark} / {card.protocol}" + (" (with overrides)" if overrides else ""))
    for k, v in rec["card"].items():
        if k == "background_names" and v:
            v = ", ".join(v)
        print(f"  {k:17s} {v}")
    m = rec["miou"]
    print(f"{rec['benchmark']} ({rec['n_images']} images) {method}: mIoU {m[0]:.2f} [{m[1]:.2f}, {m[2]:.2f}]")
    if a.out:
        from ovlib.io import atomic_write_text

        atomic_write_text(json.dumps(rec, indent=2), a.out)
        print(f"wrote {a.out}")
    return rec


if __name__ == "__main__":
    main()

"""The plain functions behind the explorers (no ipywidgets, no matplotlib): tested without a front end.

Conventions (``DESIGN.md``): images are ``(3, S, S)`` float tensors in [0, 1] (the student image of
:func:`ovlib.eval._common.student_image`), dense maps ``(C, h, w)`` with unit-norm tokens, boxes ``xyxy`` in
pixels of the image tensor, tokens ``(row, col)`` cells of a dense grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ovlib.data.regions import crop_regions
from ovlib.models import roi_features
from ovlib.models.affinity import affinity_map, pixel_to_cell

__all__ = [
    "token_from_index",
    "token_to_index",
    "cell_center",
    "cell_on_grid",
    "point_to_cell",
    "DenseCache",
    "affinity_maps",
    "resolve_query",
    "attention_maps",
    "map_peak",
    "clamp_box",
    "region_topk",
    "crop_topk",
    "threshold_mask",
    "threshold_labels",
    "mask_stats",
]

DenseFn = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) in [0, 1] -> (B, C, h, w)


# --------------------------------------------------------------------------------------------- tokens
def _grid(grid: Sequence[int]) -> tuple[int, int]:
    h, w = (int(g) for g in grid)
    if h <= 0 or w <= 0:
        raise ValueError(f"grid must be positive (h, w), got {tuple(grid)}")
    return h, w


def token_from_index(index: int, grid: Sequence[int]) -> tuple[int, int]:
    """Flat token ``index`` (row-major, as ``dense.flatten(1)``) -> ``(row, col)`` of a ``grid=(h, w)`` map."""
    h, w = _grid(grid)
    index = int(index)
    if not 0 <= index < h * w:
        raise ValueError(f"token index {index} outside a {h}x{w} grid (0 .. {h * w - 1})")
    return index // w, index % w


def token_to_index(cell: Sequence[int], grid: Sequence[int]) -> int:
    """``(row, col)`` -> flat row-major index in a ``grid=(h, w)`` map."""
    h, w = _grid(grid)
    r, c = (int(v) for v in cell)
    if not (0 <= r < h and 0 <= c < w):
        raise ValueError(f"token {(r, c)} outside a {h}x{w} grid")
    return r * w + c


def cell_center(cell: Sequence[int], grid: Sequence[int], image_size: Sequence[int]) -> tuple[float, float]:
    """Pixel ``(x, y)`` of the centre of ``cell=(row, col)`` of a ``grid`` covering an image of ``(H, W)``."""
    h, w = _grid(grid)
    r, c = (int(v) for v in cell)
    H, W = (int(v) for v in image_size)
    return (c + 0.5) * W / w, (r + 0.5) * H / h


def point_to_cell(
    point_xy: Sequence[float], grid: Sequence[int], image_size: Sequence[int]
) -> tuple[int, int]:
    """Pixel ``(x, y)`` of an image of ``(H, W)`` -> the ``(row, col)`` that contains it on ``grid``."""

    cell = pixel_to_cell(torch.tensor([list(point_xy)], dtype=torch.float64), tuple(image_size), _grid(grid))[
        0
    ]
    return int(cell[0]), int(cell[1])


def cell_on_grid(cell: Sequence[int], src: Sequence[int], dst: Sequence[int]) -> tuple[int, int]:
    """The cell of grid ``dst`` that contains the centre of ``cell`` of grid ``src`` (both over one image):
    how one query token is carried to models with other patch sizes (e.g. the VFM)."""
    h, w = _grid(src)
    x, y = cell_center(cell, (h, w), (h, w))  # in units of src cells
    return point_to_cell((x, y), dst, (h, w))


class DenseCache:
    """``dense(name, i)``: the ``(C, h, w)`` unit-norm map of image ``i`` under ``fns[name]``, computed once.

    An explorer moves a slider many times over the same image; the forward pass runs once per (model, image).
    """

    def __init__(self, images: Sequence[torch.Tensor], fns: Mapping[str, DenseFn], device: Any = "cpu"):
        self.images, self.fns, self.device = images, dict(fns), device
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self.calls = 0  # forward passes run (tests check the memoisation)

    def __call__(self, name: str, i: int) -> torch.Tensor:
        key = (name, int(i))
        if key not in self._cache:
            if name not in self.fns:
                raise KeyError(f"no dense function named {name!r}; have {list(self.fns)}")
            x = self.images[int(i)]
            with torch.no_grad():
                d = self.fns[name](x[None].to(self.device)).float().cpu()  # (1, C, h, w)
            if d.ndim != 4 or d.shape[0] != 1:
                raise ValueError(f"dense function {name!r} returned {tuple(d.shape)}, expected (1, C, h, w)")
            self._cache[key] = F.normalize(d[0], dim=0)
            self.calls += 1
        return self._cache[key]


# --------------------------------------------------------------------------------------------- affinity
def affinity_maps(
    dense: Mapping[str, torch.Tensor], cell: Sequence[int], grid: Sequence[int]
) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
    """Point affinity of one query token across models: ``dense {name: (C, h, w)}``, ``cell=(row, col)`` on
    the query ``grid`` -> ``{name: ((h, w) cosine map, the query cell on that model's grid)}``
    (:func:`ovlib.eval.affinity_map`; a model on another grid gets the cell containing the query's centre)."""

    out = {}
    for name, d in dense.items():
        if d.ndim != 3:
            raise ValueError(f"dense map {name!r} must be (C, h, w), got {tuple(d.shape)}")
        c = cell_on_grid(cell, grid, d.shape[-2:])
        out[name] = (affinity_map(d[None], torch.tensor([c]))[0], c)
    return out


# --------------------------------------------------------------------------------------------- attention
def resolve_query(
    classes: Sequence[Mapping[str, Any]],
    class_name: str | None = None,
    synonym: str | None = None,
    text: str | None = None,
) -> tuple[str, str]:
    """What a text-to-patch query embeds: ``(text, kind)``.

    Typed ``text`` (non-blank) wins (``kind="text"``, embedded as typed); else a ``synonym`` of the chosen class
    (``"synonym"``, it must be one of the class's synonyms); else the class's main name (``"class"``).
    ``classes`` are dicts with ``name`` and optional ``synonyms`` (COCO categories of the micro world)."""
    if text is not None and text.strip():
        return text.strip(), "text"
    by_name = {c["name"]: c for c in classes}
    if class_name is None:
        raise ValueError("resolve_query: give a class_name or a non-empty text")
    if class_name not in by_name:
        raise ValueError(f"unknown class {class_name!r}; classes: {sorted(by_name)[:10]} ...")
    if synonym and synonym != class_name:
        syn = list(by_name[class_name].get("synonyms") or [])
        if synonym not in syn:
            raise ValueError(f"{synonym!r} is not a synonym of {class_name!r}: {syn}")
        return synonym, "synonym"
    return class_name, "class"


def attention_maps(
    dense: Mapping[str, torch.Tensor], text: torch.Tensor | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Text-to-patch maps (SynCLIP's ``A = t X^T``, a cosine, no softmax): ``dense {name: (C, h, w)}``,
    ``text (D,)`` unit embedding shared by all models, or ``{name: (D,)}`` per model -> ``{name: (h, w)}``."""
    out = {}
    for name, d in dense.items():
        t = text[name] if isinstance(text, Mapping) else text
        t = F.normalize(torch.as_tensor(t).float().reshape(-1), dim=0)
        if t.shape[0] != d.shape[0]:
            raise ValueError(f"text dim {t.shape[0]} != dense channels {d.shape[0]} of {name!r}")
        out[name] = torch.einsum("c,chw->hw", t, F.normalize(d.float(), dim=0))
    return out


def map_peak(m: torch.Tensor) -> tuple[int, int]:
    """``(row, col)`` of the largest value of an ``(h, w)`` map (first one on ties)."""
    i = int(torch.argmax(m.reshape(-1)))
    return i // m.shape[-1], i % m.shape[-1]


# --------------------------------------------------------------------------------------------- regions
def clamp_box(box: Sequence[float], image_size: Sequence[int], min_size: float = 1.0) -> tuple[float, ...]:
    """``xyxy`` box clipped to an image of ``(H, W)``; an empty or inverted box is an error naming it."""
    H, W = (float(v) for v in image_size)
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, W)), max(0.0, min(x1, W))
    y0, y1 = max(0.0, min(y0, H)), max(0.0, min(y1, H))
    if x1 - x0 < min_size or y1 - y0 < min_size:
        raise ValueError(f"box {tuple(box)} is empty inside the image of size (H, W)=({H:g}, {W:g})")
    return x0, y0, x1, y1


def _topk(
    feat: torch.Tensor, text: torch.Tensor, class_names: Sequence[str], k: int
) -> list[tuple[str, float]]:
    text = F.normalize(text.float(), dim=-1)
    if text.shape[0] != len(class_names):
        raise ValueError(f"{text.shape[0]} class embeddings for {len(class_names)} class names")
    s = F.normalize(feat.float().reshape(-1), dim=0) @ text.T  # (K,)
    v, i = s.topk(min(k, len(class_names)))
    return [(class_names[int(j)], float(x)) for x, j in zip(v, i)]


def region_topk(
    dense: torch.Tensor,
    box: Sequence[float],
    image_size: Sequence[int],
    text: torch.Tensor,
    class_names: Sequence[str],
    k: int = 5,
) -> list[tuple[str, float]]:
    """Top-``k`` classes of a box: RoIAlign (1x1, :func:`ovlib.models.roi_features`, the *Boxes* predictor
    of the region-classification protocol) of the ``(C, h, w)`` dense map over ``box`` (xyxy, pixels of the
    image of ``image_size=(H, W)``), cosine to the ``text (K, D)`` class embeddings -> ``[(name, cos), ...]``
    best first."""

    b = torch.tensor([clamp_box(box, image_size)], dtype=torch.float32)
    f = roi_features(dense[None].float(), [b], tuple(int(v) for v in image_size))  # (1, C)
    return _topk(f[0], text, class_names, k)


def crop_topk(
    image: torch.Tensor,
    box: Sequence[float],
    encode: Callable[[torch.Tensor], torch.Tensor],
    text: torch.Tensor,
    class_names: Sequence[str],
    k: int = 5,
    size: int = 64,
) -> list[tuple[str, float]]:
    """Top-``k`` classes of the *crop* predictor: the box cut from ``image (3, H, W)`` (CenterPadCrop to
    ``size``, :func:`ovlib.data.regions.crop_regions`) and embedded by ``encode`` (``(B, 3, s, s)`` in
    [0, 1] -> ``(B, D)``, e.g. CLIP's CLS after normalisation)."""

    b = torch.tensor([clamp_box(box, image.shape[-2:])], dtype=torch.float32)
    img = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)
    crop = crop_regions(img, b, size)  # (1, 3, size, size)
    with torch.no_grad():
        f = encode(crop).float().cpu()
    return _topk(f[0], text, class_names, k)


# --------------------------------------------------------------------------------------------- threshold
def _acts(acts: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(acts).float()
    if a.ndim != 3:
        raise ValueError(f"activations must be (C, H, W), got {tuple(a.shape)}")
    if a.numel() and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"activations must lie in [0, 1], got [{float(a.min()):.3g}, {float(a.max()):.3g}]")
    return a


def threshold_mask(acts: torch.Tensor, threshold: float, index: int) -> torch.Tensor:
    """``acts (C, H, W)`` in [0, 1] -> ``(H, W)`` bool mask of class ``index``: activation >= ``threshold``."""
    a = _acts(acts)
    if not 0 <= int(index) < a.shape[0]:
        raise ValueError(f"class index {index} outside 0 .. {a.shape[0] - 1}")
    return a[int(index)] >= float(threshold)


def threshold_labels(acts: torch.Tensor, threshold: float, background: int = -1) -> torch.Tensor:
    """``acts (C, H, W)`` -> ``(H, W)`` labels: argmax over classes, ``background`` where the best activation is
    below ``threshold`` (SynSeg's inference with a background class; ties go to the lower class index)."""
    a = _acts(acts)
    conf, lab = a.max(0)
    return torch.where(conf >= float(threshold), lab, torch.full_like(lab, int(background)))


def mask_stats(mask: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, float]:
    """``coverage`` (fraction of pixels in the mask) and, with a ``target`` mask, ``iou``, ``precision``,
    ``recall`` (``nan`` where undefined)."""
    m = torch.as_tensor(mask).bool()
    out = {"coverage": float(m.float().mean()) if m.numel() else float("nan")}
    if target is not None:
        t = torch.as_tensor(target).bool()
        if t.shape != m.shape:
            raise ValueError(f"target shape {tuple(t.shape)} != mask shape {tuple(m.shape)}")
        inter, union = float((m & t).sum()), float((m | t).sum())
        nan = float("nan")
        out.update(
            iou=inter / union if union else nan,
            precision=inter / float(m.sum()) if m.any() else nan,
            recall=inter / float(t.sum()) if t.any() else nan,
        )
    return out

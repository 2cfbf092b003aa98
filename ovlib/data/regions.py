"""Region sampling and crop geometry shared by every distillation method (CLIPSelf family).

Coordinate conventions (see DESIGN.md): boxes are ``xyxy`` float pixels of the image/tensor they index,
pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``, so a mask's tight box is
``[min c, min r, max c + 1, max r + 1]``.

* Student image (:class:`ResizeLongestPad`): resize so the longest side is ``size``, pad bottom/right with 0.
  A box maps image -> tensor by ``* scale`` and tensor -> feature grid by ``/ stride``
  (CLIPSelf ``det_image_transform``/``ResizeLongest``; ``wusize/CLIPSelf:src/open_clip/transform.py``).
* Teacher crop (:class:`CenterPadCrop`): cut the box's pixel span from the original image, resize its
  longest side to ``size`` and pad evenly on both sides (CLIPSelf ``ResizeMaxSize``, same file).
* Grid sampler (:func:`sample_grid_boxes`): one (rows m, cols n) grid drawn uniformly from
  ``m in 1..M, n in ceil(m/2)..min(2m, M)`` (M = ``max_split`` = 6), cells shuffled, at most ``max_boxes``
  = 20 kept (``GridDistillDataset._init_choices``, ``wusize/CLIPSelf:src/training/data.py``).
* GT-box / proposal sampler (:func:`sample_box_regions`): at most 20 boxes with side sizes in
  [8, 1024], RoI = the box, crop = the box expanded 1.5x about its centre (things; stuff crops are not
  expanded), a dummy ``(0, 0, w/4, h/4)`` box when none is valid (``ProposalDistillDataset``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "thing_crops",
    "highlight_crop",
    "grid_choices",
    "grid_boxes",
    "sample_grid_boxes",
    "expand_box",
    "mask_to_box",
    "sample_box_regions",
    "ResizeLongestPad",
    "CenterPadCrop",
    "crop_regions",
    "to_chw_float",
    "boxes_to_tensor",
    "boxes_to_grid",
    "normalize_boxes",
    "denormalize_boxes",
]


# ----------------------------------------------------------------------------------------------------------
# grids
# ----------------------------------------------------------------------------------------------------------
def grid_choices(max_split: int = 6) -> list[tuple[int, int]]:
    """All (rows, cols) grids of the CLIPSelf sampler: rows m in 1..M, cols n in ceil(m/2)..min(2m, M)."""
    if max_split < 1:
        raise ValueError(f"max_split must be >= 1, got {max_split}")
    return [(m, n) for m in range(1, max_split + 1) for n in range((m + 1) // 2, min(2 * m, max_split) + 1)]


def grid_boxes(rows: int, cols: int, width: float, height: float) -> torch.Tensor:
    """(rows*cols, 4) float32 xyxy px of every cell of a rows x cols grid over a width x height image,
    row-major (cell (i, j) at index i*cols + j)."""
    ys = torch.linspace(0, 1, rows + 1, dtype=torch.float64) * height
    xs = torch.linspace(0, 1, cols + 1, dtype=torch.float64) * width
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], -1).reshape(-1, 4).float()


def _torch_gen(generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)):
        g = torch.Generator()
        g.manual_seed(int(generator))
        return g
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
    )


def sample_grid_boxes(
    width: float,
    height: float,
    generator: torch.Generator | int | None = None,
    max_split: int = 6,
    max_boxes: int = 20,
    return_choice: bool = False,
):
    """CLIPSelf grid sampling: one grid from :func:`grid_choices`, cells shuffled, the first ``max_boxes``
    kept.

    Returns (K, 4) float32 xyxy px (K = min(m*n, max_boxes)), plus the (rows, cols) choice if asked.
    """
    g = _torch_gen(generator)
    choices = grid_choices(max_split)
    m, n = choices[int(torch.randint(len(choices), (1,), generator=g))]
    boxes = grid_boxes(m, n, width, height)
    boxes = boxes[torch.randperm(len(boxes), generator=g)][:max_boxes]
    return (boxes, (m, n)) if return_choice else boxes


# ----------------------------------------------------------------------------------------------------------
# boxes
# ----------------------------------------------------------------------------------------------------------
def _check_boxes(boxes, name: str = "boxes"):
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (K, 4) xyxy, got {tuple(boxes.shape)}")


def expand_box(boxes, scale: float, width: float, height: float):
    """Scale (K, 4) xyxy boxes about their centres by ``scale`` and clip to [0, width] x [0, height].
    Works on torch tensors and numpy arrays (returns the same kind)."""
    is_np = isinstance(boxes, np.ndarray)
    b = torch.as_tensor(boxes, dtype=torch.float64)
    _check_boxes(b)
    c = (b[:, :2] + b[:, 2:]) / 2
    half = (b[:, 2:] - b[:, :2]) / 2 * scale
    lo = torch.maximum(c - half, torch.zeros(2, dtype=b.dtype))
    hi = torch.minimum(c + half, torch.tensor([width, height], dtype=b.dtype))
    out = torch.cat([lo, hi], 1)
    return (
        out.numpy().astype(np.float32)
        if is_np
        else out.to(boxes.dtype if boxes.is_floating_point() else torch.float32)
    )


def mask_to_box(mask):
    """Tight xyxy box of a binary mask (H, W) -> (4,), or of masks (K, H, W) -> (K, 4); float32, exclusive
    right/bottom edge (a single pixel (r, c) gives [c, r, c+1, r+1]). An empty mask is a ValueError.
    Returns the kind it is given (numpy array or torch tensor)."""
    is_torch = isinstance(mask, torch.Tensor)
    m = mask.detach().cpu().numpy() if is_torch else np.asarray(mask)
    m = m.astype(bool, copy=False)
    single = m.ndim == 2
    if single:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask must be (H, W) or (K, H, W), got shape {tuple(m.shape)}")
    rows, cols = m.any(2), m.any(1)  # (K, H), (K, W)
    empty = ~rows.any(1)
    if empty.any():
        raise ValueError(f"mask_to_box: mask(s) {np.flatnonzero(empty).tolist()} are empty")
    H, W = m.shape[1:]
    y0 = rows.argmax(1)
    y1 = H - rows[:, ::-1].argmax(1)
    x0 = cols.argmax(1)
    x1 = W - cols[:, ::-1].argmax(1)
    out = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
    out = out[0] if single else out
    return torch.from_numpy(out) if is_torch else out


def boxes_to_tensor(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Image px -> px of a :class:`ResizeLongestPad` tensor (padding is bottom/right, so only a scale)."""
    return boxes * scale


def boxes_to_grid(boxes: torch.Tensor, stride: float) -> torch.Tensor:
    """Tensor px -> feature-grid units of a backbone with patch stride ``stride`` (e.g. for ``roi_align`` with
    ``spatial_scale=1``, as CLIPSelf does)."""
    return boxes / stride


def normalize_boxes(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    return boxes / boxes.new_tensor([width, height, width, height])


def denormalize_boxes(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    return boxes * boxes.new_tensor([width, height, width, height])


def sample_box_regions(
    boxes,
    width: float,
    height: float,
    generator: torch.Generator | int | None = None,
    isthing: Sequence[bool] | torch.Tensor | None = None,
    max_anns: int = 20,
    min_size: float = 8,
    max_size: float = 1024,
    crop_scale: float = 1.5,
) -> dict:
    """Proposal / GT-box regions for distillation and region classification.

    ``boxes`` (N, 4) xyxy px. Boxes whose area is outside [min_size^2, max_size^2] are dropped (counted in
    ``n_filtered``), the rest shuffled and the first ``max_anns`` kept. Returns ``rois`` (K, 4) = the boxes,
    ``crops`` (K, 4) = things expanded ``crop_scale`` x about the centre and clipped (stuff, ``isthing``
    False, not expanded), ``index`` (K,) into the input, ``valid`` (K,) bool. With no valid box, one dummy
    ``(0, 0, w/4, h/4)`` region with ``valid=False`` is returned (CLIPSelf's convention).
    """
    g = _torch_gen(generator)
    b = torch.as_tensor(
        np.asarray(boxes) if isinstance(boxes, np.ndarray) else boxes, dtype=torch.float32
    ).reshape(-1, 4)
    th = (
        torch.ones(len(b), dtype=torch.bool)
        if isthing is None
        else torch.as_tensor(np.asarray(isthing), dtype=torch.bool)
    )
    if len(th) != len(b):
        raise ValueError(f"isthing has {len(th)} entries for {len(b)} boxes")
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    ok = (area >= min_size**2) & (area <= max_size**2)
    idx = torch.nonzero(ok).flatten()
    idx = idx[torch.randperm(len(idx), generator=g)][:max_anns]
    if len(idx) == 0:
        dummy = torch.tensor([[0.0, 0.0, width / 4, height / 4]])
        return dict(
            rois=dummy,
            crops=dummy.clone(),
            index=torch.tensor([-1]),
            valid=torch.tensor([False]),
            n_filtered=int((~ok).sum()),
        )
    rois = b[idx]
    crops = rois.clone()
    t = th[idx]
    if t.any():
        crops[t] = expand_box(rois[t], crop_scale, width, height)
    return dict(
        rois=rois,
        crops=crops,
        index=idx,
        valid=torch.ones(len(idx), dtype=torch.bool),
        n_filtered=int((~ok).sum()),
    )


# ----------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------
def to_chw_float(image) -> torch.Tensor:
    """(H, W, 3) uint8 numpy / PIL image / (3, H, W) tensor (uint8 or float in [0, 1]) -> (3, H, W) float."""
    if isinstance(image, torch.Tensor):
        t = image
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(t.shape)}")
        return t.float().div(255.0) if t.dtype == torch.uint8 else t.float()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image array must be (H, W, 3), got {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return t.float().div(255.0) if t.dtype == torch.uint8 else t.float()


def _resize(t: torch.Tensor, h: int, w: int, interpolation: str) -> torch.Tensor:
    if (h, w) == tuple(t.shape[-2:]):
        return t
    if interpolation == "nearest":
        return F.interpolate(t[None], size=(h, w), mode="nearest-exact")[0]
    out = F.interpolate(t[None], size=(h, w), mode=interpolation, align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


class ResizeLongestPad:
    """Student transform: resize so the longest side is ``size`` (aspect kept; the short side is rounded),
    zero-pad bottom/right to ``size`` x ``size``. ``__call__(image) -> (tensor (3, size, size) float in
    [0, 1], scale)`` with ``scale = size / max(H, W)``; a box maps image -> tensor by ``* scale``."""

    def __init__(self, size: int, fill: float = 0.0, interpolation: str = "bicubic"):
        self.size, self.fill, self.interpolation = int(size), float(fill), interpolation

    def geometry(self, height: int, width: int) -> tuple[float, int, int]:
        """(scale, resized height, resized width)."""
        scale = self.size / max(height, width)
        # the short side is rounded, and at least one pixel for extreme aspect ratios
        return (
            scale,
            min(self.size, max(1, round(height * scale))),
            min(self.size, max(1, round(width * scale))),
        )

    def __call__(self, image) -> tuple[torch.Tensor, float]:
        t = to_chw_float(image)
        H, W = t.shape[-2:]
        scale, h, w = self.geometry(H, W)
        out = t.new_full((3, self.size, self.size), self.fill)
        out[:, :h, :w] = _resize(t, h, w, self.interpolation)
        return out, scale


class CenterPadCrop:
    """Teacher crop transform: cut the pixel span of ``box`` (x0 = floor, x1 = ceil, clipped) from the image,
    resize its longest side to ``size`` and pad evenly (left = (size - w') // 2, top = (size - h') // 2).

    ``__call__(image, box=None) -> (tensor (3, size, size), params)``; ``params`` = dict(x0, y0, scale,
    pad_left, pad_top) so an image point (x, y) lands at
    ``((x - x0) * scale + pad_left, (y - y0) * scale + pad_top)``.
    """

    def __init__(self, size: int, fill: float = 0.0, interpolation: str = "bicubic"):
        self.size, self.fill, self.interpolation = int(size), float(fill), interpolation

    def __call__(self, image, box=None) -> tuple[torch.Tensor, dict]:
        t = to_chw_float(image)
        H, W = t.shape[-2:]
        if box is None:
            x0, y0, x1, y1 = 0, 0, W, H
        else:
            bx = [float(v) for v in (box.tolist() if hasattr(box, "tolist") else box)]
            if len(bx) != 4:
                raise ValueError(f"box must be xyxy, got {box}")
            x0, y0 = max(int(math.floor(bx[0])), 0), max(int(math.floor(bx[1])), 0)
            x1, y1 = min(int(math.ceil(bx[2])), W), min(int(math.ceil(bx[3])), H)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"crop box {bx} is empty inside the {W}x{H} image")
        crop = t[:, y0:y1, x0:x1]
        h0, w0 = y1 - y0, x1 - x0
        scale = self.size / max(h0, w0)
        h, w = min(self.size, max(1, round(h0 * scale))), min(self.size, max(1, round(w0 * scale)))
        left, top = (self.size - w) // 2, (self.size - h) // 2
        out = t.new_full((3, self.size, self.size), self.fill)
        out[:, top : top + h, left : left + w] = _resize(crop, h, w, self.interpolation)
        return out, dict(x0=x0, y0=y0, scale=scale, pad_left=left, pad_top=top)


def crop_regions(image, boxes, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """(K, 3, size, size) teacher crops of the (K, 4) xyxy boxes of one image (see :class:`CenterPadCrop`)."""
    tf = CenterPadCrop(size, interpolation=interpolation)
    t = to_chw_float(image)
    b = torch.as_tensor(np.asarray(boxes) if isinstance(boxes, np.ndarray) else boxes).reshape(-1, 4)
    if len(b) == 0:
        return t.new_zeros((0, 3, size, size))
    return torch.stack([tf(t, bx)[0] for bx in b])


def thing_crops(dataset, class_row: dict[int, int], size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` ground-truth thing crops of a panoptic dataset (classes in ``class_row``: category id ->
    row), in image order: ``(n', 3, size, size)`` crops in [0, 1] (:func:`crop_regions`) and their rows ``(n',)``."""
    crops, labels = [], []
    for i in range(len(dataset)):
        if len(labels) >= n:
            break
        things = [s for s in dataset[i]["segments"] if s["isthing"] and int(s["category_id"]) in class_row]
        if things:
            boxes = torch.as_tensor(np.stack([np.asarray(s["box"], dtype=np.float32) for s in things]))
            crops.append(crop_regions(dataset[i]["image"], boxes, size))
            labels += [class_row[int(s["category_id"])] for s in things]
    if not crops:
        return torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    return torch.cat(crops)[:n], torch.tensor(labels[:n], dtype=torch.long)


def highlight_crop(image: torch.Tensor, mask: torch.Tensor, size: int, mean: Sequence[float],
                   context: float = 0.1, background: float = 0.1, blur: float = 0.0) -> torch.Tensor:
    """CLIPSeg's visual prompt of one object: ``image (3, H, W)`` in [0, 1] and its ``mask (H, W)`` ->
    ``(3, size, size)`` in [0, 1].

    The pixels outside the mask are blurred (Gaussian, std ``blur`` px, none at 0) and pulled towards ``mean``
    (the CLIP's normalisation mean) to ``background`` of their contrast, the mask's tight box is widened by
    ``context`` of its width / height on each side (clipped to the image), padded to a square with ``mean``
    (centred) and resized to ``size`` (nearest). CLIPSeg's ``crop_blur_highlight`` support images
    (``timojl/clipseg:datasets/utils.py`` ``blend_image_segmentation``, ``evaluation_utils.py``
    ``img_preprocess`` / ``object_crop``: ``img * mask + bg_fac * blur(img) * (1 - mask)`` on normalised images,
    context 0.1, ``bg_fac`` 0.1, padding 0 = the mean there). An empty mask is a ValueError."""
    if image.ndim != 3 or image.shape[0] != 3 or tuple(mask.shape) != tuple(image.shape[1:]):
        raise ValueError(f"highlight_crop: image must be (3, H, W) and mask (H, W), got {tuple(image.shape)} "
                         f"and {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    if not m.any():
        raise ValueError("highlight_crop: the mask is empty")
    mu = torch.as_tensor(mean, dtype=image.dtype).view(3, 1, 1)
    bg = image
    if blur > 0:
        r = max(1, int(math.ceil(3 * blur)))
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=image.dtype) / blur) ** 2)
        g = g / g.sum()
        x = F.pad(image[None], (r, r, r, r), mode="replicate")
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)  # rows
        bg = F.conv2d(x, g.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]  # columns -> (3, H, W)
    out = torch.where(m[None], image, mu + background * (bg - mu))  # (3, H, W)
    H, W = m.shape
    x0, y0, x1, y1 = (int(v) for v in mask_to_box(m))
    dx, dy = context * (x1 - x0), context * (y1 - y0)
    x0, x1 = max(0, int(x0 - dx)), min(W, int(math.ceil(x1 + dx)))
    y0, y1 = max(0, int(y0 - dy)), min(H, int(math.ceil(y1 + dy)))
    crop = out[:, y0:y1, x0:x1]
    h, w = crop.shape[1:]
    side = max(h, w)
    sq = mu.expand(3, side, side).clone()
    top, left = (side - h) // 2, (side - w) // 2
    sq[:, top:top + h, left:left + w] = crop
    return F.interpolate(sq[None], size=(size, size), mode="nearest")[0]

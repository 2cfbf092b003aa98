"""Static map figures shared by the chapters (matplotlib; the caller shows or saves the returned figure).

* :func:`map_grid` -- one image and rows of maps beside it (chapter 4: an object's cosine maps under its names,
  optionally with each map's deviation from the row's mean on a shared diverging scale);
* :func:`affinity_row` -- one image with a marked point and, per model, the point-affinity map of that token
  (chapter 2: Fig. 5 / 9(a) analogues);
* :func:`frequent_class_pick` / :func:`tsne_panels` -- t-SNE of the same regions under several models, coloured by
  class, each with its silhouette score (chapter 2: App. A.2, Fig. 15).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from ovlib.eval import affinity_map
from ovlib.methods.analysis import tsne_embed

__all__ = ["affinity_row", "frequent_class_pick", "heatmap_row", "map_grid", "tsne_panels"]


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy() if image.ndim == 3 and image.shape[0] in (1, 3) else np.asarray(image)


def map_grid(image: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor]], titles: Sequence[str], suptitle: str = "",
             box: Sequence[float] | None = None, deviations: bool = False):
    """``rows``: ``(label, maps (S, h, w))``; column 0 shows ``image (3, H, W)`` with ``box`` (x0, y0, x1, y1, in
    the image's pixels), the others the maps titled by ``titles``, one colour scale per row. ``deviations``: after
    each row a second one shows each map minus the row's mean over its maps, on one symmetric diverging scale
    shared by all deviation rows (models compare directly)."""
    rows = list(rows)
    if not rows:
        raise ValueError("map_grid: rows is empty")
    if deviations:
        rows = [x for label, m in rows for x in ((label, m), (f"{label}: map − mean", m - m.mean(0, keepdim=True)))]
    n = max(len(m) for _, m in rows) + 1
    dev_hi = max([float(m.abs().max()) for label, m in rows if "− mean" in label] + [1e-8])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.9 * n, 2.0 * len(rows)), squeeze=False)
    for r, (label, maps) in enumerate(rows):
        axes[r, 0].imshow(_hwc(image))
        if box is not None:
            b = np.asarray(box, dtype=float)
            axes[r, 0].add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="r", lw=1.2))
        axes[r, 0].set_title(label, fontsize=8)
        dev = "− mean" in label
        lo, hi = (-dev_hi, dev_hi) if dev else (float(maps.min()), float(maps.max()))
        for j in range(min(len(maps), n - 1)):
            axes[r, j + 1].imshow(maps[j].cpu().numpy(), cmap="RdBu_r" if dev else "viridis", vmin=lo, vmax=hi)
            axes[r, j + 1].set_title(str(titles[j])[:22] if j < len(titles) else "", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def affinity_row(image: torch.Tensor, maps: Mapping[str, torch.Tensor], point: tuple[float, float],
                 image_title: str = "image", vmin: float = -0.2, vmax: float = 1.0):
    """``image (3, H, W)`` with ``point`` (x, y pixels) marked, then per name the affinity of the token under the
    point (cell ``(⌊y h / H⌋, ⌊x w / W⌋)`` of each dense map ``(1, D, h, w)``) to every token
    (:func:`ovlib.eval.affinity_map`)."""
    H, W = image.shape[-2:]
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.0 * (len(maps) + 1), 2.3))
    axes[0].imshow(_hwc(image))
    axes[0].plot(*point, "r.", ms=8)
    axes[0].set_title(image_title, fontsize=8)
    for ax, (name, z) in zip(axes[1:], maps.items()):
        h, w = z.shape[-2:]
        c = torch.tensor([[min(h - 1, int(point[1] * h / H)), min(w - 1, int(point[0] * w / W))]])
        ax.imshow(affinity_map(z.cpu(), c)[0].numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
        ax.plot(c[0, 1], c[0, 0], "r.", ms=6)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def frequent_class_pick(labels: np.ndarray, n_classes: int = 7, per_class: int = 40, seed: int = 0
                        ) -> tuple[np.ndarray, list[int]]:
    """Indices of at most ``per_class`` random regions (seeded) of each of the ``n_classes`` most frequent labels
    (``labels (R,)`` non-negative ints; negative = excluded), grouped by class, and those classes."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, dtype=int)
    top = [int(c) for c in np.argsort(-counts, kind="stable")[:n_classes] if counts[c] > 0]
    rng = np.random.default_rng(seed)
    pick = [rng.permutation(np.nonzero(labels == c)[0])[:per_class] for c in top]
    return (np.concatenate(pick) if pick else np.zeros(0, dtype=int)), top


def tsne_panels(features: Mapping[str, torch.Tensor], labels: np.ndarray, class_names: Mapping[int, str],
                seed: int = 0, max_iter: int = 1000):
    """One t-SNE panel (:func:`ovlib.methods.analysis.tsne_embed`) per model of the same ``R`` regions
    (``features``: name -> ``(R, C)``), coloured by ``labels (R,)``, titled with the silhouette score (cosine, in
    the original feature space, by class; ``nan`` unless there are 2 .. R - 1 classes). Returns the figure and
    ``{name: silhouette}``."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    fig, axes = plt.subplots(1, len(features), figsize=(4.0 * len(features), 3.6), squeeze=False)
    sil = {}
    for ax, (name, feats) in zip(axes[0], features.items()):
        ok = 2 <= len(set(labels.tolist())) <= len(labels) - 1
        sil[name] = float(silhouette_score(np.asarray(feats), labels, metric="cosine")) if ok else float("nan")
        emb = tsne_embed(feats, seed=seed, max_iter=max_iter) if len(labels) >= 3 else np.zeros((len(labels), 2))
        for c in dict.fromkeys(labels.tolist()):
            ax.scatter(emb[labels == c, 0], emb[labels == c, 1], s=6, label=class_names.get(c, str(c)))
        ax.set_title(f"{name} (silhouette {sil[name]:.2f})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    return fig, sil


def heatmap_row(panels: Sequence[tuple[np.ndarray, str, str]], xlabel: str = "head", ylabel: str = "block",
                yticklabels: Sequence[str] | None = None, fmt: str = "{:.2f}", suptitle: str = ""):
    """One annotated heatmap per ``(array (rows, cols), title, cmap)``; a diverging ``cmap`` (``RdBu_r``) gets a
    symmetric scale around 0. ``yticklabels``: the row names (default 1-based indices)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(11 / 3 * len(panels), 2.8), squeeze=False)
    for ax, (arr, title, cmap) in zip(axes[0], panels):
        arr = np.asarray(arr)
        lim = float(np.abs(arr).max()) or 1.0
        sym = {"vmin": -lim, "vmax": lim} if cmap == "RdBu_r" else {}
        im = ax.imshow(arr, cmap=cmap, **sym)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xticks=range(arr.shape[1]), yticks=range(arr.shape[0]),
               yticklabels=list(yticklabels) if yticklabels is not None else [str(r + 1) for r in range(arr.shape[0])])
        for (r, c), v in np.ndenumerate(arr):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=6, color="k" if sym else "w")
        plt.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig

"""The explorers: a state (which image, which token / text / box / threshold), the result of that state
(plain tensors, from :mod:`ovlib.viz.logic`), a matplotlib figure of it, and a thin ipywidgets front end.

Every explorer is used the same way::

    ex = AffinityExplorer(images, {"CLIP x+v": fn1, "CLIPSelf": fn2})
    ex.select(image=2, token=(5, 7))      # or index=47, or point=(x, y)
    ex.maps()                             # {name: ((h, w) map, query cell)} -- what the tests pin
    ex.figure()                           # matplotlib Figure of the current state (or of several states)
    ex.show()                             # the widget (live in a kernel, its initial view kept in the book)
                                          # and a static figure beside it for readers without a kernel

``images`` are ``(3, S, S)`` tensors in [0, 1] (student images; :func:`images_from_dataset` builds them with
their ground-truth boxes); dense functions map ``(B, 3, S, S)`` in [0, 1] to ``(B, C, h, w)``
(:func:`ovlib.eval._common.dense_fn_for_clip`, ``dense_fn_for_vfm``, a trained student's).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ovlib.eval._common import student_image
from ovlib.viz import logic, widgets

__all__ = [
    "AffinityExplorer",
    "AttentionExplorer",
    "RegionExplorer",
    "ThresholdExplorer",
    "images_from_dataset",
    "targets_from_meta",
    "fig_to_png",
]


# --------------------------------------------------------------------------------------------- shared
def fig_to_png(fig, dpi: int = 90) -> bytes:
    """PNG bytes of a matplotlib figure (closed afterwards when it belongs to pyplot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # a bare Figure is not registered with pyplot
        pass
    return buf.getvalue()


def _new_figure(nrows: int, ncols: int, w: float = 2.0, h: float = 2.1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows))
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _show_image(ax, image: torch.Tensor) -> None:
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())


def images_from_dataset(
    dataset: Sequence, indices: Sequence[int], size: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """Student images ``(3, size, size)`` of ``dataset[i]`` (longest side resized, bottom/right padded) and per
    image ``{"boxes": (K, 4) xyxy in pixels of that tensor, "category_id": [...], "isthing": [...],
    "masks": (K, size, size) bool}`` from its segments (a ``CocoPanoptic``-like dataset)."""
    import torch.nn.functional as F


    images, meta = [], []
    for i in indices:
        it = dataset[int(i)]
        img = np.asarray(it["image"])
        x, scale = student_image(img, size)
        H, W = img.shape[:2]
        boxes, cats, things, masks = [], [], [], []
        for s in it["segments"]:
            m = torch.as_tensor(np.asarray(s["mask"]), dtype=torch.bool)
            if not m.any():
                continue
            if s.get("box") is not None and s["isthing"]:
                b = np.asarray(s["box"], dtype=np.float64)
            else:
                ys, xs = np.nonzero(m.numpy())
                b = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
            boxes.append(b * scale)
            cats.append(int(s["category_id"]))
            things.append(bool(s["isthing"]))
            h2, w2 = round(H * scale), round(W * scale)
            mm = F.interpolate(m[None, None].float(), size=(h2, w2), mode="nearest")[0, 0] > 0.5
            full = torch.zeros(size, size, dtype=torch.bool)
            full[:h2, :w2] = mm[:size, :size]
            masks.append(full)
        images.append(x)
        meta.append(
            {
                "boxes": torch.tensor(np.array(boxes), dtype=torch.float32).reshape(-1, 4),
                "category_id": cats,
                "isthing": things,
                "masks": torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool),
            }
        )
    return images, meta


def targets_from_meta(
    meta: Sequence[Mapping[str, Any]], class_ids: Sequence[int]
) -> list[dict[int, torch.Tensor]]:
    """Per image ``{row of class_ids: (S, S) bool}`` ground-truth masks (segments of one class merged) from the
    ``meta`` of :func:`images_from_dataset` -- the ``targets`` of :class:`ThresholdExplorer`."""
    row = {int(c): i for i, c in enumerate(class_ids)}
    out = []
    for m in meta:
        t: dict[int, torch.Tensor] = {}
        for cid, mask in zip(m["category_id"], m["masks"]):
            if int(cid) in row:
                j = row[int(cid)]
                t[j] = t[j] | mask if j in t else mask.clone()
        out.append(t)
    return out


class _Explorer:
    """Shared state: the images and the selected one; ``show()`` puts the widget and a static figure out."""

    #: class-level default of the static figure's rows (overridden per explorer)
    def __init__(self, images: Sequence[torch.Tensor], image: int = 0, titles: Sequence[str] | None = None):
        if isinstance(images, torch.Tensor):
            images = list(images) if images.ndim == 4 else [images]
        self.images = list(images)
        if not self.images:
            raise ValueError(f"{type(self).__name__}: no images")
        for i, x in enumerate(self.images):
            if x.ndim != 3 or x.shape[0] != 3:
                raise ValueError(
                    f"{type(self).__name__}: image {i} must be (3, H, W) in [0, 1], got {tuple(x.shape)}"
                )
        self.titles = list(titles) if titles is not None else [f"image {i}" for i in range(len(self.images))]
        self.image = 0
        self._set_image(image)

    def _set_image(self, i: int) -> None:
        i = int(i)
        if not 0 <= i < len(self.images):
            raise ValueError(f"image index {i} outside 0 .. {len(self.images) - 1}")
        self.image = i

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images[self.image].shape[-2:])

    # front ends ------------------------------------------------------------------------------------
    def png(self, **kw) -> bytes:
        """PNG of :meth:`figure` (the widget shows this)."""
        return fig_to_png(self.figure(**kw))

    def widget(self):
        """The ipywidgets front end (thin: every control calls :meth:`select`, then the view is redrawn)."""
        return widgets.build(self)

    def static_figure(self):
        """The figure shown beside the widget for readers without a kernel (default: the current state)."""
        return self.figure()

    def show(self, static: bool = True) -> None:
        """Display the widget and, with ``static``, :meth:`static_figure` as a plain PNG output."""
        from IPython.display import Image, display

        display(self.widget())
        if static:
            display(Image(fig_to_png(self.static_figure(), dpi=100)))


# --------------------------------------------------------------------------------------------- affinity
class AffinityExplorer(_Explorer):
    """Pick an image and a token (sliders ``row``/``col``, a flat ``index``, or a pixel ``point``) and see the
    point-affinity maps (cosine of that token to every token, :func:`ovlib.eval.affinity_map`) of several
    models or dense modes side by side. The token lives on the *query grid* (the first model's grid unless
    ``grid`` is given); a model with another grid uses the cell that contains the query's centre."""

    WIDGET = "affinity"  # its ipywidgets builder (ovlib.viz.widgets)

    def __init__(
        self,
        images,
        dense_fns: Mapping[str, logic.DenseFn],
        image: int = 0,
        token: Sequence[int] | None = None,
        grid: Sequence[int] | None = None,
        titles=None,
        device: Any = "cpu",
        vmin: float = -0.2,
        vmax: float = 1.0,
        static_tokens: int = 3,
    ):
        super().__init__(images, image, titles)
        if not dense_fns:
            raise ValueError("AffinityExplorer: no dense functions")
        self.cache = logic.DenseCache(self.images, dense_fns, device)
        self.names = list(dense_fns)
        self.grid = (
            tuple(int(g) for g in grid)
            if grid is not None
            else tuple(self.cache(self.names[0], 0).shape[-2:])
        )
        self.token = (self.grid[0] // 2, self.grid[1] // 2)
        self.vmin, self.vmax, self.static_tokens = vmin, vmax, static_tokens
        if token is not None:
            self.select(token=token)

    def select(
        self,
        image: int | None = None,
        token: Sequence[int] | None = None,
        index: int | None = None,
        point: Sequence[float] | None = None,
    ) -> AffinityExplorer:
        if image is not None:
            self._set_image(image)
        given = [v is not None for v in (token, index, point)]
        if sum(given) > 1:
            raise ValueError("select one of token=(row, col), index= or point=(x, y)")
        if token is not None:
            logic.token_to_index(token, self.grid)  # validates
            self.token = (int(token[0]), int(token[1]))
        elif index is not None:
            self.token = logic.token_from_index(index, self.grid)
        elif point is not None:
            self.token = logic.point_to_cell(point, self.grid, self.image_size)
        return self

    @property
    def index(self) -> int:
        return logic.token_to_index(self.token, self.grid)

    def maps(self) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
        """``{model: ((h, w) affinity map, query cell on its grid)}`` of the current image and token."""
        return logic.affinity_maps({n: self.cache(n, self.image) for n in self.names}, self.token, self.grid)

    def figure(self, selections: Sequence[Mapping[str, Any]] | None = None):
        """One row per selection (``{"image": i, "token": (r, c)}``; default: the current state): the image with
        the query point, then one affinity map per model (colour scale ``vmin .. vmax``, shared)."""
        state = (self.image, self.token)
        selections = list(selections) if selections else [{}]
        fig, axes = _new_figure(len(selections), len(self.names) + 1)
        try:
            for r, sel in enumerate(selections):
                self.select(**sel)
                x = self.images[self.image]
                _show_image(axes[r, 0], x)
                px, py = logic.cell_center(self.token, self.grid, x.shape[-2:])
                axes[r, 0].plot(px, py, "o", ms=7, mfc="red", mec="white")
                axes[r, 0].set_title(f"{self.titles[self.image]}, token {self.token}", fontsize=8)
                for ax, (name, (m, c)) in zip(axes[r, 1:], self.maps().items()):
                    ax.imshow(m.numpy(), cmap="viridis", vmin=self.vmin, vmax=self.vmax)
                    ax.plot(c[1], c[0], "o", ms=5, mfc="red", mec="white")
                    ax.set_title(name, fontsize=8)
        finally:
            self.image, self.token = state
        fig.suptitle(f"point affinity (cosine, colour scale {self.vmin:g} .. {self.vmax:g})", fontsize=8)
        fig.tight_layout()
        return fig

    def static_figure(self):
        """The current token plus ``static_tokens - 1`` more, spread over the images and the grid."""
        h, w = self.grid
        rows = [{}]
        extra = [(h // 4, w // 4), (3 * h // 4, 3 * w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4)]
        for j in range(self.static_tokens - 1):
            rows.append({"image": (self.image + j + 1) % len(self.images), "token": extra[j % len(extra)]})
        return self.figure(rows)


# --------------------------------------------------------------------------------------------- attention
class AttentionExplorer(_Explorer):
    """Choose a class name, one of its synonyms, or type any text: text-to-patch maps (cosine of the text
    embedding with every dense token, SynCLIP's ``A = t X^T``) for several models, e.g. student / teacher /
    baseline. ``embed_text(list_of_texts) -> (S, D)`` embeds class names and synonyms (a template ensemble,
    e.g. ``lambda t: text_embeddings(clip, tokenizer, t, MICRO_TEMPLATES)``); ``embed_free`` embeds typed text
    (default: ``embed_text``). Either may be a ``{model: callable}`` dict when the models' text towers differ.
    ``classes``: dicts with ``name`` and ``synonyms`` (the dataset's categories)."""

    WIDGET = "attention"  # its ipywidgets builder (ovlib.viz.widgets)

    def __init__(
        self,
        images,
        dense_fns: Mapping[str, logic.DenseFn],
        embed_text,
        classes: Sequence[Mapping],
        embed_free=None,
        image: int = 0,
        class_name: str | None = None,
        titles=None,
        device: Any = "cpu",
        static_queries: int = 3,
    ):
        super().__init__(images, image, titles)
        if not dense_fns:
            raise ValueError("AttentionExplorer: no dense functions")
        self.cache = logic.DenseCache(self.images, dense_fns, device)
        self.names = list(dense_fns)
        self.classes = [dict(c) for c in classes]
        if not self.classes:
            raise ValueError("AttentionExplorer: no classes")
        self.embed_text, self.embed_free = embed_text, embed_free or embed_text
        self._emb: dict[tuple[str, str, str], torch.Tensor] = {}
        self.class_name = class_name or self.classes[0]["name"]
        self.synonym: str | None = None
        self.text = ""
        self.static_queries = static_queries
        self.select(class_name=self.class_name)

    def synonyms(self, class_name: str | None = None) -> list[str]:
        c = next(c for c in self.classes if c["name"] == (class_name or self.class_name))
        return [s for s in (c.get("synonyms") or []) if s != c["name"]]

    def select(
        self,
        image: int | None = None,
        class_name: str | None = None,
        synonym: str | None = "",
        text: str | None = None,
    ) -> AttentionExplorer:
        """``synonym=""`` keeps the current one unless the class changes; ``None`` selects the main name."""
        if image is not None:
            self._set_image(image)
        if class_name is not None and class_name != self.class_name:
            logic.resolve_query(self.classes, class_name)  # validates
            self.class_name, self.synonym = class_name, None
        if synonym != "":
            self.synonym = synonym or None
        if text is not None:
            self.text = text
        logic.resolve_query(self.classes, self.class_name, self.synonym, self.text)
        return self

    @property
    def query(self) -> tuple[str, str]:
        """``(text embedded, kind)``: kind ``class`` / ``synonym`` / ``text``."""
        return logic.resolve_query(self.classes, self.class_name, self.synonym, self.text)

    def _embedding(self, model: str) -> torch.Tensor:
        q, kind = self.query
        fn = self.embed_free if kind == "text" else self.embed_text
        fn = fn[model] if isinstance(fn, Mapping) else fn
        key = (
            model if isinstance(self.embed_text, Mapping) or isinstance(self.embed_free, Mapping) else "",
            kind == "text",
            q,
        )
        if key not in self._emb:
            with torch.no_grad():
                e = torch.as_tensor(fn([q])).float().cpu()
            if e.ndim != 2 or e.shape[0] != 1:
                raise ValueError(f"embed_text must return (1, D) for one text, got {tuple(e.shape)}")
            self._emb[key] = e[0]
        return self._emb[key]

    def maps(self) -> dict[str, torch.Tensor]:
        """``{model: (h, w)}`` cosine of the query's embedding with every token of the current image."""
        dense = {n: self.cache(n, self.image) for n in self.names}
        return logic.attention_maps(dense, {n: self._embedding(n) for n in self.names})

    def peaks(self) -> dict[str, tuple[int, int]]:
        return {n: logic.map_peak(m) for n, m in self.maps().items()}

    def figure(self, selections: Sequence[Mapping[str, Any]] | None = None):
        """One row per selection (``{"class_name": ..., "synonym": ..., "text": ..., "image": ...}``): the image,
        then each model's map (own colour scale, range in the title; the white cross marks the peak)."""
        state = (self.image, self.class_name, self.synonym, self.text)
        selections = list(selections) if selections else [{}]
        fig, axes = _new_figure(len(selections), len(self.names) + 1)
        try:
            for r, sel in enumerate(selections):
                self.select(**sel)
                _show_image(axes[r, 0], self.images[self.image])
                q, kind = self.query
                axes[r, 0].set_title(f"{kind}: '{q[:24]}'", fontsize=8)
                for ax, (name, m) in zip(axes[r, 1:], self.maps().items()):
                    ax.imshow(m.numpy(), cmap="magma")
                    pr, pc = logic.map_peak(m)
                    ax.plot(pc, pr, "x", color="white", ms=6, mew=1.5)
                    ax.set_title(f"{name}\n[{float(m.min()):.2f}, {float(m.max()):.2f}]", fontsize=7)
        finally:
            self.image, self.class_name, self.synonym, self.text = state
        fig.suptitle("text-to-patch cosine maps", fontsize=8)
        fig.tight_layout()
        return fig

    def static_figure(self):
        """The class's main name and up to ``static_queries - 1`` of its synonyms, on the current image."""
        rows: list[dict] = [{"synonym": None, "text": ""}]
        rows += [{"synonym": s, "text": ""} for s in self.synonyms()[: self.static_queries - 1]]
        return self.figure(rows)


# --------------------------------------------------------------------------------------------- regions
class RegionExplorer(_Explorer):
    """Draw a box (sliders, or pick a ground-truth box) and see each model's Top-``k`` classes for it:
    RoIAlign of the dense map (the *Boxes* predictor) per model, and optionally the *crop* predictor
    (``crop_encode``: ``(B, 3, s, s)`` in [0, 1] -> ``(B, D)``, e.g. CLIP's image embedding).
    ``text (K, D)`` and ``class_names`` are the class embeddings and their names; ``boxes[i]`` optional
    ``(K_i, 4)`` ground-truth boxes of image ``i`` with ``box_labels[i]`` their names."""

    WIDGET = "region"  # its ipywidgets builder (ovlib.viz.widgets)

    def __init__(
        self,
        images,
        dense_fns: Mapping[str, logic.DenseFn],
        text: torch.Tensor,
        class_names: Sequence[str],
        k: int = 5,
        crop_encode: Callable | None = None,
        crop_size: int = 64,
        boxes: Sequence[torch.Tensor] | None = None,
        box_labels: Sequence[Sequence[str]] | None = None,
        image: int = 0,
        box: Sequence[float] | None = None,
        titles=None,
        device: Any = "cpu",
        static_boxes: int = 3,
    ):
        super().__init__(images, image, titles)
        self.cache = logic.DenseCache(self.images, dense_fns, device)
        self.names = list(dense_fns) + (["crop CLS"] if crop_encode is not None else [])
        if not self.names:
            raise ValueError("RegionExplorer: no dense functions and no crop encoder")
        self.text = torch.as_tensor(text).float().cpu()
        self.class_names = list(class_names)
        if self.text.shape[0] != len(self.class_names):
            raise ValueError(f"{self.text.shape[0]} class embeddings for {len(self.class_names)} class names")
        self.k, self.crop_encode, self.crop_size, self.device = k, crop_encode, crop_size, device
        self.gt_boxes = (
            [torch.as_tensor(b).float().reshape(-1, 4) for b in boxes] if boxes is not None else None
        )
        self.gt_labels = [list(x) for x in box_labels] if box_labels is not None else None
        self.static_boxes = static_boxes
        self.box: tuple[float, ...] = ()
        self.select(box=box if box is not None else self._default_box())

    def _default_box(self) -> tuple[float, ...]:
        if self.gt_boxes is not None and len(self.gt_boxes[self.image]):
            return tuple(self.gt_boxes[self.image][0].tolist())
        H, W = self.image_size
        return (W / 4, H / 4, 3 * W / 4, 3 * H / 4)

    def select(
        self, image: int | None = None, box: Sequence[float] | None = None, gt: int | None = None
    ) -> RegionExplorer:
        """``gt``: the index of a ground-truth box of the (new) image; a new image without ``box``/``gt``
        takes its first ground-truth box (else the central box)."""
        if image is not None and int(image) != self.image:
            self._set_image(image)
            if box is None and gt is None:
                box = self._default_box()
        if gt is not None:
            if self.gt_boxes is None or not 0 <= int(gt) < len(self.gt_boxes[self.image]):
                raise ValueError(f"no ground-truth box {gt} in image {self.image}")
            box = self.gt_boxes[self.image][int(gt)].tolist()
        if box is not None:
            self.box = logic.clamp_box(box, self.image_size)
        return self

    def topk(self) -> dict[str, list[tuple[str, float]]]:
        """``{model: [(class name, cosine), ...]}`` best first, for the current image and box."""
        out = {}
        for n in self.names:
            if n == "crop CLS":
                enc = self.crop_encode

                def encode(x, enc=enc):
                    return enc(x.to(self.device))

                out[n] = logic.crop_topk(
                    self.images[self.image],
                    self.box,
                    encode,
                    self.text,
                    self.class_names,
                    self.k,
                    self.crop_size,
                )
            else:
                out[n] = logic.region_topk(
                    self.cache(n, self.image), self.box, self.image_size, self.text, self.class_names, self.k
                )
        return out

    def gt_index(self) -> int | None:
        """Index of the ground-truth box of the current image equal to the current box (``None``: a free box)."""
        if self.gt_boxes is None:
            return None
        for j, b in enumerate(self.gt_boxes[self.image]):
            try:
                same = torch.allclose(
                    torch.tensor(logic.clamp_box(b.tolist(), self.image_size)), torch.tensor(self.box)
                )
            except ValueError:  # a degenerate ground-truth box never matches
                same = False
            if same:
                return j
        return None

    def gt_label(self) -> str | None:
        """Name of the ground-truth box equal to the current box (``None`` if it is not one)."""
        j = self.gt_index()
        return None if j is None or self.gt_labels is None else self.gt_labels[self.image][j]

    def html(self) -> str:
        """The Top-k table of the current state (a ground-truth name is shown in bold)."""
        gt = self.gt_label()
        res = self.topk()
        head = "".join(f"<th style='padding:2px 8px'>{n}</th>" for n in res)
        rows = []
        for j in range(self.k):
            cells = []
            for n in res:
                if j < len(res[n]):
                    name, s = res[n][j]
                    t = f"<b>{name}</b>" if name == gt else name
                    cells.append(f"<td style='padding:2px 8px'>{t} <small>{s:.3f}</small></td>")
                else:
                    cells.append("<td></td>")
            rows.append(f"<tr><td>{j + 1}</td>{''.join(cells)}</tr>")
        cap = f"ground truth: <b>{gt}</b>" if gt else "a free box (not a ground-truth box)"
        return (
            f"<table><caption style='caption-side:top'>Top-{self.k}; {cap}</caption>"
            f"<tr><th>#</th>{head}</tr>{''.join(rows)}</table>"
        )

    def png(self, **kw) -> bytes:
        """The widget's view: the image with the box only (the widget shows the Top-k as a table beside it)."""
        return fig_to_png(self.figure(bars=False, **kw))

    def figure(self, selections: Sequence[Mapping[str, Any]] | None = None, bars: bool = True):
        """One row per selection (``{"image": i, "box": xyxy}`` or ``{"gt": j}``): the image with the box, then
        (``bars``) a bar chart of each model's Top-k (the ground-truth class in green)."""
        state = (self.image, self.box)
        selections = list(selections) if selections else [{}]
        if bars:
            fig, axes = _new_figure(len(selections), len(self.names) + 1, w=2.3, h=2.0)
        else:
            fig, axes = _new_figure(len(selections), 1, w=3.2, h=3.2)
        try:
            for r, sel in enumerate(selections):
                self.select(**sel)
                _show_image(axes[r, 0], self.images[self.image])
                x0, y0, x1, y1 = self.box
                from matplotlib.patches import Rectangle

                axes[r, 0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.5))
                gt = self.gt_label()
                axes[r, 0].set_title(f"box: {gt or 'free'}", fontsize=8)
                for ax, (name, top) in zip(axes[r, 1:], self.topk().items() if bars else []):
                    ax.axis("on")
                    labels = [t[0] for t in top][::-1]
                    vals = [t[1] for t in top][::-1]
                    ax.barh(
                        range(len(top)),
                        vals,
                        color=["tab:green" if lab == gt else "tab:grey" for lab in labels],
                    )
                    ax.set_yticks(range(len(top)), labels, fontsize=6)
                    ax.tick_params(axis="x", labelsize=6)
                    lo = min(vals)
                    ax.set_xlim(min(0.0, lo - 0.05), max(vals) + 0.05)
                    ax.set_title(name, fontsize=8)
        finally:
            self.image, self.box = state
        if bars:
            fig.suptitle(f"Top-{self.k} classes of a box (cosine)", fontsize=8)
        fig.tight_layout()
        return fig

    def static_figure(self):
        """The current box, then the first ground-truth boxes of the next images."""
        rows: list[dict] = [{}]
        for j in range(1, len(self.images)):
            if len(rows) >= self.static_boxes:
                break
            i = (self.image + j) % len(self.images)
            if self.gt_boxes is not None and len(self.gt_boxes[i]):
                rows.append({"image": i, "gt": 0})
        return self.figure(rows)


# --------------------------------------------------------------------------------------------- threshold
class ThresholdExplorer(_Explorer):
    """Move SynSeg's activation threshold and see the mask of one class, or the label map of all classes
    (argmax, background below the threshold). ``activations``: per image a ``(C, H, W)`` tensor in [0, 1]
    aligned with the image, or a callable ``image index -> (C, H, W)`` (computed once per image), e.g.
    ``lambda i: predict_probs(model, images[i], text)`` from :mod:`ovlib.methods.synseg`. ``targets`` optional
    per image ``{class index: (H, W) bool}`` ground-truth masks (their IoU is reported).

    Wiring SynSeg (chapter 05)::

        from ovlib.methods.synseg import predict_probs
        images, meta = images_from_dataset(ds, range(6), 160)
        ThresholdExplorer(images, lambda i: predict_probs(model, images[i], text), names,
                          targets=targets_from_meta(meta, class_ids)).show()
    """

    WIDGET = "threshold"  # its ipywidgets builder (ovlib.viz.widgets)

    ALL = "all classes"

    def __init__(
        self,
        images,
        activations,
        class_names: Sequence[str],
        threshold: float = 0.5,
        class_name: str | None = None,
        targets: Sequence[Mapping[int, torch.Tensor]] | None = None,
        image: int = 0,
        titles=None,
        static_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
    ):
        super().__init__(images, image, titles)
        self._acts_src = activations
        self._acts: dict[int, torch.Tensor] = {}
        self.class_names = list(class_names)
        self.targets = targets
        self.threshold = 0.5
        self.class_name = self.ALL
        self.static_thresholds = list(static_thresholds)
        self.select(threshold=threshold, class_name=class_name or self.ALL)
        self.activations()  # the initial image: shape errors surface here, not in a widget callback

    def activations(self, i: int | None = None) -> torch.Tensor:
        i = self.image if i is None else int(i)
        if i not in self._acts:
            src = self._acts_src
            a = src(i) if callable(src) else src[i]
            a = torch.as_tensor(a).detach().float().cpu()
            logic._acts(a)
            if a.shape[0] != len(self.class_names):
                raise ValueError(
                    f"activations of image {i} have {a.shape[0]} classes, expected {len(self.class_names)}"
                )
            self._acts[i] = a
        return self._acts[i]

    def select(
        self, image: int | None = None, threshold: float | None = None, class_name: str | None = None
    ) -> ThresholdExplorer:
        if image is not None:
            self._set_image(image)
        if threshold is not None:
            t = float(threshold)
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold must lie in [0, 1], got {t}")
            self.threshold = t
        if class_name is not None:
            if class_name != self.ALL and class_name not in self.class_names:
                raise ValueError(f"unknown class {class_name!r}")
            self.class_name = class_name
        return self

    @property
    def class_index(self) -> int | None:
        return None if self.class_name == self.ALL else self.class_names.index(self.class_name)

    def result(self) -> torch.Tensor:
        """``(H, W)``: the bool mask of the selected class, or the label map (``-1`` = background)."""
        a = self.activations()
        if self.class_index is None:
            return logic.threshold_labels(a, self.threshold, background=-1)
        return logic.threshold_mask(a, self.threshold, self.class_index)

    def stats(self) -> dict[str, float]:
        r = self.result()
        if self.class_index is None:
            return {
                "coverage": float((r >= 0).float().mean()),
                "classes": float(len(set(r[r >= 0].tolist()))),
            }
        tgt = None
        if self.targets is not None:
            tgt = self.targets[self.image].get(self.class_index)
            if tgt is None:
                tgt = torch.zeros_like(r)
        return logic.mask_stats(r, tgt)

    def figure(self, selections: Sequence[Mapping[str, Any]] | None = None):
        """One row per selection (``{"threshold": t, "class_name": ..., "image": i}``): the image, the
        activation map (selected class, or the best class per pixel), and the mask / label map."""
        state = (self.image, self.threshold, self.class_name)
        selections = list(selections) if selections else [{}]
        fig, axes = _new_figure(len(selections), 3, w=2.3, h=2.2)
        try:
            for r, sel in enumerate(selections):
                self.select(**sel)
                x = self.images[self.image]
                _show_image(axes[r, 0], x)
                axes[r, 0].set_title(self.titles[self.image], fontsize=8)
                a = self.activations()
                ci = self.class_index
                act = a.max(0).values if ci is None else a[ci]
                axes[r, 1].imshow(act.numpy(), cmap="viridis", vmin=0, vmax=1)
                axes[r, 1].contour(act.numpy() >= self.threshold, levels=[0.5], colors="red", linewidths=0.8)
                axes[r, 1].set_title(
                    f"activation ({'max over classes' if ci is None else self.class_name})", fontsize=7
                )
                res = self.result()
                st = self.stats()
                if ci is None:
                    import matplotlib

                    cmap = matplotlib.colormaps["tab20"].resampled(max(2, len(self.class_names)))
                    rgb = torch.zeros(*res.shape, 3)
                    for c in res.unique().tolist():
                        if c >= 0:
                            rgb[res == c] = torch.tensor(cmap(c)[:3], dtype=torch.float32)
                    axes[r, 2].imshow(rgb.numpy())
                    title = f"labels, t = {self.threshold:.2f} (black: background)"
                else:
                    over = x.permute(1, 2, 0).clone()
                    m = res if res.shape == over.shape[:2] else None
                    if m is not None:
                        over[m] = 0.4 * over[m] + 0.6 * torch.tensor([1.0, 0.1, 0.1])
                        axes[r, 2].imshow(over.clamp(0, 1).numpy())
                    else:
                        axes[r, 2].imshow(res.numpy(), cmap="gray")
                    iou = st.get("iou")
                    has_iou = iou is not None and not math.isnan(iou)
                    title = f"mask, t = {self.threshold:.2f}" + (f", IoU {iou:.2f}" if has_iou else "")
                axes[r, 2].set_title(title, fontsize=7)
        finally:
            self.image, self.threshold, self.class_name = state
        fig.tight_layout()
        return fig

    def static_figure(self):
        return self.figure([{"threshold": t} for t in self.static_thresholds])

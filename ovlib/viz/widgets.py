"""The thin ipywidgets front ends of the explorers: controls -> ``explorer.select(...)`` -> redraw.

Nothing here computes anything: the explorers (``ovlib.viz.explorers``) hold the state and the results. The
view is a PNG (``ipywidgets.Image``) of ``explorer.figure()`` plus, for regions, an HTML table; both are
plain widget state, so an executed notebook keeps the initial view (papermill / nbclient store the widget
state in the notebook's metadata and the book renders it without a kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["build"]


SHORT = {"description_width": "60px"}


def _row(W, children):
    """Controls side by side, wrapping on narrow pages (the book's text column)."""
    return W.HBox(children, layout=W.Layout(flex_flow="row wrap"))


def _slider(W, cls, **kw):
    return cls(continuous_update=False, style=SHORT, layout=W.Layout(width="250px"), **kw)


def _image_control(ex, W):
    n = len(ex.images)
    return _slider(
        W, W.IntSlider, value=ex.image, min=0, max=max(0, n - 1), description="image", disabled=n <= 1
    )


class _Wiring:
    """Redraw on change; ``busy`` stops the feedback loop when one control updates another."""

    def __init__(self, ex, W, extra: Callable[[], None] | None = None):
        self.ex, self.W = ex, W
        self.view = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.status = W.HTML()
        self.busy = False
        self.extra = extra

    def redraw(self) -> None:
        try:
            self.view.value = self.ex.png()
            if self.extra:
                self.extra()
        except Exception as e:  # a bad selection is shown to the user, not raised inside a widget callback
            self.status.value = f"<span style='color:#b00'>{type(e).__name__}: {e}</span>"

    def on(self, control, fn: Callable[[Any], None]) -> None:
        def handler(change):
            if self.busy:
                return
            self.busy = True
            try:
                fn(change["new"])
                self.redraw()  # still busy: controls that the redraw syncs do not call back
            except Exception as e:
                self.status.value = f"<span style='color:#b00'>{type(e).__name__}: {e}</span>"
            finally:
                self.busy = False

        control.observe(handler, names="value")


def _affinity(ex, W):
    h, w = ex.grid
    img = _image_control(ex, W)
    row = _slider(W, W.IntSlider, value=ex.token[0], min=0, max=h - 1, description="row")
    col = _slider(W, W.IntSlider, value=ex.token[1], min=0, max=w - 1, description="col")
    idx = W.BoundedIntText(
        value=ex.index,
        min=0,
        max=h * w - 1,
        description="token #",
        style=SHORT,
        layout=W.Layout(width="160px"),
    )
    wire = _Wiring(ex, W)

    def sync():
        row.value, col.value, idx.value = ex.token[0], ex.token[1], ex.index
        wire.status.value = (
            f"{ex.titles[ex.image]}: token ({ex.token[0]}, {ex.token[1]}) = #{ex.index} of a {h}x{w} grid"
        )

    wire.extra = sync
    wire.on(img, lambda v: ex.select(image=v))
    wire.on(row, lambda v: ex.select(token=(v, ex.token[1])))
    wire.on(col, lambda v: ex.select(token=(ex.token[0], v)))
    wire.on(idx, lambda v: ex.select(index=v))
    wire.busy = True
    wire.redraw()
    wire.busy = False
    return W.VBox(
        [_row(W, [img, row, col, idx]), wire.status, wire.view], layout=W.Layout(border="1px solid #ddd")
    )


def _attention(ex, W):
    img = _image_control(ex, W)
    cls = W.Dropdown(
        options=[c["name"] for c in ex.classes], value=ex.class_name, description="class", style=SHORT
    )
    main = "(main name)"
    syn = W.Dropdown(
        options=[main] + ex.synonyms(), value=ex.synonym or main, description="synonym", style=SHORT
    )
    txt = W.Text(
        value=ex.text,
        placeholder="or type any text, Enter",
        description="text",
        continuous_update=False,
        style=SHORT,
    )
    wire = _Wiring(ex, W)

    def sync():
        q, kind = ex.query
        wire.status.value = f"query ({kind}): <b>{q}</b>; peaks: " + ", ".join(
            f"{n} {p}" for n, p in ex.peaks().items()
        )

    def set_class(v):
        ex.select(class_name=v)
        syn.options = [main] + ex.synonyms()
        syn.value = main

    wire.extra = sync
    wire.on(img, lambda v: ex.select(image=v))
    wire.on(cls, set_class)
    wire.on(syn, lambda v: ex.select(synonym=None if v == main else v))
    wire.on(txt, lambda v: ex.select(text=v))
    wire.busy = True
    wire.redraw()
    wire.busy = False
    return W.VBox(
        [_row(W, [img, cls]), _row(W, [syn, txt]), wire.status, wire.view],
        layout=W.Layout(border="1px solid #ddd"),
    )


def _region(ex, W):
    H, Wd = ex.image_size
    img = _image_control(ex, W)
    xs = _slider(
        W, W.IntRangeSlider, value=(int(ex.box[0]), int(round(ex.box[2]))), min=0, max=Wd, description="x"
    )
    ys = _slider(
        W, W.IntRangeSlider, value=(int(ex.box[1]), int(round(ex.box[3]))), min=0, max=H, description="y"
    )

    def gt_options():
        if ex.gt_boxes is None:
            return [("(none)", -1)]
        labels = (
            ex.gt_labels[ex.image]
            if ex.gt_labels
            else [f"box {j}" for j in range(len(ex.gt_boxes[ex.image]))]
        )
        return [("(free box)", -1)] + [(f"{j}: {lab}", j) for j, lab in enumerate(labels)]

    j0 = ex.gt_index()
    gt = W.Dropdown(options=gt_options(), value=-1 if j0 is None else j0, description="GT box", style=SHORT)
    table = W.HTML()
    wire = _Wiring(ex, W)

    def sync():
        j = ex.gt_index()
        gt.value = -1 if j is None else j
        xs.value = (int(ex.box[0]), int(round(ex.box[2])))
        ys.value = (int(ex.box[1]), int(round(ex.box[3])))
        table.value = ex.html()
        wire.status.value = (
            f"{ex.titles[ex.image]}: box ({ex.box[0]:.0f}, {ex.box[1]:.0f}, {ex.box[2]:.0f}, {ex.box[3]:.0f})"
        )

    def set_image(v):
        ex.select(image=v)
        gt.options = gt_options()

    wire.extra = sync
    wire.on(img, set_image)
    wire.on(xs, lambda v: ex.select(box=(v[0], ex.box[1], v[1], ex.box[3])))
    wire.on(ys, lambda v: ex.select(box=(ex.box[0], v[0], ex.box[2], v[1])))
    wire.on(gt, lambda v: ex.select(gt=v) if v >= 0 else None)
    wire.busy = True
    wire.redraw()
    wire.busy = False
    return W.VBox(
        [_row(W, [img, gt]), _row(W, [xs, ys]), wire.status, _row(W, [wire.view, table])],
        layout=W.Layout(border="1px solid #ddd"),
    )


def _threshold(ex, W):
    img = _image_control(ex, W)
    thr = _slider(W, W.FloatSlider, value=ex.threshold, min=0.0, max=1.0, step=0.01, description="threshold")
    cls = W.Dropdown(options=[ex.ALL] + ex.class_names, value=ex.class_name, description="class", style=SHORT)
    wire = _Wiring(ex, W)

    def sync():
        st = ex.stats()
        wire.status.value = ", ".join(f"{k} {v:.3f}" for k, v in st.items())

    wire.extra = sync
    wire.on(img, lambda v: ex.select(image=v))
    wire.on(thr, lambda v: ex.select(threshold=v))
    wire.on(cls, lambda v: ex.select(class_name=v))
    wire.busy = True
    wire.redraw()
    wire.busy = False
    return W.VBox(
        [_row(W, [img, thr, cls]), wire.status, wire.view], layout=W.Layout(border="1px solid #ddd")
    )


_BUILDERS = {"affinity": _affinity, "attention": _attention, "region": _region, "threshold": _threshold}


def build(ex):
    """The widget of an explorer (``ipywidgets`` is imported here only). The explorer names its builder
    (``ex.WIDGET``), so this module never imports the explorers."""
    import ipywidgets as W

    fn = _BUILDERS.get(getattr(ex, "WIDGET", None))
    if fn is None:
        raise TypeError(f"no widget for {type(ex).__name__}")
    box = fn(ex, W)
    box.explorer = ex  # tests and users reach the state from the widget
    return box

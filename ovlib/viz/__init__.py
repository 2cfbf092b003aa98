"""Figures and ipywidgets explorers for the chapters.

* :class:`AffinityExplorer` -- an image and a token (sliders or a flat index) -> point-affinity maps of several
  models / dense modes side by side;
* :class:`AttentionExplorer` -- a class name, one of its synonyms, or typed text -> text-to-patch maps of several
  models (student / teacher / baseline);
* :class:`RegionExplorer` -- a box -> Top-5 classes per model (RoIAlign of the dense map; optionally the crop);
* :class:`ThresholdExplorer` -- SynSeg's activation threshold -> a class mask or the label map.

The logic is plain functions (:mod:`ovlib.viz.logic`) and explorer state (:mod:`ovlib.viz.explorers`), tested
without a front end; :mod:`ovlib.viz.widgets` is the thin ipywidgets wiring. ``explorer.show()`` displays the
widget and a static matplotlib figure beside it for readers without a kernel.
"""

from .explorers import (
    AffinityExplorer,
    AttentionExplorer,
    RegionExplorer,
    ThresholdExplorer,
    fig_to_png,
    images_from_dataset,
    targets_from_meta,
)
from .logic import (
    affinity_maps,
    attention_maps,
    cell_on_grid,
    crop_topk,
    map_peak,
    mask_stats,
    region_topk,
    resolve_query,
    threshold_labels,
    threshold_mask,
    token_from_index,
    token_to_index,
)

__all__ = [
    "AffinityExplorer",
    "AttentionExplorer",
    "RegionExplorer",
    "ThresholdExplorer",
    "images_from_dataset",
    "targets_from_meta",
    "fig_to_png",
    "affinity_maps",
    "attention_maps",
    "cell_on_grid",
    "crop_topk",
    "map_peak",
    "mask_stats",
    "region_topk",
    "resolve_query",
    "threshold_labels",
    "threshold_mask",
    "token_from_index",
    "token_to_index",
]

"""Evaluation protocols, one function per protocol, usable on the micro world and on real COCO.

* :mod:`ovlib.eval.metrics` -- mean per-class accuracy, confusion-matrix mIoU/mAcc (intervals: :mod:`ovlib.stats`);
* prompt templates and class embeddings (:mod:`ovlib.models.text`) and point affinity maps
  (:mod:`ovlib.models.affinity`) are re-exported here;
* :mod:`ovlib.eval.region_cls` -- zero-shot region classification (rois / maskpool / crops; CLIPSelf);
* :mod:`ovlib.eval.segmentation` -- MaskCLIP-style sliding-window OVSS and the k-means diagnostic;
* :mod:`ovlib.eval.unsupervised` -- k-means + Hungarian matching.
* :mod:`ovlib.eval.detection` -- open-vocabulary box AP (COCOeval per base / novel part, AP50 from per-image
  counts for the bootstrap) of a detector such as F-ViT (:mod:`ovlib.methods.fvit`).
"""

from ovlib.models.affinity import affinity_map, pixel_to_cell
from ovlib.models.text import MICRO_TEMPLATES, VILD_TEMPLATES, class_name_sets, fill_template, text_embeddings

from .metrics import (
    confusion_matrix,
    iou_acc_from_confusion,
    macc_from_counts,
    mean_class_accuracy,
    miou_from_confusion,
    topk_hits,
)
from .region_cls import RegionClsConfig, RegionFeatures, extract_region_features, score_regions, summarize
from .segmentation import OVSSConfig, evaluate_kmeans, evaluate_ovss, sliding_logits
from .unsupervised import hungarian_miou, kmeans_labels

__all__ = [
    "affinity_map", "pixel_to_cell", "confusion_matrix", "iou_acc_from_confusion",
    "macc_from_counts", "mean_class_accuracy", "miou_from_confusion", "topk_hits", "RegionClsConfig",
    "RegionFeatures", "extract_region_features", "score_regions", "summarize", "OVSSConfig", "evaluate_kmeans",
    "evaluate_ovss", "sliding_logits", "MICRO_TEMPLATES", "VILD_TEMPLATES", "class_name_sets", "fill_template",
    "text_embeddings", "hungarian_miou", "kmeans_labels",
]

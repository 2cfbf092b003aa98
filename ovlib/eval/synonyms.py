"""Synonym-robustness evaluation: replace every class name by synonyms and measure the drop.

SynCLIP (CVPR'26, "Synonym Robustness Evaluation") reports the loss of OV-COCO AP when class names are replaced
by synonyms; its public code does this only for F-ViT text embeddings
(``Justlovesmile/SynCLIP:F-ViT/tools/generate_text_embedding_mj.py`` ``build_text_embedding_synonyms``: ``v1`` =
the first synonym, ``v3`` = the ensemble over the synonym list; ``reference/implementations.md`` §4.7) and not
for region classification. We run the same protocols on zero-shot region classification
(:mod:`ovlib.eval.region_cls`) and OVSS (:mod:`ovlib.eval.segmentation`):

==================  =======================================================================================
protocol            name(s) standing for each class (:func:`ovlib.models.text.class_name_sets`)
==================  =======================================================================================
``original``        the class name
``first_synonym``   its first synonym (SynCLIP ``v1``)
``random_synonym``  one synonym per class drawn with the seed (one draw per seed; several seeds averaged)
``synonym_ensemble`` the mean of the unit-norm embeddings over all synonyms (SynCLIP ``v3``)
``heldout_synonym`` (optional, micro world) the first held-out synonym, never used in captions
==================  =======================================================================================

Only the *text* changes: class ids, their order and the image features stay the same, so the region features
are extracted once and scored against every protocol's embedding matrix. A class without synonyms keeps its
name. The drop table (:func:`drop_table`) gives, per protocol and class split (``base``/``novel`` things,
``stuff``, and ``all``), the mean over the classes present of a per-class score (region classification:
Top-1 accuracy; OVSS: IoU) and its difference from ``original``; seeded protocols report the mean and standard
deviation over seeds. For OVSS the per-class score is the IoU with mmseg's convention (``nan`` only for a
class absent from both ground truth and prediction), so a class predicted but absent from the ground truth
counts as 0 under the protocol that predicts it; ``n_classes`` then differs between protocols.

Also here (chapter 4): :func:`synonym_map_stats` / :func:`synonym_attention_consistency` measure the
phenomenon SynCLIP starts from -- how much an object's cosine map ("attention") changes when its name is
replaced by a synonym; the differences between trained variants are judged by
:func:`ovlib.stats.compare` (seeds, then images).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ovlib.eval._common import dataset_indices, student_image
from ovlib.eval.metrics import macc_from_counts, miou_statistic
from ovlib.eval.region_cls import (
    RegionClsConfig,
    extract_region_features,
    region_masks_at_grid,
    score_regions,
)
from ovlib.eval.segmentation import OVSSConfig, evaluate_ovss
from ovlib.models.text import MICRO_TEMPLATES, class_name_sets, text_embeddings
from ovlib.stats import ratio_stat

__all__ = [
    "EXTRA_PROTOCOLS",
    "MAP_STATS",
    "OVSS_METRICS",
    "PROTOCOLS",
    "REGION_METRICS",
    "SEEDED",
    "SynonymEval",
    "class_ids",
    "class_splits",
    "drop_table",
    "evaluate_synonym_protocols",
    "format_drop_table",
    "map_stat_array",
    "ovss_synonym_robustness",
    "per_class_accuracy",
    "pick_object",
    "protocol_names",
    "protocol_runs",
    "protocol_text_embeddings",
    "region_synonym_robustness",
    "synonym_attention_consistency",
    "synonym_class_text",
    "synonym_map_stats",
]

PROTOCOLS = ("original", "first_synonym", "random_synonym", "synonym_ensemble")
#: accepted besides :data:`PROTOCOLS`: the micro world's first held-out synonym (never in a caption)
EXTRA_PROTOCOLS = ("heldout_synonym",)
SEEDED = ("random_synonym",)
_MODE = {"original": "main", "first_synonym": "first_synonym", "random_synonym": "random_synonym",
         "synonym_ensemble": "synonym_ensemble", "heldout_synonym": "heldout_synonym"}


def _get(c: Any, key: str, default: Any = None) -> Any:
    return c.get(key, default) if isinstance(c, Mapping) else getattr(c, key, default)


def class_ids(categories: Sequence[Any]) -> list[int]:
    """The category ids in the given order (the rows of every protocol's embedding matrix)."""
    return [int(_get(c, "id")) for c in categories]


def class_splits(categories: Sequence[Any]) -> list[str]:
    """Per class: its ``split`` field (``base``/``novel``/``stuff`` in the micro world), else ``novel``/``base``
    from a ``novel`` flag, else ``stuff`` for non-things, else ``all``."""
    out = []
    for c in categories:
        s = _get(c, "split")
        if s is None and _get(c, "novel") is not None:
            s = "novel" if _get(c, "novel") else "base"
        if s is None and _get(c, "isthing") is not None and not _get(c, "isthing"):
            s = "stuff"
        out.append(str(s) if s is not None else "all")
    return out


def protocol_names(categories: Sequence[Any], protocol: str, seed: int = 0) -> list[list[str]]:
    """The name set of every class under ``protocol`` (same order and length as ``categories``)."""
    if protocol not in _MODE:
        raise ValueError(f"unknown synonym protocol {protocol!r}; choose from {PROTOCOLS + EXTRA_PROTOCOLS}")
    return class_name_sets(categories, _MODE[protocol], seed=seed)


def protocol_runs(protocols: Sequence[str] = PROTOCOLS, seeds: Sequence[int] = (0,)) -> list[tuple[str, int]]:
    """``(protocol, seed)`` pairs to evaluate: seeded protocols once per seed, the others once (seed 0)."""
    bad = [p for p in protocols if p not in _MODE]
    if bad:
        raise ValueError(f"unknown synonym protocol(s) {bad}; choose from {PROTOCOLS + EXTRA_PROTOCOLS}")
    if not seeds:
        raise ValueError("need at least one seed")
    return [(p, int(s)) for p in protocols for s in (seeds if p in SEEDED else seeds[:1])]


def protocol_text_embeddings(model: Any, tokenizer: Callable, categories: Sequence[Any],
                             protocols: Sequence[str] = PROTOCOLS, seeds: Sequence[int] = (0,),
                             templates: Sequence[str] = MICRO_TEMPLATES, this_is_prefix: bool = False,
                             device: str | torch.device = "cpu") -> dict[tuple[str, int], torch.Tensor]:
    """``{(protocol, seed): (C, D)}`` unit-norm class embeddings (rows in ``categories`` order), via
    :func:`ovlib.models.text.text_embeddings` (template ensemble; an ensemble of names for ``synonym_ensemble``)."""
    out = {}
    for p, s in protocol_runs(protocols, seeds):
        out[(p, s)] = text_embeddings(model, tokenizer, protocol_names(categories, p, s), templates,
                                      this_is_prefix=this_is_prefix, device=device)
    return out


def per_class_accuracy(counts: Mapping[str, np.ndarray] | np.ndarray, k_index: int = 1) -> np.ndarray:
    """Per-class accuracy in percent ``(C,)`` (``nan`` for a class without regions) from
    :func:`ovlib.eval.region_cls.score_regions` counts of one feature key: ``{"thing"|"stuff": (N, 1 + K, C)}``
    (parts summed: a class is either a thing or stuff) or one such array. ``k_index`` 1 = Top-1."""
    arrs = list(counts.values()) if isinstance(counts, Mapping) else [counts]
    tot = sum(np.asarray(a, dtype=np.float64).sum(0) for a in arrs)  # (1 + K, C)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tot[0] > 0, 100.0 * tot[k_index] / tot[0], np.nan)


def drop_table(scores: Mapping[tuple[str, int], np.ndarray], splits: Sequence[str],
               baseline: str = "original") -> list[dict[str, Any]]:
    """Rows ``{protocol, split, score, std, drop, n_seeds, n_classes}`` from per-class scores.

    ``scores[(protocol, seed)]`` is ``(C,)`` (``nan`` = class absent: excluded, the same classes for every
    protocol since absence depends on the ground truth only); ``splits[c]`` names each class's split.
    ``score`` = mean over seeds of the mean over the split's present classes; ``std`` over seeds (0 for one
    seed); ``drop = score - score(baseline)`` (negative = worse). Splits: each distinct one, then ``all``.
    """
    if not scores:
        raise ValueError("drop_table: no scores")
    splits = list(splits)
    C = len(splits)
    for key, v in scores.items():
        if np.asarray(v).shape != (C,):
            raise ValueError(f"drop_table: scores[{key}] has shape {np.asarray(v).shape}, expected ({C},)")
    base_keys = [k for k in scores if k[0] == baseline]
    if not base_keys:
        raise ValueError(f"drop_table: the baseline protocol {baseline!r} is missing from {sorted(scores)}")
    groups: dict[str, list[np.ndarray]] = {}
    for (p, _s), v in scores.items():
        groups.setdefault(p, []).append(np.asarray(v, dtype=np.float64))
    names = sorted(set(splits), key=lambda s: ({"base": 0, "novel": 1, "stuff": 2}.get(s, 3), s))
    parts = [(s, np.array([x == s for x in splits])) for s in names]
    if len(names) > 1:
        parts.append(("all", np.ones(C, dtype=bool)))

    def split_mean(v: np.ndarray, sel: np.ndarray) -> float:
        x = v[sel]
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else float("nan")

    base = {name: float(np.mean([split_mean(v, sel) for v in groups[baseline]])) for name, sel in parts}
    known = PROTOCOLS + EXTRA_PROTOCOLS
    order = [p for p in known if p in groups] + sorted(p for p in groups if p not in known)
    rows = []
    for p in order:
        for name, sel in parts:
            per_seed = np.array([split_mean(v, sel) for v in groups[p]])
            score = float(per_seed.mean())
            rows.append({"protocol": p, "split": name, "score": score,
                             "std": float(per_seed.std()) if len(per_seed) > 1 else 0.0,
                             "drop": score - base[name], "n_seeds": len(per_seed),
                             "n_classes": int(np.isfinite(groups[p][0][sel]).sum())})
    return rows


def format_drop_table(rows: Sequence[Mapping[str, Any]], score_name: str = "score") -> str:
    """A plain-text (markdown) table of :func:`drop_table` rows."""
    lines = [f"| protocol | split | {score_name} | drop | seeds | classes |", "|---|---|---|---|---|---|"]
    for r in rows:
        sd = f" ± {r['std']:.1f}" if r["n_seeds"] > 1 else ""
        lines.append(f"| {r['protocol']} | {r['split']} | {r['score']:.1f}{sd} | {r['drop']:+.1f} | "
                     f"{r['n_seeds']} | {r['n_classes']} |")
    return "\n".join(lines)


def region_synonym_robustness(rf: Any, model: Any, tokenizer: Callable, categories: Sequence[Any],
                              key: str, protocols: Sequence[str] = PROTOCOLS, seeds: Sequence[int] = (0,),
                              templates: Sequence[str] = MICRO_TEMPLATES, k_index: int = 1,
                              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Region classification under every protocol from *one* feature extraction.

    ``rf``: :class:`ovlib.eval.region_cls.RegionFeatures`; ``key``: its feature key (``"rois/<mode>"``,
    ``"maskpool/<mode>"``, ``"crops"``). Returns ``{"per_class": {(protocol, seed): (C,)}, "table": rows,
    "class_ids": [...]}`` (Top-``ks[k_index-1]`` per-class accuracy; default Top-1)."""

    if key not in rf.features:
        raise KeyError(f"region features have no key {key!r}; available: {sorted(rf.features)}")
    ids = class_ids(categories)
    texts = protocol_text_embeddings(model, tokenizer, categories, protocols, seeds, templates, device=device)
    per = {}
    for pk, text in texts.items():
        sub = type(rf)(category_id=rf.category_id, isthing=rf.isthing, image=rf.image, n_images=rf.n_images,
                       features={key: rf.features[key]})
        per[pk] = per_class_accuracy(score_regions(sub, text, ids)[key], k_index)
    return {"per_class": per, "table": drop_table(per, class_splits(categories)), "class_ids": ids}


def _memoized(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` with its outputs cached by the input's shape and bytes (the same windows of the same images are
    seen once per protocol; only the text changes)."""
    cache: dict[tuple, torch.Tensor] = {}

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), str(x.dtype),
               hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        if key not in cache:
            cache[key] = fn(x)
        return cache[key]

    wrapped.cache = cache  # type: ignore[attr-defined]
    return wrapped


def ovss_synonym_robustness(dense_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Sequence, model: Any,
                            tokenizer: Callable, categories: Sequence[Any], cfg: Any = None,
                            protocols: Sequence[str] = PROTOCOLS, seeds: Sequence[int] = (0,),
                            templates: Sequence[str] = MICRO_TEMPLATES, n_images: int = 0,
                            device: str | torch.device = "cpu", cache_dense: bool = True,
                            n_boot: int = 1000, boot_seed: int = 0,
                            texts: Mapping[tuple[str, int], torch.Tensor] | None = None) -> dict[str, Any]:
    """OVSS (:func:`ovlib.eval.segmentation.evaluate_ovss`) under every protocol; per-class IoU drop table.

    ``cache_dense`` computes the dense maps of the sliding windows once and reuses them for every protocol
    (exact: only the class embeddings change). ``texts`` may pass precomputed
    :func:`protocol_text_embeddings` (then ``protocols``/``seeds``/``templates`` are not used). Returns
    ``{"per_class": {(protocol, seed): (C,) IoU},
    "miou": {(protocol, seed): (pt, lo, hi)}, "confusion": {(protocol, seed): (N, C, C) per image},
    "table": rows, "class_ids": [...]}``."""

    cfg = cfg or OVSSConfig()
    ids = class_ids(categories)
    if texts is None:
        texts = protocol_text_embeddings(model, tokenizer, categories, protocols, seeds, templates, device=device)
    fn = _memoized(dense_fn) if cache_dense else dense_fn
    per, miou, conf = {}, {}, {}
    for pk, text in texts.items():
        r = evaluate_ovss(fn, dataset, text, ids, cfg, n_images=n_images, n_boot=n_boot, seed=boot_seed,
                          progress=False)
        iou = np.asarray(r["iou"], dtype=np.float64)[: len(ids)]
        per[pk], miou[pk], conf[pk] = iou, r["miou"], r["confusion"]
    return {"per_class": per, "miou": miou, "confusion": conf, "table": drop_table(per, class_splits(categories)),
            "class_ids": ids}


# ---------------------------------------------------------------------------------------------------------
# The phenomenon: how much a class's "attention" map moves when its name is replaced by a synonym
# ---------------------------------------------------------------------------------------------------------
def synonym_map_stats(maps: torch.Tensor, inside: torch.Tensor | None = None) -> dict[str, float]:
    """Consistency of the maps of one object under ``S`` names: ``maps (S, M)`` (cosine of each name's
    embedding with every dense token, SynCLIP's ``A_label``), ``inside (M,)`` bool = the object's tokens.

    * ``spread``: mean over tokens of the standard deviation across names (population std) -- the raw
      variation the paper's figure shows; it scales with the cosine range of the model;
    * ``rel_spread``: ``spread`` divided by the mean over names of each map's own standard deviation over
      tokens -- variation across names relative to the map's spatial contrast (scale-free);
    * ``corr``: mean Pearson correlation over token positions of every pair of names (1 = the same map up to
      an affine change; ``nan`` with fewer than two names or for a constant map);
    * ``hit``: fraction of names whose highest token lies on the object (``nan`` without ``inside``).
    """
    if maps.ndim != 2 or maps.shape[0] < 1 or maps.shape[1] < 1:
        raise ValueError(f"maps must be (S, M) with S, M >= 1, got {tuple(maps.shape)}")
    x = maps.detach().double().cpu()  # (S, M)
    S, M = x.shape
    spread = float(x.std(dim=0, unbiased=False).mean())
    own = float(x.std(dim=1, unbiased=False).mean())
    out = {"spread": spread, "rel_spread": spread / own if own > 0 else float("nan")}
    if S >= 2:
        z = x - x.mean(dim=1, keepdim=True)
        nrm = z.norm(dim=1)
        ok = nrm > 0
        if int(ok.sum()) >= 2:
            zn = z[ok] / nrm[ok, None]
            c = zn @ zn.T  # (S', S')
            iu = torch.triu_indices(c.shape[0], c.shape[0], offset=1)
            out["corr"] = float(c[iu[0], iu[1]].mean())
        else:
            out["corr"] = float("nan")
    else:
        out["corr"] = float("nan")
    if inside is not None:
        inside = torch.as_tensor(inside, dtype=torch.bool).reshape(-1).cpu()
        if inside.numel() != M:
            raise ValueError(f"inside must have M = {M} entries, got {inside.numel()}")
        out["hit"] = float(inside[x.argmax(dim=1)].double().mean()) if inside.any() else float("nan")
    else:
        out["hit"] = float("nan")
    return out


@torch.no_grad()
def synonym_class_text(model: Any, tokenizer: Callable, categories: Sequence[Any],
                       templates: Sequence[str] = MICRO_TEMPLATES, this_is_prefix: bool = False,
                       device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
    """``{category id: (S, D)}`` unit-norm embeddings of every thing's names (row 0 = the class name, then its
    synonyms, held-out ones included), all names embedded in one call (template ensemble)."""
    pairs = [(int(_get(c, "id")), n) for c in categories if bool(_get(c, "isthing", True))
             for n in [_get(c, "name")] + [x for x in (_get(c, "synonyms") or []) if x and x != _get(c, "name")]]
    if not pairs:
        return {}
    emb = text_embeddings(model, tokenizer, [n for _, n in pairs], templates, this_is_prefix=this_is_prefix,
                          device=device).cpu()  # (sum S, D)
    ids = np.asarray([c for c, _ in pairs])
    return {cid: emb[torch.as_tensor(np.nonzero(ids == cid)[0])] for cid in dict.fromkeys(c for c, _ in pairs)}


@torch.no_grad()
def synonym_attention_consistency(dense_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Sequence, model: Any,
                                  tokenizer: Callable, categories: Sequence[Any], image_size: int = 160,
                                  n_images: int = 0, templates: Sequence[str] = MICRO_TEMPLATES,
                                  batch_size: int = 16, device: str | torch.device = "cpu",
                                  class_text: Mapping[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """:func:`synonym_map_stats` of every GT thing of the first ``n_images`` images (0 = all).

    A thing's names are its class name and all its synonyms (held-out ones included), each embedded with the
    template ensemble (``class_text`` may pass them in: ``{category id: (S, D)}`` unit-norm, row 0 = the
    name); the dense map of the student image (longest side ``image_size``, bottom/right pad) comes from
    ``dense_fn`` (``images in [0, 1] -> (B, D, h, w)``, unit-norm tokens). ``inside`` = the grid cells covered
    at least half by the segment (:func:`ovlib.eval.region_cls.region_masks_at_grid`). Returns per-object arrays
    ``{"category_id", "split", "spread", "rel_spread", "corr", "hit"}`` and ``"class_text"``.
    """

    splits = dict(zip(class_ids(categories), class_splits(categories)))
    if class_text is None:
        class_text = synonym_class_text(model, tokenizer, categories, templates, device=device)
    rec: dict[str, list] = {k: [] for k in ("category_id", "split", "spread", "rel_spread", "corr", "hit")}
    idx = dataset_indices(dataset, n_images)
    for s in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[s:s + batch_size]]
        xs, scales = zip(*[student_image(np.asarray(it["image"]), image_size) for it in items])
        dense = dense_fn(torch.stack(xs).to(device)).float().cpu()  # (B, D, h, w)
        grid = tuple(dense.shape[-2:])
        for it, d, scale in zip(items, dense, scales):
            tokens = torch.nn.functional.normalize(d.flatten(1).T, dim=-1)  # (M, D)
            for seg in it["segments"]:
                cid = int(seg["category_id"])
                if not seg["isthing"] or cid not in class_text:
                    continue
                m = torch.as_tensor(np.asarray(seg["mask"]), dtype=torch.bool)
                if not m.any():
                    continue
                g, _ = region_masks_at_grid(m[None], scale, image_size, grid)
                st = synonym_map_stats(class_text[cid].float() @ tokens.T, g[0].reshape(-1))
                rec["category_id"].append(cid)
                rec["split"].append(splits.get(cid, "all"))
                for k in ("spread", "rel_spread", "corr", "hit"):
                    rec[k].append(st[k])
    out: dict[str, Any] = {k: (np.asarray(v) if k != "split" else list(v)) for k, v in rec.items()}
    out["class_text"] = class_text
    return out


# ---------------------------------------------------------------------------------------------------------
# One model evaluated under every protocol, read as per-image arrays (the rows of ovlib.study)
# ---------------------------------------------------------------------------------------------------------
#: region metrics: name -> (feature key of :func:`score_regions`, part, class selection)
REGION_METRICS = {"boxes base": ("rois/dense", "thing", "base"), "boxes novel": ("rois/dense", "thing", "novel"),
                  "stuff masks": ("maskpool/dense", "stuff", "stuff"), "global zero-shot": ("crops", "thing", "things")}
#: OVSS metrics: name -> class selection
OVSS_METRICS = {"OVSS mIoU": "all", "OVSS base": "base", "OVSS novel": "novel"}
#: the map statistics of :func:`synonym_attention_consistency` a comparison may use (metric ``maps <stat>``)
MAP_STATS = ("spread", "rel_spread", "corr", "hit")
_METRIC = re.compile(r"^(?P<drop>drop )?(?P<name>.+?)(?: \[(?P<protocol>\w+)\])?$")


def pick_object(dataset: Sequence, categories: Sequence[Any], n_images: int = 40, prefer: str = "novel"
                ) -> tuple[int, dict[str, Any]]:
    """``(image index, segment)`` of the largest thing among the first ``n_images`` images, one of the class
    split ``prefer`` (:func:`class_splits`) when there is one."""
    split = dict(zip(class_ids(categories), class_splits(categories)))
    best = None
    for i in range(min(len(dataset), n_images)):
        for seg in dataset[i]["segments"]:
            if seg["isthing"]:
                score = (split.get(int(seg["category_id"])) == prefer, int(np.asarray(seg["mask"]).sum()))
                if best is None or score > best[0]:
                    best = (score, i, seg)
    if best is None:
        raise ValueError(f"pick_object: no thing segment in the first {n_images} images")
    return best[1], best[2]


def map_stat_array(cons: Mapping[str, Any], key: str, split: str | None = None) -> np.ndarray:
    """Per-object ``(N, 2)`` ``[value, valid]`` of one map statistic (``nan`` -> invalid; ``split``: only the
    objects of that class split), the units of :func:`ovlib.stats.ratio_stat` (the mean over valid objects)."""
    if key not in MAP_STATS:
        raise KeyError(f"unknown map statistic {key!r}; known: {MAP_STATS}")
    v = np.asarray(cons[key], dtype=np.float64)
    if split is not None:
        v = np.where(np.asarray(cons["split"]) == split, v, np.nan)
    ok = np.isfinite(v)
    return np.stack([np.where(ok, v, 0.0), ok.astype(np.float64)], 1)


@dataclass
class SynonymEval:
    """One model's scores under the synonym protocols, per image, so that one bootstrap serves every table.

    ``region``: ``{(protocol, seed): score_regions(...)}``; ``ovss``: ``{(protocol, seed): (N, C, C)}``
    confusions; ``cons``: :func:`synonym_attention_consistency` (or ``None``); ``splits``: per class
    ``base``/``novel``/``stuff`` (:func:`class_splits`), ``thing``: per class bool.

    Metric names (what :meth:`point` and :attr:`per_image` take, as :class:`ovlib.study.Study` rows do):
    ``"boxes novel"`` under the original names; ``"boxes novel [synonym_ensemble]"`` under a protocol (seeded
    protocols: the mean over their draws); ``"drop boxes novel [synonym_ensemble]"`` = that minus the original;
    ``"maps rel_spread"`` / ``"maps rel_spread [novel]"``: a map statistic over the (novel) objects."""

    region: dict[tuple[str, int], dict]
    ovss: dict[tuple[str, int], np.ndarray]
    splits: np.ndarray
    thing: np.ndarray
    cons: dict[str, Any] | None = None
    n_regions: int = 0
    protocol: dict[str, Any] = field(default_factory=dict)
    seconds: float = float("nan")

    def _selection(self, name: str) -> np.ndarray:
        return {"things": self.thing, "all": np.ones(len(self.splits), dtype=bool)}.get(name, self.splits == name)

    def keys(self, metric: str, protocol: str) -> list[tuple[str, int]]:
        """The ``(protocol, seed)`` keys scored for ``metric`` (region metrics: every protocol; OVSS: those run)."""
        return [k for k in (self.region if metric in REGION_METRICS else self.ovss) if k[0] == protocol]

    def _array(self, metric: str, pk: tuple[str, int]) -> tuple[np.ndarray, Callable] | None:
        if metric in REGION_METRICS:
            key, part, sel = REGION_METRICS[metric]
            if key not in self.region.get(pk, {}):
                return None
            m = self._selection(sel)
            return self.region[pk][key][part], lambda s: macc_from_counts(s[1][m], s[0][m])
        if metric in OVSS_METRICS:
            return (self.ovss[pk], miou_statistic(self._selection(OVSS_METRICS[metric]))) if pk in self.ovss else None
        raise KeyError(f"unknown metric {metric!r}; known: {list(REGION_METRICS) + list(OVSS_METRICS)}")

    def sample(self, metric: str) -> tuple[np.ndarray, Callable] | None:
        """``(per-unit array, statistic)`` of a metric name (class docstring); ``None`` when not evaluated."""
        m = _METRIC.match(metric)
        name, protocol, drop = m["name"], m["protocol"], bool(m["drop"])
        if name.startswith("maps "):
            if self.cons is None or drop:
                return None
            return map_stat_array(self.cons, name[5:], protocol), ratio_stat
        keys = [("original", 0)] if protocol is None else self.keys(name, protocol)
        parts = [self._array(name, k) for k in ([("original", 0)] if drop else []) + keys]
        if not keys or any(p is None for p in parts):
            return None
        f = parts[0][1]
        if not drop and len(parts) == 1:
            return parts[0]
        stacked = np.stack([p[0] for p in parts], 1)  # (N, [original,] draws, ...)
        if drop:  # mean over the protocol's draws minus the original
            return stacked, lambda s: float(np.mean([f(s[j]) for j in range(1, s.shape[0])])) - f(s[0])
        return stacked, lambda s: float(np.mean([f(s[j]) for j in range(s.shape[0])]))

    @property
    def per_image(self) -> Mapping[str, tuple[np.ndarray, Callable]]:
        """The metrics as a read-only mapping ``metric -> (per-unit array, statistic)`` (evaluated ones only)."""
        return _PerImage(self)

    def point(self, metric: str) -> float:
        """The metric's value on all units (``nan`` when not evaluated)."""
        s = self.sample(metric)
        return float("nan") if s is None else float(s[1](s[0].sum(0)))


class _PerImage(Mapping):
    def __init__(self, ev: SynonymEval) -> None:
        self.ev = ev

    def __getitem__(self, metric: str) -> tuple[np.ndarray, Callable]:
        s = self.ev.sample(metric)
        if s is None:
            raise KeyError(metric)
        return s

    def __contains__(self, metric: object) -> bool:
        return isinstance(metric, str) and self.ev.sample(metric) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(list(REGION_METRICS) + list(OVSS_METRICS))

    def __len__(self) -> int:
        return len(REGION_METRICS) + len(OVSS_METRICS)


def evaluate_synonym_protocols(dense_fn: Callable[[torch.Tensor], torch.Tensor], model: Any, dataset: Sequence,
                               tokenizer: Callable, categories: Sequence[Any],
                               texts: Mapping[tuple[str, int], torch.Tensor], region_cfg: RegionClsConfig,
                               n_region: int, ovss_cfg: Any, n_ovss: int,
                               ovss_protocols: Sequence[str] = ("original", "synonym_ensemble"), crops: bool = True,
                               cons: dict[str, Any] | None = None, n_boot: int = 1000, seed: int = 0,
                               device: str | torch.device = "cpu") -> SynonymEval:
    """Region classification (boxes, masks and, with ``crops``, the model's own crop CLS) of the first
    ``n_region`` images scored under every protocol key of ``texts`` (features extracted once), and OVSS of the
    first ``n_ovss`` images under the keys whose protocol is in ``ovss_protocols`` (dense maps computed once).
    ``dense_fn``: raw (unnormalised) tokens -- ``region_cfg.pooling`` decides where they are normalised."""
    t = time.perf_counter()
    preds = ("rois", "maskpool", "crops") if crops else ("rois", "maskpool")
    rf = extract_region_features(model, dataset, region_cfg, modes=(), dense_fns={"dense": dense_fn},
                                 predictors=preds, n_images=n_region, device=device, progress=False)
    ids = class_ids(categories)
    region = {pk: score_regions(rf, text, ids, ks=(1,)) for pk, text in texts.items()}
    ov = ovss_synonym_robustness(dense_fn, dataset, model, tokenizer, categories, ovss_cfg, n_images=n_ovss,
                                 device=device, n_boot=n_boot, boot_seed=seed,
                                 texts={k: v for k, v in texts.items() if k[0] in ovss_protocols})
    return SynonymEval(region, ov["confusion"], np.asarray(class_splits(categories)),
                       np.asarray([bool(_get(c, "isthing", True)) for c in categories]), cons,
                       len(rf.category_id), rf.protocol, time.perf_counter() - t)

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ovlib.models.text import MICRO_TEMPLATES, class_name_sets, text_embeddings
from ovlib.eval._common import dataset_indices, student_image
from ovlib.eval.region_cls import region_masks_at_grid, score_regions
from ovlib.eval.segmentation import OVSSConfig, evaluate_ovss

__all__ = [
    "EXTRA_PROTOCOLS",
    "PROTOCOLS",
    "SEEDED",
    "class_ids",
    "class_splits",
    "drop_table",
    "format_drop_table",
    "ovss_synonym_robustness",
    "per_class_accuracy",
    "protocol_names",
    "protocol_runs",
    "protocol_text_embeddings",
    "region_synonym_robustness",
    "synonym_attention_consistency",
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
    :func:`protocol_text_embeddings` (then ``protocols``/``seeds``/``templates`` are not used). Returns ``{"per_class": {(protocol, seed): (C,) IoU},
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
        class_text = {}
        for c in categories:
            if not bool(_get(c, "isthing", True)):
                continue
            name = _get(c, "name")
            names = [name] + [x for x in (_get(c, "synonyms") or []) if x and x != name]
            class_text[int(_get(c, "id"))] = text_embeddings(model, tokenizer, names, templates, device=device).cpu()
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

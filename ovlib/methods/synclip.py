"""SynCLIP: synonym-coherent distillation (CVPR'26) = DeCLIP + SSA + SAR.

On top of DeCLIP's content and context losses (:mod:`ovlib.methods.declip`, mode ``csa``), SynCLIP adds a
**semantic** loss (``Justlovesmile/SynCLIP:src/training/synclip.py`` ``get_semantic_similarity_loss``,
``reference/implementations.md`` §4.4):

* texts per image (from its GT category ids, at most ``max_semantic``): the **label** text = the raw class name,
  and the **semantic** text ``"{label}, {definition}, {syn_1}, {syn_2}, ..."`` (SynCLIP's ``--semantic-type
  semantic``; :meth:`ovlib.data.synonyms.SynonymCorpus.semantic_text`), both embedded by the frozen teacher's
  text tower (no grad) and L2-normalised. The tokenizer truncates: the micro CLIP's context is 32 tokens
  (SynCLIP's EVA tokenizer: 77), so long definitions/synonym lists are cut -- as in the code;
* "attention maps" are **cosine maps** (no softmax): ``A_label = t_label . X_s (B, T, M)`` with the student's
  L2-normalised csa dense tokens (paper: ``A_label``), ``A_sem = t_sem . X_t (B, T, M)`` with the frozen
  teacher's csa dense tokens (no scale/RoPE/residual/FFN);
* **SAR** (paper "Semantic-induced Attention Refinement"): ``K = TopK_m(A_sem, k)`` ``(B, T, k)``; the ``k`` rows
  of the VFM patch cosine matrix ``S_vfm (B, M, M)`` at those tokens are averaged, ``A_spa (B, T, M)``;
  ``A_agg = spa_ratio * A_spa + sem_ratio * A_sem`` (paper: ``alpha A_spa + beta A_sem``, 0.5/0.5; scripts
  ``--spa-ratio 0.3 --sem-ratio 0.7``, k = 7);
* **SSA** loss between ``A_label`` and the target ``A_agg`` over the valid (non-padded) texts:
  ``huber_kl`` (code default and scripts): ``sum Huber_0.1(A_label, A_agg) / n_valid + 0.1 * KL``, with
  ``KL = sum_valid sum_m p (log p - log q) / n_valid``, ``p = softmax_m(A_label)``, ``q = softmax_m(A_agg)``
  (``F.kl_div(q.log(), p)`` = KL(p || q)); ``l2`` (code option ``l2``):
  ``sum_valid ||A_label - A_agg||_2 / n_valid`` (row norm over tokens, not squared); ``mae`` (the paper's
  text, ``L+_semantic = 1/(nm) sum_ij ||A_label^ij - A_agg^ij||_2``: the norm of a scalar entry is its absolute
  value, so this is the mean absolute error over the ``n`` valid texts and the ``m`` tokens).

Readings (``reading=``): ``"code"`` (default) = ``huber_kl``, spa 0.3, sem 0.7, k 7; ``"paper"`` = ``mae``,
0.5/0.5, k 7. The loss *weights* live in the recipe: code 1.0/0.25/0.1 (content/context/semantic, B/16),
paper semantic 0.05 (:data:`PAPER_SEMANTIC_WEIGHT`). Regions are GT boxes and the texts come from GT image labels,
as the code
(``regions: gt_boxes``).

Deviations (documented): the code shuffles an image's labels before truncating to ``max_semantic``; we keep
them in the batch's (sorted) order. An image without any label gets no text (the code substitutes
"object"/"background" entries of its corpus); it is counted in :attr:`SynCLIP.images_without_text`. The text
embeddings of every class are computed once and cached (the text tower is frozen, so this is exact). The
student's SSA map reuses the content/context forward (same csa last block), one student pass instead of two.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ovlib.data.synonyms import SynonymCorpus
from ovlib.methods.declip import DeCLIP, DeCLIPOptions
from ovlib.models import dense_features

__all__ = [
    "PAPER_SEMANTIC_WEIGHT",
    "READINGS",
    "SEMANTIC_TYPES",
    "SEM_LOSSES",
    "SynCLIP",
    "cosine_maps",
    "huber_kl_loss",
    "l2_row_loss",
    "mae_loss",
    "sar_aggregate",
    "semantic_loss",
    "semantic_texts",
    "synonyms_that_fit",
    "teacher_text_coverage",
]

log = logging.getLogger(__name__)

SEM_LOSSES = ("huber_kl", "l2", "mae")
SEMANTIC_TYPES = ("semantic", "label", "definition", "synonym")
READINGS: dict[str, dict[str, Any]] = {
    "code": {"sem_loss": "huber_kl", "topk": 7, "spa_ratio": 0.3, "sem_ratio": 0.7},
    "paper": {"sem_loss": "mae", "topk": 7, "spa_ratio": 0.5, "sem_ratio": 0.5},
}
#: The paper's weight of ``L+_semantic`` ("default weight 0.05", §3); the B/16 script uses 0.1 (recipe).
PAPER_SEMANTIC_WEIGHT = 0.05


def semantic_texts(categories: list[Mapping], corpus: SynonymCorpus | None = None,
                   exclude_heldout: bool = False, semantic_type: str = "semantic") -> dict[int, tuple[str, str]]:
    """``{category id: (label text, semantic text)}``: the raw name and ``"name, definition, syn_1, ..."``.

    ``semantic_type`` (SynCLIP's ``--semantic-type``, ``Justlovesmile/SynCLIP:src/training/data.py``) chooses
    the teacher-side text: ``"semantic"`` (default, the scripts) ``"name, definition, syn_1, ..."``;
    ``"label"`` the name itself (no synonym enrichment: SAR on top of label-to-label alignment, the chapter's
    "SAR only" ablation); ``"definition"`` the definition; ``"synonym"`` the synonyms joined by ``", "``. An
    empty definition/synonym text falls back to the name.

    Synonyms/definition come from the category dict (micro world) or else from ``corpus`` (e.g. the WordNet
    corpus for COCO names); a class found in neither has the semantic text = its name (logged).
    ``exclude_heldout`` drops the ``heldout_synonyms`` (micro world) from the text, so that an evaluation with
    held-out synonyms measures synonyms never seen in training (SynCLIP itself trains and evaluates with
    the same SEViC synonyms: default False).
    """
    entries, missing = {}, []
    for c in categories:
        name = c["name"]
        if c.get("synonyms") is not None or c.get("definition") is not None:
            held = set(c.get("heldout_synonyms") or []) if exclude_heldout else set()
            syn = [x for x in (c.get("synonyms") or []) if x not in held]
            entries[name] = {"synonyms": syn, "definition": c.get("definition") or ""}
        elif corpus is not None and name in corpus:
            held = set(corpus[name].get("heldout_synonyms") or []) if exclude_heldout else set()
            syn = [x for x in corpus.synonyms(name) if x not in held]
            entries[name] = {"synonyms": syn, "definition": corpus.definition(name)}
        else:
            entries[name] = {"synonyms": [], "definition": ""}
            missing.append(name)
    if missing:
        log.warning("SynCLIP: %d class(es) have no synonyms/definition; their semantic text is the name: %s",
                    len(missing), missing[:10])
    if semantic_type not in SEMANTIC_TYPES:
        raise ValueError(f"semantic_type must be one of {SEMANTIC_TYPES}, got {semantic_type!r}")
    sc = SynonymCorpus(entries)

    def teacher_text(name: str) -> str:
        if semantic_type == "semantic":
            return sc.semantic_text(name)
        if semantic_type == "definition":
            return sc.definition(name).rstrip(".") or name
        if semantic_type == "synonym":
            return ", ".join(sc.synonyms(name)) or name
        return name

    return {int(c["id"]): (c["name"], teacher_text(c["name"])) for c in categories}


def synonyms_that_fit(tokenizer: Any, category: Mapping, context: int) -> int:
    """How many of ``category``'s synonyms survive when SynCLIP's teacher text ``"name, definition, syn_1, …"``
    is cut to the text tower's ``context`` (start and end tokens included); -1 when even ``"name, definition"``
    is cut. ``tokenizer.encode(text) -> token ids`` without start / end tokens (open_clip's and the micro CLIP's)."""
    syn = list(category.get("synonyms") or [])
    head = ", ".join(p for p in [category["name"], (category.get("definition") or "").rstrip(".")] if p)
    fit = -1
    for j in range(len(syn) + 1):
        if len(tokenizer.encode(", ".join([head] + syn[:j]))) <= context - 2:
            fit = j
    return fit


def teacher_text_coverage(tokenizer: Any, categories: list[Mapping], context: int) -> dict[str, int]:
    """What of the synonyms reaches the teacher's text tower (:func:`synonyms_that_fit` per class): synonyms in
    all and kept, classes that lose part of the definition or keep no synonym, held-out synonyms in all and
    kept (the micro world's ``heldout_synonyms``)."""
    fits = [synonyms_that_fit(tokenizer, c, context) for c in categories]
    kept = [max(f, 0) for f in fits]
    return {"synonyms": sum(len(c.get("synonyms") or []) for c in categories), "kept": sum(kept),
            "cut_definition": sum(f < 0 for f in fits), "no_synonym": sum(f == 0 for f in fits),
            "classes": len(categories),
            "heldout": sum(len(c.get("heldout_synonyms") or []) for c in categories),
            "heldout_kept": sum(len(set(c.get("heldout_synonyms") or []) & set((c.get("synonyms") or [])[:k]))
                                for c, k in zip(categories, kept))}


def cosine_maps(text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``text (B, T, D)``, ``tokens (B, M, D)`` (both unit norm) -> ``(B, T, M)`` cosine maps (SynCLIP's
    ``einsum('bnd,bmd->bnm')``; no softmax)."""
    if text.ndim != 3 or tokens.ndim != 3 or text.shape[0] != tokens.shape[0] or text.shape[2] != tokens.shape[2]:
        raise ValueError(f"text must be (B, T, D) and tokens (B, M, D); got {tuple(text.shape)}, {tuple(tokens.shape)}")
    return torch.einsum("btd,bmd->btm", text, tokens)


def sar_aggregate(a_sem: torch.Tensor, vfm_sim: torch.Tensor, topk: int = 7, spa_ratio: float = 0.3,
                  sem_ratio: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """SAR: ``A_agg = spa_ratio * A_spa + sem_ratio * A_sem`` and ``A_spa`` (paper §3, "SAR").

    ``a_sem (B, T, M)``, ``vfm_sim (B, M, M)``; ``A_spa[b, t] = mean_{j in TopK(A_sem[b, t], k)} vfm_sim[b, j]``
    (``Justlovesmile/SynCLIP:src/training/synclip.py`` ``get_semantic_similarity_loss``, ``--use-topk``).
    """
    if a_sem.ndim != 3 or vfm_sim.ndim != 3 or vfm_sim.shape[1:] != (a_sem.shape[2], a_sem.shape[2]) \
            or vfm_sim.shape[0] != a_sem.shape[0]:
        raise ValueError(f"a_sem must be (B, T, M) and vfm_sim (B, M, M); got {tuple(a_sem.shape)}, "
                         f"{tuple(vfm_sim.shape)}")
    M = a_sem.shape[2]
    if not 1 <= topk <= M:
        raise ValueError(f"topk must be in [1, M={M}], got {topk}")
    idx = a_sem.topk(topk, dim=-1).indices  # (B, T, k)
    B = a_sem.shape[0]
    rows = vfm_sim[torch.arange(B, device=idx.device)[:, None, None], idx]  # (B, T, k, M)
    a_spa = rows.mean(dim=2)  # (B, T, M)
    return spa_ratio * a_spa + sem_ratio * a_sem, a_spa


def _check_maps(student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
    if student.ndim != 3 or student.shape != target.shape:
        raise ValueError(f"maps must both be (B, T, M); got {tuple(student.shape)} and {tuple(target.shape)}")
    if valid.shape != student.shape[:2]:
        raise ValueError(f"valid must be (B, T) = {tuple(student.shape[:2])}, got {tuple(valid.shape)}")


def huber_kl_loss(student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, delta: float = 0.1,
                  kl_weight: float = 0.1) -> torch.Tensor:
    """SynCLIP's ``huber_kl`` (code default): ``sum_{valid, m} Huber_delta(student, target) / n_valid
    + kl_weight * sum_valid KL(softmax_m student || softmax_m target) / n_valid``.

    ``student, target (B, T, M)`` maps, ``valid (B, T)`` bool. ``Huber_d(x) = x^2 / 2`` for ``|x| < d`` else
    ``d (|x| - d / 2)`` (``F.huber_loss``). 0 when no text is valid.
    """
    _check_maps(student, target, valid)
    s, t = student.float()[valid], target.float()[valid]  # (V, M)
    n = s.shape[0]
    if n == 0:
        return student.sum() * 0.0
    hb = F.huber_loss(s, t, reduction="sum", delta=delta) / n
    logp, logq = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum() / n
    return hb + kl_weight * kl


def l2_row_loss(student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SynCLIP's ``l2`` option (the paper's ``L+_semantic``): ``sum_valid ||student_t - target_t||_2 / n_valid``,
    the L2 norm over the ``M`` tokens of each valid text row (not squared). 0 when no text is valid."""
    _check_maps(student, target, valid)
    s, t = student.float()[valid], target.float()[valid]  # (V, M)
    if s.shape[0] == 0:
        return student.sum() * 0.0
    return torch.linalg.vector_norm(s - t, dim=-1).sum() / s.shape[0]


def mae_loss(student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The paper's ``L+_semantic = 1/(nm) sum_{i,j} ||A_label^{ij} - A_agg^{ij}||_2`` (§3, SSA/SAR): the mean
    absolute error over the ``n`` valid text rows and the ``m`` tokens, ``sum_valid sum_m |student - target|
    / (n_valid * M)``. Unlike the code's ``l2`` (row norms / ``n``), every entry weighs ``1 / (nm)`` and the
    gradient of an entry is ``sign(diff) / (nm)`` whatever the size of the rest of its row. 0 when no text is
    valid."""
    _check_maps(student, target, valid)
    s, t = student.float()[valid], target.float()[valid]  # (V, M)
    if s.shape[0] == 0:
        return student.sum() * 0.0
    return (s - t).abs().sum() / (s.shape[0] * s.shape[1])


def semantic_loss(student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                  kind: str = "huber_kl") -> torch.Tensor:
    """Dispatch to :func:`huber_kl_loss`, :func:`l2_row_loss` (``--sem-loss``) or :func:`mae_loss` (the
    paper's text)."""
    if kind == "huber_kl":
        return huber_kl_loss(student, target, valid)
    if kind == "l2":
        return l2_row_loss(student, target, valid)
    if kind == "mae":
        return mae_loss(student, target, valid)
    raise ValueError(f"sem_loss must be one of {SEM_LOSSES}, got {kind!r}")


@dataclass(frozen=True)
class SynCLIPOptions:
    """SynCLIP's own options (besides DeCLIP's ``mode``/``scale``): the reading of the public code, the semantic
    loss, SAR's top-k and ratios, the synonym corpus and the teacher text (see :class:`SynCLIP`)."""

    reading: str = "code"
    sem_loss: str | None = None
    topk: int | None = None
    spa_ratio: float | None = None
    sem_ratio: float | None = None
    sar: bool = True
    max_semantic: int = 20
    synonym_corpus: Any = None
    exclude_heldout: bool = False
    semantic_type: str = "semantic"


class SynCLIP(DeCLIP):
    """DeCLIP (csa) + SSA + SAR; loss terms ``content``, ``context``, ``semantic`` (unweighted).

    Options (``method_args``): ``reading`` ``"code"`` | ``"paper"`` (presets of the four below); ``sem_loss``
    ``"huber_kl"`` | ``"l2"`` | ``"mae"``; ``topk`` (7); ``spa_ratio`` / ``sem_ratio`` (code 0.3 / 0.7, paper
    0.5 / 0.5);
    ``sar`` (True; False = SSA only, the target is ``A_sem``); ``semantic_type`` (``"semantic"``; ``"label"``
    = no synonym-enriched text: with ``sar`` the chapter's "SAR only" ablation, see :func:`semantic_texts`);
    ``max_semantic`` (20 texts per image);
    ``mode`` (``"csa"``), ``scale`` (False); ``synonym_corpus`` (a :class:`SynonymCorpus` or a JSON path, for
    classes whose category dict has no synonyms, e.g. the WordNet corpus of COCO names); ``exclude_heldout``
    (False; True keeps the micro world's held-out synonyms out of the semantic texts). Batch keys: DeCLIP's
    plus ``image_labels``. The SSA student map uses the same last block as ``mode`` (csa, as ``--sem-mode csa``).
    """

    name = "synclip"
    loss_names = ("content", "context", "semantic")
    needs = frozenset({"teacher", "vfm"})

    option_types = (DeCLIPOptions, SynCLIPOptions)

    def __init__(self, student, frozen, mode: str = "csa", scale: bool = False, reading: str = "code",
                 sem_loss: str | None = None, topk: int | None = None, spa_ratio: float | None = None,
                 sem_ratio: float | None = None, sar: bool = True, max_semantic: int = 20,
                 synonym_corpus: Any = None, exclude_heldout: bool = False, semantic_type: str = "semantic",
                 **options: Any):
        super().__init__(student, frozen, mode=mode, scale=scale, **options)
        if reading not in READINGS:
            raise ValueError(f"{self.name}: reading must be one of {sorted(READINGS)}, got {reading!r}")
        preset = READINGS[reading]
        self.reading = reading
        self.sem_loss = preset["sem_loss"] if sem_loss is None else sem_loss
        if self.sem_loss not in SEM_LOSSES:
            raise ValueError(f"{self.name}: sem_loss must be one of {SEM_LOSSES}, got {self.sem_loss!r}")
        self.topk = int(preset["topk"] if topk is None else topk)
        self.spa_ratio = float(preset["spa_ratio"] if spa_ratio is None else spa_ratio)
        self.sem_ratio = float(preset["sem_ratio"] if sem_ratio is None else sem_ratio)
        self.sar = bool(sar)
        if max_semantic < 1:
            raise ValueError(f"{self.name}: max_semantic must be >= 1, got {max_semantic}")
        self.max_semantic = int(max_semantic)
        if self.tokenizer is None:
            raise ValueError(f"{self.name} needs the tokenizer of the frozen text tower (tokenizer=...)")
        if not self.categories:
            raise ValueError(f"{self.name} needs the dataset categories (id, name, synonyms, definition)")
        if isinstance(synonym_corpus, (str, bytes)) or hasattr(synonym_corpus, "__fspath__"):
            synonym_corpus = SynonymCorpus.from_json(synonym_corpus)
        if semantic_type not in SEMANTIC_TYPES:
            raise ValueError(f"{self.name}: semantic_type must be one of {SEMANTIC_TYPES}, got {semantic_type!r}")
        self.semantic_type = semantic_type
        self.texts = semantic_texts(self.categories, synonym_corpus, exclude_heldout,
                                    semantic_type)  # {id: (label, teacher-side text)}
        self._ids = sorted(self.texts)
        self._row = {c: i for i, c in enumerate(self._ids)}
        self._text_cache: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None
        self.images_without_text = 0
        self.unknown_labels = 0

    @torch.no_grad()
    def class_text_features(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm teacher text embeddings ``(C, D)`` of every class's label text and semantic text (cached)."""
        if self._text_cache is None or self._text_cache[0] != device:
            teacher = self.frozen["teacher"]
            feats = []
            with torch.autocast(device.type, enabled=False):  # cached once: full precision
                for which in (0, 1):
                    tok = self.tokenizer([self.texts[c][which] for c in self._ids]).to(device)
                    feats.append(F.normalize(teacher.encode_text(tok).float(), dim=-1))  # (C, D)
            self._text_cache = (device, feats[0], feats[1])
        return self._text_cache[1], self._text_cache[2]

    def batch_texts(self, image_labels: list[torch.Tensor], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded per-image text features: label ``(B, T, D)``, semantic ``(B, T, D)``, ``valid (B, T)``."""
        lab, sem = self.class_text_features(device)
        rows: list[list[int]] = []
        for labels in image_labels:
            seen: list[int] = []
            for c in torch.as_tensor(labels).reshape(-1).tolist():
                if c in self._row:
                    if self._row[c] not in seen:
                        seen.append(self._row[c])
                else:
                    self.unknown_labels += 1
                    log.warning("SynCLIP: image label %s is not a known category (skipped; %d so far)", c,
                                self.unknown_labels)
            if not seen:
                self.images_without_text += 1
            rows.append(seen[: self.max_semantic])
        B, T, D = len(rows), max(1, max(len(r) for r in rows)), lab.shape[1]
        t_lab, t_sem = lab.new_zeros(B, T, D), sem.new_zeros(B, T, D)
        valid = torch.zeros(B, T, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            if r:
                i = torch.tensor(r, device=device)
                t_lab[b, : len(r)], t_sem[b, : len(r)], valid[b, : len(r)] = lab[i], sem[i], True
        return t_lab, t_sem, valid

    def semantic_maps(self, batch: dict[str, Any], dense: torch.Tensor, vfm_sim: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A_label, target, valid)``: student label maps, SAR-refined teacher maps ``(B, T, M)``, ``(B, T)``."""
        images = batch["images"]
        t_lab, t_sem, valid = self.batch_texts(batch["image_labels"], images.device)
        s_tok = F.normalize(dense.float().flatten(2).transpose(1, 2), dim=-1)  # (B, M, C) student csa tokens
        a_label = cosine_maps(t_lab, s_tok)  # (B, T, M)
        with torch.no_grad():
            teacher = self.frozen["teacher"]
            t_dense = self.frozen_call(
                "clip.dense:csa:normalized:noscale:noresidual:noffn:norope", teacher,
                lambda x: dense_features(teacher, x, "csa", normalize=True, scale=False, residual=False, ffn=False,
                                         rope=False), images)  # (B, C, h, w), cached per image
            t_tok = t_dense.float().flatten(2).transpose(1, 2)  # (B, M, C)
            a_sem = cosine_maps(t_sem, t_tok)  # (B, T, M)
            if self.sar:
                if vfm_sim.shape[-1] != a_sem.shape[-1]:
                    raise ValueError(f"SAR needs the VFM grid to equal the student grid: {vfm_sim.shape[-1]} VFM "
                                     f"tokens vs {a_sem.shape[-1]} student tokens (set vfm_size = grid * vfm patch)")
                target, _ = sar_aggregate(a_sem, vfm_sim.float(), self.topk, self.spa_ratio, self.sem_ratio)
            else:
                target = a_sem
            target = target * valid[..., None]  # invalid (padded) rows zero-filled
        a_label = a_label * valid[..., None]
        return a_label, target, valid

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        for k in ("vfm_images", "image_labels"):
            if k not in batch:
                raise KeyError(f"{self.name} needs batch[{k!r}]")
        dense, qkv = self.student_dense(batch["images"])
        vfm_sim, vfm_grid = self.vfm_similarity(batch["vfm_images"])
        out = self.losses(batch, dense, qkv, vfm_sim, vfm_grid)
        a_label, target, valid = self.semantic_maps(batch, dense, vfm_sim)
        out["semantic"] = semantic_loss(a_label, target, valid, self.sem_loss)
        return out

"""Weak labels from captions: noun phrases -> exclusion filter -> category ids (SynSeg, paper 002, App. A).

SynSeg trains on image-caption pairs only: the categories of an image are the noun phrases of its caption,
extracted with spaCy (Stage 1: noun chunks holding at least one ``NOUN`` token), minus overly generic or
non-referential phrases (Stage 2: "a phrase is retained only if it contains no substring from" a manual
exclusion list ``E``). We add the step the paper does not need (it embeds the phrases themselves) but a
closed-vocabulary evaluation does: each kept phrase is **mapped to the vocabulary** (main names, synonyms and
their plurals -> category id); unmatched phrases are dropped and counted.

Two extractors of noun phrases, one interface (``caption -> list[str]``):

* :func:`template_noun_chunks` -- deterministic, no dependency: splits a caption at punctuation, coordinating
  conjunctions, prepositions, auxiliaries and expletives (:data:`BOUNDARY_WORDS`); every maximal run of the
  remaining words is one chunk. Exact on the micro world's template captions
  (``ovlib.data.microworld``: ``"a photo of a red car and two boats on the water."`` -> ``["a photo",
  "a red car", "two boats", "the water"]``); a rough approximation on free text.
* :func:`spacy_noun_chunks` -- the paper's extractor for real captions (spaCy ``doc.noun_chunks`` with a
  ``NOUN`` token); needs ``pip install spacy`` and a model (``python -m spacy download en_core_web_sm``),
  otherwise a :class:`SpacyUnavailable` error says exactly that.

Mapping a phrase (:meth:`NounVocabulary.lookup`): lower-case, strip leading determiners and quantifiers
(:data:`DETERMINERS`), then take the **longest suffix** of the remaining words that is a vocabulary surface
form (English noun phrases are head-final: ``"red snow sled"`` -> ``"snow sled"`` (sled), not ``"sled"``; a
compound synonym such as ``"beach umbrella"`` wins over the shorter ``"umbrella"`` and never yields ``"beach"``).

Exclusion matching (:func:`filter_phrases`): ``match="substring"`` is the paper's partial string matching;
``match="word"`` (our default) matches whole words only, so ``"back"`` does not drop ``"paperback"`` nor
``"right"`` drop ``"bright"``. :func:`excluded_vocabulary` lists the surface forms an exclusion list would kill.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ovlib.data.coco import CocoCaptions
from ovlib.data.regions import to_chw_float
from ovlib.data.synonyms import normalize_class_name

__all__ = [
    "BOUNDARY_WORDS",
    "DEFAULT_EXCLUSIONS",
    "DETERMINERS",
    "EXTRACTORS",
    "CaptionLabelDataset",
    "CaptionLabeler",
    "NounVocabulary",
    "SpacyUnavailable",
    "collate_caption_labels",
    "excluded_vocabulary",
    "filter_phrases",
    "plural",
    "spacy_noun_chunks",
    "template_noun_chunks",
]

#: Words that end a noun chunk in the template extractor: coordinating conjunctions, prepositions,
#: auxiliaries/copulas, the template verb "showing", expletives and pronouns. None may occur inside a
#: vocabulary surface form (checked by :meth:`NounVocabulary.check_boundaries`).
BOUNDARY_WORDS = frozenset(["and", "or", "but", "nor", "of", "with", "without", "on", "in", "at", "against", "near",
                            "by", "under", "over", "above", "below", "beside", "behind", "between", "among", "into",
                            "onto", "from", "to", "for", "about", "along", "across", "through", "toward", "towards",
                            "around", "inside", "outside", "next", "up", "down", "off", "is", "are", "was", "were",
                            "be", "been", "being", "am", "has", "have", "had", "do", "does", "did", "showing", "shows",
                            "show", "there", "here", "it", "this", "that", "these", "those", "which", "who", "what",
                            "where", "while"])

#: Leading words stripped from a phrase before the vocabulary lookup (articles, quantifiers, numbers).
DETERMINERS = frozenset(["a", "an", "the", "some", "any", "each", "every", "no", "one", "two", "three", "four", "five",
                         "six", "seven", "eight", "nine", "ten", "several", "many", "few", "much", "more", "most",
                         "other", "another", "its", "their", "his", "her", "my", "our", "your", "lots", "lot"])

#: Default exclusion list (paper App. A2: generic / non-referential phrases such as "reflection",
#: "southwest", "background"; §IV-A: direction and unit nouns), plus the frame nouns of caption templates
#: ("a photo of ...", "an image showing ..."). Checked against the micro-world vocabulary in the tests.
DEFAULT_EXCLUSIONS: tuple[str, ...] = (
    "photo", "photograph", "picture", "image", "scene", "view", "shot", "background", "foreground",
    "reflection", "close-up", "closeup",
    "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest",
    "left", "right", "top", "bottom", "front", "back", "side", "middle", "center", "centre", "corner",
    "inch", "inches", "foot", "feet", "cm", "mm", "meter", "meters", "metre", "metres", "km", "mile", "miles",
    "kg", "pound", "pounds", "percent", "degree", "degrees",
)

EXTRACTORS = ("template", "spacy")


class SpacyUnavailable(ImportError):
    """spaCy or its English model is not installed (the spaCy extractor is for real captions only)."""


# ----------------------------------------------------------------------------------------------- words
def plural(name: str) -> str:
    """English plural of the last word of ``name`` (the micro world's rule: -fish/sheep/deer unchanged,
    -man -> -men, -s/x/z/ch/sh -> +es, consonant+y -> -ies, else +s)."""
    words = name.split(" ")
    w = words[-1]
    if w.endswith("fish") or w in ("sheep", "deer"):
        p = w
    elif w.endswith("man"):
        p = w[:-3] + "men"
    elif re.search(r"(s|x|z|ch|sh)$", w):
        p = w + "es"
    elif re.search(r"[^aeiou]y$", w):
        p = w[:-1] + "ies"
    else:
        p = w + "s"
    return " ".join(words[:-1] + [p])


_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def template_noun_chunks(caption: str) -> list[str]:
    """Noun chunks of a template caption: maximal runs of words between :data:`BOUNDARY_WORDS` and
    punctuation, in order, lower-cased (``"a picture of a rug and a purple bucket."`` ->
    ``["a picture", "a rug", "a purple bucket"]``)."""
    chunks, cur = [], []
    for tok in _tokens(caption):
        if tok in BOUNDARY_WORDS or not re.match(r"[a-z0-9]", tok):
            if cur:
                chunks.append(" ".join(cur))
            cur = []
        else:
            cur.append(tok)
    if cur:
        chunks.append(" ".join(cur))
    return chunks


@functools.lru_cache(maxsize=2)
def _spacy_model(model: str):
    try:
        import spacy
    except ImportError as e:
        raise SpacyUnavailable(
            "the spaCy noun-phrase extractor needs spaCy: pip install spacy && python -m spacy download "
            f"{model} (or use extractor='template', exact on the micro world's captions)") from e
    try:
        return spacy.load(model, disable=["ner", "lemmatizer"])
    except OSError as e:
        raise SpacyUnavailable(
            f"spaCy is installed but its model {model!r} is not: python -m spacy download {model} "
            "(or pass another installed model name)") from e


def spacy_noun_chunks(caption: str, model: str = "en_core_web_sm", nlp: Any = None) -> list[str]:
    """The paper's Stage 1 (App. A1): spaCy ``doc.noun_chunks`` that hold at least one token with
    ``pos_ == "NOUN"``, lower-cased. ``nlp`` (a loaded pipeline) overrides ``model``."""
    nlp = nlp if nlp is not None else _spacy_model(model)
    doc = nlp(caption)
    return [c.text.lower().strip() for c in doc.noun_chunks if any(t.pos_ == "NOUN" for t in c)]


def _contains(phrase: str, term: str, match: str) -> bool:
    if match == "substring":
        return term in phrase
    return re.search(r"(?<![a-z0-9])" + re.escape(term) + r"(?![a-z0-9])", phrase) is not None


def filter_phrases(phrases: Iterable[str], exclusions: Sequence[str] = DEFAULT_EXCLUSIONS,
                   match: str = "word") -> list[str]:
    """The paper's Stage 2 (App. A2): keep a phrase only if it contains no term of ``exclusions``.
    ``match="substring"``: partial string matching (the paper); ``"word"``: whole words only."""
    if match not in ("word", "substring"):
        raise ValueError(f"match must be 'word' or 'substring', got {match!r}")
    ex = [e.lower() for e in exclusions]
    return [p for p in phrases if not any(_contains(p.lower(), e, match) for e in ex)]


def excluded_vocabulary(surfaces: Iterable[str], exclusions: Sequence[str] = DEFAULT_EXCLUSIONS,
                        match: str = "word") -> list[str]:
    """Vocabulary surface forms that ``exclusions`` would drop (should be empty for a usable list)."""
    surfaces = list(surfaces)
    kept = set(filter_phrases(surfaces, exclusions, match))
    return sorted(s for s in surfaces if s not in kept)


def _get(c: Any, key: str, default: Any = None) -> Any:
    return c.get(key, default) if isinstance(c, dict) else getattr(c, key, default)


# ----------------------------------------------------------------------------------------------- vocabulary
class NounVocabulary:
    """Surface form -> category id over ``categories`` (COCO-style dicts or ``ClassInfo``: ``id``, ``name``,
    optional ``synonyms`` / ``heldout_synonyms``), with plurals; ``extra`` adds ``{surface: id}`` entries.

    ``_`` in names becomes a space. A COCO panoptic name also gets its caption form
    (:func:`ovlib.data.synonyms.normalize_class_name`: ``"wall-other-merged"`` -> ``"wall"``, ``"floor-wood"`` ->
    ``"floor wood"``): a caption says "a wall", never "a wall-other-merged", so without it real captions would
    never label COCO's stuff classes. A surface form claimed by two categories is an error naming both.
    """

    def __init__(self, categories: Sequence[Any], use_synonyms: bool = True, extra: dict | None = None):
        self.surface: dict[str, int] = {}
        self.names: dict[int, str] = {}
        for c in categories:
            cid, name = int(_get(c, "id")), str(_get(c, "name")).replace("_", " ").lower().strip()
            self.names[cid] = name
            forms = list(dict.fromkeys([name, normalize_class_name(name)]))
            if use_synonyms:
                forms += [s.lower().strip() for s in (_get(c, "synonyms") or []) + (_get(c, "heldout_synonyms") or [])]
            for f in forms:
                for s in (f, plural(f)):
                    self._add(s, cid)
        for s, cid in (extra or {}).items():
            self._add(s.lower().strip(), int(cid))
        self.max_words = max((len(s.split()) for s in self.surface), default=0)

    def _add(self, s: str, cid: int) -> None:
        if not s:
            return
        old = self.surface.get(s)
        if old is not None and old != cid:
            raise ValueError(f"surface form {s!r} names two categories: {old} and {cid}")
        self.surface[s] = cid

    def check_boundaries(self, boundary: Iterable[str] = BOUNDARY_WORDS) -> list[str]:
        """Surface forms holding a boundary word of the template extractor (should be empty)."""
        b = set(boundary)
        return sorted(s for s in self.surface if set(s.split()) & b)

    def strip(self, phrase: str) -> list[str]:
        """Words of ``phrase`` without leading :data:`DETERMINERS`."""
        words = [w for w in _tokens(phrase) if re.match(r"[a-z0-9]", w)]
        while words and words[0] in DETERMINERS:
            words = words[1:]
        return words

    def lookup(self, phrase: str) -> tuple[int, str] | None:
        """``(category id, matched surface form)`` of the longest vocabulary suffix of ``phrase``, or None."""
        words = self.strip(phrase)
        for start in range(max(0, len(words) - self.max_words), len(words)):
            s = " ".join(words[start:])
            if s in self.surface:
                return self.surface[s], s
        return None


class CaptionLabeler:
    """Caption -> noun phrases (``extractor``) -> exclusion filter -> category ids (sorted, unique).

    Counts what it drops (:attr:`stats`: ``phrases``, ``excluded``, ``unmatched`` and the ``unmatched_phrases``
    counter) so a chapter can show how much of the text the vocabulary covers.
    """

    def __init__(self, categories: Sequence[Any], extractor: str = "template",
                 exclusions: Sequence[str] = DEFAULT_EXCLUSIONS, match: str = "word", use_synonyms: bool = True,
                 spacy_model: str = "en_core_web_sm", extra: dict | None = None):
        if extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
        self.vocab = NounVocabulary(categories, use_synonyms, extra)
        self.extractor, self.exclusions, self.match = extractor, tuple(exclusions), match
        self.spacy_model = spacy_model
        if extractor == "spacy":
            _spacy_model(spacy_model)  # fail now, with the install hint
        self.stats: Counter = Counter()
        self.unmatched_phrases: Counter = Counter()

    def chunks(self, caption: str) -> list[str]:
        if self.extractor == "spacy":
            return spacy_noun_chunks(caption, self.spacy_model)
        return template_noun_chunks(caption)

    def phrases(self, caption: str) -> list[tuple[str, int | None, str | None]]:
        """Every kept phrase with its ``(category id, surface)`` or ``(None, None)`` when unmatched."""
        chunks = self.chunks(caption)
        kept = filter_phrases(chunks, self.exclusions, self.match)
        self.stats["phrases"] += len(chunks)
        self.stats["excluded"] += len(chunks) - len(kept)
        out = []
        for p in kept:
            hit = self.vocab.lookup(p)
            if hit is None:
                self.stats["unmatched"] += 1
                self.unmatched_phrases[p] += 1
                out.append((p, None, None))
            else:
                out.append((p, hit[0], hit[1]))
        return out

    def __call__(self, captions: str | Sequence[str]) -> list[int]:
        """Sorted unique category ids named by one caption or the union over several."""
        caps = [captions] if isinstance(captions, str) else list(captions)
        return sorted({cid for c in caps for _, cid, _ in self.phrases(c) if cid is not None})


# ----------------------------------------------------------------------------------------------- dataset
def _load_categories(root: Path, split: str) -> list[dict]:
    for name in (f"panoptic_{split}.json", f"instances_{split}.json"):
        p = root / "annotations" / name
        if p.is_file():
            cats = json.loads(p.read_text()).get("categories") or []
            if cats:
                return cats
    raise FileNotFoundError(f"no categories for {root} ({split}): need annotations/panoptic_{split}.json or "
                            f"instances_{split}.json with a 'categories' list, or pass categories=")


class CaptionLabelDataset(torch.utils.data.Dataset):
    """Images with caption-derived category ids over any COCO-format root (``captions_{split}.json``).

    Item: ``image (3, S, S)`` -- resized to ``size x size`` (squashed, as the paper resizes CC12M images to
    224 x 224) and normalised with ``mean``/``std``; ``category_ids (N,)`` long, sorted; ``captions`` (the
    ones used); ``image_id``. ``caption_pick``: ``"one"`` -- one caption per image and epoch, drawn from
    ``(seed, epoch, index)`` (a CC12M-like image-caption pair; default); ``"all"`` -- the union over the
    image's captions. Categories come from ``categories`` or the root's panoptic (else instances) file.
    No mask or box annotation is read.
    """

    def __init__(self, root: str | Path, split: str = "train2017", size: int = 224,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 categories: Sequence[Any] | None = None, labeler: CaptionLabeler | None = None,
                 caption_pick: str = "one", seed: int = 0, max_images: int = 0, **labeler_kw: Any):
        if caption_pick not in ("one", "all"):
            raise ValueError(f"caption_pick must be 'one' or 'all', got {caption_pick!r}")
        root = Path(root)
        self.caps = CocoCaptions(root, split)
        self.n = len(self.caps) if max_images <= 0 else min(max_images, len(self.caps))
        if self.n == 0:
            raise ValueError(f"no captioned image in {root} ({split}); skipped: {dict(self.caps.skipped)}")
        self.categories = list(categories) if categories is not None else _load_categories(root, split)
        self.labeler = labeler or CaptionLabeler(self.categories, **labeler_kw)
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.caption_pick, self.seed, self.epoch = caption_pick, seed, 0
        # parse every caption once (text only): labels[i][k] = ids named by caption k of image i
        self.labels = [[self.labeler(c) for c in self.caps.items[i][1]] for i in range(self.n)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def pick(self, i: int) -> list[int]:
        """Indices of the captions of image ``i`` used at the current epoch."""
        k = len(self.labels[i])
        if self.caption_pick == "all":
            return list(range(k))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return [int(torch.randint(k, (1,), generator=g))]

    def coverage(self) -> dict[str, float]:
        """Fraction of images with >= 1 category (over every caption), mean categories per caption."""
        per_img = [len(set().union(*map(set, ls))) for ls in self.labels]
        per_cap = [len(x) for ls in self.labels for x in ls]
        return {"images_with_labels": sum(n > 0 for n in per_img) / max(1, len(per_img)),
                "categories_per_caption": sum(per_cap) / max(1, len(per_cap))}

    def __getitem__(self, i: int) -> dict:
        item = self.caps[i]
        img = to_chw_float(item["image"])  # (3, H, W) in [0, 1]
        if tuple(img.shape[-2:]) != (self.size, self.size):
            img = F.interpolate(img[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                                antialias=True)[0]
        m = torch.tensor(self.mean).view(3, 1, 1)
        s = torch.tensor(self.std).view(3, 1, 1)
        ks = self.pick(i)
        ids = sorted({c for k in ks for c in self.labels[i][k]})
        return {"image": (img - m) / s, "category_ids": torch.tensor(ids, dtype=torch.long),
                "captions": [item["captions"][k] for k in ks], "image_id": int(item["image_id"])}


def collate_caption_labels(items: list[dict]) -> dict:
    """Batch: ``images (B, 3, S, S)``, ``category_ids`` list of ``(N_b,)``, ``captions`` list of lists,
    ``image_ids (B,)``."""
    return {"images": torch.stack([it["image"] for it in items]),
            "category_ids": [it["category_ids"] for it in items],
            "captions": [it["captions"] for it in items],
            "image_ids": torch.tensor([it["image_id"] for it in items])}

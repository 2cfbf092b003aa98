"""Synonym corpora: ``{name: {"synonyms": [...], "definition": "..."}}`` (SynCLIP's SEViC format).

* :func:`microworld_corpus` -- the micro world's names, synonyms (``heldout_synonyms`` kept as an extra
  key) and attribute definitions.
* :func:`build_wordnet_corpus` -- a SEViC-style corpus for COCO / LVIS class names from a local WordNet
  database (Princeton format: ``index.noun`` + ``data.noun``, as installed by Debian's ``wordnet-base``
  package (pulled in by ``wordnet``) in ``/usr/share/wordnet`` or by ``nltk.download('wordnet')`` in
  ``~/nltk_data/corpora/wordnet``).
  Nothing is downloaded: a missing database is an error that says how to install one.
  Synonyms = the lemmas of the name's first (most frequent) noun sense, then the first lemma of each
  direct hyponym (SEViC lists hyponyms such as "man", "woman" for "person"); definition = the gloss
  without its examples.
* :meth:`SynonymCorpus.semantic_text` -- SynCLIP's ``--semantic-type semantic`` string
  ``"{label}, {definition}, {syn_1}, {syn_2}, ..."`` (``Justlovesmile/SynCLIP:src/training/data.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ovlib.io import atomic_write_text

__all__ = [
    "SynonymCorpus",
    "microworld_corpus",
    "build_wordnet_corpus",
    "WordNetDB",
    "find_wordnet_dir",
    "normalize_class_name",
    "with_synonyms",
]

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install a WordNet database: `apt-get install wordnet` (its wordnet-base package puts the files in "
    "/usr/share/wordnet), or "
    "`python -c \"import nltk; nltk.download('wordnet')\"` (files in ~/nltk_data/corpora/wordnet), "
    "then pass its directory (the one holding index.noun and data.noun) or set OVBOOK_WORDNET"
)


class SynonymCorpus:
    """A validated ``{name: {"synonyms": list[str], "definition": str, ...}}`` mapping (extra keys kept)."""

    def __init__(self, entries: Mapping[str, Mapping], missing: Iterable[str] = ()):
        self._d: dict[str, dict] = {}
        for name, e in entries.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"synonym corpus: class names must be non-empty strings, got {name!r}")
            if not isinstance(e, Mapping) or "synonyms" not in e or "definition" not in e:
                raise ValueError(
                    f"synonym corpus entry {name!r} must be a mapping with 'synonyms' and 'definition'"
                )
            syn = e["synonyms"]
            if not isinstance(syn, (list, tuple)) or not all(isinstance(s, str) for s in syn):
                raise ValueError(
                    f"synonym corpus entry {name!r}: 'synonyms' must be a list of strings, got {syn!r}"
                )
            if not isinstance(e["definition"], str):
                raise ValueError(f"synonym corpus entry {name!r}: 'definition' must be a string")
            self._d[name] = {**dict(e), "synonyms": list(syn)}
        self.missing: list[str] = list(missing)

    # mapping protocol
    def __getitem__(self, name: str) -> dict:
        try:
            return self._d[name]
        except KeyError:
            raise KeyError(f"class {name!r} is not in the synonym corpus ({len(self._d)} classes)") from None

    def __contains__(self, name: object) -> bool:
        return name in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self):
        return iter(self._d)

    def items(self):
        return self._d.items()

    @property
    def names(self) -> list[str]:
        return list(self._d)

    def synonyms(self, name: str) -> list[str]:
        return list(self[name]["synonyms"])

    def definition(self, name: str) -> str:
        return self[name]["definition"]

    def semantic_text(self, name: str, max_synonyms: int | None = None) -> str:
        """``"{name}, {definition}, {syn_1}, ..."`` (empty parts left out)."""
        e = self[name]
        syn = e["synonyms"] if max_synonyms is None else e["synonyms"][:max_synonyms]
        return ", ".join([p for p in [name, e["definition"].rstrip(".")] + list(syn) if p])

    def to_dict(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self._d.items()}

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SynonymCorpus:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"synonym corpus not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"synonym corpus {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(
                f"synonym corpus {path} must hold a JSON object {{name: {{synonyms, definition}}}}"
            )
        return cls(data)


def microworld_corpus(world, include_heldout: bool = True) -> SynonymCorpus:
    """The micro world's corpus (every class, things then stuff). ``include_heldout=False`` lists only the
    synonyms that appear in captions; the held-out ones are always kept under ``heldout_synonyms``."""
    entries = {}
    for c in world.classes:
        syn = list(c.synonyms) if include_heldout else list(c.caption_synonyms)
        entries[c.name] = dict(
            synonyms=syn, definition=c.definition, heldout_synonyms=list(c.heldout_synonyms)
        )
    return SynonymCorpus(entries)


# ----------------------------------------------------------------------------------------------------------
# WordNet (Princeton database format, read directly; see wndb(5WN))
# ----------------------------------------------------------------------------------------------------------
def find_wordnet_dir() -> Path | None:
    """A local WordNet directory (holding index.noun and data.noun), or None. Looks at $OVBOOK_WORDNET,
    $WORDNET_DIR, /usr/share/wordnet, /usr/share/wordnet/dict and nltk's data paths. Never downloads."""
    cands = [
        os.environ.get("OVBOOK_WORDNET"),
        os.environ.get("WORDNET_DIR"),
        "/usr/share/wordnet",
        "/usr/share/wordnet/dict",
        "/usr/local/share/wordnet",
    ]
    for base in [
        os.environ.get("NLTK_DATA"),
        str(Path.home() / "nltk_data"),
        "/usr/share/nltk_data",
        "/usr/local/share/nltk_data",
        "/usr/lib/nltk_data",
    ]:
        if base:
            cands.append(os.path.join(base, "corpora", "wordnet"))
    for c in cands:
        if c and (Path(c) / "index.noun").is_file() and (Path(c) / "data.noun").is_file():
            return Path(c)
    return None


class WordNetDB:
    """Noun part of a WordNet database directory: ``index.noun`` (lemma -> synset offsets, most frequent
    sense first) and ``data.noun`` (one synset per line at its byte offset: lemmas, pointers, gloss)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        missing = [f for f in ("index.noun", "data.noun") if not (self.root / f).is_file()]
        if missing:
            zipped = (self.root.parent / "wordnet.zip").is_file() if self.root.name == "wordnet" else False
            extra = " (nltk left wordnet.zip unpacked? unzip it next to itself)" if zipped else ""
            raise FileNotFoundError(f"WordNet directory {self.root} lacks {missing}{extra}; {_INSTALL_HINT}")
        self._index: dict[str, list[int]] | None = None

    @property
    def index(self) -> dict[str, list[int]]:
        if self._index is None:
            idx: dict[str, list[int]] = {}
            with open(self.root / "index.noun", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.startswith("  ") or not line.strip():
                        continue  # license header lines start with two spaces
                    p = line.split()
                    try:
                        synset_cnt, p_cnt = int(p[2]), int(p[3])
                        offs = p[4 + p_cnt + 2 :]
                        if len(offs) != synset_cnt:
                            raise ValueError(f"{synset_cnt} offsets announced, {len(offs)} found")
                        idx[p[0]] = [int(o) for o in offs]
                    except (ValueError, IndexError) as e:
                        raise ValueError(
                            f"{self.root / 'index.noun'}:{lineno}: malformed index line: {e}"
                        ) from e
            self._index = idx
        return self._index

    def lookup(self, lemma: str) -> list[int]:
        """Synset offsets of a noun lemma (spaces or underscores, any case), most frequent sense first."""
        return list(self.index.get(lemma.strip().lower().replace(" ", "_"), []))

    def synset(self, offset: int) -> dict:
        """dict(offset, lemmas (spaces), gloss, definition (gloss before examples), hyponyms (offsets))."""
        with open(self.root / "data.noun", "rb") as f:
            f.seek(offset)
            line = f.readline().decode("utf-8")
        head, _, gloss = line.partition(" | ")
        p = head.split()
        try:
            if int(p[0]) != offset:
                raise ValueError(f"line at byte {offset} starts with offset {p[0]}")
            w_cnt = int(p[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", p[4 + 2 * k]).replace("_", " ") for k in range(w_cnt)]
            q = 4 + 2 * w_cnt
            p_cnt = int(p[q])
            ptrs = [p[q + 1 + 4 * k : q + 5 + 4 * k] for k in range(p_cnt)]
        except (ValueError, IndexError) as e:
            raise ValueError(
                f"{self.root / 'data.noun'}: malformed synset at byte offset {offset}: {e}"
            ) from e
        hypo = [int(pt[1]) for pt in ptrs if pt[0] in ("~", "~i") and pt[2] == "n"]
        gloss = gloss.strip()
        definition = re.split(r';\s*"', gloss)[0].strip().rstrip(";").strip()
        return dict(offset=offset, lemmas=lemmas, gloss=gloss, definition=definition, hyponyms=hypo)


def normalize_class_name(name: str) -> str:
    """COCO/LVIS class name -> a WordNet-style phrase: drop COCO panoptic suffixes (``-merged``,
    ``-other``, ``-stuff``), turn ``_`` / ``-`` / ``/`` into spaces, lower-case
    (``wall-other-merged`` -> ``wall``, ``traffic light`` -> ``traffic light``)."""
    n = name.lower().strip()
    n = re.sub(r"(-(merged|other|stuff))+$", "", n)
    n = re.sub(r"[_\-/]+", " ", n)
    return re.sub(r"\s+", " ", n).strip()


def build_wordnet_corpus(
    names: Iterable[str],
    wordnet_dir: str | os.PathLike | None = None,
    max_synonyms: int = 10,
    hyponyms: bool = True,
) -> SynonymCorpus:
    """SEViC-style corpus for ``names`` from a local WordNet database (see the module docstring).

    A name is looked up as a whole (normalised), then by its last word ("potted plant" -> "plant"); a name
    not found gets ``synonyms=[]``, ``definition=""``, is listed in ``corpus.missing`` and logged.
    """
    root = wordnet_dir if wordnet_dir is not None else find_wordnet_dir()
    if root is None:
        raise FileNotFoundError(f"no WordNet database found; {_INSTALL_HINT}")
    db = WordNetDB(root)
    entries, missing = {}, []
    for name in names:
        key = normalize_class_name(name)
        offs = db.lookup(key) or (db.lookup(key.split(" ")[-1]) if " " in key else [])
        if not offs:
            missing.append(name)
            entries[name] = dict(synonyms=[], definition="")
            continue
        ss = db.synset(offs[0])
        seen = {key, name.lower()}
        syn: list[str] = []
        for lem in ss["lemmas"] + ([db.synset(h)["lemmas"][0] for h in ss["hyponyms"]] if hyponyms else []):
            if lem.lower() not in seen and len(syn) < max_synonyms:
                syn.append(lem)
                seen.add(lem.lower())
        entries[name] = dict(synonyms=syn, definition=ss["definition"])
    if missing:
        log.warning(
            "WordNet (%s) has no noun entry for %d of %d names: %s", root, len(missing), len(entries), missing
        )
    return SynonymCorpus(entries, missing=missing)


def with_synonyms(categories: Sequence[Mapping[str, Any]], cache_dir: str | os.PathLike,
                  wordnet_dir: str | os.PathLike | None = None,
                  max_synonyms: int = 10) -> tuple[list[dict[str, Any]], Path | None]:
    """The categories with ``synonyms`` and ``definition``: unchanged when every category has synonyms (the
    micro world's), else from a WordNet corpus of their names (:func:`build_wordnet_corpus`; COCO), written to
    ``cache_dir/synonyms/wordnet.json`` (its path is returned: SynCLIP's ``synonym_corpus``; ``None`` when the
    categories carried their own). ``max_synonyms``: kept per class (:func:`build_wordnet_corpus`)."""
    cats = [dict(c) for c in categories]
    if all(c.get("synonyms") is not None for c in cats):
        return cats, None
    corpus = build_wordnet_corpus([c["name"] for c in cats], wordnet_dir, max_synonyms=max_synonyms)
    path = corpus.to_json(Path(cache_dir) / "synonyms" / "coco_wordnet.json")
    return [{**c, "synonyms": corpus.synonyms(c["name"]), "definition": corpus.definition(c["name"])}
            for c in cats], path

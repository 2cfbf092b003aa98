"""Synonym corpora: the micro world's, JSON round trip, the WordNet builder on a WordNet-format fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovlib.data.microworld import MicroWorld
from ovlib.data.synonyms import (
    SynonymCorpus,
    WordNetDB,
    build_wordnet_corpus,
    microworld_corpus,
    normalize_class_name,
)

# key: (lemmas, gloss, hyponym keys)
SYNSETS = {
    "person": (
        ["person", "individual", "someone", "mortal"],
        'a human being; "there was too much for one person to do"',
        ["man", "woman"],
    ),
    "man": (["man", "adult_male"], "an adult person who is male (as opposed to a woman)", []),
    "woman": (["woman", "adult_female"], "an adult female person (as opposed to a man)", []),
    "car": (["car", "auto", "automobile", "machine", "motorcar"], "a motor vehicle with four wheels", []),
    "railcar": (["car", "railcar", "railway_car"], "a wheeled vehicle adapted to the rails of railroad", []),
    "light": (
        ["traffic_light", "traffic_signal", "stoplight"],
        "a visual signal to control the flow of traffic",
        [],
    ),
    "plant": (
        ["plant", "flora", "plant_life"],
        "(botany) a living organism lacking the power of locomotion",
        [],
    ),
    "wall": (["wall"], "an architectural partition with a height and length greater than its thickness", []),
}
# lemma -> synset keys, most frequent sense first
INDEX = {
    "adult_female": ["woman"],
    "adult_male": ["man"],
    "auto": ["car"],
    "automobile": ["car"],
    "car": ["car", "railcar"],
    "flora": ["plant"],
    "individual": ["person"],
    "machine": ["car"],
    "man": ["man"],
    "mortal": ["person"],
    "motorcar": ["car"],
    "person": ["person"],
    "plant": ["plant"],
    "plant_life": ["plant"],
    "railcar": ["railcar"],
    "railway_car": ["railcar"],
    "someone": ["person"],
    "stoplight": ["light"],
    "traffic_light": ["light"],
    "traffic_signal": ["light"],
    "wall": ["wall"],
    "woman": ["woman"],
}


def write_wordnet_fixture(root: Path) -> Path:
    """index.noun + data.noun in the Princeton WordNet database format, with exact byte offsets."""
    root.mkdir(parents=True, exist_ok=True)
    header = "  1 This is a tiny WordNet-format fixture written by the tests.\n  2 Format: wndb(5WN).\n"
    keys = list(SYNSETS)

    def line(key: str, offs: dict[str, int]) -> str:
        lemmas, gloss, hypo = SYNSETS[key]
        words = " ".join(f"{w} 0" for w in lemmas)
        ptrs = [("@", "person" if key in ("man", "woman") else key)] if key in ("man", "woman") else []
        ptrs += [("~", h) for h in hypo]
        ptr_txt = "".join(f" {sym} {offs[t]:08d} n 0000" for sym, t in ptrs)
        return f"{offs[key]:08d} 03 n {len(lemmas):02x} {words} {len(ptrs):03d}{ptr_txt} | {gloss}  \n"

    offs = {k: 0 for k in keys}
    pos = len(header.encode())
    for k in keys:  # fixed-width offsets: line lengths do not depend on their values
        offs[k] = pos
        pos += len(line(k, offs).encode())
    (root / "data.noun").write_text(header + "".join(line(k, offs) for k in keys), encoding="utf-8")
    idx_lines = []
    for lemma in sorted(INDEX):
        syn = INDEX[lemma]
        idx_lines.append(
            f"{lemma} n {len(syn)} 1 @ {len(syn)} 0 " + " ".join(f"{offs[s]:08d}" for s in syn) + "  \n"
        )
    (root / "index.noun").write_text(header + "".join(idx_lines), encoding="utf-8")
    return root


@pytest.fixture()
def wn(tmp_path) -> Path:
    return write_wordnet_fixture(tmp_path / "wordnet")


def test_wordnet_reader(wn):
    db = WordNetDB(wn)
    assert len(db.lookup("car")) == 2 and db.lookup("Traffic Light") == db.lookup("traffic_light")
    ss = db.synset(db.lookup("person")[0])
    assert ss["lemmas"] == ["person", "individual", "someone", "mortal"]
    assert ss["definition"] == "a human being" and ss["gloss"].startswith("a human being;")
    assert [db.synset(h)["lemmas"][0] for h in ss["hyponyms"]] == ["man", "woman"]
    assert db.lookup("unicorn") == []
    with pytest.raises(ValueError, match="malformed synset at byte offset 3"):
        db.synset(3)


def test_build_wordnet_corpus(wn):
    names = ["person", "car", "traffic light", "potted-plant", "wall-other-merged", "unicorn"]
    c = build_wordnet_corpus(names, wn)
    assert c.names == names
    assert c.synonyms("person") == [
        "individual",
        "someone",
        "mortal",
        "man",
        "woman",
    ]  # lemmas, then hyponyms
    assert c.definition("person") == "a human being"
    assert c.synonyms("car") == ["auto", "automobile", "machine", "motorcar"]  # first sense only
    assert c.synonyms("traffic light") == ["traffic signal", "stoplight"]
    assert c.synonyms("potted-plant") == ["plant", "flora", "plant life"]  # head-noun fallback keeps the head
    assert c.definition("wall-other-merged").startswith("an architectural partition")
    assert c.missing == ["unicorn"] and c["unicorn"] == {"synonyms": [], "definition": ""}
    assert build_wordnet_corpus(["person"], wn, max_synonyms=2).synonyms("person") == [
        "individual",
        "someone",
    ]
    assert build_wordnet_corpus(["person"], wn, hyponyms=False).synonyms("person") == [
        "individual",
        "someone",
        "mortal",
    ]


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet"):
        WordNetDB(tmp_path)
    import ovlib.data.synonyms as syn

    monkeypatch.setattr(syn, "find_wordnet_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"nltk.download\('wordnet'\)"):
        build_wordnet_corpus(["person"])


def test_normalize_class_name():
    assert normalize_class_name("wall-other-merged") == "wall"
    assert normalize_class_name("tree-merged") == "tree"
    assert normalize_class_name("playingfield") == "playingfield"
    assert normalize_class_name("hot_dog") == "hot dog" and normalize_class_name("door-stuff") == "door"


def test_microworld_corpus_and_roundtrip(tmp_path):
    w = MicroWorld()
    c = microworld_corpus(w)
    assert c.names == w.class_names and len(c) == len(w.classes)
    car = w.class_by_id(1)
    assert c.synonyms(car.name) == car.synonyms and c[car.name]["heldout_synonyms"] == car.heldout_synonyms
    seen = microworld_corpus(w, include_heldout=False)
    assert not set(seen.synonyms(car.name)) & set(car.heldout_synonyms)
    c.to_json(tmp_path / "s.json")
    back = SynonymCorpus.from_json(tmp_path / "s.json")
    assert back.to_dict() == c.to_dict()
    text = c.semantic_text(car.name)
    assert text.startswith(f"{car.name}, {car.definition.rstrip('.')}, {car.synonyms[0]}")
    assert c.semantic_text(car.name, max_synonyms=1).endswith(car.synonyms[0])


def test_corpus_validation(tmp_path):
    with pytest.raises(ValueError, match="'synonyms' must be a list of strings"):
        SynonymCorpus({"car": {"synonyms": "auto", "definition": ""}})
    with pytest.raises(ValueError, match="entry 'car' must be a mapping"):
        SynonymCorpus({"car": ["auto"]})
    p = tmp_path / "bad.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        SynonymCorpus.from_json(p)
    with pytest.raises(FileNotFoundError):
        SynonymCorpus.from_json(tmp_path / "none.json")
    with pytest.raises(KeyError, match="'bus' is not in the synonym corpus"):
        SynonymCorpus({})["bus"]
    # the SEViC layout (extra keys such as 'translation') is accepted and kept
    sevic = {"person": {"synonyms": ["human"], "definition": "a human being", "translation": "x"}}
    p.write_text(json.dumps(sevic))
    assert SynonymCorpus.from_json(p)["person"]["translation"] == "x"


def test_with_synonyms_keeps_own_synonyms_and_fills_from_wordnet(wn, tmp_path):
    from ovlib.data.synonyms import with_synonyms

    own = [{"id": 1, "name": "cup", "synonyms": ["mug"], "definition": "a vessel"}]
    cats, path = with_synonyms(own, tmp_path / "cache", wn)
    assert cats == own and cats[0] is not own[0] and path is None  # copies, no corpus written
    coco = [{"id": 1, "name": "person"}, {"id": 2, "name": "unicorn"}]
    cats, path = with_synonyms(coco, tmp_path / "cache", wn)
    assert cats[0]["synonyms"][:2] == ["individual", "someone"] and cats[0]["definition"] == "a human being"
    assert cats[1]["synonyms"] == [] and cats[1]["definition"] == ""
    assert path.is_file() and "person" in json.loads(path.read_text())

"""The micro world: a procedural, seeded generator of COCO-like scenes (the book's embedded default).

A scene is a background of 1-3 textured **stuff** regions with irregular borders (grass, water, sky, ...)
and 1-6 **things** (car, boat, house, tree, tire, kite, ...) drawn anti-aliased with scale, rotation,
mirroring and partial occlusion, plus 3 template captions. Every class has a main name, 3-6 synonyms
(some never used in captions: ``heldout_synonyms``) and a one-sentence definition built from its visual
attributes, so CLIP-style training on the captions shows the phenomena the papers study:

* **context bias** -- each thing prefers some stuff (boats on water); with probability ``context_bias``
  a thing's centre is placed inside one of its preferred stuff classes (``ThingLayout.context``);
* **synonym drift** -- captions use the main name ~92 % of the time and the non-held-out synonyms
  Zipf-like otherwise (weights 1/rank); held-out synonyms never appear in any caption;
* **dense vs crop** -- small objects, occlusion (box IoU <= 0.3 between things) and textured context.

Determinism: every random choice of scene ``i`` comes from ``np.random.default_rng([seed, i])`` (layout)
so ``sample(i, size)`` does not depend on call order, and the layout is drawn in normalised [0, 1]
coordinates, so the same scene is rasterised at any size from 32 to 512 px (only the pixels change).

Rendering is vectorised numpy: things are unions of analytic signed-distance shapes (convex polygons,
discs, capsules) evaluated at pixel centres inside each object's window, with analytic edge coverage
``alpha = clip(0.5 - d_px, 0, 1)``; stuff regions are the argmax of smooth random fields (Gaussian RBF
grids + an anchor bump per class); stuff textures are band-limited periodic tiles cached per size.

Export: :meth:`MicroWorld.export_coco` writes the real COCO 2017 layout (instances with RLE masks,
panoptic PNG + JSON with ``rgb2id`` ids, captions, a SEViC-style synonym file); :func:`ensure_microworld`
does that once per config (manifest written last, keyed by :func:`ovlib.io.config_hash`).
As in real COCO, ``instances_{split}.json`` holds the thing categories and thing annotations only; the
panoptic file holds every category (``isthing``, ``synonyms``, ``heldout_synonyms``, ``definition``,
``split`` = base / novel / stuff). Panoptic segment ids are ``1000 * category_id`` for a stuff region and
``1000 * category_id + 1 + k`` for the k-th thing of the scene; image ids are ``scene index + 1``.
:class:`MicroWorldStream` streams scenes for pre-training without touching the disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import ConvexHull

from ovlib.data.coco import id2rgb  # the COCO panoptic codec
from ovlib.data.nouns import plural
from ovlib.io import atomic_write_text, config_hash, tqdm_disabled

__all__ = [
    "ClassInfo",
    "ThingLayout",
    "SceneLayout",
    "Scene",
    "MicroWorld",
    "MicroWorldStream",
    "ensure_microworld",
    "export_hash",
    "mosaic",
    "SPLIT_START",
    "MICROWORLD_VERSION",
]

log = logging.getLogger(__name__)

#: bump when the generator changes in a way that changes pixels/annotations (invalidates exports)
MICROWORLD_VERSION = 1
#: first scene index of each split, so that splits (and the pre-training stream, which starts at 0) never
#: share scenes
SPLIT_START = {"train2017": 0, "val2017": 1_000_000_000, "test2017": 2_000_000_000}
MIN_SIZE, MAX_SIZE = 32, 512
_LAYOUT_GRID = 64  # lattice of the layout's stuff map (area fractions, context-biased centres)


# ----------------------------------------------------------------------------------------------------------
# public dataclasses
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ClassInfo:
    """One category. ``id`` is a COCO-style category id (things 1..T, stuff T+1..T+S)."""

    id: int
    name: str
    synonyms: list[str]
    heldout_synonyms: list[str]
    definition: str
    isthing: bool
    novel: bool = False
    preferred_stuff: list[int] = field(default_factory=list)
    colour: str = ""
    shape: str = ""
    texture: str = ""

    @property
    def caption_synonyms(self) -> list[str]:
        """Synonyms that may appear in captions (in Zipf rank order)."""
        return [s for s in self.synonyms if s not in self.heldout_synonyms]

    @property
    def split(self) -> str:
        """'base' / 'novel' for things, 'stuff' for stuff (the ``split`` field of exported categories)."""
        return "stuff" if not self.isthing else ("novel" if self.novel else "base")


@dataclass
class ThingLayout:
    """One thing in normalised coordinates: centre (cx, cy) in [0,1], radius r (local unit), rotation."""

    category_id: int
    cx: float
    cy: float
    r: float
    rot: float
    flip: bool
    tint: np.ndarray  # (3,) additive colour jitter
    gain: float  # brightness factor
    context: bool  # drawn with the context bias (centre forced into one of its preferred stuff)
    box: np.ndarray  # (4,) normalised xyxy of the full (unoccluded) shape


@dataclass
class SceneLayout:
    """Everything random about scene ``index``, independent of the raster size."""

    index: int
    stuff: list[int]  # stuff category ids, K = 1..3
    coarse: np.ndarray  # (K, 4, 4) field grids
    fine: np.ndarray  # (K, 8, 8)
    anchors: np.ndarray  # (K, 2) normalised (x, y) bump centres
    offset: np.ndarray  # (K,) additive field offsets that give every stuff class >= min_stuff_area
    tex_offset: np.ndarray  # (K, 2) texture offsets in [0, 1)
    stuff_gain: np.ndarray  # (K,)
    stuff_area: np.ndarray  # (K,) area fractions on a 32x32 grid (before things)
    things: list[ThingLayout]  # bottom to top
    captions: list[str]
    terms: list[list[tuple[int, str]]]  # per caption: (category id, surface name used)
    dropped: int = 0  # things that could not be placed (overlap rule)


@dataclass
class Scene:
    """A rasterised scene. Boxes are xyxy in pixels of ``image`` (pixel edges: a one-pixel mask at
    column c spans [c, c+1])."""

    index: int
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (K, H, W) bool, visible masks of thing instances
    boxes: np.ndarray  # (K, 4) float32 xyxy px, tight box of the visible mask
    labels: np.ndarray  # (K,) int64 category ids
    semantic: np.ndarray  # (H, W) int64 category id per pixel (topmost segment)
    panoptic: np.ndarray  # (H, W) int64 segment id per pixel
    segments: list[dict]  # dict(id, category_id, isthing, bbox xywh, area), things then stuff
    captions: list[str]
    mentions: set[int]  # category ids named by the captions (things and stuff)
    terms: list[list[tuple[int, str]]] = field(default_factory=list)  # per caption: (category id, name used)
    layout: SceneLayout | None = None  # the size-independent description the scene was drawn from


# ----------------------------------------------------------------------------------------------------------
# signed distance helpers (local object coordinates: unit ~ object radius, y pointing down like the image)
# ----------------------------------------------------------------------------------------------------------
SDF = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _disk(cx: float, cy: float, r: float) -> SDF:
    return lambda u, v: np.sqrt((u - cx) ** 2 + (v - cy) ** 2) - r


def _ring(r: float, w: float) -> SDF:
    return lambda u, v: np.abs(np.sqrt(u * u + v * v) - r) - w


def _ellipse(cx: float, cy: float, a: float, b: float) -> SDF:
    m = min(a, b)  # first-order distance near the boundary
    return lambda u, v: (np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2) - 1.0) * m


def _box(cx: float, cy: float, hx: float, hy: float, rr: float = 0.0) -> SDF:
    hx, hy = hx - rr, hy - rr

    def f(u, v):
        qx = np.abs(u - cx) - hx
        qy = np.abs(v - cy) - hy
        out = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        return out + np.minimum(np.maximum(qx, qy), 0) - rr

    return f


def _poly(*pts: tuple[float, float]) -> SDF:
    """Convex polygon as the max of its edge half-planes (exact inside and along edges)."""
    p = np.asarray(pts, dtype=np.float64)
    c = p.mean(0)
    normals, offs = [], []
    for i in range(len(p)):
        a, b = p[i], p[(i + 1) % len(p)]
        e = b - a
        n = np.array([e[1], -e[0]]) / np.hypot(*e)
        if np.dot(n, c - a) > 0:
            n = -n
        normals.append(n)
        offs.append(float(np.dot(n, a)))

    def f(u, v):
        d = normals[0][0] * u + normals[0][1] * v - offs[0]
        for n, o in zip(normals[1:], offs[1:]):
            d = np.maximum(d, n[0] * u + n[1] * v - o)
        return d

    return f


def _capsule(ax: float, ay: float, bx: float, by: float, r: float) -> SDF:
    dx, dy = bx - ax, by - ay
    ll = dx * dx + dy * dy

    def f(u, v):
        t = np.clip(((u - ax) * dx + (v - ay) * dy) / ll, 0.0, 1.0)
        return np.sqrt((u - ax - t * dx) ** 2 + (v - ay - t * dy) ** 2) - r

    return f


def _union(*fs: SDF) -> SDF:
    def f(u, v):
        d = fs[0](u, v)
        for g in fs[1:]:
            d = np.minimum(d, g(u, v))
        return d

    return f


def _inter(*fs: SDF) -> SDF:
    def f(u, v):
        d = fs[0](u, v)
        for g in fs[1:]:
            d = np.maximum(d, g(u, v))
        return d

    return f


def _minus(a: SDF, b: SDF) -> SDF:
    return lambda u, v: np.maximum(a(u, v), -b(u, v))


def _star(n: int, r_out: float, r_in: float) -> SDF:
    tips = []
    for k in range(n):
        t = -math.pi / 2 + 2 * math.pi * k / n
        t1, t2 = t - math.pi / n, t + math.pi / n
        tips.append(
            _poly(
                (r_out * math.cos(t), r_out * math.sin(t)),
                (r_in * math.cos(t2), r_in * math.sin(t2)),
                (0.0, 0.0),
                (r_in * math.cos(t1), r_in * math.sin(t1)),
            )
        )
    return _union(*tips)


DARK, WHITE, BROWN, GREY, YELLOW, ORANGE, SKYBLUE = (
    (35, 35, 38),
    (238, 238, 236),
    (125, 78, 40),
    (150, 150, 155),
    (235, 205, 45),
    (240, 130, 35),
    (150, 205, 235),
)
COLOURS = {
    "red": (205, 40, 40),
    "blue": (40, 75, 205),
    "green": (35, 150, 55),
    "yellow": YELLOW,
    "orange": ORANGE,
    "purple": (135, 60, 175),
    "white": WHITE,
    "black": DARK,
    "brown": BROWN,
    "pink": (240, 135, 185),
    "cyan": (40, 190, 210),
    "grey": GREY,
}

# part colour slots: "main" (textured with the class pattern), "second" (the class's second colour) or an
# RGB tuple
_SHAPES: dict[str, list[tuple[SDF, object]]] = {
    "car": [
        (_box(0, -0.1, 1.05, 0.38, 0.15), "main"),
        (_box(0.1, -0.45, 0.5, 0.25, 0.1), "main"),
        (_disk(-0.55, 0.32, 0.26), DARK),
        (_disk(0.6, 0.32, 0.26), DARK),
    ],
    "bus": [(_box(0, 0, 1.2, 0.55, 0.08), "main")]
    + [(_box(x, -0.15, 0.2, 0.18), SKYBLUE) for x in (-0.75, -0.25, 0.25, 0.75)]
    + [(_disk(-0.7, 0.55, 0.2), DARK), (_disk(0.7, 0.55, 0.2), DARK)],
    "tire": [(_ring(0.75, 0.27), "main")],
    "cone": [(_poly((0, -1.05), (0.6, 0.75), (-0.6, 0.75)), "main"), (_box(0, 0.82, 0.8, 0.1), "main")],
    "boat": [
        (_inter(_ellipse(0, 0.2, 1.15, 0.6), lambda u, v: 0.2 - v), "main"),
        (_poly((0.05, -1.05), (0.75, 0.1), (0.05, 0.1)), WHITE),
    ],
    "lifebuoy": [(_ring(0.72, 0.3), "main")],
    "fish": [
        (_ellipse(-0.2, 0, 0.85, 0.48), "main"),
        (_poly((0.5, 0), (1.1, -0.5), (1.1, 0.5)), "main"),
        (_disk(-0.65, -0.08, 0.09), DARK),
    ],
    "duck": [
        (_ellipse(0, 0.25, 0.95, 0.5), "main"),
        (_disk(0.55, -0.45, 0.36), "main"),
        (_poly((0.85, -0.55), (1.2, -0.4), (0.85, -0.3)), ORANGE),
    ],
    "house": [
        (_box(0, 0.4, 0.75, 0.55), "main"),
        (_poly((-1.0, -0.1), (1.0, -0.1), (0, -1.05)), "second"),
        (_box(0, 0.6, 0.18, 0.35), DARK),
    ],
    "tree": [(_poly((0, -1.1), (0.8, 0.5), (-0.8, 0.5)), "main"), (_box(0, 0.8, 0.16, 0.32), BROWN)],
    "flower": [
        (
            _union(
                *[
                    _disk(0.6 * math.cos(t), 0.6 * math.sin(t), 0.4)
                    for t in np.linspace(0, 2 * math.pi, 5, endpoint=False)
                ]
            ),
            "main",
        ),
        (_disk(0, 0, 0.33), YELLOW),
    ],
    "ball": [(_disk(0, 0, 1.0), "main")],
    "kite": [(_poly((0, -1.15), (0.7, -0.25), (0, 1.15), (-0.7, -0.25)), "main")],
    "balloon": [
        (_ellipse(0, -0.2, 0.75, 0.95), "main"),
        (_poly((0, 0.65), (0.18, 0.95), (-0.18, 0.95)), "main"),
    ],
    "bird": [(_union(_capsule(-1.0, -0.45, 0, 0.25, 0.2), _capsule(0, 0.25, 1.0, -0.45, 0.2)), "main")],
    "airplane": [
        (_capsule(-1.1, 0, 1.1, 0, 0.22), "main"),
        (_poly((0.0, -1.05), (0.4, -1.05), (0.35, 1.05), (0.0, 1.05)), "main"),
        (_box(-0.95, 0, 0.12, 0.45), "main"),
    ],
    "umbrella": [
        (_inter(_disk(0, 0.05, 1.0), lambda u, v: v - 0.05), "main"),
        (_box(0, 0.5, 0.06, 0.5), DARK),
    ],
    "starfish": [(_star(5, 1.1, 0.45), "main")],
    "bucket": [
        (_poly((-0.75, -0.65), (0.75, -0.65), (0.5, 0.8), (-0.5, 0.8)), "main"),
        (_minus(_ring(0.72, 0.07), lambda u, v: -0.65 - v), DARK),
    ],
    "snowman": [
        (_disk(0, 0.4, 0.62), "main"),
        (_disk(0, -0.58, 0.44), "main"),
        (_poly((0.05, -0.65), (0.45, -0.55), (0.05, -0.47)), ORANGE),
    ],
    "sled": [
        (_box(0, -0.15, 1.05, 0.28, 0.12), "main"),
        (_box(0, 0.38, 1.15, 0.07), DARK),
        (_box(-0.55, 0.2, 0.07, 0.2), DARK),
        (_box(0.55, 0.2, 0.07, 0.2), DARK),
    ],
    "window": [
        (_box(0, 0, 0.9, 0.9), "main"),
        (
            _union(
                _minus(_box(0, 0, 0.9, 0.9), _box(0, 0, 0.72, 0.72)),
                _box(0, 0, 0.9, 0.08),
                _box(0, 0, 0.08, 0.9),
            ),
            WHITE,
        ),
    ],
    "clock": [
        (_disk(0, 0, 1.0), "main"),
        (_ring(0.92, 0.09), DARK),
        (_union(_box(0, -0.3, 0.06, 0.35), _box(0.22, 0, 0.28, 0.06)), DARK),
    ],
    "painting": [(_box(0, 0, 1.0, 0.78), BROWN), (_box(0, 0, 0.78, 0.56), "main")],
    "rug": [
        (_box(0, 0, 1.15, 0.65, 0.12), "main"),
        (_minus(_box(0, 0, 0.95, 0.45, 0.05), _box(0, 0, 0.85, 0.35)), "second"),
    ],
    "book": [(_box(0, 0, 0.62, 0.85, 0.05), "main"), (_box(-0.52, 0, 0.1, 0.85), "second")],
}


# (name, colour, second colour, texture, preferred stuff, novel, max rotation deg, shape description,
#  synonyms in Zipf rank order, held-out synonyms)
# fmt: off
_THINGS = [
    ("car", "red", "red", "plain", ["road"], False, 15,
     "a rounded box with a small cabin and two black wheels",
     ["auto", "sedan", "passenger car", "motorcar", "automobile"], ["motorcar", "automobile"]),
    ("bus", "yellow", "yellow", "plain", ["road"], True, 10,
     "a long box with a row of pale blue windows and two wheels",
     ["coach", "omnibus", "transit bus", "autobus"], ["autobus"]),
    ("tire", "black", "black", "plain", ["road"], False, 180,
     "a thick ring with a hole in the middle",
     ["wheel", "tyre", "rubber ring", "pneumatic tyre"], ["pneumatic tyre"]),
    ("cone", "orange", "white", "stripes", ["road"], False, 15,
     "a tall triangle with white stripes on a flat base",
     ["traffic cone", "pylon", "witch hat", "road marker"], ["pylon"]),
    ("boat", "brown", "brown", "plain", ["water"], False, 15,
     "a half-round hull with a white triangular sail",
     ["sailboat", "dinghy", "vessel", "sailing craft", "skiff"], ["skiff"]),
    ("lifebuoy", "red", "white", "stripes", ["water"], False, 180,
     "a ring with white stripes",
     ["life ring", "lifesaver", "float ring", "ring buoy"], ["ring buoy"]),
    ("fish", "cyan", "blue", "stripes", ["water"], False, 30,
     "an oval body with a triangular tail, an eye and blue stripes",
     ["trout", "minnow", "finned swimmer", "carp"], ["carp"]),
    ("duck", "yellow", "yellow", "plain", ["water"], True, 15,
     "an oval body with a round head and an orange beak",
     ["duckling", "mallard", "waterfowl", "rubber duck", "drake"], ["drake"]),
    ("house", "brown", "red", "plain", ["grass", "snow"], False, 10,
     "a box with a red triangular roof and a dark door",
     ["home", "cottage", "dwelling", "bungalow", "family home"], ["bungalow"]),
    ("tree", "green", "yellow", "dots", ["grass", "snow"], False, 10,
     "a tall triangle with dots on a brown trunk",
     ["pine", "fir", "evergreen", "conifer", "pine tree"], ["conifer"]),
    ("flower", "pink", "pink", "plain", ["grass"], False, 180,
     "five round petals around a yellow centre",
     ["blossom", "bloom", "daisy", "posy", "wild flower"], ["posy"]),
    ("ball", "orange", "black", "stripes", ["grass", "sand", "floor"], False, 180,
     "a disc with dark stripes",
     ["basketball", "sphere", "play ball", "orb"], ["orb"]),
    ("kite", "red", "yellow", "checker", ["sky"], True, 30,
     "a diamond with a yellow checkered pattern",
     ["flying toy", "paper kite", "box kite", "windsock"], ["windsock"]),
    ("balloon", "red", "red", "plain", ["sky"], False, 20,
     "an upright oval with a small knot below",
     ["party balloon", "air balloon", "blimp", "dirigible"], ["dirigible"]),
    ("bird", "black", "black", "plain", ["sky"], False, 30,
     "a thin v-shaped chevron",
     ["crow", "seagull", "sparrow", "flying bird", "songbird"], ["songbird"]),
    ("airplane", "grey", "grey", "plain", ["sky"], False, 45,
     "a long capsule with straight wings and a tail fin",
     ["plane", "jet", "aircraft", "airliner", "jumbo jet"], ["airliner"]),
    ("umbrella", "blue", "white", "stripes", ["sand"], True, 15,
     "a dome with white stripes on a thin dark pole",
     ["parasol", "sunshade", "beach umbrella", "brolly"], ["brolly"]),
    ("starfish", "orange", "yellow", "dots", ["sand", "water"], False, 180,
     "a five-pointed star with yellow dots",
     ["sea star", "star fish", "echinoderm", "asteroid"], ["echinoderm", "asteroid"]),
    ("bucket", "purple", "white", "stripes", ["sand"], False, 15,
     "a trapezoid with white stripes and a dark handle",
     ["pail", "sand pail", "beach bucket", "scuttle"], ["scuttle"]),
    ("snowman", "white", "white", "plain", ["snow"], True, 10,
     "two stacked white discs with an orange nose",
     ["snow figure", "frosty", "snow sculpture", "snowwoman"], ["snowwoman"]),
    ("sled", "red", "yellow", "stripes", ["snow"], False, 15,
     "a flat rounded box with yellow stripes on dark runners",
     ["sledge", "toboggan", "sleigh", "snow sled", "luge"], ["luge"]),
    ("window", "cyan", "cyan", "plain", ["wall"], False, 5,
     "a square pane divided by a white cross-shaped frame",
     ["windowpane", "pane", "casement", "glass pane"], ["casement"]),
    ("clock", "white", "white", "plain", ["wall"], True, 20,
     "a disc with a dark rim and two dark hands",
     ["wall clock", "timepiece", "timer", "horologe"], ["horologe"]),
    ("painting", "green", "white", "dots", ["wall"], False, 5,
     "a picture with white dots in a brown frame",
     ["artwork", "wall art", "canvas", "framed art", "oil painting"], ["canvas"]),
    ("rug", "purple", "yellow", "checker", ["floor"], True, 30,
     "a wide rounded box with a checkered pattern and a yellow border",
     ["carpet", "mat", "doormat", "floor mat", "kilim"], ["kilim"]),
    ("book", "blue", "white", "stripes", ["floor"], False, 40,
     "an upright rectangle with white stripes and a white spine",
     ["volume", "textbook", "paperback", "reading book", "hardcover"], ["hardcover"]),
]

# (name, base rgb, description, where phrase, synonyms, held-out)
_STUFF = [
    ("grass", (70, 140, 55), "a green region with thin vertical blades", "on the",
     ["lawn", "turf", "meadow", "playing field", "greensward"], ["greensward"]),
    ("water", (45, 95, 175), "a blue region with light horizontal waves", "on the",
     ["sea", "lake", "river", "open water", "ocean"], ["ocean"]),
    ("sand", (215, 190, 135), "a pale yellow region with fine speckles", "on the",
     ["beach", "dune", "shore", "sandy beach", "sandbank"], ["sandbank"]),
    ("sky", (135, 185, 235), "a light blue region with soft white clouds at the top", "in the",
     ["clouds", "heavens", "air", "open sky", "firmament"], ["firmament"]),
    ("road", (88, 88, 92), "a dark grey region with fine grit and dashed white lines", "on the",
     ["street", "pavement", "asphalt", "traffic lane", "tarmac"], ["tarmac"]),
    ("wall", (165, 85, 65), "a red-brown region of bricks with pale mortar lines", "against the",
     ["brick wall", "brickwork", "masonry", "partition"], ["partition"]),
    ("snow", (236, 239, 246), "a white region with faint blue shadows", "on the",
     ["snowfield", "powder", "snowbank", "snow cover", "firn"], ["firn"]),
    ("floor", (150, 100, 55), "a brown region of wooden planks with grain", "on the",
     ["floorboards", "parquet", "wooden floor", "flooring"], ["parquet"]),
]
# fmt: on
_COUNT_WORDS = {2: "two", 3: "three"}
_TEMPLATES_THINGS = [
    "{t}.",
    "a photo of {t}.",
    "a picture of {t}.",
    "there is {t}.",
    "a scene with {t}.",
    "an image showing {t}.",
]
_TEMPLATES_STUFF = [
    "{t} {p} {s}.",
    "a photo of {t} {p} {s}.",
    "there is {t} {p} {s}.",
    "{t} and some {s}.",
    "a picture of {t} {p} {s}.",
]


# the plural rule lives with the caption parser that must invert it (ovlib.data.nouns.plural)
_plural = plural


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------------------
# textures
# ----------------------------------------------------------------------------------------------------------
def _band_noise(rng: np.random.Generator, size: int, kmax: int, ax: float, ay: float) -> np.ndarray:
    """Periodic band-limited noise on a size x size tile, the same function of normalised coordinates at every
    size (fixed integer-frequency spectrum drawn from ``rng``; frequencies above Nyquist are dropped).
    Returns (size, size) with unit standard deviation (by Parseval, before truncation)."""
    k = np.arange(-kmax, kmax + 1)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    amp = np.exp(-((kx / ax) ** 2) - (ky / ay) ** 2)
    amp[kmax, kmax] = 0.0
    coef = (rng.normal(size=amp.shape) + 1j * rng.normal(size=amp.shape)) * amp
    nyq = size // 2 - 1
    spec = np.zeros((size, size), dtype=np.complex128)
    keep = (np.abs(kx) <= nyq) & (np.abs(ky) <= nyq)
    spec[ky[keep] % size, kx[keep] % size] = coef[keep]
    out = np.fft.ifft2(spec).real * size * size
    norm = math.sqrt(float((np.abs(coef) ** 2).sum()) / 2.0) + 1e-12
    return out / norm


def _stuff_texture(name: str, base: tuple[int, int, int], seed: int, size: int) -> np.ndarray:
    """(size, size, 3) float32 periodic texture tile of one stuff class, values in [0, 255]."""
    rng = np.random.default_rng([seed, 7919, sum(map(ord, name))])
    t = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(t, t, indexing="ij")
    base = np.asarray(base, np.float64)
    lum = np.zeros((size, size))
    col = np.broadcast_to(base, (size, size, 3)).copy()
    if name == "grass":
        lum = 14 * _band_noise(rng, size, 40, 40.0, 4.0) + 6 * _band_noise(rng, size, 6, 4.0, 4.0)
    elif name == "water":
        n = _band_noise(rng, size, 4, 3.0, 3.0)
        wave = np.sin(2 * math.pi * (9 * yy + 0.35 * n))
        lum = 22 * np.clip(wave - 0.55, 0, None) / 0.45 + 5 * _band_noise(rng, size, 10, 8.0, 8.0)
    elif name == "sand":
        lum = 9 * _band_noise(rng, size, 48, 48.0, 48.0) + 6 * _band_noise(rng, size, 5, 4.0, 4.0)
    elif name == "sky":
        cloud = np.clip(_band_noise(rng, size, 6, 4.0, 2.5) - 0.6, 0, None)
        w = np.clip(cloud * 0.9, 0, 0.85)[..., None]
        col = col * (1 - w) + 248 * w
    elif name == "road":
        lum = 8 * _band_noise(rng, size, 48, 48.0, 48.0)
        dash = (np.abs(yy - 0.5) < 0.022) & (np.mod(xx * 4, 1.0) < 0.5)
        col[dash] = (225, 225, 215)
    elif name == "wall":
        rows = 8
        ry = yy * rows
        row = np.floor(ry)
        bx = xx * 4 + 0.5 * (row % 2)
        dy = np.abs(ry - np.round(ry)) / rows
        dx = np.abs(bx - np.round(bx)) / 4
        mortar = np.clip(1.0 - (np.minimum(dx, dy) * size - 0.35), 0, 1)[..., None]
        brick = rng.uniform(-12, 12, size=(rows, 8))
        cell = brick[row.astype(int) % rows, np.floor(bx).astype(int) % 8]
        lum = cell + 4 * _band_noise(rng, size, 32, 32.0, 32.0)
        col = col * (1 - mortar) + np.array([205, 200, 188.0]) * mortar
        lum = lum * (1 - mortar[..., 0])
    elif name == "snow":
        n = _band_noise(rng, size, 8, 6.0, 6.0)
        col = (
            col
            + np.stack([-9 * n, -5 * n, 0 * n], -1)
            + 3 * _band_noise(rng, size, 40, 40.0, 40.0)[..., None]
        )
    elif name == "floor":
        planks = 7
        row = np.floor(yy * planks)
        shade = rng.uniform(-18, 18, size=planks)[row.astype(int) % planks]
        grain = 7 * np.sin(2 * math.pi * (planks * 6 * yy + 0.8 * _band_noise(rng, size, 3, 3.0, 1.0)))
        seam = np.clip(1.0 - (np.abs(yy * planks - np.round(yy * planks)) / planks * size - 0.3), 0, 1)
        lum = (shade + grain) * (1 - seam) - 55 * seam
    else:  # pragma: no cover - table and code are kept in sync
        raise KeyError(name)
    out = col + lum[..., None]
    return np.clip(out, 0, 255).astype(np.float32)


def _argmax0(f: np.ndarray) -> np.ndarray:
    """``np.argmax(f, 0)`` for a small leading axis (K <= 3 stuff fields), with the same tie rule (first
    maximum wins), several times faster than numpy's strided reduction."""
    best = f[0]
    lab = np.zeros(f.shape[1:], np.int64)
    for k in range(1, len(f)):
        m = f[k] > best
        lab[m] = k
        best = np.where(m, f[k], best)
    return lab


def _rbf_basis(t: np.ndarray, g: int) -> np.ndarray:
    """(len(t), g) Gaussian RBF basis with centres (j + 0.5) / g and width 1 / g."""
    c = (np.arange(g) + 0.5) / g
    return np.exp(-0.5 * ((t[:, None] - c[None, :]) * g) ** 2)


# ----------------------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------------------
class MicroWorld:
    """Procedural scene generator. See the module docstring.

    Classes: 26 things (ids 1..26; 7 novel: bus, duck, kite, umbrella, snowman, clock, rug) and 8 stuff
    (ids 27..34: grass, water, sand, sky, road, wall, snow, floor). Each thing is a distinct (shape, colour,
    texture) triple; colours, shapes (ring, disc, half-disc, triangle, box) and textures are shared between
    classes. Exported categories carry ``split`` = 'base' / 'novel' (things) or 'stuff'.

    Scene ``i``: 1..max_things things (uniform) of uniformly drawn classes; 1..3 stuff classes, one preferred
    stuff per context-biased thing first. Stuff regions are the argmax of smooth random fields (every class
    covers >= 12 % of the image); sky sits at the top. A context-biased thing's centre is drawn inside its
    target stuff, any other thing's uniformly; a thing is re-drawn (3 sizes, then the smallest radius) while
    its box overlaps a placed one too much (:meth:`_overlap_ok`), and dropped after that (``dropped``,
    ~0.05 %).

    Captions (``captions_per_scene``, default 3): each names 1..3 of the scene's thing classes in random
    order ("a car", "two buses", "several fish", a colour adjective for 30 % of single objects), joined as
    "A, B and C", in one of 6 thing templates, or (probability 0.5, when a stuff class covers >= 15 %) one of
    5 templates that also name a stuff class ("... on the grass", "... in the sky"). Every name is the main
    name with probability ``main_name_prob`` and otherwise a non-held-out synonym with Zipf weights 1/rank;
    held-out synonyms never appear (checked against every caption unit at construction).

    Args:
        seed: world seed (textures, scene layouts).
        context_bias: probability that a thing is placed on one of its preferred stuff classes.
        main_name_prob: probability that a caption names a class by its main name (else a caption synonym,
            Zipf-like with weight 1/rank).
        captions_per_scene: captions per scene (default 3).
        max_things: things per scene are drawn uniformly in 1..max_things (before the overlap rule).
        max_iou: a new thing whose box IoU with a placed one exceeds this is re-drawn (also refused: a box
            covered more than ``max_cover`` by another, so no object can hide entirely behind another).
        radius: (min, max) object radius (local unit) in normalised image units, drawn log-uniformly.
    """

    def __init__(
        self,
        seed: int = 0,
        context_bias: float = 0.7,
        main_name_prob: float = 0.92,
        captions_per_scene: int = 3,
        max_things: int = 6,
        max_iou: float = 0.3,
        max_cover: float = 0.6,
        radius: tuple[float, float] = (0.075, 0.2),
    ):
        if not 0.0 <= context_bias <= 1.0:
            raise ValueError(f"context_bias must be in [0, 1], got {context_bias}")
        if not 0.0 <= main_name_prob <= 1.0:
            raise ValueError(f"main_name_prob must be in [0, 1], got {main_name_prob}")
        if captions_per_scene < 1 or max_things < 1:
            raise ValueError("captions_per_scene and max_things must be >= 1")
        self.seed = int(seed)
        self.context_bias = float(context_bias)
        self.main_name_prob = float(main_name_prob)
        self.captions_per_scene = int(captions_per_scene)
        self.max_things = int(max_things)
        self.max_iou = float(max_iou)
        self.max_cover = float(max_cover)
        self.radius = (float(radius[0]), float(radius[1]))
        self._build_classes()
        self._tex_cache: dict[int, dict[int, np.ndarray]] = {}
        self._basis_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        G = _LAYOUT_GRID
        self._inner = np.zeros((G, G), bool)  # lattice points with centres in [0.08, 0.92]^2
        self._inner[int(0.08 * G) : int(math.ceil(0.92 * G)), int(0.08 * G) : int(math.ceil(0.92 * G))] = True

    # pickling (DataLoader workers under the spawn/forkserver start methods): the shape table holds closures,
    # so a world travels as its arguments and is rebuilt on arrival
    def __getstate__(self) -> dict:
        return dict(
            seed=self.seed,
            context_bias=self.context_bias,
            main_name_prob=self.main_name_prob,
            captions_per_scene=self.captions_per_scene,
            max_things=self.max_things,
            max_iou=self.max_iou,
            max_cover=self.max_cover,
            radius=self.radius,
        )

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # -- configuration ----------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return dict(
            version=MICROWORLD_VERSION,
            seed=self.seed,
            context_bias=self.context_bias,
            main_name_prob=self.main_name_prob,
            captions_per_scene=self.captions_per_scene,
            max_things=self.max_things,
            max_iou=self.max_iou,
            max_cover=self.max_cover,
            radius=list(self.radius),
        )

    def _build_classes(self) -> None:
        stuff_ids = {name: len(_THINGS) + 1 + j for j, (name, *_r) in enumerate(_STUFF)}
        self.things: list[ClassInfo] = []
        self._thing_spec: dict[int, dict] = {}
        for k, (name, colour, colour2, texture, prefers, novel, max_rot, shape_desc, syns, held) in enumerate(
            _THINGS
        ):
            cid = k + 1
            where = " or ".join(f"the {p}" for p in prefers)
            prep = "in" if prefers[0] == "sky" else ("against" if prefers[0] == "wall" else "on")
            head = f"{_article(name).capitalize()} {name} is"
            m = re.match(r"(a|an) (.*)", shape_desc)
            if m:  # "a rounded box ..." -> "a red rounded box ..."
                definition = f"{head} {_article(colour)} {colour} {m.group(2)}, usually seen {prep} {where}."
            else:  # "two stacked discs ..." -> "white, made of two stacked discs ..."
                definition = f"{head} {colour}, made of {shape_desc}, usually seen {prep} {where}."
            self.things.append(
                ClassInfo(
                    cid,
                    name,
                    list(syns),
                    list(held),
                    definition,
                    True,
                    novel,
                    [stuff_ids[p] for p in prefers],
                    colour,
                    name,
                    texture,
                )
            )
            self._thing_spec[cid] = dict(
                parts=_SHAPES[name],
                rgb=np.array(COLOURS[colour], np.float32),
                rgb2=np.array(COLOURS[colour2], np.float32),
                texture=texture,
                max_rot=math.radians(max_rot),
            )
        self.stuff: list[ClassInfo] = []
        self._stuff_spec: dict[int, dict] = {}
        for name, base, desc, prep, syns, held in _STUFF:
            cid = stuff_ids[name]
            definition = f"{name.capitalize()} is {desc}, found in the background of a scene."
            self.stuff.append(
                ClassInfo(
                    cid, name, list(syns), list(held), definition, False, False, [], "", "region", "stuff"
                )
            )
            self._stuff_spec[cid] = dict(rgb=base, prep=prep)
        self.classes: list[ClassInfo] = self.things + self.stuff
        self._by_id = {c.id: c for c in self.classes}
        self._prefer_users = {
            s.id: [t.id for t in self.things if s.id in t.preferred_stuff] for s in self.stuff
        }
        # local extents of each thing shape (sample the union SDF on a grid) -> boundary points for boxes
        g = np.linspace(-1.6, 1.6, 161)
        vv, uu = np.meshgrid(g, g, indexing="ij")
        self._outline: dict[int, np.ndarray] = {}
        for t in self.things:
            d = np.min(np.stack([f(uu, vv) for f, _c in self._thing_spec[t.id]["parts"]]), 0)
            inside = d <= 0
            if inside[0].any() or inside[-1].any() or inside[:, 0].any() or inside[:, -1].any():
                raise AssertionError(f"shape {t.name} exceeds its local extent")
            edge = inside & ~(
                np.roll(inside, 1, 0)
                & np.roll(inside, -1, 0)
                & np.roll(inside, 1, 1)
                & np.roll(inside, -1, 1)
            )
            pts = np.stack([uu[edge], vv[edge]], 1)  # (P, 2)
            self._outline[t.id] = pts[ConvexHull(pts).vertices]  # the hull has the same rotated boxes
        self._check_vocabulary()

    def _check_vocabulary(self) -> None:
        """Held-out synonyms must not be spelled by any caption unit (names, synonyms, templates, colours)."""
        units = [
            t
            for c in self.classes
            for t in [c.name, _plural(c.name)] + [x for s in c.caption_synonyms for x in (s, _plural(s))]
        ]
        units += _TEMPLATES_THINGS + _TEMPLATES_STUFF + list(COLOURS) + list(_COUNT_WORDS.values())
        units += [s["prep"] for s in self._stuff_spec.values()]
        for c in self.classes:
            if (
                not 3 <= len(c.synonyms) <= 6
                or not c.heldout_synonyms
                or not set(c.heldout_synonyms) <= set(c.synonyms)
            ):
                raise AssertionError(
                    f"class {c.name}: needs 3-6 synonyms and >= 1 held-out synonym among them"
                )
            for h in c.heldout_synonyms:
                pat = re.compile(r"\b" + re.escape(h) + r"\b")
                bad = [u for u in units if pat.search(u)]
                if bad:
                    raise AssertionError(
                        f"held-out synonym {h!r} of {c.name} is spelled by caption unit(s) {bad}"
                    )

    def class_by_id(self, category_id: int) -> ClassInfo:
        try:
            return self._by_id[int(category_id)]
        except KeyError:
            raise KeyError(
                f"unknown micro-world category id {category_id}; valid ids 1..{len(self.classes)}"
            ) from None

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def thing_ids(self) -> list[int]:
        return [c.id for c in self.things]

    @property
    def stuff_ids(self) -> list[int]:
        return [c.id for c in self.stuff]

    def categories(self) -> list[dict]:
        """COCO panoptic-style category dicts (with ``isthing``, ``synonyms``, ``definition``, ``split``)."""
        out = []
        for c in self.classes:
            rgb = self._thing_spec[c.id]["rgb"] if c.isthing else self._stuff_spec[c.id]["rgb"]
            out.append(
                dict(
                    id=c.id,
                    name=c.name,
                    supercategory="thing" if c.isthing else "stuff",
                    isthing=int(c.isthing),
                    color=[int(x) for x in rgb],
                    synonyms=list(c.synonyms),
                    heldout_synonyms=list(c.heldout_synonyms),
                    definition=c.definition,
                    split=c.split,
                )
            )
        return out

    # -- layout -------------------------------------------------------------------------------------------
    def _rng(self, i: int) -> np.random.Generator:
        if i < 0:
            raise ValueError(f"scene index must be >= 0, got {i}")
        return np.random.default_rng([self.seed, int(i)])

    def _grid_basis(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel-centre coordinates (n,) and RBF bases (n, 4), (n, 8) of an n x n raster (cached)."""
        if n not in self._basis_cache:
            t = (np.arange(n) + 0.5) / n
            self._basis_cache[n] = (t, _rbf_basis(t, 4), _rbf_basis(t, 8))
        return self._basis_cache[n]

    def _fields(self, stuff, coarse, fine, anchors, offset, x, y, grid: bool, bases=None) -> np.ndarray:
        """Stuff fields at points: ``grid=False``: paired 1-D arrays x, y -> (K, P); ``grid=True``: the
        raster y x x -> (K, len(y), len(x)). Field k = RBF(4x4 grid) + 0.5 RBF(8x8 grid) + 2.2 bump at the
        anchor (+ 3 (0.35 - y) for sky, which therefore sits at the top)."""
        if bases is None:
            bx4, bx8 = _rbf_basis(x, 4), _rbf_basis(x, 8)
            by4, by8 = _rbf_basis(y, 4), _rbf_basis(y, 8)
        else:
            bx4, bx8 = bases
            by4, by8 = bases
        ex = np.exp(-0.5 * ((x[None, :] - anchors[:, :1]) / 0.2) ** 2)  # (K, P)
        ey = np.exp(-0.5 * ((y[None, :] - anchors[:, 1:]) / 0.2) ** 2)
        sky = np.array([self._by_id[s].name == "sky" for s in stuff], np.float64)
        if grid:
            f = (
                by4 @ coarse @ bx4.T
                + 0.5 * (by8 @ fine @ bx8.T)
                + 2.2 * ey[:, :, None] * ex[:, None, :]
                + 3.0 * sky[:, None, None] * (0.35 - y)[None, :, None]
                + offset[:, None, None]
            )
        else:
            f = (
                np.einsum("pi,kij,pj->kp", by4, coarse, bx4)
                + 0.5 * np.einsum("pi,kij,pj->kp", by8, fine, bx8)
                + 2.2 * ey * ex
                + 3.0 * sky[:, None] * (0.35 - y)[None, :]
                + offset[:, None]
            )
        return f

    def _stuff_at(self, stuff, coarse, fine, anchors, offset, x, y) -> np.ndarray:
        """Stuff category id at normalised points (x, y) (the same function the raster samples)."""
        if len(stuff) == 1:
            return np.full(np.shape(x), stuff[0])
        f = self._fields(
            stuff, coarse, fine, anchors, offset, np.asarray(x, float), np.asarray(y, float), grid=False
        )
        return np.asarray(stuff)[_argmax0(f)]

    def stuff_at(self, layout: SceneLayout, x, y) -> np.ndarray:
        """Stuff category id of ``layout`` at normalised points (x, y) (arrays of equal shape), before things
        are drawn: exactly the function the raster samples at pixel centres ((c + 0.5) / size, ...)."""
        return self._stuff_at(
            layout.stuff,
            layout.coarse,
            layout.fine,
            layout.anchors,
            layout.offset,
            np.asarray(x, float),
            np.asarray(y, float),
        )

    def _box_of(self, cid: int, cx: float, cy: float, r: float, rot: float, flip: bool) -> np.ndarray:
        p = self._outline[cid]
        u = -p[:, 0] if flip else p[:, 0]
        c, s = math.cos(rot), math.sin(rot)
        x = cx + r * (c * u - s * p[:, 1])
        y = cy + r * (s * u + c * p[:, 1])
        h = r * 1.6 / 80  # half a grid step of the outline sampling
        return np.array([x.min() - h, y.min() - h, x.max() + h, y.max() + h])

    def layout(self, i: int) -> SceneLayout:
        """Sample the scene description of index ``i`` (no rasterisation)."""
        rng = self._rng(i)
        n_target = int(rng.integers(1, self.max_things + 1))
        classes = [self.things[int(k)].id for k in rng.integers(0, len(self.things), size=n_target)]
        ctx = rng.random(n_target) < self.context_bias
        # stuff set: one preferred stuff per context-biased thing (re-using one already chosen when possible),
        # at most 3; a biased thing whose preferences cannot fit is re-drawn among classes that prefer a
        # chosen stuff
        n_stuff = int(rng.integers(1, 4))
        stuff: list[int] = []
        target: list[int | None] = [None] * n_target
        for j in range(n_target):
            if not ctx[j]:
                continue
            prefs = self._by_id[classes[j]].preferred_stuff
            common = [p for p in prefs if p in stuff]
            if common:
                target[j] = common[int(rng.integers(len(common)))]
            elif len(stuff) < 3:
                target[j] = prefs[int(rng.integers(len(prefs)))]
                stuff.append(target[j])
            else:
                target[j] = stuff[int(rng.integers(len(stuff)))]
                users = self._prefer_users[target[j]]
                classes[j] = users[int(rng.integers(len(users)))]
        n_stuff = max(n_stuff, len(stuff))
        others = [s for s in self.stuff_ids if s not in stuff]
        rng.shuffle(others)
        stuff += others[: n_stuff - len(stuff)]
        K = len(stuff)
        coarse = rng.normal(size=(K, 4, 4))
        fine = rng.normal(size=(K, 8, 8))
        # anchors spread out: the first of 16 candidates at distance >= 0.35 from the previous anchors
        cands = rng.uniform(0.1, 0.9, size=(K, 16, 2))
        anchors = np.zeros((K, 2))
        for k in range(K):
            if self._by_id[stuff[k]].name == "sky":
                cands[k, :, 1] = 0.05 + cands[k, :, 1] * 0.375  # sky anchors near the top
            dist = np.hypot(
                cands[k, :, None, 0] - anchors[None, :k, 0], cands[k, :, None, 1] - anchors[None, :k, 1]
            )
            good = np.flatnonzero((dist >= 0.35).all(1))
            anchors[k] = cands[k, good[0] if len(good) else 0]
        tex_offset = rng.random((K, 2))
        stuff_gain = rng.uniform(0.9, 1.1, size=K)
        # stuff labels on the layout lattice: points ((c + 0.5) / G, (r + 0.5) / G), G = 64; a stuff class
        # whose
        # area there is < 12 % gets its field raised until it is not
        G = _LAYOUT_GRID
        offset = np.zeros(K)
        if K > 1:
            t, b4, b8 = self._grid_basis(G)
            base = self._fields(stuff, coarse, fine, anchors, offset, t, t, True, (b4, b8))
            for _ in range(40):
                lab = _argmax0(base + offset[:, None, None])
                stuff_area = np.bincount(lab.ravel(), minlength=K) / lab.size
                if stuff_area.min() >= 0.12:
                    break
                offset[int(np.argmin(stuff_area))] += 0.2
            inner = self._inner
            cells = {k: np.flatnonzero(((lab == k) & inner).ravel()) for k in range(K)}
        else:
            stuff_area = np.ones(1)

        things: list[ThingLayout] = []
        boxes: list[np.ndarray] = []
        dropped = 0
        lo, hi = math.log(self.radius[0]), math.log(self.radius[1])
        for j in range(n_target):
            cid = classes[j]
            spec = self._thing_spec[cid]
            placed = False
            if target[j] is not None and K > 1:
                # context-biased: centres on lattice points whose stuff label is the target (exact: the raster
                # and _stuff_at evaluate the same field function)
                cl = cells[stuff.index(target[j])]
                if len(cl) == 0:
                    cl = np.flatnonzero(lab.ravel() == stuff.index(target[j]))
                sel = cl[rng.integers(0, len(cl), size=48)]
                cand_all = np.stack([(sel % G + 0.5) / G, (sel // G + 0.5) / G], 1)
            else:
                cand_all = rng.uniform(0.08, 0.92, size=(48, 2))  # (C, 2) candidate centres
            for attempt in range(4):
                r = math.exp(rng.uniform(lo, hi)) * (0.8**attempt) if attempt < 3 else self.radius[0]
                rot = float(rng.uniform(-spec["max_rot"], spec["max_rot"]))
                flip = bool(rng.random() < 0.5)
                cand = cand_all[attempt % 3 :: 3]
                rel = self._box_of(cid, 0.0, 0.0, r, rot, flip)
                cb = np.concatenate([cand, cand], 1) + rel[None]  # (C, 4) boxes
                # at most 20 % of the box width/height may lie outside the image (truncated objects)
                # (the last, smallest attempt allows up to 45 %)
                lim = 0.2 if attempt < 3 else 0.45
                mx, my = lim * (rel[2] - rel[0]), lim * (rel[3] - rel[1])
                ok = (cb[:, 0] >= -mx) & (cb[:, 1] >= -my) & (cb[:, 2] <= 1 + mx) & (cb[:, 3] <= 1 + my)
                if boxes:
                    ok &= self._overlap_ok(cb, np.stack(boxes))
                hit = np.flatnonzero(ok)
                if len(hit):
                    cx, cy = cand[hit[0]]
                    things.append(
                        ThingLayout(
                            cid,
                            float(cx),
                            float(cy),
                            r,
                            rot,
                            flip,
                            rng.uniform(-14, 14, size=3).astype(np.float32),
                            float(rng.uniform(0.88, 1.1)),
                            target[j] is not None,
                            cb[hit[0]],
                        )
                    )
                    boxes.append(cb[hit[0]])
                    placed = True
                    break
            if not placed:
                dropped += 1
        captions, terms = self._captions(rng, things, stuff, stuff_area)
        return SceneLayout(
            int(i),
            stuff,
            coarse,
            fine,
            anchors,
            offset,
            tex_offset,
            stuff_gain,
            stuff_area,
            things,
            captions,
            terms,
            dropped,
        )

    def _overlap_ok(self, cand: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(C,) bool: candidate boxes (C, 4) whose IoU with every placed box (B, 4) is <= max_iou and that
        neither cover nor are covered by more than max_cover of the smaller box."""
        ix = np.clip(
            np.minimum(cand[:, None, 2], boxes[None, :, 2]) - np.maximum(cand[:, None, 0], boxes[None, :, 0]),
            0,
            None,
        )
        iy = np.clip(
            np.minimum(cand[:, None, 3], boxes[None, :, 3]) - np.maximum(cand[:, None, 1], boxes[None, :, 1]),
            0,
            None,
        )
        inter = ix * iy  # (C, B)
        a = ((cand[:, 2] - cand[:, 0]) * (cand[:, 3] - cand[:, 1]))[:, None]
        b = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None, :]
        iou = inter / (a + b - inter)
        cover = inter / np.minimum(a, b)
        return ((iou <= self.max_iou) & (cover <= self.max_cover)).all(1)

    # -- captions ---------------------------------------------------------------------------------------
    def _surface(self, rng: np.random.Generator, c: ClassInfo) -> str:
        syn = c.caption_synonyms
        if not syn or rng.random() < self.main_name_prob:
            return c.name
        cum = np.cumsum(1.0 / np.arange(1, len(syn) + 1))  # Zipf weights 1/rank
        return syn[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(syn) - 1)]

    def _captions(
        self, rng, things, stuff, stuff_area, first: int | None = None
    ) -> tuple[list[str], list[list[tuple[int, str]]]]:
        """Captions naming 1..3 of ``things``' classes (random order; ``first``, when given, is always
        named) and, sometimes, a stuff class covering >= 15 %."""
        counts: dict[int, int] = {}
        for t in things:
            counts[t.category_id] = counts.get(t.category_id, 0) + 1
        big_stuff = [s for s, a in zip(stuff, stuff_area) if a >= 0.15]
        caps, terms = [], []
        for _ in range(self.captions_per_scene):
            used: list[tuple[int, str]] = []
            ids = list(counts)
            rng.shuffle(ids)
            if not ids:  # a scene whose things were all dropped: describe the stuff
                s = self._by_id[stuff[int(np.argmax(stuff_area))]]
                name = self._surface(rng, s)
                caps.append(f"a photo of the {name}.")
                terms.append([(s.id, name)])
                continue
            k = min(len(ids), int(rng.integers(1, 4)))
            if first is not None and first not in ids[:k]:
                ids[int(rng.integers(k))] = first  # the chosen thing is always named, at a random place
            phrases = []
            for cid in ids[:k]:
                c = self._by_id[cid]
                name = self._surface(rng, c)
                used.append((cid, name))
                n = counts[cid]
                if n == 1:
                    if rng.random() < 0.3:
                        phrases.append(f"{_article(c.colour)} {c.colour} {name}")
                    else:
                        phrases.append(f"{_article(name)} {name}")
                else:
                    phrases.append(f"{_COUNT_WORDS.get(n, 'several')} {_plural(name)}")
            tp = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            if big_stuff and rng.random() < 0.5:
                s = self._by_id[big_stuff[int(rng.integers(len(big_stuff)))]]
                sname = self._surface(rng, s)
                used.append((s.id, sname))
                tmpl = _TEMPLATES_STUFF[int(rng.integers(len(_TEMPLATES_STUFF)))]
                cap = tmpl.format(t=tp, p=self._stuff_spec[s.id]["prep"], s=sname)
            else:
                cap = _TEMPLATES_THINGS[int(rng.integers(len(_TEMPLATES_THINGS)))].format(t=tp)
            caps.append(cap)
            terms.append(used)
        return caps, terms

    # -- rasterisation ----------------------------------------------------------------------------------
    def _texture(self, cid: int, size: int) -> np.ndarray:
        """(2*size, 2*size, 3) float32 tiled texture (so an offset window is a view)."""
        per = self._tex_cache.setdefault(size, {})
        if cid not in per:
            if len(self._tex_cache) > 4:  # keep memory bounded when sizes vary
                for key in list(self._tex_cache)[:-1]:
                    if key != size:
                        del self._tex_cache[key]
                per = self._tex_cache.setdefault(size, {})
            c = self._by_id[cid]
            tile = _stuff_texture(c.name, self._stuff_spec[cid]["rgb"], self.seed, size)
            per[cid] = np.tile(tile, (2, 2, 1))
        return per[cid]

    def _render_stuff(self, lay: SceneLayout, size: int) -> tuple[np.ndarray, np.ndarray]:
        """image (S, S, 3) float32 and stuff index map (S, S) int (index into lay.stuff)."""
        K = len(lay.stuff)
        if K > 1:
            t, b4, b8 = self._grid_basis(size)
            lab = _argmax0(
                self._fields(lay.stuff, lay.coarse, lay.fine, lay.anchors, lay.offset, t, t, True, (b4, b8))
            )
        else:
            lab = np.zeros((size, size), np.int64)
        img = None
        for k, sid in enumerate(lay.stuff):
            tex = self._texture(sid, size)
            ox, oy = (lay.tex_offset[k] * size).astype(int)
            win = tex[oy : oy + size, ox : ox + size]
            if img is None:
                img = win * np.float32(lay.stuff_gain[k])
            else:
                np.copyto(img, win * np.float32(lay.stuff_gain[k]), where=(lab == k)[..., None])
        return img, lab

    def _draw_thing(self, img: np.ndarray, owner: np.ndarray, k: int, th: ThingLayout, size: int) -> None:
        spec = self._thing_spec[th.category_id]
        x0 = max(int(math.floor(th.box[0] * size)) - 1, 0)
        y0 = max(int(math.floor(th.box[1] * size)) - 1, 0)
        x1 = min(int(math.ceil(th.box[2] * size)) + 1, size)
        y1 = min(int(math.ceil(th.box[3] * size)) + 1, size)
        if x1 <= x0 or y1 <= y0:
            return
        R = th.r * size
        dx = ((np.arange(x0, x1) + 0.5) - th.cx * size) / R
        dy = ((np.arange(y0, y1) + 0.5) - th.cy * size) / R
        c, s = math.cos(th.rot), math.sin(th.rot)
        u = c * dx[None, :] + s * dy[:, None]  # inverse rotation: local = R(-rot) (p - centre)
        v = -s * dx[None, :] + c * dy[:, None]
        if th.flip:
            u = -u
        rgb = spec["rgb"] * th.gain + th.tint
        rgb2 = spec["rgb2"] * th.gain + th.tint
        tex = spec["texture"]
        if tex == "stripes":
            p = np.clip(0.5 + 1.6 * np.sin(2 * math.pi * 2.2 * v), 0, 1)
        elif tex == "dots":
            qu = np.mod(u / 0.45, 1.0) - 0.5
            qv = np.mod(v / 0.45, 1.0) - 0.5
            p = np.clip(0.5 - (np.sqrt(qu * qu + qv * qv) * 0.45 - 0.11) * R, 0, 1)
        elif tex == "checker":
            p = np.clip(0.5 + 2.0 * np.sin(math.pi * u / 0.5) * np.sin(math.pi * v / 0.5), 0, 1)
        else:
            p = None
        shade = (1.0 - 0.1 * v)[..., None]  # (h, w, 1) light from the top
        if p is not None:
            main = (rgb + (rgb2 - rgb) * p[..., None]) * shade  # (h, w, 3)
        else:
            main = rgb * shade
        win = img[y0:y1, x0:x1]
        dmin = None
        for f, slot in spec["parts"]:
            d = f(u, v) * R  # (h, w) signed distance in pixels
            a = np.clip(0.5 - d, 0.0, 1.0)[..., None]  # analytic edge coverage
            if isinstance(slot, str):
                col = main if slot == "main" else rgb2 * shade
            else:
                col = np.asarray(slot, np.float32) * shade
            win += a * (col - win)
            dmin = d if dmin is None else np.minimum(dmin, d)
        owner[y0:y1, x0:x1][dmin < 0] = k

    def sample(self, i: int, size: int = 64, annotations: bool = True) -> Scene:
        """Rasterise scene ``i`` at ``size`` x ``size`` px. ``annotations=False`` skips masks/segments
        (``masks``/``boxes``/``labels``/``segments`` empty; ``semantic``/``panoptic`` still filled)."""
        if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
        size = int(size)
        lay = self.layout(i)
        img, lab = self._render_stuff(lay, size)
        K = len(lay.stuff)
        owner = lab.copy()  # < K: stuff k; >= K: thing k - K
        for k, th in enumerate(lay.things):
            self._draw_thing(img, owner, K + k, th, size)
        image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        nt = len(lay.things)
        seg_cat = np.array(lay.stuff + [t.category_id for t in lay.things], np.int64)
        seg_id = np.array(
            [s * 1000 for s in lay.stuff] + [t.category_id * 1000 + 1 + k for k, t in enumerate(lay.things)],
            np.int64,
        )
        semantic = seg_cat[owner]
        panoptic = seg_id[owner]
        mentions = {cid for cap in lay.terms for cid, _n in cap}
        if not annotations:
            return Scene(
                int(i),
                image,
                np.zeros((0, size, size), bool),
                np.zeros((0, 4), np.float32),
                np.zeros(0, np.int64),
                semantic,
                panoptic,
                [],
                lay.captions,
                mentions,
                lay.terms,
                lay,
            )
        counts = np.bincount(owner.ravel(), minlength=K + nt)
        onehot = owner[None] == np.arange(K + nt)[:, None, None]  # (K + nt, S, S) one mask per segment
        rows, cols = onehot.any(2), onehot.any(1)  # (K + nt, S)
        y0, y1 = rows.argmax(1), size - rows[:, ::-1].argmax(1)
        x0, x1 = cols.argmax(1), size - cols[:, ::-1].argmax(1)
        masks, boxes, labels, segments = [], [], [], []
        for k in range(K + nt):
            if counts[k] == 0:
                if k >= K:
                    log.warning(
                        "scene %d at %d px: thing %d (%s) has no visible pixel; left out",
                        i,
                        size,
                        k - K,
                        self._by_id[int(seg_cat[k])].name,
                    )
                continue
            bx = [float(x0[k]), float(y0[k]), float(x1[k]), float(y1[k])]
            seg = dict(
                id=int(seg_id[k]),
                category_id=int(seg_cat[k]),
                isthing=k >= K,
                bbox=[bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]],
                area=int(counts[k]),
            )
            if k >= K:
                masks.append(onehot[k])
                boxes.append(bx)
                labels.append(int(seg_cat[k]))
            segments.append(seg)
        segments = [s for s in segments if s["isthing"]] + [s for s in segments if not s["isthing"]]
        return Scene(
            int(i),
            image,
            np.stack(masks) if masks else np.zeros((0, size, size), bool),
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int64),
            semantic,
            panoptic,
            segments,
            lay.captions,
            mentions,
            lay.terms,
            lay,
        )

    def object_view(
        self,
        i: int,
        size: int = 64,
        render_size: int = 128,
        context: tuple[float, float] = (1.2, 2.5),
    ) -> tuple[np.ndarray, list[str], int]:
        """An object-centric view of scene ``i``: a square window around one of its things, cut from the
        scene rasterised at ``render_size`` and resized to ``size`` (PIL bilinear, antialiased).

        The thing is drawn uniformly; the window side is ``s * max(box w, box h)`` of its full (unoccluded)
        box, ``s`` log-uniform in ``context``, shifted to stay inside the image (side capped at the image).
        The captions (``captions_per_scene`` of them, same generator and vocabulary as :meth:`layout`'s) name
        the things whose box centre lies in the window -- always the chosen one -- and a stuff class
        covering >= 15 % of the window. Random choices come from ``default_rng([seed, i, 2])``, so the
        view of ``i`` is deterministic and independent of the scene's own captions. A scene whose things
        were all dropped gives its full image and captions. Returns ``(image (size, size, 3) uint8,
        captions, category id of the chosen thing or 0)``. Real caption corpora hold many such close-ups;
        region-crop evaluation (things expanded 1.5x, resized to the CLIP input) sees this kind of image.
        """
        from PIL import Image

        if not 1.0 <= context[0] <= context[1]:
            raise ValueError(f"context must be (lo, hi) with 1 <= lo <= hi, got {context!r}")
        sc = self.sample(i, render_size, annotations=False)
        lay = sc.layout  # the scene's own layout (not computed a second time: ~20 % of a stream item's time)
        if not lay.things:
            img = np.asarray(Image.fromarray(sc.image).resize((size, size), Image.BILINEAR))
            return img, list(lay.captions), 0
        rng = np.random.default_rng([self.seed, int(i), 2])
        th = lay.things[int(rng.integers(len(lay.things)))]
        bx = th.box
        cx, cy = (bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2
        lo, hi = math.log(context[0]), math.log(context[1])
        side = min(1.0, math.exp(rng.uniform(lo, hi)) * max(bx[2] - bx[0], bx[3] - bx[1]))
        wx0 = min(max(cx - side / 2, 0.0), 1.0 - side)
        wy0 = min(max(cy - side / 2, 0.0), 1.0 - side)
        R = render_size
        x0, y0 = int(round(wx0 * R)), int(round(wy0 * R))
        n = max(1, int(round(side * R)))
        x0, y0 = min(x0, R - n), min(y0, R - n)
        crop = sc.image[y0 : y0 + n, x0 : x0 + n]
        img = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
        # things and stuff of the window; the chosen thing first so a one-thing caption can name it
        ex0, ey0, ex1, ey1 = x0 / R, y0 / R, (x0 + n) / R, (y0 + n) / R
        inside = [
            t
            for t in lay.things
            if t is not th and ex0 <= (t.box[0] + t.box[2]) / 2 <= ex1 and ey0 <= (t.box[1] + t.box[3]) / 2 <= ey1
        ]
        sem = sc.semantic[y0 : y0 + n, x0 : x0 + n]
        area = np.array([(sem == s).mean() for s in lay.stuff])
        caps, _terms = self._captions(rng, [th] + inside, lay.stuff, area, first=th.category_id)
        return img, caps, th.category_id

    def class_image(
        self, category_id: int, size: int = 64, background: int | None = None, rot: float = 0.0
    ) -> np.ndarray:
        """(size, size, 3) uint8 picture of one class for class sheets: a thing centred (radius 0.3) on
        ``background`` (a stuff id; default its first preferred stuff), or a stuff texture."""
        c = self.class_by_id(category_id)
        if not c.isthing:
            return np.clip(self._texture(c.id, size)[:size, :size] + 0.5, 0, 255).astype(np.uint8)
        bg = background if background is not None else c.preferred_stuff[0]
        img = self._texture(bg, size)[:size, :size].copy()
        owner = np.zeros((size, size), np.int64)
        r = 0.3
        th = ThingLayout(
            c.id,
            0.5,
            0.5,
            r,
            rot,
            False,
            np.zeros(3, np.float32),
            1.0,
            False,
            self._box_of(c.id, 0.5, 0.5, r, rot, False),
        )
        self._draw_thing(img, owner, 1, th, size)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    def scene_mosaic(self, indices: Sequence[int], size: int = 64, cols: int = 8) -> np.ndarray:
        """(rows*(size+2)-2, cols*(size+2)-2, 3) uint8 grid of scenes ``indices`` (first chapter's figure)."""
        return mosaic([self.sample(i, size, annotations=False).image for i in indices], cols)

    def class_sheet(self, size: int = 64, cols: int = 9) -> tuple[np.ndarray, list[ClassInfo]]:
        """A grid of :meth:`class_image` tiles of every class (things then stuff) and the classes in tile
        order
        (row-major), so a figure can print each tile's names."""
        return mosaic([self.class_image(c.id, size) for c in self.classes], cols), list(self.classes)

    # -- export -----------------------------------------------------------------------------------------
    def export_coco(
        self,
        root: str | Path,
        split: str = "val2017",
        n: int = 100,
        size: int = 160,
        start: int | None = None,
        progress: bool = True,
    ) -> Path:
        """Write scenes ``start .. start+n-1`` in the COCO 2017 layout under ``root`` (see module docstring).

        ``start`` defaults to :data:`SPLIT_START` of the split (0 for unknown split names).
        Image ids are ``index + 1``; files ``{split}/{image_id:012d}.png``.
        Instances hold thing annotations and thing categories (as real COCO); panoptic holds things and stuff.
        """
        from PIL import Image
        from pycocotools import mask as mask_utils
        from tqdm.auto import tqdm

        root = Path(root)
        start = SPLIT_START.get(split, 0) if start is None else int(start)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        img_dir, ann_dir = root / split, root / "annotations"
        pan_dir = ann_dir / f"panoptic_{split}"
        for d in (img_dir, ann_dir, pan_dir):
            d.mkdir(parents=True, exist_ok=True)
        cats = self.categories()
        thing_cats = [c for c in cats if c["isthing"]]
        images, inst, pan, caps = [], [], [], []
        ann_id = cap_id = 1
        for i in tqdm(range(start, start + n), desc=f"micro world {split}", disable=not progress or tqdm_disabled()):
            sc = self.sample(i, size)
            image_id = i + 1
            fname = f"{image_id:012d}.png"
            Image.fromarray(sc.image).save(img_dir / fname)
            images.append(dict(id=image_id, file_name=fname, width=size, height=size, license=0))
            for m, lab in zip(sc.masks, sc.labels):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                inst.append(
                    dict(
                        id=ann_id,
                        image_id=image_id,
                        category_id=int(lab),
                        iscrowd=0,
                        area=int(mask_utils.area(rle)),
                        bbox=[x, y, w, h],
                        segmentation=dict(
                            size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii")
                        ),
                    )
                )
                ann_id += 1
            Image.fromarray(id2rgb(sc.panoptic)).save(pan_dir / f"{image_id:012d}.png")
            pan.append(
                dict(
                    image_id=image_id,
                    file_name=f"{image_id:012d}.png",
                    segments_info=[
                        dict(
                            id=s["id"],
                            category_id=s["category_id"],
                            iscrowd=0,
                            bbox=s["bbox"],
                            area=s["area"],
                        )
                        for s in sc.segments
                    ],
                )
            )
            for c in sc.captions:
                caps.append(dict(id=cap_id, image_id=image_id, caption=c))
                cap_id += 1
        info = dict(
            description="ovbook micro world",
            version=str(MICROWORLD_VERSION),
            config=self.config,
            split=split,
            start=start,
            n=n,
            size=size,
        )
        licenses = [dict(id=0, name="generated", url="")]
        dump = lambda obj: json.dumps(obj, separators=(",", ":"))  # noqa: E731
        atomic_write_text(
            dump(dict(info=info, licenses=licenses, images=images, annotations=inst, categories=thing_cats)),
            ann_dir / f"instances_{split}.json",
        )
        atomic_write_text(
            dump(dict(info=info, licenses=licenses, images=images, annotations=pan, categories=cats)),
            ann_dir / f"panoptic_{split}.json",
        )
        atomic_write_text(
            dump(dict(info=info, licenses=licenses, images=images, annotations=caps)),
            ann_dir / f"captions_{split}.json",
        )
        corpus = {
            c.name: dict(
                synonyms=list(c.synonyms), definition=c.definition, heldout_synonyms=list(c.heldout_synonyms)
            )
            for c in self.classes
        }
        atomic_write_text(json.dumps(corpus, indent=1), ann_dir / "synonyms.json")
        return root


def mosaic(images: Sequence[np.ndarray], cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 images row-major, ``pad`` px of ``fill`` between tiles."""
    if not images:
        raise ValueError("mosaic needs at least one image")
    H, W = images[0].shape[:2]
    rows = -(-len(images) // cols)
    out = np.full((rows * (H + pad) - pad, cols * (W + pad) - pad, 3), fill, np.uint8)
    for k, im in enumerate(images):
        if im.shape[:2] != (H, W):
            raise ValueError(f"mosaic: image {k} is {im.shape[:2]}, expected {(H, W)}")
        r, c = divmod(k, cols)
        out[r * (H + pad) : r * (H + pad) + H, c * (W + pad) : c * (W + pad) + W] = im
    return out


# ----------------------------------------------------------------------------------------------------------
# idempotent export
# ----------------------------------------------------------------------------------------------------------
def _export_files(root: Path, split: str) -> list[Path]:
    a = root / "annotations"
    return [
        a / f"instances_{split}.json",
        a / f"panoptic_{split}.json",
        a / f"captions_{split}.json",
        a / "synonyms.json",
    ]


def export_hash(split: str = "val2017", n: int = 200, size: int = 160, seed: int = 0, start: int | None = None,
                **world_kwargs) -> str:
    """The content key of an export (world config, split, n, size, start): what its manifest stores, and the data
    manifest of a training run (:mod:`ovlib.study`)."""
    world = MicroWorld(seed=seed, **world_kwargs)
    start = SPLIT_START.get(split, 0) if start is None else int(start)
    return config_hash(dict(world=world.config, split=split, n=int(n), size=int(size), start=start))


def ensure_microworld(
    root: str | Path = "data/microworld",
    split: str = "val2017",
    n: int = 200,
    size: int = 160,
    seed: int = 0,
    start: int | None = None,
    progress: bool = True,
    **world_kwargs,
) -> Path:
    """Export the micro world split to ``root`` unless an identical export is already there; return ``root``.

    The manifest ``root/annotations/manifest_{split}.json`` (written last) stores the config hash of
    (world config, split, n, size, start); a missing/mismatched manifest or a missing file triggers a clean
    re-export of that split (an export killed half-way has no manifest, so it is redone).
    """
    root = Path(root)
    world = MicroWorld(seed=seed, **world_kwargs)
    start = SPLIT_START.get(split, 0) if start is None else int(start)
    h = export_hash(split, n, size, seed, start, **world_kwargs)
    manifest = root / "annotations" / f"manifest_{split}.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            old = {}
        files_ok = all(p.is_file() for p in _export_files(root, split))
        n_png = sum(1 for _ in (root / split).glob("*.png")) if (root / split).is_dir() else 0
        if old.get("hash") == h and files_ok and n_png == n:
            return root
        log.info("micro world export at %s (%s) is stale or incomplete; re-exporting", root, split)
    if manifest.exists():
        manifest.unlink()
    for d in (root / split, root / "annotations" / f"panoptic_{split}"):
        if d.is_dir():
            shutil.rmtree(d)
    world.export_coco(root, split=split, n=n, size=size, start=start, progress=progress)
    cfg = dict(world=world.config, split=split, n=int(n), size=int(size), start=start)
    atomic_write_text(json.dumps(dict(hash=h, config=cfg), indent=1), manifest)
    return root


# ----------------------------------------------------------------------------------------------------------
# streaming dataset for pre-training
# ----------------------------------------------------------------------------------------------------------
try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError:  # pragma: no cover - torch is a hard dependency of ovlib
    torch = None
    IterableDataset = object


class MicroWorldStream(IterableDataset):
    """Fresh micro-world scenes for CLIP / VFM pre-training, generated on the fly (no disk).

    Worker ``w`` of ``W`` (``torch.utils.data.get_worker_info()``; one worker when used directly) of shard
    ``r`` of ``R`` (DDP: ``shard=rank, num_shards=world_size``) yields indices ``start + p, start + p + R W,
    ...`` with ``p = r W + w``, up to ``stop`` (exclusive; ``None`` = infinite), so the union over ranks and
    workers is exactly ``start, start+1, ...``; resume a run by passing ``start`` = the next index.
    Each item: ``image`` (3, H, W) float32 in [0, 1] (``uint8=True``: uint8), ``caption``: one of the
    scene's captions, chosen by ``np.random.default_rng([world.seed, index, 1])`` (independent of the
    worker layout), ``index``: the scene index, ``labels``: (6,) int64 thing category ids padded with 0.

    ``object_views`` > 0: with that probability (drawn from the same per-index generator) an item is
    :meth:`MicroWorld.object_view` of the scene instead -- a close-up of one thing rendered at
    ``view_render_size`` with ``view_context`` -- its caption one of the view's captions and ``labels``
    the chosen thing's id alone.
    """

    def __init__(
        self,
        world: MicroWorld,
        size: int = 64,
        start: int = 0,
        stop: int | None = None,
        uint8: bool = False,
        shard: int = 0,
        num_shards: int = 1,
        object_views: float = 0.0,
        view_render_size: int = 128,
        view_context: tuple[float, float] = (1.2, 2.5),
    ):
        if not 0.0 <= object_views <= 1.0:
            raise ValueError(f"object_views must be a probability in [0, 1], got {object_views}")
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
        self.world, self.size, self.start, self.stop, self.uint8 = world, int(size), int(start), stop, uint8
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.object_views, self.view_render_size = float(object_views), int(view_render_size)
        self.view_context = (float(view_context[0]), float(view_context[1]))

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an infinite MicroWorldStream (stop=None) has no length")
        return self.stop - self.start

    def indices(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        i = self.start + worker
        while self.stop is None or i < self.stop:
            yield i
            i += num_workers

    def item(self, i: int) -> dict:
        rng = np.random.default_rng([self.world.seed, int(i), 1])
        pick = int(rng.integers(self.world.captions_per_scene))
        if self.object_views > 0 and rng.random() < self.object_views:
            image, caps, cid = self.world.object_view(i, self.size, self.view_render_size, self.view_context)
            ids = [cid] if cid else []
            cap = caps[pick % len(caps)]
        else:
            sc = self.world.sample(i, self.size, annotations=False)
            image, cap = sc.image, sc.captions[pick % len(sc.captions)]
            ids = [t.category_id for t in sc.layout.things]
        img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W) uint8
        if not self.uint8:
            img = img.float().div_(255.0)
        labels = torch.zeros(self.world.max_things, dtype=torch.int64)
        labels[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return dict(image=img, caption=cap, index=int(i), labels=labels)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.indices(self.shard * W + w, self.num_shards * W):
            yield self.item(i)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovlib.data.microworld", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="export a split in COCO format (idempotent)")
    ex.add_argument("--root", default="data/microworld")
    ex.add_argument("--split", default="val2017")
    ex.add_argument("--n", type=int, default=200)
    ex.add_argument("--size", type=int, default=160)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--start", type=int, default=None)
    ex.add_argument("--context-bias", type=float, default=0.7)
    args = ap.parse_args(argv)
    root = ensure_microworld(
        args.root, args.split, args.n, args.size, args.seed, start=args.start, context_bias=args.context_bias
    )
    print(f"micro world {args.split}: {args.n} scenes at {args.size} px in {root}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

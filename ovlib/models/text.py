"""Prompt templates and zero-shot class embeddings (template ensemble, optional synonyms).

``VILD_TEMPLATES`` are the 63 prompt templates of ViLD (Gu et al., ICLR 2022, appendix), the set CLIPSelf,
DeCLIP and SynCLIP use to embed the COCO panoptic classes (``wusize/CLIPSelf:tools/generate_text_embeddings.py``,
convention only). The embedding of a class is the template ensemble of CLIP/ViLD: every prompt is encoded and
L2-normalised, the prompts of a class are averaged, and the mean is renormalised. Names are processed as in
that tool: ``_`` becomes a space, ``/`` becomes ``" or "``, and a template that begins with "a"/"an"/"the" is
prefixed with "This is " (``this_is_prefix``).

``MICRO_TEMPLATES`` are the templates used for the micro world: the six sentence frames of the micro-world
thing captions (``ovlib.data.microworld``: "a photo of a ...", "there is a ...", "a scene with a ...") with
the bare class name in place of the coloured, textured noun phrase, and without the "This is" prefix, which
the micro CLIP never saw. Stuff classes use the same frames.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "VILD_TEMPLATES",
    "MICRO_TEMPLATES",
    "NAME_MODES",
    "process_name",
    "fill_template",
    "class_name_sets",
    "text_embeddings",
]

# ViLD's 63 templates; "{article}" is "a"/"an" chosen from the (processed) class name.
VILD_TEMPLATES: tuple[str, ...] = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)

MICRO_TEMPLATES: tuple[str, ...] = (
    "{article} {}.",
    "a photo of {article} {}.",
    "a picture of {article} {}.",
    "there is {article} {}.",
    "a scene with {article} {}.",
    "an image showing {article} {}.",
)

NAME_MODES = ("main", "first_synonym", "random_synonym", "synonym_ensemble", "heldout_synonym")


def process_name(name: str) -> str:
    """CLIPSelf's name processing: ``_`` -> space, ``/`` -> ``" or "``, surrounding space stripped."""
    return name.replace("_", " ").replace("/", " or ").strip()


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def fill_template(template: str, name: str, this_is_prefix: bool = False) -> str:
    """One prompt. ``this_is_prefix`` adds "This is " before templates that start with a/an/the."""
    name = process_name(name)
    text = template.replace("{article}", _article(name)).replace("{}", name, 1)
    if this_is_prefix and text.split(" ", 1)[0].lower() in ("a", "an", "the"):
        text = "This is " + text
    return text


def _get(c: Any, key: str, default: Any = None) -> Any:
    return c.get(key, default) if isinstance(c, dict) else getattr(c, key, default)


def class_name_sets(classes: Sequence[Any], mode: str = "main", seed: int = 0) -> list[list[str]]:
    """The name(s) that stand for each class (``classes``: ``ClassInfo`` objects or COCO category dicts).

    ``main``: the class name; ``first_synonym``: its first synonym (SynCLIP F-ViT tool ``v1``);
    ``random_synonym``: one synonym drawn with ``seed``; ``synonym_ensemble``: all synonyms (``v3``);
    ``heldout_synonym``: the first held-out synonym (never seen in micro-world captions).
    A class without (held-out) synonyms keeps its main name; such classes are counted and logged, since they
    make a synonym protocol look more robust than it is.
    """
    if mode not in NAME_MODES:
        raise ValueError(f"unknown name mode {mode!r}; choose one of {NAME_MODES}")
    rng = random.Random(seed)
    out: list[list[str]] = []
    kept_main: list[str] = []
    for c in classes:
        name = _get(c, "name")
        if name is None:
            raise ValueError(f"class {c!r} has no 'name'")
        syn = [s for s in (_get(c, "synonyms") or []) if s and s != name]
        held = [s for s in (_get(c, "heldout_synonyms") or []) if s and s != name]
        if mode == "main":
            out.append([name])
        elif mode == "heldout_synonym":
            out.append([held[0]] if held else [name])
            kept_main += [] if held else [name]
        elif not syn:
            out.append([name])
            kept_main.append(name)
        elif mode == "first_synonym":
            out.append([syn[0]])
        elif mode == "random_synonym":
            out.append([rng.choice(syn)])
        else:
            out.append(list(syn))
    if kept_main:
        log.warning("class_name_sets(%s): %d of %d classes have no synonym for this protocol and keep their main "
                    "name: %s", mode, len(kept_main), len(out), kept_main[:10])
    return out


@torch.no_grad()
def text_embeddings(model: Any, tokenizer: Callable, names: Sequence[str | Sequence[str]],
                    templates: Sequence[str] = MICRO_TEMPLATES, this_is_prefix: bool = False,
                    batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """``(C, D)`` unit-norm class embeddings: mean over (names x templates) of unit-norm prompt embeddings,
    renormalised. ``names[i]`` is one name or a list of names (a synonym ensemble) for class ``i``."""
    if not templates:
        raise ValueError("text_embeddings: need at least one template")
    prompts: list[str] = []
    owner: list[int] = []
    for i, n in enumerate(names):
        group = [n] if isinstance(n, str) else list(n)
        if not group:
            raise ValueError(f"text_embeddings: class {i} has no name")
        for name in group:
            for t in templates:
                prompts.append(fill_template(t, name, this_is_prefix))
                owner.append(i)
    was_training = model.training
    model.eval()
    feats = []
    for s in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[s:s + batch_size]).to(device)
        feats.append(F.normalize(model.encode_text(tok).float(), dim=-1))  # (b, D)
    model.train(was_training)
    feats = torch.cat(feats)  # (P, D)
    idx = torch.tensor(owner, device=feats.device)
    summed = torch.zeros(len(names), feats.shape[1], device=feats.device).index_add_(0, idx, feats)
    return F.normalize(summed, dim=-1)  # mean then renormalise == sum then renormalise

"""Named weights from a local directory (``weights_dir``): GPU clusters whose compute nodes have no internet.

Every named weight the chapters use -- an open_clip ``(model, tag)`` pair or a timm DINOv2 name with
``pretrained: hub`` -- has one file name in ``weights_dir`` (a stem + one of ``.safetensors .pth .pt .bin``);
weight -> file -> where to get it:

* open_clip ``ViT-B-16`` / ``openai`` -> ``ViT-B-16.openai.safetensors`` -> the open_clip HF repo's
  ``open_clip_model.safetensors``;
* timm ``vit_base_patch14_dinov2.lvd142m`` -> ``vit_base_patch14_dinov2.lvd142m.safetensors`` -> timm's HF repo
  ``model.safetensors``;
* CLIPSeg decoder ``rd64-uni`` (SynSeg) -> ``rd64-uni.pth`` -> the weights archive linked in
  ``github.com/timojl/clipseg``.

i.e. ``<open_clip model>.<tag>`` and ``<timm name>`` (which already ends in its pretrained tag). The files are
state_dicts of the open_clip / timm model (read with safetensors or ``torch.load(weights_only=True)``); the
original OpenAI TorchScript archives are not state_dicts -- use open_clip's Hugging Face copy. CLIPSeg's decoder
weights are never downloaded by the book: a named CLIPSeg (``method_args: {clipseg: rd64-uni}``) is always read
from ``weights_dir`` (:func:`clipseg_weight_file`).
:func:`ovlib.train.recipes.named_weights` lists every named weight a resolved profile uses (its ``models`` and
every recipe's backbone and VFM); ``python -m ovlib.train.recipes --profile paper`` prints the file names.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WEIGHT_SUFFIXES", "WeightsUnavailable", "clipseg_weight_file", "local_weight_file", "weight_stem",
           "weights_dir_error"]

#: accepted suffixes of a local weight file, in the order they are looked for
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def weight_stem(name: str, tag: str | None = None) -> str:
    """File stem of a named weight: ``"<model>.<tag>"`` for open_clip, the timm name itself for ``tag`` in
    (None, ``"hub"``)."""
    if not name or any(c in name for c in "/\\"):
        raise ValueError(f"not a model name: {name!r}")
    if tag in (None, "hub"):
        return name
    if any(c in tag for c in "/\\"):
        raise ValueError(f"not a pretrained tag: {tag!r}")
    return f"{name}.{tag}"


class WeightsUnavailable(RuntimeError):
    """Named pretrained weights were asked for but cannot be obtained here (offline / download not allowed)."""


def weights_dir_error(weights_dir: str | os.PathLike, stem: str, what: str):
    d = Path(weights_dir)
    others = " / ".join(stem + s for s in WEIGHT_SUFFIXES[1:])
    return WeightsUnavailable(
        f"pretrained weights {what} are not in weights_dir={str(weights_dir)!r}: expected the file "
        f"{d / (stem + WEIGHT_SUFFIXES[0])} (or {others} there); put a state_dict of the model under that name, "
        f"or set the parameter weights_dir to the directory that holds it")


def local_weight_file(weights_dir: str | os.PathLike, name: str, tag: str | None = None, what: str = "") -> Path:
    """The file of ``(name, tag)`` in ``weights_dir``; a :class:`~ovlib.models.clip.WeightsUnavailable` naming the
    ``weights_dir`` parameter and the exact file name when it is absent."""
    stem = weight_stem(name, tag)
    d = Path(weights_dir)
    for suffix in WEIGHT_SUFFIXES:
        f = d / (stem + suffix)
        if f.is_file():
            return f
    raise weights_dir_error(weights_dir, stem, what or f"{tag!r} for {name}")


def clipseg_weight_file(weights_dir: str | os.PathLike, name: str) -> Path:
    """The local file of the named CLIPSeg decoder ``name`` (e.g. ``rd64-uni`` -> ``weights_dir/rd64-uni.pth``);
    a :class:`WeightsUnavailable` naming that file when ``weights_dir`` is unset or does not hold it (CLIPSeg's
    weights come from its GitHub archive, not a model hub: the book never downloads them)."""
    if not str(weights_dir):
        raise WeightsUnavailable(
            f"the CLIPSeg decoder {name!r} (SynSeg's initialisation) is read from a local file: set the parameter "
            f"weights_dir to a directory holding {weight_stem(name)}.pth (CLIPSeg's own state dict, from the weights "
            "archive linked in github.com/timojl/clipseg)")
    return local_weight_file(weights_dir, name, None, what=f"of the CLIPSeg decoder {name!r} (SynSeg)")

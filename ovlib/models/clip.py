"""Loading CLIP models: open_clip names with pretrained tags, local checkpoints, registered micro configs.

:func:`load_clip` returns ``(model, tokenizer, preprocess)`` where ``model`` is an ordinary open_clip model
(``model.encode_image`` / ``model.encode_text`` are open_clip's own), ``tokenizer`` maps a list of strings
to a ``(T, context_length)`` LongTensor and ``preprocess`` is open_clip's evaluation image transform
(PIL image -> normalised ``(3, S, S)`` tensor).

Three sources of weights:

* ``pretrained=None`` -- random initialisation (nothing is downloaded, ever);
* ``pretrained="/path/to/file"`` -- a local checkpoint, read with ``torch.load(weights_only=True)``
  (:func:`ovlib.io.safe_load`) or safetensors; a plain state_dict or ``{"state_dict": ...}``, a leading
  ``module.`` (DDP) is stripped; mismatched keys are a :class:`CheckpointMismatch` listing them;
* ``pretrained="<open_clip tag>"`` (e.g. ``"openai"``, ``"laion2b_s34b_b88k"``) -- open_clip's named weights.
  A copy already in the Hugging Face cache is used without the network. Otherwise the weights are downloaded
  only if ``allow_download`` and the machine is online; offline (``HF_HUB_OFFLINE=1`` or no route to the hub)
  it fails at once, naming the local-file alternative.

OpenAI weights use QuickGELU: with a local copy of them, pass the ``-quickgelu`` name
(``"ViT-B-16-quickgelu"``), as open_clip does.

Micro configs are registered in :data:`MICRO_CLIP_CONFIGS` (name -> :class:`MicroClipConfig`); add a variant
(e.g. for an ablation) with :func:`register_micro_clip`.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ovlib.io import CheckpointError, safe_load
from ovlib.models.weights import WeightsUnavailable, local_weight_file, weight_stem  # re-exported

__all__ = [
    "truncate_towers",
    "TEXT_CONTEXTS",
    "encode_text_trimmed",
    "text_encoder",
    "MicroClipConfig",
    "MICRO_CLIP_CONFIGS",
    "register_micro_clip",
    "load_clip",
    "load_state_dict_checked",
    "read_checkpoint",
    "CheckpointMismatch",
    "WeightsUnavailable",
    "is_offline",
    "OPENAI_MEAN",
    "OPENAI_STD",
]

#: OpenAI CLIP image normalisation (open_clip.constants.OPENAI_DATASET_MEAN/STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_HUB_HOST = ("huggingface.co", 443)


class CheckpointMismatch(CheckpointError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


@dataclass(frozen=True)
class MicroClipConfig:
    """A small open_clip ``CLIP`` built from a custom config (ViT image tower, causal text tower).

    The vision tower has ``vision_width // vision_head_width`` heads; the image size is ``image_size`` and
    the grid ``image_size // patch_size``. The tokenizer is open_clip's real BPE ``SimpleTokenizer``
    (vocabulary 49408 shipped with open_clip) with ``context_length`` tokens.
    """

    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    mlp_ratio: float = 4.0
    context_length: int = 32
    vocab_size: int = 49408
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    extra_vision: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        vision = CLIPVisionCfg(
            layers=self.vision_layers,
            width=self.vision_width,
            head_width=self.vision_head_width,
            patch_size=self.patch_size,
            image_size=self.image_size,
            mlp_ratio=self.mlp_ratio,
            **self.extra_vision,
        )
        text = CLIPTextCfg(
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            width=self.text_width,
            heads=self.text_heads,
            layers=self.text_layers,
        )
        return CLIP(embed_dim=self.embed_dim, vision_cfg=vision, text_cfg=text)


#: Registered micro CLIP configs (name -> config). ``"micro-clip"`` is the book's default backbone.
MICRO_CLIP_CONFIGS: dict[str, MicroClipConfig] = {
    "micro-clip": MicroClipConfig(),
}


def register_micro_clip(name: str, config: MicroClipConfig, overwrite: bool = False) -> None:
    """Register a micro CLIP variant under ``name`` (an error if the name exists, unless ``overwrite``)."""
    if not isinstance(config, MicroClipConfig):
        raise TypeError(f"config for {name!r} must be a MicroClipConfig, got {type(config).__name__}")
    if name in MICRO_CLIP_CONFIGS and not overwrite:
        raise ValueError(f"micro CLIP config {name!r} is already registered")
    MICRO_CLIP_CONFIGS[name] = config


# --------------------------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` safely (weights_only / safetensors).

    Accepts a plain state_dict or a dict with a ``"state_dict"`` (or ``"model"``) entry; strips a leading
    ``module.`` (DDP). Anything else is a :class:`~ovlib.io.CheckpointError` naming the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        obj = safe_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (or {{'state_dict': ...}}), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state_dict, entries that are not str -> Tensor: {bad[:10]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that lists missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:10]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:10]})")
        if shapes:
            parts.append(
                f"{len(shapes)} keys with another shape (first: "
                f"{[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:10]]})"
            )
        raise CheckpointMismatch(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------- offline
def is_offline(timeout: float = 1.5) -> bool:
    """True if ``HF_HUB_OFFLINE`` is set (1/true/yes/on) or the Hugging Face hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return False
    except OSError:
        return True


def _unavailable(what: str, reason: str, local_hint: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"pretrained weights {what} are not available {reason}; download them on a machine with internet "
        f"(they are then read from the Hugging Face cache) or pass {local_hint}"
    )


def _cached_open_clip_file(name: str, tag: str) -> str | None:
    """Path of open_clip's weights for (name, tag) if already in a local cache (no network)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            return None
        repo, filename = os.path.split(hub)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for fn in candidates:
            hit = try_to_load_from_cache(repo_id=repo, filename=fn)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = cfg.get("url", "")
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


# ---------------------------------------------------------------------------------------------- loading
_CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _looks_like_path(p) -> bool:
    s = str(p)
    return isinstance(p, os.PathLike) or os.sep in s or s.endswith(_CKPT_SUFFIXES) or Path(s).is_file()


@functools.lru_cache(maxsize=8)
def _micro_tokenizer(context_length: int) -> Callable:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def _transform(image_size, mean, std) -> Callable:
    from open_clip.transform import image_transform

    return image_transform(image_size, is_train=False, mean=mean, std=std)


#: random initialisations of named models built in this process, key -> what the builder returned (never handed
#: out itself): the builders are deterministic given the seed, so a dry run's ViT-B is initialised once and every
#: later run gets a deep copy (a fraction of an init's cost); the oldest entries go beyond RANDOM_INIT_SLOTS
_RANDOM_INITS: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
RANDOM_INIT_SLOTS = 3


def random_init(key: tuple, build: Callable[[], Any]) -> Any:
    """A deep copy of ``build()``'s result, built once per process for ``key`` (which must determine it: the
    model's name and seed). Only for random initialisations (``pretrained=None``), whose builders seed
    themselves; the global RNG is not touched."""
    if key in _RANDOM_INITS:
        _RANDOM_INITS.move_to_end(key)
    else:
        _RANDOM_INITS[key] = build()
        while len(_RANDOM_INITS) > RANDOM_INIT_SLOTS:
            _RANDOM_INITS.popitem(last=False)
    return copy.deepcopy(_RANDOM_INITS[key])


def _keep_blocks(owner: nn.Module, attr: str, depth: int, what: str) -> None:
    """``owner.<attr>`` (an ``nn.ModuleList`` / ``nn.Sequential`` of blocks) cut to its first ``depth`` blocks, as
    timm's and open_clip's ``prune_intermediate_layers`` cut theirs; a block count recorded beside (open_clip's
    ``Transformer.layers``) follows."""
    blocks = getattr(owner, attr)
    if depth > len(blocks):
        raise ValueError(f"depth {depth} exceeds the {len(blocks)} blocks of the {what}")
    setattr(owner, attr, blocks[:depth])
    if isinstance(getattr(owner, "layers", None), int):
        owner.layers = depth


def truncate_towers(model: nn.Module, depth: int) -> nn.Module:
    """Keep the first ``depth`` transformer blocks of every tower of ``model`` (in place; returns it): a CLIP's
    image tower (open_clip ``VisionTransformer`` or a timm trunk) and text tower, or a timm ViT (a VFM). The dry
    run's reduced size (``dry_run_settings.depth``): the architecture's code path, at a fraction of its depth."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    towers = []
    v = getattr(model, "visual", None)
    if v is not None:  # a CLIP
        towers.append((v.trunk, "blocks", "image trunk") if hasattr(v, "trunk") else
                      (v.transformer, "resblocks", "image tower"))
        text = model.text if hasattr(model, "text") else model  # CustomTextCLIP keeps its text tower in .text
        if hasattr(text, "transformer"):
            towers.append((text.transformer, "resblocks", "text tower"))
    elif hasattr(model, "blocks"):  # a timm ViT
        towers.append((model, "blocks", "ViT"))
    else:
        raise TypeError(f"truncate_towers: no transformer towers found in {type(model).__name__}")
    for owner, attr, what in towers:
        _keep_blocks(owner, attr, depth, what)
    return model


#: How a training loop runs the text tower (:func:`text_encoder`): ``"full"`` -- open_clip's ``encode_text`` over
#: all ``context_length`` positions; ``"trim"`` -- :func:`encode_text_trimmed`, the same function computed on the
#: positions up to the batch's last end-of-text token only.
TEXT_CONTEXTS = ("trim", "full")


def _trimmable(model: nn.Module) -> str | None:
    """Why ``model``'s text tower cannot be trimmed (``None`` when it can)."""
    need = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    missing = [a for a in need if getattr(model, a, None) is None]
    if missing:
        return f"it has no {', '.join(missing)} (not an open_clip CLIP with a causal text tower)"
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        return f"it pools the text with {model.text_pool_type!r}, not at the end-of-text token ('argmax')"
    mask = model.attn_mask
    L = model.positional_embedding.shape[0]
    if mask.shape != (L, L) or not torch.equal(mask.isinf(), torch.ones(L, L, dtype=torch.bool).triu(1)):
        return "its text attention mask is not causal"
    return None


def encode_text_trimmed(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(text)`` of an open_clip ``CLIP`` (causal text tower, features taken at the
    end-of-text token, the highest id of each row: ``text_pool_type == "argmax"``) computed on the first ``n``
    positions only, ``n = 1 + max_b argmax(text[b])``. ``text (B, L)`` -> ``(B, D)``.

    The same function, not an approximation: under the causal mask position ``i`` attends to positions
    ``<= i`` only, so the features at every end-of-text token -- the only ones pooled -- never see the padding
    after it; dropping the positions after the batch's last end-of-text token removes work whose result is
    discarded. Equal to ``encode_text`` up to float rounding (GEMMs of another row count may sum in another
    order), gradients included (tested). The micro world's captions end by position ~20 of open_clip's 32, so
    the text tower does about 60 % of its FLOPs."""
    why = _trimmable(model)
    if why is not None:
        raise ValueError(f"encode_text_trimmed: cannot trim this model's text tower: {why}")
    if text.ndim != 2:
        raise ValueError(f"encode_text_trimmed: text must be (B, L) token ids, got {tuple(text.shape)}")
    eot = text.argmax(dim=-1)  # (B,) end-of-text positions
    n = int(eot.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text[:, :n]).to(cast)  # (B, n, W)
    x = x + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)  # (B, n, W)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B, D)


def text_encoder(model: nn.Module, context: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The text forward of a training loop, resolved once: ``context`` one of :data:`TEXT_CONTEXTS`
    (``"trim"`` is refused, with the reason, for a model :func:`encode_text_trimmed` cannot run)."""
    if context not in TEXT_CONTEXTS:
        raise ValueError(f"text context must be one of {TEXT_CONTEXTS}, got {context!r}")
    if context == "full":
        return model.encode_text
    why = _trimmable(model)
    if why is not None:
        raise ValueError(f"text context 'trim' needs an open_clip CLIP with a causal text tower: {why}; "
                         "use 'full'")
    return functools.partial(encode_text_trimmed, model)


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    allow_download: bool = True,
    seed: int = 0,
    weights_dir: str | os.PathLike | None = None,
    depth: int | None = None,
) -> tuple[nn.Module, Callable, Callable]:
    """Load a CLIP model; returns ``(model, tokenizer, preprocess)`` with the model in eval mode.

    Args:
        name: a registered micro config (``"micro-clip"``) or an open_clip model name (``"ViT-B-16"``,
            ``"ViT-L-14"``, ``"EVA02-B-16"``, ``"EVA02-L-14-336"``, ...).
        pretrained: ``None`` (random init, seeded by ``seed``), a local checkpoint path, or an open_clip
            pretrained tag (open_clip names only).
        device: where the model is put.
        allow_download: may a named weight be downloaded (the ``allow_download`` book parameter).
        seed: seed of the random initialisation (the global RNG is left untouched).
        weights_dir: a directory holding named weights as local files (:mod:`ovlib.models.weights`): a tag is
            read from ``weights_dir/<name>.<tag>.safetensors`` (or .pth/.pt/.bin), never downloaded; a missing
            file is a :class:`WeightsUnavailable` naming the parameter and the file.
        depth: keep only the first ``depth`` blocks of each tower (:func:`truncate_towers`; the dry run's
            ``dry_run_settings.depth``); only with a random initialisation of an open_clip model.
    """
    import open_clip

    if depth is not None and (pretrained is not None or name in MICRO_CLIP_CONFIGS):
        raise ValueError(f"load_clip: depth={depth} cuts a random initialisation of a named architecture (a dry "
                         f"run); {name!r} with pretrained={pretrained!r} keeps its depth")

    is_path = pretrained is not None and _looks_like_path(pretrained)
    if name in MICRO_CLIP_CONFIGS:
        cfg = MICRO_CLIP_CONFIGS[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cfg.build()
        tokenizer = _micro_tokenizer(cfg.context_length)
        preprocess = _transform(cfg.image_size, cfg.mean, cfg.std)
        if pretrained is not None:
            if not is_path:
                raise ValueError(
                    f"micro config {name!r} has no named weights; pretrained must be a local checkpoint path, "
                    f"got {pretrained!r}"
                )
            load_state_dict_checked(model, read_checkpoint(pretrained), source=f"checkpoint {pretrained}")
        return model.to(device).eval(), tokenizer, preprocess

    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP model {name!r}: not a registered micro config ({sorted(MICRO_CLIP_CONFIGS)}) "
            f"nor an open_clip model name (see open_clip.list_models())"
        )

    def _create(force_quick_gelu: bool = False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, device="cpu", force_quick_gelu=force_quick_gelu, pretrained_text=False
            )
        return model, preprocess

    tokenizer = open_clip.get_tokenizer(name)
    if pretrained is None:  # built once per process and seed (and depth), copied after (random_init)
        def _create_cut():
            model, preprocess = _create()
            return (model if depth is None else truncate_towers(model, depth)), preprocess

        model, preprocess = random_init(("open_clip", name, seed, depth), _create_cut)
    elif is_path:
        model, preprocess = _create()
        load_state_dict_checked(model, read_checkpoint(pretrained), source=f"checkpoint {pretrained}")
    else:
        tag = str(pretrained)
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            raise ValueError(f"{name!r} has no pretrained tag {tag!r}; open_clip knows: {tags}")
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
        hint = (f"weights_dir=DIR holding {weight_stem(name, tag)}.safetensors, or pretrained='/path/to/checkpoint.pt' "
                f"(a state_dict file of {name}{'-quickgelu' if quick_gelu else ''})")
        if weights_dir:  # the tag's own activation (OpenAI weights: QuickGELU), weights from the local file
            local = local_weight_file(weights_dir, name, tag)
            model, preprocess = _create(force_quick_gelu=quick_gelu)
            load_state_dict_checked(model, read_checkpoint(local), source=f"weights file {local}")
            return model.to(device).eval(), tokenizer, preprocess
        cached = _cached_open_clip_file(name, tag)
        if cached is not None:
            model, preprocess = _create(force_quick_gelu=quick_gelu)
            load_state_dict_checked(model, read_checkpoint(cached), source=f"cached weights {cached}")
        elif not allow_download:
            raise _unavailable(f"{tag!r} for {name}", "locally and downloads are not allowed (allow_download=False)",
                               hint)
        elif is_offline():
            raise _unavailable(f"{tag!r} for {name}", "offline", hint)
        else:  # online and asked for: open_clip downloads into its cache
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device="cpu")
    return model.to(device).eval(), tokenizer, preprocess

"""Vision foundation models (VFM) for spatial-correlation targets: timm DINOv2 and the micro VFM.

* :func:`load_vfm` -- ``"micro-vfm"`` (registered in :data:`MICRO_VFM_CONFIGS`: a timm
  ``VisionTransformer(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=0,
  dynamic_img_size=True)``) or a timm DINOv2 name such as ``"vit_base_patch14_reg4_dinov2.lvd142m"``
  (built with ``dynamic_img_size=True``). ``pretrained``: ``None`` = random init, a local checkpoint path, or
  ``"hub"`` for timm's published weights (from the Hugging Face cache, else downloaded only if allowed and
  online; offline it fails at once naming the local-file alternative).
* :func:`vfm_patch_features` -- resize the (already normalised) images so that the VFM grid equals the CLIP
  grid (``L * patch`` pixels, DeCLIP's proxy image: ``xiaomoguhz/DeCLIP:src/training/data.py``), run timm's
  ``forward_features`` (final norm included, like DINOv2 ``get_intermediate_layers(norm=True)``) and drop
  the prefix (cls + register) tokens -> ``(B, C, h, w)``.
* :func:`patch_correlation` -- cosine similarity matrix of the patch tokens ``(B, N, N)``.

DINOv2 expects ImageNet mean/std normalisation (``vfm.pretrained_cfg["mean"/"std"]``); the caller
normalises the images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import WeightsUnavailable, is_offline, load_state_dict_checked, random_init, read_checkpoint, truncate_towers
from .weights import local_weight_file

__all__ = ["MicroVfmConfig", "MICRO_VFM_CONFIGS", "register_micro_vfm", "load_vfm", "vfm_patch_features",
           "patch_correlation", "renormalize"]


@dataclass(frozen=True)
class MicroVfmConfig:
    """A small timm ``VisionTransformer`` (cls token, no registers, dynamic image size)."""

    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def build(self) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                              depth=self.depth, num_heads=self.num_heads, num_classes=0, dynamic_img_size=True)
        m.pretrained_cfg = dict(mean=self.mean, std=self.std, input_size=(3, self.img_size, self.img_size))
        return m


MICRO_VFM_CONFIGS: dict[str, MicroVfmConfig] = {"micro-vfm": MicroVfmConfig()}


def register_micro_vfm(name: str, config: MicroVfmConfig, overwrite: bool = False) -> None:
    if name in MICRO_VFM_CONFIGS and not overwrite:
        raise ValueError(f"micro VFM config {name!r} is already registered")
    MICRO_VFM_CONFIGS[name] = config


def _is_path(p) -> bool:
    from .clip import _looks_like_path

    return _looks_like_path(p)


def load_vfm(name: str, pretrained: str | os.PathLike | None = None, device: str | torch.device = "cpu",
             *, allow_download: bool = True, seed: int = 0,
             weights_dir: str | os.PathLike | None = None, depth: int | None = None) -> nn.Module:
    """Load a VFM (eval mode, ``requires_grad`` left as is). See the module docstring. ``weights_dir``: with
    ``pretrained="hub"`` the weights are read from ``weights_dir/<name>.safetensors`` (or .pth/.pt/.bin,
    :mod:`ovlib.models.weights`), never downloaded. ``depth``: keep the first ``depth`` blocks of a random
    initialisation of a timm model (the dry run's ``dry_run_settings.depth``;
    :func:`ovlib.models.clip.truncate_towers`)."""
    import timm

    if depth is not None and (pretrained is not None or name in MICRO_VFM_CONFIGS):
        raise ValueError(f"load_vfm: depth={depth} cuts a random initialisation of a named architecture (a dry "
                         f"run); {name!r} with pretrained={pretrained!r} keeps its depth")

    if name in MICRO_VFM_CONFIGS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MICRO_VFM_CONFIGS[name].build()
        if pretrained is not None:
            if not _is_path(pretrained):
                raise ValueError(f"micro VFM {name!r} has no named weights; pretrained must be a local path")
            load_state_dict_checked(model, read_checkpoint(pretrained), source=f"checkpoint {pretrained}")
        return model.to(device).eval()

    base = name.split(".")[0]
    if not timm.is_model(base):
        raise ValueError(f"unknown VFM {name!r}: not a micro config ({sorted(MICRO_VFM_CONFIGS)}) nor a timm model")
    kwargs = dict(dynamic_img_size=True, num_classes=0)
    if pretrained is None or _is_path(pretrained):
        def build():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if depth is None:
                    return timm.create_model(name, pretrained=False, **kwargs)
                try:  # a timm ViT builds its first `depth` blocks directly (a ViT-L's 24 take seconds to initialise)
                    m = timm.create_model(name, pretrained=False, depth=depth, **kwargs)
                except TypeError:  # a model without a `depth` argument: built whole, then cut
                    m = timm.create_model(name, pretrained=False, **kwargs)
            return truncate_towers(m, depth)

        # a random initialisation is built once per process and seed, copied after (ovlib.models.clip.random_init)
        model = random_init(("timm", name, seed, depth), build) if pretrained is None else build()
        if pretrained is not None:
            state = read_checkpoint(pretrained)
            state = {k: v for k, v in state.items() if not k.startswith("head.")} if "head.weight" in state else state
            load_state_dict_checked(model, state, source=f"checkpoint {pretrained}")
        return model.to(device).eval()
    if str(pretrained) != "hub":
        raise ValueError(f"pretrained for {name!r} must be None, a local path or 'hub', got {pretrained!r}")
    if weights_dir:
        local = local_weight_file(weights_dir, name, "hub", what=f"of timm {name}")
        return load_vfm(name, local, device, allow_download=False, seed=seed)
    hint = f"weights_dir=DIR holding {name}.safetensors, or pretrained='/path/to/{base}.pth' (a timm state_dict file)"
    cached = None
    try:
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id if "." in name else None
        if hub_id:
            for fn in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(repo_id=hub_id, filename=fn)
                if isinstance(hit, str) and os.path.isfile(hit):
                    cached = hit
                    break
    except Exception:  # pragma: no cover - cache probing is best effort
        cached = None
    if cached is None and not allow_download:
        raise WeightsUnavailable(f"pretrained weights for {name} are not available locally and downloads are "
                                 f"not allowed; download them on a machine with internet or pass {hint}")
    if cached is None and is_offline():
        raise WeightsUnavailable(f"pretrained weights for {name} are not available offline; download them on a "
                                 f"machine with internet or pass {hint}")
    model = timm.create_model(name, pretrained=True, **kwargs)  # cache hit or an allowed, online download
    return model.to(device).eval()


def renormalize(images: torch.Tensor, src_mean, src_std, dst_mean, dst_std) -> torch.Tensor:
    """Re-normalise ``images (B, 3, H, W)`` from one mean/std (e.g. CLIP's) to another (e.g. the VFM's
    ``pretrained_cfg`` ImageNet statistics): ``((x * src_std + src_mean) - dst_mean) / dst_std``."""
    def t(v):
        return torch.as_tensor(v, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    return (images * t(src_std) + t(src_mean) - t(dst_mean)) / t(dst_std)


def _vfm_patch(vfm: nn.Module) -> tuple[int, int]:
    p = vfm.patch_embed.patch_size
    return (p, p) if isinstance(p, int) else tuple(p)


def vfm_patch_features(vfm: nn.Module, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch features ``(B, C, h, w)`` of ``images (B, 3, H, W)`` on the token grid ``grid = (h, w)``.

    The images are bilinearly resized to ``(h * p, w * p)`` (``p`` the VFM patch size) unless already that
    size, so the VFM grid equals ``grid``; prefix (cls + register) tokens are removed.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    h, w = int(grid[0]), int(grid[1])
    ph, pw = _vfm_patch(vfm)
    size = (h * ph, w * pw)
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    x = vfm.forward_features(images)  # (B, P + h*w, C)
    x = x[:, vfm.num_prefix_tokens:]
    B, N, C = x.shape
    if N != h * w:
        raise RuntimeError(f"VFM returned {N} patch tokens for a {h}x{w} grid")
    return x.transpose(1, 2).reshape(B, C, h, w)


def patch_correlation(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of all token pairs: ``(B, C, h, w)`` or ``(B, N, C)`` -> ``(B, N, N)``."""
    if x.ndim == 4:
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
    if x.ndim != 3:
        raise ValueError(f"x must be (B, C, h, w) or (B, N, C), got {tuple(x.shape)}")
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(1, 2)

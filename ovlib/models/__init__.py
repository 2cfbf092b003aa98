"""CLIP / VFM loading, the ViT adapter, dense feature modes and region pooling."""

from .adapter import POS_INTERPOLATIONS, UnsupportedTower, ViTAdapter, interpolate_pos_embed, vit_adapter
from .clip import (
    MICRO_CLIP_CONFIGS,
    CheckpointMismatch,
    MicroClipConfig,
    WeightsUnavailable,
    load_clip,
    register_micro_clip,
)
from .dense import (
    ATTENTION_MODES,
    DENSE_MODES,
    PRESET_SOURCES,
    PRESETS,
    dense_facts,
    dense_features,
    dense_spec,
    naclip_bias,
)
from .pool import mask_pool, roi_features
from .vfm import (
    MICRO_VFM_CONFIGS,
    MicroVfmConfig,
    load_vfm,
    patch_correlation,
    register_micro_vfm,
    renormalize,
    vfm_patch_features,
)

__all__ = [
    "load_clip", "MicroClipConfig", "MICRO_CLIP_CONFIGS", "register_micro_clip", "CheckpointMismatch",
    "WeightsUnavailable", "ViTAdapter", "vit_adapter", "UnsupportedTower", "interpolate_pos_embed",
    "dense_features", "DENSE_MODES", "ATTENTION_MODES", "PRESETS", "naclip_bias", "PRESET_SOURCES", "dense_spec",
    "dense_facts", "POS_INTERPOLATIONS", "roi_features", "mask_pool",
    "load_vfm", "MicroVfmConfig", "MICRO_VFM_CONFIGS", "register_micro_vfm", "vfm_patch_features",
    "patch_correlation", "renormalize",
]

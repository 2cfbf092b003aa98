import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """``../shared`` beside the checkout (or $OVBOOK_SHARED); None when absent."""
    env = os.environ.get("OVBOOK_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def clip_and_cats():
    """A random micro CLIP, its tokenizer and the micro world's categories (SynSeg tests)."""
    from ovlib.data.microworld import MicroWorld
    from ovlib.models import load_clip

    clip, tok, _ = load_clip("micro-clip", seed=0)
    return clip, tok, MicroWorld(seed=0).categories()

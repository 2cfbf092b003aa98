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


@pytest.fixture(scope="session")
def book_vendor():
    """The book's JavaScript (MathJax, require.js, the widget manager) vendored once per machine for the browser
    tests: ``$OVBOOK_VENDOR`` or ``~/.cache/ovbook/vendor`` (``python -m ovlib.book vendor``, npm pack of pinned
    versions; skipped when that directory already holds them). Sets ``$OVBOOK_VENDOR`` for the session so every
    book build serves them itself. ``None`` (and the variable unset: pages load the CDN copies) when npm is
    missing or fails; the browser tests then say so."""
    from ovlib import book

    target = os.environ.get(book.VENDOR_ENV) or str(Path.home() / ".cache" / "ovbook" / "vendor")
    try:
        path = book.vendor(target)
    except book.BookError as e:
        from tests.helpers import smoke_book

        os.environ.pop(book.VENDOR_ENV, None)
        smoke_book.VENDOR_PROBLEM.append(str(e))
        return None
    os.environ[book.VENDOR_ENV] = str(path)
    return path


@pytest.fixture(autouse=True)
def _vendored_book_builds(request):
    """Tests marked ``book`` build books: vendor the JavaScript first (once per session), so the smoke book that
    tests/test_book.py builds is the one the browser tests read, without a second build."""
    if request.node.get_closest_marker("book") is not None:
        request.getfixturevalue("book_vendor")

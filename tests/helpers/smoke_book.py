"""Where this test session's smoke-executed, built book is, so the browser tests read it instead of executing
the book a second time.

``tests/test_book.py::test_every_toc_chapter_executes_with_smoke_profile_and_the_book_builds`` records its
project root in :data:`BUILT` (pytest runs ``test_book.py`` before ``test_browser.py``); outside such a session
``$OVBOOK_BUILT_BOOK`` may name a project root that holds an executed ``book/`` and a built ``_build/html``.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILT: dict[str, Path] = {}
#: why the session fixture ``book_vendor`` (tests/conftest.py) could not vendor the book's JavaScript
VENDOR_PROBLEM: list[str] = []


def record(root: Path) -> None:
    BUILT["root"] = Path(root)


def built_root() -> Path | None:
    root = BUILT.get("root")
    if root is None and os.environ.get("OVBOOK_BUILT_BOOK"):
        root = Path(os.environ["OVBOOK_BUILT_BOOK"])
    if root is None or not (root / "_build" / "html" / "index.html").is_file():
        return None
    return root

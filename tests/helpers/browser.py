"""Headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright, for the browser tests.

* :func:`chromium` -- the browser executable, or ``None`` (``$OVBOOK_CHROMIUM`` overrides);
* :func:`launch` -- a Playwright browser on it with the flags this machine needs (no sandbox as root, no GPU,
  no background networking: the machine has no internet);
* :func:`serve` -- a static HTTP server on 127.0.0.1 for the built book (a real browser reads it over HTTP,
  as from GitHub Pages; ``file://`` would change how scripts load);
* :func:`page_report` -- what a reader would see wrong on a built book page.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

#: the book's widget views are rendered by the HTML manager into elements of this class
WIDGET_VIEW = 'script[type="application/vnd.jupyter.widget-view+json"]'


def chromium() -> str | None:
    env = os.environ.get("OVBOOK_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def missing() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the Python package 'playwright' is not installed (the test extra has it: pip install -e '.[test]')"
    if chromium() is None:
        return ("no Chromium executable: install Debian's (apt-get install chromium; .ci/run does) or set "
                "OVBOOK_CHROMIUM to a Chromium binary")
    return None


def launch(pw: Any):
    """A headless Chromium with a fresh profile (Playwright creates a new temporary user-data-dir)."""
    return pw.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log in the test output
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a browser closing a connection early is not an error
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``directory`` until the block ends."""
    handler = functools.partial(_Quiet, directory=str(directory))
    httpd = _Server(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# Evaluated in the page once it settled: images, MathJax, cell errors, widgets, bibliography.
PAGE_JS = r"""
() => {
  const r = {};
  const imgs = Array.from(document.querySelectorAll('img'));
  r.images = imgs.length;
  r.broken_images = imgs.filter(i => !(i.complete && i.naturalWidth > 0))
                        .map(i => (i.getAttribute('src') || '').slice(0, 120));
  const math = Array.from(document.querySelectorAll('.math'));
  r.math = math.length;
  r.mathjax = !!(window.MathJax && window.MathJax.version);
  r.mathjax_version = r.mathjax ? window.MathJax.version : null;
  r.math_untypeset = math.filter(m => !m.querySelector('mjx-container')).length;
  r.math_errors = Array.from(document.querySelectorAll('mjx-merror, .MathJax_Error, merror'))
                       .map(e => (e.getAttribute('data-mjx-error') || e.textContent || '').slice(0, 200));
  r.error_outputs = Array.from(document.querySelectorAll('.cell_output .traceback, .cell_output .output.error'))
                         .map(e => e.textContent.slice(0, 300));
  r.traceback_text = Array.from(document.querySelectorAll('.cell_output'))
                          .filter(e => /Traceback \(most recent call last\)/.test(e.textContent)).length;
  r.widget_views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  r.widget_roots = document.querySelectorAll('.widget-subarea > .jupyter-widgets, .widget-vbox').length;
  r.widget_images = Array.from(document.querySelectorAll('.widget-image')).map(i => i.naturalWidth || 0);
  r.widget_errors = Array.from(document.querySelectorAll('.jupyter-widgets-error-widget, .widget-error'))
                         .map(e => e.textContent.slice(0, 200));
  r.citations = document.querySelectorAll('.citation, [role="doc-biblioentry"], dl.citation > dt').length;
  r.title = document.title;
  return r;
}
"""

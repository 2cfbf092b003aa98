"""A real browser reads the book and runs a chapter in JupyterLab (headless Debian Chromium, Playwright).

1. Every page of the smoke book that ``tests/test_book.py`` executed and built in this session is served on
   127.0.0.1 and opened; the test fails on a missing image, a MathJax error (or math left untypeset), an error
   output in a cell, an explorer whose saved widget state does not render, a failed or external request, or an
   uncaught JavaScript error. The book is built with its JavaScript vendored (``python -m ovlib.book build
   --vendor``): the browser has no internet here, so nothing may come from a CDN -- any external request fails
   the test rather than being excused as "offline".
2. ``jupyter lab`` on 127.0.0.1 opens chapter 01 (the smoke-executed notebook, outputs cleared) through the
   browser, runs all cells from the Run menu, saves; no cell may error, the explorer must render, and typing a
   token index must redraw it.

Screenshots go to ``$OVBOOK_SCREENSHOTS`` (default: a pytest temporary directory). Both tests are skipped, with
the reason, when Playwright or Chromium is missing (``.ci/run`` installs both) or no book was built.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from ovlib import book
from tests.helpers import browser as B
from tests.helpers import smoke_book

needs_browser = pytest.mark.skipif(B.missing() is not None, reason=f"browser tests: {B.missing()}")

#: uncaught page errors that are known, harmless and not ours; each needs its reason
KNOWN_PAGE_ERRORS = {
    # sphinx-thebe 0.3.1 (pulled in by jupyter-book 1.x) emits its config <script> twice on every page; the
    # second `const` declaration throws. Thebe is not enabled in this book, so nothing depends on it.
    "Identifier 'THEBE_JS_URL' has already been declared",
}


def test_vendored_build_config_serves_scripts_from_the_book(tmp_path, repo_root):
    """What ``build --vendor`` changes: MathJax, require.js, the shim and the widget manager from _static; the
    rest of _config.yml as it is. A vendored directory of the pinned versions is reused without npm."""
    import json

    import yaml

    shutil.copy(repo_root / "_config.yml", tmp_path / "_config.yml")
    vdir = tmp_path / "vendor"
    vdir.mkdir()
    (vdir / "VERSIONS.json").write_text(json.dumps({**book.VENDOR_PACKAGES, "layout": book.VENDOR_LAYOUT}))
    assert book.vendor(vdir) == vdir.resolve()  # up to date: no npm call
    cfg = yaml.safe_load(book._vendored_config(tmp_path, vdir).read_text())
    orig = yaml.safe_load((repo_root / "_config.yml").read_text())
    sc = cfg["sphinx"]["config"]
    assert sc["mathjax_path"] == "ovbook-vendor/mathjax/tex-chtml.js"
    js = list(sc["nb_ipywidgets_js"])
    assert js == [
        "ovbook-vendor/require.js",
        "ovbook-vendor/ovbook-shim.js",
        "ovbook-vendor/npm/@jupyter-widgets/html-manager/dist/embed-amd.js",
    ]
    assert not any(u.startswith("http") for u in js)
    for k, v in orig["sphinx"]["config"].items():
        assert sc[k] == v
    assert {k: v for k, v in cfg.items() if k != "sphinx"} == {k: v for k, v in orig.items() if k != "sphinx"}
    assert (
        cfg["launch_buttons"]["binderhub_url"] and cfg["launch_buttons"]["notebook_interface"] == "jupyterlab"
    )


@pytest.fixture(scope="module")
def built_book(book_vendor) -> Path:
    root = smoke_book.built_root()
    if root is None:
        pytest.skip(
            "no built book in this session: run together with tests/test_book.py (make test), or set "
            "OVBOOK_BUILT_BOOK to a project root with an executed book/ and _build/html"
        )
    html = root / "_build" / "html"
    if not (html / "_static" / "ovbook-vendor" / "VERSIONS.json").is_file():
        # built with CDN scripts (e.g. OVBOOK_BUILT_BOOK from elsewhere): rebuild with the vendored ones
        if book_vendor is None:
            pytest.skip("the book's JavaScript could not be vendored (the browser has no internet): "
                        f"{smoke_book.VENDOR_PROBLEM}")
        import io

        out = io.StringIO()
        assert book.build(root, out=out, vendor_dir=book_vendor) == 0, out.getvalue()
    return root


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    d = Path(os.environ.get("OVBOOK_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pages(root: Path) -> list[str]:
    """The root page (Jupyter Book's ``index.html`` redirects to it), every chapter, the Recipes page, the Claims
    ledger, the references."""
    html = root / "_build" / "html"
    pages = ["book/intro.html"] + [f"book/{c.name}.html" for c in book.chapters(root)]
    extra = ("book/recipes.html", "book/claims_ledger.html", "book/references.html")
    return pages + [p for p in extra if (html / p).is_file()]


@pytest.mark.book
@needs_browser
def test_every_book_page_renders_in_chromium(built_book, screens):
    from playwright.sync_api import sync_playwright

    html = built_book / "_build" / "html"
    problems: dict[str, list[str]] = {}
    seen = {}
    with B.serve(html) as base, sync_playwright() as pw:
        browser = B.launch(pw)
        try:
            page = browser.new_page()
            page.goto(f"{base}/index.html")
            page.wait_for_url("**/book/intro.html", timeout=15_000)  # the site's entry redirects to the intro
            page.close()
            for rel in _pages(built_book):
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                bad: list[str] = []
                page.on(
                    "request",
                    lambda r, bad=bad: (
                        bad.append(f"external request {r.url}")
                        if not r.url.startswith((base, "data:", "blob:", "about:"))
                        else None
                    ),
                )
                page.on(
                    "requestfailed", lambda r, bad=bad: bad.append(f"request failed {r.url}: {r.failure}")
                )
                page.on(
                    "response",
                    lambda r, bad=bad: bad.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
                )
                page.on(
                    "pageerror",
                    lambda e, bad=bad: None if str(e) in KNOWN_PAGE_ERRORS else bad.append(f"JS error: {e}"),
                )
                # Chromium's own favicon request is not the page's (the book has no favicon)
                page.on(
                    "console",
                    lambda m, bad=bad: (
                        bad.append(f"console: {m.text} ({m.location.get('url')})")
                        if m.type == "error"
                        and "Failed to load resource" in m.text
                        and not str(m.location.get("url", "")).endswith("/favicon.ico")
                        else None
                    ),
                )
                page.goto(f"{base}/{rel}", wait_until="load")
                # MathJax 3 typesets after load; the widget manager renders saved views after load
                page.evaluate(
                    "() => (window.MathJax && MathJax.startup && MathJax.startup.promise) "
                    "? MathJax.startup.promise.then(() => true) : true"
                )
                views = page.evaluate(f"() => document.querySelectorAll('{B.WIDGET_VIEW}').length")
                if views:
                    try:
                        page.wait_for_function(
                            "n => document.querySelectorAll('.widget-subarea').length >= n && "
                            "Array.from(document.querySelectorAll('img.widget-image')).every(i => i.complete)",
                            arg=views,
                            timeout=30_000,
                        )
                    except Exception as e:  # reported below with the counts
                        bad.append(f"widgets did not render in 30 s: {type(e).__name__}")
                page.wait_for_timeout(300)
                r = page.evaluate(B.PAGE_JS)
                r["widget_subareas"] = page.evaluate(
                    "() => document.querySelectorAll('.widget-subarea').length"
                )
                seen[rel] = r
                if r["broken_images"]:
                    bad.append(f"missing images: {r['broken_images']}")
                if rel.startswith("book/0") and r["images"] == 0:
                    bad.append("a chapter page without a single image")
                if r["math"]:
                    if not r["mathjax"]:
                        bad.append(f"{r['math']} math elements but MathJax did not load")
                    elif r["math_untypeset"]:
                        bad.append(f"{r['math_untypeset']} of {r['math']} math elements not typeset")
                if r["math_errors"]:
                    bad.append(f"MathJax errors: {r['math_errors']}")
                if r["error_outputs"] or r["traceback_text"]:
                    bad.append(f"error outputs in cells: {r['error_outputs'] or r['traceback_text']}")
                if views and r["widget_subareas"] < views:
                    bad.append(f"{views} saved widget views, {r['widget_subareas']} rendered")
                if r["widget_errors"]:
                    bad.append(f"widget errors: {r['widget_errors']}")
                if any(w == 0 for w in r["widget_images"]):
                    bad.append(f"empty explorer images: {r['widget_images']}")
                if rel.endswith("references.html") and r["citations"] == 0:
                    bad.append("the bibliography is empty")
                if rel.endswith("claims_ledger.html"):
                    ledger = page.evaluate(
                        "() => ({rows: document.querySelectorAll('table.ovbook-ledger tbody tr').length, "
                        "links: Array.from(document.querySelectorAll('table.ovbook-ledger a'))"
                        ".map(a => a.getAttribute('href'))})"
                    )
                    seen["ledger"] = ledger
                    if not ledger["rows"]:
                        bad.append("the Claims ledger shows no claim")
                name = rel.replace("/", "_").removesuffix(".html")
                if page.locator(".widget-image").count():
                    page.locator(".widget-image").first.scroll_into_view_if_needed()
                    page.evaluate("() => window.scrollBy(0, -220)")
                page.screenshot(path=str(screens / f"book-{name}.png"))
                if bad:
                    problems[rel] = bad
                page.close()
        finally:
            browser.close()
    assert not problems, "\n".join(f"{k}:\n  " + "\n  ".join(v) for k, v in problems.items())
    chapters = [k for k in seen if k.startswith("book/0")]
    assert chapters, f"no chapter pages among {list(seen)}"
    # the chapters with explorers show them (chapter 01 always has them)
    assert seen["book/01_clip_dense_features.html"]["widget_images"], "chapter 01 shows no explorer"
    # every chapter writes its claims at smoke; the ledger links each row to an existing section of its chapter
    assert "ledger" in seen, "the Claims ledger page was not built"
    for href in seen["ledger"]["links"]:
        target, _, anchor = href.partition("#")
        text = (html / "book" / target).read_text(encoding="utf-8")
        assert anchor and f'id="{anchor}"' in text, f"ledger link {href}: no such section"


# --------------------------------------------------------------------------------------------- JupyterLab
def _lab_env(tmp: Path) -> dict[str, str]:
    """A throw-away Jupyter configuration: settings, runtime and workspaces in ``tmp``; all notebook cells kept
    in the DOM (no windowing) so the test sees every prompt; no news / update checks (no internet)."""
    settings = tmp / "settings"
    for rel, text in {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": (
            '{"fetchNews": "false", "checkForUpdates": false}'
        ),
    }.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(text)
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    return env


def _wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"jupyter lab did not answer {url} in {seconds:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.book
@needs_browser
def test_jupyterlab_runs_chapter01_and_the_explorer_renders(built_book, screens, tmp_path):
    from playwright.sync_api import sync_playwright

    exe = Path(sys.executable).parent / "jupyter-lab"
    if not exe.is_file():
        pytest.skip(f"jupyter-lab not found next to {sys.executable} (the book extra installs it)")
    # the smoke-executed chapter, outputs cleared, at the project root: the kernel's working directory is the
    # notebook's, so the smoke data and backbones of this build are found (as papermill ran it, cwd = root)
    src = built_book / "book" / "01_clip_dense_features.ipynb"
    nb = nbformat.read(src, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nb.metadata.pop("widgets", None)
    name = "lab_01_clip_dense_features.ipynb"
    target = built_book / name
    nbformat.write(nb, target)
    n_code = sum(c.cell_type == "code" for c in nb.cells)

    port, token = B.free_port(), secrets.token_hex(16)
    log = tmp_path / "lab.log"
    cmd = [
        str(exe),
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={built_book}",
        "--ServerApp.allow_root=True",
        "--LabApp.news_url=",
        "--LabApp.extension_manager=readonly",
    ]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=built_book,
            env=_lab_env(tmp_path),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/api/status?token={token}", 90, proc, log)
        with sync_playwright() as pw:
            browser = B.launch(pw)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/lab/tree/{name}?token={token}", wait_until="domcontentloaded")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            # a fresh Lab may ask which kernel to start (the notebook names python3): accept the proposed one
            try:
                page.locator(".jp-Dialog .jp-mod-accept").click(timeout=8_000)
            except Exception:
                pass  # no dialog
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=90_000)
            # Run > Run All Cells, as a user does
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            done = (
                "n => { const p = Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'));"
                " return p.length >= n && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }"
            )
            try:
                page.wait_for_function(done, arg=n_code, timeout=170_000, polling=1000)
            except Exception as e:
                page.screenshot(path=str(screens / "jupyterlab-01-failed.png"))
                prompts = page.evaluate(
                    "() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))"
                    ".map(e => e.textContent)"
                )
                raise AssertionError(
                    f"Run All Cells did not finish ({type(e).__name__}); {n_code} code cells, "
                    f"prompts {prompts}; server log:\n{log.read_text()[-2000:]}"
                ) from None
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=60_000)
            # the explorer: a live widget with a drawn view; typing a token index redraws it
            img = page.locator(".jp-OutputArea-output img.widget-image").first
            img.wait_for(state="visible", timeout=30_000)
            n_explorers = page.locator(".jp-OutputArea-output img.widget-image").count()
            before = img.get_attribute("src")
            box = page.locator(".jp-OutputArea-output .widget-text input[type=number]").first
            box.fill("5")
            box.press("Enter")
            page.wait_for_function(
                "s => { const i = document.querySelector('.jp-OutputArea-output img.widget-image');"
                " return i && i.getAttribute('src') !== s && i.naturalWidth > 0; }",
                arg=before,
                timeout=30_000,
            )
            try:  # the status line is redrawn right after the image
                page.locator(".jp-OutputArea-output .widget-html-content", has_text="= #5 of").first.wait_for(
                    timeout=15_000
                )
                status = 1
            except Exception:
                status = 0
            img.scroll_into_view_if_needed()
            page.evaluate(
                "() => { const i = document.querySelector('.jp-OutputArea-output img.widget-image');"
                " i.scrollIntoView({block: 'center'}); }"
            )
            page.wait_for_timeout(500)
            page.screenshot(path=str(screens / "jupyterlab-01.png"))
            # save (Ctrl+S) and read what the browser-driven kernel produced
            page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
            mtime = target.stat().st_mtime
            page.keyboard.press("Control+s")
            end = time.monotonic() + 30
            while target.stat().st_mtime == mtime and time.monotonic() < end:
                time.sleep(0.3)
            browser.close()
        saved = nbformat.read(target, as_version=4)
        code = [c for c in saved.cells if c.cell_type == "code"]
        assert target.stat().st_mtime != mtime, "the notebook was not saved"
        assert all(c.execution_count for c in code), "cells left unexecuted after Run All Cells"
        errs = [
            (i, o.get("ename"), o.get("evalue"))
            for i, c in enumerate(code)
            for o in c.outputs
            if o.output_type == "error"
        ]
        assert not errs, f"cells errored in JupyterLab: {errs}"
        assert n_explorers >= 3, f"{n_explorers} explorer views rendered in JupyterLab (3 expected)"
        assert status == 1, "typing a token index did not update the explorer's status line"
        assert not errors, f"uncaught JavaScript errors in JupyterLab: {errors}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its kernel (own session)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        target.unlink(missing_ok=True)

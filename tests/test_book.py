"""The papermill book runner: toc parsing, hashing/skip logic, failure reporting, and the real book (smoke)."""

import io
import shutil
from pathlib import Path

import nbformat
import pytest

from ovlib import book
from tests.helpers import smoke_book

FIXTURES = Path(__file__).parent / "fixtures" / "project"


def make_project(tmp_path: Path, repo_root: Path, names: dict[str, str]) -> Path:
    """A throw-away book project: the real params/, _config.yml and book pages, plus fixture chapters."""
    root = tmp_path / "proj"
    (root / "notebooks").mkdir(parents=True)
    shutil.copytree(repo_root / "params", root / "params")
    shutil.copy(repo_root / "_config.yml", root / "_config.yml")
    (root / "book").mkdir()
    for f in ("intro.md", "references.md", "references.bib"):
        shutil.copy(repo_root / "book" / f, root / "book" / f)
    lines = ["format: jb-book", "root: book/intro", "chapters:"]
    for name, fixture in names.items():
        shutil.copy(FIXTURES / fixture, root / "notebooks" / f"{name}.py")
        lines.append(f"  - file: book/{name}")
    lines.append("  - file: book/references")
    (root / "_toc.yml").write_text("\n".join(lines) + "\n")
    return root


def test_toc_chapters_in_order_and_selection(tmp_path, repo_root):
    root = make_project(tmp_path, repo_root, {"02_second": "ok.py", "01_first": "ok.py"})
    chs = book.chapters(root)
    assert [c.name for c in chs] == ["02_second", "01_first"]  # toc order, not alphabetical
    assert [c.name for c in book.select(chs, ["1"])] == ["01_first"]
    assert [c.name for c in book.select(chs, ["02_sec"])] == ["02_second"]
    with pytest.raises(book.BookError, match="matches no chapter"):
        book.select(chs, ["07"])


def test_toc_entry_without_source_is_an_error(tmp_path, repo_root):
    root = make_project(tmp_path, repo_root, {"01_first": "ok.py"})
    (root / "notebooks" / "01_first.py").unlink()
    with pytest.raises(book.BookError, match="notebook source .*01_first.py does not exist"):
        book.chapters(root)


def test_input_hash_tracks_notebook_params_and_library(tmp_path, repo_root):
    root = make_project(tmp_path, repo_root, {"01_first": "ok.py"})
    ch = book.chapters(root)[0]
    fake_lib = tmp_path / "lib"
    fake_lib.mkdir()
    (fake_lib / "a.py").write_text("x = 1\n")
    params = {"seed": 0}
    h0 = book.input_hash(ch, params, fake_lib)
    assert book.input_hash(ch, dict(params), fake_lib) == h0
    assert book.input_hash(ch, {"seed": 1}, fake_lib) != h0
    (fake_lib / "a.py").write_text("x = 2\n")
    h1 = book.input_hash(ch, params, fake_lib)
    assert h1 != h0
    ch.source.write_text(ch.source.read_text() + "\n# %%\nprint(1)\n")
    assert book.input_hash(ch, params, fake_lib) != h1


@pytest.mark.book
def test_run_executes_skips_and_reexecutes(tmp_path, repo_root):
    root = make_project(tmp_path, repo_root, {"01_first": "ok.py"})
    out = io.StringIO()
    res = book.run(root, "smoke", overrides=["seed=3"], out=out)
    assert [(r.chapter, r.status) for r in res] == [("01_first", "ok")]
    nb = nbformat.read(root / "book" / "01_first.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0].metadata.tags
    assert "seed = 3" in injected[0].source
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "profile smoke seed 3" in text
    assert "TQDM_DISABLE 1 HF_HUB_OFFLINE 1" in text
    table = out.getvalue()
    assert "chapter" in table and "status" in table and "wall time" in table
    # unchanged inputs: skipped; --force or a changed parameter: executed again
    assert [r.status for r in book.run(root, "smoke", overrides=["seed=3"], out=io.StringIO())] == ["skipped"]
    assert [r.status for r in book.run(root, "smoke", overrides=["seed=3"], force=True, out=io.StringIO())] == ["ok"]
    assert [r.status for r in book.run(root, "smoke", overrides=["seed=4"], out=io.StringIO())] == ["ok"]
    # a deleted executed notebook is re-created even if the stamp matches
    (root / "book" / "01_first.ipynb").unlink()
    assert [r.status for r in book.run(root, "smoke", overrides=["seed=4"], out=io.StringIO())] == ["ok"]


@pytest.mark.book
def test_failure_reports_chapter_cell_and_traceback_and_keeps_partial(tmp_path, repo_root, capsys):
    root = make_project(tmp_path, repo_root, {"01_first": "ok.py", "02_broken": "fails.py", "03_after": "ok.py"})
    out = io.StringIO()
    res = book.run(root, "smoke", out=out)
    assert [(r.chapter, r.status) for r in res] == [("01_first", "ok"), ("02_broken", "failed")]
    text = out.getvalue()
    assert "chapter 02_broken failed" in text
    assert "deliberately_broken()" in text  # the failing cell's source
    assert "ValueError" in text and "deliberate failure for the runner test" in text  # the traceback
    partial = root / "book" / "02_broken.ipynb"
    assert partial.is_file() and f"partial notebook kept at {partial}" in text
    assert not (root / "book" / ".stamps" / "02_broken.json").exists()
    # the CLI exits non-zero
    assert book.main(["--root", str(root), "run", "--profile", "smoke", "--only", "02"]) == 1


def test_cli_errors_are_clear(tmp_path, repo_root, capsys):
    root = make_project(tmp_path, repo_root, {"01_first": "ok.py"})
    assert book.main(["--root", str(root), "run", "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    assert book.main(["--root", str(root), "run", "--profile", "smoke", "-p", "bogus=1"]) == 2
    assert "unknown parameter(s) ['bogus']" in capsys.readouterr().err


def test_broken_content_detection():
    log = "\n".join([
        "/x/book/01.ipynb: WARNING: image file not readable: foo.png",
        "/x/_toc.yml: WARNING: toctree contains reference to nonexisting document 'book/02_x'",
        "/x/intro.md:3: WARNING: could not find bibtex key \"nobody2020\"",
        "/x/intro.md:3: WARNING: duplicate label foo, other instance in bar",  # cosmetic: not broken content
        "checking consistency... done",
    ])
    bad = book.broken_content(log)
    assert len(bad) == 3 and not any("duplicate label" in b for b in bad)


@pytest.mark.book
def test_build_fails_on_missing_chapter_page(tmp_path, repo_root):
    root = make_project(tmp_path, repo_root, {"01_first": "ok.py"})  # listed but never executed
    out = io.StringIO()
    assert book.build(root, out=out) == 1
    assert "nonexisting document" in out.getvalue()


@pytest.mark.book
def test_every_toc_chapter_executes_with_smoke_profile_and_the_book_builds(tmp_path, repo_root):
    """The real book: every chapter of _toc.yml, smoke profile, then jupyter-book build."""
    root = tmp_path / "book"
    for d in ("notebooks", "params", "book"):
        shutil.copytree(repo_root / d, root / d, ignore=shutil.ignore_patterns("*.ipynb", ".stamps", "_work"))
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy(repo_root / f, root / f)
    out = io.StringIO()
    res = book.run(root, "smoke", out=out)
    assert all(r.status == "ok" for r in res), out.getvalue()
    for ch in book.chapters(root):
        nb = nbformat.read(ch.output, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.get("execution_count") for c in code), f"{ch.name} has unexecuted cells"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    build_out = io.StringIO()
    assert book.build(root, out=build_out) == 0, build_out.getvalue()
    html = root / "_build" / "html"
    assert (html / "index.html").is_file()
    for ch in book.chapters(root):
        assert (html / "book" / f"{ch.name}.html").is_file()
        # every chapter writes its claims (ovlib.study) and the Claims ledger page is generated from them
        assert (root / "book" / "claims" / f"{ch.number}.json").is_file(), f"{ch.name} wrote no claims file"
    assert (html / "book" / "claims_ledger.html").is_file()
    smoke_book.record(root)  # tests/test_browser.py reads this build in a real browser


@pytest.mark.book
def test_chapter_pages_launch_and_download_notebooks_that_exist(tmp_path, repo_root):
    """Every chapter page of the smoke book built above: its Binder button opens a notebook that exists in the
    repository after binder/postBuild (run here on a copy of notebooks/), its Colab button the executed notebook
    the Pages workflow publishes (``_sources/`` of the built site, pushed to book.NOTEBOOKS_BRANCH), its download
    button the executed .ipynb in _build/html; and its provenance box is under the title."""
    import os
    import re
    import subprocess
    import sys
    from urllib.parse import urljoin

    root = smoke_book.built_root()
    if root is None:
        pytest.skip("no smoke book built in this session (run with test_every_toc_chapter_executes_...)")
    # binder/postBuild's jupytext step, as repo2docker runs it (in the repository root)
    repo = tmp_path / "repo"
    shutil.copytree(repo_root / "notebooks", repo / "notebooks")
    steps = [ln for ln in (repo_root / "binder" / "postBuild").read_text().splitlines() if ln.startswith("jupytext ")]
    assert steps, "binder/postBuild no longer pairs the notebooks with jupytext"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for step in steps:
        subprocess.run(["bash", "-c", step], cwd=repo, env=env, check=True, capture_output=True)
    html = root / "_build" / "html"
    for ch in book.chapters(root):
        page = html / "book" / f"{ch.name}.html"
        text = page.read_text()
        binder = re.findall(r'href="(https://mybinder\.org/v2/gh/[^"]+)"', text)
        colab = re.findall(r'href="(https://colab\.research\.google\.com/github/[^"]+)"', text)
        download = re.findall(r'href="([^"]*_sources/[^"]+\.ipynb)"', text)
        assert len(binder) == 1 and len(colab) == 1 and len(download) == 1, (ch.name, binder, colab, download)
        target = binder[0].split("?urlpath=lab/tree/", 1)[1]
        assert (repo / target).is_file(), f"{ch.name}: Binder opens {target}, absent after binder/postBuild"
        assert nbformat.read(repo / target, as_version=4).cells, target
        published = colab[0].split(f"/blob/{book.NOTEBOOKS_BRANCH}/", 1)[1]
        assert (html / "_sources" / published).is_file(), f"{ch.name}: Colab opens {published}, not published"
        local = Path(urljoin(page.as_uri(), download[0]).removeprefix("file://"))
        assert local.is_file(), f"{ch.name}: download {download[0]} -> {local} missing"
        executed = nbformat.read(local, as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code"), f"{local} not executed"
        # the provenance box and the Colab cell, where the runner put them
        tags = [c.metadata.get("tags", []) for c in executed.cells]
        box = [i for i, t in enumerate(tags) if book.PROVENANCE_TAG in t]
        colab_cells = [i for i, t in enumerate(tags) if book.COLAB_TAG in t]
        assert len(box) == 1 and len(colab_cells) == 1 and box[0] < colab_cells[0], (ch.name, box, colab_cells)
        assert not any(book.PROBE_TAG in t for t in tags), f"{ch.name}: the probe cell was left in"
        shown = re.sub(r"<[^>]+>", "", text)  # the page's text
        assert "How this page was made" in shown, f"{ch.name}: no provenance box"
        assert f"--profile micro --only {ch.number} --force" in shown and "-f params/paper.yaml" in shown
        assert re.search(r"wall time\s*\d", shown), f"{ch.name}: no wall time in the box"

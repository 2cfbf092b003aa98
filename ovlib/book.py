"""The book runner: ``python -m ovlib.book {run,build,vendor,list}``.

``run`` executes every chapter listed in ``_toc.yml`` (or ``--only NN ...``):

    notebooks/NN_name.py --jupytext--> ipynb --papermill (params/PROFILE.yaml + -p overrides)--> book/NN_name.ipynb

* The chapter's inputs — notebook source, resolved parameters, every ``ovlib`` source file — are hashed; a chapter
  whose hash equals the one stamped at its last successful run (``book/.stamps/NN_name.json``) and whose executed
  notebook exists is skipped unless ``--force``.
* The kernel gets ``TQDM_DISABLE=1`` and, unless the parameters allow downloads, ``HF_HUB_OFFLINE=1``.
* The cell papermill injects (tag ``injected-parameters``) is tagged ``remove-cell`` so the book hides it.
* On failure the exit status is non-zero; the chapter, the failing cell's source and the traceback are printed and
  the partial executed notebook is kept in ``book/``.
* It ends with a table: chapter, status, wall time.
* Every executed notebook gets, under its title, a box saying how it was made (:func:`provenance_markdown`: profile
  and overrides, commit, package versions, machine, CPU threads, precision, wall time, the commands that reproduce
  it) and a hidden cell that, in Google Colab only, clones the repository at that commit and installs it
  (:func:`colab_setup_source`); elsewhere that cell does nothing.

``build`` runs ``jupyter-book build .`` and fails when Sphinx reports broken content (missing documents or
images, bad references or citations), printing those warnings.

``vendor DIR`` puts the JavaScript the built pages load from a CDN by default -- MathJax 3, require.js and the
ipywidgets HTML manager that renders the explorers' saved widget state -- into ``DIR`` (``npm pack`` of pinned
versions, nothing else from npm). ``build --vendor DIR`` (or ``$OVBOOK_VENDOR``; a missing ``DIR`` is filled
first) builds a book that serves them from its own ``_static/ovbook-vendor/``: a browser without internet (CI's)
reads it whole. Without it the pages load them from public CDNs, as any Jupyter Book does.

``build`` also points each chapter's launch buttons at notebooks that exist (:func:`fix_launch_links`): Binder
opens ``notebooks/NN_name.ipynb``, which ``binder/postBuild`` pairs from ``notebooks/NN_name.py`` with jupytext;
Colab opens the executed notebook on the :data:`NOTEBOOKS_BRANCH` branch, to which the Pages workflow pushes the
published ``_sources/`` (Colab opens notebooks from GitHub only); the download button serves the executed
``.ipynb`` from ``_sources/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from ovlib import config as params_lib
from ovlib.io import atomic_write_text

OVLIB_DIR = Path(__file__).resolve().parent
NOTEBOOK_DIR = "notebooks"
BOOK_DIR = "book"
STAMP_DIR = "book/.stamps"


class BookError(RuntimeError):
    """The book project is malformed (toc, missing notebook source, ...)."""


@dataclasses.dataclass(frozen=True)
class Chapter:
    """One executable chapter: ``book/<name>`` in the toc, ``notebooks/<name>.py`` as source."""

    name: str  # e.g. "01_clip_dense_features"
    root: Path

    @property
    def number(self) -> str:
        return self.name.split("_", 1)[0]

    @property
    def source(self) -> Path:
        return self.root / NOTEBOOK_DIR / f"{self.name}.py"

    @property
    def output(self) -> Path:
        return self.root / BOOK_DIR / f"{self.name}.ipynb"

    @property
    def stamp(self) -> Path:
        return self.root / STAMP_DIR / f"{self.name}.json"


@dataclasses.dataclass
class Result:
    chapter: str
    status: str  # "ok" | "skipped" | "failed"
    seconds: float
    message: str = ""


# --------------------------------------------------------------------------------------------- toc


def _toc_files(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key in ("root", "file"):
            if isinstance(node.get(key), str):
                yield node[key]
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                yield from _toc_files(child)
    elif isinstance(node, list):
        for child in node:
            yield from _toc_files(child)


_CHAPTER_RE = re.compile(r"^\d{2}_[A-Za-z0-9_]+$")


def chapters(root: Path | str = ".") -> list[Chapter]:
    """Executable chapters in ``_toc.yml`` order: entries ``book/NN_name`` whose source ``notebooks/NN_name.py`` exists.

    A toc entry that looks like a chapter (``book/NN_...``) without a notebook source is an error, so a typo
    cannot silently drop a chapter from the book.
    """
    root = Path(root)
    toc_path = root / "_toc.yml"
    if not toc_path.is_file():
        raise BookError(f"{toc_path} not found")
    toc = yaml.safe_load(toc_path.read_text())
    found: list[Chapter] = []
    for entry in _toc_files(toc):
        p = Path(entry)
        stem = p.stem if p.suffix else p.name
        if p.parent.as_posix() != BOOK_DIR or not _CHAPTER_RE.match(stem):
            continue
        ch = Chapter(stem, root)
        if not ch.source.is_file():
            raise BookError(f"_toc.yml lists {entry} but its notebook source {ch.source} does not exist")
        found.append(ch)
    return found


def select(all_chapters: Sequence[Chapter], only: Sequence[str] | None) -> list[Chapter]:
    """``--only 01 3 02_refining``: match by number (zero-padded) or by name prefix."""
    if not only:
        return list(all_chapters)
    picked = []
    for key in only:
        k = key.zfill(2) if key.isdigit() else key
        hits = [c for c in all_chapters if c.number == k or c.name.startswith(k)]
        if not hits:
            raise BookError(f"--only {key!r} matches no chapter; chapters: {[c.name for c in all_chapters]}")
        picked += [h for h in hits if h not in picked]
    return [c for c in all_chapters if c in picked]


# --------------------------------------------------------------------------------------------- hashing


def input_hash(chapter: Chapter, params: dict[str, Any], ovlib_dir: Path = OVLIB_DIR) -> str:
    """sha256 over the notebook source, the resolved parameters and every ovlib source file."""
    h = hashlib.sha256()
    h.update(b"notebook\0" + chapter.source.read_bytes())
    h.update(b"params\0" + json.dumps(params, sort_keys=True).encode())
    for f in sorted(ovlib_dir.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(b"ovlib\0" + f.relative_to(ovlib_dir).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def is_up_to_date(chapter: Chapter, digest: str) -> bool:
    if not (chapter.stamp.is_file() and chapter.output.is_file()):
        return False
    try:
        return json.loads(chapter.stamp.read_text()).get("hash") == digest
    except (json.JSONDecodeError, OSError):
        return False


# --------------------------------------------------------------------------------------------- execution


@contextlib.contextmanager
def kernel_env(params: dict[str, Any]) -> Iterator[None]:
    """Environment the kernel inherits: no progress bars, offline unless downloads are allowed."""
    new = {"TQDM_DISABLE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    if not params.get("allow_download", False):
        new["HF_HUB_OFFLINE"] = "1"
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tag_injected_parameters(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
            changed = True
    if changed:
        atomic_write_text(nbformat.writes(nb), path)


# --------------------------------------------------------------------------------------------- provenance

PROVENANCE_TAG = "ovbook-provenance"  # the box under the title (markdown, written after execution)
PROBE_TAG = "ovbook-probe"  # the last cell while executing: reports the kernel's machine; removed afterwards
COLAB_TAG = "ovbook-colab"  # Colab-only setup cell (hidden in the book)
PROBE_MARK = "OVBOOK-PROBE "
#: packages the box names (distribution names)
PROVENANCE_PACKAGES = ("torch", "open_clip_torch", "timm", "numpy", "jupyter-book", "papermill", "ovlib")

#: Runs in the chapter's kernel as its last cell: what ran it (the runner's own process may differ).
PROBE_SOURCE = f"""import json as _json, os as _os, platform as _platform
import torch as _torch
_cpu = _platform.processor() or _platform.machine()
if _os.path.isfile("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as _f:
        _names = [l.split(":", 1)[1].strip() for l in _f if l.startswith("model name")]
    _cpu = _names[0] if _names else _cpu
try:
    from ovlib.nb import resolve_device as _resolve
    _dev = _resolve(globals().get("device", "cpu"))
except Exception:
    _dev = _torch.device("cpu")
try:  # bf16 autocast that "auto" precision chose in this kernel (a CPU capability), per device type
    from ovlib.train.pretrain import _BF16_FASTER as _bf16
    _bf16 = sorted(k for k, v in _bf16.items() if v)
except Exception:
    _bf16 = []
print({PROBE_MARK!r} + _json.dumps(dict(
    cpu=_cpu, machine=_platform.machine(), cores=_os.cpu_count(), threads=_torch.get_num_threads(),
    device=str(_dev), gpu=_torch.cuda.get_device_name(_dev) if _dev.type == "cuda" else None,
    gpus=_torch.cuda.device_count() if _dev.type == "cuda" else 0, default_dtype=str(_torch.get_default_dtype()),
    bf16_autocast=_bf16, precision=globals().get("precision"))))
"""


def colab_setup_source(repo_url: str, ref: str) -> str:
    """The Colab-only first code cell: clone ``repo_url`` at ``ref`` (a commit or branch), install it with the book
    extra, and work from its root (the chapters use paths relative to the project root, as papermill runs them)."""
    return f"""# Google Colab only (elsewhere this cell does nothing): fetch the book's repository at the commit this
# notebook was made from, install it, and work from its root, as the book's runner does.
import os, subprocess, sys
try:
    import google.colab  # noqa: F401
except ImportError:
    pass
else:
    _repo = "/content/ovbook"
    if not os.path.isdir(_repo):
        subprocess.run(["git", "clone", "--quiet", {repo_url!r}, _repo], check=True)
        subprocess.run(["git", "-C", _repo, "checkout", "--quiet", {ref!r}], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", _repo + "[book]"], check=True)
    os.chdir(_repo)
    sys.path.insert(0, _repo)
"""


def repository(root: Path) -> tuple[str, str]:
    """``(url, branch)`` of ``repository:`` in ``_config.yml``."""
    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    repo = cfg.get("repository") or {}
    if not repo.get("url"):
        raise BookError(f"{root / '_config.yml'} has no repository.url (launch buttons and Colab need it)")
    return str(repo["url"]).rstrip("/"), str(repo.get("branch") or "main")


def git_commit(root: Path) -> tuple[str | None, bool]:
    """``(commit, has_local_changes)`` of the checkout at ``root``; ``(None, False)`` outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20)
        if sha.returncode != 0:
            return None, False
        if subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, timeout=20).stdout.strip() != str(root.resolve()):
            return None, False  # root is a folder inside another repository (e.g. a test's temporary copy)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return sha.stdout.strip(), bool(dirty)
    except (OSError, subprocess.TimeoutExpired):
        return None, False


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{seconds:.1f} s"


def provenance_markdown(chapter: Chapter, info: dict[str, Any]) -> str:
    """The box under a chapter's title. ``info``: profile, overrides, commit, dirty, versions, probe (the
    kernel's machine), seconds, finished (UTC ISO time), input_hash."""
    probe = info.get("probe") or {}
    commit = info.get("commit")
    commit_txt = (f"`{commit[:12]}`" + (" with local changes" if info.get("dirty") else "")) if commit \
        else "unknown (not run from a git checkout)"
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    if probe:
        dev = probe["device"] + (f" ({probe['gpu']}, {probe['gpus']} visible)" if probe.get("gpu") else "")
        precision = probe.get("default_dtype", "torch.float32").replace("torch.", "")
        if probe.get("precision"):  # the chapter's `precision` parameter decides every training's autocast
            precision += f", training `precision: {probe['precision']}`" + (
                f" (bf16 autocast on {', '.join(probe['bf16_autocast'])})" if probe.get("bf16_autocast") else "")
        elif probe.get("bf16_autocast"):
            precision += f", bf16 autocast on {', '.join(probe['bf16_autocast'])} (precision/amp 'auto' chose it)"
        elif probe["device"].startswith("cuda"):
            precision += ", autocast per recipe (amp 'auto': bf16 where supported)"
        else:
            precision += ", no autocast"
        threads = f"{probe['threads']} torch thread" + ("s" if probe["threads"] != 1 else "")
        machine = f"{probe['cpu']} ({probe['machine']}, {probe['cores']} cores), {threads}, device {dev}"
    else:
        machine, precision = "unknown (the probe cell did not report)", "unknown"
    overrides = " ".join(f"-p {o}" for o in info.get("overrides", ()))
    n = chapter.number
    micro = f"make install-locked && .venv/bin/python -m ovlib.book run --profile micro --only {n} --force"
    paper = (f".venv/bin/jupytext --to ipynb notebooks/{chapter.name}.py -o /tmp/{chapter.name}.ipynb && "
             f".venv/bin/papermill /tmp/{chapter.name}.ipynb {chapter.name}.paper.ipynb -f params/paper.yaml --cwd .")
    rows = [
        ("profile", f"`{info['profile']}`" + (f" with `{overrides}`" if overrides else "")),
        ("commit", commit_txt + (f"; inputs `{info['input_hash'][:12]}` (sha256 of notebook, parameters, ovlib)"
                                 if info.get("input_hash") else "")),
        ("packages", versions),
        ("machine", machine),
        ("precision", precision),
        ("wall time", f"{_duration(info['seconds'])} (finished {info['finished']})"),
        ("reproduce, micro", f"`{micro}`"),
        ("reproduce, paper", f"`{paper}` (GPU machines, COCO under `data/coco`)"),
    ]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (":::{admonition} How this page was made\n:class: note ovbook-provenance\n"
            "Written by the book's runner (`python -m ovlib.book run`) when it executed this chapter.\n\n"
            f"| | |\n|---|---|\n{body}\n:::")


def _title_index(cells: list) -> int:
    """Index after the first markdown cell holding a level-1 heading (0 when there is none)."""
    for i, c in enumerate(cells):
        if c.cell_type == "markdown" and re.search(r"^# ", c.source, re.MULTILINE):
            return i + 1
    return 0


def _prepare(nb, repo_url: str, ref: str) -> None:
    """Before execution: the Colab cell under the title, the probe cell at the end."""
    import nbformat

    colab = nbformat.v4.new_code_cell(colab_setup_source(repo_url, ref))
    colab.metadata["tags"] = [COLAB_TAG, "remove-cell"]
    nb.cells.insert(_title_index(nb.cells), colab)
    probe = nbformat.v4.new_code_cell(PROBE_SOURCE)
    probe.metadata["tags"] = [PROBE_TAG, "remove-cell"]
    nb.cells.append(probe)


def _pop_probe(nb) -> dict[str, Any]:
    """Remove the probe cell; its report (empty when it did not print one)."""
    found: dict[str, Any] = {}
    keep = []
    for c in nb.cells:
        if PROBE_TAG in c.get("metadata", {}).get("tags", []):
            for o in c.get("outputs", []):
                for line in str(o.get("text", "")).splitlines():
                    if line.startswith(PROBE_MARK):
                        found = json.loads(line[len(PROBE_MARK):])
            continue
        keep.append(c)
    nb.cells = keep
    return found


def add_provenance(chapter: Chapter, info: dict[str, Any]) -> None:
    """Replace the executed notebook's probe cell by the provenance box under its title."""
    import nbformat

    nb = nbformat.read(chapter.output, as_version=4)
    info = {**info, "probe": _pop_probe(nb)}
    nb.cells = [c for c in nb.cells if PROVENANCE_TAG not in c.get("metadata", {}).get("tags", [])]
    box = nbformat.v4.new_markdown_cell(provenance_markdown(chapter, info))
    box.metadata["tags"] = [PROVENANCE_TAG]
    i = _title_index(nb.cells)
    if i:  # right under the heading: the rest of the title cell moves to a cell of its own, after the box
        title = nb.cells[i - 1]
        head = re.search(r"^# .*$", title.source, re.MULTILINE)
        rest = title.source[head.end():].strip("\n")
        if rest.strip():
            title.source = title.source[:head.end()]
            nb.cells.insert(i, nbformat.v4.new_markdown_cell(rest))
    nb.cells.insert(i, box)
    atomic_write_text(nbformat.writes(nb), chapter.output)


def _failure_report(chapter: Chapter, err: Exception) -> str:
    """Chapter, failing cell source and traceback (from the partial notebook when papermill wrote one)."""
    lines = [f"chapter {chapter.name} failed: {type(err).__name__}"]
    cell_src = None
    if chapter.output.is_file():
        import nbformat

        nb = nbformat.read(chapter.output, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    cell_src = (i, cell.source)
                    break
            if cell_src:
                break
    if cell_src:
        lines.append(f"--- failing cell (index {cell_src[0]}) ---")
        lines.append(cell_src[1])
    tb = getattr(err, "traceback", None)
    lines.append("--- traceback ---")
    if tb:
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        lines.extend(ansi.sub("", t) for t in tb)
    else:
        lines.append(str(err))
    lines.append(f"--- partial notebook kept at {chapter.output} ---")
    return "\n".join(lines)


def execute(chapter: Chapter, params: dict[str, Any], kernel: str = "python3", ref: str | None = None) -> None:
    """Convert with jupytext and execute with papermill into ``book/NN_name.ipynb`` (cwd = project root).

    The notebook gets the Colab cell (cloning at ``ref``, default the configured branch) and the probe cell that
    :func:`add_provenance` turns into the provenance box."""
    import jupytext
    import nbformat
    import papermill as pm

    nb = jupytext.read(chapter.source)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise BookError(f"{chapter.source} has no cell tagged 'parameters' (# %% tags=[\"parameters\"])")
    repo_url, branch = repository(chapter.root)
    _prepare(nb, repo_url, ref or branch)
    work = chapter.root / BOOK_DIR / "_work"
    work.mkdir(parents=True, exist_ok=True)
    src_ipynb = work / f"{chapter.name}.ipynb"
    nbformat.write(nb, src_ipynb)
    chapter.output.parent.mkdir(parents=True, exist_ok=True)
    with kernel_env(params):
        pm.execute_notebook(
            str(src_ipynb),
            str(chapter.output),
            parameters=params,
            kernel_name=kernel,
            cwd=str(chapter.root),
            progress_bar=False,
            log_output=False,
            report_mode=False,
        )
    _tag_injected_parameters(chapter.output)


def run(
    root: Path | str = ".",
    profile: str = "micro",
    only: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    out=sys.stdout,
) -> list[Result]:
    """Execute the selected chapters; returns one :class:`Result` per chapter (stops at the first failure)."""
    root = Path(root).resolve()
    params = params_lib.resolve(profile, list(overrides), root=root)
    todo = select(chapters(root), only)
    commit, dirty = git_commit(root)
    versions = package_versions()
    results: list[Result] = []
    print(f"ovbook: profile {profile}, {len(todo)} chapter(s)", file=out, flush=True)
    for i, ch in enumerate(todo, 1):
        digest = input_hash(ch, params)
        if not force and is_up_to_date(ch, digest):
            results.append(Result(ch.name, "skipped", 0.0, "inputs unchanged"))
            print(f"[{i}/{len(todo)}] {ch.name}: unchanged since last run, skipped", file=out, flush=True)
            continue
        print(f"[{i}/{len(todo)}] {ch.name}: running ...", file=out, flush=True)
        t0 = time.perf_counter()
        try:
            execute(ch, params, ref=commit)
            dt = time.perf_counter() - t0
            add_provenance(ch, dict(profile=profile, overrides=list(overrides), commit=commit, dirty=dirty,
                                    versions=versions, seconds=dt, input_hash=digest,
                                    finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
        except Exception as e:  # papermill.PapermillExecutionError, kernel death, BookError
            dt = time.perf_counter() - t0
            results.append(Result(ch.name, "failed", dt, f"{type(e).__name__}"))
            print(_failure_report(ch, e), file=out, flush=True)
            ch.stamp.unlink(missing_ok=True)
            break
        atomic_write_text(json.dumps({"hash": digest, "profile": profile, "seconds": round(dt, 2)}), ch.stamp)
        results.append(Result(ch.name, "ok", dt))
        print(f"[{i}/{len(todo)}] {ch.name}: ok in {dt:.1f} s", file=out, flush=True)
    print(format_table(results), file=out, flush=True)
    return results


def format_table(results: Sequence[Result]) -> str:
    w = max([len("chapter")] + [len(r.chapter) for r in results])
    rows = [f"{'chapter':<{w}}  {'status':<8}  {'wall time':>9}", f"{'-' * w}  {'-' * 8}  {'-' * 9}"]
    rows += [f"{r.chapter:<{w}}  {r.status:<8}  {r.seconds:>8.1f}s" for r in results]
    total = sum(r.seconds for r in results)
    rows.append(f"{'total':<{w}}  {'':<8}  {total:>8.1f}s")
    return "\n".join(rows)



# --------------------------------------------------------------------------------------------- claims ledger
LEDGER_PAGE = "book/claims_ledger.md"
CLAIMS_GLOB = "book/claims/*.json"


def _section_titles(source: Path) -> dict[str, str]:
    """``{"2.2": "2.2 Region-language alignment, ..."}`` from a chapter source's ``## N.M ...`` headings."""
    out: dict[str, str] = {}
    for ln in source.read_text(encoding="utf-8").splitlines() if source.is_file() else ():
        m = re.match(r"^#\s+##\s+((\d+\.\d+)\b.*)$", ln)
        if m:
            out.setdefault(m.group(2), m.group(1).strip())
    return out


def _fmt(x: Any, digits: int = 1, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def ledger_page(root: Path | str = ".") -> Path:
    """Write the Claims ledger page (``book/claims_ledger.md``) from the chapters' ``book/claims/NN.json``: one
    table per paper (claim, the paper's table/figure and number, our effect with its interval, seeds, verdict,
    a link to the chapter's section) and the totals of headline claims. Raw HTML tables (nothing for Sphinx to
    resolve); section anchors are docutils ids of the chapters' ``## N.M`` headings."""
    import html

    from docutils.nodes import make_id

    from ovlib.study import INTERVAL_TARGETS

    root = Path(root)
    numbers = yaml.safe_load((root / "book" / "paper_numbers.yaml").read_text()) \
        if (root / "book" / "paper_numbers.yaml").is_file() else {"papers": {}}
    papers = numbers.get("papers") or {}
    chs = {c.number: c for c in chapters(root)}
    entries: list[dict[str, Any]] = []
    profiles = set()
    for f in sorted(root.glob(CLAIMS_GLOB)):
        doc = json.loads(f.read_text())
        profiles.add(doc.get("profile", "?"))
        entries += doc.get("claims", [])
    lines = ["# Claims ledger", "",
             "Which of the papers' claims reproduce here? One row per claim the chapters test, generated from the "
             "chapters' claims files (`book/claims/NN.json`, written by `ovlib.study`). *Claims* are judged on "
             "training seeds (paired, one-sample or Welch t-test; the interval is that test's t interval combined "
             "in quadrature with a bootstrap over the evaluation images) "
             "and resolved only when the test (p < 0.05) and the interval (excluding 0) agree; "
             "headline claims are Holm–Bonferroni corrected within their chapter. *Indicative* rows rest on one "
             "seed (image noise only): shown, never counted. *Checks* are identities verified numerically.", ""]
    if not entries:
        lines += ["No chapter has written its claims yet: run the chapters (`python -m ovlib.book run`)."]
    else:
        lines += [f"Profile(s) of the executed chapters: {', '.join(sorted(profiles))}.", ""]
        head = [c for c in entries if c.get("headline") and c.get("kind") == "claim"]
        head_ind = sum(bool(c.get("headline")) and c.get("kind") == "indicative" for c in entries)
        tot = {v: sum(c["verdict"] == v for c in head) for v in ("holds", "reversed", "not resolved")}
        lines += ["## Totals", "", f"Headline claims judged on seeds: **{tot['holds']} held**, **{tot['reversed']} "
                  f"reversed**, **{tot['not resolved']} not resolved** (of {len(head)}; {head_ind} more headline "
                  "claims rest on one seed at this profile: indicative, not counted). All claims: "
                  f"{sum(c['kind'] == 'claim' for c in entries)} judged on seeds, "
                  f"{sum(c['kind'] == 'indicative' for c in entries)} indicative, "
                  f"{sum(c['kind'] == 'check' for c in entries)} checks "
                  f"({sum(c['kind'] == 'check' and c['verdict'] == 'holds' for c in entries)} passed).", ""]
        miss = [c for c in head if c.get("meets_target") is False]
        lines += [f"Precision: {len(head) - len(miss)} of {len(head)} headline claims judged on seeds reach the "
                  f"book's interval target (95 % half-width ≤ {INTERVAL_TARGETS['points']:g} points, "
                  f"≤ {INTERVAL_TARGETS['miou']:g} for mIoU); the ± column of each table "
                  "gives every claim's half-width, and for a claim that misses it, the seeds per side that would "
                  "reach it (– where more seeds alone cannot: the evaluation images' part is too wide).", ""]
        order = list(papers) + sorted({c.get("paper") or "" for c in entries} - set(papers))
        per_paper = []
        for key in order:  # the same counts per paper (a paper without headline claims has no row)
            hp = [c for c in head if (c.get("paper") or "") == key]
            if hp:
                per_paper.append([html.escape(papers.get(key, {}).get("title", key or "other claims"))] +
                                 [str(sum(c["verdict"] == v for c in hp)) for v in tot] + [str(len(hp))])
        if per_paper:
            lines += ["| paper | held | reversed | not resolved | headline claims judged on seeds |",
                      "|---|---|---|---|---|", *("| " + " | ".join(r) + " |" for r in per_paper), ""]
        for key in order:
            rows = [c for c in entries if (c.get("paper") or "") == key]
            if not rows:
                continue
            title = papers.get(key, {}).get("title", key or "other claims")
            lines += [f"## {title}", "", '<table class="table ovbook-ledger">',
                      "<thead><tr><th>claim</th><th>paper</th><th>ours: b − a [95 % interval]</th>"
                      "<th>± (target; seeds to reach it)</th><th>seeds</th>"
                      "<th>p (Holm)</th><th>verdict</th><th>section</th></tr></thead><tbody>"]
            for c in rows:
                ch = chs.get(c["chapter"])
                sec = c.get("section") or ""
                link = ""
                if ch is not None:
                    title_ = _section_titles(ch.source).get(sec, "")
                    anchor = f"#{make_id(title_)}" if title_ else ""
                    label = html.escape(c["chapter"] + (" §" + sec if sec else ""))
                    link = f'<a href="{ch.name}.html{anchor}">{label}</a>'
                pv = c.get("paper_value")
                paper = html.escape(c.get("paper_ref") or "") + (f": {pv:+g}" if isinstance(pv, (int, float)) else "")
                kind = c["kind"]
                if kind == "check":
                    ours = f"{_fmt(c.get('ours_b'), 4)} (target {_fmt(c.get('ours_a'), 4)})"
                    verdict = "check passed" if c["verdict"] == "holds" else "<b>check failed</b>"
                    seeds = "–"
                else:
                    ours = f"{_fmt(c.get('delta'), 2, True)} [{_fmt(c.get('ci_low'), 2, True)}, " \
                           f"{_fmt(c.get('ci_high'), 2, True)}]"
                    seeds = f"{c.get('seeds_a') or 'frozen'} / {c.get('seeds_b') or 'frozen'}"
                    verdict = (f"indicative ({c.get('indication')})" if kind == "indicative"
                               else f"<b>{c['verdict']}</b>")
                p = _fmt(c.get("p"), 3) + (f" ({_fmt(c.get('p_adjusted'), 3)})" if c.get("p_adjusted") is not None
                                           else "")
                text = html.escape(c["claim"]) + (" <b>★</b>" if c.get("headline") else "") + \
                    f" <small>({html.escape(c.get('metric') or '')})</small>"
                prec = _precision_cell(c)
                lines.append(f"<tr><td>{text}</td><td>{paper}</td><td>{ours}</td><td>{prec}</td><td>{seeds}</td>"
                             f"<td>{p}</td>"
                             f"<td>{verdict}</td><td>{link}</td></tr>")
            lines += ["</tbody></table>", ""]
        lines += ["★ headline claim (Holm–Bonferroni within its chapter). Seeds: a / b (*frozen*: a deterministic "
                  "model evaluated once)."]
    out = root / LEDGER_PAGE
    atomic_write_text("\n".join(lines) + "\n", out)
    return out


def _precision_cell(c: dict[str, Any]) -> str:
    """``±1.2 (≤ 2 ✓)`` / ``±3.4 (≤ 1.5; 7 seeds)`` / ``±3.4 (≤ 1.5; –)`` for a ledger entry with an interval, ``–``
    without one (checks, entries written before the precision fields existed)."""
    h, target = c.get("half_width"), c.get("target")
    if c.get("kind") == "check" or h is None or target is None:
        return "–"
    if c.get("meets_target"):
        return f"±{h:.1f} (≤ {target:g} ✓)"
    n = c.get("seeds_needed")
    need = f"{n} seeds" if n is not None else "–"
    return f"±{h:.1f} (≤ {target:g}; {need})" if c.get("kind") == "claim" else f"±{h:.1f} (≤ {target:g})"


RECIPES_PAGE = "book/recipes.md"
SWEEPS_GLOB = "params/sweeps/*.json"


def recipes_page(root: Path | str = ".") -> Path:
    """Write the Recipes page (``book/recipes.md``, its figures in ``book/recipes/``) from the recorded recipe
    sweeps ``params/sweeps/PROFILE.json`` (:mod:`ovlib.sweep`): per profile the sweep's settings and provenance,
    per family a figure (tuning metric against the learning rate, one line per method and step budget, the
    choice marked) and the table of every point."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ovlib.sweep import GROUP_METRIC, SEG_METRIC, TUNE_METRIC

    root = Path(root)
    figdir = root / "book" / "recipes"
    lines = ["# Recipes", "",
             "The micro profile's learning rates and step budgets are not the papers' (theirs are for EVA-CLIP on "
             "COCO with 8 GPUs): the book chooses them by a recorded sweep (`python -m ovlib.sweep`, "
             "`ovlib/sweep.py`). Each family of methods that the chapters compare with each other is tuned on its "
             "baseline, on a split of the micro world that neither the training stream nor the chapters' "
             "evaluation split shares a scene with, and every method of the family takes the chosen learning rate "
             "(`params/micro.yaml`; `tests/test_sweep.py` checks that it holds the recorded choice). Choosing on "
             "the baseline favours the baseline, never the papers' additions.", ""]
    records = sorted(root.glob(SWEEPS_GLOB))
    if not records:
        lines += ["No recipe sweep is recorded (`params/sweeps/` is empty)."]
    for f in records:
        rec = json.loads(f.read_text())
        spec, prof = rec["spec"], rec["profile"]
        lines += [f"## Profile `{prof}`", "",
                  f"Tuning metric: {rec['tune_metric']} ({spec['region_images']} images); "
                  f"learning rates {', '.join(f'{x:g}' for x in spec['lrs'])}; step budgets "
                  f"{', '.join(str(x) for x in spec['steps'])} (× `steps_scale`, warm-up a tenth) with the batch and "
                  f"boxes of the `{spec['budget']}` training budget; {len(spec['seeds'])} seed(s) per point."
                  + (" The frozen CLIP before training: {:.1f} (boxes {:.1f}, thing {:.1f}, stuff {:.1f}).".format(
                      *(rec["reference"][k] for k in (TUNE_METRIC, "boxes.top1", "thing.top1", "stuff.top1")))
                     if rec.get("reference") else ""), ""]
        for r in rec.get("runs", []):
            lines.append(f"- `{r['command']}` (families {', '.join(r['families'])}) at commit `{r['commit']}`, "
                         f"{r['date']}, {r['cpu']}, {r['threads']} threads: {r['wall_s'] / 60:.1f} min.")
        trained = [p["train_s"] for p in rec["points"] if isinstance(p.get("train_s"), (int, float))
                   and math.isfinite(p["train_s"])]
        lines += [f"- Training the {len(rec['points'])} points took {sum(trained) / 60:.1f} min in all (their runs' "
                  "own logs); a re-run loads them from the shared run cache and evaluates again.", ""]
        for fam, c in rec["choices"].items():
            pts = [p for p in rec["points"] if p["family"] == fam]
            curves: dict[tuple[str, int], dict[float, list[float]]] = {}
            for p in pts:
                curves.setdefault((p["method"], int(p["steps"])), {}).setdefault(float(p["lr"]), []).append(
                    float(p["tune"]))
            fig, ax = plt.subplots(figsize=(5.5, 3.4))
            for (m, st), by_lr in sorted(curves.items()):
                lrs = sorted(by_lr)
                ax.plot(lrs, [sum(by_lr[x]) / len(by_lr[x]) for x in lrs], marker="o",
                        ls="-" if m == c["method"] else "--", label=f"{m}, {st} steps")
            metric = c["metric"]
            ax.plot([c["lr"]], [c["tune"]], marker="*", ms=16, color="k", ls="", label="chosen")
            if metric in rec.get("reference", {}):
                ax.axhline(rec["reference"][metric], color="grey", ls=":",
                           label="CLIPSeg initialisation (untrained)" if metric == SEG_METRIC else
                           "frozen CLIP" + (" (vanilla map)" if metric == GROUP_METRIC else ""))
            ax.set(xscale="log", xlabel="learning rate", ylabel=f"{metric} (%)",
                   title=f"{prof}: family {fam} (tuned on {c['method']})")
            ax.legend(fontsize=7)
            fig.tight_layout()
            figdir.mkdir(parents=True, exist_ok=True)
            png = figdir / f"{prof}_{fam}.png"
            fig.savefig(png, dpi=110)
            plt.close(fig)
            lines += [f"### Family `{fam}`", "",
                      f"**Chosen: lr {c['lr']:g}, {c['steps']} steps** ({metric} {c['tune']:.1f} on "
                      f"`{spec['split']}`, {c['method']}); shared by {', '.join(f'`{m}`' for m in c['shared'])}. "
                      + (f"The frozen CLIP's vanilla map (the Refiner's initialisation and target): "
                         f"{rec['reference'][metric]:.1f}. " if metric == GROUP_METRIC and metric in
                         rec.get("reference", {}) else "")
                      + (f"SynSeg's starting point, its decoder from the micro CLIPSeg untrained: "
                         f"{rec['reference'][metric]:.1f}. " if metric == SEG_METRIC and metric in
                         rec.get("reference", {}) else "")
                      + "Best lr per step budget: " + ", ".join(f"{st} steps → {v['lr']:g} ({v['tune']:.1f})"
                                                                for st, v in c["per_steps"].items()) + "."
                      + (f" Best of the grid: lr {c['best']['lr']:g} at {c['best']['steps']} steps "
                         f"({c['best']['tune']:.1f})." if "best" in c else ""), "",
                      f"![{fam}](recipes/{png.name})", "",
                      '<table class="table ovbook-recipes"><thead><tr><th>method</th><th>steps</th><th>lr</th>'
                      "<th>seed</th><th>boxes</th><th>thing</th><th>stuff</th><th>tuning metric</th>"
                      "<th>train s</th></tr></thead><tbody>"]
            for p in sorted(pts, key=lambda p: (p["method"] != c["method"], p["method"], p["steps"], p["lr"],
                                                p["seed"])):
                lines.append(f"<tr><td>{html.escape(p['method'])}</td><td>{p['steps']}</td><td>{p['lr']:g}</td>"
                             f"<td>{p['seed']}</td><td>{_fmt(p.get('boxes.top1'), 1)}</td>"
                             f"<td>{_fmt(p.get('thing.top1'), 1)}</td><td>{_fmt(p.get('stuff.top1'), 1)}</td>"
                             f"<td>{p['tune']:.1f}</td>"
                             f"<td>{_fmt(p.get('train_s'), 0)}</td></tr>")
            lines += ["</tbody></table>", ""]
    out = root / RECIPES_PAGE
    atomic_write_text("\n".join(lines) + "\n", out)
    return out


# --------------------------------------------------------------------------------------------- build

#: Sphinx warnings that mean the built book is broken (as opposed to cosmetic warnings).
BROKEN_CONTENT = [
    r"toctree contains reference to nonexisting document",
    r"document isn't included in any toctree",
    r"image file not readable",
    r"undefined label",
    r"unknown document",
    r"Unknown target name",
    r"could not find bibtex key",
    r"citation not found",
    r"failed to import",
    r"Could not lex literal_block",
    r"Notebook JSON is invalid",
    r"File not found",
    r"does not exist",
    r"reference target not found",
]


def broken_content(log: str) -> list[str]:
    pat = re.compile("|".join(BROKEN_CONTENT), re.IGNORECASE)
    return [ln for ln in log.splitlines() if ("WARNING" in ln or "ERROR" in ln) and pat.search(ln)]


#: npm packages served by a vendored build (``vendor``): pinned, the versions myst-nb / Sphinx load from CDNs
VENDOR_ENV = "OVBOOK_VENDOR"
VENDOR_LAYOUT = 2  # bump when the layout of a vendored directory changes
VENDOR_PACKAGES = {"mathjax": "3.2.2", "requirejs": "2.3.7", "@jupyter-widgets/html-manager": "1.0.6"}
#: paths inside ``_build/html/_static`` (relative paths in ``mathjax_path`` / ``add_js_file`` are under _static);
#: the HTML manager keeps its npm path under ``npm/``, the "CDN" it is told to load other widget modules from
#: (pages with widgets are chapters, one level below the root)
VENDOR_JS = {"shim": "ovbook-vendor/ovbook-shim.js", "mathjax": "ovbook-vendor/mathjax/tex-chtml.js",
             "require": "ovbook-vendor/require.js",
             "widgets": "ovbook-vendor/npm/@jupyter-widgets/html-manager/dist/embed-amd.js"}
WIDGETS_CDN = "../_static/ovbook-vendor/npm/"

#: Loaded after require.js, before the HTML manager. (1) The manager's webpack public path (its fonts) is the
#: require.js URL of its module, by default relative to the page: map it to the vendored copy. (2) It typesets
#: widget labels with MathJax 2's API (``MathJax.Hub.Queue``, @jupyter-widgets/base ``typeset``); the book loads
#: MathJax 3, where that call throws on every widget: forward it to MathJax 3's ``typesetPromise``.
MATHJAX2_SHIM = """// ovbook: vendored widget manager paths; MathJax.Hub.Queue(['Typeset', Hub, el]) -> MathJax 3
(function () {
  var me = document.currentScript && document.currentScript.src;
  if (me && window.require && typeof window.require.config === 'function') {
    window.require.config({paths: {'@jupyter-widgets/html-manager/dist':
      new URL('npm/@jupyter-widgets/html-manager/dist', me).href}});
  }
})();
(function () {
  var pending = [];
  function flush() {
    var mj = current;
    if (mj && typeof mj.typesetPromise === 'function' && pending.length) {
      mj.typesetPromise(pending.splice(0)).catch(function (e) { console.warn('MathJax typeset', e); });
    }
  }
  function addHub(mj) {
    if (mj && typeof mj === 'object' && !mj.Hub) {
      Object.defineProperty(mj, 'Hub', {enumerable: false, configurable: true, value: {Queue: function () {
        for (var i = 0; i < arguments.length; i++) {
          var a = arguments[i];
          if (Array.isArray(a) && a[0] === 'Typeset' && a[2]) pending.push(a[2]);
        }
        flush();
      }}});
    }
  }
  var current = window.MathJax;
  addHub(current);
  Object.defineProperty(window, 'MathJax', {configurable: true, get: function () { return current; },
    set: function (v) { current = v; addHub(v); }});
  window.addEventListener('load', function () {
    var n = 0, t = setInterval(function () { flush(); if (++n > 100) clearInterval(t); }, 100);
  });
})();
"""


def vendor(dest: Path | str, out=sys.stdout) -> Path:
    """``npm pack`` the pinned :data:`VENDOR_PACKAGES` and unpack what the pages load into ``dest``:
    ``mathjax/`` (MathJax's ``es5`` build), ``require.js``, ``npm/@jupyter-widgets/html-manager/dist/``. Skipped when
    ``dest`` already holds these versions."""
    import shutil
    import tarfile
    import tempfile

    dest = Path(dest).resolve()
    stamp = dest / "VERSIONS.json"
    want = {**VENDOR_PACKAGES, "layout": VENDOR_LAYOUT}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise BookError(f"vendoring the book's JavaScript into {dest} needs npm (Debian: apt-get install npm), or "
                        f"unset {VENDOR_ENV} to build pages that load MathJax and the widget manager from CDNs")
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{k}@{v}" for k, v in VENDOR_PACKAGES.items()]
        proc = subprocess.run([npm, "pack", "--silent", *specs], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BookError(f"npm pack {' '.join(specs)} failed:\n{proc.stdout}{proc.stderr}")
        tgz = {t.name.split("-")[0]: t for t in Path(tmp).glob("*.tgz")}  # mathjax / requirejs / jupyter
        parts = {"mathjax": ("package/es5/", "mathjax"), "requirejs": ("package/require.js", "require.js"),
                 "jupyter": ("package/dist/", "npm/@jupyter-widgets/html-manager/dist")}
        new = Path(tmp) / "out"
        for key, (prefix, target) in parts.items():
            if key not in tgz:
                raise BookError(f"npm pack did not produce the {key} package in {tmp}: {sorted(tgz)}")
            with tarfile.open(tgz[key]) as tf:
                for m in tf.getmembers():
                    if not m.isfile() or not m.name.startswith(prefix):
                        continue
                    rel = m.name[len(prefix):] if prefix.endswith("/") else ""
                    path = new / target / rel if rel else new / target
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(tf.extractfile(m).read())
        (new / "VERSIONS.json").write_text(json.dumps(want))
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(new, dest)
    pkgs = ", ".join(f"{k}@{v}" for k, v in VENDOR_PACKAGES.items())
    print(f"vendored {pkgs} into {dest}", file=out, flush=True)
    return dest


def _vendored_config(root: Path, vendor_dir: Path) -> Path:
    """``_config.yml`` plus the Sphinx settings that load MathJax / require.js / the widget manager from
    ``_static/ovbook-vendor`` (written under ``_build/``, passed to ``jupyter-book build --config``)."""
    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    sphinx_cfg = cfg.setdefault("sphinx", {}).setdefault("config", {})
    sphinx_cfg["mathjax_path"] = VENDOR_JS["mathjax"]
    # myst-nb adds these to pages with widget state; the "CDN" is the book itself: a non-standard widget module
    # would 404 here (visible in the browser test) instead of silently coming from the internet
    sphinx_cfg["nb_ipywidgets_js"] = {VENDOR_JS["require"]: {}, VENDOR_JS["shim"]: {},
                                      VENDOR_JS["widgets"]: {"data-jupyter-widgets-cdn": WIDGETS_CDN}}
    path = root / "_build" / ".ovbook" / "_config.vendored.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(yaml.safe_dump(cfg, sort_keys=False), path)
    return path


#: The branch the Pages workflow (.github/workflows/book.yml) pushes the published ``_sources/`` to: Colab opens
#: notebooks from GitHub only, so its button opens the executed notebook there.
NOTEBOOKS_BRANCH = "executed-notebooks"


def launch_targets(root: Path, chapter: Chapter) -> dict[str, str]:
    """Where each launch / download button of ``chapter``'s page must lead (paths relative to the repository
    after ``binder/postBuild``, to the :data:`NOTEBOOKS_BRANCH` tree, and to ``_build/html``)."""
    repo_url, _ = repository(root)
    org_repo = repo_url.split("github.com/", 1)[-1]
    return {
        "binder": f"{NOTEBOOK_DIR}/{chapter.name}.ipynb",
        "colab": f"https://colab.research.google.com/github/{org_repo}/blob/{NOTEBOOKS_BRANCH}/"
                 f"{BOOK_DIR}/{chapter.name}.ipynb",
        "download": f"_sources/{BOOK_DIR}/{chapter.name}.ipynb",
    }


def fix_launch_links(root: Path, html_dir: Path) -> list[str]:
    """Point each chapter page's Binder button at ``notebooks/NN_name.ipynb`` (the theme points it at the executed
    ``book/NN_name.ipynb``, which git ignores) and its Colab button at :data:`NOTEBOOKS_BRANCH`. Returns the
    problems: a chapter page whose buttons were not where the theme puts them."""
    _, branch = repository(root)
    problems = []
    for ch in chapters(root):
        page = html_dir / BOOK_DIR / f"{ch.name}.html"
        if not page.is_file():
            continue  # reported by the build itself
        text = page.read_text()
        want = launch_targets(root, ch)
        # the theme writes `<path_to_book>/book/NN_name.ipynb` (path_to_book "." gives "./book/...")
        new = re.sub(rf'urlpath=lab/tree/[^"?&]*?{BOOK_DIR}/{re.escape(ch.name)}\.ipynb',
                     f"urlpath=lab/tree/{want['binder']}", text)
        new = re.sub(rf'https://colab\.research\.google\.com/github/[^"]*?/blob/{re.escape(branch)}/'
                     rf'[^"]*?{BOOK_DIR}/{re.escape(ch.name)}\.ipynb', want["colab"], new)
        if f"lab/tree/{want['binder']}" not in new or want["colab"] not in new:
            problems.append(f"{page}: no Binder/Colab button to point at {want['binder']} / {want['colab']}")
        if new != text:
            atomic_write_text(new, page)
    return problems


def build(root: Path | str = ".", out=sys.stdout, vendor_dir: Path | str | None = None) -> int:
    """``jupyter-book build .``; non-zero when it fails or reports broken content.

    ``vendor_dir`` (default ``$OVBOOK_VENDOR``): serve MathJax and the widget manager from the built book
    (:func:`vendor` fills a missing directory)."""
    import shutil

    root = Path(root).resolve()
    exe = Path(sys.executable).parent / "jupyter-book"
    toc = yaml.safe_load((root / "_toc.yml").read_text()) if (root / "_toc.yml").is_file() else {}
    if LEDGER_PAGE.removesuffix(".md") in {Path(e).with_suffix("").as_posix() for e in _toc_files(toc)}:
        ledger_page(root)  # generated from the chapters' claims files (book/claims/*.json)
    if RECIPES_PAGE.removesuffix(".md") in {Path(e).with_suffix("").as_posix() for e in _toc_files(toc)}:
        recipes_page(root)  # generated from the recorded recipe sweeps (params/sweeps/*.json)
    if not exe.is_file():
        raise BookError(f"jupyter-book not found next to {sys.executable}; install the book extra: "
                        "pip install -e '.[book]'")
    cmd = [str(exe), "build", str(root), "--path-output", str(root)]
    vendor_dir = vendor_dir or os.environ.get(VENDOR_ENV) or None
    if vendor_dir:
        vendor_dir = vendor(vendor_dir, out=out)
        cmd += ["--config", str(_vendored_config(root, vendor_dir))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    dt = time.perf_counter() - t0
    bad = broken_content(log)
    index = root / "_build" / "html" / "index.html"
    if vendor_dir and index.is_file():
        static = root / "_build" / "html" / "_static" / "ovbook-vendor"
        shutil.copytree(vendor_dir, static, dirs_exist_ok=True)
        (static / Path(VENDOR_JS["shim"]).name).write_text(MATHJAX2_SHIM)
        # The manager's font CSS is sometimes resolved against the chapter page (`book/@jupyter-widgets/<hash>`)
        # before the shim's require path applies (seen once in three CI runs, a 404 in the browser test): serve
        # the fonts at that path too, so the race cannot break a page.
        dist = static / "npm" / "@jupyter-widgets" / "html-manager" / "dist"
        fonts = root / "_build" / "html" / "book" / "@jupyter-widgets"
        fonts.mkdir(parents=True, exist_ok=True)
        for f in dist.iterdir() if dist.is_dir() else ():
            if f.suffix in (".woff", ".woff2", ".ttf", ".eot", ".svg"):
                shutil.copy2(f, fonts / f.name)
    if index.is_file():
        bad += fix_launch_links(root, root / "_build" / "html")
    if proc.returncode != 0 or bad or not index.is_file():
        print(log[-20000:], file=out)
        if bad:
            print("\nbroken content reported by Sphinx:", file=out)
            for ln in bad:
                print("  " + ln, file=out)
        print(f"book build FAILED after {dt:.1f} s", file=out, flush=True)
        return 1
    print(f"book built in {dt:.1f} s: {index}", file=out, flush=True)
    return 0


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovlib.book", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".", help="project root (holds _toc.yml, notebooks/, params/, book/)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute chapters with papermill")
    r.add_argument("--profile", default="micro", help=f"one of {', '.join(params_lib.PROFILES)} (default micro)")
    r.add_argument("--only", nargs="+", metavar="NN", help="chapter numbers or name prefixes")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    r.add_argument("--force", action="store_true", help="re-execute even when inputs are unchanged")
    b = sub.add_parser("build", help="jupyter-book build . (fails on broken content)")
    b.add_argument("--vendor", metavar="DIR", default=None,
                   help=f"serve MathJax and the widget manager from the book (default ${VENDOR_ENV}; "
                        "filled if missing)")
    v = sub.add_parser("vendor", help="npm pack MathJax, require.js and the ipywidgets HTML manager into DIR")
    v.add_argument("dir")
    sub.add_parser("list", help="list the executable chapters of _toc.yml")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            for ch in chapters(args.root):
                print(ch.name)
            return 0
        if args.cmd == "build":
            return build(args.root, vendor_dir=args.vendor)
        if args.cmd == "vendor":
            vendor(args.dir)
            return 0
        results = run(args.root, args.profile, args.only, args.param, args.force)
    except (params_lib.ParamError, BookError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

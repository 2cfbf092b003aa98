"""The paper profile's dry run: every chapter's paper branch executes on CPU (`-p dry_run=true`).

Real architectures of params/paper.yaml randomly initialised, at most 2 training steps, small images, on the shared
100-image COCO panoptic subset (``../shared/data/coco_panoptic_val100``; instances derived from it, captions
synthesised from its category names). Skipped with the reason when the subset is absent (chapter 04: also when no
local WordNet is installed). The chapters share one project copy; each chapter's runs are removed after it (a
chapter's two-step runs still write ~1 GB of ensembles), so a later chapter trains again what it shares with an earlier
one.
"""

import io
import shutil

import nbformat
import pytest

from ovlib import book
from tests.conftest import shared_dir

# Chapter 01 trains nothing: it runs in the default set. Chapters 02-06 train their runs (two steps each) and are
# `slow` (CI's `pytest -m ''` runs them; `make test-quick` does not): a dry run keeps no optimiser state and no last.pt
# (`checkpoint: final` in dry_run_settings.recipes), its sweeps have the fewest points that still run every code path
# (dry_run_settings.budgets), every randomly initialised tower keeps its first `dry_run_settings.depth` blocks, and
# the runs of a chapter are removed after it. Measured times: in the note of the commit that put them in CI.
CHAPTERS = ("01", *(pytest.param(n, marks=pytest.mark.slow) for n in ("02", "03", "04", "05", "06")))


@pytest.fixture(scope="module")
def dry_project(tmp_path_factory, repo_root):
    shared = shared_dir()
    subset = shared / "data" / "coco_panoptic_val100" if shared else None
    if subset is None or not (subset / "annotations" / "panoptic_val2017.json").is_file():
        pytest.skip("the shared COCO panoptic subset ../shared/data/coco_panoptic_val100 is absent (set OVBOOK_SHARED)")
    root = tmp_path_factory.mktemp("paper_dry")
    for d in ("notebooks", "params", "book", "benchmarks"):
        shutil.copytree(repo_root / d, root / d, ignore=shutil.ignore_patterns("*.ipynb", ".stamps", "_work"))
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy(repo_root / f, root / f)
    return root, subset


@pytest.mark.parametrize("number", CHAPTERS)
def test_paper_branch_executes_in_a_dry_run(dry_project, number):
    root, subset = dry_project
    if number in ("04", "06"):  # COCO's synonyms (ch. 04's protocols, ch. 06's synonym replacement)
        from ovlib.data.synonyms import find_wordnet_dir

        if find_wordnet_dir() is None:
            pytest.skip(f"chapter {number}'s paper branch reads a local WordNet (apt-get install wordnet-base)")
    out = io.StringIO()
    try:
        res = book.run(root, "paper", only=[number], overrides=["dry_run=true", f"data_root={subset}"], force=True,
                       out=out)
    finally:  # a ViT-B run's weights are ~350 MB: never left behind in pytest's temporary folders
        shutil.rmtree(root / "data" / "cache-paper-dry" / "runs", ignore_errors=True)
    assert [r.status for r in res] == ["ok"], out.getvalue()
    (ch,) = book.select(book.chapters(root), [number])
    nb = nbformat.read(ch.output, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{ch.name} has unexecuted cells"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/markdown", "")) for c in code for o in c.outputs)
    assert "**Dry run**" in text and "synthesised" in text  # the chapter says what its data is
    assert "towers cut to their first" in text  # ... and that its towers are cut (dry_run_settings.depth)

"""Imports go one way (DESIGN.md): core (io, config, stats, nb) -> models -> data -> methods -> train -> eval ->
study, viz -> book. Every ``import`` statement of ovlib -- module-level *and* inside functions, where a back-edge
would otherwise hide -- is read with ``ast``; a lower layer importing a higher one fails, and so does a cycle
between modules (e.g. ``data.coco -> data.microworld -> data.coco``)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import ovlib

PKG = Path(ovlib.__file__).resolve().parent
#: layer of each top-level part of ovlib (higher may import lower, never the reverse)
LAYERS = {"__init__": 0, "io": 0, "config": 0, "stats": 0, "nb": 0, "parallel": 0, "models": 1, "data": 2, "methods": 3,
          "train": 4, "eval": 5, "study": 6, "sweep": 6, "viz": 6, "book": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        name = ".".join(("ovlib", *f.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = f
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    return 0 if len(parts) == 1 else LAYERS[parts[1]]


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(importer, imported ovlib module, line)`` for every import statement (``from pkg import sub`` counts as
    an import of ``pkg.sub`` when that is a module)."""
    edges = []
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for t in targets:
                if t == "ovlib" or t.startswith("ovlib."):
                    while t not in modules:
                        t = t.rsplit(".", 1)[0]
                    if t != name:
                        edges.append((name, t, node.lineno))
    return edges


def test_layers_are_known():
    unknown = {m.split(".")[1] for m in _modules() if m != "ovlib" and m.split(".")[1] not in LAYERS}
    assert not unknown, f"add these parts of ovlib to LAYERS (and DESIGN.md's order): {sorted(unknown)}"


def test_no_import_goes_up_a_layer():
    modules = _modules()
    back = [f"{a} (line {ln}) imports {b}: layer {_layer(a)} -> {_layer(b)}"
            for a, b, ln in _imports(modules) if _layer(b) > _layer(a)]
    assert not back, "imports against the layer order:\n  " + "\n  ".join(back)


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, _ in _imports(modules):
        if not a.startswith(b + "."):  # a submodule importing its own package's __init__ is not a cycle
            graph[a].add(b)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(modules):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("src, bad", [
    ("from ovlib.eval.metrics import confusion_matrix\n", "ovlib.eval.metrics"),
    ("def f():\n    from ovlib.train import pretrain\n", "ovlib.train.pretrain"),
])
def test_the_checker_sees_a_back_edge_also_inside_a_function(tmp_path, monkeypatch, src, bad):
    """The test above can fail: a models module importing eval or train (even inside a function) is caught."""
    modules = _modules()
    fake = tmp_path / "fake.py"
    fake.write_text(src)
    modules["ovlib.models.fake"] = fake
    back = [(a, b) for a, b, _ in _imports(modules) if _layer(b) > _layer(a)]
    assert ("ovlib.models.fake", bad) in back

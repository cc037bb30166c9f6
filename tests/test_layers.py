"""The package's layers (docs/architecture.md): every import, at the top of a file or inside a function,
points to the same layer or one below, and no set of modules imports itself round in a circle.

Read from the source with `ast`, so an import hidden inside a function counts like any other. Importing
`a.b.c` runs the package `a.b`'s __init__ first, so that counts as an import of `a.b` too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Module (or package prefix) -> layer, the most specific prefix wins. L0 leaves, L1 models and maths,
# L2 readers of data and of Hugging Face folders, L3 runs and training state, L4 tasks, L5 the loop
# and everything a user calls.
LAYERS = {
    "lmforge": 0, "lmforge.errors": 0, "lmforge.fields": 0, "lmforge.io": 0, "lmforge.tasks": 0,
    "lmforge.tasks.registry": 0, "lmforge.model": 0, "lmforge.hf": 0, "lmforge.data": 0, "lmforge.train": 0,
    "lmforge.config": 1, "lmforge.model.": 1, "lmforge.losses": 1, "lmforge.optim": 1, "lmforge.metrics": 1,
    "lmforge.peft": 1, "lmforge.quant": 1, "lmforge.chat": 1,
    "lmforge.data.": 2, "lmforge.hf.arch": 2, "lmforge.hf.keymap": 2, "lmforge.hf.tokenizer": 2, "lmforge.hf.load": 2,
    "lmforge.hf.bart": 2, "lmforge.hf.sentence": 2, "lmforge.hf.layouts": 2,
    "lmforge.runs": 3, "lmforge.rundir": 3, "lmforge.train.": 3,
    "lmforge.tasks.": 4, "lmforge.generate": 4,
    "lmforge.train.loop": 5, "lmforge.train.checkpointer": 5, "lmforge.cli": 5, "lmforge.serve": 5,
    "lmforge.report": 5, "lmforge.hf.export": 5, "lmforge.hf.onnx": 5, "lmforge.__main__": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    prefixes = [p for p in LAYERS if p.endswith(".") and module.startswith(p)]
    if not prefixes:
        raise AssertionError(f"{module} has no layer in tests/test_layers.py LAYERS: give it one")
    return LAYERS[max(prefixes, key=len)]


def imports(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(lmforge module, line) for every import in the file, with the packages each one runs."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lmforge.hf import keymap` imports the module lmforge.hf.keymap
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found += [(".".join(parts[:i]), node.lineno) for i in range(1, len(parts) + 1)
                      if ".".join(parts[:i]) in modules]
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: {target: line for target, line in imports(p, set(files)) if target != m} for m, p in files.items()}


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_points_up_a_layer():
    graph = import_graph()
    upward = [f"{m} (L{layer(m)}) imports {t} (L{layer(t)}) at line {line}"
              for m, targets in graph.items() for t, line in targets.items() if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The two checks above would fail on the kind of code they exist to stop."""
    graph = {"lmforge.runs": {"lmforge.hf.load": 1}, "lmforge.hf.load": {"lmforge.runs": 2}, "lmforge.io": {}}
    assert circles(graph) == [["lmforge.hf.load", "lmforge.runs"]]
    assert layer("lmforge.hf.load") < layer("lmforge.runs")  # so hf.load -> runs is an upward import
    assert layer("lmforge.tasks.classify") > layer("lmforge.model.build")
    with pytest.raises(AssertionError, match="has no layer"):
        layer("lmforge_other.module")


@pytest.mark.parametrize("module", ["lmforge.tasks.registry", "lmforge.config", "lmforge.cli", "lmforge.rundir",
                                    "lmforge.report"])
def test_light_modules_do_not_load_torch(module):
    """The registry and the config are read by `lmforge --help` and by config validation: they must not
    pay for importing torch (seconds on a cold start)."""
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    # the lmforge under test, wherever the test runs from (not another checkout installed in the environment)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC.parent), os.environ.get("PYTHONPATH")]))}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0, f"importing {module} loads torch"

# SPDX-License-Identifier: Apache-2.0
"""Import structure: the modules of cifd_kernels.training import each other
without cycles (issue 14: layers that only point down). Imports inside
functions count: a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import cifd_kernels

ROOT = Path(cifd_kernels.__file__).parent


def _module_graph() -> dict[str, set[str]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = ("cifd_kernels",) + p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        deps = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - n.level + 1])
                    target = f"{base}.{n.module}" if n.module else base
                else:
                    target = n.module
                if target in mods:
                    deps.add(target)
                deps.update(f"{target}.{a.name}" for a in n.names if f"{target}.{a.name}" in mods)
            elif isinstance(n, ast.Import):
                deps.update(a.name for a in n.names if a.name in mods)
        graph[m] = deps - {m}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_training_has_no_import_cycle():
    g = _module_graph()
    assert "cifd_kernels.training.cifd" in g and "cifd_kernels.training.distill" in g
    sub = {m: {d for d in deps if d.startswith("cifd_kernels.training")}
           for m, deps in g.items() if m.startswith("cifd_kernels.training")}
    assert _cycles(sub) == []

# SPDX-License-Identifier: Apache-2.0
"""Structure (issue 14): the modules of cifd_kernels.training import each other
without cycles and the kernel layers import nothing above them (layers that
only point down; imports inside functions count: a lazy import is still a
dependency); the environment is read in backend.py only, never in the compiled
sources; the packed layout's constants agree between Python and C++."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


def test_kernel_layers_import_nothing_above_them():
    """The Triton kernels and the reference sit below the ops, the modules and the
    recipes: no import (lazy ones included) climbs from them."""
    g = _module_graph()
    above = ("cifd_kernels.ops", "cifd_kernels.nn", "cifd_kernels.training")
    for low in ("cifd_kernels._triton", "cifd_kernels.reference", "cifd_kernels._layout",
                "cifd_kernels.backend"):
        climbs = {m: sorted(d for d in deps if d.startswith(above))
                  for m, deps in g.items() if m.startswith(low)}
        assert {m: d for m, d in climbs.items() if d} == {}, low
    assert not (g["cifd_kernels._layout"] | g["cifd_kernels.backend"]) - {"cifd_kernels"}


# Modules besides backend.py that may touch os.environ, and why: torchrun's own
# variables (the launcher's protocol, read where the process group is set up), and the
# study's worker processes, which inherit the environment with one thread each.
_ENV_READERS = {"cifd_kernels.backend", "cifd_kernels.training.distributed",
                "cifd_kernels.training.study"}


def _env_uses(tree: ast.AST) -> list[int]:
    """Lines that read the environment: os.environ, os.getenv, os.environb, or the names
    imported from os (``from os import environ``)."""
    lines = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv", "environb") \
                and isinstance(n.value, ast.Name) and n.value.id == "os":
            lines.append(n.lineno)
        elif isinstance(n, ast.ImportFrom) and n.module == "os" \
                and any(a.name in ("environ", "getenv", "environb") for a in n.names):
            lines.append(n.lineno)
    return lines


def test_env_use_finder_finds_reads():
    src = "import os\nfrom os import getenv\na = os.environ.get('X')\nb = os.getenv('Y')\n"
    assert sorted(_env_uses(ast.parse(src))) == [2, 3, 4]
    assert _env_uses(ast.parse("import os\np = os.path.join('a')\n")) == []


def test_environment_is_read_in_backend_only():
    """Configuration in one place (issue 14): backend.py reads the package's environment
    variables; the kernels take explicit options (backend.KernelOptions)."""
    readers = {}
    for p in ROOT.rglob("*.py"):
        parts = ("cifd_kernels",) + p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        lines = _env_uses(ast.parse(p.read_text()))
        if lines:
            readers[name] = lines
    assert "cifd_kernels.backend" in readers
    assert set(readers) <= _ENV_READERS, {m: readers[m] for m in set(readers) - _ENV_READERS}


def test_no_getenv_in_the_compiled_sources():
    """csrc/ and the extension's glue (python/) read no environment: kernel choices travel
    in EbProblem, set from backend.KernelOptions."""
    import re
    repo = ROOT.parent
    if not (repo / "csrc").is_dir():
        pytest.skip("not a source checkout")
    found = [f"{p.relative_to(repo)}:{i}" for d in ("csrc", "python") for p in sorted((repo / d).rglob("*"))
             if p.suffix in (".h", ".cpp", ".cu", ".cuh") and "tests" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\bgetenv\b|\benviron\b", line)]
    assert found == []


def test_layout_constants_match_the_cpp_header():
    """The packed layout's sizes, spelled once a language: _layout.py and density.h agree."""
    import re

    from cifd_kernels import _layout
    repo = ROOT.parent
    header = repo / "csrc" / "include" / "cifd" / "density.h"
    if not header.is_file():
        pytest.skip("not a source checkout")
    text = header.read_text()
    cpp = {k: int(re.search(rf"constexpr int {k} = (\d+);", text).group(1)) for k in ("kNumPacked", "kNumGrad")}
    assert cpp == {"kNumPacked": _layout.NUM_PACKED, "kNumGrad": _layout.NUM_GRAD}
    assert _layout.MEDIAN_ROW == _layout.NUM_PACKED and _layout.MODES == {"noise": 0, "dequantize": 1, "none": 2}


ARG_CHECKS = {"check_tensor", "check_same_device", "check_dim", "check_nonempty", "check_rho_s"}


def _defined_and_imported(path: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """Top-level function names ``path`` defines, and (module, name) pairs of its
    ``from X import name``."""
    tree = ast.parse(path.read_text())
    defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    froms = {(n.module or "", a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             for a in n.names}
    return defs, froms


def test_argument_checks_live_in_one_module():
    """The tensor checks and check_rho_s are defined in reference/_checks.py only, and
    nobody imports them from another module (which would re-export them)."""
    owner = ROOT / "reference" / "_checks.py"
    assert ARG_CHECKS <= _defined_and_imported(owner)[0]
    for path in ROOT.rglob("*.py"):
        if path == owner:
            continue
        defs, froms = _defined_and_imported(path)
        assert not defs & ARG_CHECKS, f"{path.relative_to(ROOT)} defines {defs & ARG_CHECKS}"
        bad = {(m, n) for m, n in froms if n in ARG_CHECKS and not m.endswith("_checks")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad} from outside _checks"

"""The package's modules import one another one way: no cycle, not even through an
import inside a function (network and io/interop, train and distributed each
imported the other that way)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import bprop

PACKAGE = Path(bprop.__file__).resolve().parent


def _imports(path: Path, modules: set) -> set:
    """The package's modules that `path` imports anywhere (the package itself as
    "__init__")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 0:
                if base != "bprop" and not base.startswith("bprop."):
                    continue
                base = base[len("bprop"):].lstrip(".")
            if base:
                found.add(base.split(".")[0])
            else:  # from . import x: a module (compiled ones are left out), or a name
                # of the package's __init__
                found |= {a.name if a.name in modules or f"bprop.{a.name}" in sys.modules
                          else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] if "." in a.name else "__init__"
                      for a in node.names if a.name.split(".")[0] == "bprop"}
    return found & (modules | {"__init__"})


def test_the_modules_import_one_another_one_way():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: _imports(PACKAGE / f"{m}.py", modules) - {m} for m in modules}
    graph.pop("__main__")  # python -m bprop: it imports the package, nothing imports it
    assert "network" in graph["optim"] and "optim" in graph["io"]  # the scan sees imports

    def cycle_from(start, path):
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, [m]))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)

"""Every layer kind is tested: each kind in bprop.layers' ``_KINDS`` appears in each
table of layer cases the suite runs (against the reference, central differences,
PyTorch, checkpoints, interop, and the C++ no-allocation test), and ``_KINDS`` names
the same kinds as the core's ``LayerSpec::Kind``. A new layer kind without its test
cases fails here, naming the table it is missing from.

Activations need no such check: the tables that test them are built from
``bprop.ACTIVATIONS`` (the registry's rows).
"""

from __future__ import annotations

import importlib
import os
import re

import pytest

from bprop.layers import _KINDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def _kinds(layers):
    """The class names of `layers` (bprop's or bprop.reference's), Residuals' too."""
    kinds = set()
    for layer in layers:
        kinds.add(type(layer).__name__)
        if type(layer).__name__ == "Residual":
            kinds |= _kinds(layer.layers)
    return kinds


def _cases(module, table, *args):
    """The layer lists of a test module's dict of case factories."""
    return [make(*args) for make in getattr(importlib.import_module(module), table).values()]


def _one(module, factory):
    return [getattr(importlib.import_module(module), factory)()]


def _bprop():
    return importlib.import_module("bprop")


# name -> () -> [layer list, ...]: the tables CONTRIBUTING.md asks a new layer to join
TABLES = {
    "test_layers.CASES": lambda: _cases("test_layers", "CASES", _bprop()),
    "test_layers.GRADCHECK_CASES": lambda: _cases("test_layers", "GRADCHECK_CASES", _bprop()),
    "test_core_layers.ARCHS": lambda: _cases("test_core_layers", "ARCHS"),
    "test_layers_torch.CASES": lambda: _cases("test_layers_torch", "CASES"),
    "test_reference_layers.LAYER_CASES": lambda: _cases("test_reference_layers",
                                                        "LAYER_CASES"),
    "test_io_layers.every_layer_kind": lambda: _one("test_io_layers", "every_layer_kind"),
    "test_interop_layers.every_layer": lambda: _one("test_interop_layers", "every_layer"),
}


@pytest.mark.parametrize("table", list(TABLES))
def test_every_layer_kind_is_in_the_table(table):
    found = set()
    for layers in TABLES[table]():
        found |= _kinds(layers)
    missing = sorted(set(_KINDS) - found)
    assert not missing, f"{table} has no case with {missing}"


def _core_kind_names():
    """Kind enumerator -> Python class name, from the core's kind_name
    (cpp/src/layers.cpp)."""
    names = dict(re.findall(r'case LayerSpec::Kind::(\w+): return "(\w+)";',
                            _read("cpp", "src", "layers.cpp")))
    assert names, "kind_name's cases not found in cpp/src/layers.cpp"
    return names


def test_kinds_match_the_core():
    enum = re.search(r"enum class Kind \{([^}]*)\}", _read("cpp", "include", "bprop", "layer.hpp"))
    assert enum, "enum class Kind not found in cpp/include/bprop/layer.hpp"
    enumerators = [e.strip() for e in enum.group(1).split(",") if e.strip()]
    names = _core_kind_names()
    assert sorted(names) == sorted(enumerators)  # kind_name covers the enum
    assert sorted(names.values()) == sorted(_KINDS)


def test_every_layer_kind_is_in_the_no_alloc_network():
    # cpp/tests/test_no_alloc.cpp's networks (run_all): Kind::x in layer(Kind::x), and
    # Dense through LayerSpec::dense_layer
    text = _read("cpp", "tests", "test_no_alloc.cpp")
    body = text[text.index("int run_all()"):text.index("int main(")]
    used = set(re.findall(r"\bKind::(\w+)", body))
    if "LayerSpec::dense_layer" in body:
        used.add("dense")
    names = _core_kind_names()
    found = {names[e] for e in used if e in names}
    missing = sorted(set(_KINDS) - found)
    assert not missing, f"cpp/tests/test_no_alloc.cpp's networks have no {missing}"

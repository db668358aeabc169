"""Finds and loads the compiled core.

A portable build (the default) holds three builds of the same core: ``_core`` for
any x86-64 CPU (baseline, SSE2), ``_core_v3`` for x86-64-v3 (AVX2, FMA, BMI2) and
``_core_v4`` for x86-64-v4 (AVX-512). The best one the CPU runs is loaded and
registered as ``bprop._core``, so the rest of the package never knows which;
``BPROP_ISA=baseline|v3|v4`` forces one. A native build (``BPROP_NATIVE=ON``) has
only ``_core``, tuned for the build machine.

What the CPU runs is decided in one place, the small module ``bprop._isa``
(cpp/bindings/isa.cpp), compiled for baseline x86-64 so it imports on any CPU.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType

LEVELS = ("baseline", "v3", "v4")
DESCRIPTIONS = {"baseline": "x86-64 (SSE2)", "v3": "x86-64-v3 (AVX2 + FMA)",
                "v4": "x86-64-v4 (AVX-512)", "native": "-march=native (BPROP_NATIVE=ON)"}
MODULES = {"baseline": "bprop._core", "v3": "bprop._core_v3", "v4": "bprop._core_v4",
           "native": "bprop._core"}

REBUILD = ("Rebuild it with `pip install .` (for development: `pip install "
           "--no-build-isolation -e . -Cbuild-dir=build/dev`).")

#: set by load_core: the level loaded, the build kind and the levels this install
#: holds and this CPU runs (bprop.config() reports them)
loaded: dict = {}


def _load_openblas() -> None:
    """Loads OpenBLAS from the scipy-openblas32 wheel so that the core, linked to it
    by soname only, finds it in whatever environment bprop is installed."""
    try:
        import scipy_openblas32 as openblas
    except ImportError:  # a core built with -DBPROP_OPENBLAS=OFF does not need it
        return
    path = os.path.join(openblas.get_lib_dir(), openblas.get_library(True))
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def choose_level(requested: str, build: str, built: Sequence[str],
                 lacks: Mapping[str, Sequence[str]]) -> str:
    """The level of the core to load, or an ImportError that says why none fits.

    Args:
        requested: the value of BPROP_ISA ("" when unset: the best the CPU runs).
        build: "portable" or "native" (BPROP_NATIVE=ON: one core, no level).
        built: the levels this install holds, lowest first.
        lacks: per level, the CPU features it needs that this CPU lacks.

    Returns:
        "baseline", "v3", "v4", or "native" for a native build.
    """
    requested = requested.strip().lower()
    if requested and requested not in LEVELS:
        raise ImportError(
            f"BPROP_ISA={requested!r} is not a level of bprop's core; allowed values: "
            f"{', '.join(LEVELS)} (or unset it to load the best level this CPU runs)")
    if build == "native":
        if requested:
            raise ImportError(
                f"BPROP_ISA={requested} asks for the {DESCRIPTIONS[requested]} build of "
                "bprop's core, but this bprop was built with BPROP_NATIVE=ON and holds only "
                "bprop._core, tuned for the build machine (-march=native). Unset BPROP_ISA, "
                "or install the portable build (the default: `pip install .`).")
        return "native"
    runs = [level for level in built if not lacks.get(level)]
    if not requested:
        if not runs:  # cannot happen on x86-64: every such CPU runs the baseline
            raise ImportError("this CPU runs none of the builds of bprop's core in this "
                              f"install ({', '.join(built)})")
        return runs[-1]
    if requested not in built:
        raise ImportError(
            f"BPROP_ISA={requested} asks for the {DESCRIPTIONS[requested]} build of bprop's "
            f"core, but this install holds only: {', '.join(built)}. Unset BPROP_ISA to "
            "load the best of them.")
    if lacks.get(requested):
        raise ImportError(
            f"BPROP_ISA={requested} asks for the {DESCRIPTIONS[requested]} build of bprop's "
            f"core, but this CPU lacks {', '.join(lacks[requested])}; it runs: "
            f"{', '.join(runs)}. Unset BPROP_ISA to load the best of them.")
    return requested


def load_core() -> ModuleType:
    _load_openblas()
    try:
        from . import _isa
    except ImportError as exc:
        raise ImportError(f"bprop's compiled modules are missing or broken ({exc}). "
                          + REBUILD) from exc
    built = tuple(_isa.BUILT_LEVELS)
    lacks = {level: list(_isa.cpu_lacks(level)) for level in _isa.LEVELS}
    level = choose_level(os.environ.get("BPROP_ISA", ""), _isa.BUILD, built, lacks)
    name = MODULES[level]
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"bprop's compiled core ({name}) could not be imported: {exc}. "
                          + REBUILD) from exc
    sys.modules["bprop._core"] = module
    loaded.update(isa=level, build=_isa.BUILD,
                  cpu_levels=[lv for lv in _isa.LEVELS if not lacks[lv]],
                  loadable=[lv for lv in built if not lacks[lv]])
    return module

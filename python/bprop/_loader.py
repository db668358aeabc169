"""Finds and loads the compiled core.

A local build has one module, ``bprop._core``, tuned for the build machine. A
portable wheel has two builds of the same core: ``_core`` for any x86-64 CPU and
``_core_avx512`` for CPUs with AVX-512 (x86-64-v4); the best one the CPU runs is
loaded and registered as ``bprop._core``, so the rest of the package never knows
which. ``BPROP_ISA=baseline`` forces the baseline build.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from types import ModuleType

# x86-64-v4 as GCC's -march defines it
_V4_FEATURES = ("AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL")


def _load_openblas() -> None:
    """Loads OpenBLAS from the scipy-openblas32 wheel so that the core, linked to it
    by soname only, finds it in whatever environment bprop is installed."""
    try:
        import scipy_openblas32 as openblas
    except ImportError:  # a core built with -DBPROP_OPENBLAS=OFF does not need it
        return
    path = os.path.join(openblas.get_lib_dir(), openblas.get_library(True))
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _cpu_has_avx512() -> bool:
    try:  # NumPy's runtime CPU detection (the route faiss takes too)
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return False
    return all(features.get(name, False) for name in _V4_FEATURES)


def load_core() -> ModuleType:
    _load_openblas()
    candidates = ["bprop._core"]
    if os.environ.get("BPROP_ISA", "").lower() != "baseline" and _cpu_has_avx512():
        candidates.insert(0, "bprop._core_avx512")
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue  # a native build ships only _core
        except ImportError as exc:
            raise ImportError(
                f"bprop's compiled core ({name}) could not be imported: {exc}. Rebuild it "
                "with `pip install .` (for development: `pip install --no-build-isolation "
                "-e . -Cbuild-dir=build/dev`).") from exc
        sys.modules["bprop._core"] = module
        return module
    raise ImportError(
        "bprop's compiled core (bprop._core) is missing. Rebuild it with `pip install .` "
        "(for development: `pip install --no-build-isolation -e . -Cbuild-dir=build/dev`).")

"""bprop: dense feed-forward networks trained by backpropagation, with a C++ core.

    >>> import bprop
    >>> net = bprop.Network([bprop.Dense(64, 128, activation="relu"), bprop.Dense(128, 10)])
"""

def _load_openblas() -> None:
    """Loads OpenBLAS from the scipy-openblas32 wheel so that _core, linked to it
    by soname only, finds it whatever the virtual environment."""
    import ctypes
    import os

    try:
        import scipy_openblas32 as _openblas
    except ImportError:  # a core built with -DBPROP_OPENBLAS=OFF does not need it
        return
    path = os.path.join(_openblas.get_lib_dir(), _openblas.get_library(True))
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_load_openblas()

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only when the build is missing or stale
    raise ImportError(
        "bprop's compiled core (bprop._core) could not be imported. Rebuild it with "
        "`pip install .` (or, for development, `pip install --no-build-isolation -e . "
        "-Cbuild-dir=build/dev`)."
    ) from exc

from .network import ACTIVATIONS, Dense, Network
from . import losses, optim  # noqa: E402
from .io import CheckpointError, load, save  # noqa: E402
from .train import History, evaluate, fit, gradcheck  # noqa: E402

__version__ = _core.build_info()["version"]

__all__ = ["ACTIVATIONS", "Dense", "Network", "__version__",
           "losses", "optim", "fit", "evaluate", "gradcheck", "History",
           "save", "load", "CheckpointError"]

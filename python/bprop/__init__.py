"""bprop: dense feed-forward networks trained by backpropagation, with a C++ core.

    >>> import bprop
    >>> net = bprop.Network([bprop.Dense(64, 128, activation="relu"), bprop.Dense(128, 10)])
"""

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only when the build is missing or stale
    raise ImportError(
        "bprop's compiled core (bprop._core) could not be imported. Rebuild it with "
        "`pip install .` (or, for development, `pip install --no-build-isolation -e . "
        "-Cbuild-dir=build/dev`)."
    ) from exc

from .network import ACTIVATIONS, Dense, Network

__version__ = _core.build_info()["version"]

__all__ = ["ACTIVATIONS", "Dense", "Network", "__version__"]

"""bprop: feed-forward networks trained by backpropagation, with a C++ core.

    >>> import bprop
    >>> net = bprop.Network([bprop.Dense(64, 128, activation="relu"), bprop.Dense(128, 10)])
"""

from ._loader import load_core

load_core()  # registers the best build of the core as bprop._core
from . import _core  # noqa: E402

from .layers import ACTIVATIONS, Activation, BatchNorm, Dense, Dropout, LayerNorm, Residual
from .network import Network, clip_grad_norm, clip_grad_value
from . import callbacks, losses, optim  # noqa: E402
from .io import CheckpointError, load, save  # noqa: E402
from . import interop  # noqa: E402,F401 - provides Network.to_onnx, from_torch, to_torch
from .train import History, evaluate, fit, gradcheck  # noqa: E402

from ._config import config, get_num_threads, set_num_threads, show_config  # noqa: E402

__version__ = _core.build_info()["version"]

__all__ = ["ACTIVATIONS", "Dense", "Activation", "Dropout", "BatchNorm", "LayerNorm", "Residual",
           "Network", "clip_grad_norm", "clip_grad_value", "__version__",
           "callbacks", "losses", "optim", "fit", "evaluate", "gradcheck", "History",
           "save", "load", "CheckpointError",
           "config", "show_config", "set_num_threads", "get_num_threads"]

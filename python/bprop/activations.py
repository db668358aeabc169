"""The activation registry: one row per activation.

An activation is a C++ function pair (cpp/src/activation.cpp: forward sigma(z) and
backward delta = sigma'(z) * dL/da, with its name in ``kActivations``,
cpp/include/bprop/activation.hpp) plus one row here, which everything else in
Python reads: the layers' argument checks (``ACTIVATIONS``), the initial weights
(``gain2``), the NumPy oracle (``forward``, ``backward``: bprop.reference), the
scikit-learn estimators' names (``sklearn``), PyTorch interop (``torch``,
``torch_slope``) and the ONNX export (bprop.interop reads ``name``). Tests
parametrised over ``ACTIVATIONS`` pick a new row up; a test checks that the rows
and the core's table name the same activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function elementwise (NumPy has none), in float64, cast back."""
    return _erf(np.asarray(x, dtype=np.float64)).astype(np.float64).astype(x.dtype)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-z)), written with exp(-|z|) so that no exp overflows.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _softmax(z: np.ndarray) -> np.ndarray:
    # row-wise; subtracting the row maximum changes nothing but the overflow
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _gelu_backward(z, a, grad_a, slope):
    # d/dz [z Phi(z)] = Phi(z) + z phi(z)
    cdf = 0.5 * (1 + erf(z / math.sqrt(2)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (cdf + z * pdf) * grad_a


def _torch_gelu_slope(module: Any) -> float:
    if module.approximate != "none":
        raise ValueError(f"uses approximate={module.approximate!r}; bprop's gelu is the exact "
                         "erf form, GELU(approximate='none')")
    return 0.01


def _torch_softmax_slope(module: Any) -> float:
    if module.dim not in (-1, 1):
        raise ValueError(f"has dim={module.dim!r}; bprop's softmax runs over the features of "
                         "each sample, Softmax(dim=-1) or Softmax(dim=1)")
    return 0.01


@dataclass(frozen=True)
class ActivationRow:
    """What Python knows of one activation.

    Attributes:
        name: bprop's name (the core's, in kActivations).
        gain2: the He-normal variance gain^2 as a function of negative_slope
            (weights ~ N(0, gain2 / in_features)), or None for Glorot-uniform.
        forward: the NumPy oracle a = sigma(z), ``forward(z, negative_slope)``.
        backward: the NumPy oracle delta = dL/dz, ``backward(z, a, grad_a,
            negative_slope)``.
        sklearn: scikit-learn's name for it, if scikit-learn has it.
        torch: the ``torch.nn`` module class and its constructor from the slope,
            ``torch(nn, negative_slope) -> module``; None for identity (no module).
        torch_type: that class's name, which from_torch recognises.
        torch_slope: reads (and checks) a torch module of that class: its
            negative_slope; raises ValueError (the reason, after the module's
            name) for a configuration bprop does not compute.
    """

    name: str
    gain2: Optional[Callable[[float], float]]
    forward: Callable[[np.ndarray, float], np.ndarray]
    backward: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    sklearn: Optional[str]
    torch: Optional[Callable[[Any, float], Any]]
    torch_type: Optional[str]
    torch_slope: Callable[[Any], float] = lambda module: 0.01


ROWS: Tuple[ActivationRow, ...] = (
    ActivationRow("identity", None,
                  lambda z, s: z.copy(),
                  lambda z, a, g, s: g.copy(),
                  sklearn="identity", torch=None, torch_type=None),
    ActivationRow("sigmoid", None,
                  lambda z, s: _sigmoid(z),
                  lambda z, a, g, s: a * (1 - a) * g,          # sigma' = sigma (1 - sigma)
                  sklearn="logistic", torch=lambda nn, s: nn.Sigmoid(), torch_type="Sigmoid"),
    ActivationRow("tanh", None,
                  lambda z, s: np.tanh(z),
                  lambda z, a, g, s: (1 - a * a) * g,          # tanh' = 1 - tanh^2
                  sklearn="tanh", torch=lambda nn, s: nn.Tanh(), torch_type="Tanh"),
    ActivationRow("relu", lambda s: 2.0,
                  lambda z, s: np.maximum(z, 0),
                  lambda z, a, g, s: np.where(z > 0, g, 0),
                  sklearn="relu", torch=lambda nn, s: nn.ReLU(), torch_type="ReLU"),
    ActivationRow("leaky_relu", lambda s: 2.0 / (1.0 + s * s),
                  lambda z, s: np.where(z > 0, z, s * z),
                  lambda z, a, g, s: np.where(z > 0, g, s * g),
                  sklearn=None, torch=lambda nn, s: nn.LeakyReLU(s), torch_type="LeakyReLU",
                  torch_slope=lambda module: float(module.negative_slope)),
    ActivationRow("gelu", lambda s: 2.0,
                  # exact GELU: z Phi(z), Phi the standard normal CDF
                  lambda z, s: 0.5 * z * (1 + erf(z / math.sqrt(2))),
                  _gelu_backward,
                  sklearn=None, torch=lambda nn, s: nn.GELU(), torch_type="GELU",
                  torch_slope=_torch_gelu_slope),
    ActivationRow("softmax", None,
                  lambda z, s: _softmax(z),
                  # softmax couples a row: its Jacobian-vector product
                  lambda z, a, g, s: a * (g - (g * a).sum(axis=1, keepdims=True)),
                  sklearn=None, torch=lambda nn, s: nn.Softmax(dim=-1), torch_type="Softmax",
                  torch_slope=_torch_softmax_slope),
)

REGISTRY: Dict[str, ActivationRow] = {row.name: row for row in ROWS}

#: bprop's activation names, in the registry's order.
ACTIVATIONS: Tuple[str, ...] = tuple(REGISTRY)

#: scikit-learn's activation names (and bprop's own) -> bprop's.
SKLEARN_NAMES: Dict[str, str] = {**{row.sklearn: row.name for row in ROWS if row.sklearn},
                                 **{row.name: row.name for row in ROWS if row.name != "softmax"}}

#: torch.nn class name -> row, for from_torch.
TORCH_TYPES: Dict[str, ActivationRow] = {row.torch_type: row for row in ROWS if row.torch_type}

"""The activation registry: one row per activation.

An activation is a C++ function pair (cpp/src/activation.cpp: forward sigma(z) and
backward delta = sigma'(z) * dL/da, with its name in ``kActivations``,
cpp/include/bprop/activation.hpp) plus one row here, which everything else in
Python reads: the layers' argument checks (``ACTIVATIONS``), the initial weights
(``gain2``), the NumPy oracle (``forward``, ``backward``: bprop.reference), the
scikit-learn estimators' names (``sklearn``), PyTorch interop (``torch``,
``to_torch``, ``from_torch``) and the ONNX export (``onnx``). Tests
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
    return np.asarray(_erf(np.asarray(x, dtype=np.float64)), dtype=np.float64).astype(x.dtype)


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


# ---- PyTorch: reading a module back --------------------------------------------------

def _plain(module: Any, where: str) -> float:
    """negative_slope for a module with nothing to check or carry."""
    return 0.01


def _gelu_from_torch(module: Any, where: str) -> float:
    if module.approximate != "none":
        raise ValueError(f"{where} uses approximate={module.approximate!r}; bprop's gelu "
                         "is the exact erf form, GELU(approximate='none')")
    return 0.01


def _softmax_from_torch(module: Any, where: str) -> float:
    if module.dim not in (-1, 1):
        raise ValueError(f"{where} has dim={module.dim!r}; bprop's softmax runs over the "
                         "features of each sample, Softmax(dim=-1) or Softmax(dim=1)")
    return 0.01


# ---- ONNX: the nodes of out = sigma(z) --------------------------------------------------
# Each emitter gets the graph being built (bprop.interop's _OnnxGraph: node(op, inputs,
# output, name, **attrs), tensor(name, value) for a constant in the network's dtype,
# .dtype, .opset), the node name prefix p, the input z, the output name and the slope.

GELU_OPSET = 20  # the first opset with a Gelu operator


def _onnx_op(op: str, **attrs) -> Callable[[Any, str, str, str, float], None]:
    """out = op(z), one node named `p`."""
    def emit(g: Any, p: str, z: str, out: str, slope: float) -> None:
        g.node(op, [z], out, p, **attrs)
    return emit


def _onnx_leaky_relu(g: Any, p: str, z: str, out: str, slope: float) -> None:
    if g.dtype == np.float32:
        # LeakyRelu's alpha attribute is a 32-bit float, as the float32 core's slope
        g.node("LeakyRelu", [z], out, p, alpha=slope)
        return
    # float64: a float attribute would round the slope to 32 bits (and onnxruntime has
    # no double LeakyRelu kernel), so spell out the core's select(z > 0, z, slope * z)
    # with the slope as a float64 constant.
    g.node("Greater", [z, g.tensor(f"{p}.zero", 0.0)], f"{p}.positive", f"{p}.greater")
    g.node("Mul", [z, g.tensor(f"{p}.negative_slope", slope)], f"{p}.scaled", f"{p}.scale")
    g.node("Where", [f"{p}.positive", z, f"{p}.scaled"], out, f"{p}.where")


def _onnx_gelu(g: Any, p: str, z: str, out: str, slope: float) -> None:
    if g.opset >= GELU_OPSET:
        g.node("Gelu", [z], out, p, approximate="none")
        return
    # exact GELU z * Phi(z) = 0.5 * z * (1 + erf(z / sqrt(2))), in the core's order:
    # (0.5 * z) * (1 + erf(z * (1/sqrt(2))))
    g.node("Mul", [z, g.tensor(f"{p}.inv_sqrt2", 1.0 / math.sqrt(2.0))], f"{p}.scaled",
           f"{p}.scale")
    g.node("Erf", [f"{p}.scaled"], f"{p}.erf", f"{p}.erf")
    g.node("Add", [f"{p}.erf", g.tensor(f"{p}.one", 1.0)], f"{p}.one_plus_erf",
           f"{p}.add_one")
    g.node("Mul", [g.tensor(f"{p}.half", 0.5), z], f"{p}.half_z", f"{p}.halve")
    g.node("Mul", [f"{p}.half_z", f"{p}.one_plus_erf"], out, f"{p}.product")


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
        torch: the ``torch.nn`` class name (from_torch matches the exact type).
        to_torch: ``(torch.nn, negative_slope) -> module``.
        from_torch: ``(module, where) -> negative_slope``; raises ValueError
            (after ``where``, the module's path) for a configuration bprop does not
            compute.
        onnx: emits the ONNX nodes of out = sigma(z) (see above); None: no node.
    """

    name: str
    gain2: Optional[Callable[[float], float]]
    forward: Callable[[np.ndarray, float], np.ndarray]
    backward: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
    sklearn: Optional[str]
    torch: str
    to_torch: Callable[[Any, float], Any]
    from_torch: Callable[[Any, str], float]
    onnx: Optional[Callable[[Any, str, str, str, float], None]]


ROWS: Tuple[ActivationRow, ...] = (
    ActivationRow("identity", None,
                  lambda z, s: z.copy(),
                  lambda z, a, g, s: g.copy(),
                  sklearn="identity", torch="Identity", to_torch=lambda nn, s: nn.Identity(),
                  from_torch=_plain, onnx=None),
    ActivationRow("sigmoid", None,
                  lambda z, s: _sigmoid(z),
                  lambda z, a, g, s: a * (1 - a) * g,          # sigma' = sigma (1 - sigma)
                  sklearn="logistic", torch="Sigmoid", to_torch=lambda nn, s: nn.Sigmoid(),
                  from_torch=_plain, onnx=_onnx_op("Sigmoid")),
    ActivationRow("tanh", None,
                  lambda z, s: np.tanh(z),
                  lambda z, a, g, s: (1 - a * a) * g,          # tanh' = 1 - tanh^2
                  sklearn="tanh", torch="Tanh", to_torch=lambda nn, s: nn.Tanh(),
                  from_torch=_plain, onnx=_onnx_op("Tanh")),
    ActivationRow("relu", lambda s: 2.0,
                  lambda z, s: np.maximum(z, 0),
                  lambda z, a, g, s: np.where(z > 0, g, 0),
                  sklearn="relu", torch="ReLU", to_torch=lambda nn, s: nn.ReLU(),
                  from_torch=_plain, onnx=_onnx_op("Relu")),
    ActivationRow("leaky_relu", lambda s: 2.0 / (1.0 + s * s),
                  lambda z, s: np.where(z > 0, z, s * z),
                  lambda z, a, g, s: np.where(z > 0, g, s * g),
                  sklearn=None, torch="LeakyReLU", to_torch=lambda nn, s: nn.LeakyReLU(s),
                  from_torch=lambda m, where: float(m.negative_slope), onnx=_onnx_leaky_relu),
    ActivationRow("gelu", lambda s: 2.0,
                  # exact GELU: z Phi(z), Phi the standard normal CDF
                  lambda z, s: 0.5 * z * (1 + erf(z / math.sqrt(2))),
                  _gelu_backward,
                  sklearn=None, torch="GELU", to_torch=lambda nn, s: nn.GELU(),
                  from_torch=_gelu_from_torch, onnx=_onnx_gelu),
    ActivationRow("softmax", None,
                  lambda z, s: _softmax(z),
                  # softmax couples a row: its Jacobian-vector product
                  lambda z, a, g, s: a * (g - (g * a).sum(axis=1, keepdims=True)),
                  # row-wise over the features, as the core does (batch, out_features)
                  sklearn=None, torch="Softmax", to_torch=lambda nn, s: nn.Softmax(dim=-1),
                  from_torch=_softmax_from_torch, onnx=_onnx_op("Softmax", axis=-1)),
)

REGISTRY: Dict[str, ActivationRow] = {row.name: row for row in ROWS}

#: bprop's activation names, in the registry's order.
ACTIVATIONS: Tuple[str, ...] = tuple(REGISTRY)

#: scikit-learn's activation names (and bprop's own) -> bprop's.
SKLEARN_NAMES: Dict[str, str] = {**{row.sklearn: row.name for row in ROWS if row.sklearn},
                                 **{row.name: row.name for row in ROWS if row.name != "softmax"}}

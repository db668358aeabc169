"""The activation registry: one row per activation.

An activation is a C++ function pair (cpp/src/activation.cpp: forward sigma(z) and
backward delta = sigma'(z) * dL/da, with its name in ``kActivations``,
cpp/include/bprop/activation.hpp) plus one row here, which everything else in
Python reads: the layers' argument checks (``ACTIVATIONS``), the initial weights
(``gain2``), the NumPy oracle (``forward``, ``backward``: bprop.reference), the
scikit-learn estimators' names (``sklearn``), PyTorch interop (``torch``,
``to_torch``, ``from_torch``) and the ONNX export (``onnx``). Tests
parametrised over ``ACTIVATIONS`` pick a new row up, taking its PyTorch module
(``to_torch``) and its ONNX nodes (``onnx``) from the row; a test checks that the
rows and the core's table name the same activations.
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


def _sigmoid_pair(z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    # sigma(z) and 1 - sigma(z), each from exp(-|z|) without a subtraction
    e = np.exp(-np.abs(z))
    inv = 1 / (1 + e)
    return np.where(z >= 0, inv, e * inv), np.where(z >= 0, e * inv, inv)


# SELU's constants (Klambauer et al. 2017), as torch.nn.SELU and the core
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
# torch.nn.Softplus's default threshold: softplus(z) = z above it
SOFTPLUS_THRESHOLD = 20.0


def _elu(z):
    # z for z > 0, expm1(z) otherwise; the minimum keeps expm1 of the unused branch
    # from overflowing
    return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))


def _elu_backward(z, a, grad_a, slope):
    # elu'(z) = 1 for z > 0, exp(z) otherwise (from z: a + 1 rounds to 0 first)
    return np.where(z > 0, 1, np.exp(np.minimum(z, 0))) * grad_a


def _selu(z):
    return SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(np.minimum(z, 0)))


def _selu_backward(z, a, grad_a, slope):
    return SELU_SCALE * np.where(z > 0, 1, SELU_ALPHA * np.exp(np.minimum(z, 0))) * grad_a


def _silu_backward(z, a, grad_a, slope):
    # d/dz [z sigma(z)] = sigma(z) (1 + z (1 - sigma(z)))
    s, one_minus_s = _sigmoid_pair(z)
    return s * (1 + z * one_minus_s) * grad_a


def _softplus(z):
    # log1p(exp(z)), z above the threshold (torch.nn.Softplus(beta=1, threshold=20))
    return np.where(z > SOFTPLUS_THRESHOLD, z,
                    np.log1p(np.exp(np.minimum(z, SOFTPLUS_THRESHOLD))))


def _softplus_backward(z, a, grad_a, slope):
    # sigma(z) = exp(z) / (1 + exp(z)) below the threshold, 1 above it
    e = np.exp(np.minimum(z, SOFTPLUS_THRESHOLD))
    return np.where(z > SOFTPLUS_THRESHOLD, 1, e / (e + 1)) * grad_a


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


def _elu_from_torch(module: Any, where: str) -> float:
    if float(module.alpha) != 1.0:
        raise ValueError(f"{where} has alpha={module.alpha!r}; bprop's elu is "
                         "ELU(alpha=1.0)")
    return 0.01


def _softplus_from_torch(module: Any, where: str) -> float:
    if float(module.beta) != 1.0 or float(module.threshold) != SOFTPLUS_THRESHOLD:
        raise ValueError(f"{where} has beta={module.beta!r}, threshold={module.threshold!r}; "
                         "bprop's softplus is Softplus(beta=1.0, threshold=20.0)")
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


def _onnx_expm1_nonpositive(g: Any, p: str, z: str) -> str:
    """expm1(min(z, 0)) for a float64 graph, whose runtimes lack Elu/Selu kernels
    (onnxruntime's CPU provider) and ONNX has no Expm1: exp(x) - 1 = 2t / (1 - t)
    with t = tanh(x / 2), exact to a few ulps for every x <= 0 (no cancellation,
    1 - t in [1, 2), -1 where t = -1). The minimum keeps Tanh away from 1."""
    x = g.node("Min", [z, g.tensor(f"{p}.zero", 0.0)], f"{p}.nonpositive", f"{p}.min")
    g.node("Mul", [x, g.tensor(f"{p}.half", 0.5)], f"{p}.half_z", f"{p}.halve")
    g.node("Tanh", [f"{p}.half_z"], f"{p}.t", f"{p}.tanh")
    g.node("Add", [f"{p}.t", f"{p}.t"], f"{p}.two_t", f"{p}.double")
    g.node("Sub", [g.tensor(f"{p}.one", 1.0), f"{p}.t"], f"{p}.one_minus_t", f"{p}.sub")
    return g.node("Div", [f"{p}.two_t", f"{p}.one_minus_t"], f"{p}.expm1", f"{p}.div")


def _onnx_elu(g: Any, p: str, z: str, out: str, slope: float) -> None:
    if g.dtype == np.float32:
        # onnxruntime's float32 Elu forms exp(z) - 1: for small negative z off the
        # core's expm1 by up to 6e-8 absolute
        g.node("Elu", [z], out, p, alpha=1.0)
        return
    em1 = _onnx_expm1_nonpositive(g, p, z)
    g.node("Greater", [z, f"{p}.zero"], f"{p}.positive", f"{p}.greater")
    g.node("Where", [f"{p}.positive", z, em1], out, f"{p}.where")


def _onnx_selu(g: Any, p: str, z: str, out: str, slope: float) -> None:
    if g.dtype == np.float32:
        g.node("Selu", [z], out, p, alpha=SELU_ALPHA, gamma=SELU_SCALE)
        return
    em1 = _onnx_expm1_nonpositive(g, p, z)
    g.node("Greater", [z, f"{p}.zero"], f"{p}.positive", f"{p}.greater")
    g.node("Mul", [z, g.tensor(f"{p}.scale", SELU_SCALE)], f"{p}.scaled", f"{p}.scale")
    g.node("Mul", [em1, g.tensor(f"{p}.scale_alpha", SELU_SCALE * SELU_ALPHA)],
           f"{p}.negative", f"{p}.scale_negative")
    g.node("Where", [f"{p}.positive", f"{p}.scaled", f"{p}.negative"], out, f"{p}.where")


def _onnx_silu(g: Any, p: str, z: str, out: str, slope: float) -> None:
    g.node("Sigmoid", [z], f"{p}.sigmoid", f"{p}.sigmoid")
    g.node("Mul", [z, f"{p}.sigmoid"], out, f"{p}.mul")


def _onnx_softplus(g: Any, p: str, z: str, out: str, slope: float) -> None:
    # ONNX's Softplus is log(exp(z) + 1) with no threshold: Where(z > 20, z, ...) gives
    # the core's (and torch's) linear branch whatever a runtime does above it
    # (onnxruntime's float32 kernel is within rounding of z there, but a literal
    # log(exp(z) + 1) overflows to inf for z > 88.7 in float32).
    threshold = g.tensor(f"{p}.threshold", SOFTPLUS_THRESHOLD)
    g.node("Greater", [z, threshold], f"{p}.linear", f"{p}.greater")
    if g.dtype == np.float32:
        g.node("Softplus", [z], f"{p}.softplus", p)
    else:
        # float64 (onnxruntime has no double Softplus, ONNX no Log1p): with u = exp(z)
        # and w = 1 + u rounded, log1p(u) = log(w) - ((w - 1) - u) / w to within
        # rounding, the correction exact (w - 1 and u within a factor 2); w = 1 gives
        # u exactly. The minimum keeps exp finite.
        g.node("Min", [z, threshold], f"{p}.clipped", f"{p}.min")
        g.node("Exp", [f"{p}.clipped"], f"{p}.u", f"{p}.exp")
        one = g.tensor(f"{p}.one", 1.0)
        g.node("Add", [f"{p}.u", one], f"{p}.w", f"{p}.add_one")
        g.node("Log", [f"{p}.w"], f"{p}.log_w", f"{p}.log")
        g.node("Sub", [f"{p}.w", one], f"{p}.w_minus_one", f"{p}.sub_one")
        g.node("Sub", [f"{p}.w_minus_one", f"{p}.u"], f"{p}.rounding", f"{p}.rounding")
        g.node("Div", [f"{p}.rounding", f"{p}.w"], f"{p}.correction", f"{p}.div")
        g.node("Sub", [f"{p}.log_w", f"{p}.correction"], f"{p}.softplus", f"{p}.correct")
    g.node("Where", [f"{p}.linear", z, f"{p}.softplus"], out, f"{p}.where")


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
    # elu, silu and softplus follow relu (zero-ish below, the identity above): He,
    # gain^2 = 2, as relu and gelu here.
    ActivationRow("elu", lambda s: 2.0,
                  lambda z, s: _elu(z),
                  _elu_backward,
                  sklearn=None, torch="ELU", to_torch=lambda nn, s: nn.ELU(alpha=1.0),
                  from_torch=_elu_from_torch, onnx=_onnx_elu),
    # selu: LeCun-normal, gain^2 = 1 (weights ~ N(0, 1 / in_features)), the
    # initialisation self-normalisation assumes (Klambauer et al. 2017). Not torch's
    # calculate_gain("selu") = 3/4, which torch's own docs say not to use for a
    # self-normalising network ("use nonlinearity='linear' instead").
    ActivationRow("selu", lambda s: 1.0,
                  lambda z, s: _selu(z),
                  _selu_backward,
                  sklearn=None, torch="SELU", to_torch=lambda nn, s: nn.SELU(),
                  from_torch=_plain, onnx=_onnx_selu),
    ActivationRow("silu", lambda s: 2.0,
                  lambda z, s: z * _sigmoid(z),
                  _silu_backward,
                  sklearn=None, torch="SiLU", to_torch=lambda nn, s: nn.SiLU(),
                  from_torch=_plain, onnx=_onnx_silu),
    ActivationRow("softplus", lambda s: 2.0,
                  lambda z, s: _softplus(z),
                  _softplus_backward,
                  sklearn=None, torch="Softplus",
                  to_torch=lambda nn, s: nn.Softplus(beta=1.0, threshold=SOFTPLUS_THRESHOLD),
                  from_torch=_softplus_from_torch, onnx=_onnx_softplus),
)

REGISTRY: Dict[str, ActivationRow] = {row.name: row for row in ROWS}

#: bprop's activation names, in the registry's order.
ACTIVATIONS: Tuple[str, ...] = tuple(REGISTRY)

#: scikit-learn's activation names (and bprop's own) -> bprop's.
SKLEARN_NAMES: Dict[str, str] = {**{row.sklearn: row.name for row in ROWS if row.sklearn},
                                 **{row.name: row.name for row in ROWS if row.name != "softmax"}}

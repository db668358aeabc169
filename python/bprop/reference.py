"""bprop.reference: backpropagation in plain NumPy, written like the derivation.

The oracle of the tests and the baseline of the benchmarks. It has the surface of
:class:`bprop.Network` and :class:`bprop.Dense` and starts from the same weights
for the same seed (both draw them with ``bprop._init.initial_parameters``).

The method is the lecture's (../shared/seed/):

* forward pass: each layer caches its input ``a`` (dz/dw = a) and its
  pre-activation ``z = a W + b``, and outputs ``sigma(z)``;
* backward pass, from the output layer back: ``delta = dL/dz = sigma'(z) * dL/da``;
  the layer below receives ``dL/da = delta W^T``; the gradients are
  ``dL/dW = a^T delta`` and ``dL/db`` = the column sums of ``delta``.

It computes in the network's dtype, one matrix product per layer and pass, so
float32 results round like the C++ core's do (the sums run in another order, so
the two agree to a tolerance, not bit for bit). GELU's erf is evaluated in
float64 with :func:`math.erf`, element by element: correct, not fast.

Conversion rule, as in bprop: ``forward`` and ``backward`` take arrays of the
network's dtype and never convert (any memory layout is fine here); ``predict``
converts its input.

The losses at the bottom, ``loss(output, target, sample_weight=None) ->
(value, grad_output)``, are the reference of the fused C++ kernels.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from ._init import initial_parameters
from ._validation import as_float_matrix, check_dtype, check_float, check_int, type_name

__all__ = ["ACTIVATIONS", "Dense", "Network", "activation_forward", "activation_backward",
           "softmax_cross_entropy", "binary_cross_entropy_with_logits", "mean_squared_error"]

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu", "softmax")

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


def activation_forward(activation: str, z: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    """a = sigma(z) for z of shape (batch, features); softmax is row-wise."""
    if activation == "identity":
        return z.copy()
    if activation == "sigmoid":
        return _sigmoid(z)
    if activation == "tanh":
        return np.tanh(z)
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, negative_slope * z)
    if activation == "gelu":
        # exact GELU: z Phi(z), Phi the standard normal CDF
        return 0.5 * z * (1 + erf(z / math.sqrt(2)))
    if activation == "softmax":
        return _softmax(z)
    raise ValueError(f"[reference] activation must be one of {ACTIVATIONS}, but got "
                     f"{activation!r}")


def activation_backward(activation: str, z: np.ndarray, a: np.ndarray, grad_a: np.ndarray,
                        negative_slope: float = 0.01) -> np.ndarray:
    """delta = dL/dz from grad_a = dL/da, given the cached z and a = sigma(z).

    Elementwise activations: delta = sigma'(z) * dL/da. Softmax couples a row, so
    delta is its Jacobian-vector product a * (dL/da - sum_j dL/da_j a_j).
    """
    if activation == "identity":
        return grad_a.copy()
    if activation == "sigmoid":
        return a * (1 - a) * grad_a            # sigma' = sigma (1 - sigma)
    if activation == "tanh":
        return (1 - a * a) * grad_a            # tanh' = 1 - tanh^2
    if activation == "relu":
        return np.where(z > 0, grad_a, 0)
    if activation == "leaky_relu":
        return np.where(z > 0, grad_a, negative_slope * grad_a)
    if activation == "gelu":
        # d/dz [z Phi(z)] = Phi(z) + z phi(z)
        cdf = 0.5 * (1 + erf(z / math.sqrt(2)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return (cdf + z * pdf) * grad_a
    if activation == "softmax":
        return a * (grad_a - (grad_a * a).sum(axis=1, keepdims=True))
    raise ValueError(f"[reference] activation must be one of {ACTIVATIONS}, but got "
                     f"{activation!r}")


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view (the caller's array keeps its own flags)."""
    v = a.view()
    v.flags.writeable = False
    return v


class Dense:
    """A dense layer: z = a W + b, output = activation(z).

    Args:
        in_features: width of the layer's input a.
        out_features: width of its output.
        activation: one of ``ACTIVATIONS``.
        negative_slope: slope of leaky_relu for z < 0.

    Once in a :class:`Network`: ``weight`` (in_features, out_features), ``bias``
    (out_features,), ``grad_weight``, ``grad_bias`` (same shapes); the caches of
    the last forward ``input`` (batch, in_features), ``z``, ``output`` (batch,
    out_features) and ``delta`` = dL/dz of the last backward, read-only, ``None``
    until computed.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "identity",
                 *, negative_slope: float = 0.01) -> None:
        self.in_features = check_int("reference.Dense", "in_features", in_features, minimum=1)
        self.out_features = check_int("reference.Dense", "out_features", out_features,
                                      minimum=1)
        if not isinstance(activation, str):
            raise TypeError(f"[reference.Dense] activation must be a str, one of {ACTIVATIONS}, "
                            f"but got {type_name(activation)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"[reference.Dense] activation must be one of {ACTIVATIONS}, "
                             f"but got {activation!r}")
        self.activation = activation
        self.negative_slope = check_float("reference.Dense", "negative_slope", negative_slope)
        self._weight: Optional[np.ndarray] = None
        self._bias: Optional[np.ndarray] = None
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self.input: Optional[np.ndarray] = None
        self.z: Optional[np.ndarray] = None
        self.output: Optional[np.ndarray] = None
        self.delta: Optional[np.ndarray] = None
        self._in_network = False

    def _spec(self) -> Tuple[int, int, str, float]:
        return (self.in_features, self.out_features, self.activation, self.negative_slope)

    def __repr__(self) -> str:
        extra = (f", negative_slope={self.negative_slope}"
                 if self.activation == "leaky_relu" else "")
        return (f"reference.Dense({self.in_features}, {self.out_features}, "
                f"activation={self.activation!r}{extra})")

    # Assigning a parameter copies into the existing array (as bprop does), so
    # arrays taken from parameters() stay the live ones.
    @property
    def weight(self) -> Optional[np.ndarray]:
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        self._assign("weight", self._weight, value)

    @property
    def bias(self) -> Optional[np.ndarray]:
        return self._bias

    @bias.setter
    def bias(self, value) -> None:
        self._assign("bias", self._bias, value)

    @staticmethod
    def _assign(name: str, target: Optional[np.ndarray], value) -> None:
        if target is None:
            raise RuntimeError(f"[reference.Dense.{name}] this layer is not part of a "
                               "Network yet")
        arr = np.asarray(value)
        if arr.dtype.kind not in "iuf" or arr.shape != target.shape:
            raise ValueError(f"[reference.Dense.{name}] must be real numbers of shape "
                             f"{target.shape}, but got dtype {arr.dtype}, shape {arr.shape}")
        with np.errstate(over="ignore"):
            arr = arr.astype(target.dtype)  # checked as stored: 1e39 is inf in float32
        if not np.isfinite(arr).all():
            raise ValueError(f"[reference.Dense.{name}] must be finite as {target.dtype}")
        target[...] = arr


class Network:
    """An ordered stack of :class:`Dense` layers, trained by backpropagation.

    Args:
        layers: reference Dense layers whose widths chain; each belongs to one network.
        dtype: "float32" (default) or "float64".
        seed: seed of the initial weights; the same seed gives the same bits as
            ``bprop.Network`` with the same architecture.
    """

    def __init__(self, layers: Sequence[Dense], dtype="float32",
                 seed: Optional[int] = None) -> None:
        if not isinstance(layers, (list, tuple)):
            raise TypeError("[reference.Network] layers must be a list of reference.Dense, "
                            f"but got {type_name(layers)}")
        if len(layers) == 0:
            raise ValueError("[reference.Network] layers must hold at least one Dense layer, "
                             "but got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise TypeError(f"[reference.Network] layers[{i}] must be a reference.Dense, "
                                f"but got {type_name(layer)}")
            if layer._in_network:
                raise ValueError(f"[reference.Network] layers[{i}] already belongs to a "
                                 "Network")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("[reference.Network] the same Dense object appears twice")
        for i in range(1, len(layers)):
            if layers[i - 1].out_features != layers[i].in_features:
                raise ValueError(f"[reference.Network] layer {i} expects "
                                 f"{layers[i].in_features} input features, but layer {i - 1} "
                                 f"produces {layers[i - 1].out_features}")
        self._dtype = check_dtype("reference.Network", dtype)
        if seed is not None:
            seed = check_int("reference.Network", "seed", seed, minimum=0)
        specs = [layer._spec() for layer in layers]
        for layer, (W, b) in zip(layers, initial_parameters(specs, self._dtype, seed)):
            layer._weight, layer._bias = W.astype(self._dtype, copy=False), b
            layer.grad_weight = np.zeros_like(layer._weight)
            layer.grad_bias = np.zeros_like(b)
            layer._in_network = True
        self._layers = tuple(layers)
        self._has_forward = False
        self._has_backward = False

    # ---- the three calls of training ------------------------------------------
    def _check(self, where: str, name: str, arr, features: int, rows: Optional[int]) -> None:
        if not isinstance(arr, np.ndarray) or arr.dtype != self._dtype:
            got = arr.dtype if isinstance(arr, np.ndarray) else type_name(arr)
            raise TypeError(f"[reference.Network.{where}] {name} must be a numpy.ndarray of "
                            f"dtype {self._dtype}, but got {got}")
        if arr.ndim != 2 or arr.shape[1] != features or arr.shape[0] == 0 or (
                rows is not None and arr.shape[0] != rows):
            expected = f"({'batch' if rows is None else rows}, {features})"
            raise ValueError(f"[reference.Network.{where}] {name} must have shape {expected}, "
                             f"but has shape {arr.shape}")

    def forward(self, X: np.ndarray) -> np.ndarray:
        """Forward pass, caching each layer's input a, pre-activation z and output.

        Args:
            X: (batch, in_features) of the network's dtype; cached by reference.

        Returns:
            (batch, out_features), a new array.
        """
        self._check("forward", "X", X, self.in_features, None)
        a = X
        for layer in self._layers:
            z = a @ layer.weight + layer.bias                   # z = a W + b
            out = activation_forward(layer.activation, z, layer.negative_slope)
            layer.input, layer.z, layer.output = _readonly(a), _readonly(z), _readonly(out)
            layer.delta = None
            a = out
        self._has_forward = True
        return a.copy()

    def backward(self, grad_output: np.ndarray, *, accumulate: bool = False,
                 input_grad: bool = False) -> Optional[np.ndarray]:
        """Backward sweep from grad_output = dL/d(output) (batch, out_features).

        Stores dL/dW and dL/db in each layer (added to the old ones if
        ``accumulate``). Returns dL/dX (batch, in_features) if ``input_grad``.
        """
        if not self._has_forward:
            raise RuntimeError("[reference.Network.backward] called before forward")
        batch = self._layers[0].input.shape[0]
        self._check("backward", "grad_output", grad_output, self.out_features, batch)
        grad_a = grad_output                                    # dL/da of the output layer
        for i in range(len(self._layers) - 1, -1, -1):
            layer = self._layers[i]
            delta = activation_backward(layer.activation, layer.z, layer.output, grad_a,
                                        layer.negative_slope)  # delta = sigma'(z) * dL/da
            grad_W = layer.input.T @ delta                      # dL/dW = a^T delta
            grad_b = delta.sum(axis=0)                          # dL/db = column sums of delta
            if accumulate:
                layer.grad_weight += grad_W
                layer.grad_bias += grad_b
            else:
                layer.grad_weight[...] = grad_W
                layer.grad_bias[...] = grad_b
            layer.delta = _readonly(delta)
            if i > 0 or input_grad:  # the first layer's dL/dX only when asked for
                grad_a = delta @ layer.weight.T             # dL/da of the layer below
        self._has_backward = True
        return grad_a if input_grad else None

    def step(self, lr: float) -> None:
        """Plain SGD: W -= lr dL/dW, b -= lr dL/db."""
        lr = check_float("reference.Network.step", "lr", lr, minimum=0.0)
        if not self._has_backward:
            raise RuntimeError("[reference.Network.step] called before backward")
        with np.errstate(over="ignore"):
            lr = self._dtype.type(lr)
        if not np.isfinite(lr):
            raise ValueError(f"[reference.Network.step] lr must be finite as {self._dtype}, "
                             f"but overflows")
        for layer in self._layers:
            layer.weight[...] -= lr * layer.grad_weight
            layer.bias[...] -= lr * layer.grad_bias

    def predict(self, X, batch_size: Optional[int] = None) -> np.ndarray:
        """Forward pass that leaves the caches alone; converts X like bprop does.

        Returns:
            (samples, out_features), a new array.
        """
        X = as_float_matrix("reference.Network.predict", "X", X, self._dtype,
                            features=self.in_features)
        size = len(X) if batch_size is None else check_int(
            "reference.Network.predict", "batch_size", batch_size, minimum=1)
        chunks = []
        for start in range(0, len(X), size):
            a = X[start:start + size]
            for layer in self._layers:
                a = activation_forward(layer.activation, a @ layer.weight + layer.bias,
                                       layer.negative_slope)
            chunks.append(a)
        return np.concatenate(chunks)

    # ---- description ----------------------------------------------------------
    @property
    def layers(self) -> Tuple[Dense, ...]:
        return self._layers

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_parameters(self) -> int:
        return sum(L.in_features * L.out_features + L.out_features for L in self._layers)

    @property
    def in_features(self) -> int:
        return self._layers[0].in_features

    @property
    def out_features(self) -> int:
        return self._layers[-1].out_features

    def parameters(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """(name, parameter, gradient) in bprop.Network.parameters()'s order."""
        for i, layer in enumerate(self._layers):
            yield f"layers.{i}.weight", layer.weight, layer.grad_weight
            yield f"layers.{i}.bias", layer.bias, layer.grad_bias

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> Dense:
        return self._layers[i]

    def __iter__(self) -> Iterator[Dense]:
        return iter(self._layers)

    def __repr__(self) -> str:
        lines = [f"reference.Network(dtype={self._dtype.name}, parameters="
                 + f"{self.num_parameters:,})"]
        lines += [f"  ({i}): {layer!r}" for i, layer in enumerate(self._layers)]
        return "\n".join(lines)


# ---- losses: mean reduction; return (loss, dL/d(output)) -------------------------
#
# Computed in float64 and the gradient cast back to the output's dtype.

def _loss_inputs(where: str, output, target, sample_weight):
    if not isinstance(output, np.ndarray) or output.dtype.kind != "f" or output.ndim != 2:
        raise ValueError(f"[reference.{where}] output must be a 2-D floating array, but got "
                         f"{getattr(output, 'dtype', type_name(output))} "
                         f"{getattr(output, 'shape', '')}")
    batch = output.shape[0]
    if sample_weight is None:
        return batch, float(batch), np.ones(batch)
    w = np.asarray(sample_weight)
    if w.dtype.kind not in "iuf" or w.shape != (batch,) or not np.isfinite(w).all():
        raise ValueError(f"[reference.{where}] sample_weight must be {batch} finite real "
                         f"numbers, but got dtype {w.dtype}, shape {w.shape}")
    w = w.astype(np.float64)
    if not w.sum() > 0:
        raise ValueError(f"[reference.{where}] sample_weight must have a positive sum, but "
                         f"sums to {w.sum()}")
    return batch, float(w.sum()), w


def _same_shape_target(where: str, output: np.ndarray, target) -> np.ndarray:
    y = np.asarray(target)
    if y.dtype.kind not in "iuf" or y.shape != output.shape:
        raise ValueError(f"[reference.{where}] target must be real numbers of shape "
                         f"{output.shape}, but got dtype {y.dtype}, shape {y.shape}")
    return y.astype(np.float64)


def softmax_cross_entropy(output: np.ndarray, target, sample_weight=None
                          ) -> Tuple[float, np.ndarray]:
    """Cross-entropy of softmax(output) against the target, averaged over the batch.

    Args:
        output: logits (batch, classes).
        target: integer labels (batch,) in [0, classes), or probability rows
            (batch, classes).
        sample_weight: optional (batch,); the mean is then sum(w_i l_i) / sum(w).

    Returns:
        (loss, grad) with grad = w_i (softmax(z_i) - y_i) / sum(w), (batch, classes).
    """
    batch, wsum, w = _loss_inputs("softmax_cross_entropy", output, target, sample_weight)
    classes = output.shape[1]
    z = output.astype(np.float64)
    labels = np.asarray(target)
    if labels.ndim == 1:
        if labels.dtype.kind not in "iu" or labels.shape != (batch,):
            raise ValueError(f"[reference.softmax_cross_entropy] target labels must be "
                             f"{batch} integers, but got dtype {labels.dtype}, "
                             f"shape {labels.shape}")
        if batch and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"[reference.softmax_cross_entropy] target labels must lie in "
                             f"[0, {classes}), but range over [{labels.min()}, {labels.max()}]")
        y = np.zeros_like(z)
        y[np.arange(batch), labels] = 1.0
    else:
        y = _same_shape_target("softmax_cross_entropy", output, target)
    m = z.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))   # log-sum-exp per row
    per_sample = (y * (lse - z)).sum(axis=1)                      # -sum_j y_j log softmax_j
    grad = (w / wsum)[:, None] * (np.exp(z - lse) - y)
    return float((w * per_sample).sum() / wsum), grad.astype(output.dtype)


def binary_cross_entropy_with_logits(output: np.ndarray, target, sample_weight=None
                                     ) -> Tuple[float, np.ndarray]:
    """Binary cross-entropy of sigmoid(output) against target in [0, 1], elementwise
    over (batch, k), averaged over all elements (weighted rows: over sum(w) * k).

    Returns:
        (loss, grad) with grad = w_i (sigmoid(x) - y) / (sum(w) k).
    """
    _, wsum, w = _loss_inputs("binary_cross_entropy_with_logits", output, target,
                              sample_weight)
    x = output.astype(np.float64)
    y = _same_shape_target("binary_cross_entropy_with_logits", output, target)
    denom = wsum * output.shape[1]
    # log(1 + exp(-x)) and friends, rewritten so that no exp overflows
    elementwise = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    grad = (w / denom)[:, None] * (_sigmoid(x) - y)
    return float((w[:, None] * elementwise).sum() / denom), grad.astype(output.dtype)


def mean_squared_error(output: np.ndarray, target, sample_weight=None
                       ) -> Tuple[float, np.ndarray]:
    """Mean over all elements of (output - target)^2 (weighted rows: over sum(w) * k).

    Returns:
        (loss, grad) with grad = 2 w_i (output - target) / (sum(w) k).
    """
    _, wsum, w = _loss_inputs("mean_squared_error", output, target, sample_weight)
    r = output.astype(np.float64) - _same_shape_target("mean_squared_error", output, target)
    denom = wsum * output.shape[1]
    grad = (2 * w / denom)[:, None] * r
    return float((w[:, None] * r * r).sum() / denom), grad.astype(output.dtype)

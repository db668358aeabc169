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

A network is an ordered sequence of layers (:class:`Layer` is the protocol): each
layer's ``forward(a, training)`` caches what its ``backward`` needs, and the
backward pass is one sweep from the last layer to the first, each layer turning
dL/d(its output) into dL/d(its input) and its parameters' gradients. Besides
:class:`Dense`: :class:`Activation`, :class:`Dropout` (masks from the
counter-based generator :func:`dropout_mask`, which the C++ core implements bit
for bit), :class:`BatchNorm`, :class:`LayerNorm` and :class:`Residual`, with
PyTorch's semantics and its training and eval modes (``net.train()``,
``net.eval()``).

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
from .activations import ACTIVATIONS, REGISTRY, _sigmoid
from ._validation import as_float_matrix, check_dtype, check_float, check_int, type_name

__all__ = ["ACTIVATIONS", "Layer", "Dense", "Activation", "Dropout", "BatchNorm", "LayerNorm",
           "Residual", "Network", "activation_forward", "activation_backward", "splitmix64",
           "dropout_key", "dropout_mask", "softmax_cross_entropy",
           "binary_cross_entropy_with_logits", "mean_squared_error", "huber",
           "mean_absolute_error", "poisson_nll"]

def activation_forward(activation: str, z: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    """a = sigma(z) for z of shape (batch, features); softmax is row-wise. The
    formulas are the activation registry's rows (bprop/activations.py)."""
    return _row(activation).forward(z, negative_slope)


def activation_backward(activation: str, z: np.ndarray, a: np.ndarray, grad_a: np.ndarray,
                        negative_slope: float = 0.01) -> np.ndarray:
    """delta = dL/dz from grad_a = dL/da, given the cached z and a = sigma(z).

    Elementwise activations: delta = sigma'(z) * dL/da. Softmax couples a row, so
    delta is its Jacobian-vector product a * (dL/da - sum_j dL/da_j a_j).
    """
    return _row(activation).backward(z, a, grad_a, negative_slope)


def _row(activation: str):
    if activation not in REGISTRY:
        raise ValueError(f"[reference] activation must be one of {ACTIVATIONS}, but got "
                         f"{activation!r}")
    return REGISTRY[activation]


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view (the caller's array keeps its own flags)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _check_activation(where: str, activation: object) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"[{where}] activation must be a str, one of {ACTIVATIONS}, "
                        f"but got {type_name(activation)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"[{where}] activation must be one of {ACTIVATIONS}, "
                         f"but got {activation!r}")
    return activation


def _check_bool(where: str, name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"[{where}] {name} must be a bool, but got {type_name(value)} {value!r}")
    return bool(value)


def _assign(where: str, target: Optional[np.ndarray], value) -> None:
    """Copies value into the live array target (as bprop does), so that arrays
    taken from parameters() or buffers() stay the live ones."""
    if target is None:
        raise RuntimeError(f"[{where}] this layer is not part of a Network yet")
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.shape != target.shape:
        raise ValueError(f"[{where}] must be real numbers of shape "
                         f"{target.shape}, but got dtype {arr.dtype}, shape {arr.shape}")
    with np.errstate(over="ignore"):
        arr = arr.astype(target.dtype)  # checked as stored: 1e39 is inf in float32
    if not np.isfinite(arr).all():
        raise ValueError(f"[{where}] must be finite as {target.dtype}")
    target[...] = arr


def _stored(name: str, doc: str) -> property:
    """A parameter or buffer attribute: reading gives the live array (``None`` until
    the layer is in a Network, or when the layer has no such array); assigning
    copies into it."""
    attr = "_" + name

    def get(self):
        return getattr(self, attr)

    def put(self, value) -> None:
        _assign(f"reference.{type(self).__name__}.{name}", getattr(self, attr), value)

    return property(get, put, doc=doc)


def _store_gradient(grad: np.ndarray, value: np.ndarray, accumulate: bool) -> None:
    """grad = value, or grad += value when accumulating over calls."""
    if accumulate:
        grad += value
    else:
        grad[...] = value


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


# ---- dropout's counter-based generator ------------------------------------------
#
# A mask bit is a pure function of (seed, step, dropout_index, element index), so a
# seeded run is reproducible bit for bit whatever the order in which the elements
# are drawn (threads included). The C++ core implements the same three functions.

SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, SplitMix64's increment


def splitmix64(x) -> np.ndarray:
    """SplitMix64's output function applied to ``x + GAMMA``, elementwise, mod 2^64.

    ``splitmix64(s + k * GAMMA)`` is the (k+1)-th output of the standard SplitMix64
    generator seeded with s (Steele, Lea and Flood 2014; Vigna's splitmix64.c)::

        z = (x + 0x9E3779B97F4A7C15) mod 2^64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9  mod 2^64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB  mod 2^64
        return z ^ (z >> 31)

    so ``splitmix64(0) == 0xE220A8397B1DCDAF``.

    Args:
        x: integers in [0, 2^64), any shape (a Python int or an array).

    Returns:
        uint64 array of x's shape (0-d for a scalar).
    """
    # uint64 arrays wrap silently mod 2^64; NumPy scalar arithmetic would warn on
    # overflow, hence at least one dimension while computing.
    z = np.array(x, dtype=np.uint64, ndmin=1) + np.uint64(SPLITMIX64_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z.reshape(np.shape(x))


def dropout_key(seed: int, step: int, dropout_index: int) -> int:
    """The key of one Dropout layer's mask in one training-mode forward pass:
    ``splitmix64(splitmix64(splitmix64(seed) ^ step) ^ dropout_index)``.

    Args:
        seed: the network's ``dropout_seed``, in [0, 2^64).
        step: the network's ``dropout_step``: training-mode forward passes before
            this one.
        dropout_index: the layer's position among the network's Dropout layers in
            depth-first order (0, 1, ...).
    """
    key = splitmix64(seed)
    key = splitmix64(key ^ np.uint64(step))
    key = splitmix64(key ^ np.uint64(dropout_index))
    return int(key)


def dropout_mask(key: int, shape: Tuple[int, ...], p: float) -> np.ndarray:
    """Which elements a Dropout layer keeps: element e (its row-major index in the
    layer's (batch, features) input, e = row * features + col) is kept iff
    ``u_e >= p``, where ``bits_e = splitmix64((key + e) mod 2^64)`` and
    ``u_e = (bits_e >> 11) * 2^-53``, a float64 in [0, 1) formed exactly
    (53 random bits), compared with p in float64.

    Returns:
        bool array of ``shape``; P(kept) = 1 - p up to 2^-53.
    """
    e = np.arange(math.prod(shape), dtype=np.uint64)
    bits = splitmix64(np.uint64(key) + e)                      # key + e wraps mod 2^64
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # exact
    return (u >= p).reshape(shape)


class _DropoutClock:
    """The network's dropout seed and step, shared with its Dropout layers (which
    hold this object rather than the network: no reference cycle)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.step = 0


# ---- the layers ---------------------------------------------------------------------

LAYERS = "Dense, Activation, Dropout, BatchNorm, LayerNorm, Residual"


class Layer:
    """The layer protocol. A layer

    * ``forward(a, training)``: maps its input a (batch, in_features) to its output
      (batch, out_features), a new array, caching what its backward needs;
      ``training`` selects the training-mode function (Dropout, BatchNorm);
    * ``backward(grad_output, accumulate=False, input_grad=True)``: from
      dL/d(output) of the last forward, stores the gradients of its parameters
      (added to the stored ones if ``accumulate``) and returns dL/d(input)
      (``None`` if not ``input_grad``: the network's first layer, when nobody asks
      for dL/dX);
    * ``predict(a)``: the eval-mode output, caching nothing, changing nothing;
    * ``parameters()``: ``(name, value, gradient)`` triples (weight, then bias);
      ``buffers()``: ``(name, array)`` pairs of state that is not trained.

    Parameters and buffers exist once the layer is in a :class:`Network`, which
    allocates them in its dtype; a layer object belongs to one network.
    """

    #: True for layers whose width is that of their neighbours (Activation, Dropout).
    _width_agnostic = False

    def __init__(self) -> None:
        self._in_network = False

    def forward(self, a: np.ndarray, training: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad_output: np.ndarray, accumulate: bool = False,
                 input_grad: bool = True) -> Optional[np.ndarray]:
        raise NotImplementedError

    def predict(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _parameter_names(self) -> Tuple[str, ...]:
        return ()

    def _buffer_names(self) -> Tuple[str, ...]:
        return ()

    def parameters(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """(name, live value, live gradient) of each parameter, weight before bias."""
        for name in self._parameter_names():
            yield name, getattr(self, name), getattr(self, "grad_" + name)

    def buffers(self) -> Iterator[Tuple[str, np.ndarray]]:
        """(name, live array) of each buffer."""
        for name in self._buffer_names():
            yield name, getattr(self, name)

    def _build(self, width: int, dtype: np.dtype, build: "_Build") -> int:
        """Allocates the layer's arrays for an input of `width` features (already
        checked); returns its output width."""
        raise NotImplementedError


class Dense(Layer):
    """A dense layer: z = a W + b, output = activation(z).

    Args:
        in_features: width of the layer's input a.
        out_features: width of its output.
        activation: one of ``ACTIVATIONS``.
        negative_slope: slope of leaky_relu for z < 0.
        bias: False for z = a W (a Dense followed by BatchNorm); then ``bias`` and
            ``grad_bias`` are ``None``.

    Once in a :class:`Network`: ``weight`` (in_features, out_features), ``bias``
    (out_features,), ``grad_weight``, ``grad_bias`` (same shapes); the caches of
    the last forward ``input`` (batch, in_features), ``z``, ``output`` (batch,
    out_features) and ``delta`` = dL/dz of the last backward, read-only, ``None``
    until computed.
    """

    weight = _stored("weight", "W (in_features, out_features); assigning copies into it.")
    bias = _stored("bias", "b (out_features,), None without bias; assigning copies into it.")

    def __init__(self, in_features: int, out_features: int, activation: str = "identity",
                 *, negative_slope: float = 0.01, bias: bool = True) -> None:
        super().__init__()
        self.in_features = check_int("reference.Dense", "in_features", in_features, minimum=1)
        self.out_features = check_int("reference.Dense", "out_features", out_features,
                                      minimum=1)
        self.activation = _check_activation("reference.Dense", activation)
        self.negative_slope = check_float("reference.Dense", "negative_slope", negative_slope)
        self._has_bias = _check_bool("reference.Dense", "bias", bias)
        self._weight: Optional[np.ndarray] = None
        self._bias: Optional[np.ndarray] = None
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self.input: Optional[np.ndarray] = None
        self.z: Optional[np.ndarray] = None
        self.output: Optional[np.ndarray] = None
        self.delta: Optional[np.ndarray] = None

    def _spec(self) -> Tuple[int, int, str, float]:
        return (self.in_features, self.out_features, self.activation, self.negative_slope)

    def __repr__(self) -> str:
        extra = (f", negative_slope={self.negative_slope}"
                 if self.activation == "leaky_relu" else "")
        extra += "" if self._has_bias else ", bias=False"
        return (f"reference.Dense({self.in_features}, {self.out_features}, "
                f"activation={self.activation!r}{extra})")

    def _parameter_names(self) -> Tuple[str, ...]:
        return ("weight", "bias") if self._has_bias else ("weight",)

    def _build(self, width: int, dtype: np.dtype, build: "_Build") -> int:
        W, b = next(build.initial_parameters)  # drawn even without bias: same W either way
        self._weight = W.astype(dtype, copy=False)
        self.grad_weight = np.zeros_like(self._weight)
        if self._has_bias:
            self._bias = b
            self.grad_bias = np.zeros_like(b)
        return self.out_features

    def _z(self, a: np.ndarray) -> np.ndarray:
        return a @ self.weight + self.bias if self._has_bias else a @ self.weight  # z = a W + b

    def forward(self, a: np.ndarray, training: bool) -> np.ndarray:
        z = self._z(a)
        out = activation_forward(self.activation, z, self.negative_slope)
        self.input, self.z, self.output = _readonly(a), _readonly(z), _readonly(out)
        self.delta = None
        return out

    def backward(self, grad_output: np.ndarray, accumulate: bool = False,
                 input_grad: bool = True) -> Optional[np.ndarray]:
        delta = activation_backward(self.activation, self.z, self.output, grad_output,
                                    self.negative_slope)       # delta = sigma'(z) * dL/da
        _store_gradient(self.grad_weight, self.input.T @ delta, accumulate)  # dL/dW = a^T delta
        if self._has_bias:
            _store_gradient(self.grad_bias, delta.sum(axis=0), accumulate)   # column sums
        self.delta = _readonly(delta)
        return delta @ self.weight.T if input_grad else None   # dL/da of the layer below

    def predict(self, a: np.ndarray) -> np.ndarray:
        return activation_forward(self.activation, self._z(a), self.negative_slope)


class Activation(Layer):
    """An activation as a layer of its own: output = sigma(input), elementwise
    (softmax: row-wise). Its width is that of its neighbours.

    Args:
        name: one of ``ACTIVATIONS``.
        negative_slope: slope of leaky_relu for negative inputs.

    Caches ``input`` (the z of the derivation) and ``output`` (batch, features).
    """

    _width_agnostic = True

    def __init__(self, name: str, *, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.name = _check_activation("reference.Activation", name)
        self.negative_slope = check_float("reference.Activation", "negative_slope",
                                          negative_slope)
        self.in_features: Optional[int] = None
        self.out_features: Optional[int] = None
        self.input: Optional[np.ndarray] = None
        self.output: Optional[np.ndarray] = None

    def __repr__(self) -> str:
        extra = f", negative_slope={self.negative_slope}" if self.name == "leaky_relu" else ""
        return f"reference.Activation({self.name!r}{extra})"

    def _build(self, width: int, dtype: np.dtype, build: "_Build") -> int:
        self.in_features = self.out_features = width
        return width

    def forward(self, a: np.ndarray, training: bool) -> np.ndarray:
        out = activation_forward(self.name, a, self.negative_slope)
        self.input, self.output = _readonly(a), _readonly(out)
        return out

    def backward(self, grad_output: np.ndarray, accumulate: bool = False,
                 input_grad: bool = True) -> Optional[np.ndarray]:
        if not input_grad:
            return None
        return activation_backward(self.name, self.input, self.output, grad_output,
                                   self.negative_slope)    # sigma'(z) * dL/da

    def predict(self, a: np.ndarray) -> np.ndarray:
        return activation_forward(self.name, a, self.negative_slope)


class Dropout(Layer):
    """Inverted dropout: in training mode each element is kept with probability
    1 - p and scaled by 1 / (1 - p), else zeroed; in eval mode the identity. Its
    width is that of its neighbours.

    The mask is :func:`dropout_mask` of :func:`dropout_key` (network's
    ``dropout_seed``, network's ``dropout_step``, this layer's ``dropout_index``):
    the same seed, step and index give the same mask. In the network's dtype,
    ``scale = dtype(1 / (1 - p))`` (divided in float64, rounded once),
    ``output = where(keep, input * scale, 0)`` and
    ``dL/d(input) = where(keep, dL/d(output) * scale, 0)``.

    Args:
        p: probability of zeroing an element, in [0, 1).

    Caches ``mask`` (batch, features) of the last forward, bool, read-only
    (``None`` after an eval-mode forward).
    """

    _width_agnostic = True

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        p = check_float("reference.Dropout", "p", p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"[reference.Dropout] p must be in [0, 1), but got {p}")
        self.p = p
        self.dropout_index: Optional[int] = None
        self.in_features: Optional[int] = None
        self.out_features: Optional[int] = None
        self.mask: Optional[np.ndarray] = None
        self._scale = None
        self._clock: Optional[_DropoutClock] = None

    def __repr__(self) -> str:
        return f"reference.Dropout(p={self.p})"

    def _build(self, width: int, dtype: np.dtype, build: "_Build") -> int:
        self.in_features = self.out_features = width
        self._scale = dtype.type(1.0 / (1.0 - self.p))
        self._clock = build.dropout_clock
        self.dropout_index = build.dropouts
        build.dropouts += 1
        return width

    def forward(self, a: np.ndarray, training: bool) -> np.ndarray:
        if not training:
            self.mask = None
            return a.copy()
        if self._clock is None:
            raise RuntimeError("[reference.Dropout.forward] this layer is not part of a "
                               "Network yet (the network holds the dropout seed and step)")
        key = dropout_key(self._clock.seed, self._clock.step, self.dropout_index)
        mask = dropout_mask(key, a.shape, self.p)
        self.mask = _readonly(mask)
        return np.where(mask, a * self._scale, a.dtype.type(0))

    def backward(self, grad_output: np.ndarray, accumulate: bool = False,
                 input_grad: bool = True) -> Optional[np.ndarray]:
        if not input_grad:
            return None
        if self.mask is None:  # the last forward ran in eval mode
            return grad_output.copy()
        return np.where(self.mask, grad_output * self._scale, grad_output.dtype.type(0))

    def predict(self, a: np.ndarray) -> np.ndarray:
        return a.copy()


class _Norm(Layer):
    """What BatchNorm and LayerNorm share: xhat = (a - mean) * invstd with
    invstd = 1 / sqrt(var + eps), output = xhat * weight + bias."""

    weight = _stored("weight", "gamma (features,), None without affine; assigning copies.")
    bias = _stored("bias", "beta (features,), None without affine; assigning copies.")

    def __init__(self, where: str, features: int, eps: float, affine: bool,
                 affine_name: str) -> None:
        super().__init__()
        self.features = check_int(where, "features", features, minimum=1)
        self.in_features = self.out_features = self.features
        self.eps = check_float(where, "eps", eps, minimum=0.0, exclusive_minimum=True)
        self._affine = _check_bool(where, affine_name, affine)
        self._weight: Optional[np.ndarray] = None
        self._bias: Optional[np.ndarray] = None
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self.input: Optional[np.ndarray] = None
        self.mean: Optional[np.ndarray] = None
        self.var: Optional[np.ndarray] = None
        self.invstd: Optional[np.ndarray] = None
        self.xhat: Optional[np.ndarray] = None
        self.output: Optional[np.ndarray] = None

    def _parameter_names(self) -> Tuple[str, ...]:
        return ("weight", "bias") if self._affine else ()

    def _build(self, width: int, dtype: np.dtype, build: "_Build") -> int:
        if self._affine:
            self._weight = np.ones(self.features, dtype=dtype)
            self._bias = np.zeros(self.features, dtype=dtype)
            self.grad_weight = np.zeros_like(self._weight)
            self.grad_bias = np.zeros_like(self._bias)
        return self.features

    def _scale_shift(self, xhat: np.ndarray) -> np.ndarray:
        return xhat * self.weight + self.bias if self._affine else xhat.copy()

    def _cache(self, a, mean, var, invstd, xhat, out) -> None:
        self.input, self.mean, self.var = _readonly(a), _readonly(mean), _readonly(var)
        self.invstd, self.xhat, self.output = _readonly(invstd), _readonly(xhat), _readonly(out)

    def _parameter_gradients(self, grad_output: np.ndarray, accumulate: bool) -> np.ndarray:
        """Stores dL/dgamma = sum over rows of dy * xhat and dL/dbeta = sum of dy;
        returns dL/dxhat = dy * gamma."""
        if not self._affine:
            return grad_output
        _store_gradient(self.grad_weight, (grad_output * self.xhat).sum(axis=0), accumulate)
        _store_gradient(self.grad_bias, grad_output.sum(axis=0), accumulate)
        return grad_output * self.weight


def _normalization_backward(dxhat: np.ndarray, xhat: np.ndarray, invstd: np.ndarray,
                            axis: int) -> np.ndarray:
    """dL/da for xhat = (a - mean(a)) * invstd(a), mean and biased variance taken
    over n entries along `axis`:
    dL/da = invstd / n * (n dxhat - sum dxhat - xhat sum(dxhat xhat))."""
    n = xhat.shape[axis]
    return invstd / n * (n * dxhat - dxhat.sum(axis=axis, keepdims=True)
                         - xhat * (dxhat * xhat).sum(axis=axis, keepdims=True))


class BatchNorm(_Norm):
    """Batch normalization over the rows of (batch, features), as PyTorch's
    ``BatchNorm1d``.

    Training mode: per feature, mean and biased variance var of the batch (n rows),
    xhat = (a - mean) / sqrt(var + eps), output = weight * xhat + bias; the buffers
    are updated as ``running_mean = (1 - momentum) * running_mean + momentum * mean``
    and ``running_var = (1 - momentum) * running_var + momentum * var_unbiased``
    with var_unbiased = sum((a - mean)^2) / (n - 1). A batch of one row is refused.
    Eval mode: the running statistics in place of the batch's; nothing changes.
    Everything is computed in the network's dtype: the scalars momentum,
    1 - momentum (subtracted in float64) and eps are each rounded to it once.

    Args:
        features: width of input and output.
        momentum: weight of the batch statistic in the running ones, in [0, 1].
        eps: added to the variance, > 0.
        affine: learn ``weight`` (gamma, starts at 1) and ``bias`` (beta, starts at 0).

    Buffers ``running_mean`` (starts at 0) and ``running_var`` (starts at 1),
    (features,). Caches of the last forward, read-only: ``input``, ``mean``,
    ``var`` (the statistics used: the batch's in training, the running ones in
    eval), ``invstd`` = 1 / sqrt(var + eps), ``xhat``, ``output``.
    """

    running_mean = _stored("running_mean", "(features,); assigning copies into it.")
    running_var = _stored("running_var", "(features,); assigning copies into it.")

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 affine: bool = True) -> None:
        super().__init__("reference.BatchNorm", features, eps, affine, "affine")
        self.momentum = check_float("reference.BatchNorm", "momentum", momentum,
                                    minimum=0.0, maximum=1.0)
        self._running_mean: Optional[np.ndarray] = None
        self._running_var: Optional[np.ndarray] = None
        self._trained = False  # the mode of the last forward, for backward

    @property
    def affine(self) -> bool:
        return self._affine

    def __repr__(self) -> str:
        return (f"reference.BatchNorm({self.features}, momentum={self.momentum}, "
                f"eps={self.eps}, affine={self._affine})")

    def _buffer_names(self) -> Tuple[str, ...]:
        return ("running_mean", "running_var")

    def _build(self, width: int, dtype: np.dtype, build: "_Build") -> int:
        self._running_mean = np.zeros(self.features, dtype=dtype)
        self._running_var = np.ones(self.features, dtype=dtype)
        return super()._build(width, dtype, build)

    def _check_batch(self, rows: int, where: str = "") -> None:
        if rows < 2:
            raise ValueError(f"[reference.BatchNorm] training needs more than one row per "
                             f"batch (one row has no variance), but got a batch of {rows}"
                             f"{where}; use eval mode or a larger batch")

    def forward(self, a: np.ndarray, training: bool) -> np.ndarray:
        if training:
            n = a.shape[0]
            self._check_batch(n)
            mean = a.mean(axis=0)
            centered = a - mean
            sum_sq = (centered * centered).sum(axis=0)
            var = sum_sq / n                                   # biased: normalises
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * (sum_sq / (n - 1))
        else:
            mean, var = self.running_mean.copy(), self.running_var.copy()
            centered = a - mean
        invstd = 1 / np.sqrt(var + self.eps)
        xhat = centered * invstd
        out = self._scale_shift(xhat)
        self._cache(a, mean, var, invstd, xhat, out)
        self._trained = training
        return out

    def backward(self, grad_output: np.ndarray, accumulate: bool = False,
                 input_grad: bool = True) -> Optional[np.ndarray]:
        dxhat = self._parameter_gradients(grad_output, accumulate)
        if not input_grad:
            return None
        if not self._trained:  # eval: an affine map of a with constant statistics
            return dxhat * self.invstd
        return _normalization_backward(dxhat, self.xhat, self.invstd, axis=0)

    def predict(self, a: np.ndarray) -> np.ndarray:
        xhat = (a - self.running_mean) * (1 / np.sqrt(self.running_var + self.eps))
        return self._scale_shift(xhat)


class LayerNorm(_Norm):
    """Layer normalization of each row of (batch, features), as PyTorch's
    ``LayerNorm(features)``: per row, mean and biased variance var over the
    features, xhat = (a - mean) / sqrt(var + eps), output = weight * xhat + bias.
    The same in training and eval mode; computed in the network's dtype (eps
    rounded to it).

    Args:
        features: width of input and output.
        eps: added to the variance, > 0.
        elementwise_affine: learn ``weight`` (starts at 1) and ``bias`` (starts at 0).

    Caches of the last forward, read-only: ``input``, ``mean``, ``var``,
    ``invstd`` (batch, 1), ``xhat``, ``output`` (batch, features).
    """

    def __init__(self, features: int, *, eps: float = 1e-5,
                 elementwise_affine: bool = True) -> None:
        super().__init__("reference.LayerNorm", features, eps, elementwise_affine,
                         "elementwise_affine")

    @property
    def elementwise_affine(self) -> bool:
        return self._affine

    def __repr__(self) -> str:
        return (f"reference.LayerNorm({self.features}, eps={self.eps}, "
                f"elementwise_affine={self._affine})")

    def _normalize(self, a: np.ndarray):
        mean = a.mean(axis=1, keepdims=True)
        centered = a - mean
        var = (centered * centered).mean(axis=1, keepdims=True)   # biased
        invstd = 1 / np.sqrt(var + self.eps)
        return mean, var, invstd, centered * invstd

    def forward(self, a: np.ndarray, training: bool) -> np.ndarray:
        mean, var, invstd, xhat = self._normalize(a)
        out = self._scale_shift(xhat)
        self._cache(a, mean, var, invstd, xhat, out)
        return out

    def backward(self, grad_output: np.ndarray, accumulate: bool = False,
                 input_grad: bool = True) -> Optional[np.ndarray]:
        dxhat = self._parameter_gradients(grad_output, accumulate)
        if not input_grad:
            return None
        return _normalization_backward(dxhat, self.xhat, self.invstd, axis=1)

    def predict(self, a: np.ndarray) -> np.ndarray:
        return self._scale_shift(self._normalize(a)[3])


def _check_layer_list(where: str, layers: object) -> Tuple[Layer, ...]:
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"[{where}] layers must be a list of reference layers, but got "
                        f"{type_name(layers)}")
    if len(layers) == 0:
        raise ValueError(f"[{where}] layers must hold at least one layer, but got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"[{where}] layers[{i}] must be a reference layer ({LAYERS}), "
                            f"but got {type_name(layer)}")
    return tuple(layers)


class Residual(Layer):
    """A residual block: output = input + f(input), f the given layers run in
    sequence; f's output width must equal its input width (checked when the
    network is built). dL/d(input) = dL/d(output) + f's backward of dL/d(output).

    Args:
        layers: the layers of f (at least one); Residuals nest.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        super().__init__()
        self._layers = _check_layer_list("reference.Residual", layers)
        self.in_features: Optional[int] = None
        self.out_features: Optional[int] = None

    @property
    def layers(self) -> Tuple[Layer, ...]:
        return self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> Layer:
        return self._layers[i]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    def __repr__(self) -> str:
        lines = ["reference.Residual("]
        lines += [f"  ({j}): {_indent(repr(layer))}" for j, layer in enumerate(self._layers)]
        return "\n".join(lines + [")"])

    def parameters(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        for j, layer in enumerate(self._layers):
            for name, value, grad in layer.parameters():
                yield f"layers.{j}.{name}", value, grad

    def buffers(self) -> Iterator[Tuple[str, np.ndarray]]:
        for j, layer in enumerate(self._layers):
            for name, array in layer.buffers():
                yield f"layers.{j}.{name}", array

    def _build(self, width: int, dtype: np.dtype, build: "_Build") -> int:
        self.in_features = self.out_features = width
        w = width
        for layer in self._layers:
            w = layer._build(w, dtype, build)
        return width  # == w, checked before building

    def forward(self, a: np.ndarray, training: bool) -> np.ndarray:
        f = a
        for layer in self._layers:
            f = layer.forward(f, training)
        return a + f                                           # y = x + f(x)

    def backward(self, grad_output: np.ndarray, accumulate: bool = False,
                 input_grad: bool = True) -> Optional[np.ndarray]:
        g = grad_output                                        # dL/dy is dL/df
        for j in range(len(self._layers) - 1, -1, -1):
            g = self._layers[j].backward(g, accumulate, input_grad=j > 0 or input_grad)
        return grad_output + g if input_grad else None         # dL/dx = dL/dy + (df/dx)^T dL/dy

    def predict(self, a: np.ndarray) -> np.ndarray:
        f = a
        for layer in self._layers:
            f = layer.predict(f)
        return a + f



# ---- the network ------------------------------------------------------------------------

class _Build:
    """What a network hands its layers while allocating them, in depth-first order."""

    def __init__(self, initial_parameters, dropout_clock: _DropoutClock) -> None:
        self.initial_parameters = initial_parameters  # (W, b) per Dense, in order
        self.dropout_clock = dropout_clock
        self.dropouts = 0                             # Dropout layers built so far


def _depth_first(layers: Sequence[Layer], prefix: str = "") -> Iterator[Tuple[str, Layer]]:
    """(position, layer) of every layer, nested ones included, in depth-first
    order; position "4.0" is layer 0 of the Residual at layer 4."""
    for i, layer in enumerate(layers):
        yield f"{prefix}{i}", layer
        if isinstance(layer, Residual):
            yield from _depth_first(layer.layers, f"{prefix}{i}.")


def _check_widths(layers: Sequence[Layer], width: Optional[int], producer: Optional[str],
                  prefix: str = "") -> Tuple[Optional[int], Optional[int], Optional[str]]:
    """Checks that widths chain through `layers`, entered with `width` features
    (None: not known yet) made by layer `producer`; width-agnostic layers pass the
    width on. Returns (the input width of the first layer here that fixes one, the
    width out, the layer that made it), None where no layer fixes a width."""
    first = None
    for i, layer in enumerate(layers):
        here = f"{prefix}{i}"
        if isinstance(layer, Residual):
            # f is entered with the same width, so its first width is checked against ours
            f_in, f_out, _ = _check_widths(layer.layers, width, producer, here + ".")
            if f_in is not None and f_in != f_out:
                raise ValueError(f"[reference.Network] layer {here} (Residual) computes "
                                 f"x + f(x), so f must keep the width, but f maps {f_in} "
                                 f"features to {f_out}")
            if f_in is not None:
                first = f_in if first is None else first
                width, producer = f_in, here
        elif not layer._width_agnostic:
            if width is not None and layer.in_features != width:
                raise ValueError(f"[reference.Network] layer {here} expects "
                                 f"{layer.in_features} input features, but layer "
                                 f"{producer} produces {width}")
            first = layer.in_features if first is None else first
            width, producer = layer.out_features, here
    return first, width, producer


class Network:
    """An ordered sequence of layers, trained by backpropagation.

    Args:
        layers: reference layers (:class:`Dense`, :class:`Activation`,
            :class:`Dropout`, :class:`BatchNorm`, :class:`LayerNorm`,
            :class:`Residual`) whose widths chain, at least one with a width of its
            own; each layer object belongs to one network.
        dtype: "float32" (default) or "float64".
        seed: seed of the initial weights; the same seed gives the same bits as
            ``bprop.Network`` with the same architecture. Also the dropout key
            (taken mod 2^64); None draws both at random.

    Initial parameters: the Dense weights are drawn by
    ``bprop._init.initial_parameters`` for the Dense layers in depth-first order
    (a Dense-only network gets the same bits as before layers other than Dense
    existed); norm layers start at weight 1, bias 0, running_mean 0, running_var 1.
    A new network is in training mode.

    Attributes:
        dropout_seed: the key of the Dropout masks, in [0, 2^64).
        dropout_step: training-mode forward passes made so far (each uses this
            count as its step, then adds 1); settable, to replay a mask.
    """

    def __init__(self, layers: Sequence[Layer], dtype="float32",
                 seed: Optional[int] = None) -> None:
        layers = _check_layer_list("reference.Network", layers)
        seen = {}
        for position, layer in _depth_first(layers):
            if layer._in_network:
                raise ValueError(f"[reference.Network] layer {position} already belongs to "
                                 "a Network")
            if id(layer) in seen:
                raise ValueError(f"[reference.Network] the same {type(layer).__name__} object "
                                 f"appears twice, as layer {seen[id(layer)]} and layer "
                                 f"{position}")
            seen[id(layer)] = position
        in_features, _, _ = _check_widths(layers, None, None)
        if in_features is None:
            raise ValueError("[reference.Network] no layer has a width of its own (Dense, "
                             "BatchNorm, LayerNorm): Activation and Dropout take their "
                             "neighbours' width")
        self._dtype = check_dtype("reference.Network", dtype)
        if seed is not None:
            seed = check_int("reference.Network", "seed", seed, minimum=0)
            dropout_seed = seed % 2**64
        else:
            dropout_seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
        self._clock = _DropoutClock(dropout_seed)
        flat = [layer for _, layer in _depth_first(layers)]
        specs = [layer._spec() for layer in flat if isinstance(layer, Dense)]
        build = _Build(initial_parameters(specs, self._dtype, seed), self._clock)
        width = in_features
        for layer in layers:
            width = layer._build(width, self._dtype, build)
        for layer in flat:
            layer._in_network = True
        self._layers = layers
        self._in_features, self._out_features = in_features, width
        self._training = True
        self._batch: Optional[int] = None  # rows of the last forward
        self._has_backward = False

    # ---- modes ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Network":
        """Sets training mode (or eval mode for ``mode=False``); returns the network."""
        self._training = _check_bool("reference.Network.train", "mode", mode)
        return self

    def eval(self) -> "Network":
        """Sets eval mode; returns the network."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return self._training

    @property
    def dropout_seed(self) -> int:
        return self._clock.seed

    @property
    def dropout_step(self) -> int:
        return self._clock.step

    @dropout_step.setter
    def dropout_step(self, step: int) -> None:
        self._clock.step = check_int("reference.Network.dropout_step", "dropout_step", step,
                                     minimum=0, maximum=2**64 - 1)

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
        """Forward pass in the current mode, each layer caching what its backward
        needs (a Dense: its input a, pre-activation z and output). In training mode
        BatchNorm updates its running statistics, and ``dropout_step`` grows by 1.

        Args:
            X: (batch, in_features) of the network's dtype; cached by reference.

        Returns:
            (batch, out_features), a new array.
        """
        self._check("forward", "X", X, self.in_features, None)
        if self._training:  # refused before any layer changes
            for position, layer in _depth_first(self._layers):
                if isinstance(layer, BatchNorm):
                    layer._check_batch(X.shape[0], f" (layer {position})")
        a = X
        for layer in self._layers:
            a = layer.forward(a, self._training)
        if self._training:
            self._clock.step = (self._clock.step + 1) % 2**64
        self._batch = X.shape[0]
        return a.copy()

    def backward(self, grad_output: np.ndarray, *, accumulate: bool = False,
                 input_grad: bool = False) -> Optional[np.ndarray]:
        """Backward sweep from grad_output = dL/d(output) (batch, out_features),
        each layer visited once, last to first, differentiating the function its
        last forward computed (that forward's mode).

        Stores every parameter's gradient (added to the old ones if
        ``accumulate``). Returns dL/dX (batch, in_features) if ``input_grad``.
        """
        if self._batch is None:
            raise RuntimeError("[reference.Network.backward] called before forward")
        self._check("backward", "grad_output", grad_output, self.out_features, self._batch)
        grad = grad_output                                      # dL/d(output of the last layer)
        for i in range(len(self._layers) - 1, -1, -1):
            # the first layer's dL/dX only when asked for
            grad = self._layers[i].backward(grad, accumulate, input_grad=i > 0 or input_grad)
        self._has_backward = True
        return grad if input_grad else None

    def step(self, lr: float) -> None:
        """Plain SGD on every parameter: theta -= lr dL/dtheta."""
        lr = check_float("reference.Network.step", "lr", lr, minimum=0.0)
        if not self._has_backward:
            raise RuntimeError("[reference.Network.step] called before backward")
        with np.errstate(over="ignore"):
            lr = self._dtype.type(lr)
        if not np.isfinite(lr):
            raise ValueError(f"[reference.Network.step] lr must be finite as {self._dtype}, "
                             f"but overflows")
        for _, value, grad in self.parameters():
            value[...] -= lr * grad

    def predict(self, X, batch_size: Optional[int] = None) -> np.ndarray:
        """Forward pass in eval mode whatever the network's mode, leaving the mode,
        the caches, the buffers and ``dropout_step`` alone; converts X like bprop
        does.

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
                a = layer.predict(a)
            chunks.append(a)
        return np.concatenate(chunks)

    # ---- description ----------------------------------------------------------
    @property
    def layers(self) -> Tuple[Layer, ...]:
        return self._layers

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_parameters(self) -> int:
        return sum(value.size for _, value, _ in self.parameters())

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self._out_features

    def parameters(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """(name, parameter, gradient), live arrays, for every parameter of every
        layer in layer order (weight, then bias), named as in bprop.Network:
        ``layers.0.weight``, ``layers.4.layers.0.bias``."""
        for i, layer in enumerate(self._layers):
            for name, value, grad in layer.parameters():
                yield f"layers.{i}.{name}", value, grad

    def buffers(self) -> Iterator[Tuple[str, np.ndarray]]:
        """(name, live array) of every buffer: ``layers.1.running_mean``."""
        for i, layer in enumerate(self._layers):
            for name, array in layer.buffers():
                yield f"layers.{i}.{name}", array

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> Layer:
        return self._layers[i]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    def __repr__(self) -> str:
        lines = [f"reference.Network(dtype={self._dtype.name}, parameters="
                 + f"{self.num_parameters:,})"]
        lines += [f"  ({i}): {_indent(repr(layer))}" for i, layer in enumerate(self._layers)]
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


def softmax_cross_entropy(output: np.ndarray, target, sample_weight=None, *,
                          label_smoothing: float = 0.0, class_weight=None
                          ) -> Tuple[float, np.ndarray]:
    """Cross-entropy of softmax(output) against the target, averaged over the batch,
    with torch.nn.CrossEntropyLoss's label_smoothing and weight (class_weight).

    The target row y_i (one-hot for a label) becomes t_i = c * ((1 - eps) y_i + eps / C),
    l_i = sum_j t_ij (logsumexp(z_i) - z_ij). The mean divides by sum_i w_i c[label_i]
    for labels (torch's weighted mean), by sum(w) for probability rows.

    Args:
        output: logits (batch, classes).
        target: integer labels (batch,) in [0, classes), or probability rows
            (batch, classes).
        sample_weight: optional (batch,); the mean is then sum(w_i l_i) / sum(w).
        label_smoothing: eps in [0, 1].
        class_weight: optional (classes,) non-negative weights c.

    Returns:
        (loss, grad) with grad = w_i (sum_j t_ij softmax(z_i) - t_i) / denominator.
    """
    batch, wsum, w = _loss_inputs("softmax_cross_entropy", output, target, sample_weight)
    classes = output.shape[1]
    z = output.astype(np.float64)
    c = np.ones(classes) if class_weight is None else np.asarray(class_weight, np.float64)
    if c.shape != (classes,) or not np.isfinite(c).all() or (c < 0).any():
        raise ValueError(f"[reference.softmax_cross_entropy] class_weight must be {classes} "
                         f"finite non-negative numbers, but got shape {c.shape}")
    eps = float(label_smoothing)
    if not 0 <= eps <= 1:
        raise ValueError("[reference.softmax_cross_entropy] label_smoothing must lie in "
                         f"[0, 1], but got {eps}")
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
        denom = float((w * c[labels]).sum())
    else:
        y = _same_shape_target("softmax_cross_entropy", output, target)
        denom = wsum
    t = c * ((1 - eps) * y + eps / classes)                       # the smoothed, weighted target
    m = z.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))   # log-sum-exp per row
    per_sample = (t * (lse - z)).sum(axis=1)                      # -sum_j t_j log softmax_j
    grad = (w / denom)[:, None] * (t.sum(axis=1, keepdims=True) * np.exp(z - lse) - t)
    return float((w * per_sample).sum() / denom), grad.astype(output.dtype)


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


def huber(output: np.ndarray, target, sample_weight=None, *, delta: float = 1.0
          ) -> Tuple[float, np.ndarray]:
    """Mean over all elements of r^2 / 2 (|r| < delta) or delta (|r| - delta / 2),
    r = output - target (torch.nn.HuberLoss).

    Returns:
        (loss, grad) with grad = w_i clamp(r, -delta, delta) / (sum(w) k).
    """
    _, wsum, w = _loss_inputs("huber", output, target, sample_weight)
    r = output.astype(np.float64) - _same_shape_target("huber", output, target)
    a = np.abs(r)
    elementwise = np.where(a < delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    denom = wsum * output.shape[1]
    grad = (w / denom)[:, None] * np.clip(r, -delta, delta)
    return float((w[:, None] * elementwise).sum() / denom), grad.astype(output.dtype)


def mean_absolute_error(output: np.ndarray, target, sample_weight=None
                        ) -> Tuple[float, np.ndarray]:
    """Mean over all elements of |output - target| (torch.nn.L1Loss).

    Returns:
        (loss, grad) with grad = w_i sign(output - target) / (sum(w) k), 0 where equal.
    """
    _, wsum, w = _loss_inputs("mean_absolute_error", output, target, sample_weight)
    r = output.astype(np.float64) - _same_shape_target("mean_absolute_error", output, target)
    denom = wsum * output.shape[1]
    grad = (w / denom)[:, None] * np.sign(r)
    return float((w[:, None] * np.abs(r)).sum() / denom), grad.astype(output.dtype)


def poisson_nll(output: np.ndarray, target, sample_weight=None) -> Tuple[float, np.ndarray]:
    """Mean over all elements of exp(z) - y z, z = output the log-rate
    (torch.nn.PoissonNLLLoss(log_input=True, full=False)).

    Returns:
        (loss, grad) with grad = w_i (exp(z) - y) / (sum(w) k).
    """
    _, wsum, w = _loss_inputs("poisson_nll", output, target, sample_weight)
    z = output.astype(np.float64)
    y = _same_shape_target("poisson_nll", output, target)
    mu = np.exp(z)
    denom = wsum * output.shape[1]
    grad = (w / denom)[:, None] * (mu - y)
    return float((w[:, None] * (mu - y * z)).sum() / denom), grad.astype(output.dtype)

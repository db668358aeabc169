"""Losses: ``loss(output, target, sample_weight=None) -> (value, grad_output)``.

Each built-in loss checks and converts its arguments here, in Python, and then
calls one fused C++ kernel (``bprop._core``) that computes the mean loss and
dL/d(output) in a single pass. The reduction is the mean: with sample weights
w (batch,) the value is sum_i(w_i l_i) / sum_i(w_i), and every grad row is
scaled to match, so multiplying all weights by a constant changes nothing.

A loss of your own works wherever a built-in one does if it has the same
signature and returns a float and a (batch, out_features) array::

    def my_loss(output, target, sample_weight=None):
        r = output - target
        ...
        return value, grad_output

    bprop.fit(net, X, y, loss=my_loss)

``get_loss`` turns a built-in name (see ``LOSSES``) or such a callable into the
loss function.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np

from . import _core
from ._validation import type_name

__all__ = ["LOSSES", "softmax_cross_entropy", "binary_cross_entropy_with_logits",
           "mean_squared_error", "huber", "mean_absolute_error", "poisson_nll",
           "poisson_deviance_log_link", "get_loss"]

LossFn = Callable[..., Tuple[float, np.ndarray]]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---- argument checks shared by the losses, fit and evaluate ---------------------

def _as_output(where: str, name: str, output: object) -> np.ndarray:
    """The network output (batch, out_features) as a C-contiguous float32/float64
    array: float arrays keep their dtype, integer arrays become float64."""
    if (type(output) is np.ndarray and output.dtype in _FLOAT_DTYPES
            and output.flags.c_contiguous and output.ndim == 2 and output.shape[0] > 0):
        return output  # the common case, without further work
    if output is None:
        raise TypeError(f"[{where}] {name} must be a float32 or float64 array, but got None")
    try:
        arr = np.asarray(output)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"[{where}] {name} must be a rectangular 2-D array, but got a ragged "
                         f"{type_name(output)}") from exc
    if arr.dtype.kind not in "iuf" or arr.dtype.kind == "f" and arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"[{where}] {name} must be a float32 or float64 array, but has dtype "
                        f"{arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"[{where}] {name} must be 2-D (batch, features), but has shape "
                         f"{arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"[{where}] {name} has 0 rows; expected at least one")
    dtype = arr.dtype if arr.dtype in _FLOAT_DTYPES else np.dtype(np.float64)
    return np.ascontiguousarray(arr, dtype=dtype)


def _as_real_array(where: str, name: str, value: object) -> np.ndarray:
    if value is None:
        raise TypeError(f"[{where}] {name} must be an array of numbers, but got None")
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"[{where}] {name} must be a rectangular array, but got a ragged "
                         f"{type_name(value)}") from exc
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"[{where}] {name} must hold real numbers (integer or floating), but "
                        f"has dtype {arr.dtype}")
    return arr


def _first_bad(mask: np.ndarray) -> str:
    """'[i]' or '[i, j]' of the first True entry of mask."""
    index = np.unravel_index(int(np.argmax(mask)), mask.shape)
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def check_labels(where: str, name: str, target: object, rows: int, classes: int,
                 ref: str = "logits") -> np.ndarray:
    """Integer class labels (rows,) in [0, classes) as a C-contiguous int64 array.

    Integer arrays and floats holding whole numbers are accepted (a float label
    such as 2.5 is refused); an integer column (rows, 1) is flattened."""
    arr = _as_real_array(where, name, target)
    if arr.ndim == 2 and arr.shape[1] == 1 and arr.dtype.kind in "iu":
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"[{where}] {name} must be 1-D class labels (batch,), but has shape "
                         f"{arr.shape}")
    if arr.shape[0] != rows:
        raise ValueError(f"[{where}] {name} has {arr.shape[0]} labels, but {ref} has {rows} rows")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(f"[{where}] {name} must hold class labels, but {name}"
                             f"{_first_bad(bad)} = {arr[bad][0]}")
        bad = arr != np.floor(arr)
        if bad.any():
            raise ValueError(f"[{where}] {name} must hold whole-number class labels, but "
                             f"{name}{_first_bad(bad)} = {arr[bad][0]}")
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= classes:
            bad = (arr < 0) | (arr >= classes)
            value = arr[bad][0]
            value = int(value) if float(value).is_integer() else value
            raise ValueError(f"[{where}] {name} labels must lie in [0, {classes}) for {classes} "
                             f"classes, but {name}{_first_bad(bad)} = {value}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_float_target(where: str, name: str, target: object, shape: Tuple[int, int],
                       dtype: np.dtype, ref: str = "output", *, unit_interval: bool = False,
                       distribution: bool = False) -> np.ndarray:
    """A float target of `shape` (rows, k) as a C-contiguous array of `dtype`.

    A 1-D target of length rows is taken as a column when k == 1. Values must be
    finite (and in [0, 1] if unit_interval). With `distribution`, each row must
    also be a probability distribution: in [0, 1] and summing to 1 within the
    square root of the machine epsilon of the coarser of the given and the
    target dtype (3.5e-4 in float32, 1.5e-8 in float64)."""
    arr = _as_real_array(where, name, target)
    given = arr.dtype
    rows, width = shape
    if arr.ndim == 1 and width == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        hint = (f" (1-D targets are accepted only for a 1-wide {ref})" if arr.ndim == 1
                else "")
        raise ValueError(f"[{where}] {name} must be 2-D (batch, {width}), but has shape "
                         f"{arr.shape}{hint}")
    if arr.shape[0] != rows:
        raise ValueError(f"[{where}] {name} has {arr.shape[0]} rows, but {ref} has {rows}")
    if arr.shape[1] != width:
        raise ValueError(f"[{where}] {name} has {arr.shape[1]} columns, but {ref} has {width}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = ~finite
        raise ValueError(f"[{where}] {name} must be finite, but {name}{_first_bad(bad)} = "
                         f"{arr[bad][0]}")
    if unit_interval or distribution:
        bad = (arr < 0) | (arr > 1)
        if bad.any():
            raise ValueError(f"[{where}] {name} must hold probabilities in [0, 1], but "
                             f"{name}{_first_bad(bad)} = {arr[bad][0]}")
    if distribution and arr.size:
        coarse = given if given.kind == "f" and given.itemsize < arr.itemsize else arr.dtype
        tol = float(np.sqrt(np.finfo(coarse).eps))
        sums = arr.sum(axis=1, dtype=np.float64)
        off = np.abs(sums - 1.0) > tol
        if off.any():
            i = int(np.argmax(off))
            raise ValueError(f"[{where}] {name} holds probability rows, which must sum to 1 "
                             f"(to within {tol:.2g}), but row {i} sums to {sums[i]:.17g}; "
                             "give class labels, or normalise the rows")
    return arr


def check_sample_weight(where: str, sample_weight: object, rows: int, dtype: np.dtype,
                        ref: str = "the batch", name: str = "sample_weight"
                        ) -> Optional[np.ndarray]:
    """None, or non-negative finite weights (rows,) with a positive sum, as a
    C-contiguous array of `dtype`."""
    if sample_weight is None:
        return None
    arr = _as_real_array(where, name, sample_weight)
    if arr.ndim != 1:
        raise ValueError(f"[{where}] {name} must be 1-D (batch,), but has shape {arr.shape}")
    if arr.shape[0] != rows:
        raise ValueError(f"[{where}] {name} has {arr.shape[0]} entries, but {ref} has {rows} "
                         "rows")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = ~finite
        raise ValueError(f"[{where}] {name} must be finite, but {name}{_first_bad(bad)} = "
                         f"{arr[bad][0]}")
    bad = arr < 0
    if bad.any():
        raise ValueError(f"[{where}] {name} must be >= 0, but {name}{_first_bad(bad)} = "
                         f"{arr[bad][0]}")
    total = float(arr.sum(dtype=np.float64))
    if not total > 0:
        raise ValueError(f"[{where}] {name} sums to 0: at least one sample needs a positive "
                         "weight")
    if not np.isfinite(arr.sum()):
        raise ValueError(f"[{where}] {name} sums to inf in {np.dtype(dtype).name}; scale the "
                         "weights down (only their ratios matter)")
    return arr


# ---- the built-in losses ---------------------------------------------------------

def softmax_cross_entropy(logits, target, sample_weight=None, *, label_smoothing=0.0,
                          class_weight=None) -> Tuple[float, np.ndarray]:
    """Cross-entropy of softmax(logits), fused through log-sum-exp.

    l_i = logsumexp(z_i) - z_i[y_i] for labels, or sum_j y_ij (logsumexp(z_i) - z_ij)
    for probability rows; finite and exact for logits as large as +-1e4.

    The options follow torch.nn.CrossEntropyLoss(weight=class_weight,
    label_smoothing=label_smoothing). With eps = label_smoothing and c the class
    weights (ones if None), row i's target becomes
    t_ij = c_j ((1 - eps) [j == y_i] + eps / classes) for a label y_i, or
    t_ij = c_j ((1 - eps) y_ij + eps / classes) for a probability row, and
    l_i = sum_j t_ij (logsumexp(z_i) - z_ij). The mean divides by
    sum_i w_i c[y_i] for labels (torch's weighted mean; w the sample weights,
    ones if None: the two weights multiply per row) and by sum_i w_i for
    probability rows (torch divides those by the batch size).

    Args:
        logits: (batch, classes) raw scores z (no softmax applied).
        target: integer labels (batch,) in [0, classes), or probability rows
            (batch, classes).
        sample_weight: optional non-negative weights (batch,).
        label_smoothing: eps in [0, 1].
        class_weight: optional non-negative finite weights (classes,).

    Returns:
        (mean loss, dL/dz (batch, classes) = w_i (s_i softmax(z_i) - t_i) / D),
        s_i = sum_j t_ij and D the denominator above; without options
        w_i (softmax(z_i) - y_i) / sum(w).
    """
    where = "softmax_cross_entropy"
    z = _as_output(where, "logits", logits)
    y = _prepare_softmax(where, "target", target, z.shape, z.dtype, "logits")
    w = check_sample_weight(where, sample_weight, z.shape[0], z.dtype, "logits")
    eps = _check_label_smoothing(where, label_smoothing)
    cw = _check_class_weight(where, class_weight, z.shape[1])
    if eps == 0.0 and cw is None:
        return _core.softmax_cross_entropy(z, y, w)
    return _softmax_cross_entropy_options(where, z, y, w, eps, cw)


def _check_label_smoothing(where: str, label_smoothing: object) -> float:
    if isinstance(label_smoothing, (bool, np.bool_)) or not isinstance(
            label_smoothing, (int, float, np.integer, np.floating)):
        raise TypeError(f"[{where}] label_smoothing must be a number in [0, 1], but got "
                        f"{type_name(label_smoothing)}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"[{where}] label_smoothing must lie in [0, 1], but got {eps}")
    return eps


def _check_class_weight(where: str, class_weight: object, classes: int) -> Optional[np.ndarray]:
    if class_weight is None:
        return None
    arr = _as_real_array(where, "class_weight", class_weight)
    if arr.shape != (classes,):
        raise ValueError(f"[{where}] class_weight must have one weight per class ({classes},), "
                         f"but has shape {arr.shape}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        raise ValueError(f"[{where}] class_weight must be finite and >= 0, but "
                         f"class_weight{_first_bad(bad)} = {arr[bad][0]}")
    return arr


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum_i a_i b_i in float64 by NumPy's own loop (einsum without optimize): np.dot
    would call NumPy's BLAS, whose thread pool fights bprop's on every step."""
    return float(np.einsum("i,i->", a, b, dtype=np.float64))


def _softmax_cross_entropy_options(where, z, y, w, eps, cw):
    """softmax_cross_entropy with label smoothing and/or class weights, in NumPy
    (float64 inside): see softmax_cross_entropy for the formulas."""
    rows, classes = z.shape
    c = np.ones(classes) if cw is None else cw
    z64 = z.astype(np.float64)
    shifted = z64 - z64.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    neg_log_p = lse - shifted  # logsumexp(z_i) - z_ij
    sw = np.ones(rows) if w is None else w.astype(np.float64)
    if y.ndim == 1:
        onehot = np.zeros((rows, classes))
        onehot[np.arange(rows), y] = 1.0
        denom = _dot(sw, c[y])
    else:
        onehot = y.astype(np.float64)
        denom = float(sw.sum())
    if not denom > 0:
        raise ValueError(f"[{where}] the weighted mean's denominator sum_i w_i class_weight"
                         "[y_i] is 0: at least one sample needs a positive combined weight")
    t = c * ((1.0 - eps) * onehot + eps / classes)
    value = _dot(sw, (t * neg_log_p).sum(axis=1)) / denom
    p = np.exp(-neg_log_p)
    grad = (sw / denom)[:, None] * (t.sum(axis=1, keepdims=True) * p - t)
    return value, np.ascontiguousarray(grad, dtype=z.dtype)


def binary_cross_entropy_with_logits(logits, target, sample_weight=None
                                     ) -> Tuple[float, np.ndarray]:
    """Binary cross-entropy of sigmoid(logits), elementwise, stable for any logit:
    l = max(x, 0) - x y + log(1 + exp(-|x|)).

    Args:
        logits: (batch, k) raw scores x.
        target: (batch, k) probabilities in [0, 1]; (batch,) when k == 1.
        sample_weight: optional non-negative weights (batch,).

    Returns:
        (mean over all elements, dL/dx (batch, k) = w_i (sigmoid(x) - y) / (k sum(w))).
    """
    where = "binary_cross_entropy_with_logits"
    x = _as_output(where, "logits", logits)
    y = check_float_target(where, "target", target, x.shape, x.dtype, "logits",
                           unit_interval=True)
    w = check_sample_weight(where, sample_weight, x.shape[0], x.dtype, "logits")
    return _core.binary_cross_entropy_with_logits(x, y, w)


def mean_squared_error(output, target, sample_weight=None) -> Tuple[float, np.ndarray]:
    """Mean squared error over all elements: l = mean((output - target)^2).

    Args:
        output: (batch, k).
        target: (batch, k); (batch,) when k == 1.
        sample_weight: optional non-negative weights (batch,).

    Returns:
        (mean loss, dL/d(output) (batch, k) = 2 w_i (output - target) / (k sum(w))).
    """
    where = "mean_squared_error"
    o = _as_output(where, "output", output)
    y = check_float_target(where, "target", target, o.shape, o.dtype, "output")
    w = check_sample_weight(where, sample_weight, o.shape[0], o.dtype, "output")
    return _core.mean_squared_error(o, y, w)


def huber(output, target, sample_weight=None, *, delta=1.0) -> Tuple[float, np.ndarray]:
    """Huber loss over all elements, as torch.nn.HuberLoss(delta=delta):
    with r = output - target, l = r^2 / 2 where |r| < delta, else
    delta (|r| - delta / 2). By name (``loss="huber"``) delta is 1.

    Args:
        output: (batch, k).
        target: (batch, k); (batch,) when k == 1.
        sample_weight: optional non-negative weights (batch,).
        delta: the finite threshold > 0 between the quadratic and linear parts.

    Returns:
        (mean loss, dL/d(output) (batch, k) = w_i clamp(r, -delta, delta) / (k sum(w))).
    """
    where = "huber"
    if isinstance(delta, (bool, np.bool_)) or not isinstance(
            delta, (int, float, np.integer, np.floating)):
        raise TypeError(f"[{where}] delta must be a number > 0, but got {type_name(delta)}")
    delta = float(delta)
    if not (np.isfinite(delta) and delta > 0):
        raise ValueError(f"[{where}] delta must be a finite number > 0, but got {delta}")
    o = _as_output(where, "output", output)
    y = check_float_target(where, "target", target, o.shape, o.dtype, "output")
    w = check_sample_weight(where, sample_weight, o.shape[0], o.dtype, "output")
    return _core.huber(o, y, w, delta)


def mean_absolute_error(output, target, sample_weight=None) -> Tuple[float, np.ndarray]:
    """Mean absolute error over all elements, as torch.nn.L1Loss:
    l = |output - target|; the gradient at output == target is 0 (torch's sign).

    Args:
        output: (batch, k).
        target: (batch, k); (batch,) when k == 1.
        sample_weight: optional non-negative weights (batch,).

    Returns:
        (mean loss, dL/d(output) (batch, k) = w_i sign(output - target) / (k sum(w))).
    """
    where = "mean_absolute_error"
    o = _as_output(where, "output", output)
    y = check_float_target(where, "target", target, o.shape, o.dtype, "output")
    w = check_sample_weight(where, sample_weight, o.shape[0], o.dtype, "output")
    return _core.mean_absolute_error(o, y, w)


def poisson_nll(output, target, sample_weight=None) -> Tuple[float, np.ndarray]:
    """Poisson negative log-likelihood of log-rates, as
    torch.nn.PoissonNLLLoss(log_input=True, full=False): l = exp(z) - y z over all
    elements (the log(y!) term, constant in z, is left out).

    Like torch, any finite target is accepted, negative ones included (they are
    not counts, but the formula is defined); NaN and inf are refused, as by
    every bprop loss (torch would return NaN). ``poisson_deviance_log_link``
    differs from this loss by a term in y alone, so both give the same gradient.

    Args:
        output: (batch, k) log-rates z.
        target: (batch, k) counts y; (batch,) when k == 1.
        sample_weight: optional non-negative weights (batch,).

    Returns:
        (mean loss, dL/dz (batch, k) = w_i (exp(z) - y) / (k sum(w))).
    """
    where = "poisson_nll"
    z = _as_output(where, "output", output)
    y = check_float_target(where, "target", target, z.shape, z.dtype, "output")
    w = check_sample_weight(where, sample_weight, z.shape[0], z.dtype, "output")
    return _core.poisson_nll(z, y, w)


def poisson_deviance_log_link(output, target, sample_weight=None) -> Tuple[float, np.ndarray]:
    """Half the Poisson deviance of mu = exp(output) (a log link), elementwise:
    l = y log(y) - y - y z + exp(z) = y log(y / mu) - y + mu, with 0 log 0 = 0.

    The network's output z is log(mu), so any real output is a valid mean and the
    gradient is simply mu - y. Computed in NumPy (no C++ kernel): pass the
    function itself where a loss is expected (it is not a name in ``LOSSES``).

    Args:
        output: (batch, k) log-means z.
        target: (batch, k) non-negative counts or rates y; (batch,) when k == 1.
        sample_weight: optional non-negative weights (batch,).

    Returns:
        (mean over all elements, dL/dz (batch, k) = w_i (exp(z) - y) / (k sum(w))).
    """
    where = "poisson_deviance_log_link"
    z = _as_output(where, "output", output)
    y = check_float_target(where, "target", target, z.shape, z.dtype, "output")
    bad = y < 0
    if bad.any():
        raise ValueError(f"[{where}] target must be >= 0 (counts or rates), but "
                         f"target{_first_bad(bad)} = {y[bad][0]}")
    w = check_sample_weight(where, sample_weight, z.shape[0], z.dtype, "output")
    with np.errstate(over="ignore", invalid="ignore"):
        mu = np.exp(z)
        # xlogy(y, y): log of 1 where y == 0, so that 0 log 0 = 0 without a warning
        elementwise = y * np.log(np.where(y > 0, y, 1)) - y - y * z + mu
        grad = mu - y
        rows = elementwise.sum(axis=1, dtype=np.float64)
        if w is None:
            total = float(z.size)
            value = float(rows.sum()) / total
        else:
            total = float(w.sum(dtype=np.float64)) * z.shape[1]
            value = _dot(w, rows) / total
            grad *= w[:, None]
        grad /= total
    return value, np.ascontiguousarray(grad, dtype=z.dtype)


# ---- the registry ------------------------------------------------------------------

class _Builtin(NamedTuple):
    """What fit needs to run a built-in loss without re-checking every batch:
    `prepare` checks and converts the whole target once, `kernel` is the C++ call."""
    name: str
    kernel: LossFn
    prepare: Callable[..., np.ndarray]


def _prepare_softmax(where, name, target, shape, dtype, ref="output"):
    arr = _as_real_array(where, name, target)
    if arr.ndim == 2 and not (arr.shape[1] == 1 and arr.dtype.kind in "iu" and shape[1] != 1):
        return check_float_target(where, name, arr, shape, dtype, ref, distribution=True)
    return check_labels(where, name, arr, shape[0], shape[1], ref)


def _prepare_bce(where, name, target, shape, dtype, ref="output"):
    return check_float_target(where, name, target, shape, dtype, ref, unit_interval=True)


def _prepare_mse(where, name, target, shape, dtype, ref="output"):
    return check_float_target(where, name, target, shape, dtype, ref)


_BUILTINS = {
    softmax_cross_entropy: _Builtin("softmax_cross_entropy", _core.softmax_cross_entropy,
                                    _prepare_softmax),
    binary_cross_entropy_with_logits: _Builtin("binary_cross_entropy_with_logits",
                                               _core.binary_cross_entropy_with_logits,
                                               _prepare_bce),
    mean_squared_error: _Builtin("mean_squared_error", _core.mean_squared_error, _prepare_mse),
    huber: _Builtin("huber", _core.huber, _prepare_mse),
    mean_absolute_error: _Builtin("mean_absolute_error", _core.mean_absolute_error,
                                  _prepare_mse),
    poisson_nll: _Builtin("poisson_nll", _core.poisson_nll, _prepare_mse),
}

#: Each built-in's keyword options and their defaults: a functools.partial of a
#: built-in that sets only these, to these values, runs through the fused core.
_DEFAULT_OPTIONS = {
    softmax_cross_entropy: {"label_smoothing": 0.0, "class_weight": None},
    huber: {"delta": 1.0},
}

#: Built-in losses by name (aliases included), read-only.
LOSSES = types.MappingProxyType({
    "softmax_cross_entropy": softmax_cross_entropy,
    "cross_entropy": softmax_cross_entropy,
    "binary_cross_entropy_with_logits": binary_cross_entropy_with_logits,
    "bce_with_logits": binary_cross_entropy_with_logits,
    "mean_squared_error": mean_squared_error,
    "mse": mean_squared_error,
    "huber": huber,
    "mean_absolute_error": mean_absolute_error,
    "mae": mean_absolute_error,
    "poisson_nll": poisson_nll,
})


def get_loss(loss, where: str = "get_loss") -> LossFn:
    """The loss function for a built-in name (a key of ``LOSSES``) or a callable
    ``loss(output, target, sample_weight=None) -> (value, grad_output)``, which is
    returned unchanged."""
    if isinstance(loss, str):
        try:
            return LOSSES[loss]
        except KeyError:
            raise ValueError(f"[{where}] unknown loss {loss!r}; expected one of "
                             f"{sorted(LOSSES)} or a callable "
                             "loss(output, target, sample_weight=None) -> (value, grad)"
                             ) from None
    if callable(loss):
        return loss
    raise TypeError(f"[{where}] loss must be a name (one of {sorted(LOSSES)}) or a callable "
                    f"loss(output, target, sample_weight=None) -> (value, grad), but got "
                    f"{type_name(loss)}")


def _builtin(loss_fn: LossFn) -> Optional[_Builtin]:
    """The fused form of a built-in loss, or of a ``functools.partial`` of one
    whose keywords are all at their defaults; None for anything else (a partial
    with options, such as label_smoothing=0.1 or delta=2.0, runs as a user
    loss: the Python function is called on each minibatch's output)."""
    if isinstance(loss_fn, functools.partial):
        defaults = _DEFAULT_OPTIONS.get(loss_fn.func, {})
        if loss_fn.args or any(k not in defaults or not _is_default(v, defaults[k])
                               for k, v in loss_fn.keywords.items()):
            return None
        loss_fn = loss_fn.func
    try:
        return _BUILTINS.get(loss_fn)
    except TypeError:  # an unhashable callable
        return None


def _is_default(value, default) -> bool:
    if default is None:
        return value is None
    return (not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float))
            and float(value) == default)

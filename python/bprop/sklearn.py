"""scikit-learn estimators over bprop: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in counterparts of ``sklearn.neural_network.MLPClassifier`` and
``MLPRegressor`` (same parameters, attributes and methods) whose forward pass,
loss and backward sweep run in bprop's C++ core::

    from bprop.sklearn import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,)))
    clf.fit(X_train, y_train).score(X_test, y_test)

The objective is scikit-learn's, term for term:

* multi-class: softmax cross-entropy over ``len(classes_)`` outputs (softmax
  output, integer labels, bprop's fused kernel);
* binary: one sigmoid output trained with binary cross-entropy on the logit
  (``binary_cross_entropy_with_logits``), as scikit-learn's single logistic
  output; ``predict_proba`` returns the two columns (1 - p, p);
* multi-label (y a 2-D indicator matrix): one sigmoid output per label, the
  cross-entropies summed over the labels and averaged over the samples;
* regression: half the squared error, identity output, any number of outputs
  (the gradient is that of ``0.5 * sum over outputs of the sample mean``, as in
  scikit-learn; ``loss_curve_`` reports the mean over outputs, as scikit-learn);
* Poisson regression (``MLPRegressor(loss="poisson")``): half the Poisson
  deviance with a log link, ``y log(y / mu) - y + mu`` with ``mu = exp(output)``,
  summed over the outputs and averaged over the samples; ``predict`` returns
  ``mu`` (``out_activation_ == "exp"``). The loss is
  ``bprop.losses.poisson_deviance_log_link``, computed in NumPy (the other
  losses run in the core's fused kernels). y must be >= 0 and, for ``fit``,
  have a positive sum (the checks and messages of scikit-learn's Poisson
  forests; its MLPRegressor checks nothing).

``class_weight`` (MLPClassifier; None, "balanced", a dict, or for multi-label
targets a list of dicts) becomes per-sample weights as
``sklearn.utils.class_weight.compute_sample_weight`` computes them over the y of
the call, multiplying ``sample_weight``; the loss, the L2 term's n_b and early
stopping's validation score see the product. ``partial_fit`` refuses
"balanced" (as SGDClassifier does) and maps a dict over ``classes_``.

``coefs_`` and ``intercepts_`` are the network's weights, as in scikit-learn:
each is a list of views of the Dense layers' storage, and assigning the list
(``est.coefs_ = [...]``) or an item (``est.coefs_[0] = W``) copies the arrays
into the network (shapes checked; all or nothing), so that ``predict``,
``partial_fit`` and a warm-start ``fit`` use them.

``alpha`` is an explicit L2 term on the weights only (not the intercepts), as
scikit-learn defines it: each minibatch adds ``0.5 * alpha * ||W||^2 / n_b`` to
the loss and ``alpha * W / n_b`` to dL/dW, where n_b is the minibatch size (the
sum of its sample weights when ``sample_weight`` is given). Each minibatch is
one call of the core (forward, loss, L2 term, backward sweep and the optimizer's
update; see ``Objective`` in cpp/include/bprop/network.hpp), so nothing on the
per-step path runs in NumPy; the optimizers' own ``weight_decay`` stays 0.

Dropout and batch normalisation (extras, off by default): ``dropout=p`` and
``batch_norm=True`` make each hidden layer a block
``Dense -> BatchNorm -> Activation -> Dropout(p)`` (with ``batch_norm``) or
``Dense(activation) -> Dropout(p)``; without them (p = 0, the default) the network
is the plain Dense stack, drawn and trained bit for bit as before. ``coefs_`` and
``intercepts_`` stay the Dense layers' weights and biases (``alpha`` applies to
those weights only). ``fit`` and ``partial_fit`` train in training mode (Dropout
drops, BatchNorm normalises with the minibatch's statistics and updates its
running ones); ``predict``, ``predict_proba``, ``score`` and early stopping's
validation score run in eval mode, deterministically. Early stopping keeps the
running statistics of the best epoch with its weights. The dropout masks are
keyed by a seed drawn from ``random_state`` (after the initial weights), so a
seeded fit is reproducible bit for bit; pickles carry the masks' key and clock.
With ``batch_norm``:

* the statistics count rows, not sample weights (as in PyTorch), and a
  minibatch of one row (the last of an epoch when n_samples % batch_size == 1)
  makes no update: one row has no batch variance (its loss, in eval mode,
  still counts in ``loss_curve_``); fewer than 2 training samples raise;
* ``solver="lbfgs"`` minimises the training-mode objective over the whole
  dataset, deterministic since its statistics are the full batch's; at the end
  the running statistics are set to the full batch's at the solution.

``solver="lbfgs"`` refuses ``dropout > 0`` (ValueError): every evaluation would
draw new masks, and L-BFGS's line search needs one deterministic objective.
A warm start or ``partial_fit`` refuses a network built with other
``dropout``/``batch_norm`` (refit with ``warm_start=False``).

Differences from scikit-learn, all by design:

* ``dtype``: float64 unless X arrives as float32 (scikit-learn's rule), or
  forced with ``dtype="float32"`` / ``"float64"``.
* ``solver="adam"`` uses ``bprop.optim.Adam``, whose epsilon sits outside the
  bias correction of the second moment (torch's form): the same update up to a
  factor ``sqrt(1 - beta_2**t)`` on epsilon. ``solver="sgd"`` uses
  ``bprop.optim.SGD`` with momentum in torch's form, equal to scikit-learn's
  velocity form for a constant learning rate. ``solver="rmsprop"`` (extra)
  uses ``bprop.optim.RMSprop`` with ``learning_rate_init`` and ``epsilon``.
* ``activation`` also accepts bprop's names ("sigmoid", "leaky_relu", "gelu",
  "elu", "selu", "silu", "softplus"), which scikit-learn does not have.
* ``sample_weight`` must be non-negative; a minibatch whose weights are all 0
  is skipped.
* A fit whose loss becomes NaN or inf (or that leaves NaN or inf in the
  weights) raises scikit-learn's ``ValueError`` ("Solver produced non-finite
  parameter weights. ..."), followed by where and when, and leaves the weights
  as they were before the call. With ``early_stopping=True`` it does not raise,
  as in scikit-learn: the diverged epoch records its non-finite loss and a NaN
  validation score, the best epoch's weights are kept, and a
  ``ConvergenceWarning`` says so; unlike scikit-learn, which runs on to
  ``max_iter`` with NaN weights, the fit stops at that epoch.

Sparse X (``scipy.sparse``; scikit-learn's ``{array-like, sparse matrix}``) is
taken by every method that takes X (``fit``, ``partial_fit``, ``predict``,
``predict_proba``, ``predict_log_proba``, ``score``) and never densified, as in
a ``TfidfVectorizer`` pipeline::

    clf = make_pipeline(TfidfVectorizer(), MLPClassifier(hidden_layer_sizes=(64,)))
    clf.fit(documents, labels)

A CSR matrix or array (``csr_matrix``, ``csr_array``; int32 or int64 indices)
goes to the core as it is: the first Dense layer's z = X W + b is a sparse x
dense product (see the README's "Sparse input"). Another format (CSC, COO, DOK,
LIL, BSR, ...) is converted to CSR once per call, by scikit-learn's
``check_array``, which copies the stored values and indices (O(nnz)); so is
another dtype, by the dense rule (float32 and float64 kept, integers and bools
made float64; the network's dtype once fitted). A matrix with unsorted or
duplicate column indices is put in canonical form in a copy (duplicates summed,
as ``X @ W`` sums them); the caller's matrix is never changed. A non-finite
stored value is refused (ValueError: scikit-learn's "Input X contains NaN." or
"infinity.", then the call and the value's row and column), as are a column
index out of range or a malformed ``indptr`` (a hand-built matrix), complex
values and shapes other than 2-D; a failed ``fit`` or ``partial_fit`` leaves
the estimator as it was. Shuffling, minibatches, the early-stopping split,
``sample_weight`` and ``class_weight`` select rows of the CSR matrix by index
(scipy's row indexing), so a sparse fit is the fit on ``X.toarray()``: the same
weights and predictions to float64 rounding (tests/test_sklearn_sparse.py; but
for the bias of a Dense layer before a BatchNorm, whose gradient is 0 up to
rounding, so that Adam's normalised steps follow the rounding). The estimators'
tags say so (``input_tags.sparse``).

Early stopping's validation split is scikit-learn's: ``train_test_split`` with
the same random draws, stratified only for a one-output classifier (binary), so
that a class with a single sample raises scikit-learn's error there (multi-class
and multi-label splits are not stratified).

Initial weights are drawn as scikit-learn draws them (uniform in
``+-sqrt(6 / (fan_in + fan_out))``, 2 instead of 6 for logistic units, the
intercepts too) from ``random_state``, which also drives the shuffling and the
validation split.

Needs scikit-learn >= 1.6 (``pip install 'bprop[sklearn]'`` or
``pip install scikit-learn``).
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from numbers import Integral, Real
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

try:
    import scipy.optimize
    from scipy.special import expit
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, is_classifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_random_state, column_or_1d
    from sklearn.utils._param_validation import Interval, Options, StrOptions
    from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("bprop.sklearn needs scikit-learn >= 1.6 (and SciPy): "
                      f"pip install 'scikit-learn>=1.6' ({exc})") from exc

from . import optim
from ._loop import Loop, _csr_arrays
from ._validation import check_csr_structure, csr_is_canonical, is_sparse
from .activations import SKLEARN_NAMES
from .layers import Activation, BatchNorm, Dense, Dropout, Layer, layer_from_description, walk
from .losses import poisson_deviance_log_link
from .network import Network, _step_function

__all__ = ["MLPClassifier", "MLPRegressor"]

#: scikit-learn's activation names (and bprop's) -> bprop's, from the registry.
_ACTIVATIONS = SKLEARN_NAMES
_STOCHASTIC_SOLVERS = ("adam", "sgd", "rmsprop")
_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
#: scikit-learn's message for a fit that diverged; bprop's messages start with it.
_NON_FINITE = ("Solver produced non-finite parameter weights. The input data may contain "
               "large values and need to be preprocessed.")


class _Diverged(Exception):
    """A minibatch's loss was NaN or inf (early stopping ends the fit there)."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(epoch, value)
        self.epoch, self.value = epoch, value


def _dense_layers(net: Network) -> List[Dense]:
    """The Dense layers, in order: the layers of scikit-learn's MLP (coefs_,
    intercepts_); BatchNorm, Activation and Dropout sit between them."""
    return [layer for _, _, layer in walk(net.layers) if isinstance(layer, Dense)]


def _has_batch_norm(net: Network) -> bool:
    return any(isinstance(layer, BatchNorm) for _, _, layer in walk(net.layers))


def _hidden_activation(net: Network) -> Optional[str]:
    """The activation of the hidden layers (None without hidden layers): an
    Activation layer's (after a BatchNorm), else the first Dense layer's."""
    for _, _, layer in walk(net.layers):
        if isinstance(layer, Activation):
            return layer.activation
    dense = _dense_layers(net)
    return dense[0].activation if len(dense) > 1 else None


def _state_arrays(net: Network) -> List[np.ndarray]:
    """Views of what training changes and a snapshot must restore: the
    parameters, then the buffers (BatchNorm's running statistics)."""
    return [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()]


def _set_full_batch_statistics(net: Network, X: Any) -> None:
    """Sets each BatchNorm's running_mean and running_var (unbiased, as the
    momentum updates keep it) to the statistics of its input over all of X (one
    forward pass in training mode; X as the core takes it, an array or the CSR
    arrays)."""
    net._core.forward(X)
    for _, _, layer in walk(net.layers):
        if isinstance(layer, BatchNorm):
            inputs = layer.input
            layer.running_mean = inputs.mean(axis=0, dtype=np.float64)
            layer.running_var = inputs.var(axis=0, ddof=1, dtype=np.float64)


def _check_sparse_kind(where: str, X: Any) -> None:
    """What scikit-learn's check_array would refuse in a sparse X with a
    message not naming the call (or printing the whole matrix): a shape other
    than 2-D, complex or non-numeric values."""
    if len(X.shape) != 2:
        hint = "; use X.reshape(1, -1) for a single sample" if len(X.shape) == 1 else ""
        raise ValueError(f"{where} X must be 2-D (samples, features), but the sparse X has "
                         f"shape {X.shape}{hint}")
    kind = X.dtype.kind
    if kind == "c":  # scikit-learn's words first, as for a dense X
        raise ValueError(f"Complex data not supported. {where} X must hold real numbers, "
                         f"but the sparse X has dtype {X.dtype}")
    if kind not in "biuf":
        raise TypeError(f"{where} X must hold real numbers (integer, floating or bool), but "
                        f"the sparse X has dtype {X.dtype}")


def _checked_sparse(where: str, X: Any) -> Any:
    """A sparse X as validate_data left it (CSR of the network's dtype) made ready
    for the core: its arrays checked (a hand-built matrix), put in canonical form
    if it is not (a copy; duplicates summed, as X @ W sums them, and indices
    sorted: scikit-learn takes such a matrix), and its stored values finite.
    Never densified; O(nnz)."""
    check_csr_structure(where[1:-1], "X", X)
    if not csr_is_canonical(X):
        X = X.copy()  # the copy's flags are computed afresh, never stale
        X.sum_duplicates()
    finite = np.isfinite(X.data[:X.indptr[-1]])  # the values its rows hold
    if not finite.all():
        k = int(np.argmin(finite))
        i = int(np.searchsorted(X.indptr, k, side="right")) - 1
        value = X.data[k]
        raise ValueError(
            f"Input X contains {'NaN' if np.isnan(value) else 'infinity'}. {where} X must "
            f"hold values finite in {X.dtype.name} (the network's dtype), but the sparse X's "
            f"stored value X[{i}, {int(X.indices[k])}] is {value} in {X.dtype.name}")
    return X


class _LayerArrays(list):
    """``coefs_`` or ``intercepts_``: the Dense layers' weight (or bias) views,
    one per layer. Assigning an item (``est.coefs_[0] = W``, slices too) copies
    the array into the network, as assigning into scikit-learn's list changes
    its model; the shape must be the layer's. The list cannot grow, shrink or be
    reordered (the network's layers are fixed). A copy or pickle of the list
    alone is a plain list of arrays, detached from the network."""

    def __init__(self, views: List[np.ndarray], name: str, where: str) -> None:
        super().__init__(views)
        self._name = name
        self._where = where

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            positions = list(range(len(self)))[index]
            values = list(value)
            if len(values) != len(positions):
                raise ValueError(
                    f"{self._where} {self._name}[{index.start}:{index.stop}:{index.step}] "
                    f"holds {len(positions)} arrays, but {len(values)} were assigned; the "
                    "list has one array per layer")
        else:
            i = operator.index(index)
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"{self._where} {self._name} index {i} out of range for "
                                 f"{n} layers")
            positions, values = [i % n], [value]
        checked = [_check_layer_array(self._where, f"{self._name}[{i}]",
                                      list.__getitem__(self, i), v)
                   for i, v in zip(positions, values)]
        for i, array in zip(positions, checked):  # all checked first: all or nothing
            np.copyto(list.__getitem__(self, i), array, casting="unsafe")

    def _fixed(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(f"{self._where} {self._name} holds one array per layer "
                         f"({len(self)}); it cannot be resized or reordered. Assign arrays "
                         "of the layers' shapes into it, or refit with other "
                         "hidden_layer_sizes")

    append = extend = insert = pop = remove = clear = sort = reverse = _fixed  # type: ignore
    __delitem__ = __iadd__ = __imul__ = _fixed  # type: ignore

    def __reduce__(self) -> Any:
        return (list, (list(self),))


def _check_layer_array(where: str, name: str, view: np.ndarray, value: Any) -> np.ndarray:
    """value as an array of view's shape (a real array; cast to view's dtype on copy)."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"{where} {name} must be an array of shape {view.shape}, but got a "
                         f"ragged {type(value).__name__}") from exc
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{where} {name} must hold real numbers, but got dtype {array.dtype}")
    if array.shape != view.shape:
        raise ValueError(f"{where} {name} must have shape {view.shape} (the layer's), but "
                         f"got shape {array.shape}")
    return array


def _numpy_objective(net: Network, loss_fn: Any, loss_scale: float,
                     grad_scale: float) -> Any:
    """scikit-learn's objective with a loss computed in NumPy (poisson):
    ``evaluate(X, y, sample_weight, l2) -> value`` runs forward, the loss, the L2
    term ``0.5 * l2 * sum ||W||^2`` over the Dense weights, and the backward
    sweep, leaving dL/dparams in the gradient views (nothing is updated)."""
    core, dtype = net._core, net.dtype
    dense = _dense_layers(net)
    weights: List[np.ndarray] = [layer.weight for layer in dense]  # type: ignore[misc]
    grads: List[np.ndarray] = [layer.grad_weight for layer in dense]  # type: ignore[misc]

    def evaluate(X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray],
                 l2: float) -> float:
        value, grad = loss_fn(core.forward(X), y, sample_weight)
        if grad_scale != 1.0:
            grad *= grad_scale
        core.backward(np.ascontiguousarray(grad, dtype=dtype), False, False)
        penalty = 0.0
        if l2 != 0.0:
            for W, gW in zip(weights, grads):
                flat = W.reshape(-1)
                # sum of squares accumulated in float64, as the core's weight_squares;
                # einsum (not optimized) runs NumPy's own loop, never its BLAS (issue 11)
                penalty += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
                gW += l2 * W  # d/dW of 0.5 * l2 * ||W||^2
        return loss_scale * value + 0.5 * l2 * penalty
    return evaluate


class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: parameters, the network, the
    training loops (stochastic and L-BFGS), pickling."""

    # fitted state (declared for type checkers; set by fit)
    _net: Network
    _optimizer: Optional[optim.Optimizer]

    _parameter_constraints: Dict[str, List[Any]] = {
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(_ACTIVATIONS))],
        "solver": [StrOptions({"lbfgs", "sgd", "adam", "rmsprop"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "power_t": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "momentum": [Interval(Real, 0, 1, closed="both")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "beta_1": [Interval(Real, 0, 1, closed="left")],
        "beta_2": [Interval(Real, 0, 1, closed="left")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"),
                             Options(Real, {np.inf})],
        "max_fun": [Interval(Integral, 1, None, closed="left")],
        "dtype": [StrOptions(set(_DTYPES)), None],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "batch_norm": ["boolean"],
    }

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *,
                 solver: str = "adam", alpha: float = 0.0001, batch_size: Any = "auto",
                 learning_rate: str = "constant", learning_rate_init: float = 0.001,
                 power_t: float = 0.5, max_iter: int = 200, shuffle: bool = True,
                 random_state: Any = None, tol: float = 1e-4, verbose: bool = False,
                 warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: Any = 10, max_fun: int = 15000,
                 dtype: Optional[str] = None, dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype
        self.dropout = dropout
        self.batch_norm = batch_norm

    # ---- what the subclasses provide ------------------------------------------------
    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool,
                        dtype: Any) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _targets(self, y: np.ndarray, dtype: np.dtype) -> Tuple[np.ndarray, int]:
        """The training target in the form the loss kernel takes, and the width
        of the output layer."""
        raise NotImplementedError

    def _loss_name(self) -> str:
        """The core's built-in loss, or "poisson" (computed in NumPy)."""
        raise NotImplementedError

    def _class_sample_weight(self, y: np.ndarray, incremental: bool,
                             where: str) -> Optional[np.ndarray]:
        """Per-sample weights from class_weight (float64, (n_samples,)), or None."""
        return None

    def _loss_scales(self, n_outputs: int) -> Tuple[float, float]:
        """(loss scale, gradient scale): scikit-learn's loss = loss scale * bprop's
        loss; its gradient = gradient scale * bprop's gradient."""
        raise NotImplementedError

    def _predict_with(self, net: Network, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _score(self, net: Network, X: np.ndarray, y: Any,
               sample_weight: Optional[np.ndarray]) -> float:
        raise NotImplementedError

    # ---- helpers ----------------------------------------------------------------------
    def _where(self, method: str) -> str:
        return f"[{type(self).__name__}.{method}]"

    def _hidden_sizes(self) -> List[int]:
        sizes = self.hidden_layer_sizes
        if not hasattr(sizes, "__iter__"):
            sizes = [sizes]
        sizes = list(sizes)
        if any(not isinstance(s, (Integral, np.integer)) or isinstance(s, bool) for s in sizes):
            raise ValueError(f"hidden_layer_sizes must hold positive integers, got {sizes}.")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {sizes}.")
        return [int(s) for s in sizes]

    def _input_dtype(self, first_pass: bool) -> Any:
        """What validate_data converts X to: the network's dtype once there is a
        network, the forced dtype, or scikit-learn's rule (keep float32 and
        float64, make anything else float64)."""
        if not first_pass:
            return self._net.dtype
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return (np.float64, np.float32)

    def _check_solver(self) -> bool:
        if self.solver not in _STOCHASTIC_SOLVERS:
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                                 f"{self.solver} is not stochastic.")
        return True

    def _layers(self, layer_units: List[int]) -> List[Layer]:
        """The layers for these widths: per hidden layer Dense(activation) ->
        [Dropout], or with batch_norm Dense -> BatchNorm -> Activation ->
        [Dropout] (Dropout only when dropout > 0); then the output Dense."""
        hidden = _ACTIVATIONS[self.activation]
        p = float(self.dropout)
        layers: List[Layer] = []
        for fan_in, fan_out in zip(layer_units[:-2], layer_units[1:-1]):
            if self.batch_norm:
                layers += [Dense(fan_in, fan_out), BatchNorm(fan_out), Activation(hidden)]
            else:
                layers.append(Dense(fan_in, fan_out, activation=hidden))
            if p > 0:
                layers.append(Dropout(p))
        layers.append(Dense(layer_units[-2], layer_units[-1]))
        return layers

    def _build_network(self, layer_units: List[int], dtype: np.dtype,
                       random_state: np.random.RandomState) -> Network:
        """A network with scikit-learn's initial weights, drawn from random_state
        (BatchNorm: weight 1, bias 0, running_var 1; the key of the dropout masks
        drawn from random_state after the weights, only when there is dropout, so
        that the draws of a network without it are those of scikit-learn)."""
        hidden = _ACTIVATIONS[self.activation]
        net = Network._zeros(self._layers(layer_units), dtype=dtype)  # set below
        factor = 2.0 if hidden == "sigmoid" else 6.0
        for layer in _dense_layers(net):
            bound = math.sqrt(factor / (layer.in_features + layer.out_features))
            layer.weight = random_state.uniform(-bound, bound,
                                                (layer.in_features, layer.out_features))
            layer.bias = random_state.uniform(-bound, bound, layer.out_features)
        for _, _, layer in walk(net.layers):
            if isinstance(layer, BatchNorm):
                layer.weight[...] = 1
                layer.running_var[...] = 1
        if any(isinstance(layer, Dropout) for _, _, layer in walk(net.layers)):
            net._core.dropout_seed = int(random_state.randint(0, 2**63, dtype=np.int64))
        return net

    def _check_layer_params(self, where: str) -> None:
        """What _parameter_constraints cannot say about dropout and batch_norm."""
        if isinstance(self.dropout, (bool, np.bool_)):
            raise TypeError(f"{where} dropout must be a float in [0, 1), but got "
                            f"bool {self.dropout!r}")
        if self.solver == "lbfgs" and self.dropout > 0:
            raise ValueError(
                f"{where} solver='lbfgs' needs a deterministic objective, but dropout="
                f"{self.dropout} draws new masks at every evaluation of the loss (L-BFGS's "
                "line search would compare losses of different networks); use dropout=0.0 "
                "with lbfgs, or solver='adam', 'sgd' or 'rmsprop' with dropout")

    def _check_batch_rows(self, where: str, n_samples: int) -> None:
        if self.batch_norm and n_samples < 2:
            raise ValueError(f"{where} batch_norm=True needs at least 2 training samples (the "
                             f"batch statistics of one row are undefined), but got "
                             f"{n_samples} sample{'' if n_samples == 1 else 's'}")

    def _check_warm_network(self, where: str, net: Network, hidden: List[int],
                            layer_units: List[int]) -> None:
        """Refuses to warm-start (or partial_fit) a network that the current
        parameters would not build."""
        again = "refit with warm_start=False to start a new network"
        expected = [L.in_features for L in _dense_layers(net)] + [net.out_features]
        if layer_units != expected:
            raise ValueError(
                f"{where} the network has layer sizes {expected}, but hidden_layer_sizes="
                f"{hidden} and the data ask for {layer_units}; {again}")
        built = _hidden_activation(net)
        if built is not None and built != _ACTIVATIONS[self.activation]:
            raise ValueError(f"{where} the network was built with activation={built!r}, but "
                             f"activation={self.activation!r}; {again}")
        wanted = [L._description() for L in self._layers(layer_units)]
        if wanted != [L._description() for L in net.layers]:
            p = next((L.p for _, _, L in walk(net.layers) if isinstance(L, Dropout)), 0.0)
            raise ValueError(
                f"{where} the network was built with dropout={p} and batch_norm="
                f"{_has_batch_norm(net)}, but dropout={self.dropout} and batch_norm="
                f"{self.batch_norm}; {again}")

    def _make_optimizer(self, net: Network) -> optim.Optimizer:
        lr = float(self.learning_rate_init)
        if self.solver == "sgd":
            momentum = float(self.momentum)
            return optim.SGD(net, lr=lr, momentum=momentum,
                             nesterov=bool(self.nesterovs_momentum) and momentum > 0)
        if self.solver == "rmsprop":
            return optim.RMSprop(net, lr=lr, eps=float(self.epsilon))
        return optim.Adam(net, lr=lr, betas=(float(self.beta_1), float(self.beta_2)),
                          eps=float(self.epsilon))

    # coefs_ and intercepts_ are the Dense layers' own weight and bias views: reading
    # them reads the network, assigning them (the list or an item) writes into it.
    def _layer_arrays(self, name: str) -> _LayerArrays:
        if "_net" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}' "
                                 "(not fitted yet)")
        attr = "weight" if name == "coefs_" else "bias"
        return _LayerArrays([getattr(layer, attr) for layer in _dense_layers(self._net)],
                            name, self._where(name))

    def _assign_layer_arrays(self, name: str, values: Any) -> None:
        where = self._where(name)
        if "_net" not in self.__dict__:
            raise AttributeError(f"{where} {name} can be assigned only after fit: the layer "
                                 "sizes come from the data (fit or partial_fit first, then "
                                 "assign the weights)")
        current = self._layer_arrays(name)
        if isinstance(values, np.ndarray) or not hasattr(values, "__len__"):
            raise TypeError(f"{where} {name} must be a list of {len(current)} arrays (one per "
                            f"layer), but got {type(values).__name__}")
        values = list(values)
        if len(values) != len(current):
            shapes = [a.shape for a in current]
            raise ValueError(f"{where} {name} must hold {len(current)} arrays (one per layer, "
                             f"shapes {shapes}), but got {len(values)}")
        current[:] = values

    @property
    def coefs_(self) -> List[np.ndarray]:
        return self._layer_arrays("coefs_")

    @coefs_.setter
    def coefs_(self, values: Any) -> None:
        self._assign_layer_arrays("coefs_", values)

    @property
    def intercepts_(self) -> List[np.ndarray]:
        return self._layer_arrays("intercepts_")

    @intercepts_.setter
    def intercepts_(self, values: Any) -> None:
        self._assign_layer_arrays("intercepts_", values)

    def _validate_data(self, where: str, X: Any, *y: Any, **check_params: Any) -> Any:
        """scikit-learn's validate_data, taking sparse X as scikit-learn's MLP does:
        a CSR matrix or array is kept (other formats become CSR once, in
        check_array: a copy of the stored values and indices), cast to the dtype
        asked for, then made ready for the core by _checked_sparse (which also
        refuses non-finite stored values, saying where). Never densified."""
        sparse = is_sparse(X)
        if not sparse:
            return validate_data(self, X, *y, **check_params)
        _check_sparse_kind(where, X)
        # a value too large for float32 becomes inf here, refused by _checked_sparse
        with np.errstate(over="ignore"):
            out = validate_data(self, X, *y, accept_sparse="csr", ensure_all_finite=False,
                                **check_params)
        if y:
            return _checked_sparse(where, out[0]), out[1]
        return _checked_sparse(where, out)

    @contextlib.contextmanager
    def _unchanged_on_failure(self) -> Any:
        """A failed fit or partial_fit leaves the estimator as it was: what its
        checks set before the failure (n_features_in_, feature_names_in_, classes_,
        ...) is put back; _fit restores the network's arrays itself."""
        saved = dict(self.__dict__)
        try:
            yield
        except Exception:  # not Ctrl-C: the network keeps the steps it made, and so do we
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _validate_predict_input(self, X: Any, method: str) -> Any:
        check_is_fitted(self)
        return self._validate_data(self._where(method), X, reset=False, dtype=self._net.dtype,
                                   order="C")

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_net")

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # scipy.sparse X, as scikit-learn's MLP
        return tags

    # ---- fit --------------------------------------------------------------------------
    def _fit(self, X: Any, y: Any, sample_weight: Any = None,
             incremental: bool = False) -> "_BaseMLP":
        where = self._where("partial_fit" if incremental else "fit")
        hidden = self._hidden_sizes()
        self._check_layer_params(where)
        first_pass = not hasattr(self, "_net") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass,
                                    dtype=self._input_dtype(first_pass))
        dtype = X.dtype if first_pass else self._net.dtype
        if not is_sparse(X):  # a sparse X is CSR of the dtype already (_validate_data)
            X = np.ascontiguousarray(X, dtype=dtype)
        class_weight = self._class_sample_weight(y, incremental, where)
        if class_weight is not None:  # multiplies the user's weights, in float64
            if sample_weight is not None:
                class_weight = class_weight * _check_sample_weight(
                    sample_weight, X, dtype=np.float64, ensure_non_negative=True)
            sample_weight = class_weight
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=dtype,
                                                 ensure_non_negative=True)
            sample_weight = np.ascontiguousarray(sample_weight, dtype=dtype)
        target, n_outputs = self._targets(y, dtype)
        layer_units = [X.shape[1], *hidden, n_outputs]
        self._check_batch_rows(where, X.shape[0])
        random_state = check_random_state(self.random_state)

        if first_pass:
            net = self._build_network(layer_units, dtype, random_state)
            state: Dict[str, Any] = {"n_iter_": 0, "t_": 0, "n_outputs_": n_outputs,
                                     "n_layers_": len(layer_units), "_optimizer": None,
                                     "_no_improvement_count": 0}
            state["_best_params"] = [a.copy() for a in _state_arrays(net)]
            snapshot = None
        else:
            net = self._net
            self._check_warm_network(where, net, hidden, layer_units)
            state = {k: getattr(self, k) for k in (
                "n_iter_", "t_", "n_outputs_", "n_layers_", "_optimizer",
                "_no_improvement_count", "_best_params") if hasattr(self, k)}
            for k in ("loss_curve_", "validation_scores_"):
                if getattr(self, k, None) is not None:
                    state[k] = list(getattr(self, k))
            for k in ("best_loss_", "best_validation_score_"):
                if hasattr(self, k):
                    state[k] = getattr(self, k)
            state.setdefault("_best_params", [a.copy() for a in _state_arrays(net)])
            snapshot = ([a.copy() for a in _state_arrays(net)], net.dropout_step)
        if self.solver in _STOCHASTIC_SOLVERS:
            # the records of the stopping rule (kept across warm starts, as scikit-learn
            # does; started when there are none, e.g. after an lbfgs fit)
            state.setdefault("loss_curve_", [])
            if self.early_stopping:
                if state.get("validation_scores_") is None:
                    state.update(validation_scores_=[], best_validation_score_=-np.inf)
                state["best_loss_"] = None
            else:
                if state.get("best_loss_") is None:
                    state["best_loss_"] = np.inf
                state.update(validation_scores_=None, best_validation_score_=None)

        was_training = net.training
        try:
            # training mode (Dropout drops, BatchNorm uses the batch's statistics);
            # predict and the validation scores run in eval mode
            net._core.training = True
            if self.solver in _STOCHASTIC_SOLVERS:
                self._fit_stochastic(net, state, X, target, y, sample_weight, incremental,
                                     random_state)
            else:
                self._fit_lbfgs(net, state, X, target, sample_weight)
            if not all(np.isfinite(a).all() for a in _state_arrays(net)):
                raise ValueError(_NON_FINITE + f" {where} the fit left NaN or inf in the "
                                 "network's parameters; the weights were left as they were "
                                 "before this call. Preprocess the data (e.g. StandardScaler), "
                                 "or lower learning_rate_init.")
        except BaseException:
            if snapshot is not None:
                arrays, dropout_step = snapshot
                for a, saved in zip(_state_arrays(net), arrays):
                    np.copyto(a, saved)
                net._core.dropout_step = dropout_step
            raise
        finally:
            net._core.training = was_training
        # Everything succeeded: commit.
        for k, v in state.items():
            setattr(self, k, v)
        self._net = net
        self.out_activation_ = self._out_activation()
        return self

    def _fit_stochastic(self, net: Network, state: Dict[str, Any], X: Any,
                        target: np.ndarray, y_original: np.ndarray,
                        sample_weight: Optional[np.ndarray], incremental: bool,
                        random_state: np.random.RandomState) -> None:
        where = self._where("partial_fit" if incremental else "fit")
        optimizer = state.get("_optimizer")
        if not incremental or optimizer is None or optimizer._net_ref() is not net:
            optimizer = self._make_optimizer(net)
        state["_optimizer"] = optimizer
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")

        X_val = y_val = w_val = None
        if self.early_stopping:
            X, target, sample_weight, X_val, y_val, w_val = self._validation_split(
                X, target, y_original, sample_weight, random_state, net.out_features, where)
            self._check_batch_rows(where, X.shape[0])
        n = X.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                              "going to be clipped", UserWarning, stacklevel=4)
            batch_size = int(np.clip(self.batch_size, 1, n))

        # forward, scikit-learn's objective, backward and the update: one call of the
        # core per minibatch (a non-finite objective updates nothing)
        objective = (*self._loss_scales(net.out_features), float(self.alpha))
        if self._loss_name() == "poisson":
            step = self._numpy_step(net, optimizer, objective)
        else:
            step = _step_function(net, self._loss_name(), optimizer, objective=objective)
        if _has_batch_norm(net):
            step = self._skip_single_rows(net, step, objective)

        def diverged(epoch: int, batch: int, value: float) -> None:
            if self.early_stopping:  # as scikit-learn: the fit ends with the best weights
                raise _Diverged(epoch, value)
            raise ValueError(
                f"{_NON_FINITE} {where} training diverged in epoch {epoch + 1}: the loss is "
                f"{value}; the weights were left as they were before this call. Preprocess "
                "the data (e.g. StandardScaler), or lower learning_rate_init "
                f"(={self.learning_rate_init}).")

        loop = Loop(X, target, sample_weight, batch_size, step, diverged, mean_over_rows=True)
        params = _state_arrays(net)  # early stopping keeps the best weights and buffers
        best_params = state["_best_params"]
        tol = float(self.tol)
        lr_init = float(self.learning_rate_init)
        sgd = self.solver == "sgd"

        state["n_iter_"] = 0
        order = np.arange(n)
        for epoch in range(self.max_iter):
            if self.shuffle:
                # each epoch reshuffles the last order, drawing as sklearn.utils.shuffle
                order = order[random_state.permutation(n)]
            try:
                accumulated, counted = loop.epoch(epoch, order if self.shuffle else None)
            except _Diverged as exc:
                self._end_diverged(state, exc, n, where)
                break
            state["n_iter_"] += 1
            loss = accumulated / counted if counted else 0.0
            state["loss_"] = loss
            state["t_"] += n
            state["loss_curve_"].append(loss)
            if self.verbose:
                print(f"Iteration {state['n_iter_']}, loss = {loss:.8f}")

            # scikit-learn's rule: no improvement by tol, of the validation score
            # (early stopping) or of the training loss
            if self.early_stopping:
                assert X_val is not None
                score = self._score(net, X_val, y_val, w_val)
                state["validation_scores_"].append(score)
                if self.verbose:
                    print(f"Validation score: {score:f}")
                if score < state["best_validation_score_"] + tol:
                    state["_no_improvement_count"] += 1
                else:
                    state["_no_improvement_count"] = 0
                if score > state["best_validation_score_"]:
                    state["best_validation_score_"] = score
                    for dst, p in zip(best_params, params):
                        np.copyto(dst, p)
            else:
                if loss > state["best_loss_"] - tol:
                    state["_no_improvement_count"] += 1
                else:
                    state["_no_improvement_count"] = 0
                if loss < state["best_loss_"]:
                    state["best_loss_"] = loss

            if sgd and self.learning_rate == "invscaling":
                optimizer.lr = lr_init / (state["t_"] + 1) ** float(self.power_t)

            if state["_no_improvement_count"] > self.n_iter_no_change:
                if self.early_stopping:
                    msg = (f"Validation score did not improve more than tol={tol:f} for "
                           f"{self.n_iter_no_change} consecutive epochs.")
                else:
                    msg = (f"Training loss did not improve more than tol={tol:f} for "
                           f"{self.n_iter_no_change} consecutive epochs.")
                if sgd and self.learning_rate == "adaptive" and optimizer.lr > 1e-6:
                    optimizer.lr = optimizer.lr / 5.0
                    state["_no_improvement_count"] = 0
                    if self.verbose:
                        print(f"{msg} Setting learning rate to {optimizer.lr:f}")
                else:
                    if self.verbose:
                        print(f"{msg} Stopping.")
                    break
            if incremental:
                break
            if state["n_iter_"] == self.max_iter:
                warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) "
                              "reached and the optimization hasn't converged yet.",
                              ConvergenceWarning, stacklevel=4)

        if self.early_stopping:
            for src, p in zip(best_params, params):
                np.copyto(p, src)

    def _end_diverged(self, state: Dict[str, Any], exc: _Diverged, n: int, where: str) -> None:
        """Early stopping's end of a fit whose loss became NaN or inf: as in
        scikit-learn, the fit ends without an error, the epoch's loss and a NaN
        validation score are recorded, and the best epoch's weights are kept (the
        initial ones if none was scored)."""
        state["n_iter_"] += 1
        state["t_"] += n
        state["loss_"] = exc.value
        state["loss_curve_"].append(exc.value)
        state["validation_scores_"].append(float("nan"))
        warnings.warn(f"{where} training diverged in epoch {exc.epoch + 1}: the loss is "
                      f"{exc.value}. Early stopping ends the fit and keeps the weights of the "
                      f"best epoch (validation score {state['best_validation_score_']}). "
                      "Preprocess the data (e.g. StandardScaler), or lower learning_rate_init "
                      f"(={self.learning_rate_init}).", ConvergenceWarning, stacklevel=5)

    def _numpy_step(self, net: Network, optimizer: optim.Optimizer,
                    objective: Tuple[float, float, float]) -> Any:
        """The minibatch step for a loss computed in NumPy (poisson): forward, the
        loss and L2 term, backward, then the optimizer's update (none when the
        objective is not finite)."""
        loss_scale, grad_scale, alpha = objective
        evaluate = _numpy_objective(net, poisson_deviance_log_link, loss_scale, grad_scale)

        def step(X: np.ndarray, y: np.ndarray, sample_weight: Optional[np.ndarray],
                 weight: float) -> float:
            value = evaluate(X, y, sample_weight, alpha / weight)
            if math.isfinite(value):
                optimizer.step()
            return value
        return step

    def _skip_single_rows(self, net: Network, step: Any,
                          objective: Tuple[float, float, float]) -> Any:
        """The step for a network with BatchNorm: a minibatch of one row (the last
        of an epoch when n_samples % batch_size == 1) has no batch variance, so it
        updates nothing; its loss, measured in eval mode, still counts in the
        epoch's mean (PyTorch would raise; its DataLoader's drop_last drops it)."""
        core, loss_name = net._core, self._loss_name()
        loss_scale, grad_scale, alpha = objective
        evaluate = (_numpy_objective(net, poisson_deviance_log_link, loss_scale, grad_scale)
                    if loss_name == "poisson" else None)

        def step_or_skip(X: Any, y: np.ndarray, sample_weight: Optional[np.ndarray],
                         weight: float) -> float:
            if y.shape[0] > 1:  # X may be a CSR minibatch's arrays: count y's rows
                return step(X, y, sample_weight, weight)
            core.training = False
            try:  # no optimizer and lr < 0: the loss (and gradients), no update
                if evaluate is not None:
                    return evaluate(X, y, sample_weight, alpha / weight)
                return core.train_step(X, y, loss_name, sample_weight, -1.0, None,
                                       loss_scale=loss_scale, grad_scale=grad_scale,
                                       l2=alpha / weight)
            finally:
                core.training = True
        return step_or_skip

    def _validation_split(self, X: Any, target: np.ndarray, y_original: np.ndarray,
                          sample_weight: Optional[np.ndarray],
                          random_state: np.random.RandomState, n_outputs: int,
                          where: str) -> Tuple[Any, ...]:
        """Holds out validation_fraction of the samples, as scikit-learn's
        _fit_stochastic does: stratified only for a classifier with one output
        unit (binary), by its 0/1 indicator column; multi-class, multi-label and
        regression splits are not stratified. A class too small to stratify
        raises scikit-learn's error."""
        arrays = [X, target, y_original] + ([] if sample_weight is None else [sample_weight])
        stratify = None
        if is_classifier(self) and n_outputs == 1:
            # scikit-learn's y there: the indicator column as bools
            stratify = self._label_binarizer.transform(y_original).astype(bool)
        try:
            parts = train_test_split(*arrays, random_state=random_state,
                                     test_size=self.validation_fraction, stratify=stratify)
        except ValueError as exc:
            if stratify is None:
                raise
            raise ValueError(f"{exc} ({where} early_stopping=True holds out a validation set "
                             "stratified by class for a binary problem, as scikit-learn does; "
                             "give each class more samples, or set early_stopping=False)"
                             ) from exc
        X_train, X_val, t_train, _, _, y_val = parts[:6]
        w_train = w_val = None
        if sample_weight is not None:
            w_train, w_val = parts[6], parts[7]
        if X_val.shape[0] < 2:
            raise ValueError("The validation set is too small. Increase 'validation_fraction' "
                             "or the size of your dataset.")
        if not is_sparse(X_train):  # CSR row indexing made X_train and X_val CSR
            X_train = np.ascontiguousarray(X_train)
        return (X_train, np.ascontiguousarray(t_train),
                None if w_train is None else np.ascontiguousarray(w_train),
                X_val, y_val, w_val)

    def _fit_lbfgs(self, net: Network, state: Dict[str, Any], X: Any,
                   target: np.ndarray, sample_weight: Optional[np.ndarray]) -> None:
        """Full-batch L-BFGS-B (SciPy) on scikit-learn's objective; the loss and
        its gradient come from one forward/backward sweep of the core.

        With BatchNorm the objective is that of training mode on the whole
        dataset (its statistics are the full batch's, so the objective is
        deterministic); the running statistics, which the line search's trial
        points would otherwise have moved, are set at the end to the full
        batch's statistics at the solution.

        X is a C-contiguous array, or a CSR matrix, passed to the core as its
        (data, indices, indptr, n_features) arrays (no copy)."""
        loss_name = self._loss_name()
        loss_scale, grad_scale = self._loss_scales(net.out_features)
        weight_sum = (float(X.shape[0]) if sample_weight is None
                      else float(sample_weight.sum(dtype=np.float64)))
        if is_sparse(X):
            X = _csr_arrays(X)
        decay = float(self.alpha) / weight_sum
        views = [(p, g) for _, p, g in net.parameters()]
        sizes = np.cumsum([0] + [p.size for p, _ in views])
        packed_grad = np.empty(int(sizes[-1]))
        evaluate = (_numpy_objective(net, poisson_deviance_log_link, loss_scale, grad_scale)
                    if loss_name == "poisson" else None)

        def loss_and_grad(theta: np.ndarray) -> Tuple[float, np.ndarray]:
            for (p, _), lo, hi in zip(views, sizes[:-1], sizes[1:]):
                p[...] = theta[lo:hi].reshape(p.shape)
            # forward, the objective and backward in one call of the core, which
            # leaves the gradients in the views (no optimizer: nothing is updated)
            if evaluate is not None:
                value = evaluate(X, target, sample_weight, decay)
            else:
                value = net._core.train_step(X, target, loss_name, sample_weight, -1.0, None,
                                             loss_scale=loss_scale, grad_scale=grad_scale,
                                             l2=decay)
            if not math.isfinite(value):
                return math.inf, np.zeros_like(theta)
            for (_, g), lo, hi in zip(views, sizes[:-1], sizes[1:]):
                packed_grad[lo:hi] = g.reshape(-1)
            return value, packed_grad.copy()

        theta0 = np.concatenate([p.reshape(-1) for p, _ in views]).astype(np.float64)
        result = scipy.optimize.minimize(
            loss_and_grad, theta0, method="L-BFGS-B", jac=True,
            options={"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol})
        if result.status != 0:
            message = result.message
            if isinstance(message, bytes):
                message = message.decode("latin1")
            warnings.warn(f"lbfgs failed to converge after {result.nit} iteration(s) "
                          f"(status={result.status}): {message}. Increase the number of "
                          "iterations (max_iter) or the number of function evaluations "
                          "(max_fun), or scale the data.", ConvergenceWarning, stacklevel=4)
        for (p, _), lo, hi in zip(views, sizes[:-1], sizes[1:]):
            p[...] = result.x[lo:hi].reshape(p.shape)
        if not all(np.isfinite(p).all() for p, _ in views):
            raise ValueError(_NON_FINITE + f" {self._where('fit')} L-BFGS left NaN or inf in "
                             "the network's parameters; the weights were left as they were "
                             "before this call.")
        if _has_batch_norm(net):
            _set_full_batch_statistics(net, X)
        state["n_iter_"] = min(int(result.nit), int(self.max_iter))
        state["loss_"] = float(result.fun)

    # ---- pickling: the network lives in C++; pickle its description and weights ------
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(super().__getstate__())
        net = state.pop("_net", None)
        optimizer = state.pop("_optimizer", None)
        if net is not None:
            state["_net_layers"] = [layer._description() for layer in net.layers]
            state["_net_dtype"] = net.dtype.name
            state["_net_params"] = [p.copy() for _, p, _ in net.parameters()]
            state["_net_buffers"] = [b.copy() for _, b in net.buffers()]
            state["_net_dropout"] = (net.dropout_seed, net.dropout_step)
            state.pop("coefs_", None)
            state.pop("intercepts_", None)
            state["_optimizer_state"] = (None if optimizer is None
                                         else optimizer.state_dict())
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        specs = state.pop("_net_layers", None)
        dtype = state.pop("_net_dtype", None)
        params = state.pop("_net_params", None)
        buffers = state.pop("_net_buffers", [])
        dropout = state.pop("_net_dropout", None)
        opt_state = state.pop("_optimizer_state", None)
        super().__setstate__(state)
        if specs is None:
            return
        # descriptions; a pickle from before the layer protocol holds Dense tuples
        layers = [layer_from_description(d) if isinstance(d, dict) else
                  Dense(d[0], d[1], activation=d[2], negative_slope=d[3]) for d in specs]
        net = Network._zeros(layers, dtype=dtype)
        for (_, p, _), saved in zip(net.parameters(), params):
            p[...] = saved
        for (_, b), saved in zip(net.buffers(), buffers):
            b[...] = saved
        if dropout is not None:  # the copy draws the masks the original would draw next
            net._core.dropout_seed, net._core.dropout_step = dropout
        self._net = net
        self._optimizer = None
        if opt_state is not None:
            optimizer = optim.OPTIMIZERS[opt_state["optimizer"]](
                net, **opt_state["hyperparameters"])
            optimizer.load_state_dict(opt_state)
            self._optimizer = optimizer


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained by bprop, with scikit-learn's API.

    Parameters, attributes and methods are those of
    ``sklearn.neural_network.MLPClassifier``; see the module docstring for the
    objective and the few differences. Every method taking X takes a dense
    array-like or a scipy.sparse matrix or array (CSR as it is, other formats
    converted to CSR once; never densified), as scikit-learn's.

    Args:
        hidden_layer_sizes: widths of the hidden layers, e.g. (100,) or (64, 32).
        activation: hidden activation, "identity", "logistic", "tanh" or "relu"
            (or bprop's "sigmoid", "leaky_relu", "gelu", "elu", "selu", "silu",
            "softplus").
        solver: "adam", "sgd", "rmsprop" (minibatch) or "lbfgs" (full batch).
        alpha: L2 strength on the weights (see the module docstring).
        batch_size: minibatch size, or "auto" = min(200, n_samples).
        learning_rate: schedule of "sgd": "constant", "invscaling" or "adaptive".
        learning_rate_init: initial learning rate of the minibatch solvers.
        power_t: exponent of "invscaling".
        max_iter: epochs (minibatch solvers) or iterations (lbfgs).
        shuffle: shuffle the samples every epoch.
        random_state: seed or RandomState of the initial weights, the shuffling
            and the validation split.
        tol: improvement below which an epoch counts as no improvement.
        verbose: print the loss of every epoch.
        warm_start: continue from the previous fit's weights.
        momentum: momentum of "sgd".
        nesterovs_momentum: Nesterov momentum for "sgd".
        early_stopping: hold out validation_fraction of the data and stop when
            its accuracy stops improving; keeps the best weights.
        validation_fraction: share of the data held out by early_stopping.
        beta_1, beta_2, epsilon: Adam's hyperparameters (epsilon also RMSprop's).
        n_iter_no_change: epochs without improvement before stopping.
        max_fun: maximum loss evaluations of "lbfgs".
        dtype: None (float32 for float32 input, else float64), "float32" or
            "float64": the network's dtype.
        dropout: in [0, 1): dropout probability after each hidden layer (0: no
            Dropout layer). Not with solver="lbfgs".
        batch_norm: normalise each hidden layer's pre-activation with BatchNorm
            (Dense -> BatchNorm -> Activation).
        class_weight: None, "balanced", {class: weight} (or a list of such dicts
            for multi-label targets): per-sample weights of each class, as
            scikit-learn's compute_sample_weight, times sample_weight.

    Attributes:
        classes_: (n_classes,) class labels.
        loss_: loss of the last epoch (L2 term included).
        best_loss_: lowest epoch loss (None with early_stopping).
        loss_curve_: loss of every epoch (minibatch solvers).
        validation_scores_: validation accuracy per epoch (early_stopping).
        best_validation_score_: best validation accuracy (early_stopping).
        t_: training samples seen.
        coefs_: weights per Dense layer, (fan_in, fan_out) each: views of the
            network's storage; writing into them, assigning an item or the
            whole list changes the model.
        intercepts_: biases per layer, (fan_out,) each, the same way.
        n_features_in_, feature_names_in_: as every scikit-learn estimator.
        n_iter_: epochs run by the last fit (iterations for lbfgs).
        n_layers_: number of layers, input and output included.
        n_outputs_: width of the output layer.
        out_activation_: "softmax" (multi-class) or "logistic" (binary, multi-label).
    """

    _parameter_constraints: Dict[str, List[Any]] = {
        **_BaseMLP._parameter_constraints,
        "class_weight": [dict, list, StrOptions({"balanced"}), None],
    }

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *,
                 solver: str = "adam", alpha: float = 0.0001, batch_size: Any = "auto",
                 learning_rate: str = "constant", learning_rate_init: float = 0.001,
                 power_t: float = 0.5, max_iter: int = 200, shuffle: bool = True,
                 random_state: Any = None, tol: float = 1e-4, verbose: bool = False,
                 warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: Any = 10, max_fun: int = 15000,
                 dtype: Optional[str] = None, dropout: float = 0.0,
                 batch_norm: bool = False,
                 class_weight: Any = None) -> None:
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, shuffle=shuffle, random_state=random_state,
            tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun, dtype=dtype,
            dropout=dropout, batch_norm=batch_norm)
        self.class_weight = class_weight

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPClassifier":
        """Fits the network to X (n_samples, n_features) and y: labels
        (n_samples,) or a multi-label indicator matrix (n_samples, n_labels).

        Args:
            X: training inputs (n_samples, n_features): an array-like, or a
                scipy.sparse matrix or array (see the module docstring).
            y: targets.
            sample_weight: optional non-negative weights (n_samples,).

        Returns:
            self.
        """
        self._validate_params()
        with self._unchanged_on_failure():
            self._fit(X, y, sample_weight=sample_weight, incremental=False)
        return self

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None,
                    classes: Any = None) -> "MLPClassifier":
        """One epoch over (X, y), continuing from the current weights.

        Args:
            X: inputs (n_samples, n_features), dense or sparse.
            y: labels (n_samples,) or indicator matrix.
            sample_weight: optional non-negative weights (n_samples,).
            classes: every class of the whole dataset; required on the first call.

        Returns:
            self.
        """
        self._validate_params()
        with self._unchanged_on_failure():
            if not hasattr(self, "classes_"):
                if classes is None:
                    raise ValueError("classes must be passed on the first call to "
                                     "partial_fit.")
                self._label_binarizer = LabelBinarizer()
                if type_of_target(y).startswith("multilabel"):
                    self._label_binarizer.fit(y)
                else:
                    self._label_binarizer.fit(classes)
                self.classes_ = self._label_binarizer.classes_
            elif classes is not None and not np.array_equal(self.classes_,
                                                            unique_labels(classes)):
                raise ValueError(f"`classes={classes!r}` is not the same as on last call to "
                                 f"partial_fit, was: {self.classes_!r}")
            self._fit(X, y, sample_weight=sample_weight, incremental=True)
        return self

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool,
                        dtype: Any) -> Tuple[np.ndarray, np.ndarray]:
        X, y = self._validate_data(self._where("partial_fit" if incremental else "fit"), X,
                                   y, multi_output=True, dtype=dtype, order="C", reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start and not incremental:
                if set(classes) != set(self.classes_):
                    raise ValueError("warm_start can only be used where `y` has the same "
                                     "classes as in the previous call to fit. Previously got "
                                     f"{self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        return X, y

    def _multiclass(self) -> bool:
        return self._label_binarizer.y_type_ == "multiclass"

    def _class_sample_weight(self, y: np.ndarray, incremental: bool,
                             where: str) -> Optional[np.ndarray]:
        """class_weight as per-sample weights, with the semantics of scikit-learn's
        compute_sample_weight ("balanced": n_samples / (n_classes * count of the
        class), counted over this call's y; a dict maps classes to weights, 1 for
        the others). partial_fit refuses "balanced" (one batch cannot tell the
        class frequencies), as SGDClassifier does, and maps a dict over classes_."""
        class_weight = self.class_weight
        if class_weight is None:
            return None
        if isinstance(class_weight, str) and incremental:
            raise ValueError(
                f"{where} class_weight 'balanced' is not supported for partial_fit: one batch "
                "does not tell the class frequencies. Compute the weights with "
                "sklearn.utils.class_weight.compute_class_weight('balanced', classes=classes, "
                "y=y) over a large enough sample of the targets and pass them as a dict "
                "(class_weight={class: weight}).")
        if incremental and y.ndim == 1:
            weights = compute_class_weight(class_weight, classes=self.classes_, y=y)
            return np.asarray(weights, dtype=np.float64)[np.searchsorted(self.classes_, y)]
        return np.asarray(compute_sample_weight(class_weight, y), dtype=np.float64)

    def _out_activation(self) -> str:
        return "softmax" if self._multiclass() else "logistic"

    def _targets(self, y: np.ndarray, dtype: np.dtype) -> Tuple[np.ndarray, int]:
        indicator = self._label_binarizer.transform(y)
        if self._multiclass():
            # class indices for the fused softmax cross-entropy
            return np.ascontiguousarray(np.argmax(indicator, axis=1), dtype=np.int64), \
                indicator.shape[1]
        return np.ascontiguousarray(indicator, dtype=dtype), indicator.shape[1]

    def _loss_name(self) -> str:
        return ("softmax_cross_entropy" if self._multiclass()
                else "binary_cross_entropy_with_logits")

    def _loss_scales(self, n_outputs: int) -> Tuple[float, float]:
        if self._multiclass():
            return 1.0, 1.0
        # bprop averages the binary cross-entropy over the labels; scikit-learn sums
        return float(n_outputs), float(n_outputs)

    def _proba(self, net: Network, X: np.ndarray) -> np.ndarray:
        """Probabilities of the output units: softmax or sigmoid of the logits."""
        logits = net.predict(X)
        if self._multiclass():
            logits -= logits.max(axis=1, keepdims=True)
            np.exp(logits, out=logits)
            logits /= logits.sum(axis=1, keepdims=True)
            return logits
        return expit(logits)

    def _predict_with(self, net: Network, X: np.ndarray) -> np.ndarray:
        proba = self._proba(net, X)
        if proba.shape[1] == 1:
            proba = proba.ravel()
        return self._label_binarizer.inverse_transform(proba)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted classes: (n_samples,) labels, or (n_samples, n_labels) for
        multi-label targets."""
        X = self._validate_predict_input(X, "predict")
        return self._predict_with(self._net, X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), columns ordered as classes_
        (for multi-label targets, one independent probability per label)."""
        X = self._validate_predict_input(X, "predict_proba")
        proba = self._proba(self._net, X)
        if proba.shape[1] == 1 and not self._label_binarizer.y_type_.startswith("multilabel"):
            p = proba.ravel()
            return np.column_stack([1 - p, p])
        return proba

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """log(predict_proba(X)), as scikit-learn computes it."""
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba, out=proba)

    def _score(self, net: Network, X: np.ndarray, y: Any,
               sample_weight: Optional[np.ndarray]) -> float:
        y_pred = self._predict_with(net, X)
        return float(accuracy_score(y, y_pred, sample_weight=sample_weight))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained by bprop, with scikit-learn's API.

    Parameters, attributes and methods are those of
    ``sklearn.neural_network.MLPRegressor``; see :class:`MLPClassifier` for the
    parameters (but class_weight) and the module docstring for the objective.
    ``loss`` ("squared_error" or "poisson", the first positional parameter as in
    scikit-learn) chooses half the squared error with an identity output
    (``out_activation_ == "identity"``) or half the Poisson deviance with a log
    link (``out_activation_ == "exp"``, y >= 0). y may have several columns
    (multi-output regression); ``validation_scores_`` hold R^2. X may be sparse,
    as for :class:`MLPClassifier`.
    """

    _parameter_constraints: Dict[str, List[Any]] = {
        **_BaseMLP._parameter_constraints,
        "loss": [StrOptions({"squared_error", "poisson"})],
    }

    def __init__(self, loss: str = "squared_error", hidden_layer_sizes: Any = (100,),
                 activation: str = "relu", *,
                 solver: str = "adam", alpha: float = 0.0001, batch_size: Any = "auto",
                 learning_rate: str = "constant", learning_rate_init: float = 0.001,
                 power_t: float = 0.5, max_iter: int = 200, shuffle: bool = True,
                 random_state: Any = None, tol: float = 1e-4, verbose: bool = False,
                 warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: Any = 10, max_fun: int = 15000,
                 dtype: Optional[str] = None, dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, shuffle=shuffle, random_state=random_state,
            tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun, dtype=dtype,
            dropout=dropout, batch_norm=batch_norm)
        self.loss = loss

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPRegressor":
        """Fits the network to X (n_samples, n_features) and y (n_samples,) or
        (n_samples, n_outputs).

        Args:
            X: training inputs (n_samples, n_features): an array-like, or a
                scipy.sparse matrix or array (see the module docstring).
            y: real targets.
            sample_weight: optional non-negative weights (n_samples,).

        Returns:
            self.
        """
        self._validate_params()
        with self._unchanged_on_failure():
            self._fit(X, y, sample_weight=sample_weight, incremental=False)
        return self

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPRegressor":
        """One epoch over (X, y), continuing from the current weights.

        Args:
            X: inputs (n_samples, n_features), dense or sparse.
            y: targets (n_samples,) or (n_samples, n_outputs).
            sample_weight: optional non-negative weights (n_samples,).

        Returns:
            self.
        """
        self._validate_params()
        with self._unchanged_on_failure():
            self._fit(X, y, sample_weight=sample_weight, incremental=True)
        return self

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool,
                        dtype: Any) -> Tuple[np.ndarray, np.ndarray]:
        where = self._where("partial_fit" if incremental else "fit")
        X, y = self._validate_data(where, X, y, multi_output=True, y_numeric=True,
                                   dtype=dtype, order="C", reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson":
            # the checks of scikit-learn's Poisson regressors (forests, trees); a batch
            # of partial_fit may hold only zeros
            negative = y < 0
            if negative.any():
                index = np.unravel_index(int(np.argmax(negative)), y.shape)
                raise ValueError(
                    "Some value(s) of y are negative which is not allowed for Poisson "
                    f"regression. ({where} loss='poisson' needs counts or rates y >= 0, but "
                    f"y[{', '.join(str(int(i)) for i in index)}] = {y[index]})")
            if not incremental and not np.sum(y) > 0:
                raise ValueError(
                    "Sum of y is not strictly positive which is necessary for Poisson "
                    f"regression. ({where} loss='poisson' with every y = 0 has no finite "
                    "solution: log(mu) would go to -inf)")
        return X, y

    def _out_activation(self) -> str:
        return "exp" if self.loss == "poisson" else "identity"

    def _targets(self, y: np.ndarray, dtype: np.dtype) -> Tuple[np.ndarray, int]:
        target = y.reshape(-1, 1) if y.ndim == 1 else y
        return np.ascontiguousarray(target, dtype=dtype), target.shape[1]

    def _loss_name(self) -> str:
        return "poisson" if self.loss == "poisson" else "mean_squared_error"

    def _loss_scales(self, n_outputs: int) -> Tuple[float, float]:
        if self.loss == "poisson":
            # bprop's poisson_deviance_log_link is the mean over all elements;
            # scikit-learn sums the outputs' sample means (loss and gradient)
            return float(n_outputs), float(n_outputs)
        # bprop: mean((o - t)^2) over all elements, gradient 2 (o - t) / (k n);
        # scikit-learn reports half of it and steps along (o - t) / n.
        return 0.5, 0.5 * n_outputs

    def _predict_with(self, net: Network, X: np.ndarray) -> np.ndarray:
        out = net.predict(X)
        if self._out_activation() == "exp":  # the log link: the network outputs log(mu)
            with np.errstate(over="ignore"):
                np.exp(out, out=out)
        return out.ravel() if out.shape[1] == 1 else out

    def predict(self, X: Any) -> np.ndarray:
        """Predictions (n_samples,) or (n_samples, n_outputs)."""
        X = self._validate_predict_input(X, "predict")
        return self._predict_with(self._net, X)

    def _score(self, net: Network, X: np.ndarray, y: Any,
               sample_weight: Optional[np.ndarray]) -> float:
        y_pred = self._predict_with(net, X)
        if not np.isfinite(y_pred).all():
            return float("nan")
        with np.errstate(over="ignore", invalid="ignore"):  # huge predictions: -inf
            return float(r2_score(y, y_pred, sample_weight=sample_weight))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        # Poisson needs y >= 0 (scikit-learn's GLMs and gradient boosting say so too)
        tags.target_tags.positive_only = self.loss == "poisson"
        return tags

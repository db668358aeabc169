"""Numerical stability (issue 5, item 2): logits of +-1e4 through the network,
saturated activations, divergence and the anomaly check of fit.

The pytest configuration turns warnings into errors; the bprop calls here also
run inside np.errstate(all="raise"), so that any NumPy floating-point event in
bprop's Python layer fails the test. The NumPy references run with
under="ignore" besides: exp(-1e4) rounding to 0 is the exact result, not an
error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re

import numpy as np
import pytest

import bprop
from bprop import losses, optim, reference

STRICT = dict(all="raise")
REFERENCE = dict(all="raise", under="ignore")


def _identity_network(dtype, width=3):
    """A one-layer identity network whose output is its input, exactly (W = I, b = 0)."""
    net = bprop.Network([bprop.Dense(width, width)], dtype=dtype, seed=0)
    net[0].weight = np.eye(width)
    net[0].bias = np.zeros(width)
    return net


# Logits of +-1e4: one-hot rows, near-ties at 1e4 (softmax not one-hot), and labels
# on the smallest logit (a loss of 2e4).
LOGITS = np.array([[1e4, -1e4, 0.0],
                   [1e4 + 2.0, 1e4, 1e4 - 3.0],
                   [-1e4, -1e4, -1e4 + 1.0],
                   [-1e4, 1e4, 1e4 - 0.5],
                   [0.0, 1e4, -1e4]])
LABELS = np.array([1, 0, 2, 2, 2])


def _lse(row):
    m = max(row)
    return m + math.log(math.fsum(math.exp(v - m) for v in row))


def _reference_softmax_ce(z, y, w=None):
    """Mean cross-entropy and dL/dz by log-sum-exp, in float64 (math.fsum)."""
    rows, classes = z.shape
    target = np.zeros_like(z)
    target[np.arange(rows), y] = 1.0
    w = np.ones(rows) if w is None else np.asarray(w, dtype=np.float64)
    per_row = [_lse(list(row)) - row[k] for row, k in zip(z, y)]
    value = math.fsum(wi * li for wi, li in zip(w, per_row)) / math.fsum(w)
    p = np.array([[math.exp(v - _lse(list(row))) for v in row] for row in z])
    return value, (w / w.sum())[:, None] * (p - target)


def _rel(actual, desired):
    scale = float(np.max(np.abs(desired)))
    return float(np.max(np.abs(actual - desired))) / scale if scale else 0.0


@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_cross_entropy_of_1e4_logits_through_the_network(weighted, record_error):
    net = _identity_network("float64")
    w = np.array([1.0, 2.0, 0.5, 1.0, 3.0]) if weighted else None
    value_ref, dz_ref = _reference_softmax_ce(LOGITS, LABELS, w)
    with np.errstate(**STRICT):
        out = net.forward(LOGITS)
        assert out.tobytes() == LOGITS.tobytes()  # the identity layer is exact
        value, dz = losses.softmax_cross_entropy(out, LABELS, w)
        dX = net.backward(dz, input_grad=True)
        # the fused C++ step computes the same loss (lr=0 changes nothing)
        fused = net.train_step(LOGITS, LABELS, optimizer=optim.SGD(net, lr=0.0),
                               sample_weight=w)
    assert math.isfinite(value) and np.isfinite(dz).all() and np.isfinite(dX).all()
    assert abs(value - value_ref) <= 1e-12 * abs(value_ref)
    assert abs(fused - value_ref) <= 1e-12 * abs(value_ref)
    record_error("stability: softmax CE at 1e4, loss (float64)", abs(value - value_ref) / value_ref)
    # dL/dW = X^T dz, dL/db = column sums of dz, dL/dX = dz W^T = dz
    for name, actual, desired in (("dz", dz, dz_ref), ("dX", dX, dz_ref),
                                  ("grad_weight", net[0].grad_weight, LOGITS.T @ dz_ref),
                                  ("grad_bias", net[0].grad_bias, dz_ref.sum(axis=0))):
        err = _rel(actual, desired)
        record_error(f"stability: softmax CE at 1e4, {name} (float64)", err)
        assert err <= 1e-12, name


def test_softmax_cross_entropy_of_1e4_logits_with_probability_targets():
    y = np.full((5, 3), 1 / 3)
    z = LOGITS
    lse = np.array([_lse(list(row)) for row in z])
    value_ref = math.fsum((y * (lse[:, None] - z)).sum(axis=1)) / 5
    with np.errstate(**STRICT):
        value, grad = losses.softmax_cross_entropy(z, y)
    assert abs(value - value_ref) <= 1e-12 * abs(value_ref)
    p = np.exp(z - lse[:, None])
    assert _rel(grad, (p - y) / 5) <= 1e-12


def test_binary_cross_entropy_of_1e4_logits_through_the_network():
    net = _identity_network("float64")
    y = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.25, 0.0, 1.0], [1.0, 1.0, 0.0],
                  [0.0, 0.5, 1.0]])
    x = LOGITS
    # l = max(x, 0) - x y + log1p(exp(-|x|)), summed with fsum
    terms = [max(v, 0.0) - v * t + math.log1p(math.exp(-abs(v)))
             for v, t in zip(x.ravel(), y.ravel())]
    value_ref = math.fsum(terms) / x.size
    sig = np.array([1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v))
                    for v in x.ravel()]).reshape(x.shape)
    with np.errstate(**STRICT):
        value, grad = losses.binary_cross_entropy_with_logits(net.forward(x), y)
        net.backward(grad)
        fused = net.train_step(x, y, "binary_cross_entropy_with_logits",
                               optim.SGD(net, lr=0.0))
    assert abs(value - value_ref) <= 1e-12 * value_ref
    assert abs(fused - value_ref) <= 1e-12 * value_ref
    assert _rel(grad, (sig - y) / x.size) <= 1e-12
    assert _rel(net[0].grad_weight, x.T @ ((sig - y) / x.size)) <= 1e-12


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy_with_logits"])
def test_float32_logits_of_1e4_stay_finite(loss):
    net = _identity_network("float32")
    X = LOGITS.astype(np.float32)
    y = LABELS if loss == "softmax_cross_entropy" else np.ones((5, 3))
    with np.errstate(**STRICT):
        value, grad = losses.get_loss(loss)(net.forward(X), y)
        net.backward(grad)
        stats = bprop.evaluate(net, X, y, loss=loss)
    assert math.isfinite(value) and np.isfinite(grad).all()
    assert np.isfinite(net[0].grad_weight).all()
    assert stats["loss"] == pytest.approx(value, rel=1e-6)


def test_softmax_output_layer_at_1e4_is_one_hot_and_its_jvp_exact():
    net = bprop.Network([bprop.Dense(3, 3, "softmax")], dtype="float64", seed=0)
    net[0].weight = np.eye(3)
    net[0].bias = np.zeros(3)
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4 - 1.0], [0.0, -1e4, 1e4]])
    g = np.array([[1.0, -2.0, 0.5], [0.25, 1.0, -1.0], [3.0, 0.0, 1.0]])
    with np.errstate(**STRICT):
        out = net.forward(z)
        dX = net.backward(g, input_grad=True)
    with np.errstate(**REFERENCE):
        ref_out = reference.activation_forward("softmax", z)
        ref_dX = reference.activation_backward("softmax", z, ref_out, g)
    # one-hot up to 1e-300: Eigen's exp clamps its argument near -709.8, so exp(-2e4)
    # comes out as 5.6e-309 rather than 0 in float64
    np.testing.assert_allclose(out[[0, 2]], np.eye(3)[[0, 2]], rtol=0, atol=1e-300)
    assert _rel(out, ref_out) <= 1e-15 and _rel(dX, ref_dX) <= 1e-12
    assert np.isfinite(dX).all()


# ---- saturated activations --------------------------------------------------------------------

SATURATING = [1e4, -1e4, 1e3, -1e3, 800.0, -800.0, 100.0, -100.0, 89.0, -89.0, 40.0, -40.0]


def _fe_flags():
    """fetestexcept/feclearexcept of the C library, or None where there is none."""
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    try:
        libm = ctypes.CDLL(name)
        libm.fetestexcept, libm.feclearexcept  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libm


# x86-64 glibc values; FE_OVERFLOW/FE_UNDERFLOW are not checked (see the test).
FE_INVALID, FE_DIVBYZERO = 0x01, 0x04


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "gelu", "softmax", "elu", "selu",
                                        "silu", "softplus"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_saturated_activations_are_exact_finite_and_silent(activation, dtype):
    """+-1e4 (and the exp overflow thresholds of both dtypes) into each activation:
    forward, backward and predict finite and equal to the NumPy reference, no
    warning, and no invalid or divide-by-zero floating-point exception raised in
    the core (the overflow flag of an exp that saturates to 0 or 1 is allowed)."""
    n = len(SATURATING)
    net = bprop.Network([bprop.Dense(n, n, activation)], dtype=dtype, seed=0)
    net[0].weight = np.eye(n)
    net[0].bias = np.zeros(n)
    z = np.array([SATURATING, SATURATING[::-1]], dtype=dtype)
    g = np.linspace(-1, 1, 2 * n).reshape(2, n).astype(dtype)
    libm = _fe_flags()
    if libm is not None:
        libm.feclearexcept(0x3D)
    with np.errstate(**STRICT):
        out = net.forward(z)
        dX = net.backward(g, input_grad=True)
        pred = net.predict(z)
    raised = libm.fetestexcept(FE_INVALID | FE_DIVBYZERO) if libm is not None else 0
    assert raised == 0, f"the core raised floating-point exception flags {raised:#x}"
    assert np.isfinite(out).all() and np.isfinite(dX).all()
    assert pred.tobytes() == out.tobytes()
    z64 = z.astype(np.float64)
    with np.errstate(**REFERENCE):
        ref_out = reference.activation_forward(activation, z64)
        ref_dX = reference.activation_backward(activation, z64, ref_out, g.astype(np.float64))
    tol = 1e-6 if dtype == "float32" else 1e-14
    # Absolute errors are measured against the scale of what flows through: the
    # output's and, for dX = J^T g with |J| <= 1, the incoming gradient's. Where
    # the reference has exact zeros the core may hold subnormals (an exp of -2e4
    # flushed differently; seen in float32 on AVX2: 2.6e-40 ... 2.8e-39 in dX).
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol * np.abs(ref_out).max())
    np.testing.assert_allclose(dX, ref_dX, rtol=tol,
                               atol=tol * max(np.abs(ref_dX).max(), np.abs(g).max()))
    if activation in ("sigmoid", "tanh"):
        # saturated exactly: sigma(+-1e4) is 1 and 0 (tanh: +-1), and the derivative 0
        big = np.abs(z) >= 1e3
        low = -1.0 if activation == "tanh" else 0.0
        np.testing.assert_array_equal(out[big], np.where(z[big] > 0, 1.0, low))
        np.testing.assert_array_equal(dX[big], 0.0)


# float32's range end to end: its largest values (up to 3.2e38, so that selu's
# 1.0507 * z stays finite), exp's overflow and underflow points (88.7, -87.3, -103.3)
# and subnormals
FLOAT32_EXTREMES = [-3.4e38, -1e30, -1e4, -104.0, -88.8, -87.4, -1e-38, -1e-45, 0.0, 1e-45,
                    1e-38, 87.4, 88.8, 104.0, 1e4, 1e30, 3.2e38]


@pytest.mark.parametrize("activation", ["elu", "selu", "silu", "softplus"])
def test_float32_extremes_through_the_exp_based_activations(activation):
    """Each pre-activation z on its own unit: z = 1 * W, W = diag(z), so that no
    product of the layer overflows; forward and backward finite, silent, and within
    float32 rounding of the float64 reference."""
    n = len(FLOAT32_EXTREMES)
    net = bprop.Network([bprop.Dense(n, n, activation)], dtype="float32", seed=0)
    net[0].weight = np.diag(FLOAT32_EXTREMES)
    net[0].bias = np.zeros(n)
    z = np.array([FLOAT32_EXTREMES], dtype=np.float32)
    g = np.linspace(-1, 1, n).reshape(1, n).astype(np.float32)
    libm = _fe_flags()
    if libm is not None:
        libm.feclearexcept(0x3D)
    with np.errstate(**STRICT):
        out = net.forward(np.ones((1, n), dtype=np.float32))
        net.backward(g)
        pred = net.predict(np.ones((1, n), dtype=np.float32))
    raised = libm.fetestexcept(FE_INVALID | FE_DIVBYZERO) if libm is not None else 0
    assert raised == 0, f"the core raised floating-point exception flags {raised:#x}"
    delta = net[0].delta
    assert np.isfinite(out).all() and np.isfinite(delta).all()
    assert pred.tobytes() == out.tobytes()
    z64 = z.astype(np.float64)
    with np.errstate(**REFERENCE):
        ref_out = reference.activation_forward(activation, z64)
        ref_delta = reference.activation_backward(activation, z64, ref_out, g.astype(np.float64))
    # atol: below float32's smallest normal number, where a subnormal result rounds
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-37)
    np.testing.assert_allclose(delta, ref_delta, rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_on_saturating_inputs_is_silent_and_finite(dtype):
    rng = np.random.default_rng(5)
    X = 1e4 * rng.standard_normal((64, 3))
    y = rng.integers(0, 2, 64)
    net = bprop.Network([bprop.Dense(3, 8, "tanh"), bprop.Dense(8, 8, "sigmoid"),
                         bprop.Dense(8, 2)], dtype=dtype, seed=1)
    with np.errstate(**STRICT):
        history = bprop.fit(net, X, y, epochs=3, batch_size=16, seed=0, metrics=["accuracy"],
                            check_finite=True)
        stats = bprop.evaluate(net, X, y, metrics=["accuracy"])
    assert all(math.isfinite(v) for v in history.loss) and math.isfinite(stats["loss"])


# ---- divergence -----------------------------------------------------------------------------

def _params(net):
    return [p.copy() for _, p, _ in net.parameters()]


class _Recorder:
    """Weights and optimizer state at the end of every epoch."""

    def __init__(self, net, optimizer):
        self.net, self.optimizer = net, optimizer
        self.weights = [_params(net)]
        self.states = [optimizer.state_dict()]

    def on_epoch_end(self, epoch, logs):
        self.weights.append(_params(self.net))
        self.states.append(self.optimizer.state_dict())


@pytest.mark.parametrize("make_optimizer", [
    lambda n: optim.SGD(n, lr=1e6),
    lambda n: optim.SGD(n, lr=1e6, momentum=0.9),
    lambda n: optim.SGD(n, lr=1e6, weight_decay=1e-4),
], ids=["sgd", "sgd-momentum", "sgd-weight-decay"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_diverging_fit_stops_naming_epoch_and_layer_with_the_last_finite_weights(
        dtype, make_optimizer):
    rng = np.random.default_rng(6)
    X = rng.standard_normal((32, 3))
    y = rng.standard_normal((32, 2))
    net = bprop.Network([bprop.Dense(3, 16, "relu"), bprop.Dense(16, 16, "tanh"),
                         bprop.Dense(16, 2)], dtype=dtype, seed=0)
    opt = make_optimizer(net)
    recorder = _Recorder(net, opt)
    with np.errstate(**STRICT), pytest.raises(FloatingPointError) as info:
        bprop.fit(net, X, y, loss="mse", optimizer=opt, epochs=30, batch_size=4, seed=0,
                  callbacks=[recorder])
    message = str(info.value)
    m = re.match(r"\[fit\] training diverged in epoch (\d+)/30 \(batch (\d+)/8\): the loss is "
                 r"(\S+); ", message)
    assert m, message
    epoch = int(m.group(1))
    assert len(info.value.history) == epoch - 1 == len(recorder.weights) - 1
    assert all(np.isfinite(p).all() for p in _params(net))
    restored = re.search(r"layer (\d) \(layers\.\d\.(weight|bias)\) was the first to hold "
                         r"non-finite weights; the weights and optimizer state from the start "
                         rf"of epoch {epoch} \(the last finite ones\) were restored", message)
    if restored:
        # bitwise the weights and optimizer state the previous epoch ended with
        for a, b in zip(_params(net), recorder.weights[-1]):
            assert a.tobytes() == b.tobytes()
        state = opt.state_dict()
        assert state["step"] == recorder.states[-1]["step"]
        for pname, arrays in recorder.states[-1]["state"].items():
            for k, a in arrays.items():
                assert state["state"][pname][k].tobytes() == a.tobytes()
    else:
        # a non-finite loss whose step updated nothing: the weights are those before it
        assert re.search(r"the weights are still finite and were left as they were before "
                         r"the failing step", message), message
    assert re.search(r"The first non-finite value of that step: ", message)
    assert "Try a smaller learning rate (lr=1e+06)" in message


# ---- the anomaly check: layer and phase ------------------------------------------------------

def test_check_finite_names_the_forward_pass_and_layer():
    """An overflowing product in layer 1's forward pass (weights finite in float32)."""
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((16, 3)), rng.standard_normal((16, 2))
    net = bprop.Network([bprop.Dense(3, 4, "tanh"), bprop.Dense(4, 2)], dtype="float32", seed=0)
    net[1].weight = np.full((4, 2), 3e38)
    before = _params(net)
    with np.errstate(**STRICT), pytest.raises(
            FloatingPointError, match=r"\(batch 1/4\): the loss is (inf|nan); the weights are "
                                      r"still finite .* The first non-finite value of that step: "
                                      r"forward pass, layers\.1 \(z\)\."):
        bprop.fit(net, X, y, loss="mse", optimizer=optim.Adam(net), epochs=1, batch_size=4,
                  check_finite=True)
    for a, b in zip(_params(net), before):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("make_optimizer", [lambda n: optim.Adam(n),
                                            lambda n: optim.SGD(n, lr=1e-3, momentum=0.9)],
                         ids=["adam", "sgd-momentum"])
def test_check_finite_names_the_backward_pass_and_layer(make_optimizer):
    """Layer 1's huge weights give a finite loss and finite delta in layer 1, but
    delta W^T overflows float32 on its way to layer 0. With check_finite the step
    that did it is named; without it, the next step's forward pass."""
    rng = np.random.default_rng(8)
    X, y = rng.standard_normal((16, 3)), rng.standard_normal((16, 2))
    messages = {}
    for check in (True, False):
        net = bprop.Network([bprop.Dense(3, 4, "tanh"), bprop.Dense(4, 2)], dtype="float32",
                            seed=0)
        net[1].weight = np.full((4, 2), 1e30)
        before = _params(net)
        with np.errstate(**STRICT), pytest.raises(FloatingPointError) as info:
            bprop.fit(net, X, y, loss="mse", optimizer=make_optimizer(net), epochs=1,
                      batch_size=4, shuffle=False, check_finite=check)
        messages[check] = str(info.value)
        for a, b in zip(_params(net), before):
            assert a.tobytes() == b.tobytes()
    assert re.search(r"\(batch 1/4\): the loss is [0-9.e+]+; layer 0 \(layers\.0\.weight\) was "
                     r"the first .* The first non-finite value of that step: backward pass, "
                     r"layers\.0 \(delta\)\.", messages[True]), messages[True]
    assert re.search(r"\(batch 2/4\): the loss is nan; .* forward pass, layers\.0 \(z\)\.",
                     messages[False]), messages[False]


def test_check_finite_names_the_output_layer_for_a_poisoned_gradient():
    rng = np.random.default_rng(9)
    X, y = rng.standard_normal((16, 3)), rng.integers(0, 2, 16)

    def poisoned(output, target, sample_weight=None):
        value, grad = losses.softmax_cross_entropy(output, target, sample_weight)
        grad = grad.copy()
        grad[0, 1] = np.inf  # a finite loss, an infinite gradient entry
        return value, grad

    net = bprop.Network([bprop.Dense(3, 4, "tanh"), bprop.Dense(4, 2)], dtype="float64",
                        seed=0)
    with np.errstate(**STRICT), pytest.raises(
            FloatingPointError, match=r"\(batch 1/1\): the loss is [0-9.]+; layer 0 .* The first "
                                      r"non-finite value of that step: backward pass, layers\.1 "
                                      r"\(delta\)\."):
        bprop.fit(net, X, y, loss=poisoned, optimizer=optim.Adam(net), epochs=1, batch_size=16,
                  check_finite=True)

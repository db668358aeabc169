"""bprop.losses: each loss against the NumPy reference and central differences,
extreme logits, argument errors, sample weights, and user-defined losses in fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bprop
from bprop import losses, reference

LOSSES = {
    "softmax_cross_entropy": (losses.softmax_cross_entropy, reference.softmax_cross_entropy),
    "binary_cross_entropy_with_logits": (losses.binary_cross_entropy_with_logits,
                                         reference.binary_cross_entropy_with_logits),
    "mean_squared_error": (losses.mean_squared_error, reference.mean_squared_error),
}


def _target(name, rng, batch, k, kind="labels"):
    if name == "softmax_cross_entropy":
        if kind == "labels":
            return rng.integers(0, k, size=batch)
        p = rng.random((batch, k))
        return p / p.sum(axis=1, keepdims=True)
    if name == "binary_cross_entropy_with_logits":
        return rng.random((batch, k))
    return rng.standard_normal((batch, k))


CASES = [("softmax_cross_entropy", "labels"), ("softmax_cross_entropy", "probabilities"),
         ("binary_cross_entropy_with_logits", None), ("mean_squared_error", None)]


# ---- against the NumPy reference ---------------------------------------------------

@pytest.mark.parametrize("name,kind", CASES)
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_reference(name, kind, dtype, rtol, weighted, rng):
    fn, ref = LOSSES[name]
    z = (3 * rng.standard_normal((7, 4))).astype(dtype)
    y = _target(name, rng, 7, 4, kind)
    w = rng.random(7) + 0.1 if weighted else None
    value, grad = fn(z, y, w)
    ref_y = y if (name == "softmax_cross_entropy" and kind == "labels") else y.astype(dtype)
    ref_value, ref_grad = ref(z, ref_y, None if w is None else w.astype(dtype))
    assert isinstance(value, float)
    assert grad.dtype == dtype and grad.shape == z.shape and grad.flags.c_contiguous
    np.testing.assert_allclose(value, ref_value, rtol=rtol)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())


# ---- against central finite differences in float64 ------------------------------------

@pytest.mark.parametrize("name,kind", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_gradient_matches_central_differences(name, kind, weighted, rng):
    fn, _ = LOSSES[name]
    z = rng.standard_normal((5, 3))
    y = _target(name, rng, 5, 3, kind)
    w = rng.random(5) + 0.1 if weighted else None
    _, grad = fn(z, y, w)
    eps = 1e-6
    numeric = np.empty_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        numeric[idx] = (fn(zp, y, w)[0] - fn(zm, y, w)[0]) / (2 * eps)
    rel = np.abs(grad - numeric).max() / np.abs(numeric).max()
    assert rel < 1e-6


# ---- extreme logits ---------------------------------------------------------------------

def _logsumexp(row):
    m = max(row)
    return m + math.log(math.fsum(math.exp(v - m) for v in row))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_cross_entropy_is_exact_for_logits_of_1e4(dtype):
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [3.0, -2.0, 1e4]], dtype=dtype)
    labels = np.array([1, 0, 2])
    value, grad = losses.softmax_cross_entropy(z, labels)
    expected = math.fsum(_logsumexp([float(v) for v in row]) - float(row[k])
                         for row, k in zip(z, labels)) / 3
    assert math.isfinite(value) and np.isfinite(grad).all()
    assert abs(value - expected) <= 1e-12 * abs(expected)
    # softmax of these rows is one-hot at the maximum: grad = (p - y) / batch exactly
    p = np.zeros((3, 3))
    p[np.arange(3), z.argmax(axis=1)] = 1
    y = np.zeros((3, 3))
    y[np.arange(3), labels] = 1
    np.testing.assert_array_equal(grad, ((p - y) / 3).astype(dtype))
    # the same through probability rows
    value_p, grad_p = losses.softmax_cross_entropy(z, y)
    assert abs(value_p - expected) <= 1e-12 * abs(expected)
    np.testing.assert_array_equal(grad_p, grad)


def test_softmax_cross_entropy_exact_for_moderate_logits(rng):
    z = 20 * rng.standard_normal((6, 5))
    labels = rng.integers(0, 5, size=6)
    value, _ = losses.softmax_cross_entropy(z, labels)
    expected = math.fsum(_logsumexp(list(row)) - row[k] for row, k in zip(z, labels)) / 6
    assert abs(value - expected) <= 1e-12 * abs(expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_binary_cross_entropy_is_finite_for_logits_of_1e4(dtype):
    x = np.array([[1e4, -1e4], [-1e4, 1e4]], dtype=dtype)
    y = np.array([[0.0, 1.0], [0.0, 1.0]])
    value, grad = losses.binary_cross_entropy_with_logits(x, y)
    # the two wrong-sided logits cost 1e4 each, the right-sided ones log1p(exp(-1e4)) = 0
    assert value == pytest.approx(2e4 / 4, rel=1e-12)
    np.testing.assert_array_equal(grad, np.array([[1, -1], [0, 0]], dtype=dtype) / 4)


# ---- conversion ---------------------------------------------------------------------------

def test_targets_are_converted_to_the_outputs_dtype():
    z32 = np.zeros((3, 2), np.float32)
    _, grad = losses.softmax_cross_entropy(z32, [0, 1, 1])           # list of ints
    assert grad.dtype == np.float32
    _, grad = losses.softmax_cross_entropy(z32, np.array([0.0, 1.0, 1.0]))  # whole floats
    assert grad.dtype == np.float32
    _, grad = losses.softmax_cross_entropy(z32, np.array([[0], [1], [1]]))  # label column
    assert grad.dtype == np.float32
    _, grad = losses.mean_squared_error(np.zeros((3, 1), np.float32), [1, 2, 3])  # 1-D for k=1
    assert grad.dtype == np.float32 and grad.shape == (3, 1)
    value, grad = losses.mean_squared_error([[1], [2]], [[0], [0]])  # integer output: float64
    assert grad.dtype == np.float64 and value == 2.5
    # a non-contiguous output is fine: it is copied
    z = np.zeros((4, 6))[:, ::2]
    assert losses.softmax_cross_entropy(z, [0, 1, 2, 0])[1].flags.c_contiguous


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("target,match", [
    ([0, 1, 3], r"\[softmax_cross_entropy\] target labels must lie in \[0, 3\).*target\[2\] = 3"),
    ([0, -1, 2], r"labels must lie in \[0, 3\).*target\[1\] = -1"),
    ([0.0, 1.5, 2.0], r"whole-number class labels.*target\[1\] = 1.5"),
    ([0.0, np.nan, 2.0], r"must hold class labels.*target\[1\] = nan"),
    ([0, 1], r"target has 2 labels, but logits has 3 rows"),
    (np.zeros((3, 4)), r"target has 4 columns, but logits has 3"),
    (np.zeros((3, 3, 1)), r"must be 1-D class labels"),
])
def test_softmax_cross_entropy_label_errors(target, match):
    with pytest.raises(ValueError, match=match):
        losses.softmax_cross_entropy(np.zeros((3, 3)), target)


def test_loss_type_errors():
    with pytest.raises(TypeError, match=r"\[softmax_cross_entropy\] target must hold real"):
        losses.softmax_cross_entropy(np.zeros((2, 2)), np.array([True, False]))
    with pytest.raises(TypeError, match=r"target must be an array of numbers, but got None"):
        losses.mean_squared_error(np.zeros((2, 2)), None)
    with pytest.raises(TypeError, match=r"\[mean_squared_error\] output must be a float32"):
        losses.mean_squared_error(np.array([["a"]]), [[0.0]])
    with pytest.raises(ValueError, match=r"output must be 2-D"):
        losses.mean_squared_error(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"logits has 0 rows"):
        losses.softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, np.int64))


@pytest.mark.parametrize("fn", [losses.mean_squared_error,
                                losses.binary_cross_entropy_with_logits])
def test_same_shape_loss_errors(fn):
    name = fn.__name__
    with pytest.raises(ValueError, match=rf"\[{name}\] target has 3 columns, but .* has 2"):
        fn(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=rf"\[{name}\] target has 5 rows, but .* has 4"):
        fn(np.zeros((4, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"1-D targets are accepted only for a 1-wide"):
        fn(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match=r"target must be finite, but target\[1, 0\] = nan"):
        fn(np.zeros((2, 2)), np.array([[0.0, 0.0], [np.nan, 0.0]]))


def test_binary_cross_entropy_targets_must_be_probabilities():
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*target\[0, 1\] = 2.0"):
        losses.binary_cross_entropy_with_logits(np.zeros((1, 2)), [[0.0, 2.0]])


@pytest.mark.parametrize("weight,match", [
    ([1.0, np.nan, 1.0], r"sample_weight must be finite, but sample_weight\[1\] = nan"),
    ([1.0, -1.0, 1.0], r"sample_weight must be >= 0, but sample_weight\[1\] = -1.0"),
    ([0.0, 0.0, 0.0], r"sample_weight sums to 0"),
    ([1.0, 1.0], r"sample_weight has 2 entries, but logits has 3 rows"),
    (np.ones((3, 1)), r"sample_weight must be 1-D"),
])
def test_sample_weight_errors(weight, match):
    with pytest.raises(ValueError, match=r"\[softmax_cross_entropy\] " + match):
        losses.softmax_cross_entropy(np.zeros((3, 2)), [0, 1, 0], weight)


# ---- sample weights -----------------------------------------------------------------------

@pytest.mark.parametrize("name,kind", CASES)
def test_integer_weights_equal_repeated_rows(name, kind, rng):
    fn, _ = LOSSES[name]
    z = rng.standard_normal((4, 3))
    y = _target(name, rng, 4, 3, kind)
    w = np.array([2, 0, 1, 3])
    value, grad = fn(z, y, w)
    rows = np.repeat(np.arange(4), w)
    value_rep, grad_rep = fn(z[rows], y[rows])
    assert value == pytest.approx(value_rep, rel=1e-12)
    # the repeated rows' gradients add up to the weighted row's gradient
    summed = np.zeros_like(grad)
    np.add.at(summed, rows, grad_rep)
    np.testing.assert_allclose(grad, summed, rtol=1e-12, atol=1e-15)
    # only the ratios of the weights matter
    value_scaled, grad_scaled = fn(z, y, 10 * w)
    assert value_scaled == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(grad_scaled, grad, rtol=1e-12, atol=1e-15)


# ---- the registry -------------------------------------------------------------------------

def test_get_loss_names_aliases_and_callables():
    assert losses.get_loss("softmax_cross_entropy") is losses.softmax_cross_entropy
    assert losses.get_loss("mse") is losses.mean_squared_error
    assert losses.get_loss("bce_with_logits") is losses.binary_cross_entropy_with_logits
    assert set(losses.LOSSES.values()) == {losses.softmax_cross_entropy,
                                           losses.mean_squared_error,
                                           losses.binary_cross_entropy_with_logits,
                                           losses.huber, losses.mean_absolute_error,
                                           losses.poisson_nll}

    def mine(output, target, sample_weight=None):
        return 0.0, np.zeros_like(output)

    assert losses.get_loss(mine) is mine
    with pytest.raises(ValueError, match=r"\[get_loss\] unknown loss 'hinge'"):
        losses.get_loss("hinge")
    with pytest.raises(TypeError, match=r"\[get_loss\] loss must be a name"):
        losses.get_loss(3)
    with pytest.raises(TypeError):
        losses.LOSSES["hinge"] = mine  # read-only


# ---- user-defined losses in fit -----------------------------------------------------------

def numpy_mse(output, target, sample_weight=None):
    """Mean squared error in plain NumPy, with the built-in's signature."""
    r = output - target
    if sample_weight is None:
        sample_weight = np.ones(len(output))
    w = sample_weight / (sample_weight.sum() * output.shape[1])
    return float((w[:, None] * r * r).sum()), 2 * w[:, None] * r


def test_user_loss_trains_like_the_builtin(make_network, rng):
    X = rng.standard_normal((40, 3))
    y = np.sin(X @ np.array([[1.0], [-2.0], [0.5]]))
    w = rng.random(40) + 0.5
    nets = []
    for loss in ("mean_squared_error", numpy_mse):
        net = make_network([(3, 8, "tanh"), (8, 1)], seed=3)
        bprop.fit(net, X, y, loss=loss, optimizer=bprop.optim.Adam(net, lr=1e-2), epochs=5,
                  batch_size=8, seed=1, sample_weight=w)
        nets.append(net)
    for (_, a, _), (_, b, _) in zip(nets[0].parameters(), nets[1].parameters()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    before = bprop.evaluate(nets[1], X, y, loss=numpy_mse)["loss"]
    assert before == pytest.approx(bprop.evaluate(nets[0], X, y, loss="mse")["loss"], rel=1e-12)


def test_user_loss_in_a_float32_network_gets_its_grad_converted(make_network, rng):
    X = rng.standard_normal((16, 3))
    y = rng.standard_normal((16, 1))

    def float64_grad(output, target, sample_weight=None):
        value, grad = numpy_mse(output.astype(np.float64), target)
        return value, grad  # float64 grad for a float32 network: fit converts it

    net = make_network([(3, 4, "tanh"), (4, 1)], dtype="float32")
    history = bprop.fit(net, X, y, loss=float64_grad, epochs=3, seed=0)
    assert history.loss[-1] < history.loss[0]


def test_user_loss_returning_the_wrong_things(make_network, rng):
    X = rng.standard_normal((8, 3))
    y = rng.standard_normal((8, 2))
    net = make_network([(3, 2)])
    with pytest.raises(ValueError, match=r"\[fit\] the loss bad_shape returned grad_output of "
                                         r"shape \(8,\), but the output has shape \(8, 2\)"):
        def bad_shape(output, target, sample_weight=None):
            return 0.0, np.zeros(len(output))
        bprop.fit(net, X, y, loss=bad_shape, batch_size=8)
    with pytest.raises(TypeError, match=r"\[fit\] the loss no_tuple must return"):
        def no_tuple(output, target, sample_weight=None):
            return 0.0
        bprop.fit(net, X, y, loss=no_tuple, batch_size=8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy_refuses_probability_rows_that_do_not_sum_to_one(dtype):
    # Regression: rows summing to 1.5 were accepted (and trained on).
    logits = np.zeros((3, 2), dtype=dtype)
    bad = np.array([[0.2, 0.8], [0.5, 1.0], [1.0, 0.0]], dtype=dtype)
    with pytest.raises(ValueError, match=r"\[softmax_cross_entropy\] target holds probability "
                                         r"rows, which must sum to 1 \(to within [0-9.e-]+\), "
                                         r"but row 1 sums to 1.5; give class labels"):
        bprop.losses.softmax_cross_entropy(logits, bad)
    net = bprop.Network([bprop.Dense(2, 2)], dtype=dtype, seed=0)
    before = net.layers[0].weight.copy()
    with pytest.raises(ValueError, match=r"\[fit\] y holds probability rows.*row 1 sums to 1.5"):
        bprop.fit(net, np.zeros((3, 2)), bad, epochs=1)
    np.testing.assert_array_equal(net.layers[0].weight, before)
    # rounding of a normalisation is accepted: float32 rows made in float32, float64 in
    # float64, and float32 rows given to a float64 network
    rng = np.random.default_rng(0)
    p = rng.random((50, 7)).astype(dtype)
    p /= p.sum(axis=1, keepdims=True)
    bprop.losses.softmax_cross_entropy(np.zeros((50, 7), dtype=dtype), p)
    p32 = rng.random((50, 7)).astype(np.float32)
    p32 /= p32.sum(axis=1, keepdims=True)
    bprop.losses.softmax_cross_entropy(np.zeros((50, 7)), p32)
    with pytest.raises(ValueError, match="must hold probabilities in"):
        bprop.losses.softmax_cross_entropy(logits, np.array([[1.5, -0.5]] * 3, dtype=dtype))

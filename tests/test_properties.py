"""Property tests (issue 5, item 4), with hypothesis: random architectures, batch
sizes from 1, both dtypes and any memory layout.

* Row i of a batch's output is the output of row i alone (to rounding: a BLAS
  kernel for a one-row product may sum in another order than the batched one);
* the mean loss and the summed gradients do not depend on the order of the rows;
* predict gives the same bits for any layout of the same numbers, and forward
  refuses every layout but C-contiguous;
* forward and backward agree with the NumPy reference, and gradcheck passes.

Tolerances: relative to the largest magnitude of the compared array, 1e-12 in
float64 and 1e-5 in float32 (the suite's RTOL), a little looser where a chain of
layers multiplies the rounding (stated at each check).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bprop
from bprop import losses, reference

ACTIVATIONS = list(bprop.ACTIVATIONS)
SMOOTH = ["identity", "sigmoid", "tanh", "gelu", "softmax", "silu", "softplus"]
RTOL = {"float32": 1e-5, "float64": 1e-12}

# derandomize: CI sees the same examples every run (a gate must not flake); set
# derandomize=False locally to explore new ones.
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def architectures(draw, activations=ACTIVATIONS, max_layers=3, max_width=12):
    """[(in, out, activation, negative_slope), ...] with chaining widths."""
    n_layers = draw(st.integers(1, max_layers))
    widths = draw(st.lists(st.integers(1, max_width), min_size=n_layers + 1,
                           max_size=n_layers + 1))
    specs = []
    for i in range(n_layers):
        activation = draw(st.sampled_from(activations))
        slope = draw(st.sampled_from([0.01, 0.2, -0.5])) if activation == "leaky_relu" else 0.01
        specs.append((widths[i], widths[i + 1], activation, slope))
    return specs


def _network(module, specs, dtype, seed):
    layers = [module.Dense(n_in, n_out, act, negative_slope=slope)
              for n_in, n_out, act, slope in specs]
    return module.Network(layers, dtype=dtype, seed=seed)


def _inputs(draw, rows, cols, bound=3.0):
    return draw(hnp.arrays(np.float64, (rows, cols),
                           elements=st.floats(-bound, bound, allow_nan=False, width=64)))


LAYOUTS = {
    "C": lambda X: np.ascontiguousarray(X),
    "fortran": lambda X: np.asfortranarray(X),
    "row-strided": lambda X: np.repeat(X, 2, axis=0)[::2],
    "column-strided": lambda X: np.repeat(X, 2, axis=1)[:, ::2],
    "reversed": lambda X: np.ascontiguousarray(X[::-1])[::-1],
    "transposed": lambda X: np.ascontiguousarray(X.T).T,
    "read-only": lambda X: _read_only(X),
}


def _read_only(X):
    X = np.array(X)
    X.setflags(write=False)
    return X


def _close(actual, desired, rtol, what="", floor=0.0):
    """|actual - desired| <= rtol * max(max|desired|, floor) elementwise (the
    suite's measure: rounding is bounded by the terms' magnitudes, not by the
    entry's value). `floor` is the size of the terms where the result may cancel
    to nothing (a softmax JVP of a constant gradient is exactly 0)."""
    desired = np.asarray(desired, dtype=np.float64)
    scale = max(float(np.max(np.abs(desired))) if desired.size else 0.0, floor)
    # below the smallest normal number the dtype rounds absolutely (subnormals)
    tiny = float(np.finfo(np.asarray(actual).dtype).tiny)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale + tiny,
                               err_msg=what)


@settings(max_examples=200, **SETTINGS)
@given(data=st.data(), specs=architectures(), dtype=st.sampled_from(["float32", "float64"]),
       rows=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_each_row_of_a_batch_is_the_row_alone(data, specs, dtype, rows, seed):
    net = _network(bprop, specs, dtype, seed)
    X = _inputs(data.draw, rows, specs[0][0]).astype(dtype)
    batch = net.predict(X)
    forward = net.forward(X)
    assert forward.tobytes() == batch.tobytes()  # the training path computes the same
    for i in range(rows):
        alone = net.predict(X[i:i + 1])
        _close(batch[i:i + 1], alone, 4 * RTOL[dtype], f"row {i}")
    # chunks of any size give the same rows
    chunk = data.draw(st.integers(1, rows))
    _close(net.predict(X, batch_size=chunk), batch, 4 * RTOL[dtype], f"chunks of {chunk}")


@settings(max_examples=150, **SETTINGS)
@given(data=st.data(), specs=architectures(), dtype=st.sampled_from(["float32", "float64"]),
       rows=st.integers(1, 17), seed=st.integers(0, 2**16),
       loss=st.sampled_from(["softmax_cross_entropy", "binary_cross_entropy_with_logits",
                             "mean_squared_error"]), weighted=st.booleans())
def test_loss_and_gradients_do_not_depend_on_the_order_of_the_rows(data, specs, dtype, rows,
                                                                    seed, loss, weighted):
    net = _network(bprop, specs, dtype, seed)
    k = specs[-1][1]
    X = _inputs(data.draw, rows, specs[0][0]).astype(dtype)
    if loss == "softmax_cross_entropy":
        y = np.asarray(data.draw(st.lists(st.integers(0, k - 1), min_size=rows,
                                          max_size=rows)), dtype=np.int64)
    else:
        y = data.draw(hnp.arrays(dtype, (rows, k), elements=st.floats(0, 1, width=32)))
    w = None
    if weighted:
        w = data.draw(hnp.arrays(dtype, rows, elements=st.floats(0.25, 4, width=32)))
    perm = np.asarray(data.draw(st.permutations(range(rows))))
    fn = losses.get_loss(loss)

    def run(order):
        value, grad = fn(net.forward(X[order]), y[order], None if w is None else w[order])
        net.backward(grad)
        return value, [g.copy() for _, _, g in net.parameters()]

    v0, g0 = run(np.arange(rows))
    v1, g1 = run(perm)
    assert abs(v1 - v0) <= 4 * RTOL[dtype] * max(1.0, abs(v0))
    for a, b in zip(g1, g0):
        _close(a, b, 16 * RTOL[dtype], "gradient")


@settings(max_examples=150, **SETTINGS)
@given(data=st.data(), specs=architectures(), dtype=st.sampled_from(["float32", "float64"]),
       rows=st.integers(1, 9), seed=st.integers(0, 2**16),
       layout=st.sampled_from(list(LAYOUTS)))
def test_results_do_not_depend_on_the_memory_layout(data, specs, dtype, rows, seed, layout):
    net = _network(bprop, specs, dtype, seed)
    X = _inputs(data.draw, rows, specs[0][0]).astype(dtype)
    Y = LAYOUTS[layout](X)
    np.testing.assert_array_equal(Y, X)
    assert net.predict(Y).tobytes() == net.predict(X).tobytes()
    if Y.flags.c_contiguous:
        assert net.forward(Y).tobytes() == net.forward(X).tobytes()
    else:
        with pytest.raises(ValueError, match=r"^\[Network\.forward\] X must be C-contiguous"):
            net.forward(Y)
    # another dtype is converted by predict, refused by forward
    other = X.astype("float32" if dtype == "float64" else "float64")
    assert net.predict(other).tobytes() == net.predict(other.astype(dtype)).tobytes()
    with pytest.raises(TypeError, match=rf"^\[Network\.forward\] X must have dtype {dtype}"):
        net.forward(other)


@settings(max_examples=200, **SETTINGS)
@given(data=st.data(), specs=architectures(), dtype=st.sampled_from(["float32", "float64"]),
       rows=st.integers(1, 9), seed=st.integers(0, 2**16), accumulate=st.booleans())
def test_forward_and_backward_match_the_reference(data, specs, dtype, rows, seed, accumulate):
    net = _network(bprop, specs, dtype, seed)
    # the reference in float64 from the same weights: it computes the float32 network's
    # exact result, so that the comparison measures bprop's rounding alone
    ref = _network(reference, specs, "float64", seed)
    for L, R in zip(net.layers, ref.layers):
        R.weight, R.bias = L.weight, L.bias
    X = _inputs(data.draw, rows, specs[0][0]).astype(dtype)
    G = _inputs(data.draw, rows, specs[-1][1], bound=1.0).astype(dtype)
    rtol = RTOL[dtype] * (4 if dtype == "float32" else 16)
    desired = ref.forward(X.astype(np.float64))
    # The output may cancel to far below the size of its terms (gelu of z = -3.7
    # is -1e-4 while z sums terms of size 2): the floor is the size of the last
    # layer's terms, sum_j |a_j W_jk| + |b_k|, which bounds how far rounding in z
    # and in the layers below can move the output (every activation's slope <= 1.76,
    # selu's scale * alpha).
    last = ref.layers[-1]
    terms = (np.abs(last.input) @ np.abs(last.weight) + np.abs(last.bias)).max()
    _close(net.forward(X), desired, rtol, "output", floor=1.76 * float(terms))
    dX = net.backward(G, input_grad=True)
    dX_ref = ref.backward(G.astype(np.float64), input_grad=True)
    g = float(np.abs(G).max())  # the size of the terms of every backward quantity
    _close(dX, dX_ref, rtol, "dL/dX", floor=g)
    if accumulate:
        net.backward(G, accumulate=True)
        ref.backward(G.astype(np.float64), accumulate=True)
    for i, (L, R) in enumerate(zip(net.layers, ref.layers)):
        a = max(1.0, float(np.abs(R.input).max()))
        _close(L.grad_weight, R.grad_weight, rtol, f"layer {i} grad_weight", floor=g * a)
        _close(L.grad_bias, R.grad_bias, rtol, f"layer {i} grad_bias", floor=g)
        _close(L.delta, R.delta, rtol, f"layer {i} delta", floor=g)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), specs=architectures(activations=SMOOTH, max_layers=2, max_width=5),
       rows=st.integers(1, 4), seed=st.integers(0, 2**16),
       loss=st.sampled_from(["softmax_cross_entropy", "mean_squared_error"]))
def test_gradcheck_passes_on_small_random_networks(data, specs, rows, seed, loss):
    net = _network(bprop, specs, "float64", seed)
    k = specs[-1][1]
    X = _inputs(data.draw, rows, specs[0][0], bound=2.0)
    if loss == "softmax_cross_entropy":
        y = np.asarray(data.draw(st.lists(st.integers(0, k - 1), min_size=rows,
                                          max_size=rows)))
    else:
        y = _inputs(data.draw, rows, k, bound=1.0)
    # gradcheck's error is relative to the layer's largest gradient, while the
    # central difference's own error is absolute: rounding in the two loss values,
    # about 1e-16 * |L| / eps = 1e-10 * |L| with eps = 1e-6 (plus O(eps^2)
    # truncation). With |L| ~ 1.6 and a layer gradient of 1e-4 that alone is 1.6e-6,
    # over the 1e-6 limit while backprop is right (found by a random run: x = 0
    # into a 2-wide softmax layer); from 1e-3 up it stays below 2e-7.
    value, grad = losses.get_loss(loss)(net.forward(X), y)
    net.backward(grad)
    assume(all(max(np.abs(L.grad_weight).max(), np.abs(L.grad_bias).max()) > 1e-3
               for L in net.layers))
    errors = bprop.gradcheck(net, X, y, loss=loss, max_checks=12, seed=seed)
    assert max(errors.values()) <= 1e-6, errors

"""Bad input: a clear error naming the call, the argument, what was expected and
what arrived; never a crash, a silent copy or a corrupted network. A failed call
leaves the network as it was."""

from __future__ import annotations

import re

import numpy as np
import pytest

import bprop
from bprop import reference
from bprop.activations import ROWS

SPECS = [(4, 6, "tanh"), (6, 3, "relu"), (3, 2, "softmax")]
NOT_CONTIGUOUS = r"must be C-contiguous \(row-major\) and aligned, but it is not"


@pytest.fixture(params=["float32", "float64"])
def net(request, make_network):
    return make_network(SPECS, request.param, seed=5)


def _x(net, batch=5, rng=None):
    rng = rng or np.random.default_rng(0)
    return rng.standard_normal((batch, net.in_features)).astype(net.dtype)


def _g(net, batch=5, rng=None):
    rng = rng or np.random.default_rng(1)
    return rng.standard_normal((batch, net.out_features)).astype(net.dtype)


def _state(net):
    """A copy of everything a call could change: parameters, gradients, caches."""
    state = {}
    for i, L in enumerate(net.layers):
        for name in ("weight", "bias", "grad_weight", "grad_bias", "input", "z", "output",
                     "delta"):
            value = getattr(L, name)
            state[f"{i}.{name}"] = None if value is None else value.copy()
    return state


def _assert_same_state(net, before):
    after = _state(net)
    assert after.keys() == before.keys()
    for key in before:
        if before[key] is None:
            assert after[key] is None, key
        else:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.fixture
def trained(net):
    """A network after forward, backward and step, and a snapshot of its state."""
    X, G = _x(net), _g(net)
    net.forward(X)
    net.backward(G)
    net.step(0.1)
    net.forward(X)
    net.backward(G)
    return net, X, G, _state(net)


def _bad_array(case, dtype, rows, cols):
    """(array, error type, message after the argument's name) for one way an array
    passed to forward or backward can be wrong; (rows, cols) is the right shape."""
    dt = np.dtype(dtype).name
    other = "float32" if dt == "float64" else "float64"
    wrong_dtype = (rf"must have dtype {dt}, but has dtype {{}}; convert it once with "
                   rf"np.ascontiguousarray\(\w+, dtype=np.{dt}\)")
    not_array = rf"must be a numpy.ndarray of dtype {dt}, but got {{}}"
    good = np.ones((rows, cols), dtype=dt)
    if case in ("int64", "int32", "bool", "float16", "object", "complex128"):
        return np.ones((rows, cols), case), TypeError, wrong_dtype.format(case)
    if case == "other-float":
        return np.ones((rows, cols), other), TypeError, wrong_dtype.format(other)
    if case == "str-array":
        return np.full((rows, cols), "1"), TypeError, wrong_dtype.format("<U1")
    if case == "None":
        return None, TypeError, not_array.format("NoneType")
    if case == "str":
        return "1.0", TypeError, not_array.format("str")
    if case == "list":
        return good.tolist(), TypeError, not_array.format("list")
    if case == "ragged-list":
        return [[1.0] * cols, [1.0] * (cols + 1)], TypeError, not_array.format("list")
    if case == "scalar":
        return good[0, 0], TypeError, not_array.format(r"numpy\.float\d\d")
    if case == "1-D":
        return good[0], ValueError, rf"must be 2-D \(batch, features\), but has shape \({cols},\)"
    if case == "3-D":
        return good[None], ValueError, rf"must be 2-D .* but has shape \(1, {rows}, {cols}\)"
    if case == "0-D":
        return good[0, 0, ...], ValueError, r"must be 2-D .* but has shape \(\)"
    if case == "fortran":
        return np.asfortranarray(good), ValueError, NOT_CONTIGUOUS
    if case == "transposed":
        return np.ones((cols, rows), dt).T, ValueError, NOT_CONTIGUOUS
    if case == "column-strided":
        return np.ones((rows, 2 * cols), dt)[:, ::2], ValueError, NOT_CONTIGUOUS
    if case == "row-strided":
        return np.ones((2 * rows, cols), dt)[::2], ValueError, NOT_CONTIGUOUS
    if case == "unaligned":
        raw = np.zeros(good.nbytes + 1, np.uint8)[1:]
        return raw.view(dt).reshape(rows, cols), ValueError, NOT_CONTIGUOUS
    raise AssertionError(case)


BAD_ARRAYS = ["int64", "int32", "bool", "float16", "object", "complex128", "other-float",
              "str-array", "None", "str", "list", "ragged-list", "scalar", "1-D", "3-D", "0-D",
              "fortran", "transposed", "column-strided", "row-strided", "unaligned"]


@pytest.mark.parametrize("case", BAD_ARRAYS + ["features", "0-rows"])
def test_forward_rejects_bad_input(net, case):
    good_X = _x(net)
    net.forward(good_X)
    net.backward(_g(net))
    before = _state(net)
    if case == "features":
        X, error, message = (np.ones((5, 3), net.dtype), ValueError,
                             r"has 3 features, but layer 0 expects 4")
    elif case == "0-rows":
        X, error, message = (np.ones((0, 4), net.dtype), ValueError,
                             r"has 0 rows; expected at least one sample")
    else:
        X, error, message = _bad_array(case, net.dtype, 5, net.in_features)
    with pytest.raises(error, match=r"^\[Network\.forward\] X " + message):
        net.forward(X)
    _assert_same_state(net, before)
    # the network still holds the good forward: backward runs against it
    assert np.shares_memory(net.layers[0].input, good_X)
    net.backward(_g(net))
    _assert_same_state(net, before)


@pytest.mark.parametrize("kwargs", [{}, {"accumulate": True}, {"input_grad": True}],
                         ids=["plain", "accumulate", "input_grad"])
@pytest.mark.parametrize("case", BAD_ARRAYS + ["batch", "larger-batch", "width", "0-rows"])
def test_backward_rejects_bad_input(net, case, kwargs):
    net.forward(_x(net))
    net.backward(_g(net))
    before = _state(net)
    shapes = {"batch": (4, 2), "larger-batch": (6, 2), "width": (5, 3), "0-rows": (0, 2)}
    if case in shapes:
        G, error = np.ones(shapes[case], net.dtype), ValueError
        message = (r"has shape \({}, {}\), but the last forward produced an output of "
                   r"shape \(5, 2\)").format(*shapes[case])
    else:
        G, error, message = _bad_array(case, net.dtype, 5, net.out_features)
    with pytest.raises(error, match=r"^\[Network\.backward\] grad_output " + message):
        net.backward(G, **kwargs)
    _assert_same_state(net, before)


@pytest.mark.parametrize("name", ["accumulate", "input_grad"])
@pytest.mark.parametrize("value", [1, 0, None, "yes", 1.0])
def test_backward_flags_must_be_bools(trained, name, value):
    net, _, G, before = trained
    with pytest.raises(TypeError, match=rf"\[Network\.backward\] {name} must be a bool, "
                                        rf"but got {type(value).__name__}"):
        net.backward(G, **{name: value})
    _assert_same_state(net, before)
    net.backward(G, **{name: np.bool_(True)})  # NumPy's bool is a bool


def test_backward_before_forward_is_a_runtime_error(net):
    before = _state(net)
    with pytest.raises(RuntimeError, match=r"\[Network\.backward\] called before forward: "
                                           r"run forward\(X\) first"):
        net.backward(_g(net), input_grad=True)
    _assert_same_state(net, before)


def test_step_before_backward_is_a_runtime_error(net):
    with pytest.raises(RuntimeError, match=r"\[Network\.step\] called before backward"):
        net.step(0.1)
    net.forward(_x(net))  # a forward alone gives no gradients either
    before = _state(net)
    with pytest.raises(RuntimeError, match=r"\[Network\.step\] called before backward"):
        net.step(0.1)
    _assert_same_state(net, before)


@pytest.mark.parametrize("lr, error, message", [
    (float("nan"), ValueError, r"lr must be finite, but got nan"),
    (float("inf"), ValueError, r"lr must be finite, but got inf"),
    (-float("inf"), ValueError, r"lr must be finite, but got -inf"),
    (-0.1, ValueError, r"lr must be >= 0.0, but got -0.1"),
    (np.float32(-1), ValueError, r"lr must be >= 0.0, but got -1.0"),
    (True, TypeError, r"lr must be a real number, but got bool True"),
    (np.bool_(False), TypeError, r"lr must be a real number, but got bool"),
    (None, TypeError, r"lr must be a real number, but got NoneType None"),
    ("0.1", TypeError, r"lr must be a real number, but got str '0.1'"),
    (1 + 0j, TypeError, r"lr must be a real number, but got complex"),
    (np.array([0.1]), TypeError, r"lr must be a real number, but got ndarray"),
])
def test_step_rejects_bad_learning_rates(trained, lr, error, message):
    net, _, _, before = trained
    with pytest.raises(error, match=r"^\[Network\.step\] " + message):
        net.step(lr)
    _assert_same_state(net, before)


def test_step_rejects_a_learning_rate_that_overflows_float32(make_network):
    """1e39 is a finite float64 but inf as a float32: refused before it reaches the core."""
    net = make_network(SPECS, "float32", seed=5)
    net.forward(_x(net))
    net.backward(_g(net))
    before = _state(net)
    with pytest.raises(ValueError, match=r"\[Network\.step\] lr must be <= 3\.4\d*e\+38, but got 1e\+39"):
        net.step(1e39)
    _assert_same_state(net, before)


def test_step_accepts_numpy_and_integer_learning_rates(trained):
    net, _, _, _ = trained
    for lr in (0, 1, np.float32(0.01), np.float64(0.01), np.int64(0)):
        net.step(lr)


@pytest.mark.parametrize("args, error, message", [
    ((0, 3), ValueError, r"in_features must be >= 1, but got 0"),
    ((-2, 3), ValueError, r"in_features must be >= 1, but got -2"),
    ((3, 0), ValueError, r"out_features must be >= 1, but got 0"),
    ((3, -1), ValueError, r"out_features must be >= 1, but got -1"),
    ((2**40, 2), ValueError, (r"in_features \* out_features = 1099511627776 \* 2 exceeds "
                              r"the limit of 1099511627776 weights per layer")),
    ((2**62, 2**62), ValueError, r"in_features \* out_features = \d+ \* \d+ exceeds the limit"),
    ((2**64 + 1, 1), ValueError, r"in_features \* out_features = 18446744073709551617 \* 1 "),
    ((3.0, 3), TypeError, r"in_features must be an int, but got float 3.0"),
    ((3, True), TypeError, r"out_features must be an int, but got bool True"),
    (("3", 3), TypeError, r"in_features must be an int, but got str '3'"),
    ((None, 3), TypeError, r"in_features must be an int, but got NoneType"),
])
def test_dense_rejects_bad_sizes(args, error, message):
    with pytest.raises(error, match=r"^\[Dense\] " + message):
        bprop.Dense(*args)


# Names that are not bprop's: other libraries' (scikit-learn's "logistic", torch's
# module names), wrong case or stray spaces around each registry name, and the empty
# string. Filtered through the registry, so that a new row naming one of them moves
# it out of this list instead of breaking the test.
UNKNOWN_ACTIVATIONS = [name for name in dict.fromkeys(
    ["swish", "linear", "logistic", "", *(row.torch for row in ROWS),
     *(name.upper() for name in bprop.ACTIVATIONS),
     *(f" {name}" for name in bprop.ACTIVATIONS), *(f"{name} " for name in bprop.ACTIVATIONS)])
    if name not in bprop.ACTIVATIONS]


@pytest.mark.parametrize("activation", UNKNOWN_ACTIVATIONS)
def test_dense_rejects_unknown_activations(activation):
    # the message lists every row of the registry, in its order
    names = re.escape(repr(tuple(row.name for row in ROWS)))
    with pytest.raises(ValueError, match=rf"^\[Dense\] activation must be one of {names}, "
                                         rf"but got {re.escape(repr(activation))}$"):
        bprop.Dense(3, 3, activation)


@pytest.mark.parametrize("activation", [None, 3, b"relu", np.str_])
def test_dense_rejects_activations_that_are_not_str(activation):
    with pytest.raises(TypeError, match=r"^\[Dense\] activation must be a str"):
        bprop.Dense(3, 3, activation)


@pytest.mark.parametrize("slope, error, message", [
    (float("nan"), ValueError, r"negative_slope must be finite, but got nan"),
    (float("inf"), ValueError, r"negative_slope must be finite, but got inf"),
    ("0.1", TypeError, r"negative_slope must be a real number, but got str"),
    (True, TypeError, r"negative_slope must be a real number, but got bool"),
])
def test_dense_rejects_bad_negative_slopes(slope, error, message):
    with pytest.raises(error, match=r"^\[Dense\] " + message):
        bprop.Dense(3, 3, "leaky_relu", negative_slope=slope)


@pytest.mark.parametrize("layers, error, message", [
    ([], ValueError, r"layers must hold at least one layer, but got none"),
    ((), ValueError, r"layers must hold at least one layer, but got none"),
    (None, TypeError, r"layers must be a list of layers, but got NoneType"),
    ("dense", TypeError, r"layers must be a list of layers, but got str"),
    ([(3, 3, "relu", 0.01)], TypeError, r"layers\[0\] must be a bprop layer \(Dense, .*\), but got tuple"),
])
def test_network_rejects_bad_layer_lists(layers, error, message):
    with pytest.raises(error, match=r"^\[Network\] " + message):
        bprop.Network(layers)


def test_network_rejects_a_single_dense_and_a_generator():
    with pytest.raises(TypeError, match=r"^\[Network\] layers must be a list of layers, "
                                        r"but got Dense"):
        bprop.Network(bprop.Dense(2, 2))
    with pytest.raises(TypeError, match=r"but got generator"):
        bprop.Network(bprop.Dense(2, 2) for _ in range(2))
    with pytest.raises(TypeError, match=r"layers\[1\] must be a bprop layer \(Dense, .*, but got str"):
        bprop.Network([bprop.Dense(2, 2), "relu"])


def test_network_rejects_widths_that_do_not_chain():
    first, second = bprop.Dense(3, 4), bprop.Dense(5, 2)
    with pytest.raises(ValueError, match=r"^\[Network\] layer 1 expects 5 input features, "
                                         r"but layer 0 produces 4"):
        bprop.Network([first, second])
    with pytest.raises(ValueError, match=r"layer 2 expects 3 input features, but layer 1 "
                                         r"produces 2"):
        bprop.Network([bprop.Dense(3, 5), bprop.Dense(5, 2), bprop.Dense(3, 1)])
    # the failed network left the layers free to join another one
    net = bprop.Network([first, bprop.Dense(4, 2)])
    assert net.layers[0] is first


@pytest.mark.parametrize("dtype", ["float16", "int32", "int64", "complex128", "longdouble",
                                   "bogus", "", np.float16, np.int32, object,
                                   np.dtype("f8").newbyteorder(), np.dtype("f4").newbyteorder()])
def test_network_rejects_unsupported_dtypes(dtype):
    layer = bprop.Dense(2, 2)
    with pytest.raises(ValueError, match=r"^\[Network\] dtype must be 'float32' or 'float64', "
                                         r"but got "):
        bprop.Network([layer], dtype=dtype)
    bprop.Network([layer], dtype="float32")  # the layer is still free


@pytest.mark.parametrize("dtype, expected", [("float32", np.float32), ("float64", np.float64),
                                             (np.float32, np.float32), (np.dtype("f8"),
                                                                        np.float64)])
def test_network_accepts_both_float_dtypes_in_any_spelling(dtype, expected):
    assert bprop.Network([bprop.Dense(2, 2)], dtype=dtype).dtype == np.dtype(expected)


@pytest.mark.parametrize("seed, error, message", [
    (-1, ValueError, r"seed must be >= 0, but got -1"),
    (1.5, TypeError, r"seed must be an int, but got float 1.5"),
    (True, TypeError, r"seed must be an int, but got bool True"),
    ("0", TypeError, r"seed must be an int, but got str '0'"),
])
def test_network_rejects_bad_seeds(seed, error, message):
    with pytest.raises(error, match=r"^\[Network\] " + message):
        bprop.Network([bprop.Dense(2, 2)], seed=seed)


def test_a_dense_belongs_to_one_network():
    shared = bprop.Dense(3, 3, "relu")
    first = bprop.Network([shared, bprop.Dense(3, 1)], seed=0)
    weight = shared.weight.copy()
    with pytest.raises(ValueError, match=r"^\[Network\] layers\[1\] already belongs to another "
                                         r"Network; create a new Dense for each network"):
        bprop.Network([bprop.Dense(3, 3), shared], seed=1)
    with pytest.raises(ValueError, match=r"^\[Network\] the same Dense object appears twice"):
        bprop.Network([(twice := bprop.Dense(3, 3)), twice])
    # the first network still owns the layer, unchanged
    assert first.layers[0] is shared
    np.testing.assert_array_equal(shared.weight, weight)
    assert np.shares_memory(shared.weight, first._core.parameter_views()[0][1])


@pytest.mark.parametrize("X, error, message", [
    (None, TypeError, r"X must be a 2-D array of numbers, but got None"),
    ([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], ValueError,
     r"X must be a rectangular 2-D array, but got a ragged list"),
    (np.ones((3, 4), complex), TypeError,
     r"X must hold real numbers \(integer or floating\), but has dtype complex128"),
    (np.ones((3, 4), bool), TypeError, r"X must hold real numbers .* but has dtype bool"),
    (np.ones((3, 4), object), TypeError, r"X must hold real numbers .* but has dtype object"),
    (np.full((3, 4), "1"), TypeError, r"X must hold real numbers .* but has dtype <U1"),
    (np.ones(4), ValueError, (r"X must be 2-D \(samples, features\), but has shape \(4,\); "
                              r"use X.reshape\(1, -1\) for a single sample")),
    (np.ones((2, 3, 4)), ValueError, r"X must be 2-D \(samples, features\), but has shape"),
    (np.ones((3, 5)), ValueError, r"X has 5 features, but the network expects 4"),
    (np.ones((0, 4)), ValueError, r"X has 0 samples; expected at least one"),
])
def test_predict_rejects_bad_input(trained, X, error, message):
    net, _, _, before = trained
    with pytest.raises(error, match=r"^\[Network\.predict\] " + message):
        net.predict(X)
    _assert_same_state(net, before)


@pytest.mark.parametrize("batch_size, error, message", [
    (0, ValueError, r"batch_size must be >= 1, but got 0"),
    (-4, ValueError, r"batch_size must be >= 1, but got -4"),
    (2.0, TypeError, r"batch_size must be an int, but got float 2.0"),
    (True, TypeError, r"batch_size must be an int, but got bool True"),
])
def test_predict_rejects_bad_batch_sizes(trained, batch_size, error, message):
    net, X, _, before = trained
    with pytest.raises(error, match=r"^\[Network\.predict\] " + message):
        net.predict(X, batch_size=batch_size)
    _assert_same_state(net, before)


def test_a_failed_backward_after_a_good_one_leaves_the_gradients(trained):
    """The regression the issue names: gradients stay those of the last good backward."""
    net, _, G, before = trained
    grads = [L.grad_weight.copy() for L in net.layers]
    with pytest.raises(ValueError, match="grad_output has shape"):
        net.backward(np.ones((2, 2), net.dtype), accumulate=True)
    for L, g in zip(net.layers, grads):
        np.testing.assert_array_equal(L.grad_weight, g)
    _assert_same_state(net, before)
    # and the network is still usable: the same backward gives the same gradients
    net.backward(G)
    _assert_same_state(net, before)


@pytest.mark.parametrize("kind", ["csr_matrix", "csr_array", "coo_matrix"])
def test_sparse_input_is_refused_with_how_to_densify(kind):
    # Regression: a scipy.sparse X gave "X must hold real numbers ... dtype object".
    # bprop's Network and fit take sparse X (tests/test_sparse.py); the NumPy
    # reference does not, and says how to densify.
    sparse = pytest.importorskip("scipy.sparse")
    X = getattr(sparse, kind)(np.eye(3, 5))
    ref = reference.Network([reference.Dense(5, 2)], seed=0)
    message = (rf"X is a sparse matrix \({kind}, shape \(3, 5\)\), which "
               r"reference.Network.predict does not take; densify it with X.toarray\(\) "
               r"\(this needs 3 x 5 x 4 = 60 bytes\)")
    with pytest.raises(TypeError, match=r"\[reference.Network.predict\] " + message):
        ref.predict(X)
    net = bprop.Network([bprop.Dense(5, 2)], seed=0)
    np.testing.assert_allclose(net.predict(X), net.predict(X.toarray()), rtol=1e-6)

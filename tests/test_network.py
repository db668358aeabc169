"""bprop.Network's surface: seeds, initialisation, predict and its conversion rule,
the semantics of backward and step, and the description of a network."""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop import reference

DTYPES = ["float32", "float64"]
SPECS = [(6, 16, "relu"), (16, 12, "leaky_relu", 0.1), (12, 8, "gelu"), (8, 5, "softmax")]


def _train(net, X, G, steps=3, lr=0.05):
    """A few SGD steps on the linear loss sum(G * output); returns the last output."""
    for _ in range(steps):
        net.forward(X)
        net.backward(G)
        net.step(lr)
    return net.forward(X)


# ---- seeds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_seed_reproduces_bit_for_bit(dtype, make_network, rng):
    a, b = make_network(SPECS, dtype, seed=42), make_network(SPECS, dtype, seed=42)
    for (name, p, _), (_, q, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p, q, err_msg=name)
    X = rng.standard_normal((9, 6)).astype(dtype)
    G = rng.standard_normal((9, 5)).astype(dtype)
    np.testing.assert_array_equal(_train(a, X, G), _train(b, X, G))
    for (name, p, g), (_, q, h) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p, q, err_msg=name)
        np.testing.assert_array_equal(g, h, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_different_seeds_differ(dtype, make_network):
    a, b = make_network(SPECS, dtype, seed=1), make_network(SPECS, dtype, seed=2)
    for (name, p, _), (_, q, _) in zip(a.parameters(), b.parameters()):
        if name.endswith("weight"):
            assert not np.array_equal(p, q), name


def test_no_seed_draws_fresh_weights(make_network):
    a, b = make_network(SPECS, seed=None), make_network(SPECS, seed=None)
    assert not np.array_equal(a.layers[0].weight, b.layers[0].weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bprop_and_reference_start_identical(dtype, make_pair):
    net, ref = make_pair(SPECS, dtype, seed=123)
    for (name, p, g), (rname, q, h) in zip(net.parameters(), ref.parameters()):
        assert name == rname
        assert p.dtype == q.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(p, q, err_msg=name)
        np.testing.assert_array_equal(g, h, err_msg=name)  # zeros before any backward


def test_the_seed_fixes_the_float32_bits_as_the_rounded_float64_draw(make_network):
    """Both dtypes draw in float64 and cast: the float32 network is the float64 one
    rounded, so switching dtype does not change the network beyond rounding."""
    a, b = make_network(SPECS, "float32", seed=9), make_network(SPECS, "float64", seed=9)
    for (_, p, _), (_, q, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p, q.astype(np.float32))


def test_initialisation_follows_he_and_glorot(make_network):
    net = make_network([(400, 300, "relu"), (300, 200, "leaky_relu", 0.5), (200, 100, "gelu"),
                        (100, 50, "tanh"), (50, 10, "softmax")], seed=0)
    for L in net.layers:
        W = L.weight
        assert not np.any(L.bias)
        if L.activation in ("relu", "leaky_relu", "gelu"):
            slope = 0.5 if L.activation == "leaky_relu" else 0.0
            std = np.sqrt(2.0 / (1.0 + slope**2) / L.in_features)
            assert W.std() == pytest.approx(std, rel=0.05), L
            assert abs(W.mean()) < 0.05 * std
        else:
            limit = np.sqrt(6.0 / (L.in_features + L.out_features))
            assert np.abs(W).max() <= limit
            assert W.std() == pytest.approx(limit / np.sqrt(3), rel=0.1), L


# ---- predict ---------------------------------------------------------------------------------

@pytest.fixture(params=DTYPES)
def trained(request, make_network, rng):
    """A network after a forward and backward (so it holds caches and gradients)."""
    net = make_network(SPECS, request.param, seed=4)
    X = rng.standard_normal((10, 6)).astype(net.dtype)
    net.forward(X)
    net.backward(rng.standard_normal((10, 5)).astype(net.dtype))
    return net, X


def _exact(dtype):
    # predict and forward run the same products; only the activations' vectorised
    # loops may split a row differently (Eigen peels to the buffer's alignment), a
    # difference of an ulp or two
    return {"rtol": 8 * np.finfo(dtype).eps, "atol": 0}


def test_predict_equals_forward(trained, rng):
    net, _ = trained
    X = rng.standard_normal((33, 6)).astype(net.dtype)
    expected = net.forward(X)
    out = net.predict(X)
    assert out.dtype == net.dtype and out.shape == (33, 5)
    np.testing.assert_allclose(out, expected, **_exact(net.dtype))


@pytest.mark.parametrize("batch_size", [1, 2, 7, 32, 33, 1000])
def test_predict_in_chunks_gives_the_same_result(trained, rng, batch_size, assert_close):
    net, _ = trained
    X = rng.standard_normal((33, 6)).astype(net.dtype)
    whole = net.predict(X)
    # a chunk's product sums in the same order; the tolerance only covers small
    # chunks, which Eigen multiplies coefficient by coefficient
    assert_close(net.predict(X, batch_size=batch_size), whole)


def test_predict_leaves_the_training_caches_alone(trained, rng):
    net, X = trained
    views = [(L.input, L.z, L.output, L.delta) for L in net.layers]
    saved = [tuple(v.copy() for v in group) for group in views]
    grads = [(g.copy(), name) for name, _, g in net.parameters()]
    net.predict(rng.standard_normal((64, 6)))  # larger than the training batch
    net.predict(rng.standard_normal((3, 6)), batch_size=2)
    for L, group, old in zip(net.layers, views, saved):
        assert L.z.shape == (10, L.out_features)
        for view, now, before in zip(group, (L.input, L.z, L.output, L.delta), old):
            np.testing.assert_array_equal(now, before)
            assert np.shares_memory(view, now)
    assert np.shares_memory(net.layers[0].input, X)
    for (g, name), (_, _, now) in zip(grads, net.parameters()):
        np.testing.assert_array_equal(now, g, err_msg=name)


def test_backward_after_predict_is_the_backward_of_the_last_forward(make_network, rng):
    a, b = make_network(SPECS, seed=8), make_network(SPECS, seed=8)
    X = rng.standard_normal((7, 6))
    G = rng.standard_normal((7, 5))
    a.forward(X)
    b.forward(X)
    a.predict(rng.standard_normal((20, 6)))
    a.backward(G)
    b.backward(G)
    for (name, _, g), (_, _, h) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(g, h, err_msg=name)


def test_predict_before_any_forward_creates_no_caches(make_network, rng):
    net = make_network(SPECS, seed=0)
    net.predict(rng.standard_normal((4, 6)))
    assert all(L.input is None and L.z is None and L.delta is None for L in net.layers)
    with pytest.raises(RuntimeError, match="called before forward"):
        net.backward(np.ones((4, 5)))


@pytest.mark.parametrize("kind", ["list", "int-list", "int64", "uint8", "float16", "fortran",
                                  "strided", "other-float", "readonly"])
def test_predict_converts_what_forward_refuses(trained, kind, rng):
    """The conversion rule: predict converts real numbers to a C-contiguous array of
    the network's dtype (copying only when needed); forward never converts."""
    net, _ = trained
    base = rng.integers(-3, 4, size=(6, 6)).astype(np.float64)
    other = np.float32 if net.dtype == np.float64 else np.float64
    X = {"list": base.tolist(), "int-list": base.astype(int).tolist(),
         "int64": base.astype(np.int64), "uint8": (base + 3).astype(np.uint8),
         "float16": base.astype(np.float16), "fortran": np.asfortranarray(base, net.dtype),
         "strided": np.repeat(base.astype(net.dtype), 2, axis=1)[:, ::2],
         "other-float": base.astype(other), "readonly": base.astype(net.dtype)}[kind]
    if kind == "readonly":
        X.flags.writeable = False
    expected_input = np.ascontiguousarray(np.asarray(X), dtype=net.dtype)
    np.testing.assert_allclose(net.predict(X), net.forward(expected_input),
                               **_exact(net.dtype))
    if kind == "readonly":
        net.forward(X)  # forward needs no write access
    else:
        with pytest.raises((TypeError, ValueError), match=r"^\[Network\.forward\] X must"):
            net.forward(X)


def test_predict_does_not_copy_a_matching_array(trained, rng, monkeypatch):
    net, _ = trained
    X = rng.standard_normal((5, 6)).astype(net.dtype)
    seen = []
    real = net._core.predict

    class Spy:
        def __getattr__(self, name):
            return getattr(core, name)

        def predict(self, X_arg, size):
            seen.append(X_arg)
            return real(X_arg, size)

    core = net._core
    monkeypatch.setattr(net, "_core", Spy())
    net.predict(X)
    assert seen[0] is X


# ---- backward and step semantics ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_adds_and_overwrite_replaces(dtype, make_network, rng, assert_close):
    net = make_network(SPECS, dtype, seed=3)
    X = rng.standard_normal((8, 6)).astype(dtype)
    G1, G2 = (rng.standard_normal((8, 5)).astype(dtype) for _ in range(2))
    net.forward(X)
    net.backward(G1)
    g1 = [g.copy() for _, _, g in net.parameters()]
    net.backward(G2)
    g2 = [g.copy() for _, _, g in net.parameters()]
    net.backward(G1)
    for (_, _, g), expected in zip(net.parameters(), g1):
        np.testing.assert_array_equal(g, expected)  # overwrite: G2 forgotten
    net.backward(G2, accumulate=True)
    for (name, _, g), a, b in zip(net.parameters(), g1, g2):
        assert_close(g, a + b, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_is_plain_sgd(dtype, make_network, rng, assert_close):
    net = make_network(SPECS, dtype, seed=3)
    net.forward(rng.standard_normal((8, 6)).astype(dtype))
    net.backward(rng.standard_normal((8, 5)).astype(dtype))
    before = [(p.copy(), g.copy()) for _, p, g in net.parameters()]
    net.step(0.25)
    for (name, p, g), (p0, g0) in zip(net.parameters(), before):
        assert_close(p, p0 - np.asarray(0.25, dtype) * g0, name)
        np.testing.assert_array_equal(g, g0)  # gradients are not consumed
    snapshot = [p.copy() for _, p, _ in net.parameters()]
    net.step(0.0)
    for (_, p, _), p0 in zip(net.parameters(), snapshot):
        np.testing.assert_array_equal(p, p0)


def test_sgd_lowers_a_loss(make_network):
    """Training works end to end: a regression of a smooth target.

    The learning rate keeps full-batch gradient descent in its stable regime, where
    the loss falls at every step and the outcome does not depend on rounding. (At
    lr=0.5 the run was chaotic: an AVX2 machine's last-bit differences took the
    final loss from 0.04 to 0.1 of the first; a 1e-12 nudge of one weight did too.)
    Here the final ratio is 0.012 and moves by < 1e-11 under such nudges."""
    net = make_network([(2, 32, "tanh"), (32, 1)], "float64", seed=0)
    X = np.random.default_rng(0).uniform(-1, 1, size=(128, 2))
    y = np.sin(2 * X[:, :1]) * X[:, 1:]
    losses = []
    for _ in range(300):
        out = net.forward(X)
        loss, grad = reference.mean_squared_error(out, y)
        losses.append(loss)
        net.backward(grad)
        net.step(0.2)
    assert all(b < a for a, b in zip(losses, losses[1:])), "the loss rose in a stable run"
    assert losses[-1] < 0.1 * losses[0]


def test_input_grad_does_not_change_the_parameter_gradients(make_network, rng):
    net = make_network(SPECS, seed=3)
    X, G = rng.standard_normal((8, 6)), rng.standard_normal((8, 5))
    net.forward(X)
    net.backward(G)
    plain = [g.copy() for _, _, g in net.parameters()]
    dX = net.backward(G, input_grad=True)
    assert dX.shape == X.shape and dX.dtype == X.dtype
    for (_, _, g), expected in zip(net.parameters(), plain):
        np.testing.assert_array_equal(g, expected)


# ---- description ---------------------------------------------------------------------------------

def test_description(make_network):
    net = make_network(SPECS, "float32", seed=0)
    assert len(net) == 4
    assert net.dtype == np.dtype(np.float32) and isinstance(net.dtype, np.dtype)
    assert net.num_parameters == (6 * 16 + 16) + (16 * 12 + 12) + (12 * 8 + 8) + (8 * 5 + 5)
    assert net.num_parameters == sum(p.size for _, p, _ in net.parameters())
    assert (net.in_features, net.out_features) == (6, 5)
    assert isinstance(net.layers, tuple) and list(net) == list(net.layers)
    assert net[0] is net.layers[0] and net[-1] is net.layers[3]
    for L, (n_in, n_out, act, *slope) in zip(net.layers, SPECS):
        assert (L.in_features, L.out_features, L.activation) == (n_in, n_out, act)
        assert L.negative_slope == (slope[0] if slope else 0.01)
    assert [name for name, _, _ in net.parameters()] == [
        f"layers.{i}.{k}" for i in range(4) for k in ("weight", "bias")]
    assert repr(net) == (
        "Network(dtype=float32, parameters=465)\n"
        "  (0): Dense(6, 16, activation='relu')\n"
        "  (1): Dense(16, 12, activation='leaky_relu', negative_slope=0.1)\n"
        "  (2): Dense(12, 8, activation='gelu')\n"
        "  (3): Dense(8, 5, activation='softmax')")


def test_default_dtype_is_float32():
    assert bprop.Network([bprop.Dense(2, 2)]).dtype == np.float32


def test_the_layers_of_a_network_cannot_be_replaced(make_network):
    net = make_network(SPECS)
    with pytest.raises(AttributeError):
        net.layers = ()
    with pytest.raises(AttributeError):
        net.layers[0].activation = "tanh"

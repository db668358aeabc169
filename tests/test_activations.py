"""The activation registry (bprop/activations.py) against the core's table and
its own oracle: a new row is checked here without touching this file."""

import numpy as np
import pytest

import bprop
from bprop import _core, activations, reference


def test_the_registry_and_the_core_name_the_same_activations():
    assert list(activations.ACTIVATIONS) == _core.activation_names()
    assert bprop.ACTIVATIONS == activations.ACTIVATIONS


@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_each_row_backward_is_the_derivative_of_its_forward(name):
    # central differences of sum(g * sigma(z)) in float64, away from relu's kink
    row = activations.REGISTRY[name]
    rng = np.random.default_rng(0)
    z = rng.uniform(0.1, 2.0, (4, 5)) * rng.choice([-1.0, 1.0], (4, 5))
    g = rng.standard_normal((4, 5))
    a = row.forward(z, 0.2)
    analytic = row.backward(z, a, g, 0.2)
    numeric = np.empty_like(z)
    eps = 1e-6
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        numeric[idx] = (np.sum(g * row.forward(zp, 0.2)) - np.sum(g * row.forward(zm, 0.2))) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", activations.ACTIVATIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_each_row_matches_the_core_as_a_layer(name, dtype):
    # the core's function pair against the row, through an Activation layer
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 5)).astype(dtype)
    net = bprop.Network([bprop.Dense(5, 5), bprop.Activation(name, negative_slope=0.2)],
                        dtype=dtype, seed=0)
    out = net.forward(X)
    z = net[0].output.copy()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(out, activations.REGISTRY[name].forward(z, 0.2), **tol)
    G = rng.standard_normal(out.shape).astype(dtype)
    net.backward(G)
    expected_delta = reference.activation_backward(name, z, out, G, 0.2)
    # dL/d(Activation's input) is the identity Dense's delta = dL/dz
    np.testing.assert_allclose(net[0].delta, expected_delta, **tol)


@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_each_row_initialises_by_its_gain(name):
    net = bprop.Network([bprop.Dense(400, 300, name, negative_slope=0.5)], dtype="float64",
                        seed=0)
    W = net[0].weight
    row = activations.REGISTRY[name]
    if row.gain2 is None:  # Glorot-uniform
        limit = np.sqrt(6.0 / 700)
        assert np.abs(W).max() <= limit and np.abs(W).max() > 0.99 * limit
    else:  # He-normal: the sample variance of 120000 draws within 2%
        assert abs(W.var() * 400 / row.gain2(0.5) - 1) < 0.02


def test_scikit_learn_names_map_to_registry_rows():
    for sk, ours in activations.SKLEARN_NAMES.items():
        assert ours in activations.REGISTRY
    assert activations.SKLEARN_NAMES["logistic"] == "sigmoid"

"""Backward against central finite differences, in float64.

For a loss L, dL/dtheta ~ (L(theta + eps) - L(theta - eps)) / (2 eps) for every
weight, bias and input entry theta. The finite difference is off by about
eps^2 |L'''| (truncation) + eps_machine |L| / eps (rounding) = 1e-12 + 1e-10 |L|
with eps = 1e-6, an absolute error whatever the size of the entry, so the error is
measured relative to the largest entry of each array (max norm): an entrywise
ratio is meaningless for entries that are zero up to rounding (a dead relu unit,
a bias gradient that cancels over the batch).
"""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop import reference

EPS = 1e-6
MAX_RELATIVE_ERROR = 1e-6
KINK = 1e-3  # relu-family pre-activations stay at least this far from 0

ARCHITECTURES = {
    **{act: [(4, 6, act), (6, 5, act), (5, 3, act)] for act in bprop.ACTIVATIONS},
    "leaky_relu-slope0.3": [(4, 6, "leaky_relu", 0.3), (6, 5, "leaky_relu", 0.3),
                            (5, 3, "leaky_relu", 0.3)],
    "mixed-depth5": [(4, 6, "gelu"), (6, 6, "softmax"), (6, 5, "leaky_relu", 0.2),
                     (5, 4, "tanh"), (4, 3, "sigmoid")],
    "relu-into-softmax": [(5, 8, "relu"), (8, 4, "softmax")],
}


def _away_from_kinks(module, specs, rng, batch=3):
    """A network and a batch whose relu-family pre-activations satisfy |z| >= KINK,
    so that no perturbation of size EPS crosses a kink: redraw seed and input until
    they do."""
    for seed in range(100):
        net = module.Network([_dense(module, s) for s in specs], dtype="float64", seed=seed)
        X = rng.standard_normal((batch, specs[0][0]))
        net.forward(X)
        if all(np.abs(L.z).min() >= KINK for L in net.layers
               if L.activation in ("relu", "leaky_relu")):
            return net, X
    raise AssertionError("no draw kept the pre-activations away from the kink")


def _dense(module, spec):
    n_in, n_out, act, *slope = spec
    return module.Dense(n_in, n_out, act, **({"negative_slope": slope[0]} if slope else {}))


def _central_difference(loss, array):
    """dL/d(array) by central differences, perturbing `array` in place."""
    grad = np.zeros(array.shape)
    for idx in np.ndindex(*array.shape):
        old = array[idx]
        array[idx] = old + EPS
        up = loss()
        array[idx] = old - EPS
        down = loss()
        array[idx] = old
        grad[idx] = (up - down) / (2 * EPS)
    return grad


def relative_error(numeric, analytic):
    scale = np.max(np.abs(analytic))
    assert scale > 0, "a gradient that is zero everywhere checks nothing"
    return float(np.max(np.abs(numeric - analytic)) / scale)


def gradient_errors(module, specs, rng, loss_fn=None):
    """Max-norm relative errors of dL/dW, dL/db (per layer) and dL/dX.

    loss_fn(output) -> (L, dL/d(output)); None for L = sum(G * output) with a fixed
    random G, a linear loss whose dL/d(output) = G reaches every output entry."""
    net, X = _away_from_kinks(module, specs, rng)
    if loss_fn is None:
        G = rng.standard_normal((X.shape[0], specs[-1][1]))

        def loss_fn(out):
            return float(np.sum(G * out)), G

    _, grad_output = loss_fn(net.forward(X))
    dX = net.backward(grad_output, input_grad=True)

    def loss():
        return loss_fn(net.predict(X))[0]  # predict: the caches of backward stay put

    errors = {}
    for i, L in enumerate(net.layers):
        errors[f"dL/dW{i}"] = relative_error(_central_difference(loss, L.weight), L.grad_weight)
        errors[f"dL/db{i}"] = relative_error(_central_difference(loss, L.bias), L.grad_bias)
    errors["dL/dX"] = relative_error(_central_difference(loss, X), dX)
    return errors


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_backward_matches_central_differences(name, rng, record_error):
    errors = gradient_errors(bprop, ARCHITECTURES[name], rng)
    worst = max(errors, key=errors.get)
    for quantity, err in errors.items():
        record_error(f"gradient check, float64, {quantity.rstrip('0123456789')}", err)
        record_error(f"gradient check, float64, {name}", err)
    assert errors[worst] <= MAX_RELATIVE_ERROR, f"{worst}: {errors[worst]:.3e}"


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy_with_logits",
                                  "mean_squared_error"])
def test_backward_through_a_loss_matches_central_differences(loss, rng, record_error):
    """The whole training step: the reference loss's dL/d(output) fed to backward."""
    target = {"softmax_cross_entropy": rng.integers(0, 3, size=3),
              "binary_cross_entropy_with_logits": rng.uniform(0, 1, size=(3, 3)),
              "mean_squared_error": rng.standard_normal((3, 3))}[loss]
    weights = rng.uniform(0.5, 2.0, size=3)
    errors = gradient_errors(bprop, [(4, 6, "tanh"), (6, 3, "identity")], rng,
                             lambda out: getattr(reference, loss)(out, target, weights))
    for err in errors.values():
        record_error(f"gradient check, float64, through {loss}", err)
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, errors


@pytest.mark.parametrize("activation", bprop.ACTIVATIONS)
def test_reference_backward_matches_central_differences(activation, rng):
    """The oracle passes the same check."""
    errors = gradient_errors(reference, ARCHITECTURES[activation], rng)
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, errors


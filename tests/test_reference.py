"""bprop against its NumPy reference: forward, backward and step over many
architectures, and the reference itself against first principles."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bprop
from bprop import _core, reference

ACTIVATIONS = bprop.ACTIVATIONS
DTYPES = ["float32", "float64"]
BATCHES = [1, 3, 64]


def _random_architectures(count, seed=20240601):
    """Architectures drawn once, at collection: depth 1 to 5, widths 1 to 300."""
    rng = np.random.default_rng(seed)
    widths = [1, 2, 3, 5, 16, 33, 128, 300]
    archs = {}
    for k in range(count):
        depth = int(rng.integers(1, 6))
        sizes = [int(w) for w in rng.choice(widths, size=depth + 1)]
        specs = []
        for i in range(depth):
            act = str(rng.choice(ACTIVATIONS))
            spec = (sizes[i], sizes[i + 1], act)
            if act == "leaky_relu":
                spec += (round(float(rng.uniform(0.01, 0.5)), 3),)
            specs.append(spec)
        archs[f"random{k}"] = specs
    return archs


ARCHITECTURES = {
    "1-identity": [(5, 3, "identity")],
    "1x1-sigmoid": [(1, 1, "sigmoid")],
    "1-softmax": [(9, 6, "softmax")],
    "in300-tanh": [(300, 40, "tanh"), (40, 1, "sigmoid")],
    "wide300-relu-softmax": [(12, 300, "relu"), (300, 10, "softmax")],
    "leaky-slope0.25": [(8, 32, "leaky_relu", 0.25), (32, 32, "leaky_relu", 0.25),
                        (32, 3, "identity")],
    "gelu-depth4": [(6, 24, "gelu"), (24, 24, "gelu"), (24, 24, "gelu"), (24, 2, "gelu")],
    "softmax-hidden": [(6, 10, "softmax"), (10, 10, "tanh"), (10, 4, "relu")],
    "depth5-mixed": [(10, 64, "relu"), (64, 48, "sigmoid"), (48, 32, "tanh"),
                     (32, 16, "leaky_relu", 0.05), (16, 5, "softmax")],
    "bottleneck1": [(16, 1, "tanh"), (1, 16, "gelu"), (16, 7, "leaky_relu")],
    # each activation in hidden and output positions
    **{f"all-{act}": [(7, 13, act), (13, 13, act), (13, 5, act)] for act in ACTIVATIONS},
    **_random_architectures(8),
}

CASES = [pytest.param(specs, id=name) for name, specs in ARCHITECTURES.items()]


def test_architectures_cover_the_issue():
    depths = {len(specs) for specs in ARCHITECTURES.values()}
    widths = {w for specs in ARCHITECTURES.values() for s in specs for w in s[:2]}
    hidden = {s[2] for specs in ARCHITECTURES.values() for s in specs[:-1]}
    output = {specs[-1][2] for specs in ARCHITECTURES.values()}
    assert depths == {1, 2, 3, 4, 5}
    assert min(widths) == 1 and max(widths) == 300
    assert hidden == output == set(ACTIVATIONS)


# The oracle computes in float64 for both dtypes. For a float32 network it starts
# from the network's float32 weights and sees the same float32 inputs, so it gives
# that network's exact result and a comparison measures bprop's rounding alone.
# (A float32 reference would add its own rounding: where a tanh or sigmoid unit
# saturates, sigma'(z) = 1 - a^2 or a (1 - a) is formed by cancellation, and a
# 1-ulp difference in a becomes a 1e-5 relative difference in delta.)
# Relu's kink: a float32 z within its rounding error of 0 could fall on the other
# side from the exact z and flip sigma'. Of the ~137,000 relu-family float32
# pre-activations these seeds produce, the nearest to 0 lies 600 rounding errors
# away, so no input needs to be moved off the kink here (test_gradcheck.py does).
ORACLE = "float64"


def _data(rng, net, batch):
    X = rng.standard_normal((batch, net.in_features)).astype(net.dtype)
    grads = [rng.standard_normal((batch, net.out_features)).astype(net.dtype) for _ in range(3)]
    return X, grads


def _wide(a):
    return a.astype(ORACLE)


def _compare_layers(net, ref, assert_close, record_error, what, fields, tag):
    for i, (L, R) in enumerate(zip(net.layers, ref.layers)):
        for field in fields:
            err = assert_close(getattr(L, field), getattr(R, field), f"{tag} layer {i} {field}")
            record_error(f"bprop vs reference, {net.dtype.name}, {what}", err)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specs", CASES)
def test_forward_matches_reference(specs, dtype, batch, make_pair, rng, assert_close,
                                   record_error):
    net, ref = make_pair(specs, dtype, seed=7, ref_dtype=ORACLE)
    X, _ = _data(rng, net, batch)
    out = net.forward(X)
    err = assert_close(out, ref.forward(_wide(X)), "forward output")
    record_error(f"bprop vs reference, {dtype}, forward", err)
    _compare_layers(net, ref, assert_close, record_error, "forward",
                    ("input", "z", "output"), "forward")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specs", CASES)
def test_backward_matches_reference(specs, dtype, batch, make_pair, rng, assert_close,
                                    record_error):
    net, ref = make_pair(specs, dtype, seed=7, ref_dtype=ORACLE)
    X, (G1, G2, G3) = _data(rng, net, batch)
    net.forward(X)
    ref.forward(_wide(X))
    fields = ("grad_weight", "grad_bias", "delta")

    assert net.backward(G1) is None
    ref.backward(_wide(G1))
    _compare_layers(net, ref, assert_close, record_error, "backward", fields, "backward")

    # overwrite (not add) and return dL/dX
    dX = net.backward(G2, input_grad=True)
    err = assert_close(dX, ref.backward(_wide(G2), input_grad=True), "dL/dX")
    record_error(f"bprop vs reference, {dtype}, backward", err)
    _compare_layers(net, ref, assert_close, record_error, "backward", fields, "input_grad")

    # add to the stored gradients, and return dL/dX of this call alone
    dX = net.backward(G3, accumulate=True, input_grad=True)
    err = assert_close(dX, ref.backward(_wide(G3), accumulate=True, input_grad=True),
                       "dL/dX accumulate")
    record_error(f"bprop vs reference, {dtype}, backward", err)
    _compare_layers(net, ref, assert_close, record_error, "backward", fields, "accumulate")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specs", CASES)
def test_step_matches_reference(specs, dtype, make_pair, rng, assert_close, record_error):
    net, ref = make_pair(specs, dtype, seed=11, ref_dtype=ORACLE)
    X, grads = _data(rng, net, 16)
    # Each step adds lr times the gradient's rounding to the weights, and the two
    # trajectories drift apart by that much per step: lr = 0.01 keeps three steps
    # well inside float32's 1e-5 (a large lr on the width-1 tanh bottleneck drives
    # its unit into saturation, see ORACLE).
    for G, lr in zip(grads, (0.01, 0.02, 0.0)):
        err = assert_close(net.forward(X), ref.forward(_wide(X)), "forward between steps")
        record_error(f"bprop vs reference, {dtype}, forward", err)
        net.backward(G)
        ref.backward(_wide(G))
        net.step(lr)
        ref.step(lr)
        _compare_layers(net, ref, assert_close, record_error, "step", ("weight", "bias"),
                        f"step lr={lr}")


def test_float32_reference_computes_in_float32(make_pair, rng, assert_close):
    """The reference of a float32 network rounds like one (it is the benchmark's
    baseline): same weights as bprop from the same seed, float32 results, and on a
    network without saturated units it agrees with bprop at float32's tolerance."""
    net, ref = make_pair([(6, 16, "relu"), (16, 16, "gelu"), (16, 3, "softmax")], "float32")
    for (_, p, _), (_, q, _) in zip(net.parameters(), ref.parameters()):
        np.testing.assert_array_equal(p, q)
    X = rng.standard_normal((8, 6)).astype(np.float32)
    out = ref.forward(X)
    assert out.dtype == np.float32
    assert_close(net.forward(X), out)
    G = rng.standard_normal((8, 3)).astype(np.float32)
    dX = ref.backward(G, input_grad=True)
    assert dX.dtype == ref[0].grad_weight.dtype == np.float32
    assert_close(net.backward(G, input_grad=True), dX)


# ---- the reference against first principles ---------------------------------------------

GRID = np.linspace(-6.0, 6.0, 49).reshape(7, 7)


@pytest.mark.parametrize("activation, scalar", [
    ("identity", lambda x: x),
    ("sigmoid", lambda x: 1 / (1 + math.exp(-x))),
    ("tanh", math.tanh),
    ("relu", lambda x: max(x, 0.0)),
    ("leaky_relu", lambda x: x if x > 0 else 0.3 * x),
    ("gelu", lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))),
])
def test_reference_activation_matches_its_formula(activation, scalar):
    expected = np.vectorize(scalar)(GRID)
    np.testing.assert_allclose(reference.activation_forward(activation, GRID, 0.3), expected,
                               rtol=1e-15, atol=1e-300)


def test_reference_softmax_is_stable_and_normalised():
    z = np.array([[1000.0, 1000.0, -1000.0], [-3.0, 0.0, 3.0]])
    a = reference.activation_forward("softmax", z)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(a[0], [0.5, 0.5, 0.0], rtol=1e-15, atol=1e-300)
    e = np.exp([-3.0, 0.0, 3.0])
    np.testing.assert_allclose(a[1], e / e.sum(), rtol=1e-15)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_activation_backward_is_the_derivative(activation, rng):
    """delta = J^T g checked by central differences of g . sigma(z) in each z."""
    z = rng.standard_normal((4, 5)) * 2
    z[np.abs(z) < 1e-2] += 0.1  # away from relu's kink
    g = rng.standard_normal((4, 5))
    a = reference.activation_forward(activation, z, 0.2)
    delta = reference.activation_backward(activation, z, a, g, 0.2)
    eps = 1e-6
    numeric = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        numeric[idx] = (np.sum(g * reference.activation_forward(activation, zp, 0.2))
                        - np.sum(g * reference.activation_forward(activation, zm, 0.2))) / (2 * eps)
    np.testing.assert_allclose(delta, numeric, rtol=1e-7, atol=1e-8)


# ---- reference losses: against the C++ kernels and against their own derivative -----------

def _loss_inputs(rng, loss, dtype, weighted, labels):
    z = (rng.standard_normal((6, 4)) * 3).astype(dtype)
    if loss == "softmax_cross_entropy":
        if labels:
            y = rng.integers(0, 4, size=6).astype(np.int64)
        else:
            y = rng.dirichlet(np.ones(4), size=6).astype(dtype)
    elif loss == "binary_cross_entropy_with_logits":
        y = rng.uniform(0, 1, size=(6, 4)).astype(dtype)
    else:
        y = rng.standard_normal((6, 4)).astype(dtype)
    w = rng.uniform(0.1, 2.0, size=6).astype(dtype) if weighted else None
    return z, y, w


LOSS_CASES = [
    pytest.param(loss, labels, id=f"{loss}{'-labels' if labels else ''}")
    for loss, labels in [("softmax_cross_entropy", True), ("softmax_cross_entropy", False),
                         ("binary_cross_entropy_with_logits", False),
                         ("mean_squared_error", False)]
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss, labels", LOSS_CASES)
def test_reference_loss_matches_core_kernel(loss, labels, dtype, weighted, rng, assert_close,
                                            record_error):
    z, y, w = _loss_inputs(rng, loss, dtype, weighted, labels)
    value, grad = getattr(reference, loss)(z, y, w)
    core_value, core_grad = getattr(_core, loss)(z, y, w)
    assert isinstance(value, float) and grad.dtype == z.dtype
    # the kernels sum the loss in float64 either way; float32 rounds only the logits' exp
    assert value == pytest.approx(core_value, rel=1e-5 if dtype == "float32" else 1e-12)
    err = assert_close(core_grad, grad, f"{loss} gradient")
    record_error(f"core loss kernels vs reference, {dtype}", err)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("loss, labels", LOSS_CASES)
def test_reference_loss_gradient_is_the_derivative(loss, labels, weighted, rng):
    z, y, w = _loss_inputs(rng, loss, "float64", weighted, labels)
    fn = getattr(reference, loss)
    _, grad = fn(z, y, w)
    eps = 1e-6
    numeric = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        numeric[idx] = (fn(zp, y, w)[0] - fn(zm, y, w)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_reference_losses_match_their_definitions():
    z = np.array([[0.0, np.log(3.0)], [2.0, -1.0]])
    value, grad = reference.softmax_cross_entropy(z, np.array([1, 0]))
    p1 = 3.0 / 4.0
    p2 = np.exp(2.0) / (np.exp(2.0) + np.exp(-1.0))
    assert value == pytest.approx(-(np.log(p1) + np.log(p2)) / 2, rel=1e-14)
    np.testing.assert_allclose(grad, [[0.25 / 2, (p1 - 1) / 2], [(p2 - 1) / 2, (1 - p2) / 2]],
                               rtol=1e-14)
    value, grad = reference.mean_squared_error(z, np.zeros_like(z), np.array([1.0, 3.0]))
    assert value == pytest.approx((np.log(3.0) ** 2 + 3 * 5.0) / (4 * 2), rel=1e-14)
    np.testing.assert_allclose(grad, 2 * np.array([[1, 1], [3, 3]]) * z / 8, rtol=1e-14)
    x = np.array([[-800.0, 800.0, 0.0]])
    value, grad = reference.binary_cross_entropy_with_logits(x, np.array([[1.0, 1.0, 0.5]]))
    assert value == pytest.approx((800.0 + 0.0 + np.log(2.0)) / 3, rel=1e-14)
    np.testing.assert_allclose(grad, [[-1 / 3, 0.0, 0.0]], atol=1e-300)


def test_reference_losses_are_stable_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0]])
    value, grad = reference.softmax_cross_entropy(z, np.array([1]))
    assert value == pytest.approx(2e4)
    np.testing.assert_allclose(grad, [[1.0, -1.0, 0.0]], atol=1e-300)


def test_reference_losses_refuse_bad_input():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        reference.softmax_cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="target labels must be 2 integers"):
        reference.softmax_cross_entropy(z, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="target must be real numbers of shape"):
        reference.mean_squared_error(z, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="sample_weight must have a positive sum"):
        reference.mean_squared_error(z, z, np.zeros(2))
    with pytest.raises(ValueError, match="sample_weight must be 2 finite"):
        reference.binary_cross_entropy_with_logits(z, z, np.ones(3))
    with pytest.raises(ValueError, match="output must be a 2-D floating array"):
        reference.mean_squared_error(np.zeros(3), np.zeros(3))


# ---- the reference's own surface ------------------------------------------------------------

def test_reference_surface_mirrors_bprop(make_pair):
    specs = [(4, 6, "leaky_relu", 0.2), (6, 3, "softmax")]
    net, ref = make_pair(specs, "float32", seed=1)
    assert len(ref) == len(net) == 2
    assert ref.dtype == net.dtype == np.dtype(np.float32)
    assert ref.num_parameters == net.num_parameters == 4 * 6 + 6 + 6 * 3 + 3
    assert [name for name, _, _ in ref.parameters()] == [name for name, _, _ in net.parameters()]
    assert repr(ref).splitlines()[1:] == ["  (0): reference." + repr(net[0]).strip(),
                                          "  (1): reference." + repr(net[1]).strip()]
    for L, R in zip(net, ref):
        assert (R.in_features, R.out_features, R.activation) == (L.in_features, L.out_features,
                                                                 L.activation)
        assert R.input is R.z is R.output is R.delta is None


def test_reference_caches_are_readonly_views(make_pair, rng):
    _, ref = make_pair([(3, 4, "tanh"), (4, 2)], "float64")
    X = rng.standard_normal((5, 3))
    ref.forward(X)
    ref.backward(np.ones((5, 2)))
    assert np.shares_memory(ref[0].input, X) and X.flags.writeable
    for L in ref:
        for cache in (L.input, L.z, L.output, L.delta):
            assert not cache.flags.writeable


def test_reference_refuses_bad_calls(make_pair):
    _, ref = make_pair([(3, 2, "relu")], "float32")
    with pytest.raises(RuntimeError, match="backward] called before forward"):
        ref.backward(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="step] called before backward"):
        ref.step(0.1)
    with pytest.raises(TypeError, match="dtype float32, but got float64"):
        ref.forward(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"shape \(batch, 3\), but has shape \(1, 4\)"):
        ref.forward(np.ones((1, 4), np.float32))
    ref.forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 2\), but has shape \(1, 2\)"):
        ref.backward(np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ref.step(-1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.Dense(2, 2, "swish")
    with pytest.raises(ValueError, match="layer 1 expects 3 input features"):
        reference.Network([reference.Dense(2, 2), reference.Dense(3, 2)])
    with pytest.raises(ValueError, match=r"weight\] must be real numbers of shape \(3, 2\)"):
        ref[0].weight = np.ones((2, 3))
    before = ref[0].weight.copy()
    with pytest.raises(ValueError, match=r"weight\] must be finite as float32"):
        ref[0].weight = np.full((3, 2), 1e39)  # finite as float64, inf as float32
    np.testing.assert_array_equal(ref[0].weight, before)
    ref.backward(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="lr must be finite as float32"):
        ref.step(1e39)
    np.testing.assert_array_equal(ref[0].weight, before)
    with pytest.raises(TypeError, match="activation must be a str"):
        reference.Dense(2, 2, None)
    with pytest.raises(ValueError, match="already belongs to a Network"):
        reference.Network([ref[0]])


def test_reference_predict_chunks_and_converts(make_pair, rng):
    _, ref = make_pair([(3, 5, "gelu"), (5, 2, "softmax")], "float64")
    X = rng.standard_normal((10, 3))
    full = ref.forward(X)
    np.testing.assert_array_equal(ref.predict(X), full)
    np.testing.assert_allclose(ref.predict(X.tolist(), batch_size=3), full, rtol=1e-15)
    assert ref[0].input.shape == (10, 3)

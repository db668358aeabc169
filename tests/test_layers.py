"""bprop's layers through the public API (bprop.Network and bprop.Dense,
Activation, Dropout, BatchNorm, LayerNorm, Residual) against the NumPy reference
(bprop.reference, the same layers written like the derivation):

* each layer kind alone and the issue's example network: forward, dL/dX, every
  parameter gradient, the buffers, the caches and predict, in training and eval
  mode, float64 (relative 1e-12) and float32 (relative 1e-5);
* train_step with every optimizer of bprop.optim on a BatchNorm + Dropout network
  against the reference network stepped by the optimizers' equations in NumPy;
* central finite differences (bprop.gradcheck for the parameters, by hand for
  dL/dX) through each layer and through Residual, in both modes;
* the issue's example network fitted with 1, 2 and 3 threads, bit for bit.

PyTorch is the second oracle (test_layers_torch.py); the API's surface (modes,
buffers, views, hostile arguments) is in test_layers_api.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop import _core, optim, reference

RTOL = {"float64": 1e-12, "float32": 1e-5}
EPS = 1e-6               # central differences (test_gradcheck.py's)
MAX_RELATIVE_ERROR = 1e-6
KINK = 1e-4              # relu inputs kept at least this far from 0 in gradchecks


# ---- the networks, built alike from bprop or bprop.reference ---------------------------

def example(M, features=20, classes=10):
    """The issue's example network (784 inputs there, `features` here)."""
    return [M.Dense(features, 16), M.BatchNorm(16), M.Activation("relu"), M.Dropout(0.2),
            M.Residual([M.Dense(16, 16, activation="relu"), M.Dropout(0.1), M.Dense(16, 16)]),
            M.LayerNorm(16), M.Dense(16, classes)]


def activation_case(name):
    """An Activation after a Dense (which gives it its width)."""
    return lambda M: [M.Dense(5, 4), M.Activation(name, negative_slope=0.2)]


# Each layer kind alone (Activation and Dropout after a Dense, which gives them a
# width), 5 inputs; and the example network, 20 inputs.
CASES = {
    "dense-tanh": lambda M: [M.Dense(5, 4, activation="tanh")],
    "dense-no-bias": lambda M: [M.Dense(5, 4, activation="sigmoid", bias=False)],
    "dense-leaky-relu": lambda M: [M.Dense(5, 4, activation="leaky_relu", negative_slope=0.2)],
    **{f"activation-{name}": activation_case(name) for name in bprop.ACTIVATIONS},
    "dropout": lambda M: [M.Dense(5, 6), M.Dropout(0.3)],
    "dropout-p0": lambda M: [M.Dense(5, 6), M.Dropout(0.0)],
    "batchnorm": lambda M: [M.BatchNorm(5, momentum=0.3)],
    "batchnorm-no-affine": lambda M: [M.BatchNorm(5, eps=1e-3, affine=False)],
    "layernorm": lambda M: [M.LayerNorm(5)],
    "layernorm-no-affine": lambda M: [M.LayerNorm(5, eps=1e-3, elementwise_affine=False)],
    "residual": lambda M: [M.Residual([M.Dense(5, 5, activation="tanh"), M.Dense(5, 5)])],
    "nested-residual": lambda M: [M.Residual([
        M.Dense(5, 7, activation="gelu"), M.Residual([M.BatchNorm(7), M.Activation("tanh")]),
        M.Dropout(0.2), M.Dense(7, 5)])],
    "example": example,
}


def flat_layers(layers):
    """Every layer, depth first, a Residual before its layers."""
    for layer in layers:
        yield layer
        if isinstance(layer, (bprop.Residual, reference.Residual)):
            yield from flat_layers(layer.layers)


def twins(make, dtype="float64", seed=0):
    """(bprop.Network, reference.Network) of the same architecture and the same
    parameters and buffers. Norm layers get affine parameters and running
    statistics other than their initial ones, Dense layers non-zero biases. A
    float32 network's twin is a float64 reference holding the same numbers
    (widened exactly): it computes that network's exact result, so a comparison
    measures bprop's rounding alone."""
    net = bprop.Network(make(bprop), dtype=dtype, seed=seed)
    ref = reference.Network(make(reference), dtype="float64", seed=seed)
    rng = np.random.default_rng(seed + 1000)
    for layer in flat_layers(net.layers):
        if isinstance(layer, (bprop.BatchNorm, bprop.LayerNorm)) and layer.weight is not None:
            layer.weight = rng.uniform(0.5, 1.5, layer.features)
            layer.bias = rng.uniform(-0.5, 0.5, layer.features)
        if isinstance(layer, bprop.Dense) and layer.bias is not None:
            layer.bias = rng.uniform(-0.1, 0.1, layer.out_features)
        if isinstance(layer, bprop.BatchNorm):
            layer.running_mean = rng.uniform(-0.3, 0.3, layer.features)
            layer.running_var = rng.uniform(0.5, 2.0, layer.features)
    params = {name: value for name, value, _ in ref.parameters()}
    assert [name for name, _, _ in net.parameters()] == list(params)
    for name, value, _ in net.parameters():
        params[name][...] = value
    buffers = dict(ref.buffers())
    assert [name for name, _ in net.buffers()] == list(buffers)
    for name, value in net.buffers():
        buffers[name][...] = value
    assert ref.dropout_seed == net.dropout_seed
    return net, ref


def assert_close(actual, desired, dtype, scale=None, err_msg=""):
    """|actual - desired| <= rtol (|desired| + scale), scale = max|desired| unless
    given: matrix products sum in another order in the core than in NumPy, so an
    entry's rounding error is bounded by the magnitude of its terms, not by its
    value (which cancellation can make tiny)."""
    assert actual is not None, err_msg
    desired = np.asarray(desired)
    assert actual.shape == desired.shape, f"{err_msg}: {actual.shape} != {desired.shape}"
    if scale is None:
        scale = float(np.max(np.abs(desired), initial=0.0))
    rtol = RTOL[np.dtype(dtype).name]
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def assert_gradients_close(net, ref, err_msg=""):
    """Every parameter gradient, at the scale of its layer's gradients (the bias of
    a Dense before a BatchNorm has the gradient 0, which both compute as rounding
    noise of the size of that layer's other gradients' rounding)."""
    grads = {name: g for name, _, g in ref.parameters()}
    owner_scale = {}
    for name, g in grads.items():
        owner = name.rsplit(".", 1)[0]
        owner_scale[owner] = max(owner_scale.get(owner, 0.0), float(np.max(np.abs(g))))
    for name, _, g in net.parameters():
        assert_close(g, grads[name], net.dtype, owner_scale[name.rsplit(".", 1)[0]],
                     f"{err_msg} {name}")


def assert_buffers_close(net, ref, err_msg=""):
    for (name, b), (ref_name, rb) in zip(net.buffers(), ref.buffers()):
        assert name == ref_name
        assert_close(b, rb, net.dtype, err_msg=f"{err_msg} {name}")


def assert_caches_close(net, ref, err_msg=""):
    """The caches each layer exposes against the reference's."""
    dtype = net.dtype
    for layer, twin in zip(flat_layers(net.layers), flat_layers(ref.layers)):
        where = f"{err_msg} {layer!r}"
        if isinstance(layer, bprop.Residual):
            continue  # its layers' caches are checked
        if not isinstance(layer, bprop.Dropout):  # the reference's caches only its mask
            assert_close(layer.input, twin.input, dtype, err_msg=f"{where} input")
            assert_close(layer.output, twin.output, dtype, err_msg=f"{where} output")
        if isinstance(layer, bprop.Dense):
            assert_close(layer.z, twin.z, dtype, err_msg=f"{where} z")
            if twin.delta is not None:
                assert_close(layer.delta, twin.delta, dtype, err_msg=f"{where} delta")
        if isinstance(layer, (bprop.BatchNorm, bprop.LayerNorm)):
            assert_close(layer.normalized, twin.xhat, dtype, err_msg=f"{where} normalized")
        if isinstance(layer, bprop.Dropout) and twin.mask is not None:
            np.testing.assert_array_equal(layer.mask, twin.mask, err_msg=f"{where} mask")


# ---- every layer against the reference ---------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_the_reference(case, dtype, training):
    net, ref = twins(CASES[case], dtype)
    net.train(training)
    ref.train(training)
    rng = np.random.default_rng(7)
    for step in range(3):
        X = rng.standard_normal((9, net.in_features)).astype(dtype)
        G = rng.standard_normal((9, net.out_features)).astype(dtype)
        msg = f"{case} step {step}"
        out = net.forward(X)
        assert out.dtype == dtype
        assert_close(out, ref.forward(X.astype(np.float64)), dtype, err_msg=f"{msg} forward")
        accumulate = step == 2  # the last step adds to the stored gradients
        dX = net.backward(G, input_grad=True, accumulate=accumulate)
        dX_ref = ref.backward(G.astype(np.float64), input_grad=True, accumulate=accumulate)
        assert_close(dX, dX_ref, dtype, err_msg=f"{msg} dL/dX")
        assert_gradients_close(net, ref, msg)
        assert_buffers_close(net, ref, msg)
        assert_caches_close(net, ref, msg)
        assert net.dropout_step == ref.dropout_step == (step + 1 if training else 0)
    assert net.backward(G, input_grad=False) is None
    assert net.training == training
    X = rng.standard_normal((6, net.in_features)).astype(dtype)
    assert_close(net.predict(X), ref.predict(X.astype(np.float64)), dtype, err_msg="predict")
    assert_close(net.predict(X, batch_size=4), ref.predict(X.astype(np.float64)), dtype,
                 err_msg="predict in chunks")


def test_dropout_masks_are_the_references_and_replay_with_dropout_step():
    net, ref = twins(example)
    X = np.random.default_rng(1).standard_normal((8, 20))
    drops = [layer for layer in flat_layers(net.layers) if isinstance(layer, bprop.Dropout)]
    ref_drops = [layer for layer in flat_layers(ref.layers) if isinstance(layer, reference.Dropout)]
    masks = []
    for _ in range(2):
        net.forward(X)
        ref.forward(X)
        for layer, twin in zip(drops, ref_drops):
            np.testing.assert_array_equal(layer.mask, twin.mask)
        masks.append([layer.mask.copy() for layer in drops])
    assert not np.array_equal(masks[0][0], masks[1][0])  # a new mask each step
    assert not np.array_equal(masks[0][0][:, :16], masks[0][1])  # and each layer
    net.dropout_step = 0
    net.forward(X)
    for layer, mask in zip(drops, masks[0]):
        np.testing.assert_array_equal(layer.mask, mask)


# ---- train_step with each optimizer against the reference ------------------------------

def bn_dropout(M):
    """BatchNorm and Dropout (and a Residual, LayerNorm): the Dense before the
    BatchNorm has no bias, whose gradient would be 0 up to rounding and whose Adam
    or RMSprop update (about lr * sign of that rounding) would be noise."""
    return [M.Dense(6, 12, bias=False), M.BatchNorm(12, momentum=0.2), M.Activation("tanh"),
            M.Dropout(0.25),
            M.Residual([M.Dense(12, 12, activation="gelu"), M.Dropout(0.1), M.Dense(12, 12)]),
            M.LayerNorm(12), M.Dense(12, 4)]


class NumpyOptimizer:
    """The update rules of bprop.optim (torch.optim's) in NumPy, float64, per
    parameter name."""

    def __init__(self, rule, **h):
        self.rule, self.h, self.state, self.t = rule, h, {}, 0

    def step(self, params):
        self.t += 1
        h, t = self.h, self.t
        for name, p, g in params:
            s = self.state.setdefault(name, {})
            if self.rule == "adamw":
                p *= 1 - h["lr"] * h["weight_decay"]
            else:
                g = g + h.get("weight_decay", 0.0) * p
            if self.rule == "sgd":
                if h.get("momentum", 0.0):
                    buf = s["buf"] = g.copy() if "buf" not in s else h["momentum"] * s["buf"] + g
                    g = g + h["momentum"] * buf if h.get("nesterov") else buf
                p -= h["lr"] * g
            elif self.rule in ("adam", "adamw"):
                b1, b2 = h.get("betas", (0.9, 0.999))
                m = s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
                v = s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
                p -= h["lr"] / (1 - b1**t) * m / (np.sqrt(v / (1 - b2**t)) + h.get("eps", 1e-8))
            else:  # rmsprop
                alpha = h.get("alpha", 0.99)
                sq = s["sq"] = alpha * s.get("sq", 0.0) + (1 - alpha) * g * g
                if h.get("centered"):
                    avg = s["avg"] = alpha * s.get("avg", 0.0) + (1 - alpha) * g
                    denom = np.sqrt(sq - avg * avg) + 1e-8
                else:
                    denom = np.sqrt(sq) + 1e-8
                if h.get("momentum", 0.0):
                    buf = s["buf"] = h["momentum"] * s.get("buf", 0.0) + g / denom
                    p -= h["lr"] * buf
                else:
                    p -= h["lr"] * g / denom


OPTIMIZERS = {
    "sgd": (lambda net: optim.SGD(net, lr=0.05), ("sgd", dict(lr=0.05))),
    "sgd-momentum": (lambda net: optim.SGD(net, lr=0.05, momentum=0.9),
                     ("sgd", dict(lr=0.05, momentum=0.9))),
    "sgd-nesterov-decay": (
        lambda net: optim.SGD(net, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3))),
    "adam": (lambda net: optim.Adam(net, lr=1e-3), ("adam", dict(lr=1e-3))),
    "adam-decay": (lambda net: optim.Adam(net, lr=1e-3, weight_decay=1e-2),
                   ("adam", dict(lr=1e-3, weight_decay=1e-2))),
    "adamw": (lambda net: optim.AdamW(net, lr=1e-3, weight_decay=1e-2),
              ("adamw", dict(lr=1e-3, weight_decay=1e-2))),
    "rmsprop": (lambda net: optim.RMSprop(net, lr=1e-3), ("rmsprop", dict(lr=1e-3))),
    "rmsprop-centered-momentum": (
        lambda net: optim.RMSprop(net, lr=1e-3, momentum=0.5, centered=True),
        ("rmsprop", dict(lr=1e-3, momentum=0.5, centered=True))),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_train_step_with_each_optimizer_matches_the_reference(name, dtype):
    make_opt, (rule, hyper) = OPTIMIZERS[name]
    net, ref = twins(bn_dropout, dtype, seed=3)
    opt = make_opt(net)
    numpy_opt = NumpyOptimizer(rule, **hyper)
    rng = np.random.default_rng(11)
    for step in range(4):
        X = rng.standard_normal((10, 6))
        y = rng.integers(0, 4, 10)
        value = net.train_step(X.astype(dtype), y, "softmax_cross_entropy", opt)
        ref_value, grad = reference.softmax_cross_entropy(ref.forward(X), y)
        ref.backward(grad)
        numpy_opt.step(ref.parameters())
        assert value == pytest.approx(ref_value, rel=RTOL[dtype])
        ref_params = {n: p for n, p, _ in ref.parameters()}
        for n, p, _ in net.parameters():
            assert_close(p, ref_params[n], dtype, err_msg=f"{name} step {step} {n}")
        assert_buffers_close(net, ref, f"{name} step {step}")
        assert net.dropout_step == ref.dropout_step == step + 1
    assert opt.step_count == 4
    assert net.training


# ---- central differences ------------------------------------------------------------

# Smooth activations (tanh, gelu, sigmoid, softmax), or relu kept away from its kink
# (checked before each gradcheck).
GRADCHECK_CASES = {
    "dense": lambda M: [M.Dense(4, 5, activation="tanh"), M.Dense(5, 3)],
    "activations": lambda M: [M.Dense(4, 6), M.Activation("sigmoid"), M.Dense(6, 6),
                              M.Activation("softmax"), M.Dense(6, 5), M.Activation("gelu"),
                              M.Dense(5, 3, activation="leaky_relu", negative_slope=0.3)],
    "dropout": lambda M: [M.Dense(4, 6, activation="tanh"), M.Dropout(0.3), M.Dense(6, 3)],
    "batchnorm": lambda M: [M.Dense(4, 6, bias=False), M.BatchNorm(6, momentum=0.2),
                            M.Activation("tanh"), M.Dense(6, 3)],
    "layernorm": lambda M: [M.Dense(4, 6), M.LayerNorm(6), M.Activation("gelu"),
                            M.Dense(6, 3)],
    "residual": lambda M: [
        M.Dense(4, 6, activation="tanh"),
        M.Residual([M.Dense(6, 6, activation="gelu"), M.BatchNorm(6), M.Dropout(0.2),
                    M.Dense(6, 6)]),
        M.LayerNorm(6), M.Dense(6, 3)],
    "nested-residual": lambda M: [
        M.Residual([M.Dense(4, 6, activation="tanh"),
                    M.Residual([M.LayerNorm(6), M.Dense(6, 6, activation="sigmoid")]),
                    M.Dense(6, 4)]),
        M.Dense(4, 3)],
    "example": lambda M: example(M, features=4, classes=3),
}


def assert_away_from_relu_kinks(net, X):
    """The forward pass that gradcheck differentiates (same mode, same dropout
    step) keeps every relu input at least KINK away from 0."""
    step = net.dropout_step
    net.forward(X)
    net.dropout_step = step
    for layer in flat_layers(net.layers):
        if getattr(layer, "activation", None) == "relu":
            pre = layer.z if isinstance(layer, bprop.Dense) else layer.input
            assert np.min(np.abs(pre)) > KINK, f"{layer!r} has an input near the kink"


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_through_each_layer(case, training):
    net, _ = twins(GRADCHECK_CASES[case], seed=5)
    net.train(training)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, net.in_features))
    y = rng.integers(0, 3, 6)
    net.forward(X)  # a training step or two ahead: dropout_step 1, new running stats
    assert_away_from_relu_kinks(net, X)
    params = [p.copy() for _, p, _ in net.parameters()]
    buffers = [b.copy() for _, b in net.buffers()]
    step = net.dropout_step
    errors = bprop.gradcheck(net, X, y, eps=EPS)
    owners = sorted({name.rsplit(".", 1)[0] for name, _, _ in net.parameters()})
    assert sorted(errors) == owners
    for owner, error in errors.items():
        assert error <= MAX_RELATIVE_ERROR, f"{case} {owner}: {error:.2e}"
    # gradcheck works on a copy: nothing of the network changes
    assert net.training == training and net.dropout_step == step
    for before, (_, p, _) in zip(params, net.parameters()):
        np.testing.assert_array_equal(p, before)
    for before, (_, b) in zip(buffers, net.buffers()):
        np.testing.assert_array_equal(b, before)


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_gradient_matches_central_differences(case, training):
    """dL/dX of backward(input_grad=True) for L = sum(output * G), against central
    differences of forward (each with the same dropout step's masks)."""
    net, _ = twins(GRADCHECK_CASES[case], seed=6)
    net.train(training)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((5, net.in_features))
    G = rng.standard_normal((5, net.out_features))
    assert_away_from_relu_kinks(net, X)
    step = net.dropout_step

    def loss(X):
        net.dropout_step = step
        return float(np.sum(net.forward(X) * G))

    loss(X)
    dX = net.backward(G, input_grad=True)
    numeric = np.empty_like(X)
    for index in np.ndindex(X.shape):
        Xp, Xm = X.copy(), X.copy()
        Xp[index] += EPS
        Xm[index] -= EPS
        numeric[index] = (loss(Xp) - loss(Xm)) / (2 * EPS)
    error = np.max(np.abs(dX - numeric)) / np.max(np.abs(numeric))
    assert error <= MAX_RELATIVE_ERROR, f"{case}: {error:.2e}"


def test_gradcheck_of_a_float32_network_checks_its_float64_copy():
    net, _ = twins(GRADCHECK_CASES["residual"], "float32", seed=2)
    X = np.random.default_rng(0).standard_normal((6, 4))
    errors = bprop.gradcheck(net, X, np.arange(6) % 3)
    assert max(errors.values()) <= MAX_RELATIVE_ERROR
    assert net.dtype == np.float32


# ---- thread counts ----------------------------------------------------------------------

def test_example_network_fits_bit_for_bit_with_1_2_and_3_threads(threads):
    """The issue's example network with its 784 inputs: batches of 256 rows cut the
    first layer's products into several tiles, which the threads share."""
    _, _, row_blocks, col_blocks = _core._gemm_tiles(256, 16, 784, 4, False, False)
    assert row_blocks * col_blocks > 1
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 784)).astype(np.float32)
    y = rng.integers(0, 10, 512)
    X_test = rng.standard_normal((50, 784)).astype(np.float32)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        net = bprop.Network(example(bprop, features=784), seed=0)
        bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=1e-2), epochs=2, batch_size=256,
                  seed=1)
        runs.append(([p.tobytes() for _, p, _ in net.parameters()],
                     [b.tobytes() for _, b in net.buffers()],
                     net.predict(X_test).tobytes(), net.dropout_step))
    assert runs[0][3] == 4  # 2 epochs of 2 minibatches
    for n, run in zip((2, 3), runs[1:]):
        assert run[0] == runs[0][0], f"parameters with {n} threads"
        assert run[1] == runs[0][1], f"buffers with {n} threads"
        assert run[2] == runs[0][2], f"predictions with {n} threads"
        assert run[3] == runs[0][3]

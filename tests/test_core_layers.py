"""The C++ layer protocol (cpp/include/bprop/layer.hpp) against the NumPy reference:
every layer kind, train and eval modes, forward, backward, buffers, predict, the
optimizer inside the sweep, with the core built from layer descriptions and the
reference's parameters copied in. (The Python layer classes that will build these
descriptions come with issue 12's Python side; this drives the core directly.)"""

import numpy as np
import pytest

from bprop import _core
from bprop import reference as ref

TOL = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-5)}


def describe(layer):
    """The core's description of a reference layer."""
    if isinstance(layer, ref.Dense):
        return dict(kind="Dense", in_features=layer.in_features, out_features=layer.out_features,
                    activation=layer.activation, negative_slope=layer.negative_slope,
                    bias=layer.bias is not None)
    if isinstance(layer, ref.Activation):
        return dict(kind="Activation", activation=layer.name if hasattr(layer, "name")
                    else layer.activation, negative_slope=layer.negative_slope)
    if isinstance(layer, ref.Dropout):
        return dict(kind="Dropout", p=layer.p)
    if isinstance(layer, ref.BatchNorm):
        return dict(kind="BatchNorm", features=layer.features, momentum=layer.momentum,
                    eps=layer.eps, affine=layer.affine)
    if isinstance(layer, ref.LayerNorm):
        return dict(kind="LayerNorm", features=layer.features, eps=layer.eps,
                    affine=layer.elementwise_affine)
    if isinstance(layer, ref.Residual):
        return dict(kind="Residual", layers=[describe(inner) for inner in layer.layers])
    raise TypeError(type(layer))


def pair(make_layers, dtype, seed=3):
    r = ref.Network(make_layers(), dtype=dtype, seed=seed)
    core_type = _core.Network32 if dtype == "float32" else _core.Network64
    c = core_type([describe(layer) for layer in r.layers])
    c.dropout_seed = r.dropout_seed
    views = {name: (value, grad) for name, value, grad, _ in c.parameter_views()}
    names = [name for name, _, _ in r.parameters()]
    assert names == list(views), (names, list(views))
    for name, value, _ in r.parameters():
        views[name][0][...] = value
    # non-trivial affine parameters and running statistics
    rng = np.random.default_rng(seed)
    for name, value, _ in r.parameters():
        if not name.endswith("weight") or value.ndim == 1:
            noise = rng.uniform(0.5, 1.5, value.shape).astype(dtype)
            value[...] = value * noise if name.endswith("weight") else noise - 1
            views[name][0][...] = value
    return r, c


ARCHS = {
    "issue-example": lambda: [
        ref.Dense(12, 16, bias=False), ref.BatchNorm(16), ref.Activation("relu"),
        ref.Dropout(0.2),
        ref.Residual([ref.Dense(16, 16, activation="relu"), ref.Dropout(0.1), ref.Dense(16, 16)]),
        ref.LayerNorm(16), ref.Dense(16, 5)],
    "activations": lambda: [
        ref.Activation("tanh"), ref.Dense(12, 8, activation="gelu"), ref.Activation("leaky_relu",
                                                                                   negative_slope=0.2),
        ref.Dense(8, 5, activation="sigmoid"), ref.Activation("softmax")],
    "nested-residual": lambda: [
        ref.LayerNorm(12),
        ref.Residual([ref.Dense(12, 20, activation="relu"),
                      ref.Residual([ref.BatchNorm(20, momentum=0.3), ref.Activation("tanh")]),
                      ref.Dense(20, 12)]),
        ref.Dense(12, 5)],
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_backward_and_buffers_match_the_reference(arch, dtype, training):
    r, c = pair(ARCHS[arch], dtype)
    r.train(training)
    c.training = training
    rng = np.random.default_rng(0)
    for step in range(3):
        X = rng.standard_normal((9, 12)).astype(dtype)
        G = rng.standard_normal((9, 5)).astype(dtype)
        out_r = r.forward(X)
        out_c = c.forward(X)
        np.testing.assert_allclose(out_c, out_r, **TOL[dtype], err_msg=f"forward {step}")
        dX_r = r.backward(G, input_grad=True)
        dX_c = c.backward(G, False, True)
        np.testing.assert_allclose(dX_c, dX_r, **TOL[dtype], err_msg=f"dL/dX {step}")
        for (name, _, g_r), (_, _, g_c, _) in zip(r.parameters(), c.parameter_views()):
            np.testing.assert_allclose(g_c, g_r, **TOL[dtype], err_msg=f"{name} {step}")
        for (name, b_r), (_, b_c) in zip(r.buffers(), c.buffer_views()):
            np.testing.assert_allclose(b_c, b_r, **TOL[dtype], err_msg=f"{name} {step}")
    assert c.dropout_step == r.dropout_step == (3 if training else 0)
    X = rng.standard_normal((7, 12)).astype(dtype)
    np.testing.assert_allclose(c.predict(X, 3), r.predict(X), **TOL[dtype])


def test_dropout_masks_are_the_references_bit_for_bit():
    r, c = pair(lambda: [ref.Dense(12, 300), ref.Dropout(0.5), ref.Dropout(0.3)], "float64")
    X = np.random.default_rng(1).standard_normal((40, 12))
    for _ in range(2):
        out_r = r.forward(X)
        out_c = c.forward(X)
        assert np.array_equal(out_c == 0, out_r == 0)
        assert 0.6 < np.mean(out_c == 0) < 0.7  # 1 - 0.5 * 0.7 dropped
    c.dropout_step = r.dropout_step = 0  # replay the first mask
    assert np.array_equal(c.forward(X) == 0, r.forward(X) == 0)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_the_optimizer_inside_the_sweep_updates_every_layers_parameters(rule):
    """One train_step with an update plan equals backward, then the update by hand."""
    make = ARCHS["issue-example"]
    r, c = pair(make, "float64")
    _, c2 = pair(make, "float64")
    X = np.random.default_rng(2).standard_normal((10, 12))
    y = np.arange(10) % 5
    sizes = [v.size for _, v, _, _ in c.parameter_views()]
    lr = 0.1
    plan = _core.UpdatePlan64(rule, dict(lr=lr), sizes,
                              [{"exp_avg": np.zeros(n), "exp_avg_sq": np.zeros(n)}
                               if rule == "adam" else {} for n in sizes])
    value = c.train_step(X, y, "softmax_cross_entropy", None, -1.0, plan)
    out = c2.forward(X)
    v2, grad = _core.softmax_cross_entropy(out, y, None)
    c2.backward(grad, False, False)
    assert value == pytest.approx(v2, rel=1e-13)
    assert plan.step_count == 1
    for (name, p, _, _), (_, p2, g2, _) in zip(c.parameter_views(), c2.parameter_views()):
        if rule == "sgd":
            expected = p2 - lr * g2
        else:  # Adam's first step moves each value by lr * sign(g) (eps aside)
            expected = p2 - lr * g2 / (np.abs(g2) + 1e-8)
        np.testing.assert_allclose(p, expected, rtol=1e-10, atol=1e-12, err_msg=name)


def test_bad_descriptions_are_refused_with_the_layer_named():
    with pytest.raises(ValueError, match=r"layers.1 \(Dropout\) p must be in \[0, 1\)"):
        _core.Network64([dict(kind="Dense", in_features=3, out_features=4, activation="relu",
                              negative_slope=0.01, bias=True), dict(kind="Dropout", p=1.0)])
    with pytest.raises(ValueError, match=r"layers.0 a Residual's layers must map 4 features back "
                                         r"to 4, but they produce 5"):
        _core.Network64([dict(kind="Residual", layers=[
            dict(kind="Dense", in_features=4, out_features=5, activation="identity",
                 negative_slope=0.01, bias=True)])])
    with pytest.raises(ValueError, match="a layer with a width"):
        _core.Network64([dict(kind="Dropout", p=0.1)])
    net = _core.Network64([dict(kind="BatchNorm", features=3, momentum=0.1, eps=1e-5,
                                affine=True)])
    before = [b.copy() for _, b in net.buffer_views()]
    with pytest.raises(ValueError, match="BatchNorm in training mode needs more than one row"):
        net.forward(np.ones((1, 3)))
    assert all(np.array_equal(a, b) for a, (_, b) in zip(before, net.buffer_views()))
    net.training = False
    assert net.forward(np.ones((1, 3))).shape == (1, 3)

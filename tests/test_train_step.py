"""The one-call training step (Network.train_step and _core's train_step) against
the four separate calls it replaces."""

import numpy as np
import pytest

import bprop
from bprop import _core

ARCHS = [
    [(5, 7, "relu"), (7, 3, "identity")],
    [(4, 6, "tanh"), (6, 6, "gelu"), (6, 5, "sigmoid")],
    [(3, 8, "leaky_relu"), (8, 4, "softmax")],
]
LOSSES = ["softmax_cross_entropy", "binary_cross_entropy_with_logits", "mean_squared_error"]


def make(arch, dtype="float64", seed=0):
    return bprop.Network([bprop.Dense(i, o, activation=a) for i, o, a in arch], dtype=dtype,
                         seed=seed)


def targets(loss, batch, width, rng, dtype):
    if loss == "softmax_cross_entropy":
        return rng.integers(0, width, batch).astype(np.int64)
    if loss == "binary_cross_entropy_with_logits":
        return rng.integers(0, 2, (batch, width)).astype(dtype)
    return rng.standard_normal((batch, width)).astype(dtype)


def four_calls(net, X, y, loss, lr, sample_weight=None):
    out = net.forward(X)
    value, grad = getattr(_core, loss)(out, y, sample_weight)
    net.backward(grad)
    if lr is not None:
        net.step(lr)
    return value


def weights(net):
    return [p.copy() for _, p, _ in net.parameters()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_sgd_step_equals_the_four_calls(arch, loss, weighted):
    rng = np.random.default_rng(1)
    a, b = make(arch), make(arch)
    X = rng.standard_normal((9, arch[0][0]))
    y = targets(loss, 9, arch[-1][1], rng, np.float64)
    w = rng.uniform(0.1, 2.0, 9) if weighted else None
    for _ in range(3):
        va = a._core.train_step(X, y, loss, w, 0.05)
        vb = four_calls(b, X, y, loss, 0.05, w)
        assert va == pytest.approx(vb, rel=1e-13)
    for pa, pb in zip(weights(a), weights(b)):
        # same products, same order up to the fused GEMM's accumulation into W
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)
    # the fused step never materialises gradients: step() has nothing to apply
    with pytest.raises(RuntimeError, match="before backward"):
        a.step(0.1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("loss", LOSSES)
def test_unfused_train_step_stores_the_same_gradients(arch, loss):
    rng = np.random.default_rng(2)
    a, b = make(arch), make(arch)
    X = rng.standard_normal((6, arch[0][0]))
    y = targets(loss, 6, arch[-1][1], rng, np.float64)
    va = a._core.train_step(X, y, loss, None, -1.0)
    vb = four_calls(b, X, y, loss, None)
    assert va == pytest.approx(vb, rel=1e-14)
    for (_, _, ga), (_, _, gb) in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(ga, gb, rtol=1e-13, atol=1e-15)
    for la, lb in zip(a.layers, b.layers):
        np.testing.assert_allclose(la.delta, lb.delta, rtol=1e-13, atol=1e-15)


def test_train_step_float32_matches_float64():
    rng = np.random.default_rng(3)
    arch = ARCHS[0]
    a, b = make(arch, "float32"), make(arch, "float64")
    X = rng.standard_normal((16, 5))
    y = rng.integers(0, 3, 16).astype(np.int64)
    for _ in range(5):
        a._core.train_step(X.astype(np.float32), y, "softmax_cross_entropy", None, 0.1)
        b._core.train_step(X, y, "softmax_cross_entropy", None, 0.1)
    for pa, pb in zip(weights(a), weights(b)):
        np.testing.assert_allclose(pa, pb, rtol=1e-4, atol=1e-5)


def test_bad_labels_leave_the_network_unchanged():
    net = make(ARCHS[0])
    X = np.ones((4, 5))
    before = weights(net)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), but y\[2\] = 3"):
        net._core.train_step(X, np.array([0, 1, 3, 2]), "softmax_cross_entropy", None, 0.1)
    with pytest.raises(ValueError, match=r"y has 3 labels, but X has 4 rows"):
        net._core.train_step(X, np.array([0, 1, 2]), "softmax_cross_entropy", None, 0.1)
    with pytest.raises(ValueError, match=r"y has shape \(4, 2\)"):
        net._core.train_step(X, np.ones((4, 2)), "mean_squared_error", None, 0.1)
    with pytest.raises(ValueError, match="loss must be one of"):
        net._core.train_step(X, np.ones((4, 3)), "hinge", None, 0.1)
    with pytest.raises(TypeError, match="y must have dtype int64, but has dtype int32"):
        net._core.train_step(X, np.array([0, 1, 2, 2], dtype=np.int32), "softmax_cross_entropy",
                             None, 0.1)
    with pytest.raises(ValueError, match="sample_weight has 2 entries, but X has 4 rows"):
        net._core.train_step(X, np.array([0, 1, 2, 2]), "softmax_cross_entropy", np.ones(2), 0.1)
    for p, q in zip(before, weights(net)):
        np.testing.assert_array_equal(p, q)
    assert not net._core.has_forward


def test_train_step_rejects_a_missing_optimizer():
    net = make(ARCHS[0])
    with pytest.raises(TypeError, match=r"\[Network.train_step\] optimizer must be"):
        net.train_step(np.ones((2, 5)), np.array([0, 1]), loss="softmax_cross_entropy")


OPTIMIZERS = [
    lambda net: bprop.optim.SGD(net, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda net: bprop.optim.SGD(net, lr=0.05, momentum=0.9, nesterov=True),
    lambda net: bprop.optim.Adam(net, lr=1e-2),
    lambda net: bprop.optim.AdamW(net, lr=1e-2, weight_decay=0.1),
    lambda net: bprop.optim.RMSprop(net, lr=1e-2, momentum=0.5, centered=True),
]


@pytest.mark.parametrize("make_opt", OPTIMIZERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_inside_the_sweep_equals_optimizer_step(make_opt, arch):
    """The one-call path (the optimizer's kernel applied per layer inside the
    backward sweep) against forward, loss, backward, opt.step()."""
    rng = np.random.default_rng(4)
    a, b = make(arch), make(arch)
    opt_a, opt_b = make_opt(a), make_opt(b)
    X = rng.standard_normal((7, arch[0][0]))
    y = rng.integers(0, arch[-1][1], 7).astype(np.int64)
    for _ in range(4):
        va = a.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt_a)
        vb = four_calls(b, X, y, "softmax_cross_entropy", None)
        opt_b.step()
        assert va == pytest.approx(vb, rel=1e-13)
    assert opt_a.step_count == opt_b.step_count == 4
    for pa, pb in zip(weights(a), weights(b)):
        np.testing.assert_array_equal(pa, pb)  # the same kernel on the same gradient
    for (name, sa), (_, sb) in zip(opt_a.state_dict()["state"].items(),
                                   opt_b.state_dict()["state"].items()):
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"{name}.{k}")


def test_a_non_finite_loss_updates_nothing():
    net = make(ARCHS[0])
    opt = bprop.optim.Adam(net, lr=1e-2)
    before = weights(net)
    X = np.full((4, 5), np.inf)
    value = net.train_step(X, np.array([0, 1, 2, 0]), loss="softmax_cross_entropy", optimizer=opt)
    assert not np.isfinite(value)
    assert opt.step_count == 0
    for p, q in zip(before, weights(net)):
        np.testing.assert_array_equal(p, q)


def test_an_optimizer_of_another_network_is_refused():
    a, b = make(ARCHS[0]), make(ARCHS[0])
    with pytest.raises(ValueError, match="optimizer was built for another network"):
        a.train_step(np.ones((2, 5)), np.array([0, 1]), optimizer=bprop.optim.Adam(b))


# ---- scikit-learn's objective inside the step (Objective in network.hpp) ----------------

def objective_by_hand(net, X, y, loss, w, loss_scale, grad_scale, l2):
    """forward, loss and backward as four calls, then scikit-learn's objective built
    from the stored gradients in NumPy: the oracle for the core's Objective."""
    value = four_calls(net, X, y, loss, None, w)
    squares = sum(float(np.sum(layer.weight.astype(np.float64) ** 2)) for layer in net.layers)
    grads = []
    for layer in net.layers:
        grads.append(grad_scale * layer.grad_weight + l2 * layer.weight)
        grads.append(grad_scale * layer.grad_bias)
    return loss_scale * value + 0.5 * l2 * squares, grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_objective_stores_scaled_gradients_with_the_l2_term(arch, loss, weighted):
    rng = np.random.default_rng(5)
    a, b = make(arch), make(arch)
    X = rng.standard_normal((9, arch[0][0]))
    y = targets(loss, 9, arch[-1][1], rng, np.float64)
    w = rng.uniform(0.1, 2.0, 9) if weighted else None
    va = a._core.train_step(X, y, loss, w, -1.0, None, loss_scale=0.5, grad_scale=3.0, l2=0.7)
    vb, grads = objective_by_hand(b, X, y, loss, w, 0.5, 3.0, 0.7)
    assert va == pytest.approx(vb, rel=1e-13)
    for (name, p, g), expected, (_, q, _) in zip(a.parameters(), grads, b.parameters()):
        np.testing.assert_array_equal(p, q)  # no optimizer: nothing updated
        np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("make_opt", OPTIMIZERS + [lambda net: bprop.optim.SGD(net, lr=0.05)])
def test_objective_steps_the_optimizer_along_the_penalised_gradient(make_opt):
    """Plain SGD takes the fused path (W scaled by 1 - lr l2, then the product into
    W); the others apply their kernel to the stored, penalised gradient."""
    arch = ARCHS[1]
    rng = np.random.default_rng(6)
    a, b = make(arch), make(arch)
    opt_a, opt_b = make_opt(a), make_opt(b)
    X = rng.standard_normal((7, arch[0][0]))
    y = targets("mean_squared_error", 7, arch[-1][1], rng, np.float64)
    for _ in range(3):
        va = a._core.train_step(X, y, "mean_squared_error", None, -1.0, opt_a._plan,
                                loss_scale=0.5, grad_scale=2.5, l2=0.3)
        vb, grads = objective_by_hand(b, X, y, "mean_squared_error", None, 0.5, 2.5, 0.3)
        for (_, _, g), new in zip(b.parameters(), grads):
            g[...] = new
        opt_b.step()
        assert va == pytest.approx(vb, rel=1e-13)
    assert opt_a.step_count == opt_b.step_count == 3
    for pa, pb in zip(weights(a), weights(b)):
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs", [dict(l2=-1.0), dict(l2=float("nan")),
                                    dict(grad_scale=float("inf")),
                                    dict(loss_scale=float("nan"))])
def test_a_bad_objective_is_refused_and_changes_nothing(kwargs):
    net = make(ARCHS[0])
    opt = bprop.optim.Adam(net, lr=1e-2)
    before = weights(net)
    X = np.ones((3, 5))
    with pytest.raises(ValueError, match=r"\[Network.train_step\] the objective's"):
        net._core.train_step(X, np.array([0, 1, 2]), "softmax_cross_entropy", None, -1.0,
                             opt._plan, **kwargs)
    assert opt.step_count == 0
    for p, q in zip(before, weights(net)):
        np.testing.assert_array_equal(p, q)

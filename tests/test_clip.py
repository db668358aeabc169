"""Gradient clipping: bprop.clip_grad_norm and clip_grad_value on the stored
gradients, and clip_grad_norm= in train_step and fit (every gradient formed, then
clipped, then the update), against torch.nn.utils and a PyTorch training loop."""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop import optim

torch = pytest.importorskip("torch")


def make_net(dtype="float64", layers=None):
    layers = layers or [bprop.Dense(6, 16, "tanh"), bprop.LayerNorm(16),
                        bprop.Dense(16, 8, "tanh"), bprop.Dense(8, 3)]
    return bprop.Network(layers, dtype=dtype, seed=0)


def data(rng, n=24):
    return rng.standard_normal((n, 6)), rng.integers(0, 3, n)


def torch_params(model):
    return [p for p in model.parameters()]


def bprop_as_torch_order(net):
    """net.parameters() in torch's layout (Linear weights transposed)."""
    out = []
    for name, p, _ in net.parameters():
        out.append(p.T if p.ndim == 2 else p)
    return out


def torch_grads(model, X, y):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.tensor(X)), torch.tensor(y))
    loss.backward()
    return loss


def bprop_grads(net, X, y):
    _, grad = bprop.losses.softmax_cross_entropy(net.forward(X), y)
    net.backward(grad)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_grad_norm_matches_torch(rng, max_norm):
    net = make_net()
    model = net.to_torch()
    X, y = data(rng)
    bprop_grads(net, X, y)
    torch_grads(model, X, y)
    norm = bprop.clip_grad_norm(net, max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    assert norm == pytest.approx(float(torch_norm), rel=1e-13)
    assert (norm > max_norm) == (max_norm == 0.05)  # clipping happened where it should
    for (name, _, g), tp in zip(net.parameters(), torch_params(model)):
        g = g.T if g.ndim == 2 else g
        np.testing.assert_allclose(g, tp.grad.numpy(), rtol=0, atol=1e-15, err_msg=name)
    if max_norm == 0.05:
        total = np.sqrt(sum(float((g ** 2).sum()) for _, _, g in net.parameters()))
        assert total == pytest.approx(max_norm, rel=1e-4)


def test_clip_grad_value_matches_torch(rng):
    net = make_net()
    model = net.to_torch()
    X, y = data(rng)
    bprop_grads(net, X, y)
    torch_grads(model, X, y)
    bprop.clip_grad_value(net, 0.01)
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
    clipped = 0
    for (name, _, g), tp in zip(net.parameters(), torch_params(model)):
        g = g.T if g.ndim == 2 else g
        np.testing.assert_allclose(g, tp.grad.numpy(), rtol=0, atol=1e-15, err_msg=name)
        assert np.array_equal(np.abs(g) == 0.01, np.abs(tp.grad.numpy()) == 0.01)
        assert np.abs(g).max() <= 0.01
        clipped += int((np.abs(g) == 0.01).sum())
    assert clipped > 0


OPTIMIZERS = {
    "sgd": (lambda net: optim.SGD(net, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd-momentum": (lambda net: optim.SGD(net, lr=0.05, momentum=0.9, weight_decay=1e-3),
                     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adam": (lambda net: optim.Adam(net, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("path", ["train_step", "fit"])
def test_clipped_training_matches_torch_over_20_steps(rng, name, path):
    make_opt, make_torch_opt = OPTIMIZERS[name]
    net = make_net()
    model = net.to_torch()
    opt, topt = make_opt(net), make_torch_opt(model.parameters())
    X, y = data(rng, n=20 * 8)
    max_norm, norms = 0.3, []
    if path == "train_step":
        for i in range(20):
            net.train_step(X[8 * i:8 * i + 8], y[8 * i:8 * i + 8], optimizer=opt,
                           clip_grad_norm=max_norm)
    else:
        bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=8, shuffle=False,
                  clip_grad_norm=max_norm)
    for i in range(20):
        topt.zero_grad()
        torch_grads(model, X[8 * i:8 * i + 8], y[8 * i:8 * i + 8])
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        topt.step()
    assert sum(n > max_norm for n in norms) >= 5  # the clipping was active
    for (pname, p, _), tp in zip(net.parameters(), torch_params(model)):
        p = p.T if p.ndim == 2 else p
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=0, atol=1e-12, err_msg=pname)


def test_train_step_clipping_equals_the_separate_calls(rng):
    """train_step(clip_grad_norm=) = forward, backward, clip_grad_norm, step(), for
    plain SGD (whose fused step cannot be used then), momentum and a user loss."""
    X, y = data(rng)
    for make_opt in (lambda n: optim.SGD(n, lr=0.1), lambda n: optim.SGD(n, lr=0.1, momentum=0.5)):
        a, b = make_net(), make_net()
        oa, ob = make_opt(a), make_opt(b)
        for _ in range(3):
            a.train_step(X, y, optimizer=oa, clip_grad_norm=0.1)
            bprop_grads(b, X, y)
            bprop.clip_grad_norm(b, 0.1)
            ob.step()
        for (name, p, g), (_, q, h) in zip(a.parameters(), b.parameters()):
            np.testing.assert_allclose(p, q, rtol=0, atol=1e-15, err_msg=name)
            np.testing.assert_allclose(g, h, rtol=0, atol=1e-15, err_msg=name)  # clipped grads kept
    # a user loss takes the separate calls itself
    a, b = make_net(), make_net()
    oa, ob = optim.Adam(a, lr=1e-2), optim.Adam(b, lr=1e-2)
    a.train_step(X, y, loss=bprop.losses.softmax_cross_entropy, optimizer=oa, clip_grad_norm=0.1)
    b.train_step(X, y, optimizer=ob, clip_grad_norm=0.1)
    for (name, p, _), (_, q, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-15, err_msg=name)


def test_clipping_is_bitwise_the_same_for_any_thread_count(rng):
    # W0 has 60000 values: the norm and the scaling run in several blocks on the pool
    X, y = rng.standard_normal((256, 200)), rng.integers(0, 10, 256)
    results = []
    before = bprop.get_num_threads()
    try:
        for threads in (1, 2, 3):
            bprop.set_num_threads(threads)
            net = bprop.Network([bprop.Dense(200, 300, "relu"), bprop.Dense(300, 10)], seed=0)
            bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=1e-2), epochs=2, batch_size=64,
                      seed=0, clip_grad_norm=0.5)
            results.append([p.copy() for _, p, _ in net.parameters()])
    finally:
        bprop.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_sparse_input_with_lazy_adam_and_clipping(rng):
    sp = pytest.importorskip("scipy.sparse")
    X = sp.random(32, 40, density=0.1, format="csr", random_state=0, dtype=np.float64)
    y = rng.integers(0, 3, 32)
    net = bprop.Network([bprop.Dense(40, 8, "tanh"), bprop.Dense(8, 3)], seed=0, dtype="float64")
    ref = bprop.Network([bprop.Dense(40, 8, "tanh"), bprop.Dense(8, 3)], seed=0, dtype="float64")
    opt, ref_opt = optim.Adam(net, lr=1e-2, lazy=True), optim.Adam(ref, lr=1e-2, lazy=True)
    for _ in range(3):
        net.train_step(X, y, optimizer=opt, clip_grad_norm=0.05)
        bprop_grads(ref, X, y)
        assert bprop.clip_grad_norm(ref, 0.05) > 0.05
        ref_opt.step()
    for (name, p, _), (_, q, _) in zip(net.parameters(), ref.parameters()):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-15, err_msg=name)


def test_bad_arguments_and_missing_gradients(rng):
    net = make_net()
    X, y = data(rng)
    with pytest.raises(RuntimeError, match=r"\[clip_grad_norm\] the network holds no gradients"):
        bprop.clip_grad_norm(net, 1.0)
    with pytest.raises(RuntimeError, match=r"\[clip_grad_value\] the network holds no gradients"):
        bprop.clip_grad_value(net, 1.0)
    bprop_grads(net, X, y)
    grads = [g.copy() for _, _, g in net.parameters()]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"\[clip_grad_norm\] max_norm"):
            bprop.clip_grad_norm(net, bad)
        with pytest.raises(ValueError, match=r"\[clip_grad_value\] clip_value"):
            bprop.clip_grad_value(net, bad)
    with pytest.raises(TypeError, match=r"\[clip_grad_norm\] max_norm"):
        bprop.clip_grad_norm(net, "1")
    with pytest.raises(TypeError, match=r"\[clip_grad_norm\] net"):
        bprop.clip_grad_norm(object(), 1.0)
    opt = optim.SGD(net, lr=0.1)
    before = [p.copy() for _, p, _ in net.parameters()]
    with pytest.raises(ValueError, match=r"\[Network.train_step\] clip_grad_norm"):
        net.train_step(X, y, optimizer=opt, clip_grad_norm=-1)
    with pytest.raises(ValueError, match=r"\[fit\] clip_grad_norm"):
        bprop.fit(net, X, y, optimizer=opt, clip_grad_norm=-0.5)
    for (_, p, g), b, h in zip(net.parameters(), before, grads):
        np.testing.assert_array_equal(p, b)
        np.testing.assert_array_equal(g, h)
    # a fused SGD step stores no gradient: nothing to clip afterwards
    net.train_step(X, y, optimizer=opt)
    with pytest.raises(RuntimeError, match="no gradients"):
        bprop.clip_grad_norm(net, 1.0)

"""elu, selu, silu and softplus against the torch.nn modules they copy (torch 2.13):
a Dense layer's forward and backward in float64 to 1e-12, on pre-activations that
probe each branch, softplus's threshold (19.9, 20, 20.1) and the saturated tails,
and the modules' configurations that bprop refuses.

The products are exact wherever the comparison is tight: the pre-activations come
through an identity weight, or through dyadic weights and inputs small enough that
every product and partial sum is exact in any order. What is left to differ is the
activation kernels (torch's vectorised exp/expm1/log1p against the C library's,
each within an ulp or two), and, for the gradients that sum over the batch, the
order of a GEMM's sum, which the tolerance's absolute term covers.
"""

from __future__ import annotations

import numpy as np
import pytest

import bprop

torch = pytest.importorskip("torch")
nn = torch.nn

MODULES = {"elu": lambda: nn.ELU(alpha=1.0), "selu": nn.SELU, "silu": nn.SiLU,
           "softplus": lambda: nn.Softplus(beta=1.0, threshold=20.0)}

# Both branches of each activation, both sides of softplus's threshold, the zero of
# silu's derivative's neighbourhood (-1.5, -1), the exp underflow (-745.2) and overflow
# (709, 800) points of float64, and tiny |z| where exp(z) - 1 would cancel.
Z = [-1e4, -1e3, -800.0, -745.2, -709.0, -100.0, -40.0, -36.8, -20.1, -20.0, -19.9, -5.0,
     -1.5, -1.0, -0.5, -1e-5, -1e-10, -1e-300, 0.0, 1e-300, 1e-10, 1e-5, 0.5, 1.0, 1.5, 5.0,
     19.9, 20.0, 20.1, 36.8, 40.0, 100.0, 709.0, 800.0, 1e3, 1e4]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; the thread count in force is restored
    yield
    torch.set_num_threads(before)


def _torch_dense(layer, module):
    linear = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(layer.weight.T.copy()))
        linear.bias.copy_(torch.from_numpy(layer.bias.copy()))
    return linear, module


def _both(name, X, W, b, G):
    """bprop's and torch's (output, delta = dL/dz, dL/dX, dL/dW, dL/db) of
    Dense(activation=name) at X, with weight W, bias b and dL/d(output) = G."""
    net = bprop.Network([bprop.Dense(*W.shape, activation=name)], dtype="float64", seed=0)
    net[0].weight = W
    net[0].bias = b
    with np.errstate(all="raise"):
        out = net.forward(X).copy()
        dX = net.backward(G, input_grad=True).copy()
    ours = (out, net[0].delta.copy(), dX, net[0].grad_weight.copy(), net[0].grad_bias.copy())

    linear, module = _torch_dense(net[0], MODULES[name]())
    x = torch.from_numpy(X.copy()).requires_grad_(True)
    z = linear(x)
    z.retain_grad()
    a = module(z)
    a.backward(torch.from_numpy(G.copy()))
    theirs = (a.detach().numpy(), z.grad.numpy(), x.grad.numpy(), linear.weight.grad.numpy().T,
              linear.bias.grad.numpy())
    return ours, theirs


def _close(actual, desired, what, scale=None):
    # rtol 1e-12; the absolute term is 1e-12 of the scale of what flows through
    # (scale), or 1e-300 for elementwise results, where exp(-745.2) may be a
    # subnormal on one side and 0 on the other
    atol = 1e-300 if scale is None else 1e-12 * scale
    bad = ~(np.abs(actual - desired) <= 1e-12 * np.abs(desired) + atol)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} differ, e.g. "
                           f"{actual[bad][:3]} against {desired[bad][:3]}")


@pytest.mark.parametrize("name", list(MODULES))
def test_dense_at_chosen_pre_activations_matches_torch(name):
    # W = I, b = 0: z = X exactly in both, so every z above is hit as written
    n = len(Z)
    X = np.array([Z, Z[::-1]])
    G = np.linspace(-1.0, 1.0, 2 * n).reshape(2, n)
    ours, theirs = _both(name, X, np.eye(n), np.zeros(n), G)
    for what, mine, ref in zip(("output", "delta"), ours, theirs):
        _close(mine, ref, f"{name} {what}")
        assert np.isfinite(mine).all()
    # dL/dX = delta W^T = delta exactly; dL/dW = X^T delta sums over the batch
    _close(ours[2], theirs[2], f"{name} dL/dX")
    _close(ours[3], theirs[3], f"{name} dL/dW", scale=np.abs(X).T @ np.abs(theirs[1]))
    _close(ours[4], theirs[4], f"{name} dL/db", scale=np.abs(theirs[1]).sum(axis=0))


@pytest.mark.parametrize("name", list(MODULES))
def test_dense_at_closed_form_values(name):
    # the definitions at a few points, softplus around its threshold
    z = np.array([[19.9, 20.0, 20.1, -40.0, -1e-10, 0.0]])
    ours, _ = _both(name, z, np.eye(6), np.zeros(6), np.ones((1, 6)))
    out, delta = ours[0][0], ours[1][0]
    if name == "softplus":
        # log1p(exp(z)) up to and at 20, z itself above; the derivative 1 above
        assert out[2] == 20.1 and delta[2] == 1.0
        np.testing.assert_allclose(out[:2], np.log1p(np.exp([19.9, 20.0])), rtol=1e-15)
        np.testing.assert_allclose(delta[:2], 1 / (1 + np.exp([-19.9, -20.0])), rtol=1e-15)
        np.testing.assert_allclose(out[3], np.exp(-40.0), rtol=1e-15)  # log1p(u) = u
    elif name == "elu":
        np.testing.assert_allclose(out[3:5], np.expm1([-40.0, -1e-10]), rtol=1e-15)
        np.testing.assert_allclose(delta[3:5], np.exp([-40.0, -1e-10]), rtol=1e-15)
    elif name == "silu":
        np.testing.assert_allclose(out[3], -40.0 * np.exp(-40.0) / (1 + np.exp(-40.0)),
                                   rtol=1e-14)
        assert out[5] == 0.0 and delta[5] == 0.5


@pytest.mark.parametrize("name", list(MODULES))
def test_dense_on_dyadic_data_matches_torch(name):
    # weights in steps of 1/8 in [-2, 2], inputs in steps of 1/16 in [-8, 8], biases in
    # steps of 1/4: 12 products of at most 16 significant bits sum exactly, so z is
    # the same number in bprop and torch; 1.5 * that range reaches softplus's threshold
    rng = np.random.default_rng(14)
    X = rng.integers(-128, 129, (40, 12)) / 16 * 1.5
    W = rng.integers(-16, 17, (12, 9)) / 8
    b = rng.integers(-8, 9, 9) / 4
    G = rng.standard_normal((40, 9))
    ours, theirs = _both(name, X, W, b, G)
    z = X @ W + b
    assert (z > 20).any() and (z < -20).any(), "the data should reach both tails"
    for what, mine, ref in zip(("output", "delta"), ours, theirs):
        _close(mine, ref, f"{name} {what}")
    delta = np.abs(theirs[1])
    _close(ours[2], theirs[2], f"{name} dL/dX", scale=delta @ np.abs(W).T)
    _close(ours[3], theirs[3], f"{name} dL/dW", scale=np.abs(X).T @ delta)
    _close(ours[4], theirs[4], f"{name} dL/db", scale=delta.sum(axis=0))


@pytest.mark.parametrize("name", list(MODULES))
def test_to_torch_and_back(name):
    net = bprop.Network([bprop.Dense(4, 5, activation=name), bprop.Activation(name)],
                        dtype="float64", seed=0)
    model = net.to_torch()
    assert [type(m) for m in model] == [nn.Linear, type(MODULES[name]()),
                                        type(MODULES[name]())]
    for m in model[1:]:
        if name == "elu":
            assert m.alpha == 1.0
        if name == "softplus":
            assert (m.beta, m.threshold) == (1.0, 20.0)
    back = bprop.Network.from_torch(model)
    assert [getattr(layer, "activation", None) for layer in back] == [name, name]
    X = np.random.default_rng(0).standard_normal((3, 4))
    assert back.predict(X).tobytes() == net.predict(X).tobytes()


@pytest.mark.parametrize("module, message", [
    (lambda: nn.ELU(alpha=0.5), (r"module 1 \(ELU\) has alpha=0\.5; bprop's elu is "
                                 r"ELU\(alpha=1\.0\)")),
    (lambda: nn.Softplus(beta=2.0), (r"module 1 \(Softplus\) has beta=2\.0, threshold=20\.0; "
                                     r"bprop's softplus is Softplus\(beta=1\.0, "
                                     r"threshold=20\.0\)")),
    (lambda: nn.Softplus(threshold=10.0), r"has beta=1\.0, threshold=10\.0"),
])
def test_from_torch_refuses_other_parameters(module, message):
    with pytest.raises(ValueError, match=message):
        bprop.Network.from_torch(nn.Sequential(nn.Linear(3, 4), module()))
    with pytest.raises(ValueError, match=message.replace("module 1", "module 0")):
        bprop.Network.from_torch(nn.Sequential(module(), nn.Linear(3, 4)))

"""The NumPy reference's layers (issue 12): Dense(bias=False), Activation, Dropout,
BatchNorm, LayerNorm and Residual, and the network that nests them.

* against PyTorch: forward outputs, every parameter gradient, dL/dX and the
  running buffers, in training and eval mode, at the suite's tolerances
  (relative 1e-12 in float64, 1e-5 in float32, as conftest's assert_close);
* against central finite differences in float64, through each layer, Residual
  and Dropout (its mask held fixed by resetting ``dropout_step``);
* against their specification: the dropout generator's pinned values (the C++
  core must reproduce them), the kept fraction, scaling, replay, modes, the
  network's surface and hostile arguments.
"""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop import reference
from bprop._init import initial_parameters
from bprop.activations import REGISTRY

R = reference
MASK64 = (1 << 64) - 1
EPS = 1e-6                 # central differences, as in test_gradcheck.py
MAX_RELATIVE_ERROR = 1e-6
KINK = 1e-3                # relu-family inputs stay at least this far from 0
RELU_FAMILY = ("relu", "leaky_relu")


# ---- the dropout generator, written a second time with plain Python ints -----------------

def splitmix64_int(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def dropout_key_int(seed: int, step: int, index: int) -> int:
    return splitmix64_int(splitmix64_int(splitmix64_int(seed) ^ step) ^ index)


def dropout_mask_int(key: int, rows: int, features: int, p: float) -> np.ndarray:
    keep = [(splitmix64_int((key + e) & MASK64) >> 11) * 2.0**-53 >= p
            for e in range(rows * features)]
    return np.array(keep).reshape(rows, features)


def test_splitmix64_known_values():
    """The standard SplitMix64 sequence seeded with 0 (Vigna's splitmix64.c): its
    k-th output is splitmix64((k - 1) * GAMMA). The C++ core checks the same numbers."""
    gamma = R.SPLITMIX64_GAMMA
    assert gamma == 0x9E3779B97F4A7C15
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert int(R.splitmix64(0)) == expected[0]
    assert [int(v) for v in R.splitmix64([0, gamma, (2 * gamma) & MASK64])] == expected
    assert [splitmix64_int(k * gamma & MASK64) for k in range(3)] == expected


def test_splitmix64_wraps_like_uint64_and_keeps_the_shape(rng):
    x = rng.integers(0, 2**63, size=(3, 4), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    x[0, 0], x[0, 1] = 0, MASK64  # x + GAMMA wraps
    got = R.splitmix64(x)
    assert got.dtype == np.uint64 and got.shape == (3, 4)
    assert [int(v) for v in got.ravel()] == [splitmix64_int(int(v)) for v in x.ravel()]
    assert R.splitmix64(5).shape == ()


def test_dropout_key_and_mask_known_values():
    """Pinned values of the whole mask recipe, for the C++ core to reproduce."""
    assert R.dropout_key(0, 0, 0) == dropout_key_int(0, 0, 0) == 0x238275BC38FCBE91
    assert R.dropout_key(0, 1, 0) == 0x44E5B98100C67FB0
    assert R.dropout_key(0, 0, 1) == 0x2F32A78496C67C60
    assert R.dropout_key(MASK64, MASK64, 7) == 0xAE393EE75F9EF22C
    key = 0x238275BC38FCBE91
    assert [int(v) for v in R.splitmix64(key + np.arange(4, dtype=np.uint64))] == [
        0x2130748AAAC80268, 0x698DFBA9F1FC1B53, 0x4F833D459789AC77, 0xED98827BAA3CECAA]
    mask = R.dropout_mask(key, (2, 5), 0.5)
    assert mask.dtype == np.bool_
    assert mask.astype(int).tolist() == [[0, 0, 0, 1, 0], [1, 0, 0, 1, 0]]


@pytest.mark.parametrize("key", [0, 0x238275BC38FCBE91, MASK64 - 3])  # the last wraps key + e
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.93])
def test_dropout_mask_is_the_recipe(key, p):
    np.testing.assert_array_equal(R.dropout_mask(key, (7, 9), p), dropout_mask_int(key, 7, 9, p))


def test_dropout_mask_compares_the_exact_uniform_with_p():
    # u_e = (bits >> 11) 2^-53 exactly; p equal to one of them keeps that element (u >= p)
    key = 12345
    u = (R.splitmix64(key + np.arange(6, dtype=np.uint64)) >> np.uint64(11)).astype(
        np.float64) * 2.0**-53
    p = float(np.sort(u)[2])
    mask = R.dropout_mask(key, (2, 3), p).ravel()
    np.testing.assert_array_equal(mask, u >= p)
    assert mask[np.argsort(u)[2]] and mask.sum() == 4


# ---- Dropout in a network --------------------------------------------------------------------

def _dropout_net(p, dtype="float64", seed=0, features=8):
    return R.Network([R.Dense(3, features, "tanh"), R.Dropout(p), R.Dense(features, 2)],
                     dtype=dtype, seed=seed)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_a_fraction_near_one_minus_p(p):
    # 10^6 Bernoulli(1 - p) draws: the kept fraction has sigma = sqrt(p (1 - p) / 10^6)
    # <= 5e-4. The masks are fixed by the seed, so this cannot flake; the bound says
    # that the generator is not off by more than 6 sigma.
    net = R.Network([R.Dropout(p), R.Dense(1000, 1)], seed=3)
    net.forward(np.ones((1000, 1000), np.float32))
    sigma = np.sqrt(p * (1 - p) / 1e6)
    assert abs(net[0].mask.mean() - (1 - p)) <= 6 * sigma


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.7])
def test_dropout_scales_kept_elements_by_one_over_one_minus_p(p, dtype, rng):
    net = _dropout_net(p, dtype)
    X = rng.standard_normal((6, 3)).astype(dtype)
    net.forward(X)
    drop = net[1]
    a = np.asarray(net[0].output)
    scale = np.dtype(dtype).type(1.0 / (1.0 - p))
    expected = np.where(drop.mask, a * scale, 0).astype(dtype)
    np.testing.assert_array_equal(net[2].input, expected)
    assert net[2].input.dtype == np.dtype(dtype)
    np.testing.assert_allclose(net[2].input[drop.mask], a[drop.mask] / (1 - p),
                               rtol=1e-6 if dtype == "float32" else 1e-15)
    assert (p == 0) == drop.mask.all()
    G = rng.standard_normal((6, 2)).astype(dtype)
    net.backward(G)
    grad_drop_out = net[2].delta @ net[2].weight.T  # dL/d(dropout output)
    expected_grad = np.where(drop.mask, grad_drop_out * scale, 0).astype(dtype)
    np.testing.assert_array_equal(drop.backward(grad_drop_out), expected_grad)
    # in the sweep, the Dense below received exactly that gradient
    np.testing.assert_array_equal(
        net[0].delta, R.activation_backward("tanh", net[0].z, net[0].output, expected_grad))


def test_dropout_mask_is_the_generator_keyed_by_seed_step_and_depth_first_index(rng):
    net = R.Network([R.Dense(4, 6), R.Dropout(0.3),
                     R.Residual([R.Dense(6, 6, "tanh"), R.Dropout(0.5),
                                 R.Residual([R.Dropout(0.2), R.Dense(6, 6)])]),
                     R.Dropout(0.4), R.Dense(6, 2)], seed=2**64 + 5)
    drops = [net[1], net[2][1], net[2][2][0], net[3]]
    assert [d.dropout_index for d in drops] == [0, 1, 2, 3]
    assert net.dropout_seed == 5  # the seed as uint64
    X = rng.standard_normal((5, 4)).astype(np.float32)
    for step in range(3):
        assert net.dropout_step == step
        net.forward(X)
        for d in drops:
            key = dropout_key_int(5, step, d.dropout_index)
            np.testing.assert_array_equal(d.mask, dropout_mask_int(key, 5, 6, d.p))
    assert net.dropout_step == 3


def test_dropout_masks_differ_between_steps_and_layers_and_replay(rng):
    net = R.Network([R.Dense(4, 64), R.Dropout(0.5), R.Dropout(0.5), R.Dense(64, 2)], seed=9)
    X = rng.standard_normal((32, 4)).astype(np.float32)
    out0 = net.forward(X)
    m0, m1 = net[1].mask.copy(), net[2].mask.copy()
    assert not np.array_equal(m0, m1)                   # two layers, one step
    out1 = net.forward(X)
    assert not np.array_equal(net[1].mask, m0)          # one layer, two steps
    assert not np.array_equal(out0, out1)
    net.dropout_step = 0                                # replay
    np.testing.assert_array_equal(net.forward(X), out0)
    np.testing.assert_array_equal(net[1].mask, m0)
    np.testing.assert_array_equal(net[2].mask, m1)
    twin = R.Network([R.Dense(4, 64), R.Dropout(0.5), R.Dropout(0.5), R.Dense(64, 2)], seed=9)
    np.testing.assert_array_equal(twin.forward(X), out0)  # same seed: same bits
    other = R.Network([R.Dense(4, 64), R.Dropout(0.5), R.Dropout(0.5), R.Dense(64, 2)], seed=10)
    other.forward(X)
    assert not np.array_equal(other[1].mask, m0)


def test_dropout_without_a_seed_draws_a_64_bit_key(rng):
    nets = [_dropout_net(0.5, seed=None, features=64) for _ in range(2)]
    seeds = [n.dropout_seed for n in nets]
    assert all(isinstance(s, int) and 0 <= s < 2**64 for s in seeds)
    assert seeds[0] != seeds[1]  # two 64-bit draws from the OS's entropy
    X = rng.standard_normal((16, 3))
    nets[0].forward(X)
    key = dropout_key_int(seeds[0], 0, 0)
    np.testing.assert_array_equal(nets[0][1].mask, dropout_mask_int(key, 16, 64, 0.5))


def test_dropout_is_the_identity_in_eval_mode(rng):
    net = _dropout_net(0.6).eval()
    X = rng.standard_normal((5, 3))
    net.forward(X)
    assert net[1].mask is None
    np.testing.assert_array_equal(net[2].input, net[0].output)
    G = rng.standard_normal((5, 8))
    np.testing.assert_array_equal(net[1].backward(G), G)
    assert net.dropout_step == 0  # eval-mode passes are not counted


def test_dropout_step_counts_training_forwards_only(rng):
    net = _dropout_net(0.5)
    X = rng.standard_normal((4, 3))
    net.forward(X)
    net.predict(X)
    net.eval().forward(X)
    net.train().forward(X)
    assert net.dropout_step == 2
    net.dropout_step = 2**64 - 1
    net.forward(X)
    assert net.dropout_step == 0  # wraps like the uint64 it is


# ---- PyTorch: a mirror of a reference network ----------------------------------------------

@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; the thread count in force is restored
    yield torch
    torch.set_num_threads(before)


def _torch_activation(nn, name, slope):
    # the registry row's torch.nn module, the one bprop.interop.to_torch builds
    return REGISTRY[name].to_torch(nn, slope)


def mirror(torch, net):
    """A torch module computing what the reference network computes, starting from
    its parameters and buffers, and {reference name: (torch tensor, transposed)}.

    A Dropout with p = 0 is torch's nn.Dropout; one with p > 0 applies the mask of
    the reference layer's last forward (run the reference first), so that the two
    compute the same function in training mode too."""
    nn = torch.nn
    tdtype = getattr(torch, net.dtype.name)

    class Residual(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return x + self.body(x)

    class FixedMask(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            if not self.training:
                return x
            mask = torch.from_numpy(np.array(self.layer.mask))
            return torch.where(mask, x * (1.0 / (1.0 - self.layer.p)), 0.0)

    names = {}

    def copy(tensor, array, name, transposed=False):
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(np.array(array.T if transposed else array)))
        names[name] = (tensor, transposed)

    def build(layers, prefix):
        mods = []
        for i, L in enumerate(layers):
            name = f"{prefix}{i}."
            if isinstance(L, R.Dense):
                lin = nn.Linear(L.in_features, L.out_features, bias=L.bias is not None,
                                dtype=tdtype)
                copy(lin.weight, L.weight, name + "weight", transposed=True)
                if L.bias is not None:
                    copy(lin.bias, L.bias, name + "bias")
                mods.append(nn.Sequential(lin, _torch_activation(nn, L.activation,
                                                                 L.negative_slope)))
            elif isinstance(L, R.Activation):
                mods.append(_torch_activation(nn, L.name, L.negative_slope))
            elif isinstance(L, R.Dropout):
                mods.append(nn.Dropout(L.p) if L.p == 0 else FixedMask(L))
            elif isinstance(L, R.BatchNorm):
                bn = nn.BatchNorm1d(L.features, eps=L.eps, momentum=L.momentum,
                                    affine=L.affine, dtype=tdtype)
                copy(bn.running_mean, L.running_mean, name + "running_mean")
                copy(bn.running_var, L.running_var, name + "running_var")
                if L.affine:
                    copy(bn.weight, L.weight, name + "weight")
                    copy(bn.bias, L.bias, name + "bias")
                mods.append(bn)
            elif isinstance(L, R.LayerNorm):
                ln = nn.LayerNorm(L.features, eps=L.eps,
                                  elementwise_affine=L.elementwise_affine, dtype=tdtype)
                if L.elementwise_affine:
                    copy(ln.weight, L.weight, name + "weight")
                    copy(ln.bias, L.bias, name + "bias")
                mods.append(ln)
            elif isinstance(L, R.Residual):
                mods.append(Residual(build(L.layers, name + "layers.")))
            else:
                raise AssertionError(f"no mirror for {L!r}")
        return nn.Sequential(*mods)

    module = build(net.layers, "layers.")
    module.train(net.training)
    return module, names


def torch_step(torch, module, X, G):
    """out = module(X) and the gradients of L = sum(G * out); returns (out, dL/dX)."""
    Xt = torch.from_numpy(X.copy()).requires_grad_()
    out = module(Xt)
    (out * torch.from_numpy(G)).sum().backward()
    return out.detach().numpy(), Xt.grad.numpy()


def compare_with_torch(torch, net, X, G, assert_close, record_error, what):
    """One forward and backward of L = sum(G * out) in the network's current mode,
    in the reference and in its mirror: outputs, dL/dX, every parameter's gradient
    and every buffer agree."""
    module, names = mirror(torch, net)
    out = net.forward(X)
    dX = net.backward(G, input_grad=True)
    t_out, t_dX = torch_step(torch, module, X, G)
    tag = f"reference vs torch, {net.dtype.name}"
    record_error(tag, assert_close(out, t_out, f"{what}: output"))
    record_error(tag, assert_close(dX, t_dX, f"{what}: dL/dX"))
    params = list(net.parameters())
    assert {n for n, _, _ in params} | {n for n, _ in net.buffers()} == set(names)
    for name, _, grad in params:
        tensor, transposed = names[name]
        t_grad = tensor.grad.numpy()
        record_error(tag, assert_close(grad, t_grad.T if transposed else t_grad,
                                       f"{what}: {name} gradient"))
    for name, array in net.buffers():
        record_error(tag, assert_close(array, names[name][0].numpy(), f"{what}: {name}"))
    return module


def issue_network(dtype="float64", p=(0.2, 0.1), seed=0, width=16):
    """The issue's example network, narrower, its first Dense without a bias: in
    training mode BatchNorm cancels that bias, whose gradient is then zero up to
    rounding (test_batchnorm_in_training_makes_the_bias_below_it_irrelevant)."""
    return R.Network([
        R.Dense(12, width, bias=False),
        R.BatchNorm(width),
        R.Activation("relu"),
        R.Dropout(p[0]),
        R.Residual([R.Dense(width, width, activation="relu"), R.Dropout(p[1]),
                    R.Dense(width, width)]),
        R.LayerNorm(width),
        R.Dense(width, 10),
    ], dtype=dtype, seed=seed)


def _set_running_statistics(net, rng):
    """Running statistics away from their initial 0 and 1 (so eval mode uses them)."""
    for L in _all_layers(net.layers):
        if isinstance(L, R.BatchNorm):
            L.running_mean = rng.standard_normal(L.features) * 0.5
            L.running_var = rng.uniform(0.5, 2.0, L.features)
        if isinstance(L, (R.BatchNorm, R.LayerNorm)) and L.weight is not None:
            L.weight = rng.uniform(0.5, 1.5, L.features)
            L.bias = rng.standard_normal(L.features) * 0.1


def _all_layers(layers):
    for L in layers:
        yield L
        if isinstance(L, R.Residual):
            yield from _all_layers(L.layers)


# One network per layer type (and option), each layer between Dense layers, plus nests.
LAYER_CASES = {
    "dense-no-bias": lambda: [R.Dense(5, 7, "tanh", bias=False), R.Dense(7, 3, bias=False)],
    **{f"activation-{name}": (lambda name=name: [
        R.Dense(5, 7), R.Activation(name, negative_slope=0.2), R.Dense(7, 3)])
       for name in R.ACTIVATIONS},
    "batchnorm": lambda: [R.Dense(5, 7, bias=False), R.BatchNorm(7, momentum=0.3),
                          R.Dense(7, 3)],
    "batchnorm-no-affine": lambda: [R.Dense(5, 7, "tanh"),
                                    R.BatchNorm(7, eps=1e-3, affine=False), R.Dense(7, 3)],
    "batchnorm-first": lambda: [R.BatchNorm(5), R.Dense(5, 3, "tanh")],
    "layernorm": lambda: [R.Dense(5, 7), R.LayerNorm(7), R.Dense(7, 3)],
    "layernorm-no-affine": lambda: [R.Dense(5, 7), R.LayerNorm(7, eps=1e-3,
                                                               elementwise_affine=False),
                                    R.Dense(7, 3)],
    "dropout-p0": lambda: [R.Dense(5, 7, "gelu"), R.Dropout(0.0), R.Dense(7, 3)],
    "dropout": lambda: [R.Dense(5, 7, "gelu"), R.Dropout(0.4), R.Dense(7, 3), R.Dropout(0.3)],
    "residual": lambda: [R.Dense(5, 6, "tanh"),
                         R.Residual([R.Dense(6, 4, "gelu"), R.Dense(4, 6)]), R.Dense(6, 3)],
    "residual-nested": lambda: [
        R.Residual([R.Activation("sigmoid"),
                    R.Residual([R.Dense(5, 5, "tanh"), R.LayerNorm(5)]),
                    R.Residual([R.Residual([R.Dense(5, 5, "gelu")])]),
                    R.BatchNorm(5), R.Dropout(0.25)]),
        R.Dense(5, 3)],
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_each_layer_matches_torch_float64(torch, name, training, rng, assert_close,
                                          record_error):
    net = R.Network(LAYER_CASES[name](), dtype="float64", seed=1).train(training)
    _set_running_statistics(net, rng)
    X = rng.standard_normal((6, net.in_features))
    G = rng.standard_normal((6, net.out_features))
    compare_with_torch(torch, net, X, G, assert_close, record_error, name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["dense-no-bias", "activation-gelu", "activation-softmax",
                                  "batchnorm", "layernorm", "dropout", "residual-nested"])
def test_each_layer_matches_torch_float32(torch, name, training, rng, assert_close,
                                          record_error):
    net = R.Network(LAYER_CASES[name](), dtype="float32", seed=1).train(training)
    _set_running_statistics(net, rng)
    X = rng.standard_normal((6, net.in_features)).astype(np.float32)
    G = rng.standard_normal((6, net.out_features)).astype(np.float32)
    compare_with_torch(torch, net, X, G, assert_close, record_error, name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [(0.0, 0.0), (0.2, 0.1)], ids=["p0", "p0.2-0.1"])
def test_the_issue_network_matches_torch(torch, p, training, dtype, rng, assert_close,
                                         record_error):
    net = issue_network(dtype, p).train(training)
    _set_running_statistics(net, rng)
    X = rng.standard_normal((8, 12)).astype(dtype)
    G = rng.standard_normal((8, 10)).astype(dtype)
    compare_with_torch(torch, net, X, G, assert_close, record_error, "issue network")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batchnorm_running_statistics_match_torch_over_several_steps(torch, dtype, rng,
                                                                     assert_close,
                                                                     record_error):
    net = R.Network([R.Dense(4, 6, bias=False), R.BatchNorm(6, momentum=0.3),
                     R.Activation("relu"),
                     R.Residual([R.Dense(6, 6), R.BatchNorm(6, affine=False)]),
                     R.Dense(6, 2)], dtype=dtype, seed=4)
    module, names = mirror(torch, net)
    for batch in (5, 2, 9, 3):  # batches of different sizes: n / (n - 1) changes
        X = (rng.standard_normal((batch, 4)) * 2 + 1).astype(dtype)
        out = net.forward(X)
        with torch.no_grad():
            t_out = module(torch.from_numpy(X)).numpy()
        assert_close(out, t_out, f"output, batch {batch}")
        for name, array in net.buffers():
            err = assert_close(array, names[name][0].numpy(), f"{name}, batch {batch}")
            record_error(f"reference vs torch, {dtype}, running statistics", err)
    net.eval()
    module.eval()
    X = rng.standard_normal((3, 4)).astype(dtype)
    with torch.no_grad():
        assert_close(net.forward(X), module(torch.from_numpy(X)).numpy(), "eval output")


def test_batchnorm_running_statistics_follow_the_formula(rng):
    net = R.Network([R.BatchNorm(3, momentum=0.25)], dtype="float64")
    bn = net[0]
    X = rng.standard_normal((4, 3)) * 3
    net.forward(X)
    mean, var_unbiased = X.mean(axis=0), X.var(axis=0, ddof=1)
    np.testing.assert_allclose(bn.running_mean, 0.75 * 0 + 0.25 * mean, rtol=1e-15)
    np.testing.assert_allclose(bn.running_var, 0.75 * 1 + 0.25 * var_unbiased, rtol=1e-15)
    np.testing.assert_allclose(bn.var, X.var(axis=0), rtol=1e-15)  # biased in the output
    np.testing.assert_allclose(bn.output, (X - mean) / np.sqrt(X.var(axis=0) + 1e-5),
                               rtol=1e-13)
    frozen = R.Network([R.BatchNorm(3, momentum=0.0)], dtype="float64")
    frozen.forward(X)
    np.testing.assert_array_equal(frozen[0].running_mean, 0)
    np.testing.assert_array_equal(frozen[0].running_var, 1)


def test_batchnorm_in_training_makes_the_bias_below_it_irrelevant(rng):
    """A Dense bias feeding BatchNorm shifts the batch mean and nothing else, so its
    gradient is zero up to rounding (hence Dense(..., bias=False))."""
    net = R.Network([R.Dense(5, 7), R.BatchNorm(7), R.Dense(7, 3, "tanh")], dtype="float64")
    net.forward(rng.standard_normal((6, 5)))
    net.backward(rng.standard_normal((6, 3)))
    assert np.abs(net[0].grad_bias).max() <= 1e-14 * np.abs(net[0].delta).max()
    assert np.abs(net[0].grad_weight).max() > 1e-3


def test_layernorm_normalises_each_row(rng):
    net = R.Network([R.LayerNorm(5)], dtype="float64")
    X = rng.standard_normal((3, 5)) * 4 + 2
    out = net.forward(X)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-15)
    np.testing.assert_allclose(out, (X - X.mean(axis=1, keepdims=True))
                               / np.sqrt(X.var(axis=1, keepdims=True) + 1e-5), rtol=1e-13)
    np.testing.assert_array_equal(net.eval().forward(X), out)  # no mode


# ---- central differences in float64 ----------------------------------------------------------

def _central_difference(loss, array):
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


def _relative_error(numeric, analytic):
    scale = np.max(np.abs(analytic))
    assert scale > 0, "a gradient that is zero everywhere checks nothing"
    return float(np.max(np.abs(numeric - analytic)) / scale)


def _min_kink_distance(net):
    """The smallest |input| of a relu-family unit in the last forward."""
    dists = [np.inf]
    for L in _all_layers(net.layers):
        if isinstance(L, R.Dense) and L.activation in RELU_FAMILY:
            dists.append(np.abs(L.z).min())
        if isinstance(L, R.Activation) and L.name in RELU_FAMILY:
            dists.append(np.abs(L.input).min())
    return min(dists)


def gradient_errors(make_layers, training, rng, batch=5):
    """Max-norm relative errors of every parameter gradient and of dL/dX against
    central differences of L = sum(G * forward(X)) (every row enters L), with the
    dropout masks held fixed by replaying dropout_step."""
    for seed in range(100):  # a draw with no relu-family input near its kink
        net = R.Network(make_layers(), dtype="float64", seed=seed).train(training)
        _set_running_statistics(net, rng)
        X = rng.standard_normal((batch, net.in_features))
        net.forward(X)
        if _min_kink_distance(net) >= KINK:
            break
    else:
        raise AssertionError("no draw kept the relu-family inputs away from the kink")
    G = rng.standard_normal((batch, net.out_features))

    def loss():
        net.dropout_step = 0
        return float(np.sum(G * net.forward(X)))

    loss()
    dX = net.backward(G, input_grad=True)
    analytic = {name: grad.copy() for name, _, grad in net.parameters()}
    errors = {name: _relative_error(_central_difference(loss, value), analytic[name])
              for name, value, _ in net.parameters()}
    errors["dL/dX"] = _relative_error(_central_difference(loss, X), dX)
    return errors


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYER_CASES) + ["issue-network"])
def test_backward_matches_central_differences(name, training, rng, record_error):
    # the issue's network, narrower; its first Dense has no bias, since in training mode
    # BatchNorm makes the loss independent of it (a zero gradient checks nothing)
    make = LAYER_CASES.get(name, lambda: [
        R.Dense(12, 6, bias=False), R.BatchNorm(6), R.Activation("relu"), R.Dropout(0.2),
        R.Residual([R.Dense(6, 6, "relu"), R.Dropout(0.1), R.Dense(6, 6)]),
        R.LayerNorm(6), R.Dense(6, 4)])
    errors = gradient_errors(make, training, rng)
    for err in errors.values():
        record_error(f"reference gradient check, float64, {'train' if training else 'eval'}",
                     err)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= MAX_RELATIVE_ERROR, f"{worst}: {errors[worst]:.3e}"


def test_backward_accumulates_every_parameter(rng):
    net = issue_network(p=(0.3, 0.3))
    X, G = rng.standard_normal((6, 12)), rng.standard_normal((6, 10))
    net.forward(X)
    net.backward(G)
    once = {name: grad.copy() for name, _, grad in net.parameters()}
    net.backward(G, accumulate=True)
    for name, _, grad in net.parameters():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-15, err_msg=name)
    net.backward(G)  # overwrites
    for name, _, grad in net.parameters():
        np.testing.assert_array_equal(grad, once[name], err_msg=name)


def test_step_updates_every_parameter(rng):
    net = issue_network("float32")
    X = rng.standard_normal((6, 12)).astype(np.float32)
    net.forward(X)
    net.backward(rng.standard_normal((6, 10)).astype(np.float32))
    before = {name: (value.copy(), grad.copy()) for name, value, grad in net.parameters()}
    net.step(0.1)
    lr = np.float32(0.1)
    for name, value, _ in net.parameters():
        old, grad = before[name]
        np.testing.assert_array_equal(value, old - lr * grad, err_msg=name)
    buffers = {name: a.copy() for name, a in net.buffers()}
    net.step(0.1)
    for name, a in net.buffers():  # a buffer is not trained
        np.testing.assert_array_equal(a, buffers[name])


# ---- modes -------------------------------------------------------------------------------------

def test_modes_follow_torch_conventions():
    net = issue_network()
    assert net.training is True                      # a new network trains
    assert net.eval() is net and net.training is False
    assert net.train() is net and net.training is True
    assert net.train(False).training is False
    with pytest.raises(TypeError, match=r"\[reference.Network.train\] mode must be a bool"):
        net.train(1)
    assert net.training is False


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_predict_runs_in_eval_mode_and_changes_nothing(training, rng, assert_close):
    net = issue_network(p=(0.5, 0.5)).train(training)
    X = rng.standard_normal((7, 12))
    net.train().forward(rng.standard_normal((9, 12)))  # running statistics move off 0 and 1
    net.train(training)
    net.forward(X)
    step = net.dropout_step
    buffers = {name: a.copy() for name, a in net.buffers()}
    caches = [(L.input, L.output) for L in _all_layers(net.layers) if hasattr(L, "output")]
    masks = [L.mask for L in _all_layers(net.layers) if isinstance(L, R.Dropout)]

    got = net.predict(X)
    got_in_chunks = net.predict(X.tolist(), batch_size=3)

    assert net.training is training and net.dropout_step == step
    for name, a in net.buffers():
        np.testing.assert_array_equal(a, buffers[name])
    assert all(L.input is c[0] and L.output is c[1]
               for L, c in zip([L for L in _all_layers(net.layers) if hasattr(L, "output")],
                               caches))
    assert all(L.mask is m for L, m in
               zip([L for L in _all_layers(net.layers) if isinstance(L, R.Dropout)], masks))
    net.eval()
    np.testing.assert_array_equal(got, net.forward(X))   # the eval-mode forward, bit for bit
    assert_close(got_in_chunks, got)  # chunks: other GEMM blockings, other roundings


def test_forward_uses_the_current_mode(rng):
    net = issue_network(p=(0.5, 0.5))
    X = rng.standard_normal((8, 12))
    train_out = net.forward(X)
    eval_out = net.eval().forward(X)
    assert not np.allclose(train_out, eval_out)
    np.testing.assert_array_equal(eval_out, net.predict(X))
    net.train()
    net.dropout_step = 0
    before = {name: a.copy() for name, a in net.buffers()}
    np.testing.assert_array_equal(net.forward(X), train_out)  # batch statistics and masks
    assert any(not np.array_equal(a, before[name]) for name, a in net.buffers())


# ---- the network's surface ---------------------------------------------------------------------

def test_the_issue_network_surface():
    net = issue_network("float32", width=256)
    assert [name for name, _, _ in net.parameters()] == [
        "layers.0.weight", "layers.1.weight", "layers.1.bias",
        "layers.4.layers.0.weight", "layers.4.layers.0.bias",
        "layers.4.layers.2.weight", "layers.4.layers.2.bias",
        "layers.5.weight", "layers.5.bias", "layers.6.weight", "layers.6.bias"]
    assert [name for name, _ in net.buffers()] == ["layers.1.running_mean",
                                                   "layers.1.running_var"]
    assert net.num_parameters == sum(v.size for _, v, _ in net.parameters()) == (
        12 * 256 + 2 * 256 + 2 * (256 * 256 + 256) + 2 * 256 + 256 * 10 + 10)
    assert (net.in_features, net.out_features, len(net)) == (12, 10, 7)
    assert [type(L).__name__ for L in net] == ["Dense", "BatchNorm", "Activation", "Dropout",
                                               "Residual", "LayerNorm", "Dense"]
    assert net[4][1].in_features == net[2].out_features == 256  # widths of the neighbours
    assert repr(net).splitlines() == [
        f"reference.Network(dtype=float32, parameters={net.num_parameters:,})",
        "  (0): reference.Dense(12, 256, activation='identity', bias=False)",
        "  (1): reference.BatchNorm(256, momentum=0.1, eps=1e-05, affine=True)",
        "  (2): reference.Activation('relu')",
        "  (3): reference.Dropout(p=0.2)",
        "  (4): reference.Residual(",
        "    (0): reference.Dense(256, 256, activation='relu')",
        "    (1): reference.Dropout(p=0.1)",
        "    (2): reference.Dense(256, 256, activation='identity')",
        "  )",
        "  (5): reference.LayerNorm(256, eps=1e-05, elementwise_affine=True)",
        "  (6): reference.Dense(256, 10, activation='identity')"]
    for _, value, grad in net.parameters():
        assert value.dtype == grad.dtype == np.float32
    bn, ln = net[1], net[5]
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    np.testing.assert_array_equal(ln.weight, 1)
    np.testing.assert_array_equal(ln.bias, 0)


def test_parameters_and_buffers_are_the_live_arrays(rng):
    net = issue_network()
    params = {name: (v, g) for name, v, g in net.parameters()}
    assert params["layers.1.weight"][0] is net[1].weight
    assert params["layers.4.layers.2.bias"][1] is net[4][2].grad_bias
    buffers = dict(net.buffers())
    assert buffers["layers.1.running_var"] is net[1].running_var
    net[1].running_var = np.full(16, 2.0)               # assigning copies in
    assert buffers["layers.1.running_var"][0] == 2.0
    net[5].weight = np.arange(16)
    np.testing.assert_array_equal(params["layers.5.weight"][0], np.arange(16))
    with pytest.raises(ValueError, match=r"\[reference.BatchNorm.running_mean\] must be real "
                                         r"numbers of shape \(16,\)"):
        net[1].running_mean = np.zeros(3)
    with pytest.raises(RuntimeError, match="not part of a Network yet"):
        R.LayerNorm(3).weight = np.ones(3)


def test_dense_weights_are_drawn_as_before_in_depth_first_order():
    """Norm layers draw nothing and nesting keeps the order, so the Dense layers get
    the weights a Dense-only network of the same Dense layers gets."""
    nested = R.Network([R.Dense(3, 5, "relu"), R.BatchNorm(5), R.Dropout(0.1),
                        R.Residual([R.Dense(5, 5, "tanh", bias=False), R.LayerNorm(5),
                                    R.Residual([R.Dense(5, 5, "leaky_relu",
                                                        negative_slope=0.3)])]),
                        R.Dense(5, 2)], dtype="float32", seed=17)
    plain = R.Network([R.Dense(3, 5, "relu"), R.Dense(5, 5, "tanh"),
                       R.Dense(5, 5, "leaky_relu", negative_slope=0.3), R.Dense(5, 2)],
                      dtype="float32", seed=17)
    dense = [L for L in _all_layers(nested.layers) if isinstance(L, R.Dense)]
    specs = [L._spec() for L in dense]
    for L, M, (W, _) in zip(dense, plain, initial_parameters(specs, np.dtype("float32"), 17)):
        assert L.weight.tobytes() == M.weight.tobytes() == W.astype(np.float32).tobytes()
    assert dense[1].bias is None and dense[1].grad_bias is None
    bp = bprop.Network([bprop.Dense(3, 5, "relu"), bprop.Dense(5, 5, "tanh"),
                        bprop.Dense(5, 5, "leaky_relu", negative_slope=0.3),
                        bprop.Dense(5, 2)], seed=17)
    for L, M in zip(dense, bp):
        assert L.weight.tobytes() == M.weight.tobytes()


def test_a_network_may_start_with_width_agnostic_layers(rng, assert_close):
    net = R.Network([R.Dropout(0.5), R.Activation("tanh"),
                     R.Residual([R.Activation("sigmoid")]), R.Dense(4, 2)], dtype="float64")
    assert net.in_features == 4 and net[1].in_features == net[2].out_features == 4
    X = rng.standard_normal((3, 4))
    t = np.tanh(X)
    assert_close(net.predict(X), (t + 1 / (1 + np.exp(-t))) @ net[3].weight)


def test_residual_adds_its_input(rng, assert_close):
    net = R.Network([R.Residual([R.Dense(3, 3, "tanh")])], dtype="float64")
    X = rng.standard_normal((4, 3))
    f = np.tanh(X @ net[0][0].weight)
    np.testing.assert_array_equal(net.forward(X), X + f)
    G = rng.standard_normal((4, 3))
    dX = net.backward(G, input_grad=True)
    assert_close(dX, G + ((1 - f * f) * G) @ net[0][0].weight.T)
    assert net.backward(G) is None  # dL/dX only when asked for


# ---- hostile arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("p, error, message", [
    (-0.1, ValueError, r"p must be in \[0, 1\), but got -0.1"),
    (1.0, ValueError, r"p must be in \[0, 1\), but got 1.0"),
    (1.5, ValueError, r"p must be in \[0, 1\), but got 1.5"),
    (float("nan"), ValueError, r"p must be finite, but got nan"),
    (float("inf"), ValueError, r"p must be finite, but got inf"),
    ("0.5", TypeError, r"p must be a real number, but got str '0.5'"),
    (None, TypeError, r"p must be a real number, but got NoneType None"),
    (True, TypeError, r"p must be a real number, but got bool True"),
    (0.5j, TypeError, r"p must be a real number, but got complex"),
])
def test_dropout_refuses_bad_p(p, error, message):
    with pytest.raises(error, match=r"^\[reference.Dropout\] " + message):
        R.Dropout(p)


def test_dropout_takes_p_as_numpy_and_int():
    assert R.Dropout(np.float32(0.25)).p == 0.25
    assert R.Dropout(0).p == 0.0


@pytest.mark.parametrize("make, error, message", [
    (lambda: R.BatchNorm(0), ValueError, r"\[reference.BatchNorm\] features must be >= 1"),
    (lambda: R.BatchNorm(4.0), TypeError, r"\[reference.BatchNorm\] features must be an int"),
    (lambda: R.BatchNorm(4, momentum=-0.1), ValueError, r"momentum must be >= 0.0"),
    (lambda: R.BatchNorm(4, momentum=1.5), ValueError, r"momentum must be <= 1.0"),
    (lambda: R.BatchNorm(4, eps=0.0), ValueError, r"eps must be > 0.0, but got 0.0"),
    (lambda: R.BatchNorm(4, eps=-1e-5), ValueError, r"eps must be > 0.0"),
    (lambda: R.BatchNorm(4, affine=1), TypeError, r"affine must be a bool, but got int 1"),
    (lambda: R.LayerNorm(0), ValueError, r"\[reference.LayerNorm\] features must be >= 1"),
    (lambda: R.LayerNorm(3, eps=float("nan")), ValueError, r"eps must be finite"),
    (lambda: R.LayerNorm(3, elementwise_affine="yes"), TypeError,
     r"elementwise_affine must be a bool"),
    (lambda: R.Activation("swish"), ValueError,
     r"\[reference.Activation\] activation must be one of"),
    (lambda: R.Activation(3), TypeError, r"activation must be a str"),
    (lambda: R.Activation("leaky_relu", negative_slope="0.1"), TypeError,
     r"negative_slope must be a real number"),
    (lambda: R.Dense(3, 2, bias=None), TypeError, r"\[reference.Dense\] bias must be a bool"),
    (lambda: R.Residual([]), ValueError,
     r"\[reference.Residual\] layers must hold at least one layer"),
    (lambda: R.Residual(R.Dense(2, 2)), TypeError, r"layers must be a list of reference layers"),
    (lambda: R.Residual([R.Dense(2, 2), "relu"]), TypeError,
     r"layers\[1\] must be a reference layer \(Dense, Activation"),
    (lambda: R.Network([bprop.Dense(2, 2)]), TypeError,
     r"\[reference.Network\] layers\[0\] must be a reference layer"),
])
def test_layers_refuse_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("layers, message", [
    (lambda: [R.Dense(3, 4), R.BatchNorm(5)], r"layer 1 expects 5 input features, but layer "
                                              r"0 produces 4"),
    (lambda: [R.Dense(3, 4), R.Dropout(0.1), R.Activation("relu"), R.LayerNorm(6)],
     r"layer 3 expects 6 input features, but layer 0 produces 4"),
    (lambda: [R.Dense(3, 4), R.Residual([R.Dense(4, 5)]), R.Dense(5, 1)],
     r"layer 1 \(Residual\) computes x \+ f\(x\), so f must keep the width, but f maps 4 "
     r"features to 5"),
    (lambda: [R.Residual([R.Dropout(0.1), R.Dense(2, 3), R.Activation("relu")])],
     r"layer 0 \(Residual\) .* but f maps 2 features to 3"),
    (lambda: [R.Dense(3, 4), R.Residual([R.Activation("tanh"), R.Dense(3, 4)])],
     r"layer 1.1 expects 3 input features, but layer 0 produces 4"),
    (lambda: [R.Dense(3, 4), R.Residual([R.Dense(4, 4), R.Residual([R.Dense(4, 2),
                                                                     R.Dense(2, 3)])])],
     r"layer 1.1 \(Residual\) .* but f maps 4 features to 3"),
    (lambda: [R.Residual([R.Dense(4, 4)]), R.Dense(3, 1)],
     r"layer 1 expects 3 input features, but layer 0 produces 4"),
    (lambda: [R.Dropout(0.5), R.Activation("relu")], r"no layer has a width of its own"),
    (lambda: [R.Residual([R.Activation("relu"), R.Residual([R.Dropout(0.2)])])],
     r"no layer has a width of its own"),
])
def test_network_refuses_widths_that_do_not_chain(layers, message):
    made = layers()
    with pytest.raises(ValueError, match=r"^\[reference.Network\] " + message):
        R.Network(made)
    # a refused network takes nothing: the layers can still be used
    assert not any(L._in_network for L in _all_layers(made))


def test_a_layer_belongs_to_one_network():
    inner = R.Dense(4, 4)
    block = R.Residual([inner, R.Dropout(0.1)])
    first = R.Network([R.Dense(3, 4), block])
    with pytest.raises(ValueError, match=r"\[reference.Network\] layer 0 already belongs to "
                                         r"a Network"):
        R.Network([block])
    with pytest.raises(ValueError, match=r"layer 1.0 already belongs to a Network"):
        R.Network([R.Dense(3, 4), R.Residual([inner])])
    norm = R.LayerNorm(4)
    with pytest.raises(ValueError, match=r"the same LayerNorm object appears twice, as layer 1 "
                                         r"and layer 2.0"):
        R.Network([R.Dense(3, 4), norm, R.Residual([norm])])
    R.Network([R.Dense(3, 4), norm])  # the refusal did not take it
    assert first[1] is block and inner.weight is not None


def test_batchnorm_training_refuses_a_batch_of_one_and_changes_nothing(rng):
    net = R.Network([R.Dense(3, 4), R.Dropout(0.3), R.Residual([R.BatchNorm(4)]),
                     R.Dense(4, 2)], dtype="float64", seed=0)
    net.forward(rng.standard_normal((5, 3)))
    state = {name: a.copy() for name, a in net.buffers()}
    caches = (net[0].input, net[2][0].xhat, net[1].mask)
    step = net.dropout_step
    with pytest.raises(ValueError, match=r"^\[reference.BatchNorm\] training needs more than "
                                         r"one row per batch .* but got a batch of 1 "
                                         r"\(layer 2.0\)"):
        net.forward(rng.standard_normal((1, 3)))
    for name, a in net.buffers():
        np.testing.assert_array_equal(a, state[name])
    assert (net[0].input, net[2][0].xhat, net[1].mask) == caches and net.dropout_step == step
    with pytest.raises(ValueError, match=r"training needs more than one row"):
        net[2][0].forward(np.ones((1, 4)), True)       # the layer itself refuses too
    for name, a in net.buffers():
        np.testing.assert_array_equal(a, state[name])
    # eval mode and predict normalise one row with the running statistics
    one = rng.standard_normal((1, 3))
    np.testing.assert_array_equal(net.eval().forward(one), net.predict(one))


def test_network_refuses_bad_dropout_steps():
    net = _dropout_net(0.5)
    with pytest.raises(ValueError, match=r"dropout_step must be >= 0, but got -1"):
        net.dropout_step = -1
    with pytest.raises(TypeError, match=r"dropout_step must be an int"):
        net.dropout_step = 1.5
    with pytest.raises(ValueError, match=r"dropout_step must be <= 18446744073709551615"):
        net.dropout_step = 2**64
    assert net.dropout_step == 0


def test_dropout_outside_a_network_says_so():
    with pytest.raises(RuntimeError, match=r"\[reference.Dropout.forward\] this layer is not "
                                           r"part of a Network yet"):
        R.Dropout(0.5).forward(np.ones((2, 2)), True)

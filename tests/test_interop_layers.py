"""bprop.interop for every layer kind: Dense (with and without bias), Activation,
Dropout, BatchNorm, LayerNorm and Residual, to and from PyTorch and to ONNX.

Tolerances: eval-mode outputs and gradients in float64 are held to 1e-12 (relative
and absolute; torch and the core sum in different orders, and torch folds BatchNorm's
statistics into one scale and shift); float32 outputs to 1e-5 absolute. Parameters
and buffers are copied exactly, so round trips are compared bitwise.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import bprop
from bprop import interop

TOL64 = dict(rtol=1e-12, atol=1e-12)
TOL32 = dict(rtol=0, atol=1e-5)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture
def ort():
    return pytest.importorskip("onnxruntime")


def every_layer(p1=0.2, p2=0.1, in_features=6, width=16, out_features=4):
    """The issue's example: every layer kind, with a bias-free Dense before BatchNorm."""
    return [bprop.Dense(in_features, width, bias=False),
            bprop.BatchNorm(width, momentum=0.2, eps=1e-4),
            bprop.Activation("relu"),
            bprop.Dropout(p1),
            bprop.Residual([bprop.Dense(width, width, activation="relu"), bprop.Dropout(p2),
                            bprop.Dense(width, width)]),
            bprop.LayerNorm(width, eps=1e-6),
            bprop.Dense(width, out_features)]


def trained(layers, dtype, steps=5, seed=0):
    """A network of `layers` after a few SGD steps in training mode, so that the
    running statistics and the norm layers' parameters are far from their initial
    values; returned in eval mode."""
    net = bprop.Network(layers, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    opt = bprop.optim.SGD(net, lr=0.05, momentum=0.5)
    for _ in range(steps):
        X = (1.5 + 2.0 * rng.standard_normal((32, net.in_features))).astype(dtype)
        y = rng.standard_normal((32, net.out_features)).astype(dtype)
        net.train_step(X, y, "mean_squared_error", opt)
    return net.eval()


def inputs(net, rows, seed=7):
    return (1.0 + 2.0 * np.random.default_rng(seed).standard_normal(
        (rows, net.in_features))).astype(net.dtype)


def torch_eval(torch, module, X):
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(X)).numpy()


def descriptions(net):
    return [layer._description() for layer in net.layers]


def assert_same_state(a, b):
    """Same parameters and buffers, by name, bitwise, in separate memory."""
    pa, pb = list(a.parameters()), list(b.parameters())
    assert [n for n, _, _ in pa] == [n for n, _, _ in pb]
    for (name, x, _), (_, y, _) in zip(pa, pb):
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
        assert not np.shares_memory(x, y)
    ba, bb = list(a.buffers()), list(b.buffers())
    assert [n for n, _ in ba] == [n for n, _ in bb]
    for (name, x), (_, y) in zip(ba, bb):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_trained_network_has_nontrivial_statistics():
    net = trained(every_layer(), "float64")
    bn = net[1]
    assert np.abs(bn.running_mean).min() > 1e-3
    assert np.abs(bn.running_var - 1).max() > 0.1
    assert np.abs(net[5].weight - 1).max() > 1e-4 and np.abs(net[5].bias).max() > 1e-4


# ==== to_torch =======================================================================


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_to_torch_every_layer_matches_predict(torch, dtype):
    net = trained(every_layer(), dtype)
    module = interop.to_torch(net)
    X = inputs(net, 50)
    got = torch_eval(torch, module, X)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, net.predict(X), **(TOL64 if dtype == "float64" else TOL32))


def test_to_torch_every_layer_layout(torch):
    nn = torch.nn
    net = trained(every_layer(), "float64")
    module = interop.to_torch(net)
    assert [type(m) for m in module] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
                                         interop.TorchResidual, nn.LayerNorm, nn.Linear]
    assert module[0].bias is None
    bn = module[1]
    assert (bn.num_features, bn.momentum, bn.eps, bn.affine, bn.track_running_stats) == \
        (16, 0.2, 1e-4, True, True)
    for name in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(bn, name).detach().numpy(), getattr(net[1], name))
    assert module[3].p == 0.2
    body = module[4].body
    assert isinstance(body, nn.Sequential)
    assert [type(m) for m in body] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert body[2].p == 0.1
    np.testing.assert_array_equal(body[3].weight.detach().numpy(), net[4][2].weight.T)
    ln = module[5]
    assert (ln.normalized_shape, ln.eps, ln.elementwise_affine) == ((16,), 1e-6, True)
    np.testing.assert_array_equal(ln.weight.detach().numpy(), net[5].weight)
    # the parameters in torch's order are bprop's, weights transposed
    names = [n for n, _, _ in net.parameters()]
    assert len(names) == len(list(module.parameters()))
    for (name, value, _), p in zip(net.parameters(), module.parameters()):
        assert p.dtype == torch.float64 and p.requires_grad, name
        np.testing.assert_array_equal(p.detach().numpy(), value.T if value.ndim == 2 else value)


def test_to_torch_carries_the_mode(torch):
    net = trained(every_layer(), "float64")
    assert not net.training
    assert not any(m.training for m in interop.to_torch(net).modules())
    net.train()
    assert all(m.training for m in interop.to_torch(net).modules())
    assert net.training  # to_torch does not change the network's mode


def test_to_torch_without_affine(torch):
    layers = [bprop.Dense(5, 8), bprop.BatchNorm(8, affine=False),
              bprop.LayerNorm(8, elementwise_affine=False), bprop.Activation("tanh"),
              bprop.Dense(8, 3)]
    net = trained(layers, "float64")
    module = interop.to_torch(net)
    assert module[1].weight is None and not module[1].affine
    assert module[2].weight is None and not module[2].elementwise_affine
    X = inputs(net, 20)
    np.testing.assert_allclose(torch_eval(torch, module, X), net.predict(X), **TOL64)
    back = interop.from_torch(module)
    assert descriptions(back) == descriptions(net)
    assert_same_state(net, back)


def test_torch_residual_is_a_picklable_module(torch):
    net = trained(every_layer(), "float64")
    module = interop.to_torch(net)
    again = pickle.loads(pickle.dumps(module))
    assert type(again[4]) is interop.TorchResidual
    X = inputs(net, 10)
    np.testing.assert_array_equal(torch_eval(torch, again, X), torch_eval(torch, module, X))
    with pytest.raises(TypeError, match=r"\[TorchResidual\] body must be a torch.nn.Module, "
                                        r"but got list"):
        interop.TorchResidual([torch.nn.Linear(2, 2)])
    with pytest.raises(AttributeError, match="has no attribute 'Nonexistent'"):
        interop.Nonexistent  # noqa: B018


# ==== round trips ====================================================================


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_net_torch_net_is_bitwise(torch, dtype, mode):
    net = trained(every_layer(), dtype).train(mode == "train")
    back = interop.from_torch(interop.to_torch(net))
    assert back.dtype == net.dtype and back.training == net.training
    assert descriptions(back) == descriptions(net)
    assert_same_state(net, back)
    X = inputs(net, 20)
    tol = TOL64 if dtype == "float64" else dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back.predict(X), net.predict(X), **tol)


def test_round_trip_fuses_an_identity_dense_with_the_activation_after_it(torch):
    # torch has one Linear + ReLU for both Dense(relu) and Dense + Activation("relu"),
    # so the second comes back as the first: the same function and parameters.
    net = bprop.Network([bprop.Dense(4, 5), bprop.Activation("leaky_relu", negative_slope=0.3),
                         bprop.Activation("tanh"), bprop.Dense(5, 2)], dtype="float64", seed=0)
    back = interop.from_torch(interop.to_torch(net))
    assert [repr(layer) for layer in back.layers] == [
        "Dense(4, 5, activation='leaky_relu', negative_slope=0.3)", "Activation('tanh')",
        "Dense(5, 2, activation='identity')"]
    # the same parameters, in the same order (under other names: the layers moved)
    for (_, a, _), (_, b, _) in zip(net.parameters(), back.parameters(), strict=True):
        np.testing.assert_array_equal(a, b)
    X = inputs(net, 10)
    np.testing.assert_allclose(back.predict(X), net.predict(X), **TOL64)


# ==== from_torch =====================================================================


def hand_built(torch, dtype, p=0.3):
    """A torch model with nested Sequentials, every module kind from_torch reads, and
    running statistics from a few training-mode batches; returned in eval mode."""
    nn = torch.nn
    torch.manual_seed(3)
    Res = interop.TorchResidual
    model = nn.Sequential(
        nn.Sequential(nn.Linear(7, 12), nn.GELU()),
        nn.BatchNorm1d(12, momentum=0.3),
        nn.LeakyReLU(0.07),
        nn.Dropout(p, inplace=True),
        Res(nn.Sequential(nn.Linear(12, 12, bias=False), nn.LayerNorm(12, eps=1e-3),
                          nn.Tanh(), nn.Sequential(nn.Linear(12, 12), nn.Sigmoid()))),
        nn.Identity(),
        nn.LayerNorm(12),
        nn.ReLU(),
        nn.Linear(12, 9),
        nn.Dropout(p),
        Res(nn.Sequential(nn.BatchNorm1d(9, affine=False), nn.Linear(9, 9), nn.ReLU())),
        nn.Linear(9, 5),
        nn.Softmax(dim=1),
    ).to(dtype)
    with torch.no_grad():
        for m in model.modules():  # norm layers away from 1 and 0
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(2.0 + 3.0 * torch.randn(40, 7, dtype=dtype))
    return model.eval()


def test_from_torch_reads_every_module_kind(torch):
    net = interop.from_torch(hand_built(torch, torch.float64))
    assert [repr(layer) for layer in net.layers] == [
        "Dense(7, 12, activation='gelu')",
        "BatchNorm(12, momentum=0.3, eps=1e-05, affine=True)",
        "Activation('leaky_relu', negative_slope=0.07)",
        "Dropout(p=0.3)",
        ("Residual(\n  (0): Dense(12, 12, activation='identity', bias=False)\n"
         "  (1): LayerNorm(12, eps=0.001, elementwise_affine=True)\n"
         "  (2): Activation('tanh')\n  (3): Dense(12, 12, activation='sigmoid')\n)"),
        "LayerNorm(12, eps=1e-05, elementwise_affine=True)",
        "Activation('relu')",
        "Dense(12, 9, activation='identity')",
        "Dropout(p=0.3)",
        ("Residual(\n  (0): BatchNorm(9, momentum=0.1, eps=1e-05, affine=False)\n"
         "  (1): Dense(9, 9, activation='relu')\n)"),
        "Dense(9, 5, activation='softmax')",
    ]
    assert not net.training


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_from_torch_matches_torch_eval(torch, dtype):
    model = hand_built(torch, getattr(torch, dtype))
    net = interop.from_torch(model)
    assert net.dtype == np.dtype(dtype)
    X = inputs(net, 60)
    np.testing.assert_allclose(net.predict(X), torch_eval(torch, model, X),
                               **(TOL64 if dtype == "float64" else TOL32))
    # and back: the same modules, parameters and buffers
    again = interop.to_torch(net)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name


def test_from_torch_takes_the_mode_of_the_model(torch):
    model = hand_built(torch, torch.float64)
    assert not interop.from_torch(model).training
    assert interop.from_torch(model.train()).training
    assert interop.from_torch(list(model.train())).training
    # without Dropout or BatchNorm1d, the Sequential's flag
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert not interop.from_torch(plain.eval()).training
    assert interop.from_torch(plain.train()).training


# ==== one training step against autograd =============================================


def torch_train_step(torch, module, X, G):
    """Output, input gradient and parameter gradients of one forward/backward."""
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    module.train()
    module.zero_grad()
    out = module(Xt)
    out.backward(torch.from_numpy(G))
    return (out.detach().numpy(), Xt.grad.numpy(),
            [p.grad.numpy() for p in module.parameters()])


def bprop_train_step(net, X, G):
    net.train()
    out = net.forward(X)
    dX = net.backward(G, input_grad=True)
    return out, dX, [(name, grad) for name, _, grad in net.parameters()]


def assert_same_step(torch, net, module, rows=24, seed=5):
    """net and module take one training-mode step on the same batch and loss gradient:
    the same output, dL/dX, parameter gradients and updated running statistics."""
    rng = np.random.default_rng(seed)
    X = 1.0 + 2.0 * rng.standard_normal((rows, net.in_features))
    G = rng.standard_normal((rows, net.out_features))
    out_t, dX_t, grads_t = torch_train_step(torch, module, X, G)
    out_b, dX_b, grads_b = bprop_train_step(net, X, G)
    np.testing.assert_allclose(out_b, out_t, **TOL64)
    np.testing.assert_allclose(dX_b, dX_t, **TOL64)
    assert len(grads_b) == len(grads_t)
    for (name, gb), gt in zip(grads_b, grads_t):
        np.testing.assert_allclose(gb, gt.T if gb.ndim == 2 else gt, **TOL64, err_msg=name)
    buffers_t = [b.numpy() for n, b in module.named_buffers()
                 if not n.endswith("num_batches_tracked")]
    buffers_b = list(net.buffers())
    assert len(buffers_b) == len(buffers_t) > 0
    for (name, bb), bt in zip(buffers_b, buffers_t):
        np.testing.assert_allclose(bb, bt, **TOL64, err_msg=name)


def test_train_step_of_to_torch_matches_autograd(torch):
    # Dropout at p=0, so both sides compute the same function in training mode.
    net = trained(every_layer(p1=0.0, p2=0.0), "float64")
    module = interop.to_torch(net)
    assert_same_step(torch, net, module)
    # and a second step after the same SGD update on both sides
    lr = 0.1
    net.step(lr)
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
    assert_same_step(torch, net, module, seed=6)


def test_train_step_of_from_torch_matches_autograd(torch):
    model = hand_built(torch, torch.float64, p=0.0)
    net = interop.from_torch(model)
    assert_same_step(torch, net, model)


# ==== ONNX ===========================================================================


def run_ort(ort, path, X):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X})[0]


@pytest.mark.parametrize("opset", [13, 16, 17, 20])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_onnx_every_layer_matches_predict(onnx, ort, tmp_path, dtype, opset):
    net = trained(every_layer(), dtype)
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path, opset=opset)
    for rows in (1, 9, 200):
        X = inputs(net, rows, seed=rows)
        got = run_ort(ort, path, X)
        assert got.dtype == np.dtype(dtype) and got.shape == (rows, net.out_features)
        np.testing.assert_allclose(got, net.predict(X),
                                   **(TOL64 if dtype == "float64" else TOL32))


def test_onnx_exports_the_eval_network_whatever_its_mode(onnx, ort, tmp_path):
    net = trained(every_layer(), "float64").train()
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path)
    assert net.training
    X = inputs(net, 30)
    np.testing.assert_allclose(run_ort(ort, path, X), net.predict(X), **TOL64)


@pytest.mark.parametrize("opset", [16, 17, 18])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_onnx_every_layer_graph(onnx, tmp_path, dtype, opset):
    net = trained(every_layer(), dtype)
    path = tmp_path / "net.onnx"
    interop.to_onnx(net, path, opset=opset)
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    # float64 spells LayerNorm out at every opset: the epsilon attribute is 32-bit
    spelled_out = opset < 17 or dtype == "float64"
    layer_norm = (["LayerNormalization"] if not spelled_out else
                  ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul",
                   "Mul", "Add"])
    assert ops == (["Gemm", "BatchNormalization", "Relu"]     # Dropout: nothing
                   + ["Gemm", "Relu", "Gemm", "Add"]         # Residual: body, then x + f(x)
                   + layer_norm + ["Gemm"])
    assert "Dropout" not in ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # named as the network names its parameters and buffers, copied exactly
    for name, value, _ in net.parameters():
        np.testing.assert_array_equal(inits[name], value)
    (bn,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    eps = onnx.helper.get_attribute_value(bn.attribute[0])
    np.testing.assert_array_equal(inits["layers.1.running_mean"], net[1].running_mean)
    if dtype == "float32":
        np.testing.assert_array_equal(inits["layers.1.running_var"], net[1].running_var)
        assert eps == np.float32(1e-4)
    else:  # eps added in float64, not rounded to the 32-bit attribute
        np.testing.assert_array_equal(inits["layers.1.running_var_eps"],
                                      net[1].running_var + 1e-4)
        assert eps == 0.0
    assert list(bn.input)[3:] == ["layers.1.running_mean", "layers.1.running_var" +
                                  ("_eps" if dtype == "float64" else "")]
    assert "layers.0.bias" not in inits  # Dense(bias=False): Gemm without C
    gemm = model.graph.node[0]
    assert list(gemm.input) == ["X", "layers.0.weight"]
    add = model.graph.node[ops.index("Add")]
    # Dropout (layer 3) adds no node, so the Residual's x is the Activation's output
    assert list(add.input) == ["layers.2.output", "layers.4.layers.2.output"]
    assert model.graph.node[-1].output[0] == "output"


def test_onnx_without_affine_and_at_the_ends(onnx, ort, tmp_path):
    # Activation and Dropout first, a Residual last: the graph output comes from Add
    layers = [bprop.Dropout(0.5), bprop.Activation("sigmoid"), bprop.Dense(5, 8),
              bprop.BatchNorm(8, affine=False), bprop.Activation("identity"),
              bprop.LayerNorm(8, elementwise_affine=False),
              bprop.Residual([bprop.Dense(8, 8, activation="tanh"), bprop.Dropout(0.3)])]
    for dtype in ("float32", "float64"):
        net = trained(layers if dtype == "float32" else
                      [bprop.layers.layer_from_description(L._description()) for L in layers],
                      dtype)
        for opset in (13, 17):
            path = tmp_path / f"{dtype}-{opset}.onnx"
            interop.to_onnx(net, path, opset=opset)
            model = onnx.load(path)
            assert model.graph.node[-1].op_type == "Add"
            X = inputs(net, 25)
            np.testing.assert_allclose(run_ort(ort, path, X), net.predict(X),
                                       **(TOL64 if dtype == "float64" else TOL32))


def test_onnx_float64_keeps_eps_in_float64(onnx, ort, tmp_path):
    # Guards against the 32-bit epsilon attribute of BatchNormalization and
    # LayerNormalization: eps = 1e-4 rounded to float32 moves by 2.5e-12, which over a
    # variance of 1e-3 moved float64 outputs by ~1e-9 relative.
    net = bprop.Network([bprop.BatchNorm(6, eps=1e-4), bprop.LayerNorm(6, eps=1e-5),
                         bprop.Dense(6, 3)], dtype="float64", seed=0).eval()
    net[0].running_var = np.full(6, 1e-3)
    net[0].running_mean = np.linspace(-1, 1, 6)
    X = 1e-2 * np.random.default_rng(0).standard_normal((40, 6))  # rows of small variance
    for opset in (13, 17, 20):
        path = tmp_path / f"net{opset}.onnx"
        interop.to_onnx(net, path, opset=opset)
        expected = net.predict(X)
        np.testing.assert_allclose(run_ort(ort, path, X), expected, rtol=1e-12,
                                   atol=1e-12 * np.abs(expected).max())


def test_onnx_size_limit_counts_buffers(onnx, tmp_path, monkeypatch):
    net = bprop.Network([bprop.BatchNorm(4, affine=False)], dtype="float64")  # 0 parameters
    monkeypatch.setattr(interop, "_MAX_ONNX_PARAMETER_BYTES", 63)
    with pytest.raises(ValueError, match="parameters take 64 bytes, more than the 63"):
        interop.to_onnx(net, tmp_path / "net.onnx")


# ==== what from_torch refuses =========================================================


def test_from_torch_refuses_what_bprop_cannot_hold(torch):
    nn = torch.nn
    Res = interop.TorchResidual

    class Custom(nn.Module):
        def forward(self, x):
            return x

    bad_eps = nn.BatchNorm1d(4)
    bad_eps.eps = 0.0
    cases = [
        ([nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)], ValueError,
         r"module 1 \(BatchNorm1d\) has track_running_stats=False"),
        ([nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)], ValueError,
         r"module 1 \(BatchNorm1d\) has momentum=None \(a cumulative average\)"),
        ([nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=1.5)], ValueError,
         r"module 1 \(BatchNorm1d\) momentum must be <= 1.0, but got 1.5"),
        ([nn.Linear(3, 4), bad_eps], ValueError,
         r"module 1 \(BatchNorm1d\) eps must be > 0.0, but got 0.0"),
        ([nn.Linear(3, 4), nn.BatchNorm2d(4)], ValueError,
         r"module 1 \(BatchNorm2d\) is not supported; expected Linear, BatchNorm1d"),
        ([nn.Linear(3, 4), nn.LayerNorm((2, 4))], ValueError,
         r"module 1 \(LayerNorm\) normalizes over the last 2 dimensions \(2, 4\)"),
        ([nn.Linear(3, 4), nn.LayerNorm(4, bias=False)], ValueError,
         r"module 1 \(LayerNorm\) has a weight but no bias"),
        ([nn.Linear(3, 4), nn.Dropout(1.0)], ValueError,
         r"module 1 \(Dropout\) has p=1.0, which drops everything"),
        ([nn.Linear(3, 4), nn.AlphaDropout(0.1)], ValueError,
         r"module 1 \(AlphaDropout\) is not supported"),
        ([nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Sequential(Custom()))], ValueError,
         r"module 1.1.0 \(Custom\) is not supported"),
        ([nn.Linear(3, 4), Res(nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1)))],
         ValueError, r"module 1.body.1 \(Conv1d\) is not supported"),
        ([nn.Linear(3, 4), Res(nn.Sequential(nn.Linear(4, 5)))], ValueError,
         r"module 1 \(TorchResidual\) has a body that maps 4 features to 5"),
        ([nn.Linear(3, 4), Res(nn.Sequential(nn.Identity()))], ValueError,
         r"module 1 \(TorchResidual\) has a body without layers"),
        ([nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(5)], ValueError,
         (r"module 2 \(LayerNorm\) expects 5 input features, but module 0 \(Linear\) "
          r"produces 4")),
        ([nn.Linear(3, 4), nn.BatchNorm1d(6)], ValueError,
         (r"module 1 \(BatchNorm1d\) expects 6 input features, but module 0 \(Linear\) "
          r"produces 4")),
        ([nn.Linear(3, 4), Res(nn.Sequential(nn.Linear(4, 4))), nn.Linear(5, 2)], ValueError,
         r"module 2 \(Linear\) expects 5 input features, but module 0 \(Linear\) produces 4"),
    ]
    for modules, error, message in cases:
        with pytest.raises(error, match=r"\[from_torch\] " + message):
            interop.from_torch(nn.Sequential(*modules))


def test_from_torch_names_modules_by_their_path(torch):
    from collections import OrderedDict

    nn = torch.nn
    model = nn.Sequential(OrderedDict(
        stem=nn.Sequential(OrderedDict(fc=nn.Linear(3, 4), act=nn.ReLU())),
        block=interop.TorchResidual(nn.Sequential(OrderedDict(norm=nn.GroupNorm(2, 4)))),
    ))
    with pytest.raises(ValueError, match=r"\[from_torch\] module block.body.norm \(GroupNorm\) "
                                         r"is not supported"):
        interop.from_torch(model)
    model.block.body.norm = nn.BatchNorm1d(4, track_running_stats=False)
    with pytest.raises(ValueError, match=r"module block.body.norm \(BatchNorm1d\) has "
                                         r"track_running_stats=False"):
        interop.from_torch(model)
    model.block.body.norm = nn.LayerNorm(4)
    net = interop.from_torch(model)  # the path is what get_submodule takes
    assert model.get_submodule("block.body.norm") is model.block.body.norm
    assert [layer.kind for layer in net.layers] == ["Dense", "Residual"]


def test_network_methods_delegate_to_interop(torch, onnx, ort, tmp_path):
    net = trained(every_layer(), "float64")
    module = net.to_torch()
    back = bprop.Network.from_torch(module, dtype="float32")
    assert back.dtype == np.float32 and descriptions(back) == descriptions(net)
    net.to_onnx(tmp_path / "net.onnx", opset=16)
    X = inputs(net, 12)
    np.testing.assert_allclose(run_ort(ort, tmp_path / "net.onnx", X), net.predict(X), **TOL64)


def test_from_torch_refuses_mixed_modes(torch):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Sequential(nn.BatchNorm1d(4)))
    model.train()
    model[2][0].eval()
    with pytest.raises(ValueError, match=r"\[from_torch\] module 1 \(Dropout\) is in training "
                                         r"mode but module 2.0 \(BatchNorm1d\) in eval mode"):
        interop.from_torch(model)


def test_from_torch_checks_norm_tensors(torch):
    nn = torch.nn
    bn = nn.BatchNorm1d(4).double()
    bn.running_var[2] = float("inf")
    with pytest.raises(ValueError, match=r"module 1 \(BatchNorm1d\) holds NaN or inf in its "
                                         r"running_var"):
        interop.from_torch([nn.Linear(3, 4).double(), bn])
    mixed = nn.Sequential(nn.Linear(3, 4).double(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="torch.float32, torch.float64"):
        interop.from_torch(mixed)
    net = interop.from_torch(mixed, dtype="float64")
    np.testing.assert_array_equal(net[1].weight, np.ones(4))
    meta = nn.LayerNorm(4, device="meta")
    with pytest.raises(ValueError, match=r"module 1 \(LayerNorm\) has its weight on the meta"):
        interop.from_torch([nn.Linear(3, 4), meta])


def test_failed_from_torch_leaves_the_model_as_it_was(torch):
    model = hand_built(torch, torch.float64)
    model.append(torch.nn.BatchNorm1d(5, momentum=None)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module 13 \(BatchNorm1d\) has momentum=None"):
        interop.from_torch(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in model.modules())

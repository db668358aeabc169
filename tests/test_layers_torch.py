"""bprop's layers against PyTorch, float64, through the public API: each layer kind
alone and the issue's example network, forward, dL/dX, every parameter gradient
and BatchNorm's running statistics, in training and eval mode, relative 1e-12.

The torch twin is an nn.Sequential built from the bprop network's layers with
its parameters copied (a Dense's weight is (in, out), a Linear's (out, in)).
Dropout draws its own masks in each library, so torch's nn.Dropout is compared
in eval mode and with p = 0; in training mode with p > 0 the twin multiplies by
bprop's mask (the ``mask`` view) scaled by 1 / (1 - p), and bprop's Dropout
output is checked to be its input * mask / (1 - p).
"""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop.activations import REGISTRY

torch = pytest.importorskip("torch")
nn = torch.nn

RTOL = 1e-12


def example(M=bprop, features=20, classes=10):
    return [M.Dense(features, 16), M.BatchNorm(16), M.Activation("relu"), M.Dropout(0.2),
            M.Residual([M.Dense(16, 16, activation="relu"), M.Dropout(0.1), M.Dense(16, 16)]),
            M.LayerNorm(16), M.Dense(16, classes)]


def activation_case(name):
    return lambda: [bprop.Dense(5, 4), bprop.Activation(name, negative_slope=0.2)]


CASES = {
    "dense-tanh": lambda: [bprop.Dense(5, 4, activation="tanh")],
    "dense-no-bias": lambda: [bprop.Dense(5, 4, activation="sigmoid", bias=False)],
    **{f"activation-{name}": activation_case(name) for name in bprop.ACTIVATIONS},
    "dropout": lambda: [bprop.Dense(5, 6), bprop.Dropout(0.3)],
    "dropout-p0": lambda: [bprop.Dense(5, 6), bprop.Dropout(0.0)],
    "batchnorm": lambda: [bprop.BatchNorm(5, momentum=0.3)],
    "batchnorm-no-affine": lambda: [bprop.BatchNorm(5, eps=1e-3, affine=False)],
    "layernorm": lambda: [bprop.LayerNorm(5)],
    "layernorm-no-affine": lambda: [bprop.LayerNorm(5, eps=1e-3, elementwise_affine=False)],
    "residual": lambda: [bprop.Residual([bprop.Dense(5, 5, activation="tanh"),
                                         bprop.Dense(5, 5)])],
    "nested-residual": lambda: [bprop.Residual([
        bprop.Dense(5, 7, activation="gelu"),
        bprop.Residual([bprop.BatchNorm(7), bprop.Activation("tanh")]),
        bprop.Dropout(0.2), bprop.Dense(7, 5)])],
    "example": example,
}


# ---- the torch twin -------------------------------------------------------------------

class TorchResidual(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


class MaskedDropout(nn.Module):
    """Training mode: input * (bprop's last mask) / (1 - p); eval: the identity."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        if not self.training:
            return x
        return x * torch.from_numpy(self.layer.mask.copy()) / (1 - self.layer.p)


def torch_activation(name, negative_slope):
    # the registry row's torch.nn module, the one bprop.interop.to_torch builds
    return REGISTRY[name].to_torch(nn, negative_slope)


def twin(layers, params, prefix="layers", masked_dropout=True):
    """nn.Sequential equal to `layers` (bprop layers of a network), its parameters
    copied; `params` collects {bprop name: (torch parameter, transposed)}."""
    modules = []
    f64 = dict(dtype=torch.float64)
    for i, layer in enumerate(layers):
        name = f"{prefix}.{i}"
        if isinstance(layer, bprop.Dense):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.has_bias, **f64)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(layer.weight.T.copy()))
                params[f"{name}.weight"] = (linear.weight, True)
                if layer.has_bias:
                    linear.bias.copy_(torch.from_numpy(layer.bias.copy()))
                    params[f"{name}.bias"] = (linear.bias, False)
            modules += [linear, torch_activation(layer.activation, layer.negative_slope)]
        elif isinstance(layer, bprop.Activation):
            modules.append(torch_activation(layer.activation, layer.negative_slope))
        elif isinstance(layer, bprop.Dropout):
            modules.append(MaskedDropout(layer) if masked_dropout else nn.Dropout(layer.p))
        elif isinstance(layer, (bprop.BatchNorm, bprop.LayerNorm)):
            if isinstance(layer, bprop.BatchNorm):
                norm = nn.BatchNorm1d(layer.features, eps=layer.eps, momentum=layer.momentum,
                                      affine=layer.affine, **f64)
                norm.running_mean.copy_(torch.from_numpy(layer.running_mean.copy()))
                norm.running_var.copy_(torch.from_numpy(layer.running_var.copy()))
            else:
                norm = nn.LayerNorm(layer.features, eps=layer.eps,
                                    elementwise_affine=layer.elementwise_affine, **f64)
            if layer.weight is not None:
                with torch.no_grad():
                    norm.weight.copy_(torch.from_numpy(layer.weight.copy()))
                    norm.bias.copy_(torch.from_numpy(layer.bias.copy()))
                params[f"{name}.weight"] = (norm.weight, False)
                params[f"{name}.bias"] = (norm.bias, False)
            modules.append(norm)
        elif isinstance(layer, bprop.Residual):
            modules.append(TorchResidual(twin(layer.layers, params, f"{name}.layers",
                                              masked_dropout)))
        else:
            raise TypeError(type(layer))
    return nn.Sequential(*modules)


def torch_buffers(module):
    return [b.detach().numpy() for name, b in module.named_buffers()
            if name.endswith(("running_mean", "running_var"))]


def flat_layers(layers):
    for layer in layers:
        yield layer
        if isinstance(layer, bprop.Residual):
            yield from flat_layers(layer.layers)


def pair(layers, seed=0, masked_dropout=True):
    """(bprop.Network float64, its torch twin, {name: (torch parameter, transposed)}),
    with non-trivial norm parameters and running statistics."""
    net = bprop.Network(layers, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed + 1)
    for layer in flat_layers(net.layers):
        if isinstance(layer, (bprop.BatchNorm, bprop.LayerNorm)) and layer.weight is not None:
            layer.weight = rng.uniform(0.5, 1.5, layer.features)
            layer.bias = rng.uniform(-0.5, 0.5, layer.features)
        if isinstance(layer, bprop.BatchNorm):
            layer.running_mean = rng.uniform(-0.3, 0.3, layer.features)
            layer.running_var = rng.uniform(0.5, 2.0, layer.features)
    params = {}
    module = twin(net.layers, params, masked_dropout=masked_dropout)
    assert sorted(params) == sorted(name for name, _, _ in net.parameters())
    return net, module, params


def close(actual, desired, err_msg="", scale=None):
    desired = np.asarray(desired)
    if scale is None:
        scale = float(np.max(np.abs(desired), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=RTOL * scale, err_msg=err_msg)


def compare_step(net, module, params, X, G, msg):
    """One forward and backward of each; compares output, dL/dX, every gradient
    (at its layer's gradient scale) and the buffers."""
    out = net.forward(X)  # first: the torch twin reads bprop's dropout masks
    dX = net.backward(G, input_grad=True)
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    for p, _ in params.values():
        p.grad = None
    out_t = module(Xt)
    out_t.backward(torch.from_numpy(G))
    close(out, out_t.detach().numpy(), f"{msg} forward")
    close(dX, Xt.grad.numpy(), f"{msg} dL/dX")
    torch_grads = {name: (p.grad.numpy().T if transposed else p.grad.numpy())
                   for name, (p, transposed) in params.items()}
    scale = {}
    for name, g in torch_grads.items():
        owner = name.rsplit(".", 1)[0]
        scale[owner] = max(scale.get(owner, 0.0), float(np.max(np.abs(g))))
    for name, _, g in net.parameters():
        close(g, torch_grads[name], f"{msg} {name}", scale[name.rsplit(".", 1)[0]])
    for (name, b), tb in zip(net.buffers(), torch_buffers(module)):
        close(b, tb, f"{msg} {name}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_torch(case, training):
    net, module, params = pair(CASES[case]())
    net.train(training)
    module.train(training)
    rng = np.random.default_rng(2)
    for step in range(3):
        X = rng.standard_normal((9, net.in_features))
        G = rng.standard_normal((9, net.out_features))
        compare_step(net, module, params, X, G, f"{case} step {step}")
    module.eval()
    with torch.no_grad():
        close(net.predict(X), module(torch.from_numpy(X)).numpy(), "predict")


@pytest.mark.parametrize("case", ["dropout", "dropout-p0", "nested-residual", "example"])
def test_torchs_own_dropout_in_eval_mode_and_with_p0(case):
    """nn.Dropout itself: in eval mode (the identity), and with every p set to 0 in
    training mode (where the masks keep everything)."""
    net, module, params = pair(CASES[case](), masked_dropout=False)
    rng = np.random.default_rng(3)
    net.eval()
    module.eval()
    X = rng.standard_normal((8, net.in_features))
    compare_step(net, module, params, X, rng.standard_normal((8, net.out_features)), "eval")
    # the same network with p = 0 everywhere, in training mode
    def no_dropout(layers):
        return [bprop.Dropout(0.0) if isinstance(L, bprop.Dropout) else
                bprop.Residual(no_dropout(L.layers)) if isinstance(L, bprop.Residual) else
                bprop.layers.layer_from_description(L._description()) for L in layers]
    net0, module0, params0 = pair(no_dropout(net.layers), masked_dropout=False)
    assert all(isinstance(m, nn.Dropout) for m in module0.modules()
               if isinstance(m, (nn.Dropout, MaskedDropout)))
    for step in range(2):
        X = rng.standard_normal((8, net0.in_features))
        compare_step(net0, module0, params0, X, rng.standard_normal((8, net0.out_features)),
                     f"p=0 step {step}")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_output_is_input_times_mask_over_keep_probability(p):
    net = bprop.Network([bprop.Dense(5, 40), bprop.Dropout(p)], dtype="float64", seed=1)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 5))
    G = rng.standard_normal((30, 40))
    out = net.forward(X)
    drop = net[1]
    mask = drop.mask
    assert mask.shape == (30, 40) and set(np.unique(mask)) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1
    close(out, drop.input * mask / (1 - p), "output")
    assert np.all(out[mask == 0] == 0)
    np.testing.assert_array_equal(drop.output, out)
    net.backward(G)
    close(net[0].delta, G * mask / (1 - p), "dL/d(input) of Dropout")


def test_example_network_running_statistics_follow_torch_through_training_steps():
    """Five SGD steps in training mode (torch replaying bprop's dropout masks):
    parameters and BatchNorm's running statistics stay torch's, and so does the
    eval-mode output afterwards."""
    net, module, params = pair(example(), seed=4)
    rng = np.random.default_rng(5)
    for step in range(5):
        X = rng.standard_normal((16, 20))
        y = rng.integers(0, 10, 16)
        out = net.forward(X)
        _, grad = bprop.losses.softmax_cross_entropy(out, y)
        net.backward(grad)
        net.step(0.1)
        for p, _ in params.values():
            p.grad = None
        loss = nn.functional.cross_entropy(module(torch.from_numpy(X)), torch.from_numpy(y))
        loss.backward()
        with torch.no_grad():
            for p, _ in params.values():
                p -= 0.1 * p.grad
        # at its layer's scale: the bias of the Dense before the BatchNorm has the
        # gradient 0, and moves by rounding noise only
        expected = {name: p.detach().numpy().T if transposed else p.detach().numpy()
                    for name, (p, transposed) in params.items()}
        scale = {}
        for name, value in expected.items():
            owner = name.rsplit(".", 1)[0]
            scale[owner] = max(scale.get(owner, 0.0), float(np.max(np.abs(value))))
        for name, value, _ in net.parameters():
            close(value, expected[name], f"step {step} {name}", scale[name.rsplit(".", 1)[0]])
        for (name, b), tb in zip(net.buffers(), torch_buffers(module)):
            close(b, tb, f"step {step} {name}")
    assert not np.allclose(net[1].running_var, 1.0)
    net.eval()
    module.eval()
    X = rng.standard_normal((7, 20))
    with torch.no_grad():
        expected = module(torch.from_numpy(X)).numpy()
    close(net.forward(X), expected, "eval forward")
    close(net.predict(X), expected, "predict")

"""The surface of bprop's layers: training and eval mode (forward, predict, fit,
evaluate), buffers, the NumPy views of parameters, buffers and caches (nested
layers included), and hostile arguments (refused with a message naming the
layer, leaving the network as it was). The arithmetic is checked against the
NumPy reference in test_layers.py and against PyTorch in test_layers_torch.py.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import bprop
from bprop import Activation, BatchNorm, Dense, Dropout, LayerNorm, Residual, optim

RTOL = 1e-12


def example(features=20, classes=10):
    """The issue's example network (784 inputs there)."""
    return [Dense(features, 16), BatchNorm(16), Activation("relu"), Dropout(0.2),
            Residual([Dense(16, 16, activation="relu"), Dropout(0.1), Dense(16, 16)]),
            LayerNorm(16), Dense(16, classes)]


def example_net(dtype="float64", seed=0):
    return bprop.Network(example(), dtype=dtype, seed=seed)


def data(rows=12, features=20, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, features)), rng.integers(0, classes, rows)


def flat_layers(layers):
    for layer in layers:
        yield layer
        if isinstance(layer, Residual):
            yield from flat_layers(layer.layers)


CACHES = ("input", "output", "z", "delta", "mask", "normalized")


def state(net):
    """Copies of everything a call could change: parameters, gradients, buffers,
    caches, mode and dropout step."""
    out = {"training": net.training, "dropout_step": net.dropout_step}
    for name, p, g in net.parameters():
        out[name], out[name + ".grad"] = p.copy(), g.copy()
    for name, b in net.buffers():
        out[name] = b.copy()
    for i, layer in enumerate(flat_layers(net.layers)):
        for cache in CACHES:
            value = getattr(layer, cache, None)
            out[f"{i}.{cache}"] = None if value is None else value.copy()
    return out


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value, err_msg=key)
        else:
            assert after[key] == value, key


def trained(net, X, y):
    """A forward and backward in training mode: the caches, gradients and running
    statistics are no longer the initial ones."""
    out = net.forward(X)
    _, grad = bprop.losses.softmax_cross_entropy(out, y)
    net.backward(grad)
    return net


# ---- modes -------------------------------------------------------------------------------

def test_a_new_network_is_in_training_mode_and_train_eval_return_it():
    net = example_net()
    assert net.training is True
    assert net.eval() is net and net.training is False
    assert net.train() is net and net.training is True
    assert net.train(False) is net and net.training is False
    assert net.train(np.bool_(True)) is net and net.training is True


@pytest.mark.parametrize("mode", ["yes", 1, 0, None, 1.0])
def test_train_refuses_a_mode_that_is_not_a_bool(mode):
    net = example_net().eval()
    with pytest.raises(TypeError, match=r"\[Network.train\] mode must be a bool"):
        net.train(mode=mode)
    assert net.training is False


def test_repr_shows_the_nesting_and_the_mode():
    net = bprop.Network(example() + [Residual([Residual([BatchNorm(10, affine=False)]),
                                               Activation("leaky_relu", negative_slope=0.2)])],
                        seed=0)
    expected = """\
Network(dtype=float32, parameters=1,114)
  (0): Dense(20, 16, activation='identity')
  (1): BatchNorm(16, momentum=0.1, eps=1e-05, affine=True)
  (2): Activation('relu')
  (3): Dropout(p=0.2)
  (4): Residual(
    (0): Dense(16, 16, activation='relu')
    (1): Dropout(p=0.1)
    (2): Dense(16, 16, activation='identity')
  )
  (5): LayerNorm(16, eps=1e-05, elementwise_affine=True)
  (6): Dense(16, 10, activation='identity')
  (7): Residual(
    (0): Residual(
      (0): BatchNorm(10, momentum=0.1, eps=1e-05, affine=False)
    )
    (1): Activation('leaky_relu', negative_slope=0.2)
  )"""
    assert repr(net) == expected
    assert repr(net.eval()).splitlines()[0] == "Network(dtype=float32, parameters=1,114, eval)"


def test_forward_in_training_mode_updates_running_statistics_and_eval_does_not():
    net = example_net()
    X, _ = data()
    bn = net[1]
    before = [b.copy() for _, b in net.buffers()]
    net.forward(X)
    assert net.dropout_step == 1
    for old, (name, b) in zip(before, net.buffers()):
        assert not np.array_equal(old, b), name
    # PyTorch's update, with the batch's unbiased variance
    pre = net[0].output
    np.testing.assert_allclose(bn.running_mean, 0.9 * before[0] + 0.1 * pre.mean(axis=0),
                               rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(bn.running_var, 0.9 * before[1] + 0.1 * pre.var(axis=0, ddof=1),
                               rtol=RTOL)
    net.eval()
    trained_buffers = [b.copy() for _, b in net.buffers()]
    out = net.forward(X)
    assert net.dropout_step == 1
    for old, (name, b) in zip(trained_buffers, net.buffers()):
        np.testing.assert_array_equal(b, old, err_msg=name)
    np.testing.assert_allclose(out, net.predict(X), rtol=RTOL, atol=RTOL)
    # eval normalises with the running statistics, training with the batch's
    np.testing.assert_allclose(bn.normalized, (bn.input - bn.running_mean)
                               / np.sqrt(bn.running_var + bn.eps), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_predict_is_eval_mode_in_any_mode_and_changes_nothing(training):
    net = example_net()
    X, y = data()
    trained(net, X, y).train(training)
    before = state(net)
    X_new, _ = data(7, seed=1)
    predicted = net.predict(X_new)
    chunked = net.predict(X_new, batch_size=3)
    assert_same_state(before, state(net))
    net.eval()
    expected = net.forward(X_new)  # eval mode: no dropout, running statistics
    np.testing.assert_allclose(predicted, expected, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(chunked, expected, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fit_trains_in_training_mode_and_leaves_the_mode_it_found(training):
    net = example_net().train(training)
    X, y = data(24)
    seen = []

    class Watch:
        def on_epoch_end(self, epoch, logs):
            seen.append((net.training, net.dropout_step))

    buffers = [b.copy() for _, b in net.buffers()]
    bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.01), epochs=2, batch_size=8,
              callbacks=[Watch()], seed=0)
    assert seen == [(True, 3), (True, 6)]  # dropout drew a mask at each of the 6 steps
    assert net.training is training
    assert net.dropout_step == 6
    for old, (name, b) in zip(buffers, net.buffers()):
        assert not np.array_equal(old, b), name  # BatchNorm trained its statistics


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fit_leaves_the_mode_it_found_when_it_raises(training):
    net = example_net().train(training)
    X, y = data(24)

    class Fail:
        def on_epoch_end(self, epoch, logs):
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        bprop.fit(net, X, y, epochs=2, batch_size=8, callbacks=[Fail()])
    assert net.training is training

    def bad_loss(output, target, sample_weight=None):
        raise ZeroDivisionError("in the loss")

    with pytest.raises(ZeroDivisionError):
        bprop.fit(net, X, y, loss=bad_loss, epochs=1, batch_size=8)
    assert net.training is training


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_evaluate_is_eval_mode_and_changes_nothing(training):
    net = example_net()
    X, y = data()
    trained(net, X, y).train(training)
    before = state(net)
    scores = bprop.evaluate(net, X, y, metrics=["accuracy"])
    assert_same_state(before, state(net))
    loss, _ = bprop.losses.softmax_cross_entropy(net.predict(X), y)
    assert scores["loss"] == pytest.approx(loss, rel=RTOL)
    assert scores["accuracy"] == np.mean(np.argmax(net.predict(X), axis=1) == y)


# ---- buffers --------------------------------------------------------------------------------

def nested_bn_net():
    return bprop.Network([Dense(6, 8), BatchNorm(8), Residual([
        Dense(8, 8), BatchNorm(8, momentum=0.5), Residual([BatchNorm(8, affine=False)])]),
        LayerNorm(8), Dense(8, 3)], dtype="float64", seed=1)


def test_buffers_are_named_views_of_each_batchnorms_running_statistics():
    net = nested_bn_net()
    norms = [layer for layer in flat_layers(net.layers) if isinstance(layer, BatchNorm)]
    buffers = list(net.buffers())
    assert [name for name, _ in buffers] == [
        "layers.1.running_mean", "layers.1.running_var",
        "layers.2.layers.1.running_mean", "layers.2.layers.1.running_var",
        "layers.2.layers.2.layers.0.running_mean", "layers.2.layers.2.layers.0.running_var"]
    for k, layer in enumerate(norms):
        assert np.shares_memory(buffers[2 * k][1], layer.running_mean)
        assert np.shares_memory(buffers[2 * k + 1][1], layer.running_var)
        assert dict(layer.buffers()).keys() == {"running_mean", "running_var"}
        assert np.shares_memory(dict(layer.buffers())["running_mean"], layer.running_mean)
        np.testing.assert_array_equal(layer.running_mean, 0)
        np.testing.assert_array_equal(layer.running_var, 1)
    assert not {name for name, _ in buffers} & {name for name, _, _ in net.parameters()}
    assert list(net[3].buffers()) == [] and list(net[0].buffers()) == []
    # the views are the live storage: a training forward updates what they show ...
    net.forward(np.random.default_rng(0).standard_normal((5, 6)))
    assert not np.array_equal(buffers[0][1], 0)
    np.testing.assert_array_equal(buffers[0][1], norms[0].running_mean)
    # ... and what is written into them is what eval mode uses
    X = np.random.default_rng(1).standard_normal((4, 6))
    before = net.predict(X)
    buffers[1][1][...] = 4.0
    assert not np.allclose(net.predict(X), before)


def test_buffers_are_not_trained_by_an_optimizer():
    net = nested_bn_net().eval()
    opt = optim.Adam(net, lr=0.1)
    X = np.random.default_rng(0).standard_normal((5, 6))
    before = [b.copy() for _, b in net.buffers()]
    net.train_step(X, np.arange(5) % 3, "softmax_cross_entropy", opt)
    for old, (name, b) in zip(before, net.buffers()):
        np.testing.assert_array_equal(b, old, err_msg=name)


@pytest.mark.parametrize("value, exc, match", [
    (np.ones(7), ValueError, r"\[BatchNorm.running_mean\] must have shape \(8,\), but got \(7,\)"),
    (np.ones((1, 8)), ValueError, r"must have shape \(8,\)"),
    (np.full(8, np.nan), ValueError, r"\[BatchNorm.running_mean\] must be finite"),
    (np.full(8, np.inf), ValueError, "must be finite"),
    (["a"] * 8, TypeError, "must be assigned real numbers"),
    (np.ones(8, complex), TypeError, "must be assigned real numbers"),
])
def test_buffer_assignment_is_checked_and_a_refused_one_changes_nothing(value, exc, match):
    net = nested_bn_net()
    bn = net[1]
    view = bn.running_mean
    view[...] = 0.25
    with pytest.raises(exc, match=match):
        bn.running_mean = value
    np.testing.assert_array_equal(bn.running_mean, 0.25)
    with pytest.raises(exc, match=match.replace("running_mean", "running_var")):
        bn.running_var = value
    np.testing.assert_array_equal(bn.running_var, 1.0)
    # a good assignment copies into the same storage
    bn.running_mean = [float(i) for i in range(8)]
    assert np.shares_memory(view, bn.running_mean)
    np.testing.assert_array_equal(view, np.arange(8))


def test_float32_buffers_refuse_values_too_large_for_float32():
    net = bprop.Network([BatchNorm(3)])
    with pytest.raises(ValueError, match="must be finite in float32"):
        net[0].running_var = np.full(3, 1e39)
    np.testing.assert_array_equal(net[0].running_var, 1.0)
    net[0].running_var = np.full(3, 2.0)  # a float64 array is cast into the storage
    assert net[0].running_var.dtype == np.float32


def test_norm_parameters_are_assignable_views_and_absent_without_affine():
    net = nested_bn_net()
    ln, bn = net[3], net[2][2][0]
    weight = ln.weight
    ln.weight = np.full(8, 2.0)
    assert np.shares_memory(weight, ln.weight)
    np.testing.assert_array_equal(weight, 2.0)
    with pytest.raises(ValueError, match=r"\[LayerNorm.weight\] must have shape \(8,\)"):
        ln.weight = np.ones(3)
    assert bn.weight is None and bn.bias is None and bn.grad_weight is None
    assert list(bn.parameters()) == []
    with pytest.raises(AttributeError, match=r"\[BatchNorm.weight\] this layer has no weight"):
        bn.weight = np.ones(8)


# ---- views -------------------------------------------------------------------------------

def dotted(layer):
    return "layers." + ".layers.".join(str(i) for i in layer.path)


def test_parameters_and_gradients_are_views_of_the_networks_storage():
    net = example_net()
    views = {name: (p, g) for name, p, g in net.parameters()}
    assert list(views) == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
        "layers.4.layers.0.weight", "layers.4.layers.0.bias",
        "layers.4.layers.2.weight", "layers.4.layers.2.bias",
        "layers.5.weight", "layers.5.bias", "layers.6.weight", "layers.6.bias"]
    owners = set()
    for layer in flat_layers(net.layers):
        for local, p, g in layer.parameters():
            name = f"{dotted(layer)}.{local}"
            owners.add(name)
            assert np.shares_memory(p, views[name][0]) and np.shares_memory(g, views[name][1])
            assert np.shares_memory(getattr(layer, local), p)
            assert np.shares_memory(getattr(layer, "grad_" + local), g)
            assert p.flags.writeable and p.dtype == net.dtype
    assert owners == set(views)
    assert net[4][0].weight.shape == (16, 16) and net[0].weight.shape == (20, 16)
    assert net[1].weight.shape == net[1].bias.shape == (16,)
    # a backward writes the gradients into the storage the views show
    X, y = data()
    grad = net[4][2].grad_weight
    trained(net, X, y)
    np.testing.assert_allclose(grad, net[4][2].input.T @ net[4][2].delta, rtol=RTOL, atol=RTOL)
    # writing through a view changes what the network computes
    before = net.predict(X)
    views["layers.4.layers.2.weight"][0][...] = 0
    np.testing.assert_array_equal(net[4][2].weight, 0)
    assert not np.allclose(net.predict(X), before)


def test_caches_are_read_only_views_of_the_last_forward_and_backward():
    net = example_net()
    layers = list(flat_layers(net.layers))
    assert all(getattr(layer, cache, None) is None for layer in layers for cache in CACHES)
    X, y = data()
    trained(net, X, y)
    for layer in layers:
        for cache in CACHES:
            value = getattr(layer, cache, None)
            if value is None:
                assert cache not in ("input", "output"), (layer, cache)
                continue
            assert value.shape[0] == 12 and not value.flags.writeable, (layer, cache)
            with pytest.raises(ValueError, match="read-only"):
                value[0, 0] = 1.0
            # a view of the core's storage, not a copy: the next forward of the same
            # batch size overwrites what it shows
            assert np.shares_memory(value, getattr(layer, cache))
    dense = net[4][0]
    z = dense.z
    old = z.copy()
    net.forward(data(seed=5)[0])
    np.testing.assert_array_equal(z, dense.z)
    assert not np.array_equal(z, old)


def test_caches_of_nested_layers_are_what_flows_through_the_network():
    net = example_net()
    X, y = data()
    trained(net, X, y)
    d0, bn, relu, drop, res, ln, out = net.layers
    inner, inner_drop, inner_out = res.layers
    assert np.shares_memory(d0.input, X)  # forward caches X by reference
    np.testing.assert_array_equal(d0.input, X)
    # each layer's input is the output of the one before it
    for before, after in [(d0, bn), (bn, relu), (relu, drop), (drop, res), (res, ln), (ln, out),
                          (inner, inner_drop), (inner_drop, inner_out)]:
        np.testing.assert_array_equal(after.input, before.output, err_msg=repr(after))
    # the Residual's first layer reads the Residual's input itself
    assert np.shares_memory(inner.input, res.input)
    np.testing.assert_array_equal(inner.input, drop.output)
    np.testing.assert_allclose(res.output, res.input + inner_out.output, rtol=RTOL, atol=RTOL)
    # what each layer computed from its caches
    np.testing.assert_allclose(d0.z, d0.input @ d0.weight + d0.bias, rtol=RTOL, atol=RTOL)
    np.testing.assert_array_equal(d0.output, d0.z)  # identity
    np.testing.assert_allclose(inner.output, np.maximum(inner.z, 0), rtol=RTOL, atol=RTOL)
    np.testing.assert_array_equal(relu.output, np.maximum(relu.input, 0))
    mean, var = bn.input.mean(axis=0), bn.input.var(axis=0)
    np.testing.assert_allclose(bn.normalized, (bn.input - mean) / np.sqrt(var + bn.eps),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.output, bn.normalized * bn.weight + bn.bias, rtol=RTOL,
                               atol=RTOL)
    mean, var = ln.input.mean(axis=1, keepdims=True), ln.input.var(axis=1, keepdims=True)
    np.testing.assert_allclose(ln.normalized, (ln.input - mean) / np.sqrt(var + ln.eps),
                               rtol=1e-10, atol=1e-10)
    for dropout in (drop, inner_drop):
        np.testing.assert_allclose(dropout.output, dropout.input * dropout.mask
                                   / (1 - dropout.p), rtol=RTOL, atol=RTOL)
    # backward: the Dense deltas and gradients
    for dense in (d0, inner, inner_out, out):
        np.testing.assert_allclose(dense.grad_weight, dense.input.T @ dense.delta, rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(dense.grad_bias, dense.delta.sum(axis=0), rtol=1e-10,
                                   atol=1e-12)
    # dL/dz of the inner relu Dense is relu'(z) * (its output's gradient)
    upstream = inner_drop.mask / (1 - inner_drop.p) * (inner_out.delta @ inner_out.weight.T)
    np.testing.assert_allclose(inner.delta, (inner.z > 0) * upstream, rtol=1e-10, atol=1e-12)


def test_views_stay_valid_after_the_network_is_gone():
    net = example_net()
    X, y = data()
    trained(net, X, y)
    weight, running_var, output = net[4][0].weight, net[1].running_var, net[6].output
    copies = weight.copy(), running_var.copy(), output.copy()
    layer = net[4][0]
    del net
    gc.collect()
    for view, copy in zip((weight, running_var, output), copies):
        np.testing.assert_array_equal(view, copy)
    np.testing.assert_array_equal(layer.weight, copies[0])  # a layer keeps the storage too


def test_a_layer_outside_a_network_has_no_storage():
    dense, act, bn = Dense(3, 4), Activation("relu"), BatchNorm(4)
    for layer, attr in [(dense, "weight"), (dense, "grad_bias"), (bn, "running_mean"),
                        (bn, "weight")]:
        with pytest.raises(RuntimeError, match="not part of a Network yet"):
            getattr(layer, attr)
    with pytest.raises(RuntimeError, match="not part of a Network yet"):
        _ = dense.input
    with pytest.raises(RuntimeError, match="not part of a Network yet"):
        list(bn.buffers())
    assert act.in_features is None and act.out_features is None
    assert dense.in_features == 3 and bn.out_features == 4
    bprop.Network([dense, act, bn])
    assert act.in_features == act.out_features == 4
    assert dense.path == (0,) and bn.path == (2,)


# ---- hostile arguments --------------------------------------------------------------------

@pytest.mark.parametrize("p, exc, match", [
    (-0.1, ValueError, r"\[Dropout\] p must be in \[0, 1\), but got -0.1"),
    (1.0, ValueError, r"p must be in \[0, 1\), but got 1.0"),
    (1, ValueError, r"p must be in \[0, 1\)"),
    (1.5, ValueError, r"p must be in \[0, 1\)"),
    (float("nan"), ValueError, r"p must be in \[0, 1\), but got nan"),
    (float("inf"), ValueError, r"p must be in \[0, 1\)"),
    ("0.5", TypeError, r"\[Dropout\] p must be a float in \[0, 1\), but got str"),
    (None, TypeError, "but got NoneType"),
    (True, TypeError, "but got bool"),
    ([0.5], TypeError, "but got list"),
    (0.5 + 0j, TypeError, "but got complex"),
    (np.array([0.5]), TypeError, "but got ndarray"),
])
def test_dropout_refuses_p_outside_0_1_and_non_numbers(p, exc, match):
    with pytest.raises(exc, match=match):
        Dropout(p)


def test_dropout_takes_any_real_number_type():
    assert Dropout(np.float32(0.25)).p == 0.25
    assert Dropout(np.int64(0)).p == 0.0
    assert Dropout(0).p == 0.0 and isinstance(Dropout(0).p, float)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: BatchNorm(4, eps=0), ValueError, r"\[BatchNorm\] eps must be > 0"),
    (lambda: BatchNorm(4, eps=-1e-5), ValueError, r"\[BatchNorm\] eps must be > 0"),
    (lambda: LayerNorm(4, eps=0.0), ValueError, r"\[LayerNorm\] eps must be > 0"),
    (lambda: LayerNorm(4, eps=-1.0), ValueError, r"\[LayerNorm\] eps must be > 0"),
    (lambda: LayerNorm(4, eps=float("nan")), ValueError, r"\[LayerNorm\] eps must be finite"),
    (lambda: BatchNorm(4, eps="1e-5"), TypeError, r"\[BatchNorm\] eps must be a real number"),
    (lambda: BatchNorm(4, momentum=-0.1), ValueError, r"\[BatchNorm\] momentum must be >= 0"),
    (lambda: BatchNorm(4, momentum=1.5), ValueError, r"\[BatchNorm\] momentum must be <= 1"),
    (lambda: BatchNorm(4, momentum=float("nan")), ValueError, "momentum must be finite"),
    (lambda: BatchNorm(4, momentum=None), TypeError, "momentum must be a real number"),
    (lambda: BatchNorm(0), ValueError, r"\[BatchNorm\] features must be >= 1"),
    (lambda: LayerNorm(2.5), TypeError, r"\[LayerNorm\] features"),
    (lambda: BatchNorm(4, affine=1), TypeError, r"\[BatchNorm\] affine must be a bool"),
    (lambda: LayerNorm(4, elementwise_affine="yes"), TypeError,
     r"\[LayerNorm\] elementwise_affine must be a bool"),
    (lambda: Activation("swish"), ValueError, r"\[Activation\] activation must be one of"),
    (lambda: Activation(np.tanh), TypeError, r"\[Activation\] activation must be a str"),
])
def test_norm_and_activation_settings_are_checked(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_norm_momentum_and_eps_at_their_limits_are_accepted():
    net = bprop.Network([BatchNorm(3, momentum=0.0), BatchNorm(3, momentum=1.0, eps=1e-300),
                         LayerNorm(3, eps=1e-300)], dtype="float64")
    X = np.random.default_rng(0).standard_normal((4, 3))
    net.forward(X)
    np.testing.assert_array_equal(net[0].running_mean, 0)  # momentum 0: never moves
    np.testing.assert_allclose(net[1].running_mean, net[1].input.mean(axis=0), rtol=RTOL)


@pytest.mark.parametrize("layers, match", [
    (lambda: [Dense(4, 5), Dense(6, 2)],
     r"\[Network\] layer 1 expects 6 input features, but layer 0 produces 5"),
    (lambda: [Dense(4, 5), BatchNorm(6)],
     (r"\[Network\] layers.1 \(BatchNorm\) expects 6 input features, but the layer before "
      r"it produces 5")),
    (lambda: [Dense(4, 5), Activation("relu"), Dropout(0.1), LayerNorm(4)],
     r"layers.3 \(LayerNorm\) expects 4 input features, but the layer before it produces 5"),
    (lambda: [Dense(4, 5), Residual([Dense(5, 5), LayerNorm(4)])],
     r"layers.1.layers.1 \(LayerNorm\) expects 4 input features"),
    (lambda: [Dense(4, 5), Residual([Dense(4, 4)])],
     r"layers.1 \(Residual\) expects 4 input features, but the layer before it produces 5"),
    (lambda: [Residual([Dense(4, 5)])],
     (r"layers.0 is a Residual whose layers map 4 features to 5; y = x \+ f\(x\) needs f "
      "to keep the width")),
    (lambda: [Dense(3, 4), Residual([Dense(4, 5), Activation("tanh"), Dense(5, 6)])],
     r"layers.1 is a Residual whose layers map 4 features to 6"),
    (lambda: [Dense(3, 4), Residual([Dense(4, 4), Residual([Dense(4, 2)])])],
     r"layers.1.layers.1 is a Residual whose layers map 4 features to 2"),
])
def test_width_mismatches_are_refused_naming_the_layer(layers, match):
    built = layers()
    with pytest.raises(ValueError, match=match):
        bprop.Network(built)
    # the refused layers are still free to go into a network of their own
    assert all(layer._core is None for layer in flat_layers(built))


@pytest.mark.parametrize("layers", [
    lambda: [Activation("relu")],
    lambda: [Dropout(0.1)],
    lambda: [Activation("tanh"), Dropout(0.5), Activation("softmax")],
    lambda: [Residual([Activation("tanh")]), Dropout(0.2)],
])
def test_a_network_of_only_width_free_layers_is_refused(layers):
    with pytest.raises(ValueError, match=r"\[Network\] no layer has a width of its own"):
        bprop.Network(layers())


def test_width_free_layers_take_their_neighbours_width():
    net = bprop.Network([Dropout(0.5), Activation("tanh"), LayerNorm(7)], seed=0)
    assert net.in_features == net.out_features == 7
    assert net.num_parameters == 14


@pytest.mark.parametrize("make, exc, match", [
    (lambda: Residual([Dense(2, 2), "relu"]), TypeError,
     r"\[Residual\] layers\[1\] must be a bprop layer .* but got str"),
    (lambda: Residual([Dense(2, 2), np.tanh]), TypeError, r"layers\[1\] must be a bprop layer"),
    (lambda: Residual([None]), TypeError, r"layers\[0\] must be a bprop layer .* NoneType"),
    (lambda: Residual([bprop.reference.Dense(2, 2)]), TypeError,
     r"layers\[0\] must be a bprop layer"),
    (lambda: Residual([[Dense(2, 2)]]), TypeError, r"layers\[0\] must be a bprop layer"),
    (lambda: Residual(Dense(2, 2)), TypeError,
     r"\[Residual\] layers must be a list of layers, but got Dense"),
    (lambda: Residual(x for x in [Dense(2, 2)]), TypeError, "but got generator"),
    (lambda: Residual([]), ValueError, r"\[Residual\] layers must hold at least one layer"),
    (lambda: bprop.Network([Dense(2, 2), "relu"]), TypeError,
     r"\[Network\] layers\[1\] must be a bprop layer"),
    (lambda: bprop.Network(Residual([Dense(2, 2)])), TypeError,
     r"\[Network\] layers must be a list of layers"),
])
def test_only_layers_go_into_a_residual_or_a_network(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_a_layer_belongs_to_one_network():
    dense = Dense(3, 3)
    with pytest.raises(ValueError, match=r"the same Dense object appears twice in layers, as "
                                         r"layers.0 and layers.1.layers.0"):
        bprop.Network([dense, Residual([dense])])
    with pytest.raises(ValueError, match="appears twice"):
        bprop.Network([dense, dense])
    drop = Dropout(0.1)
    with pytest.raises(ValueError, match=r"the same Dropout object appears twice"):
        bprop.Network([Dense(3, 3), drop, Residual([drop])])
    inner = Residual([Dense(3, 3)])
    with pytest.raises(ValueError, match=r"the same Residual object appears twice"):
        bprop.Network([inner, inner])
    # the refused networks bound nothing: the layers can still go into one network
    first = bprop.Network([dense, drop, inner])
    for layer in (dense, drop, inner, inner[0]):
        with pytest.raises(ValueError, match=r"already belongs to another Network; create a new"):
            bprop.Network([Dense(3, 3), Residual([layer])] if layer is not dense else [layer])
    assert dense.path == (0,) and inner[0].path == (2, 0)
    assert np.shares_memory(dense.weight, next(first.parameters())[1])


def test_a_layer_of_a_network_refuses_to_be_copied_on_its_own():
    import copy
    net = example_net()
    with pytest.raises(TypeError, match="cannot be pickled or copied on its own"):
        copy.deepcopy(net[4])
    free = copy.deepcopy(Residual([Dense(2, 2), Dropout(0.3)]))
    assert repr(free[1]) == "Dropout(p=0.3)"


# ---- BatchNorm and a batch of one row ---------------------------------------------------

BATCH_OF_ONE = r"X has 1 row, but BatchNorm in training mode needs more than one row"


def test_batchnorm_refuses_a_training_batch_of_one_row_and_changes_nothing():
    net = example_net()
    X, y = data()
    trained(net, X, y)
    before = state(net)
    with pytest.raises(ValueError, match=r"\[Network.forward\] " + BATCH_OF_ONE):
        net.forward(X[:1])
    assert_same_state(before, state(net))
    # the network goes on from there
    net.backward(np.ones((12, 10)))
    # eval mode normalises with the running statistics: one row is fine
    net.eval()
    np.testing.assert_allclose(net.forward(X[:1]), net.predict(X[:1]), rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(net.predict(X[:1]), net.predict(X)[:1], rtol=RTOL, atol=RTOL)


def test_a_nested_batchnorm_refuses_one_row_before_any_layer_runs():
    """The BatchNorm in the Residual comes after a Dropout and Dense: neither may
    have cached anything or drawn a mask when the batch is refused."""
    net = bprop.Network([Dense(4, 6), Dropout(0.5), Residual([Dense(6, 6), BatchNorm(6)]),
                         Dense(6, 2)], dtype="float64", seed=0)
    X = np.random.default_rng(0).standard_normal((3, 4))
    net.forward(X)
    before = state(net)
    with pytest.raises(ValueError, match=BATCH_OF_ONE):
        net.forward(X[:1])
    assert_same_state(before, state(net))


def test_train_step_refuses_a_batch_of_one_row_and_changes_nothing():
    net = example_net()
    opt = optim.Adam(net, lr=0.01)
    X, y = data()
    net.train_step(X, y, "softmax_cross_entropy", opt)
    before, opt_before = state(net), opt.state_dict()
    with pytest.raises(ValueError, match=r"\[Network.train_step\] " + BATCH_OF_ONE):
        net.train_step(X[:1], y[:1], "softmax_cross_entropy", opt)
    assert_same_state(before, state(net))
    assert opt.step_count == opt_before["step"] == 1


@pytest.mark.parametrize("rows, batch_size", [(9, 4), (1, 4), (5, 1), (17, 8)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fit_refuses_a_minibatch_of_one_row_before_training(rows, batch_size, training):
    """A BatchNorm cannot train on a minibatch of one row. fit finds the one-row
    minibatch (9 rows in batches of 4: the last has 1) before the first step;
    it used to make the steps before it, then raise from train_step with the
    network half trained."""
    net = example_net().train(training)
    opt = optim.SGD(net, lr=0.1)
    X, y = data(rows)
    before = state(net)
    with pytest.raises(ValueError, match=r"\[fit\] .*minibatch of one row"):
        bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=batch_size)
    assert_same_state(before, state(net))
    assert opt.step_count == 0
    # without a BatchNorm a minibatch of one row is fine
    plain = bprop.Network([Dense(20, 8), Dropout(0.2), LayerNorm(8), Dense(8, 10)])
    bprop.fit(plain, X, y, epochs=1, batch_size=batch_size)


def test_forward_refuses_inputs_of_the_wrong_width_naming_the_layer():
    net = example_net()
    before = state(net)
    with pytest.raises(ValueError, match=r"\[Network.forward\] X has 19 features, but layer 0 "
                                         "expects 20"):
        net.forward(np.zeros((3, 19)))
    with pytest.raises(TypeError, match=r"\[Network.forward\] X must have dtype float64"):
        net.forward(np.zeros((3, 20), np.float32))
    assert_same_state(before, state(net))

"""Checkpoints of networks of every layer kind: layer trees, buffers, the
training mode and the dropout clock through save/load, pickling and deep
copies; version-1 files still loading; damaged layer trees raising
CheckpointError."""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct

import numpy as np
import pytest

import bprop
from bprop import io, optim
from bprop.io import CheckpointError
from bprop.layers import walk

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _split(data):
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def _join(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# ---- version 1 (Dense-only) checkpoints -------------------------------------------------------

def test_version_1_checkpoint_loads_with_its_weights_and_adam_state():
    # written by the version-1 writer (tests/data/make_v1_checkpoint.py)
    expected = dict(np.load(os.path.join(DATA, "v1_3-4-2_adam_expected.npz")))
    net, opt = bprop.load(os.path.join(DATA, "v1_3-4-2_adam.safetensors"), with_optimizer=True)
    assert net.dtype == np.float64
    assert [L._description() for L in net.layers] == [
        bprop.Dense(3, 4, "tanh")._description(), bprop.Dense(4, 2)._description()]
    params = {name: p for name, p, _ in net.parameters()}
    assert sorted(params) == sorted(k for k in expected if not k.startswith("optimizer."))
    for name, p in params.items():
        np.testing.assert_array_equal(p.view(np.uint8), expected[name].view(np.uint8))
    assert isinstance(opt, optim.Adam)
    sd = opt.state_dict()
    assert sd["step"] == 3
    assert sd["hyperparameters"]["betas"] == (0.8, 0.95)
    assert sd["hyperparameters"]["lr"] == 0.01
    slots = {f"optimizer.{pname}.{slot}": a for pname, arrays in sd["state"].items()
             for slot, a in arrays.items()}
    assert sorted(slots) == sorted(k for k in expected if k.startswith("optimizer."))
    for name, a in slots.items():
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), expected[name].view(np.uint8))


# ---- networks of every layer kind -------------------------------------------------------------

def every_layer_kind():
    return [bprop.Dense(4, 6, bias=False), bprop.BatchNorm(6, momentum=0.3),
            bprop.Activation("leaky_relu", negative_slope=0.1), bprop.Dropout(0.25),
            bprop.Residual([bprop.Dense(6, 5, "tanh"), bprop.Dropout(0.4), bprop.Dense(5, 6)]),
            bprop.LayerNorm(6, eps=1e-4), bprop.Dense(6, 3)]


def batch(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)), rng.integers(0, 3, n)


def trained(dtype, training, steps=4):
    """A network of every layer kind after a few Adam steps (running statistics
    and the dropout clock moved), in training or eval mode, with its optimizer."""
    net = bprop.Network(every_layer_kind(), dtype=dtype, seed=7)
    opt = optim.Adam(net, lr=1e-2)
    X, y = batch()
    for _ in range(steps):
        net.train_step(X.astype(dtype), y, "softmax_cross_entropy", opt)
    net.train(training)
    return net, opt


def assert_same_network(net, other):
    """The same layers, parameters, buffers (bit for bit), mode and dropout clock."""
    assert other is not net and other.dtype == net.dtype
    assert [L._description() for L in other.layers] == [L._description() for L in net.layers]
    assert [type(L) for _, _, L in walk(other.layers)] == [type(L) for _, _, L in walk(net.layers)]
    for (name, a, _), (name2, b, _) in zip(net.parameters(), other.parameters(), strict=True):
        assert name == name2 and not np.shares_memory(a, b)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for (name, a), (name2, b) in zip(net.buffers(), other.buffers(), strict=True):
        assert name == name2 and not np.shares_memory(a, b)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert other.training == net.training
    assert (other.dropout_seed, other.dropout_step) == (net.dropout_seed, net.dropout_step)


def save_and_load(net, opt, how, tmp_path):
    """(restored network, restored optimizer) by a file, pickle or deepcopy."""
    if how == "file":
        path = tmp_path / "model.safetensors"
        net.save(path, optimizer=opt)
        return bprop.load(path, with_optimizer=True)
    if how == "pickle":
        return pickle.loads(pickle.dumps((net, opt)))
    return copy.deepcopy((net, opt))


ROUND_TRIPS = ["file", "pickle", "deepcopy"]


@pytest.mark.parametrize("how", ROUND_TRIPS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_layer_kind_round_trips_bitwise(dtype, training, how, tmp_path):
    net, opt = trained(dtype, training)
    assert any(b.tobytes() != np.zeros_like(b).tobytes() for _, b in net.buffers())
    assert net.dropout_step == 4
    loaded, _ = save_and_load(net, opt, how, tmp_path)
    assert_same_network(net, loaded)
    X, _ = batch(9, seed=1)
    assert loaded.predict(X).tobytes() == net.predict(X).tobytes()
    # a forward in the saved mode, then one in training mode: the same masks and
    # the same running statistics afterwards
    X = X.astype(dtype)
    assert loaded.forward(X).tobytes() == net.forward(X).tobytes()
    net.train()
    loaded.train()
    assert loaded.forward(X).tobytes() == net.forward(X).tobytes()
    for a, b in zip(net.layers[3].mask, loaded.layers[3].mask):
        assert a.tobytes() == b.tobytes()
    assert loaded.layers[4][1].mask.tobytes() == net.layers[4][1].mask.tobytes()
    assert_same_network(net, loaded)


@pytest.mark.parametrize("how", ROUND_TRIPS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_resumed_run_continues_bitwise(dtype, how, tmp_path):
    """The optimizer state of nested parameters (layers.4.layers.0.weight ...),
    the running statistics and the dropout clock all come back: training on
    gives the bits the original run gives."""
    net, opt = trained(dtype, True)
    loaded, loaded_opt = save_and_load(net, opt, how, tmp_path)
    assert type(loaded_opt) is optim.Adam and loaded_opt.net is loaded
    sd, ld = opt.state_dict(), loaded_opt.state_dict()
    assert "layers.4.layers.2.bias" in ld["state"] and "layers.1.running_mean" not in ld["state"]
    assert sd["step"] == ld["step"] == 4 and sd["hyperparameters"] == ld["hyperparameters"]
    assert list(sd["state"]) == list(ld["state"])
    for pname, slots in sd["state"].items():
        assert list(slots) == list(ld["state"][pname])
        for slot, a in slots.items():
            assert np.asarray(a).tobytes() == np.asarray(ld["state"][pname][slot]).tobytes()
    X, y = batch(10, seed=2)
    X = X.astype(dtype)
    for _ in range(3):
        a = net.train_step(X, y, "softmax_cross_entropy", opt)
        b = loaded.train_step(X, y, "softmax_cross_entropy", loaded_opt)
        assert np.float64(a).tobytes() == np.float64(b).tobytes()
    assert_same_network(net, loaded)


def test_checkpoint_holds_every_parameter_and_buffer_by_name(tmp_path):
    net, opt = trained("float32", False)
    path = tmp_path / "model.safetensors"
    bprop.save(net, path, optimizer=opt)
    header, _ = _split(path.read_bytes())
    meta = header.pop("__metadata__")
    assert meta["format_version"] == "2"
    assert json.loads(meta["architecture"]) == [L._description() for L in net.layers]
    assert (meta["training"], meta["dropout_seed"], meta["dropout_step"]) == (
        "false", str(net.dropout_seed), "4")
    names = [n for n, _, _ in net.parameters()] + [n for n, _ in net.buffers()]
    slots = [f"optimizer.{p}.{s}" for p, _, _ in net.parameters() for s in ("exp_avg",
                                                                            "exp_avg_sq")]
    assert sorted(header) == sorted(names + slots)
    assert "layers.0.bias" not in header and "layers.1.running_var" in header


def test_an_optimizer_is_not_restored_onto_a_network_with_other_settings():
    # the warm-start check compares the whole layer tree, not only the shapes
    # of the parameters: here only a Dropout inside the Residual differs
    net, opt = trained("float64", True)
    _, (_, payload) = opt.__reduce__()
    layers = every_layer_kind()
    layers[4] = bprop.Residual([bprop.Dense(6, 5, "tanh"), bprop.Dropout(0.5), bprop.Dense(5, 6)])
    other = bprop.Network(layers, dtype="float64")
    with pytest.raises(CheckpointError, match=r"the optimizer's network differs"):
        io._optimizer_from_checkpoint(other, payload)
    same = bprop.Network(every_layer_kind(), dtype="float64")
    restored = io._optimizer_from_checkpoint(same, payload)
    assert restored.state_dict()["step"] == 4

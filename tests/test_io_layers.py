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

import bprop
import numpy as np
import pytest
import safetensors.numpy
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
    _net, opt = trained("float64", True)  # opt holds only a weak reference to it
    _, (_, payload) = opt.__reduce__()
    layers = every_layer_kind()
    layers[4] = bprop.Residual([bprop.Dense(6, 5, "tanh"), bprop.Dropout(0.5), bprop.Dense(5, 6)])
    other = bprop.Network(layers, dtype="float64")
    with pytest.raises(CheckpointError, match=r"the optimizer's network differs"):
        io._optimizer_from_checkpoint(other, payload)
    same = bprop.Network(every_layer_kind(), dtype="float64")
    restored = io._optimizer_from_checkpoint(same, payload)
    assert restored.state_dict()["step"] == 4


# ---- damaged and hostile layer trees ----------------------------------------------------------

@pytest.fixture(scope="module")
def good():
    """Checkpoint bytes of a network of every layer kind, with Adam state."""
    net, opt = trained("float32", False)
    return io._encode("test", net, opt).to_bytes()


def _arch(fn):
    """An edit of the architecture tree, with the metadata digest made to match
    again, so that the tree itself has to be refused."""
    def edit(good):
        header, body = _split(good)
        meta = header["__metadata__"]
        tree = json.loads(meta["architecture"])
        tree = fn(tree) or tree
        meta["architecture"] = tree if isinstance(tree, str) else json.dumps(tree)
        meta["metadata_sha256"] = io._metadata_digest(meta, io._NETWORK_KEYS)
        return _join(header, body)
    return edit


def _meta(digest=True, **values):
    def edit(good):
        header, body = _split(good)
        meta = header["__metadata__"]
        for key, value in values.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value
        if digest:
            meta["metadata_sha256"] = io._metadata_digest(meta, io._NETWORK_KEYS)
        return _join(header, body)
    return edit


def _tensors(fn):
    """An edit of the tensors, with the tensor digest made to match again."""
    def edit(good):
        header, _ = _split(good)
        tensors = safetensors.numpy.load(good)
        fn(tensors)
        meta = dict(header["__metadata__"], sha256=io._digest(tensors))
        return safetensors.numpy.save(tensors, metadata=meta)
    return edit


def _set(*where, value):
    """Sets tree[where[0]][where[1]]... = value."""
    def fn(tree):
        node = tree
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
    return fn


def _nest(levels):
    def fn(tree):
        for _ in range(levels):
            tree[4] = {"kind": "Residual", "layers": [tree[4]]}
    return fn


def _rename(i, old, new):
    def fn(tree):
        tree[i][new] = tree[i].pop(old)
    return fn


IDENTITY = {"kind": "Activation", "activation": "identity", "negative_slope": 0.01}

HOSTILE = {
    # the tree: kinds, types, settings, widths, nesting
    "unknown kind": (_arch(_set(2, value={"kind": "Conv2d"})),
                     r"architecture layers.2 \(Conv2d\) does not build: .*unknown layer kind "
                     r"'Conv2d'"),
    "kind not a string": (_arch(_set(2, "kind", value=3)),
                          r"architecture layers.2 must be an object with a 'kind' string"),
    "layer not an object": (_arch(_set(3, value="Dropout")),
                            r"architecture layers.3 must be an object with a 'kind' string"),
    "tree not a list": (_arch(lambda t: {"kind": "Dense"}),
                        r"must be a non-empty list of layer descriptions"),
    "tree empty": (_arch(lambda t: t.clear()), r"must be a non-empty list of layer descriptions"),
    "tree not JSON": (_arch(lambda t: "[{"), r"the architecture metadata is not valid JSON"),
    "tree nests JSON too deeply": (_arch(lambda t: "[" * 100_000 + "]" * 100_000),
                                   r"the architecture metadata nests too deeply"),
    "in_features a string": (_arch(_set(0, "in_features", value="4")),
                             r"layers.0 \(Dense\) does not build: \[Dense\] in_features must be "
                             r"an int"),
    "in_features a float": (_arch(_set(0, "in_features", value=4.0)),
                            r"\[Dense\] in_features must be an int, but got float"),
    "in_features a bool": (_arch(_set(6, "in_features", value=True)),
                           r"\[Dense\] in_features must be an int, but got bool"),
    "bias an int": (_arch(_set(0, "bias", value=0)), r"\[Dense\] bias must be a bool"),
    "p a string": (_arch(_set(3, "p", value="0.25")), r"\[Dropout\] p must be a float"),
    "p out of range": (_arch(_set(3, "p", value=1.5)), r"\[Dropout\] p must be in \[0, 1\)"),
    "p an int": (_arch(_set(3, "p", value=0)),
                 r"architecture layers.3 \(Dropout\) is .*'p': 0\}, but its settings read back "
                 r"as .*'p': 0.0\}"),
    "momentum out of range": (_arch(_set(1, "momentum", value=2.0)),
                              r"\[BatchNorm\] momentum must be <= 1.0"),
    "eps negative": (_arch(_set(5, "eps", value=-1.0)), r"\[LayerNorm\] eps must be > 0.0"),
    "slope NaN": (_arch(_set(2, "negative_slope", value=float("nan"))),
                  r"\[Activation\] negative_slope must be finite"),
    "slope an int beyond float": (_arch(_set(2, "negative_slope", value=10**400)),
                                  r"architecture layers.2 \(Activation\) does not build"),
    "slope beyond float32": (_arch(_set(2, "negative_slope", value=1e39)),
                             r"the architecture does not build \(.*overflows float32"),
    "unknown setting": (_arch(_set(0, "init", value="he")),
                        r"layers.0 \(Dense\) does not build: .*settings .* do not fit"),
    "missing setting": (_arch(lambda t: t[0].pop("bias")),
                        r"layers.0 \(Dense\) has the keys \['activation', 'in_features', "
                        r"'kind', 'negative_slope', 'out_features'\], but a Dense is described "
                        r"by \['activation', 'bias', "),
    "constructor's name for a setting": (_arch(_rename(5, "affine", "elementwise_affine")),
                                         r"layers.5 \(LayerNorm\) has the keys"),
    "widths do not chain": (_arch(_set(6, "in_features", value=5)),
                            r"widths do not chain .*layers.6 \(Dense\) expects 5 input features, "
                            r"but the layer before it produces 6"),
    "no layer has a width": (_arch(lambda t: [{"kind": "Dropout", "p": 0.5}]),
                             r"no layer of the architecture has a width of its own"),
    "huge Dense": (_arch(_set(4, "layers", 0, "in_features", value=2**62)),
                   r"architecture layers.4.layers.0 \(Dense\) does not build: .*exceeds the "
                   r"limit"),
    "Residual changes the width": (_arch(_set(4, "layers", 2, "out_features", value=5)),
                                   r"widths do not chain .*layers.4 is a Residual whose layers "
                                   r"map 6 features to 5"),
    "Residual empty": (_arch(_set(4, "layers", value=[])),
                       r"architecture layers.4 \(Residual\) must be an object with the keys "
                       r"\['kind', 'layers'\], 'layers' a non-empty list"),
    "Residual layers an object": (_arch(_set(4, "layers", value={"0": IDENTITY})),
                                  r"layers.4 \(Residual\) must be an object with the keys"),
    "Residual with a setting": (_arch(_set(4, "p", value=0.5)),
                                r"layers.4 \(Residual\) must be an object with the keys"),
    "bad layer inside a Residual": (_arch(_set(4, "layers", 1, "kind", value="Dropout2d")),
                                    r"architecture layers.4.layers.1 \(Dropout2d\) does not build"),
    "Residuals nested absurdly deep": (_arch(_nest(40)), r"nests Residuals more than 32 deep"),
    "more than 100000 layers": (_arch(lambda t: t.extend([IDENTITY] * 100_000)),
                         r"the architecture has more than 100000 layers"),
    # tensors: parameters, buffers and optimizer slots the tree does not imply
    "missing buffer": (_tensors(lambda t: t.pop("layers.1.running_var")),
                       r"tensors \['layers.1.running_var'\] are missing"),
    "missing nested parameter": (_tensors(lambda t: t.pop("layers.4.layers.2.weight")),
                                 r"tensors \['layers.4.layers.2.weight'\] are missing"),
    "extra buffer": (_tensors(lambda t: t.update({"layers.5.running_mean":
                                                  np.zeros(6, np.float32)})),
                     r"unexpected tensor 'layers.5.running_mean'"),
    "bias of a Dense without bias": (_tensors(lambda t: t.update({"layers.0.bias":
                                                                  np.zeros(6, np.float32)})),
                                     r"unexpected tensor 'layers.0.bias'"),
    "optimizer state of a buffer": (_tensors(lambda t: t.update(
        {"optimizer.layers.1.running_mean.exp_avg": np.zeros(6, np.float32)})),
        r"unexpected tensor 'optimizer.layers.1.running_mean.exp_avg'"),
    "buffer of the wrong shape": (_tensors(lambda t: t.update({"layers.1.running_mean":
                                                               np.zeros(5, np.float32)})),
                                  r"tensor 'layers.1.running_mean' has shape \[5\], but the "
                                  r"architecture needs \[6\]"),
    "non-finite buffer": (_tensors(lambda t: t["layers.1.running_var"].__setitem__(0, np.inf)),
                          r"tensor 'layers.1.running_var' holds NaN or inf"),
    # the mode and the dropout clock
    "training not a bool": (_meta(training="yes"), r"training is 'yes', expected 'true' or"),
    "training missing": (_meta(training=None), r"the metadata lacks 'training'"),
    "dropout_seed missing": (_meta(dropout_seed=None), r"the metadata lacks 'dropout_seed'"),
    "dropout_seed negative": (_meta(dropout_seed="-1"), (r"dropout_seed is '-1', expected a "
                                                        r"decimal integer in \[0, 18446744073")),
    "dropout_seed 2**64": (_meta(dropout_seed=str(2**64)), r"dropout_seed is '18446744073709551616'"),
    "dropout_seed not decimal": (_meta(dropout_seed="\u0663"), r"dropout_seed is '\u0663'"),
    "dropout_seed huge": (_meta(dropout_seed="9" * 5000), r"dropout_seed is '99999"),
    "dropout_step 2**63": (_meta(dropout_step=str(2**63)),
                           r"dropout_step is '9223372036854775808', expected a decimal integer "
                           r"in \[0, 9223372036854775807\]"),
    "training edited": (_meta(digest=False, training="true"),
                        r"the digest of its metadata \(dtype, architecture, training, "
                        r"dropout_seed, dropout_step\) does not match metadata_sha256"),
    "dropout_step edited": (_meta(digest=False, dropout_step="5"),
                            r"the digest of its metadata .* does not match metadata_sha256"),
    # the optimizer's metadata, when it is not even a string (safetensors
    # metadata are strings; a hostile header need not be)
    "optimizer metadata a number": (_meta(optimizer=5), r"the optimizer metadata is not a string"),
    "optimizer class a list": (_meta(optimizer=json.dumps({"class": ["Adam"], "step": 4,
                                                           "hyperparameters": {}})),
                               r"unknown optimizer class \['Adam'\]"),
    "version-2 tree labelled version 1": (
        _meta(format_version="1"),
        r"architecture layer 0 must be an object with the keys \['activation', 'in_features', "
        r"'negative_slope', 'out_features'\]"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_damaged_layer_tree_raises_checkpoint_error(name, good, tmp_path):
    damage, match = HOSTILE[name]
    data = damage(good)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=match) as info:
        bprop.load(path, with_optimizer=True)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match=match):  # what unpickling decodes
        io._network_from_checkpoint(data)


def test_the_damaged_trees_are_damaged_only_where_they_say(good, tmp_path):
    # the edits themselves leave a good checkpoint loadable
    path = tmp_path / "good.safetensors"
    for edit in (_arch(lambda t: None), _meta(), _tensors(lambda t: None)):
        path.write_bytes(edit(good))
        assert_same_network(io._network_from_checkpoint(good), bprop.load(path))


def test_flipped_bits_in_a_layer_tree_checkpoint_raise_checkpoint_error(good, tmp_path):
    """Random damage to a checkpoint of every layer kind: each either raises
    CheckpointError or loads the very same network (damage to what the file does
    not mean, such as bprop_version)."""
    original = io._network_from_checkpoint(good)
    header_len = 8 + struct.unpack("<Q", good[:8])[0]
    rng = np.random.default_rng(12)
    path = tmp_path / "damaged.safetensors"
    loaded = 0
    for i in range(300):
        data = bytearray(good)
        end = header_len if i % 2 else len(data)  # half of them in the header
        for pos in rng.integers(0, end, rng.integers(1, 4)):
            data[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        try:
            net = bprop.load(path)
        except CheckpointError as exc:
            assert str(path) in str(exc)
            continue
        assert_same_network(original, net)
        loaded += 1
    assert loaded < 15


def nested(depth):
    """A network whose middle Dense is enclosed by `depth` Residuals."""
    inner = bprop.Dense(3, 3, "tanh")
    for _ in range(depth):
        inner = bprop.Residual([inner, bprop.Dropout(0.1)])
    return bprop.Network([bprop.Dense(2, 3), inner, bprop.Dense(3, 2)], seed=1)


def test_save_refuses_what_load_would_refuse(tmp_path):
    path = tmp_path / "deep.safetensors"
    net = nested(32)
    net.save(path)
    assert_same_network(net, bprop.load(path))
    assert_same_network(net, copy.deepcopy(net))
    net = nested(33)
    with pytest.raises(ValueError, match=r"\[save\] the network has 69 layers, nested in up to "
                                         r"33 Residuals; a checkpoint holds at most 100000 layers "
                                         r"nested in at most 32, so it is not saved"):
        net.save(path)
    with pytest.raises(ValueError, match=r"\[pickle\] .* so it is not pickled or copied"):
        copy.deepcopy(net)
    assert_same_network(nested(32), bprop.load(path))  # the file is as it was

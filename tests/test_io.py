"""Checkpoints: bitwise round trips, optimizer state, atomic writes, and every
kind of damaged or foreign file raising CheckpointError."""

from __future__ import annotations

import json
import os
import struct
import sys

import tracemalloc

import numpy as np
import pytest
import safetensors.numpy

import bprop
from bprop import io, optim
from bprop.io import CheckpointError

SPECS = [(5, 7, "leaky_relu", 0.2), (7, 6, "gelu"), (6, 3)]


def params_of(net):
    return [p.copy() for _, p, _ in net.parameters()]


def train_a_little(net, optimizer, rng, steps=3):
    X = rng.standard_normal((16, net.in_features))
    y = rng.integers(0, net.out_features, 16)
    bprop.fit(net, X, y, optimizer=optimizer, epochs=steps, batch_size=8, seed=0)
    return X, y


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_predict_is_bitwise_identical(dtype, make_network, rng, tmp_path):
    net = make_network(SPECS, dtype=dtype, seed=1)
    train_a_little(net, optim.Adam(net, lr=1e-2), rng)
    path = tmp_path / "model.safetensors"
    bprop.save(net, path)
    loaded = bprop.load(path)
    assert isinstance(loaded, bprop.Network) and loaded.dtype == net.dtype
    assert [L._description() for L in loaded.layers] == [L._description() for L in net.layers]
    for a, b in zip(params_of(net), params_of(loaded)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    X = rng.standard_normal((9, 5))
    np.testing.assert_array_equal(net.predict(X).view(np.uint8),
                                  loaded.predict(X).view(np.uint8))


def test_network_save_method_and_str_paths(make_network, tmp_path):
    net = make_network(SPECS)
    net.save(str(tmp_path / "a.safetensors"))
    loaded = bprop.load(str(tmp_path / "a.safetensors"))
    for a, b in zip(params_of(net), params_of(loaded)):
        np.testing.assert_array_equal(a, b)


def test_metadata_describes_the_network(make_network, tmp_path):
    net = make_network(SPECS, dtype="float32")
    path = tmp_path / "m.safetensors"
    bprop.save(net, path)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + size])["__metadata__"]
    assert meta["format"] == "bprop" and meta["format_version"] == "2"
    assert meta["dtype"] == "float32"
    assert json.loads(meta["architecture"])[0] == {"kind": "Dense", "in_features": 5,
                                                   "out_features": 7,
                                                   "activation": "leaky_relu",
                                                   "negative_slope": 0.2, "bias": True}
    assert (meta["training"], meta["dropout_seed"], meta["dropout_step"]) == (
        "true", str(net.dropout_seed), "0")
    assert "optimizer" not in meta
    assert b"pickle" not in data


OPTIMIZERS = [
    lambda n: optim.SGD(n, lr=0.1),
    lambda n: optim.SGD(n, lr=0.1, momentum=0.9, nesterov=True),
    lambda n: optim.Adam(n, lr=1e-2, betas=(0.8, 0.95)),
    lambda n: optim.AdamW(n, lr=1e-2),
    lambda n: optim.RMSprop(n, lr=1e-3, centered=True, momentum=0.5),
]


@pytest.mark.parametrize("make_opt", OPTIMIZERS)
def test_optimizer_state_round_trip_continues_bitwise(make_opt, make_network, rng, tmp_path):
    net = make_network(SPECS, seed=2)
    opt = make_opt(net)
    X, y = train_a_little(net, opt, rng)
    path = tmp_path / "ckpt.safetensors"
    net.save(path, optimizer=opt)
    loaded, loaded_opt = bprop.load(path, with_optimizer=True)
    assert type(loaded_opt) is type(opt) and loaded_opt.net is loaded
    assert loaded_opt.hyperparameters == opt.hyperparameters
    assert loaded_opt.step_count == opt.step_count
    for o in (opt, loaded_opt):
        bprop.fit(o.net, X, y, optimizer=o, epochs=2, batch_size=8, seed=1)
    for a, b in zip(params_of(net), params_of(loaded)):
        np.testing.assert_array_equal(a, b)
    # without with_optimizer the state is ignored
    assert isinstance(bprop.load(path), bprop.Network)


def test_with_optimizer_when_none_was_saved(make_network, tmp_path):
    path = tmp_path / "n.safetensors"
    bprop.save(make_network(SPECS), path)
    net, opt = bprop.load(path, with_optimizer=True)
    assert isinstance(net, bprop.Network) and opt is None


def test_save_checks_its_arguments(make_network, tmp_path):
    net = make_network(SPECS)
    with pytest.raises(TypeError, match=r"\[save\] net must be a bprop.Network"):
        bprop.save("net", tmp_path / "x")
    with pytest.raises(ValueError, match=r"\[save\] the optimizer is bound to another network"):
        bprop.save(net, tmp_path / "x", optimizer=optim.Adam(make_network(SPECS)))
    with pytest.raises(TypeError, match=r"\[save\] optimizer must be"):
        bprop.save(net, tmp_path / "x", optimizer="adam")
    net[0].weight[0, 0] = np.nan  # through the view, past Dense's own check
    with pytest.raises(ValueError, match=r"\[save\] layers.0.weight holds NaN or inf"):
        bprop.save(net, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# ---- atomic writes ------------------------------------------------------------------------------

def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_leaves_no_temporary_files_and_a_normal_mode(make_network, tmp_path):
    path = tmp_path / "model.safetensors"
    bprop.save(make_network(SPECS), path)
    bprop.save(make_network(SPECS, seed=3), path)  # overwrite
    assert _files(tmp_path) == ["model.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("target", ["replace", "fsync"])
def test_a_failed_save_leaves_the_previous_file(target, make_network, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    old = make_network(SPECS, seed=1)
    bprop.save(old, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(io.os, target, fail)
    with pytest.raises(OSError, match="simulated"):
        bprop.save(make_network(SPECS, seed=2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["model.safetensors"]
    for a, b in zip(params_of(old), params_of(bprop.load(path))):
        np.testing.assert_array_equal(a, b)


def test_an_interrupted_first_save_leaves_nothing(make_network, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        bprop.save(make_network(SPECS), tmp_path / "model.safetensors")
    assert _files(tmp_path) == []


# ---- damaged and foreign files ----------------------------------------------------------------

@pytest.fixture
def good(make_network, tmp_path):
    net = make_network(SPECS, dtype="float32", seed=5)
    path = tmp_path / "good.safetensors"
    bprop.save(net, path, optimizer=optim.Adam(net))
    return path.read_bytes()


def _split(data):
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def _join(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _rewrite(good, tensors_fn=None, meta_fn=None, digest=True):
    """Decodes a good checkpoint, edits its tensors/metadata, writes it again
    (with a matching digest unless digest=False)."""
    header, _ = _split(good)
    meta = dict(header["__metadata__"])
    tensors = safetensors.numpy.load(good)
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    if digest:
        meta["sha256"] = io._digest(tensors)
    return safetensors.numpy.save(tensors, metadata=meta)


def _edit_header(good, fn):
    header, body = _split(good)
    fn(header)
    return _join(header, body)


def _flip_data_byte(good):
    header, body = _split(good)
    body = bytearray(body)
    body[len(body) // 2] ^= 0x10
    return _join(header, bytes(body))


CORRUPTIONS = {
    "empty file": (lambda g: b"", r"has 0 bytes, too few for a safetensors header"),
    "truncated size field": (lambda g: g[:5], r"too few for a safetensors header"),
    "truncated header": (lambda g: g[:40], r"the header claims \d+ bytes, but the file has 32"),
    "truncated data": (lambda g: g[:-7], r"data offsets .* do not fit"),
    "random bytes": (lambda g: np.random.default_rng(0).bytes(4096),
                     r"the header claims \d+ bytes"),
    "header size too large": (lambda g: struct.pack("<Q", 2**62) + g[8:],
                              r"the header claims 4611686018427387904 bytes"),
    "header not json": (lambda g: g[:8] + b"x" + g[9:], r"the header is not valid JSON"),
    "header not an object": (lambda g: _join([1, 2], b""), r"the header is not a JSON object"),
    "corrupted header byte": (lambda g: g[:20] + bytes([g[20] ^ 0xFF]) + g[21:],
                              r"the header is not valid JSON"),
    "flipped data bit": (_flip_data_byte, r"sha256 digest .* does not match"),
    "foreign safetensors": (lambda g: safetensors.numpy.save({"w": np.ones((2, 2))}),
                            r"no format='bprop' entry"),
    "foreign metadata": (lambda g: safetensors.numpy.save({"w": np.ones(2)},
                                                          metadata={"format": "pt"}),
                         r"no format='bprop' entry"),
    "future version": (lambda g: _rewrite(g, meta_fn=lambda m: m.update(format_version="3")),
                       r"format_version '3' is not supported"),
    "no architecture": (lambda g: _rewrite(g, meta_fn=lambda m: m.pop("architecture")),
                        r"the metadata lacks 'architecture'"),
    "architecture not json": (lambda g: _rewrite(g, meta_fn=lambda m: m.update(
        architecture="[{")), r"architecture metadata is not valid JSON"),
    "unknown activation": (lambda g: _rewrite(g, meta_fn=lambda m: m.update(
        architecture=m["architecture"].replace("gelu", "swish"))),
        r"architecture layers.1 \(Dense\) does not build: \[Dense\] activation must be one of "
        r".*, but got 'swish'"),
    "widths do not chain": (lambda g: _rewrite(g, meta_fn=lambda m: m.update(
        architecture=m["architecture"].replace('"in_features": 6', '"in_features": 4'))),
        r"widths do not chain .*layers.2 \(Dense\) expects 4 input features, but the layer "
        r"before it produces 6"),
    "bad dtype": (lambda g: _rewrite(g, meta_fn=lambda m: m.update(dtype="float16")),
                  r"dtype 'float16' is not"),
    "wrong tensor shape": (lambda g: _rewrite(g, tensors_fn=lambda t: t.update(
        {"layers.1.weight": np.zeros((6, 7), np.float32)})),
        r"tensor 'layers.1.weight' has shape \[6, 7\], but the architecture needs \[7, 6\]"),
    "wrong tensor dtype": (lambda g: _rewrite(g, tensors_fn=lambda t: t.update(
        {"layers.0.bias": np.zeros(7, np.float64)})),
        r"tensor 'layers.0.bias' has dtype 'F64', expected F32"),
    "missing tensor": (lambda g: _rewrite(g, tensors_fn=lambda t: t.pop("layers.2.bias")),
                       r"tensors \['layers.2.bias'\] are missing"),
    "extra tensor": (lambda g: _rewrite(g, tensors_fn=lambda t: t.update(
        {"layers.3.weight": np.zeros(2, np.float32)})),
        r"unexpected tensor 'layers.3.weight'"),
    "non-finite weight": (lambda g: _rewrite(g, tensors_fn=lambda t: t["layers.0.weight"]
                                             .__setitem__((0, 0), np.inf)),
                          r"tensor 'layers.0.weight' holds NaN or inf"),
    "digest missing": (lambda g: _rewrite(g, meta_fn=lambda m: m.pop("sha256"), digest=False),
                       r"the metadata lacks 'sha256'"),
    "overlapping offsets": (lambda g: _edit_header(g, lambda h: h["layers.0.bias"].update(
        data_offsets=h["layers.0.weight"]["data_offsets"])), r"data offsets .* do not fit"),
    "unknown optimizer": (lambda g: _rewrite(g, meta_fn=lambda m: m.update(
        optimizer=m["optimizer"].replace("Adam", "Lion"))), r"unknown optimizer class 'Lion'"),
    "optimizer metadata broken": (lambda g: _rewrite(g, meta_fn=lambda m: m.update(
        optimizer="{}")), r"the optimizer metadata must be an object"),
    "optimizer state without optimizer": (lambda g: _rewrite(
        g, meta_fn=lambda m: m.pop("optimizer")), r"is optimizer state, but the metadata"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_damaged_checkpoint_raises_checkpoint_error(name, good, tmp_path):
    damage, match = CORRUPTIONS[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(good))
    with pytest.raises(CheckpointError, match=match) as info:
        bprop.load(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(optimizer=m["optimizer"].replace('"step": 0', '"step": -4')),
     r"the optimizer state does not load.*step must be an int >= 0"),
    (lambda m: m.update(optimizer=m["optimizer"].replace('"eps"', '"epsilon"')),
     r"the optimizer state does not load"),
])
def test_damaged_optimizer_state_raises_checkpoint_error(edit, match, good, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_rewrite(good, meta_fn=edit))
    bprop.load(path)  # the network alone still loads
    with pytest.raises(CheckpointError, match=match):
        bprop.load(path, with_optimizer=True)


def test_every_truncation_is_caught(good, tmp_path):
    path = tmp_path / "cut.safetensors"
    for cut in range(0, len(good), max(1, len(good) // 97)):
        path.write_bytes(good[:cut])
        with pytest.raises(CheckpointError):
            bprop.load(path)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        bprop.load(tmp_path / "nope.safetensors")


def test_checkpoints_need_no_safetensors_package(make_network, tmp_path, monkeypatch):
    """bprop writes and reads the format itself: saving, loading and pickling work
    without the optional safetensors package (pickling a network must not need it)."""
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    net = make_network(SPECS)
    bprop.save(net, tmp_path / "x")
    for a, b in zip(params_of(net), params_of(bprop.load(tmp_path / "x"))):
        np.testing.assert_array_equal(a, b)


def test_the_files_are_safetensors_files(make_network, tmp_path):
    """bprop writes the format itself: the safetensors package reads the same tensors
    and metadata, and writes the same data section and header (keys in any order)."""
    net = make_network(SPECS, dtype="float32", seed=6)
    opt = optim.RMSprop(net, centered=True)
    path = tmp_path / "m.safetensors"
    bprop.save(net, path, optimizer=opt)
    data = path.read_bytes()
    header, body = _split(data)
    tensors = safetensors.numpy.load(data)
    assert sorted(tensors) == sorted(k for k in header if k != "__metadata__")
    for name, p, _ in net.parameters():
        np.testing.assert_array_equal(tensors[name], p)
    theirs = safetensors.numpy.save(tensors, metadata=header["__metadata__"])
    their_header, their_body = _split(theirs)
    assert their_header == header and their_body == body
    assert len(data) == len(theirs) and (len(data) - len(body)) % 8 == 0


def test_load_reads_the_tensors_into_place_without_a_second_copy(tmp_path):
    """Issue 10: the tensors are read straight into the new network's parameters (and,
    with with_optimizer, into the new optimizer's state); optimizer state that is not
    wanted only passes through the digest, 4 MiB at a time. NumPy's allocations while
    loading (tracemalloc; the network's own storage is the core's) stay far below the
    file's size: they were the whole file, and twice the optimizer state, before."""
    net = bprop.Network([bprop.Dense(512, 1024, activation="relu"), bprop.Dense(1024, 1024)],
                        seed=0)
    opt = bprop.optim.Adam(net, lr=1e-3)
    X = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    net.train_step(X, np.zeros((16, 1024), np.float32), loss="mean_squared_error",
                   optimizer=opt)
    path = tmp_path / "net.bprop"
    bprop.save(net, path, optimizer=opt)
    size = path.stat().st_size  # parameters, exp_avg and exp_avg_sq: ~19 MB
    state_bytes = sum(a.nbytes for slots in opt.state_dict()["state"].values()
                      for a in slots.values())

    tracemalloc.start()
    try:
        alone = bprop.load(path)
        _, peak_alone = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded, loaded_opt = bprop.load(path, with_optimizer=True)
        _, peak_with = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_alone < 0.4 * size, (peak_alone, size)
    assert peak_with < state_bytes + 0.4 * (size - state_bytes) + (1 << 20), (peak_with, size)
    for other in (alone, loaded):
        for (_, p, _), (_, q, _) in zip(net.parameters(), other.parameters()):
            assert np.array_equal(p, q)
    assert loaded_opt.step_count == opt.step_count
    for name, slots in opt.state_dict()["state"].items():
        for k, a in slots.items():
            assert np.array_equal(loaded_opt.state_dict()["state"][name][k], a)

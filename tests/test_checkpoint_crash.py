"""Crash-safe checkpoints (issue 5, item 6).

* A process that saves over and over is killed with SIGKILL at 50 random
  moments: the file on disk is always either the last checkpoint whose save
  returned or the one being written, complete and loadable. A killed save
  cannot remove its temporary file; the next save to the same path does (see
  bprop.io: a writer holds an flock on its temporary file, so a file nobody
  holds a lock on is stale), and load never reads them.
* Over 1000 damaged files (random bit flips anywhere or in the header,
  truncations, edited header sizes, shapes and architectures whose sizes
  overflow, deep JSON, foreign bytes) each raise bprop.CheckpointError, or, if
  the damage changed nothing that the checkpoint means (a byte of the
  bprop_version string), load bitwise the saved network. Nothing is allocated
  from a declared size before it is checked against the file: loading a file
  that declares a 2**62-byte header or a (2**32, 2**32) weight allocates no
  more than the file's size.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import bprop
from bprop import optim
from bprop.io import CheckpointError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")

TEMPORARY = re.compile(r"\.model\.safetensors\.[a-z0-9_]{8}\.tmp")

# A process that imports bprop once and then, per request on stdin, forks a child
# that saves a ~1 MB network over and over (all weights equal to k, k counting up
# from the requested start) and kills that child after the requested delay. It
# answers with the last k whose save returned, as the child reported it.
ZYGOTE = textwrap.dedent("""
    import os, signal, sys, time
    import bprop
    path = sys.argv[1]
    net = bprop.Network([bprop.Dense(256, 256), bprop.Dense(256, 256), bprop.Dense(256, 10)],
                        dtype="float64", seed=0)
    params = [p for _, p, _ in net.parameters()]
    print("ready", flush=True)
    for line in sys.stdin:
        start, delay = line.split()
        start, delay = int(start), float(delay)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                k = start
                while True:
                    for p in params:
                        p[...] = k
                    bprop.save(net, path)
                    os.write(w, b"%d\\n" % k)
                    k += 1
            finally:
                os._exit(1)
        os.close(w)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done = [int(x) for x in os.read(r, 1 << 20).split()]
        while True:  # the rest of the pipe, if any
            more = os.read(r, 1 << 20)
            if not more:
                break
            done += [int(x) for x in more.split()]
        os.close(r)
        print(done[-1] if done else -1, flush=True)
""")


def _k_of(path):
    """The k of the checkpoint at path: all its weights must equal one number."""
    net = bprop.load(path)
    values = np.unique(np.concatenate([p.ravel() for _, p, _ in net.parameters()]))
    assert values.size == 1, f"a torn checkpoint: weights {values[:5]}..."
    return int(values[0])


def test_saves_killed_at_random_moments_leave_a_whole_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    initial = bprop.Network([bprop.Dense(256, 256), bprop.Dense(256, 256), bprop.Dense(256, 10)],
                            dtype="float64", seed=0)
    for _, p, _ in initial.parameters():
        p[...] = 0
    bprop.save(initial, path)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")  # a process without threads forks safely
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    rng = np.random.default_rng(0)
    previous = 0
    in_flight = 0
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for round_ in range(50):
            start = (round_ + 1) * 100_000
            # from right after the fork to a few saves later (a save takes ~15 ms here)
            delay = float(rng.uniform(0.0, 0.06))
            zygote.stdin.write(f"{start} {delay}\n")
            zygote.stdin.flush()
            last_done = int(zygote.stdout.readline())
            k = _k_of(path)
            if last_done < 0:
                # killed before its first save returned: the previous checkpoint, or the
                # first one of this round if its rename had happened
                assert k in (previous, start), (round_, k, previous)
            else:
                # the last save that returned, or the next one if it got as far as the rename
                assert k in (last_done, last_done + 1), (round_, k, last_done)
            in_flight += k != last_done and k != previous
            previous = k
            # at most the killed save's temporary file is left; the earlier ones were
            # removed by the saves that followed them
            names = os.listdir(tmp_path)
            stray = [n for n in names if n != "model.safetensors"]
            assert len(stray) <= 1 and all(TEMPORARY.fullmatch(n) for n in stray), names
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait()
        zygote.stdout.close()
    # the next save in this folder removes the killed save's temporary file
    bprop.save(initial, path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert _k_of(path) == 0


def test_a_live_saves_temporary_file_is_not_taken_for_stale(tmp_path, monkeypatch):
    """The cleanup removes only files nobody holds a lock on."""
    from bprop import io

    path = tmp_path / "model.safetensors"
    net = bprop.Network([bprop.Dense(3, 2)], seed=0)
    seen = []
    real_replace = os.replace

    def replace_after_another_save(src, dst):
        # while this save's temporary file exists and is locked, another save runs
        # its cleanup in the same folder
        if not seen:
            seen.append(src)
            io._remove_stale_temporaries(str(tmp_path), ".model.safetensors.")
            assert os.path.exists(src)
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace_after_another_save)
    bprop.save(net, path)
    assert seen and os.listdir(tmp_path) == ["model.safetensors"]
    # and a stale one (no lock) is removed; other hidden files are left alone
    (tmp_path / ".model.safetensors.abcd1234.tmp").write_bytes(b"partial")
    (tmp_path / ".model.safetensors.notours.tmp").write_bytes(b"other")
    (tmp_path / ".other.safetensors.abcd1234.tmp").write_bytes(b"other")
    bprop.save(net, path)
    assert sorted(os.listdir(tmp_path)) == [".model.safetensors.notours.tmp",
                                            ".other.safetensors.abcd1234.tmp",
                                            "model.safetensors"]


# ---- damaged files --------------------------------------------------------------------------

SPECS = [(5, 7, "leaky_relu", 0.2), (7, 6, "gelu"), (6, 3)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A float32 checkpoint with Adam state: (bytes, network, optimizer)."""
    net = bprop.Network([bprop.Dense(*s[:3], **({"negative_slope": s[3]} if len(s) > 3 else {}))
                         for s in SPECS], dtype="float32", seed=5)
    opt = optim.Adam(net, lr=1e-2)
    rng = np.random.default_rng(0)
    bprop.fit(net, rng.standard_normal((16, 5)), rng.integers(0, 3, 16), optimizer=opt,
              epochs=2, batch_size=8, seed=0)
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    bprop.save(net, path, optimizer=opt)
    return path.read_bytes(), net, opt


def _split(data):
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def _join(header, body, size=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if size is None else size) + raw + body


def _edit(good, fn):
    header, body = _split(good)
    fn(header)
    return _join(header, body)


def _edit_meta(key, fn):
    def edit(header):
        meta = header["__metadata__"]
        meta[key] = json.dumps(fn(json.loads(meta[key])))
    return edit


def _set_layer(i, **values):
    def fn(layers):
        layers[i].update(values)
        return layers
    return fn


def _header_edits(good):
    """Edits of the JSON header that keep it valid JSON of the right size."""
    header, _ = _split(good)
    weight0 = header["layers.0.weight"]
    edits = {
        "shape-overflows-int64": lambda h: h["layers.0.weight"].update(shape=[2**32, 2**32]),
        "shape-huge": lambda h: h["layers.0.weight"].update(shape=[2**62, 4]),
        "shape-negative": lambda h: h["layers.0.weight"].update(shape=[-5, -7]),
        "shape-float": lambda h: h["layers.0.weight"].update(shape=[5.0, 7.0]),
        "shape-nested": lambda h: h["layers.0.weight"].update(shape=[[5], [7]]),
        "shape-missing": lambda h: h["layers.0.weight"].pop("shape"),
        "offsets-huge": lambda h: h["layers.0.weight"].update(data_offsets=[0, 2**63]),
        "offsets-reversed": lambda h: h["layers.0.weight"].update(
            data_offsets=weight0["data_offsets"][::-1]),
        "offsets-negative": lambda h: h["layers.0.weight"].update(data_offsets=[-140, 0]),
        "offsets-strings": lambda h: h["layers.0.weight"].update(data_offsets=["0", "140"]),
        "dtype-F16": lambda h: h["layers.0.weight"].update(dtype="F16"),
        "entry-not-object": lambda h: h.update({"layers.0.weight": [1, 2]}),
        "metadata-not-object": lambda h: h.update(__metadata__=["bprop"]),
        "metadata-numbers": lambda h: h["__metadata__"].update(dtype=32),
        "architecture-huge-consistent": lambda h: (
            _edit_meta("architecture", _set_layer(0, in_features=2**32, out_features=2**32))(h),
            h["layers.0.weight"].update(shape=[2**32, 2**32], data_offsets=[0, 2**66])),
        "architecture-in-2**62": _edit_meta("architecture", _set_layer(0, in_features=2**62)),
        "architecture-in-0": _edit_meta("architecture", _set_layer(0, in_features=0)),
        "architecture-in-bool": _edit_meta("architecture", _set_layer(0, in_features=True)),
        "architecture-slope-nan": lambda h: h["__metadata__"].update(
            architecture=h["__metadata__"]["architecture"].replace("0.2", "NaN")),
        "architecture-slope-changed": _edit_meta("architecture",
                                                 _set_layer(0, negative_slope=0.3)),
        "architecture-activation-changed": _edit_meta("architecture",
                                                      _set_layer(1, activation="tanh")),
        "architecture-deep": lambda h: h["__metadata__"].update(
            architecture="[" * 100_000 + "]" * 100_000),
        "architecture-empty": lambda h: h["__metadata__"].update(architecture="[]"),
        "dtype-changed": lambda h: h["__metadata__"].update(dtype="float64"),
        "metadata-digest-edited": lambda h: h["__metadata__"].update(
            metadata_sha256="0" * 64),
        "metadata-digest-missing": lambda h: h["__metadata__"].pop("metadata_sha256"),
        "optimizer-lr-changed": _edit_meta("optimizer", lambda o: dict(
            o, hyperparameters=dict(o["hyperparameters"], lr=0.5))),
        "optimizer-step-huge": _edit_meta("optimizer", lambda o: dict(o, step=2**70)),
        "optimizer-deep": lambda h: h["__metadata__"].update(optimizer="{" * 50_000),
        "tensor-renamed": lambda h: h.update({"layers.9.weight": h.pop("layers.0.weight")}),
        "tensor-duplicated-range": lambda h: h["layers.0.bias"].update(
            data_offsets=h["layers.1.bias"]["data_offsets"]),
    }
    return edits


def _mutations(good, rng):
    """(kind, bytes) for over 1000 damaged versions of a good checkpoint."""
    header, body = _split(good)
    header_len = 8 + struct.unpack("<Q", good[:8])[0]
    out = []
    for _ in range(450):  # random bit flips anywhere
        data = bytearray(good)
        for pos in rng.integers(0, len(data), rng.integers(1, 9)):
            data[pos] ^= 1 << int(rng.integers(0, 8))
        out.append(("flip", bytes(data)))
    for _ in range(250):  # flips in the header: JSON, names, numbers, metadata
        data = bytearray(good)
        for pos in rng.integers(0, header_len, rng.integers(1, 4)):
            data[pos] ^= 1 << int(rng.integers(0, 8))
        out.append(("header-flip", bytes(data)))
    for cut in rng.choice(len(good), 150, replace=False):  # truncations
        out.append(("truncate", good[:cut]))
    sizes = [0, 1, 7, 2**31, 2**32 + 5, 2**62, 2**63, 2**64 - 1, header_len - 9, header_len - 7,
             len(good), len(good) - 8]
    sizes += [int(s) for s in rng.integers(0, 2**63, 28, dtype=np.uint64)]
    for size in sizes:  # the 8-byte header size
        out.append(("header-size", struct.pack("<Q", size) + good[8:]))
    for name, edit in _header_edits(good).items():
        out.append((f"edit:{name}", _edit(good, edit)))
    for _ in range(60):  # random bytes of one of the other kinds
        n = int(rng.integers(0, 4096))
        out.append(("random", rng.bytes(n)))
    for _ in range(40):  # a JSON header of the right size around random garbage
        raw = rng.bytes(int(rng.integers(1, 300)))
        out.append(("garbage-header", struct.pack("<Q", len(raw)) + raw + body))
    out.append(("empty", b""))
    out.append(("size-field-only", struct.pack("<Q", 2)))
    deep = b"[" * 200_000 + b"]" * 200_000
    out.append(("deep-json", struct.pack("<Q", len(deep)) + deep))
    out.append(("appended", good + b"\0" * 100))
    return out


def _same_checkpoint(net, opt, loaded, loaded_opt):
    if [L._description() for L in loaded.layers] != [L._description() for L in net.layers]:
        return False
    if loaded.dtype != net.dtype:
        return False
    for (_, a, _), (_, b, _) in zip(net.parameters(), loaded.parameters()):
        if a.tobytes() != b.tobytes():
            return False
    if loaded_opt is None:
        return True
    sd, ld = opt.state_dict(), loaded_opt.state_dict()
    if (type(loaded_opt) is not type(opt) or sd["step"] != ld["step"]
            or sd["hyperparameters"] != ld["hyperparameters"]):
        return False
    return all(sd["state"][p][k].tobytes() == ld["state"][p][k].tobytes()
               for p in sd["state"] for k in sd["state"][p])


def test_over_1000_damaged_files_raise_checkpoint_error(saved, tmp_path):
    good, net, opt = saved
    rng = np.random.default_rng(11)
    cases = _mutations(good, rng)
    assert len(cases) >= 1000
    path = tmp_path / "damaged.safetensors"
    loaded_unchanged = []
    for i, (kind, data) in enumerate(cases):
        path.write_bytes(data)
        with_optimizer = bool(i % 2)
        try:
            result = bprop.load(path, with_optimizer=with_optimizer)
        except CheckpointError as exc:
            assert str(path) in str(exc), (kind, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - any other type is the failure
            pytest.fail(f"case {i} ({kind}): {type(exc).__name__}: {exc}")
        loaded, loaded_opt = result if with_optimizer else (result, None)
        assert _same_checkpoint(net, opt, loaded, loaded_opt), (
            f"case {i} ({kind}) loaded a different network instead of raising")
        loaded_unchanged.append(kind)
    # only damage to what the checkpoint does not mean can load (bprop_version, ...)
    assert len(loaded_unchanged) < len(cases) // 20, loaded_unchanged


@pytest.mark.parametrize("name", ["shape-overflows-int64", "shape-huge", "offsets-huge",
                                  "architecture-huge-consistent", "architecture-in-2**62"])
def test_declared_sizes_allocate_nothing_before_they_are_checked(saved, tmp_path, name):
    good, _, _ = saved
    path = tmp_path / "huge.safetensors"
    path.write_bytes(_edit(good, _header_edits(good)[name]))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"is not a valid bprop checkpoint"):
            bprop.load(path, with_optimizer=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(good) + (1 << 20), peak


def test_a_huge_declared_header_size_is_refused_before_reading(saved, tmp_path):
    good, _, _ = saved
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + good[8:])
    with pytest.raises(CheckpointError, match=r"the header claims 4611686018427387904 bytes"):
        bprop.load(path)


def test_a_changed_slope_or_lr_is_detected_by_the_metadata_digests(saved, tmp_path):
    """Before the metadata digests an edited negative_slope loaded silently."""
    good, _, _ = saved
    edits = _header_edits(good)
    path = tmp_path / "edited.safetensors"
    path.write_bytes(_edit(good, edits["architecture-slope-changed"]))
    with pytest.raises(CheckpointError, match=r"digest of its metadata \(dtype, architecture, "
                                              r".*\) does not match metadata_sha256"):
        bprop.load(path)
    path.write_bytes(_edit(good, edits["optimizer-lr-changed"]))
    bprop.load(path)  # the network alone is intact
    with pytest.raises(CheckpointError, match=r"digest of its optimizer metadata does not match"):
        bprop.load(path, with_optimizer=True)

"""bprop.load on paths that are not checkpoints: it checks before it reads.

Issue 10, item 3: a symlink to /dev/zero was read until memory ran out
(MemoryError after 12.8 s at 5.9 GB), a FIFO blocked forever, a directory gave a
bare IsADirectoryError, and a 2 GB file whose header claims 1e5 x 1e5 tensors
was read whole (4.6 s, 2 GB) before it was refused. Each now raises
CheckpointError naming the path and the reason, at once, with memory bounded by
the header.

Each hostile load runs in a child process, with a timeout (a FIFO that blocks
cannot hang the suite) and an address-space limit 512 MiB above what the child
holds after import (reading /dev/zero fails fast instead of filling the
machine). The bounds asserted here are generous so that a loaded machine cannot
make them flake; the figures themselves (time, tracemalloc peak, growth of the
peak RSS) are printed by

    python tests/test_load_hostile.py
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
from io import BytesIO

import bprop
import numpy as np
import pytest
from bprop import io
from bprop.io import CheckpointError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="FIFOs, /dev/zero and /proc are Linux's")

CHILD = r"""
import json, os, resource, sys, time, tracemalloc
import bprop

case, path = sys.argv[1], sys.argv[2]
if case == "fifo-swapped-in":
    # the path is a FIFO, but stat says "regular file": as if it were swapped in
    # between load's stat and its open; the open must not block, fstat must refuse
    real_stat, regular = os.stat, sys.argv[3]
    os.stat = lambda p, *a, **k: real_stat(regular if p == path else p, *a, **k)
with open("/proc/self/statm") as f:
    held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (held + (512 << 20), hard))
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
start = time.perf_counter()
try:
    bprop.load(path)
    error, message = None, ""
except BaseException as exc:
    error, message = type(exc).__name__, str(exc)
seconds = time.perf_counter() - start
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
print(json.dumps({"error": error, "message": message, "seconds": seconds,
                  "tracemalloc_peak": peak, "rss_growth": rss_growth}))
"""

SPARSE_SIZE = 2 << 30
HUGE = 100_000


def _header(tensors, meta):
    raw = json.dumps({"__metadata__": meta, **tensors}).encode()
    return struct.pack("<Q", len(raw)) + raw


def _huge_header():
    """A well-formed bprop header for one 100000 x 100000 float32 layer: 40 GB of
    declared data, consistent with itself."""
    n = HUGE * HUGE * 4
    arch = [{"in_features": HUGE, "out_features": HUGE, "activation": "identity",
             "negative_slope": 0.01}]
    meta = {"format": "bprop", "format_version": "1", "dtype": "float32",
            "architecture": json.dumps(arch), "sha256": "0" * 64}
    return _header({"layers.0.weight": {"dtype": "F32", "shape": [HUGE, HUGE],
                                        "data_offsets": [0, n]},
                    "layers.0.bias": {"dtype": "F32", "shape": [HUGE],
                                      "data_offsets": [n, n + 4 * HUGE]}}, meta)


def make_case(case, folder):
    """Creates the hostile path of `case` in `folder`: (path, extra child args,
    regex the message must match)."""
    path = os.path.join(folder, "model.safetensors")
    extra = []
    if case == "fifo":
        os.mkfifo(path)
        match = r"it is a FIFO \(named pipe\), not a regular file"
    elif case == "dev-zero":
        os.symlink("/dev/zero", path)
        match = r"it is a symlink to /dev/zero, which is a character device, not a regular file"
    elif case == "directory":
        os.mkdir(path)
        match = r"it is a directory, not a regular file"
    elif case == "sparse-2GB-huge-tensors":
        with open(path, "wb") as f:
            f.write(_huge_header())
            f.truncate(SPARSE_SIZE)
        match = (r"tensor 'layers.0.(weight|bias)' has data offsets \[\d+, \d+\] that do not "
                 r"fit its shape or the file's \d+ data bytes")
    elif case == "sparse-2GB-header-size-1.5GB":
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", 3 << 29))
            f.truncate(SPARSE_SIZE)
        match = r"the header claims 1610612736 bytes, more than safetensors' limit of 104857600"
    elif case == "fifo-swapped-in":
        os.mkfifo(path)
        regular = os.path.join(folder, "regular")
        with open(regular, "wb") as f:
            f.write(b"x" * 100)
        extra = [regular]
        match = r"it is a FIFO \(named pipe\), not a regular file"
    else:
        raise ValueError(case)
    return path, extra, match


CASES = ["fifo", "dev-zero", "directory", "sparse-2GB-huge-tensors",
         "sparse-2GB-header-size-1.5GB", "fifo-swapped-in"]


def run_case(case, folder, timeout=60.0):
    """Loads the hostile path of `case` in a child process: (result dict, path, match)."""
    path, extra, match = make_case(case, folder)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, case, path, *extra],
                             capture_output=True, text=True, timeout=timeout, env=env,
                             check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: bprop.load did not return within {timeout} s")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), path, match


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_path_is_refused_at_once_with_bounded_memory(case, tmp_path):
    result, path, match = run_case(case, str(tmp_path))
    assert result["error"] == "CheckpointError", result
    assert result["message"].startswith(f"[load] {path} is not a valid bprop checkpoint: ")
    assert re.search(match, result["message"]), result["message"]
    # the figure is 0.1 s; measured ~1 ms (see the module docstring)
    assert result["seconds"] < 5.0, result
    assert result["tracemalloc_peak"] < 4 << 20, result
    assert result["rss_growth"] < 64 << 20, result


def test_a_symlink_to_a_checkpoint_loads(make_network, tmp_path):
    net = make_network([(4, 3, "tanh"), (3, 2)])
    bprop.save(net, tmp_path / "real.safetensors")
    os.symlink(tmp_path / "real.safetensors", tmp_path / "link.safetensors")
    loaded = bprop.load(tmp_path / "link.safetensors")
    for (_, a, _), (_, b, _) in zip(net.parameters(), loaded.parameters()):
        np.testing.assert_array_equal(a, b)


def test_a_socket_is_refused(tmp_path):
    # a short folder: a unix socket's path is limited to ~100 bytes
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "s")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            with pytest.raises(CheckpointError, match=r"it is a socket, not a regular file"):
                bprop.load(path)


def test_a_missing_path_is_still_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        bprop.load(tmp_path / "nope")
    os.symlink(tmp_path / "nope", tmp_path / "dangling")
    with pytest.raises(FileNotFoundError):
        bprop.load(tmp_path / "dangling")


# ---- files that shrink, or lie about their sizes, while they are read ------------------

@pytest.fixture
def good(make_network):
    net = make_network([(5, 7, "relu"), (7, 3)], dtype="float32", seed=4)
    return io._encode("test", net, bprop.optim.Adam(net)).to_bytes()


def test_a_file_shorter_than_its_stat_is_a_checkpoint_error(good):
    # the size comes from fstat; the file is then cut before its data are read
    with pytest.raises(CheckpointError, match=r"the file ended 7 bytes short of the end of "
                                              r"tensor '[\w.]+' \(it shrank while it was read"):
        io._decode("shrunk", BytesIO(good[:-7]), len(good), False)
    (n,) = struct.unpack("<Q", good[:8])
    with pytest.raises(CheckpointError, match=rf"the file ended after 10 of the header's {n} "
                                              r"bytes"):
        io._decode("shrunk", BytesIO(good[:18]), len(good), False)
    with pytest.raises(CheckpointError, match=r"ended within the header size field"):
        io._decode("shrunk", BytesIO(good[:5]), len(good), False)


def _edit(good, fn, pad=b""):
    (n,) = struct.unpack("<Q", good[:8])
    header, body = json.loads(good[8:8 + n]), good[8 + n:]
    fn(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body + pad


def _last_tensor(header):
    return max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][0])


@pytest.mark.parametrize("damage,match", [
    (lambda g: g[:-1], r"data offsets .* do not fit its shape or the file's \d+ data bytes"),
    (lambda g: struct.pack("<Q", len(g)) + g[8:],
     r"the header claims \d+ bytes, but the file has \d+ after the size field"),
    (lambda g: _edit(g, lambda h: h[_last_tensor(h)].update(
        data_offsets=[o + 8 for o in h[_last_tensor(h)]["data_offsets"]])),
     r"data offsets .* do not fit"),
    (lambda g: _edit(g, lambda h: h[_last_tensor(h)].update(
        data_offsets=[o + 8 for o in h[_last_tensor(h)]["data_offsets"]]), pad=b"\0" * 8),
     r"leaves a gap of 8 bytes after the tensor before it"),
    (lambda g: _edit(g, lambda h: h["optimizer.layers.0.weight.exp_avg_sq"].update(
        data_offsets=h["optimizer.layers.0.weight.exp_avg"]["data_offsets"])),
     r"overlaps the tensor before it"),
    (lambda g: _edit(g, lambda h: None, pad=b"\0" * 4),
     r"the file has 4 bytes after the last tensor"),
])
def test_sizes_that_do_not_fit_the_file_are_refused_before_reading(damage, match, good,
                                                                    tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(good))
    with pytest.raises(CheckpointError, match=match) as info:
        bprop.load(path)
    assert str(path) in str(info.value)


if __name__ == "__main__":
    print(f"{'case':32} {'error':16} {'seconds':>9} {'tracemalloc peak':>17} "
          f"{'peak RSS growth':>16}")
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            r, _, _ = run_case(case, folder)
        print(f"{case:32} {r['error']!s:16} {r['seconds']:9.5f} "
              f"{r['tracemalloc_peak'] / 1024:14.1f} KB {r['rss_growth'] / 1024:13.0f} KB")
        print(f"    {r['message']}")

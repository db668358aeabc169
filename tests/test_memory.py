"""Memory: networks are freed when their last reference goes, and what cannot fit
is refused before anything is allocated."""

import gc
import os
import weakref

import numpy as np
import pytest

import bprop
from bprop import optim


@pytest.fixture
def no_gc():
    """The cycle collector off: whatever is freed here is freed by reference counting."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _data(n=64, features=8, classes=3):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


@pytest.mark.parametrize("how", ["built", "forward", "fit", "fit-own-optimizer",
                                 "train_step", "layer-views-kept"])
def test_a_network_is_freed_when_its_last_reference_goes(no_gc, how):
    # Regression: Dense referred to its Network and the Network to its fit optimizer,
    # which referred back; 300 x (build 784-512-10, fit one epoch) grew RssAnon from
    # 38 MB to 686 MB with 43-91 dead networks alive until gc.collect().
    X, y = _data()
    net = bprop.Network([bprop.Dense(8, 16, activation="relu"), bprop.Dense(16, 3)], seed=0)
    kept = None
    if how == "forward":
        net.forward(X.astype(np.float32))
    elif how == "fit":
        bprop.fit(net, X, y, epochs=1, batch_size=16, seed=0)
    elif how == "fit-own-optimizer":
        opt = optim.SGD(net, lr=0.1, momentum=0.9)
        bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=16, seed=0)
        del opt
    elif how == "train_step":
        opt = optim.Adam(net)
        net.train_step(X.astype(np.float32), y, optimizer=opt)
        del opt
    elif how == "layer-views-kept":
        kept = net.layers[0].weight  # a view keeps its storage, not the network
    alive = weakref.ref(net)
    layers = [weakref.ref(layer) for layer in net.layers]
    del net
    assert alive() is None, "the network outlived its last reference"
    assert all(r() is None for r in layers)
    if kept is not None:
        assert kept.shape == (8, 16) and np.isfinite(kept).all()  # still valid memory


def test_an_optimizer_holds_the_parameters_not_the_network(no_gc):
    net = bprop.Network([bprop.Dense(4, 3)], seed=0)
    opt = optim.Adam(net)
    assert opt.net is net
    alive = weakref.ref(net)
    del net
    assert alive() is None
    with pytest.raises(RuntimeError, match=r"\[Adam.net\] the network this optimizer was built "
                                           r"on has been freed"):
        opt.net
    other = bprop.Network([bprop.Dense(4, 3)], seed=0)
    with pytest.raises(ValueError, match="optimizer was built for another network"):
        other.train_step(np.zeros((2, 4), np.float32), np.zeros(2, np.int64), optimizer=opt)


# ---- refusing what cannot fit ------------------------------------------------------------

def test_a_network_larger_than_the_machine_is_refused_before_allocating():
    # Regression: Dense(784, 10**9) failed with a bare "MemoryError: std::bad_alloc",
    # and Dense(1, 10**9) zero-filled ~15 GB over 25-40 s before failing.
    with pytest.raises(MemoryError, match=r"\[Network\] the parameters and gradients of this "
                                          r"network \(float32; the largest, layers\.1 Dense\(784, "
                                          r"1000000000.*weight \(784, 1000000000\) and bias "
                                          r"\(1000000000,\).*would take .* GB .*available; "
                                          "nothing was allocated"):
        bprop.Network([bprop.Dense(10, 784), bprop.Dense(784, 10**9)])


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float64", 8)])
def test_the_memory_check_counts_parameters_gradients_and_the_initial_draw(monkeypatch, dtype,
                                                                        itemsize):
    from bprop import _memory

    layers = lambda: [bprop.Dense(100, 50), bprop.Dense(50, 10)]  # noqa: E731
    need = 2 * itemsize * (100 * 50 + 50 + 50 * 10 + 10) + 8 * 100 * 50
    monkeypatch.setattr(_memory, "available_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match=f"\\({need:,} bytes\\)"):
        bprop.Network(layers(), dtype=dtype)
    monkeypatch.setattr(_memory, "available_memory", lambda: need)
    net = bprop.Network(layers(), dtype=dtype)
    # an optimizer's state is checked the same way: Adam keeps two arrays per parameter
    state = 2 * itemsize * net.num_parameters
    monkeypatch.setattr(_memory, "available_memory", lambda: state - 1)
    with pytest.raises(MemoryError, match=r"\[Adam\] its state \(exp_avg, exp_avg_sq"):
        optim.Adam(net)
    optim.SGD(net, lr=0.1)  # no state: nothing to refuse
    monkeypatch.setattr(_memory, "available_memory", lambda: None)  # unknown: not checked
    optim.Adam(net)


def test_the_same_seed_draws_the_same_weights_as_the_reference():
    # the initial weights are drawn one layer at a time, straight into the core's storage
    from bprop import reference

    specs = [(5, 7, "relu"), (7, 3, "tanh")]
    net = bprop.Network([bprop.Dense(i, o, activation=a) for i, o, a in specs], seed=4)
    ref = reference.Network([reference.Dense(i, o, activation=a) for i, o, a in specs],
                            dtype="float32", seed=4)
    for mine, theirs in zip(net.layers, ref.layers):
        assert mine.weight.tobytes() == theirs.weight.tobytes()


_OOM_SCRIPT = """
import resource, numpy as np, bprop
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = size + (512 << 20)  # 512 MB more address space than the process has now
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
net = bprop.Network([bprop.Dense(4, 2**16, activation="relu"), bprop.Dense(2**16, 1)],
                    dtype="float64", seed=0)
X = np.zeros((2**14, 4))
calls = [lambda: net.predict(X), lambda: net.forward(X),
         lambda: bprop.Network([bprop.Dense(2**13, 2**14)], dtype="float64")]
for call in calls:
    try:
        call()
    except MemoryError as e:
        print(e)
print("still works", net.predict(X[:10]).shape, net.forward(X[:10]).shape)
"""


@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves terabytes of address space: an "
                           "address-space limit cannot be set under it")
def test_an_allocation_failure_in_the_core_is_a_memory_error_naming_the_call_and_size():
    # Under an address-space limit the core's own allocations fail (the Python-side
    # check sees the machine's memory, not the limit).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _OOM_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("[Network.predict] a workspace of 16384 rows (pass a smaller "
                        "batch_size): could not allocate 8589934592 bytes")
    assert lines[1] == ("[Network.forward] the caches for a batch of 16384 rows: could not "
                        "allocate 8589934592 bytes")
    assert lines[2] == ("[Network] layers.0 (Dense), weight (8192, 16384) and its gradient: "
                        "could not allocate 1073741824 bytes")
    assert lines[3] == "still works (10, 1) (10, 1)"


# ---- validation_split holds out by index ---------------------------------------------------

def _memmap_data(tmp_path, n=20000, features=500):
    rng = np.random.default_rng(0)
    X = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32,
                                  shape=(n, features))
    for lo in range(0, n, 4096):
        X[lo:lo + 4096] = rng.standard_normal((min(4096, n - lo), features))
    X.flush()
    y = rng.integers(0, 3, n)
    return np.load(tmp_path / "X.npy", mmap_mode="r"), y


@pytest.mark.parametrize("shuffle", [True, False])
def test_validation_split_of_a_memmap_copies_only_the_validation_rows(tmp_path, shuffle):
    # Regression: fit(validation_split=0.1) on a 598 MB memmap copied both parts into
    # memory (1.5 GB peak); the training part is now gathered by index, a chunk at a time.
    import tracemalloc

    X, y = _memmap_data(tmp_path)
    net = bprop.Network([bprop.Dense(500, 16, activation="relu"), bprop.Dense(16, 3)], seed=0)
    opt = optim.SGD(net, lr=0.01)
    tracemalloc.start()  # NumPy reports its array allocations to tracemalloc
    try:
        history = bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=256, seed=0,
                            shuffle=shuffle, validation_split=0.1, metrics=["accuracy"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert X.nbytes == 40_000_000
    # the validation tenth (4 MB) plus chunk buffers and the index, not the data
    assert peak < 0.25 * X.nbytes, f"peak {peak:,} bytes for a {X.nbytes:,}-byte X"
    assert np.isfinite(history.val_loss[0]) and "accuracy" in history.metrics

    # the same steps as training on an explicit in-memory split with the same order
    rng = np.random.default_rng(0)
    n = X.shape[0]
    split_at = int(n * 0.9)
    order = rng.permutation(n) if shuffle else np.arange(n)
    twin = bprop.Network([bprop.Dense(500, 16, activation="relu"), bprop.Dense(16, 3)], seed=0)
    twin_history = bprop.fit(twin, np.asarray(X)[order[:split_at]], y[order[:split_at]],
                             optimizer=optim.SGD(twin, lr=0.01), epochs=1, batch_size=256,
                             seed=rng, shuffle=shuffle, metrics=["accuracy"],
                             validation_data=(np.asarray(X)[order[split_at:]],
                                              y[order[split_at:]]))
    for (_, a, _), (_, b, _) in zip(net.parameters(), twin.parameters()):
        np.testing.assert_array_equal(a, b)
    assert history.history.keys() == twin_history.history.keys()
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(history.history[key], twin_history.history[key], rtol=1e-12)
    # the training metrics come from a chunked predict here, a whole one there: equal up
    # to an argmax flipped by last-bit differences
    np.testing.assert_allclose(history.metrics["accuracy"], twin_history.metrics["accuracy"],
                               atol=1e-3)

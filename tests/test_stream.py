"""fit on data that does not fit one array: minibatches from an iterable, and memmaps.

X may be a re-iterable of (X_batch, y_batch[, w_batch]) tuples, a generator function
(called once per epoch) or, for one epoch, an iterator; validation_data likewise.
Each batch is checked as fit checks arrays. Fed the minibatches fit would cut from
arrays in their stored order, the result is the same, bit for bit.
"""

import numpy as np
import pytest
import scipy.sparse as sp

import bprop
from bprop.optim import SGD, Adam


def _data(n=300, features=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, features))
    y = (X[:, :3] @ rng.standard_normal((3, 3))).argmax(1)
    return X, y, rng.random(n)


def _net(dtype=np.float64, features=5):
    return bprop.Network([bprop.Dense(features, 8, activation="relu"), bprop.Dense(8, 3)],
                         seed=0, dtype=dtype)


def _params(net):
    return [p.copy() for _, p, _ in net.parameters()]


@pytest.mark.parametrize("form", ["generator function", "list", "re-iterable object"])
def test_batches_in_stored_order_train_exactly_as_the_arrays_do(form):
    X, y, w = _data()
    bs = 32
    ref = _net()
    h_ref = bprop.fit(ref, X, y, optimizer=SGD(ref, lr=0.1, momentum=0.9), epochs=3,
                      batch_size=bs, shuffle=False, sample_weight=w, metrics=["accuracy"],
                      validation_data=(X[:50], y[:50]), early_stopping=5)

    def batches():
        for lo in range(0, len(X), bs):
            yield X[lo:lo + bs], y[lo:lo + bs], w[lo:lo + bs]

    class Batches:
        def __iter__(self):
            return batches()

    source = {"generator function": batches, "list": list(batches()),
              "re-iterable object": Batches()}[form]
    net = _net()
    h = bprop.fit(net, source, optimizer=SGD(net, lr=0.1, momentum=0.9), epochs=3,
                  metrics=["accuracy"], validation_data=[(X[:20], y[:20]), (X[20:50], y[20:50])],
                  early_stopping=5)
    for a, b in zip(_params(ref), _params(net)):
        assert a.tobytes() == b.tobytes()
    d_ref, d = h_ref.history, h.history
    d_ref.pop("time"), d.pop("time")
    assert d == d_ref and h.best_epoch == h_ref.best_epoch


def test_batches_of_different_sizes_step_as_train_step_does():
    X, y, _ = _data()
    sizes = [7, 64, 1, 33, 100, 95]
    bounds = np.cumsum([0] + sizes)

    class Shuffled:
        """A new random batching each pass: the iterable's business, not fit's."""

        def __init__(self):
            self.rng = np.random.default_rng(3)
            self.orders = []

        def __iter__(self):
            order = self.rng.permutation(len(X))
            self.orders.append(order)
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                yield X[order[lo:hi]], y[order[lo:hi]]

    data = Shuffled()
    net = _net()
    h = bprop.fit(net, data, optimizer=Adam(net, lr=1e-2), epochs=2)
    assert len(data.orders) == 2  # one pass per epoch, no extra pass without metrics
    twin = _net()
    opt = Adam(twin, lr=1e-2)
    losses = []
    for order in data.orders:
        total = 0.0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            total += twin.train_step(X[order[lo:hi]], y[order[lo:hi]], optimizer=opt) * (hi - lo)
        losses.append(total / len(X))
    for a, b in zip(_params(net), _params(twin)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h.loss, losses, rtol=1e-12)


def test_sparse_batches_train_as_dense_ones():
    X, y, _ = _data()
    X[np.abs(X) < 0.8] = 0.0

    def dense():
        for lo in range(0, 300, 50):
            yield X[lo:lo + 50], y[lo:lo + 50]

    def sparse():
        for lo in range(0, 300, 50):
            yield sp.csr_matrix(X[lo:lo + 50]), y[lo:lo + 50]

    a, b = _net(), _net()
    bprop.fit(a, dense, optimizer=SGD(a, lr=0.1), epochs=2)
    bprop.fit(b, sparse, optimizer=SGD(b, lr=0.1), epochs=2)
    for p, q in zip(_params(a), _params(b)):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-14)


def test_an_iterator_serves_one_epoch_only():
    X, y, _ = _data()
    batches = ((X[lo:lo + 50], y[lo:lo + 50]) for lo in range(0, 300, 50))
    net = _net()
    with pytest.raises(TypeError, match="iterator .* the first pass would exhaust"):
        bprop.fit(net, batches, epochs=2)
    assert bprop.fit(net, batches, epochs=1).epochs == 1


def test_an_iterable_that_yields_nothing_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="yielded no batches in epoch 1"):
        bprop.fit(net, lambda: iter(()), epochs=2)


@pytest.mark.parametrize("batch, error, match", [
    ((np.zeros((4, 6)), np.zeros(4, int)), ValueError, r"X batch 1: X_batch has 6 features"),
    ((np.zeros((4, 5)), np.zeros(3, int)), ValueError, r"X batch 1"),
    ("not a tuple", TypeError, r"X batch 1 must be a tuple \(X_batch, y_batch\)"),
    ((np.full((4, 5), np.nan), np.zeros(4, int)), ValueError, r"X batch 1: X_batch must be "
                                                                r"finite"),
    ((np.zeros((4, 5)), np.zeros(4, int), -np.ones(4)), ValueError, r"w_batch must be >= 0"),
])
def test_a_bad_batch_is_named(batch, error, match):
    X, y, _ = _data()
    net = _net()
    with pytest.raises(error, match=match):
        bprop.fit(net, [(X[:10], y[:10]), batch], epochs=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(y=np.zeros(3)), "y and sample_weight must be None"),
    (dict(validation_split=0.2), "validation_split cannot be used with X given as batches"),
    (dict(class_weight="balanced"), "class_weight cannot be used"),
    (dict(checkpoint="run.ckpt"), "checkpoint cannot be used"),
])
def test_arguments_that_need_arrays_are_refused_with_batches(kwargs, match):
    X, y, _ = _data()
    net = _net()
    before = _params(net)
    with pytest.raises((TypeError, ValueError), match=match):
        bprop.fit(net, [(X[:10], y[:10])], **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(before, _params(net)))


def test_y_is_required_with_arrays():
    X, y, _ = _data()
    with pytest.raises(TypeError, match="y must be the targets of X, but got None"):
        bprop.fit(_net(), X)


# ---- numpy.memmap: trained in place -----------------------------------------------------

@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_memmap_trains_without_a_copy_of_the_data(tmp_path, shuffle, checkpoint):
    import tracemalloc

    n, features = 40000, 250
    rng = np.random.default_rng(0)
    X = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32,
                                  shape=(n, features))
    for lo in range(0, n, 8192):
        X[lo:lo + 8192] = rng.standard_normal((min(8192, n - lo), features))
    X.flush()
    X = np.load(tmp_path / "X.npy", mmap_mode="r")
    y = rng.integers(0, 3, n)
    net = bprop.Network([bprop.Dense(features, 16, activation="relu"), bprop.Dense(16, 3)],
                        seed=0)
    tracemalloc.start()  # NumPy reports its array allocations to tracemalloc
    try:
        history = bprop.fit(net, X, y, optimizer=SGD(net, lr=0.01), epochs=2, batch_size=128,
                            seed=0, shuffle=shuffle, metrics=["accuracy"],
                            checkpoint=str(tmp_path / "run.ckpt") if checkpoint else None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert X.nbytes == 40_000_000
    # chunk buffers (~1 MiB), the permutation, the outputs for the metrics: not the data
    assert peak < 0.1 * X.nbytes, f"peak {peak:,} bytes for a {X.nbytes:,}-byte X"
    assert np.isfinite(history.loss).all()

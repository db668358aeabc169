"""Reproducibility (issue 5, item 7).

The same seeds and the same number of threads give bitwise-identical weights,
optimizer state and history after 10 epochs of fit. Across thread counts
(bprop.set_num_threads(1) against 2) the results are measured, not asserted: on
the machines tried they are identical as well, since OpenBLAS splits a matrix
product among its threads by blocks of the output and never splits the sum over
the inner dimension, so every entry is summed in the same order whatever the
number of threads; the difference measured is listed at the end of the run
("largest errors measured"). That holds for the BLAS build in use, not in
general: another BLAS, or another CPU (OpenBLAS picks its kernels by CPU), may
round differently.
"""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop import optim


@pytest.fixture
def threads():
    """set_num_threads for the test; the previous count is restored afterwards."""
    before = bprop.get_num_threads()
    yield bprop.set_num_threads
    bprop.set_num_threads(before)


OPTIMIZERS = {
    "adam": lambda n: optim.Adam(n, lr=1e-2),
    "sgd-fused": lambda n: optim.SGD(n, lr=0.05),
    "sgd-nesterov": lambda n: optim.SGD(n, lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop-centered": lambda n: optim.RMSprop(n, lr=1e-3, centered=True, momentum=0.5),
}


def _train(dtype, make_optimizer, specs, X, y, epochs=10, batch_size=32, **kwargs):
    net = bprop.Network([bprop.Dense(*s) for s in specs], dtype=dtype, seed=7)
    opt = make_optimizer(net)
    history = bprop.fit(net, X, y, optimizer=opt, epochs=epochs, batch_size=batch_size, seed=3,
                        **kwargs)
    return net, opt, history


def _fingerprint(net, opt, history):
    """Every bit fit produces: weights, optimizer state and step, history."""
    out = [p.tobytes() for _, p, _ in net.parameters()]
    sd = opt.state_dict()
    out += [sd["state"][p][k].tobytes()
            for p in sorted(sd["state"]) for k in sorted(sd["state"][p])]
    out += [repr(sd["step"]), repr(history.loss), repr(history.val_loss),
            repr(history.metrics)]
    return out


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_same_seed_and_thread_count_give_identical_bits(threads, num_threads, dtype, optimizer):
    threads(num_threads)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 10))
    y = rng.integers(0, 4, 400)
    specs = [(10, 32, "gelu"), (32, 32, "tanh"), (32, 4)]
    runs = [_fingerprint(*_train(dtype, OPTIMIZERS[optimizer], specs, X, y,
                                 validation_split=0.2, metrics=["accuracy"]))
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_other_seeds_give_other_bits():
    """The identity above is not vacuous: the seeds matter."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((100, 10)), rng.integers(0, 4, 100)
    specs = [(10, 16, "tanh"), (16, 4)]
    a = _train("float64", OPTIMIZERS["adam"], specs, X, y, epochs=2)[0]
    b = bprop.Network([bprop.Dense(*s) for s in specs], dtype="float64", seed=8)
    bprop.fit(b, X, y, optimizer=optim.Adam(b, lr=1e-2), epochs=2, batch_size=32, seed=3)
    c = bprop.Network([bprop.Dense(*s) for s in specs], dtype="float64", seed=7)
    bprop.fit(c, X, y, optimizer=optim.Adam(c, lr=1e-2), epochs=2, batch_size=32, seed=4)
    for other in (b, c):
        assert any(p.tobytes() != q.tobytes()
                   for (_, p, _), (_, q, _) in zip(a.parameters(), other.parameters()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_thread_against_two_is_measured(threads, dtype, record_error):
    """Layers wide enough (256) and batches large enough (128) for OpenBLAS to use
    both threads; 10 epochs. Recorded: the largest difference of any weight
    relative to the largest weight of its parameter, and of predictions."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((512, 64))
    y = rng.integers(0, 10, 512)
    specs = [(64, 256, "relu"), (256, 256, "tanh"), (256, 10)]
    nets = {}
    for n in (1, 2):
        threads(n)
        nets[n] = _train(dtype, OPTIMIZERS["adam"], specs, X, y, batch_size=128)[0]
        assert bprop.get_num_threads() == n
    worst = 0.0
    for (_, a, _), (_, b, _) in zip(nets[1].parameters(), nets[2].parameters()):
        diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        worst = max(worst, diff / float(np.max(np.abs(a))))
    record_error(f"threads 1 vs 2 after 10 epochs, weights ({dtype})", worst)
    threads(2)
    out = [nets[n].predict(X) for n in (1, 2)]
    record_error(f"threads 1 vs 2 after 10 epochs, predictions ({dtype})",
                 float(np.max(np.abs(out[0] - out[1]))) / float(np.max(np.abs(out[0]))))
    # whatever the thread count did, the two runs learned the same problem
    assert np.isfinite(out[0]).all() and np.isfinite(out[1]).all()

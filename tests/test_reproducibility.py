"""Reproducibility (issue 5, item 7).

The same seeds give bitwise-identical weights, optimizer state and history after
10 epochs of fit, run after run. Across thread counts the results are the same
bits too: tests/test_determinism.py (issue 11).
"""

from __future__ import annotations

import numpy as np
import pytest

import bprop
from bprop import optim


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


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_same_seed_and_thread_count_give_identical_bits(threads, fingerprint, num_threads, dtype,
                                                       optimizer):
    threads(num_threads)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 10))
    y = rng.integers(0, 4, 400)
    specs = [(10, 32, "gelu"), (32, 32, "tanh"), (32, 4)]
    runs = [fingerprint(*_train(dtype, OPTIMIZERS[optimizer], specs, X, y,
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

"""Time of the phases of a training step (forward, backward, the one-call step) on
1 and 2 threads, for one workload of bench/run.py.

    python bench/phases.py tiny
"""

import sys
import time

import numpy as np

import bprop
from bprop import _core

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from run import WORKLOADS, make_bprop  # noqa: E402


def per_call_us(fn, n=500):
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main(name="tiny"):
    sizes, batch = WORKLOADS[name]
    net = make_bprop(sizes, "float32")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    _, grad = _core.softmax_cross_entropy(net.forward(X), y, None)
    n = max(20, int(2e8 / (batch * sizes[0] * sizes[1])))
    before = bprop.get_num_threads()
    for threads in (1, 2):
        bprop.set_num_threads(threads)
        fwd = per_call_us(lambda: net._core.forward(X), n)
        bwd = per_call_us(lambda: net._core.backward(grad, False, False), n)
        step = per_call_us(lambda: net._core.train_step(X, y, "softmax_cross_entropy", None,
                                                        1e-6), n)
        print(f"{name} {threads} thread(s): forward {fwd:.1f} us, backward {bwd:.1f} us, "
              f"train_step (fused SGD) {step:.1f} us")
    bprop.set_num_threads(before)


if __name__ == "__main__":
    main(*sys.argv[1:])

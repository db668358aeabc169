"""Microseconds per float32 train_step (plain SGD, softmax cross-entropy) of a Dense
workload of bench/run.py, for comparing two builds run alternately:

    for i in 1 2 3; do old/bin/python bench/ab_step.py tiny 2; new/bin/python bench/ab_step.py tiny 2; done

Prints the best of 5 timed loops (after a warm-up), so that a loop another process
disturbed does not count; compare the builds' best over several alternations.
"""

import sys
import time

import numpy as np

import bprop

WORKLOADS = {"tiny": ([784, 128, 10], 32, 2000), "small": ([784, 256, 256, 10], 128, 300),
             "medium": ([1024, 1024, 1024, 10], 256, 30)}


def main(name: str, threads: int) -> None:
    bprop.set_num_threads(threads)
    sizes, batch, steps = WORKLOADS[name]
    layers = [bprop.Dense(a, b, activation="relu" if i < len(sizes) - 2 else "identity")
              for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
    net = bprop.Network(layers, seed=0)
    opt = bprop.optim.SGD(net, lr=1e-3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    for _ in range(steps // 4):
        net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
        best = min(best, (time.perf_counter() - start) / steps)
    print(f"{best * 1e6:.1f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

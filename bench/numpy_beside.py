"""A user's training loop that calls NumPy matrix products between bprop's steps.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/numpy_beside.py
    python bench/numpy_beside.py --pairs 9 --size 256

Each iteration: one bprop training step (net.train_step, Adam, float32, the small
workload of bench/run.py: 784-256-256-10, batch 128) and then one NumPy product of
two (size, size) float64 matrices, as a user script computing a metric or a
projection between steps would. The same loop runs with NumPy's BLAS at its default
thread count and with NumPy's BLAS limited to one thread
(threadpoolctl.threadpool_limits(1, user_api="blas"); bprop's threads are not
'blas' and keep their count), in alternating pairs. Printed: the loop's time per
iteration in each setting and the ratio default / NumPy-on-one-thread (the cost of
the two thread pools meeting: 1.00 means none; issue 11 asks for <= 1.15), and
the same for bprop's step alone and NumPy's product alone, so that the ratio can be
read against what each part gains from a second thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import bprop


def per_iteration(fn, min_time):
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--min-time", type=float, default=1.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    net = bprop.Network([bprop.Dense(784, 256, "relu"), bprop.Dense(256, 256, "relu"),
                         bprop.Dense(256, 10)], dtype="float32", seed=0)
    opt = bprop.optim.Adam(net, lr=1e-4)
    X = rng.standard_normal((128, 784)).astype(np.float32)
    y = rng.integers(0, 10, 128).astype(np.int64)
    A = rng.standard_normal((args.size, args.size))
    B = rng.standard_normal((args.size, args.size))
    out = np.empty_like(A)

    def step():
        net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)

    def product():
        np.matmul(A, B, out=out)

    def both():
        step()
        product()

    numpy_blas = [i for i in threadpool_info() if i["user_api"] == "blas"
                  and "scipy_openblas32" not in i["filepath"]]
    print(f"bprop {bprop.__version__}, {bprop.get_num_threads()} threads; NumPy {np.__version__} "
          f"BLAS: " + ", ".join(f"{os.path.basename(i['filepath'])} threads={i['num_threads']} "
                                f"kernel={i.get('architecture')}" for i in numpy_blas))
    print(f"load average {os.getloadavg()[0]:.2f}; CPUs {len(os.sched_getaffinity(0))}; "
          f"NumPy product {args.size}x{args.size} float64\n")
    ratios = {"loop": [], "bprop step": [], "NumPy product": []}
    times = {k: ([], []) for k in ratios}
    for _ in range(args.pairs):
        for name, fn in (("loop", both), ("bprop step", step), ("NumPy product", product)):
            default = per_iteration(fn, args.min_time)
            with threadpool_limits(1, user_api="blas"):
                limited = per_iteration(fn, args.min_time)
            times[name][0].append(default)
            times[name][1].append(limited)
            ratios[name].append(default / limited)
    print(f"{'':15} {'default ms':>11} {'NumPy 1 thread ms':>18} {'ratio (median, range)':>24}")
    for name, r in ratios.items():
        d, l_ = (statistics.median(v) * 1e3 for v in times[name])
        print(f"{name:15} {d:11.3f} {l_:18.3f}   {statistics.median(r):6.3f} "
              f"({min(r):.3f}-{max(r):.3f})")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

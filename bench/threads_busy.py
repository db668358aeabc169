"""bprop's threads on a busy machine and on a quiet one (issue 11, target 3).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/threads_busy.py
    python bench/threads_busy.py --pairs 7 --skip-quiet

Busy: a child process spins on one CPU (pinned with sched_setaffinity to the last
CPU this process may use) while `bprop.fit` trains the small workload of
bench/run.py (784-256-256-10, float32, Adam, batch 128, one epoch over 8192 random
samples) with the default thread count and with one thread, in alternating pairs.
Printed: the median of default / one-thread wall time per pair and its range
(issue 11 asks for <= 1.15; OpenBLAS's threads gave 2.6x), and how many products
the pool moved to the calling thread because a worker had lost its core.

Quiet: the spinner stopped, net.train_step on the medium (1024-1024-1024-10,
batch 256) and large (1024-4096-4096-10, batch 512) workloads on two threads and
on one, in alternating pairs; printed as the speed-up of two threads over one
(issue 11 asks for >= 1.7). A quiet machine is one whose load average is near 0
before the run: the script prints it, and the figures mean little when it is not.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

import bprop
from bprop import _core


def spin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        pass


def mlp(sizes):
    return [bprop.Dense(a, b, activation="relu" if i < len(sizes) - 2 else "identity")
            for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]


def per_step(fn, min_time):
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def rng_range(values):
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def busy(pairs: int, default_threads: int) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8192, 784)).astype(np.float32)
    y = rng.integers(0, 10, 8192)

    def fit_time(threads):
        bprop.set_num_threads(threads)
        net = bprop.Network(mlp([784, 256, 256, 10]), dtype="float32", seed=0)
        start = time.perf_counter()
        bprop.fit(net, X, y, optimizer=bprop.optim.Adam(net, lr=1e-3), epochs=1,
                  batch_size=128, seed=0)
        return time.perf_counter() - start

    cpu = max(os.sched_getaffinity(0))
    spinner = mp.get_context("spawn").Process(target=spin, args=(cpu,), daemon=True)
    spinner.start()
    try:
        time.sleep(0.5)
        fit_time(1)  # warm-up
        ratios, default_s, one_s = [], [], []
        contended = getattr(_core, "_contended_loops", lambda: 0)  # absent before the pool
        moved = contended()
        for _ in range(pairs):
            d = fit_time(default_threads)
            o = fit_time(1)
            default_s.append(d)
            one_s.append(o)
            ratios.append(d / o)
        moved = contended() - moved
        load = os.getloadavg()[0]
    finally:
        spinner.kill()
        spinner.join()
        bprop.set_num_threads(default_threads)
    print(f"busy (one process spinning on CPU {cpu}), small workload, fit of one epoch:")
    print(f"  {default_threads} threads (default) s: {rng_range(default_s)}")
    print(f"  1 thread s:              {rng_range(one_s)}")
    print(f"  default / 1 thread:      {rng_range(ratios)}   (products moved to the calling "
          f"thread: {moved}; load average {load:.2f})")


def quiet(pairs: int, default_threads: int) -> None:
    print(f"\nquiet: load average {os.getloadavg()[0]:.2f} before; train_step, Adam, float32")
    for name, sizes, batch, min_time in (("medium", [1024, 1024, 1024, 10], 256, 0.5),
                                         ("large", [1024, 4096, 4096, 10], 512, 2.0)):
        rng = np.random.default_rng(0)
        net = bprop.Network(mlp(sizes), dtype="float32", seed=0)
        opt = bprop.optim.Adam(net, lr=1e-6)
        X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], batch)

        def step(net=net, X=X, y=y, opt=opt):
            net.train_step(X, y, optimizer=opt)

        speedups, two_ms, one_ms = [], [], []
        try:
            for _ in range(pairs):
                bprop.set_num_threads(2)
                two = per_step(step, min_time)
                bprop.set_num_threads(1)
                one = per_step(step, min_time)
                two_ms.append(two * 1e3)
                one_ms.append(one * 1e3)
                speedups.append(one / two)
        finally:
            bprop.set_num_threads(default_threads)
        print(f"  {name:6}  2 threads ms {rng_range(two_ms)}  1 thread ms {rng_range(one_ms)}  "
              f"speed-up {rng_range(speedups)}")
    print(f"  load average after {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--skip-busy", action="store_true")
    parser.add_argument("--skip-quiet", action="store_true")
    args = parser.parse_args()
    default_threads = bprop.get_num_threads()
    print(f"bprop {bprop.__version__} ({os.path.dirname(bprop.__file__)}), default "
          f"{default_threads} threads, CPUs {sorted(os.sched_getaffinity(0))}")
    if default_threads < 2:
        raise SystemExit("needs at least 2 CPUs (or BPROP_NUM_THREADS >= 2)")
    if not args.skip_busy:
        busy(args.pairs, default_threads)
    if not args.skip_quiet:
        quiet(args.pairs, default_threads)


if __name__ == "__main__":
    main()

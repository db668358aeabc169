"""Whole training steps on bprop's own threads: what the tiles cost, what 2 threads gain.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/pool_steps.py
    python bench/pool_steps.py --only small --pairs 15
    python bench/pool_steps.py --tile-params 1048576,8,128,42,25,16   # another tiling rule

For each workload of bench/run.py (float32 net.train_step with Adam), per pair of
measurements taken back to back:

  tiled / one call   the step's time with the core's tiles over its time with every
                     product as one OpenBLAS call, both on one thread, measured as
                     the thread's CPU time (what bitwise determinism costs; time the
                     OS gives other processes does not count, so this holds on a
                     busy machine too)
  2t / 1t            wall time of the step on 2 threads over 1 thread (below 1: two
                     threads are faster), with the pool's back-off on a busy machine
                     (the default) and without it

Medians over pairs, with the interquartile range; the load average is printed, since
the two-thread figures mean something different on a quiet and on a busy machine.
With a bprop from before its own thread pool (OpenBLAS's threads), only 2t / 1t is
measured, so the same command compares the two builds. The issue's busy machine:

    taskset -c 1 python -c 'while True: pass' &  python bench/pool_steps.py;  kill %1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import bprop
from bprop import _core

WORKLOADS = {  # as in bench/run.py
    "tiny": ([784, 128, 10], 32),
    "small": ([784, 256, 256, 10], 128),
    "medium": ([1024, 1024, 1024, 10], 256),
    "large": ([1024, 4096, 4096, 10], 512),
}
ONE_CALL = (1 << 40, 1, 1 << 30, 0, 0, 1)  # tile params: every product one tile


def measure(fn, clock, min_time):
    fn()
    n, start = 0, clock()
    while True:
        fn()
        n += 1
        elapsed = clock() - start
        if elapsed >= min_time:
            return elapsed / n


def summary(values):
    values = sorted(values)
    q = len(values) // 4
    return f"{statistics.median(values):.3f} [{values[q]:.3f}-{values[-1 - q]:.3f}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=list(WORKLOADS), action="append")
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--min-time", type=float, default=0.1)
    parser.add_argument("--tile-params", help="min_work,max_tiles,min_side,max_repack_two,"
                                              "max_repack,align")
    args = parser.parse_args()
    own_pool = hasattr(_core, "_set_tile_params")
    if args.tile_params:
        _core._set_tile_params(*(int(v) for v in args.tile_params.split(",")))
    tiled = _core._tile_params() if own_pool else "(OpenBLAS's threads)"
    threads_before = bprop.get_num_threads()
    print(f"# bprop {bprop.__version__} ({os.path.dirname(bprop.__file__)}): tile params "
          f"{tiled}; load average at start {os.getloadavg()[0]:.2f}")
    print("| workload | tiled / one call, 1 thread (cpu) | 2t / 1t (wall) | "
          "2t / 1t without back-off (wall) | back-offs | load |")
    print("|---|---|---|---|---|---|")
    try:
        for name in args.only or list(WORKLOADS):
            sizes, batch = WORKLOADS[name]
            min_time = args.min_time * (5 if name == "large" else 1)
            layers = [bprop.Dense(a, b, activation="relu" if i < len(sizes) - 2 else "identity")
                      for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
            net = bprop.Network(layers, seed=0)
            rng = np.random.default_rng(0)
            X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
            y = rng.integers(0, sizes[-1], batch)
            opt = bprop.optim.Adam(net, lr=1e-6)

            def step(net=net, X=X, y=y, opt=opt):
                net.train_step(X, y, optimizer=opt)

            cost, two, two_plain = [], [], []
            backoffs = _core._contended_loops() if own_pool else 0
            for _ in range(args.pairs):
                bprop.set_num_threads(1)
                if own_pool:
                    _core._set_tile_params(*ONE_CALL)
                    one_call = measure(step, time.thread_time, min_time)
                    _core._set_tile_params(*tiled)
                    cost.append(measure(step, time.thread_time, min_time) / one_call)
                wall_1t = measure(step, time.perf_counter, min_time)
                bprop.set_num_threads(2)
                two.append(measure(step, time.perf_counter, min_time) / wall_1t)
                if own_pool:
                    _core._set_contention_backoff(False)
                    two_plain.append(measure(step, time.perf_counter, min_time) / wall_1t)
                    _core._set_contention_backoff(True)
            if own_pool:
                print(f"| {name} | {summary(cost)} | {summary(two)} | {summary(two_plain)} | "
                      f"{_core._contended_loops() - backoffs} | {os.getloadavg()[0]:.2f} |",
                      flush=True)
            else:
                print(f"| {name} | - | {summary(two)} | - | - | {os.getloadavg()[0]:.2f} |",
                      flush=True)
    finally:
        if own_pool:
            _core._set_tile_params(*tiled)
            _core._set_contention_backoff(True)
        bprop.set_num_threads(threads_before)


if __name__ == "__main__":
    main()

"""Per-product time of the core's tiled matrix product against one OpenBLAS call.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/gemm_tiles.py
    python bench/gemm_tiles.py --only small --rounds 7
    python bench/gemm_tiles.py --tile-params 1048576,8,128,42,25,16   # try another tiling rule

For every product of one training step of bench/run.py's workloads (forward
z = a W, dL/da = delta W^T, dL/dW = a^T delta; float32 unless --dtype), four ways,
alternating within each round (the machine is shared and noisy), median over rounds:

  blas 1t   one OpenBLAS call on one thread (the untiled product)
  before    what the core did before its own pool: one OpenBLAS call on OpenBLAS's
            2 threads when m*n*k >= 2^20, on one thread below
  tiled 1t  the core's tiles (shapes by m, n, k only), bprop.set_num_threads(1)
  tiled 2t  the same tiles on 2 threads

The one-thread columns are the calling thread's CPU time (time.thread_time: time
the OS gave to other processes does not count, so they compare the work on a busy
machine too); the two-thread columns are wall time, meaningful on a quiet machine
only. The step rows sum a workload's products. The ratios to read: tiled 1t /
blas 1t (what bitwise determinism costs on one thread) and before / tiled 2t
(above 1: the tiled path is faster than the old one on two threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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
SETTLE_SECONDS = 0.1  # OpenBLAS's own idle threads spin ~0.1 s after a threaded call


def step_products(sizes, batch):
    """(label, trans_a, trans_b, m, n, k) of the products of one training step."""
    out = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        out.append((f"fwd{i}", False, False, batch, b, a))
    for i in reversed(range(len(sizes) - 1)):
        a, b = sizes[i], sizes[i + 1]
        if i > 0:
            out.append((f"dX{i}", False, True, batch, a, b))
        out.append((f"dW{i}", True, False, a, b, batch))
    return out


def time_call(fn, min_time, clock=time.perf_counter):
    start = time.perf_counter()
    while time.perf_counter() - start < SETTLE_SECONDS:
        fn()
    best = float("inf")
    for _ in range(2):
        n, start = 0, clock()
        while True:
            fn()
            n += 1
            elapsed = clock() - start
            if elapsed >= min_time / 2:
                break
        best = min(best, elapsed / n)
    return best


CLOCKS = {"blas 1t": time.thread_time, "before": time.perf_counter,
          "tiled 1t": time.thread_time, "tiled 2t": time.perf_counter}


def modes(ta, tb, m, n, k, dtype, rng):
    A = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    C = np.zeros((m, n), dtype)
    before_threads = 2 if m * n * k >= 2**20 else 1

    def with_threads(t, fn):
        def run():
            if bprop.get_num_threads() != t:
                bprop.set_num_threads(t)
            fn()
        return run

    return {
        "blas 1t": lambda: _core._gemm(A, B, C, ta, tb, 1.0, 0.0, 1),
        "before": lambda: _core._gemm(A, B, C, ta, tb, 1.0, 0.0, before_threads),
        "tiled 1t": with_threads(1, lambda: _core._gemm(A, B, C, ta, tb, 1.0, 0.0)),
        "tiled 2t": with_threads(2, lambda: _core._gemm(A, B, C, ta, tb, 1.0, 0.0)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=list(WORKLOADS), action="append")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.05,
                        help="seconds per measurement (large products take longer)")
    parser.add_argument("--no-backoff", action="store_true",
                        help="switch off the pool's back-off on a busy machine")
    parser.add_argument("--tile-params", help="min_work,max_tiles,min_side,max_repack_two,max_repack,align")
    args = parser.parse_args()
    if args.tile_params:
        _core._set_tile_params(*(int(v) for v in args.tile_params.split(",")))
    threads_before = bprop.get_num_threads()
    if args.no_backoff:
        _core._set_contention_backoff(False)
    try:
        from threadpoolctl import threadpool_info
        kernels = "; ".join(f"{os.path.basename(p['filepath'])} {p['version']} "
                            f"{p.get('architecture')} {p['num_threads']}t"
                            for p in threadpool_info() if p["user_api"] == "blas")
    except ImportError:
        kernels = "threadpoolctl not installed"
    print(f"# bprop {bprop.__version__}, {args.dtype}, tile params (min_work, max_tiles, "
          f"min_side, max_repack_two, max_repack, align) = {_core._tile_params()}, spin {_core._spin_microseconds()} us, back-off "
          f"{'on' if _core._contention_backoff() else 'off'}; "
          f"load average {os.getloadavg()[0]:.2f}; {kernels}")
    print("| workload | product | m x n x k | tiles | blas 1t us (cpu) | before us | "
          "tiled 1t us (cpu) | tiled 2t us | tiled 1t / blas 1t | before / tiled 2t | "
          "tiled 1t / tiled 2t |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    itemsize = np.dtype(args.dtype).itemsize
    try:
        for name in args.only or list(WORKLOADS):
            sizes, batch = WORKLOADS[name]
            min_time = args.min_time * (8 if name == "large" else 1)
            totals = None
            for label, ta, tb, m, n, k in step_products(sizes, batch):
                fns = modes(ta, tb, m, n, k, args.dtype, rng)
                times = {key: [] for key in fns}
                for _ in range(args.rounds):
                    for key, fn in fns.items():
                        times[key].append(time_call(fn, min_time, CLOCKS[key]))
                if totals is None:
                    totals = {key: [0.0] * args.rounds for key in fns}
                for key in fns:
                    totals[key] = [a + b for a, b in zip(totals[key], times[key])]
                tiles = _core._gemm_tiles(m, n, k, itemsize, ta, tb)
                print(row(name, label, f"{m}x{n}x{k}", f"{tiles[2]}x{tiles[3]} of "
                          f"{tiles[0]}x{tiles[1]}", times))
                sys.stdout.flush()
            print(row(name, "**step**", "", "", totals))
    finally:
        bprop.set_num_threads(threads_before)


def row(name, label, shape, tiles, times):
    med = {key: statistics.median(v) * 1e6 for key, v in times.items()}

    def ratio(a, b):  # median over rounds of the per-round ratio
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    return (f"| {name} | {label} | {shape} | {tiles} | {med['blas 1t']:.1f} | "
            f"{med['before']:.1f} | {med['tiled 1t']:.1f} | {med['tiled 2t']:.1f} | "
            f"{ratio('tiled 1t', 'blas 1t'):.3f} | {ratio('before', 'tiled 2t'):.2f} | "
            f"{ratio('tiled 1t', 'tiled 2t'):.2f} |")


if __name__ == "__main__":
    main()

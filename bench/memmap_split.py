"""fit(validation_split=0.1) on a 600 MB numpy.memmap: what is held in memory.

    python bench/memmap_split.py [--dir DIR]

Writes X (150,000 x 1,000 float32, 600 MB) and y to DIR (default: a temporary
folder) once, then fits one epoch of a 1000-64-10 network with validation_split=0.1
and prints the tracemalloc peak (NumPy's allocations: the validation rows, copied,
and fit's 1 MiB gather buffers; the training rows are read in place by index),
RssAnon before and after, and ru_maxrss (which also counts the file's pages that
the memmap mapped in).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc

import numpy as np

import bprop
from memory_growth import rss_anon_mb  # this folder is on sys.path when run as a script

N, F = 150_000, 1_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="bprop-memmap-")
    x_path, y_path = os.path.join(folder, "X.npy"), os.path.join(folder, "y.npy")
    if not os.path.exists(x_path):
        X = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(N, F))
        rng = np.random.default_rng(0)
        for lo in range(0, N, 10_000):
            X[lo:lo + 10_000] = rng.standard_normal((10_000, F), dtype=np.float32)
        X.flush()
        del X
        np.save(y_path, rng.integers(0, 10, N))
    X = np.load(x_path, mmap_mode="r")
    y = np.load(y_path)
    net = bprop.Network([bprop.Dense(F, 64, activation="relu"), bprop.Dense(64, 10)], seed=0)
    before = rss_anon_mb()
    tracemalloc.start()
    start = time.perf_counter()
    bprop.fit(net, X, y, epochs=1, batch_size=256, seed=0, validation_split=0.1)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"X {X.nbytes / 1e6:.0f} MB (memmap); tracemalloc peak {peak / 1e6:.1f} MB; "
          f"RssAnon {before:.0f} -> {rss_anon_mb():.0f} MB; ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; {seconds:.1f} s")


if __name__ == "__main__":
    main()

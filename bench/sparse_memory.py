"""Peak memory of fit over a CSR matrix whose dense form would not fit in memory.

    python bench/sparse_memory.py                       # 200,000 x 2^18, ~100 per row
    python bench/sparse_memory.py --rows 20000          # a quick look

The matrix (float32 values, int32 indices; TF-IDF-like as bench/sparse.py makes it,
with the same Zipf-like columns) is 210 GB dense in float32 at the default size.
After it is built, the process's peak resident set (VmHWM) is reset
(/proc/self/clear_refs), then ``bprop.fit`` trains [Dense(2^18, 64) relu] ->
[Dense(64, 20)] on it for one epoch (batch 256, Adam(lazy=True), validation_split=0.1)
and ``predict`` runs over all of it. Printed: the sizes of X (CSR), of one dense
minibatch, of the network with its optimizer state, and the peak resident set
during fit and predict above the resident set before them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import bprop

sys.path.insert(0, os.path.dirname(__file__))
from sparse import make_data  # noqa: E402


def status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--cols", type=int, default=2 ** 18)
    parser.add_argument("--per-row", type=int, default=100)
    args = parser.parse_args()

    start = time.perf_counter()
    X, y = make_data(args.rows, args.cols, args.per_row, 20)
    csr_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    print(f"X: {X.shape[0]:,} x {X.shape[1]:,} CSR float32, {X.nnz:,} stored "
          f"({mib(csr_bytes)}); dense it would be {X.shape[0] * X.shape[1] * 4 / 1e9:,.0f} GB; "
          f"one dense minibatch of 256 rows {mib(256 * X.shape[1] * 4)}; "
          f"built in {time.perf_counter() - start:.0f} s")
    net = bprop.Network([bprop.Dense(X.shape[1], 64, activation="relu"), bprop.Dense(64, 20)],
                        seed=0, dtype="float32")
    opt = bprop.optim.Adam(net, lr=1e-3, lazy=True)
    params = sum(p.nbytes for _, p, _ in net.parameters())
    print(f"network: {mib(params)} of parameters, as much again of gradients, twice as much "
          f"of Adam state ({mib(4 * params)} in all)")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = status("VmRSS")
    start = time.perf_counter()
    history = bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=256, seed=0,
                        validation_split=0.1, metrics=["accuracy"])
    fit_s = time.perf_counter() - start
    fit_peak = status("VmHWM") - before
    start = time.perf_counter()
    predicted = net.predict(X).argmax(axis=1)
    predict_s = time.perf_counter() - start
    peak = status("VmHWM") - before
    print(f"fit (1 epoch, {history.history['val_accuracy'][-1]:.3f} validation accuracy): "
          f"{fit_s:.0f} s, peak resident set {mib(fit_peak)} above the {mib(before)} before it")
    print(f"predict over all rows ({predicted.nbytes + X.shape[0] * 20 * 4:,} bytes of output): "
          f"{predict_s:.1f} s; peak over fit and predict {mib(peak)} above the start")


if __name__ == "__main__":
    main()

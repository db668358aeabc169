"""One training step over a wide sparse batch, with and without row-sparse updates.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/sparse_step.py

bench/sparse.py's data and network (2^17 columns, ~100 stored per row, Dense 256
relu, Dense 20, float32, batch 256). Per optimizer, ``net.train_step`` on the same
sequence of minibatches (CSR, gathered beforehand, so only the step is timed):

- SGD(lr): the core's fused plain SGD, W -= lr X^T delta as one sparse product
  into W, which touches only the batch's rows (exact: the gradient is zero
  elsewhere), against the same update made from a stored dense gradient
  (``forward``, loss, ``backward``, ``opt.step()``: every row of W read and written).
- Adam: every row of W and of its two moment arrays updated each step (plain Adam),
  against ``Adam(lazy=True)`` (the batch's rows only, as torch.optim.SparseAdam).

Also timed: the forward pass alone (``net.forward``), the floor of any step. The
variants alternate, round after round, and each figure is the median over rounds of
the mean step time in a round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import bprop

sys.path.insert(0, os.path.dirname(__file__))
from sparse import make_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()

    X, y = make_data(256 * args.steps, 2 ** 17, 100, 20)
    X = X.astype(args.dtype)
    batches = [(X[i:i + 256], y[i:i + 256]) for i in range(0, X.shape[0], 256)]
    print(f"bprop {bprop.__version__}; load average {os.getloadavg()[0]:.2f}; "
          f"CPUs {len(os.sched_getaffinity(0))}; {args.dtype}; {X.shape[1]} columns, "
          f"{X.nnz / X.shape[0]:.0f} stored per row; batch 256")
    bprop.show_config()
    touched = [np.unique(Xb.indices).size for Xb, _ in batches]
    print(f"rows of W a batch touches: {statistics.mean(touched):.0f} of {X.shape[1]} "
          f"({100 * statistics.mean(touched) / X.shape[1]:.1f}%)\n")

    def network():
        return bprop.Network([bprop.Dense(X.shape[1], 256, activation="relu"),
                              bprop.Dense(256, 20)], seed=0, dtype=args.dtype)

    def fused(make_opt):
        net = network()
        opt = make_opt(net)

        def run():
            for Xb, yb in batches:
                net.train_step(Xb, yb, loss="softmax_cross_entropy", optimizer=opt)
        return run

    def stored_sgd():
        net = network()
        opt = bprop.optim.SGD(net, lr=0.1)

        def run():
            for Xb, yb in batches:
                _, grad = bprop.losses.softmax_cross_entropy(net.forward(Xb), yb)
                net.backward(grad)
                opt.step()
        return run

    def forward_only():
        net = network()

        def run():
            for Xb, _ in batches:
                net.forward(Xb)
        return run

    variants = {
        "forward only": forward_only(),
        "SGD, fused (batch's rows)": fused(lambda n: bprop.optim.SGD(n, lr=0.1)),
        "SGD, backward + step (all rows)": stored_sgd(),
        "Adam (all rows)": fused(lambda n: bprop.optim.Adam(n, lr=1e-3)),
        "Adam(lazy=True) (batch's rows)": fused(lambda n: bprop.optim.Adam(n, lr=1e-3, lazy=True)),
    }
    for run in variants.values():  # warm up: buffers sized, pages touched
        run()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / len(batches) * 1e3)
    print(f"{'variant':34} {'ms/step (median)':>16} {'range':>16}")
    for name, t in times.items():
        print(f"{name:34} {statistics.median(t):16.2f} {min(t):7.2f}-{max(t):<8.2f}")
    sgd = statistics.median(times["SGD, backward + step (all rows)"]) / statistics.median(
        times["SGD, fused (batch's rows)"])
    adam = statistics.median(times["Adam (all rows)"]) / statistics.median(
        times["Adam(lazy=True) (batch's rows)"])
    print(f"\nrow-sparse update speed-up: SGD {sgd:.1f}x, Adam {adam:.1f}x; "
          f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

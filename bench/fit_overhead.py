"""Per-step cost of bprop.fit on a tiny network against the bare C++ calls.

    python bench/fit_overhead.py            # about 20 s
    python bench/fit_overhead.py --quick

A 4-8-3 tanh network, batch 32, 1000 minibatches per epoch: the C++ work per step
is a few microseconds, so what fit adds (shuffling, gathering, the loop, the
optimizer's Python) is what the numbers show. Three loops over the same batches,
interleaved round by round, median and best (least disturbed) round
reported:

* raw (4 calls): net._core.forward, the loss kernel, net._core.backward, and
  the optimizer's update (net._core.apply_plan with Adam's prebuilt plan), over
  contiguous slices (no shuffling);
* raw (1 call): net._core.train_step (forward, loss, backward in one C++ call)
  plus the same update;
* fit: bprop.fit(..., shuffle=True), per step (the epoch time / steps).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

import bprop
from bprop import _core, optim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    batch, steps = 32, 1000
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch * steps, 4)).astype(np.float32)
    y = rng.integers(0, 3, batch * steps)
    y64 = y.astype(np.int64)

    def network():
        return bprop.Network([bprop.Dense(4, 8, activation="tanh"), bprop.Dense(8, 3)], seed=0)

    for name, make_opt in (("Adam", lambda n: optim.Adam(n, lr=1e-3)),
                           ("SGD (fused)", lambda n: optim.SGD(n, lr=1e-3))):
        results = {"raw (4 calls)": [], "raw (1 call)": [], "fit": []}
        for _ in range(rounds):
            # raw: the four calls, the optimizer's update without any Python around it
            net = network()
            opt = optim.Adam(net, lr=1e-3)
            core = net._core
            t0 = time.perf_counter()
            for s in range(steps):
                Xb = X[s * batch:(s + 1) * batch]
                out = core.forward(Xb)
                _, grad = _core.softmax_cross_entropy(out, y64[s * batch:(s + 1) * batch], None)
                core.backward(grad, False, False)
                core.apply_plan(opt._plan)
            results["raw (4 calls)"].append((time.perf_counter() - t0) / steps)

            net = network()
            opt = optim.Adam(net, lr=1e-3)
            core = net._core
            t0 = time.perf_counter()
            for s in range(steps):
                core.train_step(X[s * batch:(s + 1) * batch], y64[s * batch:(s + 1) * batch],
                                "softmax_cross_entropy", None, -1.0)
                core.apply_plan(opt._plan)
            results["raw (1 call)"].append((time.perf_counter() - t0) / steps)

            net = network()
            opt = make_opt(net)
            t0 = time.perf_counter()
            bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=batch, seed=0)
            results["fit"].append((time.perf_counter() - t0) / steps)
        med = {k: statistics.median(v) * 1e6 for k, v in results.items()}
        best = {k: min(v) * 1e6 for k, v in results.items()}
        print(f"optimizer in fit: {name}          median   best")
        for k in med:
            print(f"  {k:14s} {med[k]:6.2f} {best[k]:6.2f} us/step")
        for ref in ("raw (4 calls)", "raw (1 call)"):
            print(f"  fit - {ref:14s} {med['fit'] - med[ref]:+6.2f} "
                  f"{best['fit'] - best[ref]:+6.2f} us/step")
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"NumPy {np.__version__}, bprop {bprop.__version__}; 4-8-3 tanh, batch {batch}, "
          f"{steps} steps, median and best of {rounds} rounds")


if __name__ == "__main__":
    main()

"""What gradient clipping costs: one training step with and without clip_grad_norm.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/clip.py
    python bench/clip.py --rounds 9

bench/run.py's Dense workloads (float32, relu), ``net.train_step`` on one minibatch,
for plain SGD, SGD with momentum and Adam, each without clipping and with
``clip_grad_norm=1.0`` (a norm these random batches exceed, so every step is
clipped). Without clipping the update runs inside the backward sweep, layer by layer
(plain SGD fused into one product into W); with it every gradient is stored first,
then their global norm is summed, the gradients scaled, and the updates made.
Also timed, for reference: the same clipped step as the separate calls
(forward, loss, backward, ``bprop.clip_grad_norm``, ``opt.step()``), which is what
a PyTorch loop does. The variants alternate within each round; the figure is the
median over rounds of clipped time / unclipped time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

import bprop

sys.path.insert(0, os.path.dirname(__file__))
from run import WORKLOADS, interleaved, make_bprop  # noqa: E402

OPTIMIZERS = {
    "SGD": lambda net: bprop.optim.SGD(net, lr=0.01),
    "SGD momentum": lambda net: bprop.optim.SGD(net, lr=0.01, momentum=0.9),
    "Adam": lambda net: bprop.optim.Adam(net, lr=1e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--only", choices=["tiny", "small", "medium"], action="append")
    args = parser.parse_args()
    print(f"bprop {bprop.__version__}; load average {os.getloadavg()[0]:.2f}; "
          f"CPUs {len(os.sched_getaffinity(0))}")
    bprop.show_config()
    print(f"{'workload':8} {'optimizer':13} {'unclipped us':>12} {'clipped us':>11} "
          f"{'ratio':>6} {'separate calls us':>18}")
    rng = np.random.default_rng(0)
    for name in args.only or ["tiny", "small", "medium"]:
        sizes, batch = WORKLOADS[name]
        X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], batch)
        for opt_name, make_opt in OPTIMIZERS.items():
            nets = {k: make_bprop(sizes, "float32") for k in ("plain", "clip", "calls")}
            opts = {k: make_opt(n) for k, n in nets.items()}

            def separate():
                out = nets["calls"].forward(X)
                _, grad = bprop.losses.softmax_cross_entropy(out, y)
                nets["calls"].backward(grad)
                bprop.clip_grad_norm(nets["calls"], 1.0)
                opts["calls"].step()

            times = interleaved({
                "plain": lambda: nets["plain"].train_step(X, y, optimizer=opts["plain"]),
                "clip": lambda: nets["clip"].train_step(X, y, optimizer=opts["clip"],
                                                        clip_grad_norm=1.0),
                "calls": separate,
            }, args.rounds, args.min_time)
            ratio = statistics.median(c / p for c, p in zip(times["clip"], times["plain"]))
            print(f"{name:8} {opt_name:13} {statistics.median(times['plain']) * 1e6:12.1f} "
                  f"{statistics.median(times['clip']) * 1e6:11.1f} {ratio:6.2f} "
                  f"{statistics.median(times['calls']) * 1e6:18.1f}", flush=True)
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""What fit's checkpoint costs: one epoch of fit with and without checkpoint=.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/checkpoint.py
    python bench/checkpoint.py --rounds 5 --only small

bench/run.py's Dense workloads (float32, relu, Adam 1e-3): one epoch of
``bprop.fit`` over 64 minibatches (shuffled, no validation) without a checkpoint,
and with ``checkpoint=`` written every 1, 10 and 100 steps (and at the epoch's end,
which every checkpointed run also writes, with the final state). The variants
alternate within each round; the figures are medians over rounds: the epoch's time
per step, the ratio to the run without a checkpoint, and the cost of one write
((checkpointed - plain) / writes). The file goes to a temporary folder on the
same disk as the working directory (fsync included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import bprop

sys.path.insert(0, os.path.dirname(__file__))
from run import WORKLOADS, make_bprop  # noqa: E402

STEPS = 64
EVERY = [None, 100, 10, 1]


def one_epoch(sizes, X, y, batch, every, folder):
    net = make_bprop(sizes, "float32")
    opt = bprop.optim.Adam(net, lr=1e-3)
    path = None
    if every is not None:
        path = os.path.join(folder, "run.ckpt")
        if os.path.exists(path):
            os.remove(path)
    start = time.perf_counter()
    bprop.fit(net, X, y, optimizer=opt, epochs=1, batch_size=batch, seed=0,
              checkpoint=path, checkpoint_every=every)
    seconds = time.perf_counter() - start
    size = os.path.getsize(path) if path else 0
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["tiny", "small", "medium"], action="append")
    args = parser.parse_args()
    print(f"bprop {bprop.__version__}; load average {os.getloadavg()[0]:.2f}; "
          f"CPUs {len(os.sched_getaffinity(0))}")
    bprop.show_config()
    rng = np.random.default_rng(0)
    print(f"{'workload':8} {'checkpoint_every':>16} {'writes':>6} {'ms/step':>8} "
          f"{'x plain':>8} {'ms/write':>9} {'file MB':>8}")
    with tempfile.TemporaryDirectory(dir=".") as folder:
        for name in args.only or ["tiny", "small", "medium"]:
            sizes, batch = WORKLOADS[name]
            n = STEPS * batch
            X = rng.standard_normal((n, sizes[0])).astype(np.float32)
            y = rng.integers(0, sizes[-1], n)
            one_epoch(sizes, X, y, batch, None, folder)  # warm-up
            times = {every: [] for every in EVERY}
            sizes_mb = {}
            for _ in range(args.rounds):
                for every in EVERY:
                    seconds, size = one_epoch(sizes, X, y, batch, every, folder)
                    times[every].append(seconds)
                    sizes_mb[every] = size / 1e6
            plain = times[None]
            for every in EVERY:
                writes = 0 if every is None else (STEPS - 1) // every + 1
                ratio = statistics.median(t / p for t, p in zip(times[every], plain))
                per_write = (statistics.median(t - p for t, p in zip(times[every], plain))
                             / writes * 1e3 if writes else 0.0)
                label = "none" if every is None else str(every)
                print(f"{name:8} {label:>16} {writes:6d} "
                      f"{statistics.median(times[every]) / STEPS * 1e3:8.3f} {ratio:8.2f} "
                      f"{per_write:9.2f} {sizes_mb.get(every, 0):8.2f}", flush=True)
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

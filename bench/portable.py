"""Speed of a portable wheel against the native build, side by side.

    # build and install the portable wheel into its own venv, then:
    python bench/portable.py --portable /path/to/portable-venv/bin/python

The training step of each workload (net.train_step, plain SGD, float32) is timed
in both interpreters alternately, round by round; the figure is the median over
rounds of native time / portable time (1.0 = as fast as native). Each worker
also reports which core it loaded (bprop.show_config()).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
import bprop
WORKLOADS = {"tiny": ([784, 128, 10], 32), "small": ([784, 256, 256, 10], 128),
             "medium": ([1024, 1024, 1024, 10], 256), "large": ([1024, 4096, 4096, 10], 512),
             "digits": ([64, 128, 10], 32)}
name, seconds = sys.argv[1], float(sys.argv[2])
sizes, batch = WORKLOADS[name]
n = len(sizes) - 1
net = bprop.Network([bprop.Dense(a, b, activation="relu" if i < n - 1 else "identity")
                     for i, (a, b) in enumerate(zip(sizes, sizes[1:]))], seed=0)
opt = bprop.optim.SGD(net, lr=1e-3)
rng = np.random.default_rng(0)
X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
y = rng.integers(0, sizes[-1], batch).astype(np.int64)
step = lambda: net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)
step(); step()
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step(); count += 1
print(json.dumps({"time": (time.perf_counter() - start) / count,
                  "core": bprop._core.__name__ + " " + bprop._core.build_info()["arch_flags"]}))
"""


def run(python: str, name: str, seconds: float) -> dict:
    out = subprocess.run([python, "-c", WORKER, name, str(seconds)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--portable", required=True, help="python of the portable install")
    parser.add_argument("--native", default=sys.executable, help="python of the native install")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)

    print(f"{'workload':8s} {'native st/s':>12s} {'portable st/s':>14s} {'portable/native':>16s}")
    cores = set()
    for name in ("tiny", "small", "medium", "large", "digits"):
        native, portable = [], []
        seconds = args.seconds * (2 if name == "large" else 1)
        for _ in range(args.rounds):
            a = run(args.native, name, seconds)
            b = run(args.portable, name, seconds)
            native.append(a["time"])
            portable.append(b["time"])
            cores.update({f"native: {a['core']}", f"portable: {b['core']}"})
        ratio = statistics.median(n / p for n, p in zip(native, portable))
        print(f"{name:8s} {1 / statistics.median(native):12.1f} "
              f"{1 / statistics.median(portable):14.1f} {ratio:16.3f}", flush=True)
    print("cores loaded: " + "; ".join(sorted(cores)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of the portable wheel against a native build, side by side, on this machine.

    # a native wheel and the portable one, each in its own venv:
    pip wheel . --no-deps -w dist/native -Ccmake.define.BPROP_NATIVE=ON -Cbuild-dir=build/native
    bash tools/build_wheel.sh                      # -> dist/bprop-*-manylinux_*.whl
    python3 -m venv /tmp/native && /tmp/native/bin/pip install \
        "$(ls dist/native/bprop-*.whl)[demo]" threadpoolctl
    python3 -m venv /tmp/portable && /tmp/portable/bin/pip install \
        "$(ls dist/bprop-*manylinux*.whl)[demo]" threadpoolctl
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/portable.py \
        --native /tmp/native/bin/python --portable /tmp/portable/bin/python \
        [--baseline] [--threads 1] [--rounds 9]

Workloads: bench/run.py's (one float32 training step, net.train_step with SGD,
timed as bench/run.py times it) and the digits training of ``python -m bprop demo``
(its "training time", the demo's defaults; median of 7 fits after one warm-up). Each round runs every workload once in
each interpreter, in alternating order; the figure per workload is the median over
rounds of native time / portable time (portable/native speed; 1.0 = as fast as
native, the target is >= 0.95), with its range over rounds, and best/best, the
fastest native time over the fastest portable one (on a shared machine the fastest
run is the one least disturbed by other processes). ``--baseline`` adds a column
for the portable wheel forced to its baseline (SSE2) core (``BPROP_ISA=baseline``).
Each interpreter reports the core it loaded and the OpenBLAS kernels bprop and
NumPy use (threadpoolctl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ("tiny", "small", "medium", "large", "digits")

WORKER = r"""
import contextlib, io, json, os, re, statistics, sys
sys.path.insert(0, sys.argv[3])
import bprop
name, min_time, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[4])
if threads:
    bprop.set_num_threads(threads)
if name == "digits":
    from bprop.__main__ import _parser, demo
    args = _parser().parse_args(["demo", "--no-plot", "--no-progress"])
    times = []
    for _ in range(8):  # the first warms up
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            demo(args)
        times.append(float(re.search(r"training time: ([0-9.]+) s", out.getvalue()).group(1)))
        accuracy = re.search(r"test accuracy: ([0-9.]+)%", out.getvalue()).group(1)
    seconds = statistics.median(times[1:])
    extra = {"accuracy": accuracy}
else:
    import numpy as np
    from run import WORKLOADS, time_call  # bench/run.py: one table, one timer
    sizes, batch = WORKLOADS[name]
    n = len(sizes) - 1
    net = bprop.Network([bprop.Dense(a, b, activation="relu" if i < n - 1 else "identity")
                         for i, (a, b) in enumerate(zip(sizes, sizes[1:]))], seed=0)
    opt = bprop.optim.SGD(net, lr=1e-3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    seconds = time_call(lambda: net.train_step(X, y, loss="softmax_cross_entropy",
                                               optimizer=opt), min_time)
    extra = {}
info = bprop.config()
try:
    from threadpoolctl import threadpool_info
    blas = sorted({f"{os.path.basename(p['filepath'])}: {p.get('internal_api')} "
                   f"{p.get('version')} kernel {p.get('architecture')}, "
                   f"{p.get('num_threads')} threads"
                   for p in threadpool_info() if p.get("user_api") == "blas"})
except ImportError:
    blas = ["threadpoolctl not installed"]
print(json.dumps({"time": seconds, "core": f"{info['module']} ({info['arch_flags']})",
                  "blas": blas, **extra}))
"""


def run(python: str, name: str, min_time: float, threads: int, isa: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("BPROP_ISA", None)
    if isa:
        env["BPROP_ISA"] = isa
    out = subprocess.run([python, "-c", WORKER, name, str(min_time), BENCH, str(threads)], check=True,
                         capture_output=True, text=True, env=env, cwd=BENCH).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--portable", required=True, help="python of the portable install")
    parser.add_argument("--native", default=sys.executable, help="python of the native install")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="timing per step measurement (bench/run.py's min_time)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the portable wheel forced to its baseline core")
    parser.add_argument("--threads", type=int, default=0,
                        help="bprop.set_num_threads in every run (default: bprop's default)")
    parser.add_argument("--only", choices=WORKLOADS, action="append")
    args = parser.parse_args(argv)

    runs = {"native": (args.native, None), "portable": (args.portable, None)}
    if args.baseline:
        runs["baseline"] = (args.portable, "baseline")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS"):
        print(f"env: {var}={os.environ.get(var, '(unset)')}")
    header = f"{'workload':8s} {'native /s':>10s} {'portable /s':>12s}"
    header += f" {'baseline /s':>12s}" if args.baseline else ""
    header += f" {'portable/native':>16s} {'(min-max)':>12s} {'best/best':>10s}"
    header += f" {'baseline/native':>16s}" if args.baseline else ""
    print(f"load average at start: {os.getloadavg()[0]:.2f}; threads: "
          f"{args.threads or 'default'}")
    print(header)
    seen: dict[str, dict] = {}
    for name in args.only or WORKLOADS:
        times = {key: [] for key in runs}
        min_time = args.seconds * (2 if name == "large" else 1)
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for key in order:
                python, isa = runs[key]
                result = run(python, name, min_time, args.threads, isa)
                times[key].append(result["time"])
                seen.setdefault(key, result)  # core and BLAS of its first run
                if "accuracy" in result:
                    seen[key]["accuracy"] = result["accuracy"]
        ratios = [n / p for n, p in zip(times["native"], times["portable"])]
        line = (f"{name:8s} {1 / statistics.median(times['native']):10.1f} "
                f"{1 / statistics.median(times['portable']):12.1f}")
        if args.baseline:
            line += f" {1 / statistics.median(times['baseline']):12.1f}"
        line += (f" {statistics.median(ratios):16.3f} {min(ratios):6.2f}-{max(ratios):.2f}"
                 f" {min(times['native']) / min(times['portable']):10.3f}")
        if args.baseline:
            base = [n / b for n, b in zip(times["native"], times["baseline"])]
            line += f" {statistics.median(base):16.3f}"
        print(line, flush=True)
    print("(digits: trainings per second of the demo's fit, 60 epochs; steps per second "
          "otherwise)")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    for key, result in seen.items():
        print(f"{key}: core {result['core']}; " + "; ".join(result["blas"]))
        if "accuracy" in result:
            print(f"{key}: digits test accuracy {result['accuracy']}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

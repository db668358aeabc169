"""Ctrl-C during training (issue 10, item 5): how long a KeyboardInterrupt takes
to arrive, and what polling for it costs a small step.

    python bench/interrupt.py latency      # a full-batch step of several seconds, interrupted
    python bench/interrupt.py overhead     # small train_steps with and without polling

latency: one Adam train_step on a wide network and a big batch (about 5 s on a
loaded 2-vCPU VM); a timer thread sends the process a real SIGINT at a few
points of a step and the time from the signal to the KeyboardInterrupt is
printed, with the step's own length for scale.

overhead: per-call time of train_steps, interleaved round by round: as by
default ("polled"), with polling switched off ("off") and forced on for every
step ("forced", min_work 0), and for scale with a GIL round trip and a signal check
at every poll ("gil", interval 0: what a check per layer without the clock test
would cost); the median over rounds (and the ratios of the best rounds, the
least disturbed). Only steps with batch *
parameters >= min_work poll by default (``bprop._core.interrupt_polling``): of
these workloads the 1024-wide ones. A polling step shorter than the interval
(0.1 s) reads the clock between layers and never takes the GIL; the difference
polling makes is that the updates wait for the end of the backward sweep.

    python bench/interrupt.py --threads 1 overhead   # on a busy machine
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import threading
import time

import numpy as np

import bprop
from bprop import _core, optim


def _network(widths, activation="relu", seed=0):
    layers = [bprop.Dense(a, b, activation) for a, b in zip(widths[:-2], widths[1:-1])]
    layers.append(bprop.Dense(widths[-2], widths[-1]))
    return bprop.Network(layers, seed=seed)


def latency(args) -> None:
    widths = [args.width] * (args.layers + 1) + [10]
    net = _network(widths)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, args.width)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    opt = (optim.Adam(net, lr=1e-4) if args.optimizer == "adam"
           else optim.SGD(net, lr=1e-4))
    start = time.perf_counter()
    net.train_step(X, y, optimizer=opt)
    step = time.perf_counter() - start
    print(f"{args.layers} x Dense({args.width}, {args.width}) + Dense({args.width}, 10), "
          f"batch {args.batch}, {type(opt).__name__}: one step {step:.2f} s")
    for fraction in args.at:
        sent = []

        def interrupt(delay=fraction * step, sent=sent):
            time.sleep(delay)
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

        count = opt.step_count
        timer = threading.Thread(target=interrupt)
        timer.start()
        try:
            while True:
                net.train_step(X, y, optimizer=opt)
        except KeyboardInterrupt:
            raised = time.perf_counter()
        timer.join()
        print(f"  SIGINT {fraction:.0%} into a step: KeyboardInterrupt after "
              f"{raised - sent[0]:.3f} s ({opt.step_count - count} step(s) completed)")


def _per_call(fn, rounds_of: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < rounds_of:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def overhead(args) -> None:
    workloads = [("784-128-10 b32 Adam", [784, 128, 10], 32, "adam"),
                 ("784-128-10 b32 SGD", [784, 128, 10], 32, "sgd"),
                 ("784-256-256-10 b128 Adam", [784, 256, 256, 10], 128, "adam"),
                 ("1024-1024-1024-10 b256 Adam", [1024, 1024, 1024, 10], 256, "adam"),
                 ("1024-1024-1024-10 b256 SGD", [1024, 1024, 1024, 10], 256, "sgd")]
    default = _core.interrupt_polling()
    modes = {"off": (default[0], 2**62), "polled": default, "forced": (default[0], 0),
             "gil": (0.0, 0)}
    print(f"polling interval {default[0]} s, min_work {default[1]}"
          + (", a busy Python thread alongside" if args.busy else ""))
    stop = threading.Event()
    if args.busy:
        def spin():
            while not stop.is_set():
                sum(range(1000))
        threading.Thread(target=spin, daemon=True).start()
    for name, widths, batch, rule in workloads:
        net = _network(widths)
        rng = np.random.default_rng(0)
        X = rng.standard_normal((batch, widths[0])).astype(np.float32)
        y = rng.integers(0, widths[-1], batch)
        opt = optim.Adam(net, lr=1e-4) if rule == "adam" else optim.SGD(net, lr=1e-3)
        times = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, setting in modes.items():
                _core.interrupt_polling(*setting)
                step = lambda net=net, X=X, y=y, opt=opt: net.train_step(X, y, optimizer=opt)
                times[mode].append(_per_call(step, args.seconds))
        _core.interrupt_polling(*default)
        med = {m: statistics.median(t) for m, t in times.items()}
        best = {m: min(t) for m, t in times.items()}
        print(f"  {name:28s} " + "  ".join(f"{m} {v:7.1f}" for m, v in med.items())
              + f" us; polled/off {med['polled'] / med['off']:.3f}"
              f" forced/off {med['forced'] / med['off']:.3f}"
              f" gil/off {med['gil'] / med['off']:.3f}"
              f" (best rounds: {best['polled'] / best['off']:.3f}"
              f" {best['forced'] / best['off']:.3f} {best['gil'] / best['off']:.3f})")
    stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--width", type=int, default=2048)
    lat.add_argument("--batch", type=int, default=2048)
    lat.add_argument("--layers", type=int, default=4)
    lat.add_argument("--at", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    lat.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                     help="sgd: plain SGD, whose products into W follow the sweep unpolled")
    ovh = sub.add_parser("overhead")
    ovh.add_argument("--rounds", type=int, default=15)
    ovh.add_argument("--seconds", type=float, default=0.2)
    ovh.add_argument("--busy", action="store_true",
                     help="a second thread runs Python all the while: each look for signals "
                          "may wait up to the switch interval for the GIL")
    parser.add_argument("--threads", type=int, default=None,
                        help="GEMM threads (bprop.set_num_threads); 1 on a busy machine")
    args = parser.parse_args()
    if args.threads is not None:
        bprop.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"bprop {bprop.__version__}, {bprop.get_num_threads()} GEMM threads, "
          f"load {os.getloadavg()[0]:.1f}")
    latency(args) if args.what == "latency" else overhead(args)


if __name__ == "__main__":
    main()

"""What fit's anomaly check costs when it is off (issue 5, item 2: under 2%).

    python bench/check_finite_overhead.py            # about 40 s
    python bench/check_finite_overhead.py --quick

With check_finite=False, fit still does two things for the check: a boolean
test per step (`every_step and ...` in bprop/_loop.py's Loop.epoch) and, once per
epoch, one pass over the parameters (a finite loss can leave non-finite weights
behind). The baseline is the training loop compiled from bprop/_loop.py's own source
with exactly those two removed, which fit then uses; the two run the same batches
interleaved round by round, and the best (least disturbed) round of each is
compared. check_finite=True is shown for scale.

Two workloads: a tiny network (4-8-3, batch 32: a step is a few microseconds, so
per-step Python overhead shows most) and a digits-sized one (64-128-10, batch 64).
"""

from __future__ import annotations

import argparse
import inspect
import platform
import sys
import time
import types

import numpy as np

import bprop
from bprop import _loop, optim

STEP_CHECK = "if not isfinite(value) or (every_step and not _all_finite(params)):"
EPOCH_CHECK = "if params and not every_step and not _all_finite(params):"


class _Baseline:
    """bprop.fit with the training loop of bprop/_loop.py recompiled without the
    check_finite work of the check_finite=False path (swapped in around each call)."""

    def __init__(self) -> None:
        source = inspect.getsource(_loop)
        assert source.count(STEP_CHECK) == 1, "_loop.py changed: update STEP_CHECK"
        assert source.count(EPOCH_CHECK) == 1, "_loop.py changed: update EPOCH_CHECK"
        source = source.replace(STEP_CHECK, "if not isfinite(value):")
        source = source.replace(EPOCH_CHECK, "if False:")
        module = types.ModuleType("bprop._loop_baseline")
        module.__package__ = "bprop"
        module.__file__ = _loop.__file__
        sys.modules[module.__name__] = module
        exec(compile(source, _loop.__file__, "exec"), module.__dict__)
        self._epoch = module.Loop.epoch

    def fit(self, *args, **kwargs):
        original = _loop.Loop.epoch
        _loop.Loop.epoch = self._epoch
        try:
            return bprop.fit(*args, **kwargs)
        finally:
            _loop.Loop.epoch = original


def run(fit, spec, X, y, batch, epochs, check_finite=False) -> float:
    net = bprop.Network([bprop.Dense(*s) for s in spec], seed=0)
    opt = optim.Adam(net, lr=1e-3)
    t0 = time.perf_counter()
    fit(net, X, y, optimizer=opt, epochs=epochs, batch_size=batch, seed=0,
        check_finite=check_finite)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    base = _Baseline()
    rng = np.random.default_rng(0)
    workloads = [
        ("tiny 4-8-3, batch 32", [(4, 8, "tanh"), (8, 3)], 32, 32 * 1000, 2),
        ("digits-sized 64-128-10, batch 64", [(64, 128, "relu"), (128, 10)], 64, 64 * 300, 2),
    ]
    print(f"bprop {bprop.__version__}, Python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {bprop.get_num_threads()} BLAS threads")
    for name, spec, batch, n, epochs in workloads:
        X = rng.standard_normal((n, spec[0][0])).astype(np.float32)
        y = rng.integers(0, spec[-1][1], n)
        times = {"baseline (no check code)": [], "check_finite=False": [],
                 "check_finite=True": []}
        run(bprop.fit, spec, X, y, batch, 1)  # warm up
        for _ in range(rounds):
            times["baseline (no check code)"].append(run(base.fit, spec, X, y, batch, epochs))
            times["check_finite=False"].append(run(bprop.fit, spec, X, y, batch, epochs))
            times["check_finite=True"].append(run(bprop.fit, spec, X, y, batch, epochs, True))
        steps = epochs * -(-n // batch)
        best = {k: min(v) for k, v in times.items()}
        ref = best["baseline (no check code)"]
        print(f"\n{name}: {steps} steps, best of {rounds} rounds")
        for k, t in best.items():
            print(f"  {k:<26} {1e6 * t / steps:8.2f} us/step  {100 * (t / ref - 1):+6.2f}%")


if __name__ == "__main__":
    main()

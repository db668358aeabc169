"""bprop.sklearn's MLPClassifier against scikit-learn's own, as a user runs them.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/sklearn_speed.py
    python bench/sklearn_speed.py --repeats 5 --max-iter 20

The issue-11 workload: MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=20,
random_state=0) on make_classification(n_samples=20000, n_features=100,
n_informative=30, random_state=0), default threading for both libraries (bprop's
pool, NumPy's OpenBLAS pool for scikit-learn), in one process. Per dtype:
scikit-learn on float64 input against bprop's default, and scikit-learn on float32
input against bprop with dtype="float32". The fits alternate (sklearn, bprop,
sklearn, ...) so that both see the same machine; the figure is the ratio of the
medians (above 1: bprop is faster), with each side's range. Also printed: the
training accuracy each reaches (the two should be alike: the same objective,
initialisation and shuffling), the BLAS kernels threadpoolctl sees, and the load
average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier as SkMLPClassifier

import bprop
from bprop.sklearn import MLPClassifier


def blas_report() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    rows = []
    for i in threadpool_info():
        name = os.path.basename(i.get("filepath", "?"))
        rows.append(f"{i['user_api']}:{i.get('internal_api')} {name} "
                    f"threads={i.get('num_threads')} kernel={i.get('architecture')}")
    return "; ".join(rows)


def timed_fit(make, X, y):
    est = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        est.fit(X, y)
        return time.perf_counter() - start, est


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--dtype", choices=["float64", "float32"], action="append")
    args = parser.parse_args()

    X, y = make_classification(n_samples=args.samples, n_features=100, n_informative=30,
                               random_state=0)
    print(f"bprop {bprop.__version__}; scikit-learn {__import__('sklearn').__version__}; "
          f"NumPy {np.__version__}; load average {os.getloadavg()[0]:.2f}; "
          f"CPUs {len(os.sched_getaffinity(0))}")
    bprop.show_config()
    print(f"BLAS: {blas_report()}")
    print(f"MLPClassifier(hidden_layer_sizes=(256, 128), max_iter={args.max_iter}, "
          f"random_state=0) on {X.shape[0]} x 100 samples, {args.repeats} repeats\n")
    print(f"{'dtype':8} {'scikit-learn s (range)':>24} {'bprop s (range)':>22} "
          f"{'speed-up':>9} {'acc sk':>7} {'acc bprop':>9}")
    for dtype in args.dtype or ["float64", "float32"]:
        Xd = X.astype(dtype)

        def sk():
            return SkMLPClassifier(hidden_layer_sizes=(256, 128), max_iter=args.max_iter,
                                   random_state=0)

        def bp():
            return MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=args.max_iter,
                                 random_state=0, dtype=dtype)
        times = {"sk": [], "bp": []}
        models = {}
        for _ in range(args.repeats):
            for key, make in (("sk", sk), ("bp", bp)):
                t, models[key] = timed_fit(make, Xd, y)
                times[key].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        acc = {k: models[k].score(Xd, y) for k in models}
        print(f"{dtype:8} {med['sk']:8.2f} ({min(times['sk']):.2f}-{max(times['sk']):.2f})"
              f"{'':6} {med['bp']:7.2f} ({min(times['bp']):.2f}-{max(times['bp']):.2f})"
              f"{'':5} {med['sk'] / med['bp']:8.2f}x {acc['sk']:7.4f} {acc['bp']:9.4f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

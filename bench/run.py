"""One benchmark harness: bprop against its NumPy reference and PyTorch, side by side.

    python bench/run.py                 # everything (about 2-3 minutes on 2 cores)
    python bench/run.py --quick         # fewer repeats
    python bench/run.py --only tiny     # one workload
    python bench/run.py --threads 1     # bprop, NumPy's BLAS and PyTorch on one thread each

Every ratio is measured inside one run with the implementations interleaved
round by round (these machines are shared and noisy): each round times every
implementation once, and the reported figure is the median over rounds. Absolute
times are printed for reference only.

For NumPy timings, unset OPENBLAS_CORETYPE in the command that runs this script
(it may force a slower kernel); the kernel NumPy used is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

import bprop
from bprop import reference

WORKLOADS = {
    "tiny": ([784, 128, 10], 32),
    "small": ([784, 256, 256, 10], 128),
    "medium": ([1024, 1024, 1024, 10], 256),
    "large": ([1024, 4096, 4096, 10], 512),
    # each hidden layer a block [Dense, BatchNorm, ReLU, Dropout 0.2]
    "tiny-bn": ([784, 128, 10], 32),
    "small-bn": ([784, 512, 512, 10], 128),
}
DROPOUT = 0.2  # of the -bn workloads


# ---- timing ------------------------------------------------------------------------
# Idle BLAS threads (OpenBLAS in bprop and in NumPy, OpenMP in torch) keep spinning
# for a while after their last product, taking a core from whatever runs next; each
# measurement first runs its function this long so that the previous one's threads
# have gone to sleep.
SETTLE_SECONDS = 0.25


def time_call(fn, min_time: float) -> float:
    """Seconds per call: runs fn for SETTLE_SECONDS, then in a loop for at least
    min_time; the best of two loops."""
    start = time.perf_counter()
    while time.perf_counter() - start < SETTLE_SECONDS:
        fn()
    best = float("inf")
    for _ in range(2):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time / 2:
                break
        best = min(best, elapsed / n)
    return best


def interleaved(fns: dict, rounds: int, min_time: float) -> dict:
    """Per-round times of each function, the functions alternating within a round."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_call(fn, min_time))
    return times


def median_ratio(slow: list, fast: list) -> float:
    return statistics.median(s / f for s, f in zip(slow, fast))


# ---- the implementations -----------------------------------------------------------
def layer_specs(sizes):
    n = len(sizes) - 1
    return [(a, b, "relu" if i < n - 1 else "identity") for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]


def _layers(lib, sizes, blocks):
    """Dense layers (relu between them), or with `blocks` each hidden layer as
    Dense, BatchNorm, ReLU, Dropout; `lib` is bprop or bprop.reference."""
    layers = []
    for a, b, act in layer_specs(sizes):
        if blocks and act == "relu":
            layers += [lib.Dense(a, b), lib.BatchNorm(b), lib.Activation("relu"),
                       lib.Dropout(DROPOUT)]
        else:
            layers.append(lib.Dense(a, b, activation=act))
    return layers


def make_bprop(sizes, dtype, seed=0, blocks=False):
    return bprop.Network(_layers(bprop, sizes, blocks), dtype=dtype, seed=seed)


def make_reference(sizes, dtype, seed=0, blocks=False):
    return reference.Network(_layers(reference, sizes, blocks), dtype=dtype, seed=seed)


def make_torch(sizes, dtype, blocks=False):
    import torch

    mods = []
    for a, b, act in layer_specs(sizes):
        mods.append(torch.nn.Linear(a, b, dtype=getattr(torch, dtype)))
        if act == "relu":
            if blocks:
                mods.append(torch.nn.BatchNorm1d(b, dtype=getattr(torch, dtype)))
            mods.append(torch.nn.ReLU())
            if blocks:
                mods.append(torch.nn.Dropout(DROPOUT))
    return torch.nn.Sequential(*mods)  # in training mode, as bprop's network


def workload_flops(sizes, batch) -> float:
    """FLOPs of the matrix products of one training step, as all three
    implementations do them: the forward products, dL/dW = a^T delta for every
    layer, and delta W^T for every layer but the first (nobody needs dL/dX)."""
    products = [2.0 * batch * a * b for a, b in zip(sizes, sizes[1:])]
    return 3.0 * sum(products) - products[0]


def bench_workload(name, sizes, batch, rounds, min_time, torch_ok):
    lr = 1e-3
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)

    blocks = name.endswith("-bn")
    net = make_bprop(sizes, "float32", blocks=blocks)
    opt = bprop.optim.SGD(net, lr=lr)
    ref = make_reference(sizes, "float32", blocks=blocks)

    def bprop_loop():  # the plain four calls from Python
        out = net.forward(X)
        _, grad = bprop.losses.softmax_cross_entropy(out, y)
        net.backward(grad)
        net.step(lr)

    def bprop_one_call():
        net.train_step(X, y, loss="softmax_cross_entropy", optimizer=opt)

    def numpy_step():
        out = ref.forward(X)
        _, grad = reference.softmax_cross_entropy(out, y)
        ref.backward(grad)
        ref.step(lr)

    fns = {"bprop": bprop_one_call, "bprop_loop": bprop_loop, "numpy": numpy_step}
    if torch_ok:
        import torch

        tnet = make_torch(sizes, "float32", blocks=blocks)
        topt = torch.optim.SGD(tnet.parameters(), lr=lr)
        tloss = torch.nn.CrossEntropyLoss()
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

        def torch_step():
            topt.zero_grad(set_to_none=True)
            tloss(tnet(Xt), yt).backward()
            topt.step()

        fns["torch"] = torch_step

    # forward-only and backward-only, for the backward/forward ratio
    out = net.forward(X)
    _, grad = bprop.losses.softmax_cross_entropy(out, y)
    fns["fwd"] = lambda: net.forward(X)
    fns["bwd"] = lambda: net.backward(grad)

    if name in ("medium", "large"):
        net64 = make_bprop(sizes, "float64")
        opt64 = bprop.optim.SGD(net64, lr=lr)
        X64 = X.astype(np.float64)
        fns["bprop_f64"] = lambda: net64.train_step(X64, y, loss="softmax_cross_entropy",
                                                    optimizer=opt64)

    times = interleaved(fns, rounds, min_time)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = workload_flops(sizes, batch)
    row = {
        "name": name,
        "steps": {k: 1.0 / med[k] for k in ("bprop", "bprop_loop", "numpy", "torch") if k in med},
        "gflops": flops / med["bprop"] / 1e9,
        "vs_numpy": median_ratio(times["numpy"], times["bprop"]),
        "loop_vs_numpy": median_ratio(times["numpy"], times["bprop_loop"]),
        "bwd_fwd": median_ratio(times["bwd"], times["fwd"]),
    }
    if "torch" in times:
        row["vs_torch"] = median_ratio(times["torch"], times["bprop"])
        row["loop_vs_torch"] = median_ratio(times["torch"], times["bprop_loop"])
        row["torch_gflops"] = flops / med["torch"] / 1e9
    if "bprop_f64" in times:
        row["f64_f32"] = median_ratio(times["bprop_f64"], times["bprop"])
    return row


def gemm_peak(rounds) -> float:
    """GFLOP/s of a float32 2048^3 matrix product through NumPy: the machine's peak
    as this run sees it."""
    n = 2048
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n), dtype=np.float32)
    B = rng.standard_normal((n, n), dtype=np.float32)
    best = min(time_call(lambda: A @ B, 0.5) for _ in range(rounds))
    return 2.0 * n**3 / best / 1e9


def bprop_gemm(rounds) -> float:
    """The same product through bprop's own OpenBLAS (a one-layer predict), for
    comparison with NumPy's."""
    n = 2048
    net = bprop.Network([bprop.Dense(n, n)], seed=0)
    A = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(time_call(lambda: net.predict(A), 0.5) for _ in range(rounds))
    return 2.0 * n**3 / best / 1e9


def bench_digits(epochs, rounds):
    """The training issue's demo settings: 64-128-10 ReLU, Adam 1e-3, batch 32."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)

    def run_bprop():
        net = bprop.Network([bprop.Dense(64, 128, activation="relu"), bprop.Dense(128, 10)],
                            seed=0)
        opt = bprop.optim.Adam(net, lr=1e-3)
        bprop.fit(net, Xtr, ytr, loss="softmax_cross_entropy", optimizer=opt, epochs=epochs,
                  batch_size=32, shuffle=True, seed=0)
        return float((net.predict(Xte).argmax(1) == yte).mean())

    def run_sklearn():
        clf = MLPClassifier(hidden_layer_sizes=(128,), activation="relu", solver="adam",
                            alpha=0.0, batch_size=32, learning_rate_init=1e-3, max_iter=epochs,
                            shuffle=True, random_state=0, tol=0.0, n_iter_no_change=epochs + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(Xtr, ytr)
        return float(clf.score(Xte, yte))

    tb, ts, accs = [], [], {}
    for _ in range(rounds):
        start = time.perf_counter()
        accs["bprop"] = run_bprop()
        tb.append(time.perf_counter() - start)
        start = time.perf_counter()
        accs["sklearn"] = run_sklearn()
        ts.append(time.perf_counter() - start)
    return {"bprop_s": statistics.median(tb), "sklearn_s": statistics.median(ts),
            "ratio": median_ratio(ts, tb), "acc": accs}


# ---- report -------------------------------------------------------------------------
def machine_report(torch_ok):
    from threadpoolctl import threadpool_info

    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "baseline")
    print(f"machine : {cpu}, {os.cpu_count()} logical CPUs, widest ISA {isa}, {platform.system()}")
    print(f"python  : {platform.python_version()}, numpy {np.__version__}", end="")
    if torch_ok:
        import torch

        print(f", torch {torch.__version__} ({torch.get_num_threads()} threads)", end="")
    print()
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            print(f"blas    : {pool.get('internal_api')} {pool.get('version')} "
                  f"kernel={pool.get('architecture')} threads={pool.get('num_threads')} "
                  f"({os.path.basename(pool.get('filepath', ''))})")
    print(f"env     : OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("bprop   : ", end="")
    bprop.show_config()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--only", choices=list(WORKLOADS) + ["digits"], action="append")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--threads", type=int,
                        help="threads for all three (bprop.set_num_threads, NumPy's BLAS "
                             "through threadpoolctl, torch.set_num_threads); on a machine "
                             "that other jobs keep busy, 1 compares the implementations "
                             "without their thread pools' contention")
    args = parser.parse_args(argv)
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        bprop.set_num_threads(args.threads)
        threadpool_limits(args.threads, user_api="blas")  # NumPy's (bprop's stays at 1)

    torch_ok = False
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            torch_ok = True
            if args.threads is not None:
                torch.set_num_threads(args.threads)
        except ImportError:
            print("torch not installed: PyTorch columns skipped (pip install torch==2.13.0)")
    rounds = 3 if args.quick else 5
    min_time = 0.15 if args.quick else 0.3

    machine_report(torch_ok)
    peak = gemm_peak(rounds)
    own = bprop_gemm(rounds)
    print(f"\npeak    : float32 2048^3 GEMM through NumPy: {peak:.0f} GFLOP/s (best of {rounds}); "
          f"through bprop's core: {own:.0f} GFLOP/s\n")

    names = [n for n in WORKLOADS if not args.only or n in args.only]
    header = (f"{'workload':8s} {'bprop st/s':>10s} {'loop st/s':>10s} {'numpy st/s':>10s} "
              f"{'torch st/s':>10s} {'x numpy':>8s} {'x torch':>8s} {'loop x t':>8s} "
              f"{'GFLOP/s':>8s} {'% peak':>7s} {'bwd/fwd':>7s} {'f64/f32':>7s}")
    if names:
        print(header)
        print("-" * len(header))
    for name in names:
        sizes, batch = WORKLOADS[name]
        large = name == "large"
        r = bench_workload(name, sizes, batch, rounds if not large else max(3, rounds - 2),
                           min_time if not large else 2 * min_time, torch_ok)
        s = r["steps"]
        fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
        print(f"{name:8s} {s['bprop']:10.1f} {s['bprop_loop']:10.1f} {s['numpy']:10.1f} "
              f"{fmt(s.get('torch'), '%10.1f'):>10s} {r['vs_numpy']:8.2f} "
              f"{fmt(r.get('vs_torch'), '%8.2f'):>8s} {fmt(r.get('loop_vs_torch'), '%8.2f'):>8s} "
              f"{r['gflops']:8.1f} {100 * r['gflops'] / peak:6.1f}% {r['bwd_fwd']:7.2f} "
              f"{fmt(r.get('f64_f32'), '%7.2f'):>7s}", flush=True)
    if names:
        print("\nbprop = net.train_step (one C++ call, SGD fused into the backward sweep); "
              "loop = forward, loss, backward, step from Python;\nx numpy / x torch = "
              "median over rounds of (their time / bprop's time); % peak = bprop GFLOP/s / "
              "the GEMM peak above;\n-bn: each hidden layer Dense, BatchNorm, ReLU, "
              f"Dropout {DROPOUT} (training mode in all three; GFLOP/s counts the products "
              "only).")

    if not args.only or "digits" in args.only:
        try:
            d = bench_digits(60, 1 if args.quick else 3)
        except ImportError as exc:
            print(f"\ndigits  : skipped ({exc})")
        else:
            print(f"\ndigits  : 64-128-10 ReLU, Adam 1e-3, 60 epochs, batch 32: bprop "
                  f"{d['bprop_s']:.2f} s, scikit-learn MLPClassifier {d['sklearn_s']:.2f} s, "
                  f"ratio {d['ratio']:.1f}x (median of rounds); test accuracy bprop "
                  f"{d['acc']['bprop']:.4f}, sklearn {d['acc']['sklearn']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

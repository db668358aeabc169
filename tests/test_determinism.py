"""Bitwise-identical results for any thread count (issue 11).

Every matrix product is cut into tiles whose shapes depend on (m, n, k) alone; each
tile is one single-threaded OpenBLAS call over the whole inner dimension, and
bprop's pool only decides which thread runs which tile. Reductions (column sums,
losses) run in a fixed order on one thread. So weights, optimizer state, History
and predictions are the same bits with 1, 2, 3 or 4 threads (3 and 4 on a 2-core
machine are slow but must agree).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bprop
from bprop import _core, losses, optim

THREADS = (1, 2, 3, 4)

OPTIMIZERS = {
    "sgd-fused": lambda n: optim.SGD(n, lr=0.05),
    "sgd-momentum": lambda n: optim.SGD(n, lr=0.05, momentum=0.9),
    "sgd-nesterov-decay": lambda n: optim.SGD(n, lr=0.05, momentum=0.9, nesterov=True,
                                              weight_decay=1e-3),
    "adam": lambda n: optim.Adam(n, lr=1e-2),
    "adamw": lambda n: optim.AdamW(n, lr=1e-2, weight_decay=1e-2),
    "rmsprop": lambda n: optim.RMSprop(n, lr=1e-3),
    "rmsprop-centered-momentum": lambda n: optim.RMSprop(n, lr=1e-3, centered=True,
                                                         momentum=0.5),
}

# Wide enough that most products are cut into several tiles (checked below)
SPECS = [(64, 384, "gelu"), (384, 256, "tanh"), (256, 10)]


def _products(specs, batch):
    """(m, n, k, trans_a, trans_b) of every product of a training step: forward
    a W, delta W^T, a^T delta."""
    out = []
    for i, (n_in, n_out, *_) in enumerate(specs):
        out.append((batch, n_out, n_in, False, False))
        if i > 0:
            out.append((batch, n_in, n_out, False, True))
        out.append((n_in, n_out, batch, True, False))
    return out


def _tiles(m, n, k, trans_a, trans_b, dtype):
    _, _, row_blocks, col_blocks = _core._gemm_tiles(m, n, k, np.dtype(dtype).itemsize,
                                                     trans_a, trans_b)
    return row_blocks * col_blocks


def _assert_tiled(specs, batch, dtype):
    """The comparison is not vacuous: some product of the step has several tiles."""
    counts = [_tiles(*p, dtype) for p in _products(specs, batch)]
    assert max(counts) >= 2, counts


def _data(n=600, features=64, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


def _fit(dtype, make_optimizer, X, y, batch_size, loss="softmax_cross_entropy",
         specs=SPECS):
    net = bprop.Network([bprop.Dense(*s) for s in specs], dtype=dtype, seed=7)
    opt = make_optimizer(net)
    history = bprop.fit(net, X, y, loss=loss, optimizer=opt, epochs=2, batch_size=batch_size,
                        seed=3, validation_split=0.2, metrics=["accuracy"])
    return net, opt, history


def _predictions(net, X):
    return [net.predict(X).tobytes(), net.predict(X, batch_size=37).tobytes()]


def _per_thread_count(threads, run):
    """run() once per thread count; returns {threads: result}."""
    results = {}
    for n in THREADS:
        threads(n)
        results[n] = run()
        assert bprop.get_num_threads() == n
    return results


def _assert_all_equal(results):
    first = results[THREADS[0]]
    for n, other in results.items():
        assert len(other) == len(first)
        for i, (a, b) in enumerate(zip(first, other)):
            assert a == b, f"item {i} differs between {THREADS[0]} and {n} threads"


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_gives_the_same_bits_for_1_to_4_threads(threads, fingerprint, dtype, optimizer):
    X, y = _data()
    # 480 training rows in batches of 100: four full ones and one of 80
    _assert_tiled(SPECS, 100, dtype)

    def run():
        net, opt, history = _fit(dtype, OPTIMIZERS[optimizer], X, y, batch_size=100)
        return fingerprint(net, opt, history) + _predictions(net, X)

    _assert_all_equal(_per_thread_count(threads, run))


# float32 Adam over every batch size; float64 and SGD with momentum over a size on
# the grid, one off it, and one whose rows are cut into two blocks
BATCH_CASES = ([(b, "float32", "adam") for b in (1, 16, 100, 128, 129, 256, 300, 480)]
               + [(b, dtype, opt) for b in (128, 129, 300)
                  for dtype, opt in (("float64", "adam"), ("float32", "sgd-momentum"),
                                     ("float64", "sgd-momentum"))])


@pytest.mark.parametrize("batch_size,dtype,optimizer", BATCH_CASES)
def test_batch_sizes_on_and_off_the_tile_grid_give_the_same_bits(threads, fingerprint,
                                                                 batch_size, dtype, optimizer):
    X, y = _data()
    if batch_size in (300, 480):
        # some product over the batch's rows is cut into row blocks: 160 + 140 rows
        # (not a multiple of the tiling's alignment, 16), 240 + 240
        itemsize = np.dtype(dtype).itemsize
        assert any(_core._gemm_tiles(m, n, k, itemsize, ta, tb)[2] > 1
                   for m, n, k, ta, tb in _products(SPECS, batch_size) if m == batch_size)

    def run():
        net, opt, history = _fit(dtype, OPTIMIZERS[optimizer], X, y, batch_size=batch_size)
        return fingerprint(net, opt, history) + _predictions(net, X)

    _assert_all_equal(_per_thread_count(threads, run))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_other_losses_and_the_four_call_loop_give_the_same_bits(threads, fingerprint, dtype):
    """Mean squared error and binary cross-entropy in the core; a user loss through
    forward, backward and optimizer.step() from Python."""
    X, y = _data()
    Y = np.eye(10)[y]

    def user_loss(output, target, sample_weight=None):
        return losses.mean_squared_error(output, target, sample_weight)

    def run():
        out = []
        for loss in ("mean_squared_error", "binary_cross_entropy_with_logits", user_loss):
            net, opt, history = _fit(dtype, OPTIMIZERS["adam"], X, Y, batch_size=100, loss=loss)
            out += fingerprint(net, opt, history)
        return out

    _assert_all_equal(_per_thread_count(threads, run))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_including_the_input_gradient_give_the_same_bits(threads, dtype):
    X, y = _data(n=200)
    X = X.astype(dtype)
    net = bprop.Network([bprop.Dense(*s) for s in SPECS], dtype=dtype, seed=1)

    def run():
        out = net.forward(X)
        _, grad = losses.softmax_cross_entropy(out, y)
        grad_input = net.backward(grad, input_grad=True)
        return [out.tobytes(), grad_input.tobytes()] + [g.tobytes()
                                                        for _, _, g in net.parameters()]

    _assert_all_equal(_per_thread_count(threads, run))


# The workloads of bench/run.py, a few steps each (large: two, float32 only).
WORKLOADS = {
    "tiny": ([784, 128, 10], 32, 4, ("float32", "float64")),
    "small": ([784, 256, 256, 10], 128, 4, ("float32", "float64")),
    "medium": ([1024, 1024, 1024, 10], 256, 3, ("float32", "float64")),
    "large": ([1024, 4096, 4096, 10], 512, 2, ("float32",)),
}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_workloads_give_the_same_bits(threads, workload):
    sizes, batch, steps, dtypes = WORKLOADS[workload]
    specs = [(a, b, "relu" if i < len(sizes) - 2 else "identity")
             for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
    rng = np.random.default_rng(2)
    X64 = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], batch)
    for dtype in dtypes:
        _assert_tiled(specs, batch, dtype)
        X = X64.astype(dtype)
        net = bprop.Network([bprop.Dense(*s) for s in specs], dtype=dtype, seed=0)
        initial = [p.copy() for _, p, _ in net.parameters()]

        def run(net=net, initial=initial, X=X):
            for (_, p, _), p0 in zip(net.parameters(), initial):
                p[...] = p0
            sgd, adam = optim.SGD(net, lr=1e-3), optim.Adam(net, lr=1e-3)
            out = [repr(net.train_step(X, y, optimizer=sgd))]  # fused SGD
            out += [repr(net.train_step(X, y, optimizer=adam)) for _ in range(steps - 1)]
            out += [p.tobytes() for _, p, _ in net.parameters()]
            sd = adam.state_dict()["state"]
            out += [sd[p][k].tobytes() for p in sorted(sd) for k in sorted(sd[p])]
            return out + [net.predict(X).tobytes()]

        _assert_all_equal(_per_thread_count(threads, run))


def test_the_issue_workload_gives_the_same_bits_for_1_and_2_threads(threads, fingerprint):
    """Issue 11's own case, where 1 and 2 threads ended 2.7e-3 apart: 784-256-256-10,
    Adam 1e-3, 2 epochs over 4096 random samples in batches of 128, float32."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4096, 784)).astype(np.float32)
    y = rng.integers(0, 10, 4096)
    specs = [(784, 256, "relu"), (256, 256, "relu"), (256, 10)]
    _assert_tiled(specs, 128, "float32")
    results = {}
    for n in (1, 2):
        threads(n)
        net = bprop.Network([bprop.Dense(*s) for s in specs], dtype="float32", seed=0)
        opt = optim.Adam(net, lr=1e-3)
        history = bprop.fit(net, X, y, loss="softmax_cross_entropy", optimizer=opt, epochs=2,
                            batch_size=128, seed=0)
        results[n] = fingerprint(net, opt, history) + [net.predict(X[:512]).tobytes()]
    for i, (a, b) in enumerate(zip(results[1], results[2])):
        assert a == b, f"item {i} differs between 1 and 2 threads"


# scikit-learn's estimators: (estimator, solver, dtype); float32 through the
# estimator's dtype parameter
ESTIMATOR_CASES = [(est, solver, dtype) for dtype in ("float32", "float64")
                   for est, solver in (("MLPClassifier", "adam"), ("MLPClassifier", "sgd"),
                                       ("MLPClassifier", "lbfgs"), ("MLPRegressor", "adam"))]


@pytest.mark.parametrize("estimator,solver,dtype", ESTIMATOR_CASES)
def test_sklearn_estimators_give_the_same_bits_for_1_to_4_threads(threads, estimator, solver,
                                                                   dtype):
    pytest.importorskip("sklearn")
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from bprop import sklearn as bprop_sklearn

    X, y = _data()
    Estimator = getattr(bprop_sklearn, estimator)
    if estimator == "MLPRegressor":
        y = np.eye(10)[y] + 0.1 * X[:, :10]
    hidden = tuple(n_out for _, n_out, *_ in SPECS[:-1])  # (384, 256): products in tiles
    _assert_tiled(SPECS, 100, dtype)

    def run():
        est = Estimator(hidden_layer_sizes=hidden, solver=solver, alpha=1e-3, batch_size=100,
                        max_iter=3, tol=0.0, n_iter_no_change=100, random_state=0,
                        dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
        out = [a.tobytes() for a in est.coefs_ + est.intercepts_]
        out += [repr(getattr(est, "loss_curve_", None)), repr(est.loss_),
                est.predict(X).tobytes()]
        if estimator == "MLPClassifier":
            out.append(est.predict_proba(X).tobytes())
        return out

    _assert_all_equal(_per_thread_count(threads, run))


# ---- the tiled product itself -----------------------------------------------------------
SHAPES = [(1, 1, 1), (7, 5, 3), (32, 128, 784), (33, 130, 785), (784, 128, 32),
          (128, 256, 784), (200, 300, 100), (129, 257, 255), (300, 513, 129), (1000, 64, 64)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_each_tile_is_one_openblas_call_and_the_thread_count_changes_no_bit(
        threads, dtype, trans_a, trans_b):
    """The tiled product equals, tile by tile, one single-threaded OpenBLAS call on
    that tile's rows of op(A) and columns of op(B) (copied elsewhere, so computed at
    other addresses): a tile's bits depend on its shape and values only, not on the
    thread that computes it. And the whole product is the same bits for 1-4 threads."""
    rng = np.random.default_rng(3)
    split = 0
    for m, n, k in SHAPES:
        opA = rng.standard_normal((m, k)).astype(dtype)
        opB = rng.standard_normal((k, n)).astype(dtype)
        A = np.ascontiguousarray(opA.T) if trans_a else opA
        B = np.ascontiguousarray(opB.T) if trans_b else opB
        C0 = rng.standard_normal((m, n)).astype(dtype)
        results = {}
        for t in THREADS:
            threads(t)
            C = C0.copy()
            _core._gemm(A, B, C, trans_a, trans_b, 0.75, -0.5)
            results[t] = C
        for t in THREADS:
            assert results[t].tobytes() == results[1].tobytes(), (m, n, k, t)
        rows, cols, row_blocks, col_blocks = _core._gemm_tiles(m, n, k, np.dtype(dtype).itemsize,
                                                               trans_a, trans_b)
        split += row_blocks * col_blocks > 1
        for i in range(0, m, rows):
            for j in range(0, n, cols):
                a = np.ascontiguousarray(opA[i:i + rows])
                b = np.ascontiguousarray(opB[:, j:j + cols])
                a = np.ascontiguousarray(a.T) if trans_a else a
                b = np.ascontiguousarray(b.T) if trans_b else b
                tile = C0[i:i + rows, j:j + cols].copy()
                _core._gemm(a, b, tile, trans_a, trans_b, 0.75, -0.5, 1)  # one OpenBLAS call
                assert tile.tobytes() == results[1][i:i + rows, j:j + cols].tobytes(), (m, n, k,
                                                                                        i, j)
        np.testing.assert_allclose(results[1], 0.75 * (opA.astype(np.float64) @ opB) - 0.5 * C0,
                                   rtol=1e-4 if dtype == "float32" else 1e-12,
                                   atol=(1e-4 if dtype == "float32" else 1e-12) * k)
    assert split >= 4


def test_tile_shapes_depend_on_the_product_shape_only(threads):
    shapes = [(m, n, k) for m in (1, 32, 100, 512) for n in (10, 256, 4096) for k in (32, 1024)]
    plans = {}
    for t in THREADS:
        threads(t)
        plans[t] = [_core._gemm_tiles(*s, size, ta, tb) for s in shapes for size in (4, 8)
                    for ta in (False, True) for tb in (False, True)]
    assert all(plans[t] == plans[1] for t in THREADS)
    for (m, n, k) in shapes:
        rows, cols, row_blocks, col_blocks = _core._gemm_tiles(m, n, k, 4)
        assert 1 <= rows <= m and 1 <= cols <= n
        assert (row_blocks - 1) * rows < m <= row_blocks * rows
        assert (col_blocks - 1) * cols < n <= col_blocks * cols


# ---- the pool across fork() -----------------------------------------------------------
FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys
    import numpy as np
    import bprop
    from bprop import _core

    bprop.set_num_threads(2)
    rng = np.random.default_rng(0)
    A = rng.standard_normal((256, 512)).astype(np.float32)
    B = rng.standard_normal((512, 384)).astype(np.float32)

    def product():
        C = np.empty((256, 384), np.float32)
        _core._gemm(A, B, C)
        return C.tobytes()

    assert _core._gemm_tiles(256, 384, 512, 4)[2:] != (1, 1)
    want = product()  # the pool's workers are running now
    pid = os.fork()
    if pid == 0:  # the child: one thread, a pool to restart
        ok = product() == want and bprop.get_num_threads() == 2
        bprop.set_num_threads(3)
        ok = ok and product() == want
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert product() == want  # the parent's pool restarted too

    def child(queue):
        queue.put(product() == want)

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=child, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(results), results
    print("ok")
""")


def test_a_forked_child_computes_with_a_restarted_pool():
    """Regression guard: a child forked while bprop's workers exist has none of them
    (fork copies only the calling thread); the pool stops its workers before fork and
    both processes restart them on first use, instead of waiting forever on threads
    that do not exist."""
    env = dict(os.environ)
    env.pop("BPROP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

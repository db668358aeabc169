"""Runs under mpiexec for tests/test_sparse_gradcheck_mpi.py (not collected by pytest).

    mpiexec -n N python -m mpi4py tests/mpi_sparse_worker.py SCENARIO

Scenarios (rank 0 prints one RESULT line, JSON):
    fit     data-parallel fit on a sparse X (and sparse validation data) against
            the same fit on the dense X over the same ranks, and against one
            process on the dense X; X's toarray and todense refuse to run
    errors  sparse X on some ranks only, a first layer other than Dense, an
            invalid CSR matrix on one rank, int32 and int64 indices mixed:
            every rank's outcome
"""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np
import scipy.sparse as sp
from mpi4py import MPI

import bprop
from bprop import optim

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def network(seed, n_in=5, n_out=3):
    return bprop.Network([bprop.Dense(n_in, 8, "tanh"), bprop.Dense(8, 6, "relu"),
                          bprop.Dense(6, n_out)], dtype="float64", seed=seed)


def layer_network(seed, n_in=5, n_out=3):
    """BatchNorm, Dropout, a Residual with a Dropout inside and LayerNorm after the
    first Dense (the only layer that takes a sparse X). That Dense has no bias: before
    a BatchNorm a bias's gradient is 0 up to rounding, which Adam's normalised step
    would turn into steps that follow the rounding (the BLAS's summation order)."""
    return bprop.Network([
        bprop.Dense(n_in, 8, bias=False), bprop.BatchNorm(8, momentum=0.2),
        bprop.Activation("tanh"),
        bprop.Dropout(0.3),
        bprop.Residual([bprop.Dense(8, 8, "relu"), bprop.Dropout(0.2)]),
        bprop.LayerNorm(8), bprop.Dense(8, n_out)], dtype="float64", seed=seed)


def user_mse(output, target, sample_weight=None):
    diff = output - target
    return float(np.mean(diff * diff)), 2.0 * diff / diff.size


def data(n, loss, seed, n_in=5, n_out=3):
    """A dense X with about 60% zeros and empty rows (every 7th), and its targets."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in))
    X[rng.random((n, n_in)) < 0.6] = 0.0
    X[::7] = 0.0
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, n_out, n)
    elif loss == "binary_cross_entropy_with_logits":
        y = (rng.random((n, n_out)) < 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((n, n_out))
    return X, y


def sparse(X, index=np.int32, fmt="csr"):
    S = sp.csr_matrix(X)
    S.indices, S.indptr = S.indices.astype(index), S.indptr.astype(index)
    return S.asformat(fmt)


# (name, network, optimizer, fit arguments, steps). With 2 ranks:
CASES = [
    # 47 rows, batch 10: 10 10 10 10 7; 7 -> 4 3. Sparse validation data.
    ("sgd", network, lambda net: optim.SGD(net, lr=0.5),
     dict(n=47, loss="softmax_cross_entropy", batch_size=10, metrics=["accuracy"], val=11), 5),
    # 41 rows, batch 10: the last minibatch has 1 row, rank 1 gets none; int64 indices
    ("adam-int64", network, lambda net: optim.Adam(net, lr=0.05),
     dict(n=41, loss="mean_squared_error", batch_size=10, metrics=["mse"], val=7,
          index=np.int64), 5),
    # 55 rows, validation_split 0.2 -> 44 for training, batch 9; weights with zeros; CSC
    # converted to CSR once
    ("adam-weighted-csc", network, lambda net: optim.Adam(net, lr=0.05, weight_decay=0.01),
     dict(n=55, loss="binary_cross_entropy_with_logits", batch_size=9, metrics=["accuracy"],
          validation_split=0.2, weighted=True, fmt="csc"), 5),
    # batch 1: rank 1 has no row in any step, the first included
    ("sgd-nesterov-batch1", network,
     lambda net: optim.SGD(net, lr=0.1, momentum=0.9, nesterov=True),
     dict(n=6, loss="softmax_cross_entropy", batch_size=1), 6),
    # a loss of the user's, run from Python
    ("adam-user-loss", network, lambda net: optim.Adam(net, lr=0.05),
     dict(n=47, loss=user_mse, batch_size=10), 5),
    # 3 epochs of 20 rows in batches of 7, reshuffled each epoch, early stopping
    ("adam-3-epochs", network, lambda net: optim.Adam(net, lr=0.05),
     dict(n=20, loss="mean_squared_error", batch_size=7, epochs=3, early_stopping=1, val=9), 9),
    # BatchNorm, Dropout, Residual, LayerNorm: each rank normalises its own rows, so
    # compared with the dense X over the same ranks only
    ("layers", layer_network, lambda net: optim.Adam(net, lr=0.05),
     dict(n=54, loss="softmax_cross_entropy", batch_size=12, epochs=2, metrics=["accuracy"],
          val=9), 10),
]


def fit_case(make_net, make_opt, spec, seed, comm_arg, as_sparse):
    spec = dict(spec)
    n, loss = spec.pop("n"), spec.pop("loss")
    index, fmt = spec.pop("index", np.int32), spec.pop("fmt", "csr")
    loss_name = loss if isinstance(loss, str) else "mean_squared_error"
    X, y = data(n, loss_name, 1)
    kwargs = dict(loss=loss, batch_size=spec.pop("batch_size"), epochs=spec.pop("epochs", 1),
                  seed=0, metrics=spec.pop("metrics", None),
                  early_stopping=spec.pop("early_stopping", None),
                  validation_split=spec.pop("validation_split", 0.0))
    if spec.pop("weighted", False):
        w = np.random.default_rng(2).random(n)
        w[::4] = 0.0
        kwargs["sample_weight"] = w
    val = spec.pop("val", 0)
    if val:
        Xv, yv = data(val, loss_name, 3)
        kwargs["validation_data"] = (sparse(Xv, index) if as_sparse else Xv, yv)
    assert not spec, spec
    net = make_net(seed)
    opt = make_opt(net)
    if not as_sparse:
        return net, opt, bprop.fit(net, X, y, optimizer=opt, comm=comm_arg, **kwargs)
    Xs = sparse(X, index, fmt)
    cls = type(Xs)

    def refuse(*args, **kwargs):
        raise AssertionError("fit densified a sparse X")
    saved = cls.toarray, cls.todense
    cls.toarray = cls.todense = refuse
    try:
        history = bprop.fit(net, Xs, y, optimizer=opt, comm=comm_arg, **kwargs)
    finally:
        cls.toarray, cls.todense = saved
    return net, opt, history


def state(net):
    return [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()]


def max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(state(a), state(b)))


def history_diff(h, h_ref):
    h, h_ref = h.history, h_ref.history
    assert sorted(h) == sorted(h_ref) and all(len(h[k]) == len(h_ref[k]) for k in h)
    return max((abs(u - v) for k in h_ref if k != "time" for u, v in zip(h[k], h_ref[k])),
               default=0.0)


def fingerprint(net, opt, history):
    crc = zlib.crc32(b"".join(a.tobytes() for a in state(net)))
    crc = zlib.crc32(repr((net.dropout_seed, net.dropout_step)).encode(), crc)
    crc = zlib.crc32(repr({k: v for k, v in history.history.items() if k != "time"}).encode(),
                     crc)
    for arrays in opt.state_dict()["state"].values():
        for a in arrays.values():
            crc = zlib.crc32(a.tobytes(), crc)
    return crc


def fit():
    results = {}
    for name, make_net, make_opt, spec, steps in CASES:
        # every rank starts from other weights: rank 0's are broadcast
        net, opt, history = fit_case(make_net, make_opt, spec, 100 + rank, comm, True)
        dense, _, dense_history = fit_case(make_net, make_opt, spec, 100 + rank, comm, False)
        single, _, single_history = fit_case(make_net, make_opt, spec, 100, None, False)
        diffs = comm.allgather((max_diff(net, dense), history_diff(history, dense_history),
                                max_diff(net, single), history_diff(history, single_history)))
        prints = comm.allgather(fingerprint(net, opt, history))
        # the last step's forward took the CSR arrays: layer 0 caches no dense input
        sparse_cached = comm.allgather(net.layers[0].input is None)
        results[name] = {
            "vs_dense": max(d[0] for d in diffs),
            "history_vs_dense": max(d[1] for d in diffs),
            "vs_single_process": max(d[2] for d in diffs),
            "history_vs_single_process": max(d[3] for d in diffs),
            "identical_on_all_ranks": len(set(prints)) == 1,
            "sparse_forward_on_all_ranks": all(sparse_cached),
            "steps": opt.step_count,
            "expected_steps": steps,
            "validated": "val_loss" in history.history,
        }
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)


def capture(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def errors():
    X, y = data(30, "softmax_cross_entropy", 1)
    outcomes = {}

    def sparse_on_rank_1_only():
        net = network(0)
        bprop.fit(net, sparse(X) if rank == 1 else X, y, optimizer=optim.SGD(net, lr=0.1),
                  epochs=1, seed=0, comm=comm)

    def other_values_on_rank_1():
        net = network(0)
        S = sparse(X)
        if rank == 1:
            S.data[3] += 1.0
        bprop.fit(net, S, y, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=0, comm=comm)

    def first_layer_not_dense():
        net = bprop.Network([bprop.BatchNorm(5), bprop.Dense(5, 3)], dtype="float64", seed=0)
        bprop.fit(net, sparse(X), y, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=0,
                  comm=comm)

    def unsorted_on_rank_1():
        net = network(0)
        S = sparse(X)
        if rank == 1:  # swap two column indices of a row: unsorted
            i = int(np.argmax(np.diff(S.indptr) >= 2))
            k = S.indptr[i]
            S.indices[k], S.indices[k + 1] = S.indices[k + 1], S.indices[k]
        bprop.fit(net, S, y, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=0, comm=comm)

    def index_widths_mixed():
        # the same matrix with int32 indices on rank 0 and int64 on the others: the
        # same data, so the ranks train together
        net = network(rank)
        S = sparse(X, np.int32 if rank == 0 else np.int64)
        bprop.fit(net, S, y, optimizer=optim.SGD(net, lr=0.1), batch_size=8, epochs=1, seed=0,
                  comm=comm)
        ref = network(0)
        bprop.fit(ref, X, y, optimizer=optim.SGD(ref, lr=0.1), batch_size=8, epochs=1, seed=0,
                  comm=comm)
        prints = comm.allgather(zlib.crc32(b"".join(a.tobytes() for a in state(net))))
        assert len(set(prints)) == 1, "ranks differ"
        assert max_diff(net, ref) < 1e-12, max_diff(net, ref)

    def lazy_optimizer():
        net = network(0)
        bprop.fit(net, sparse(X), y, optimizer=optim.Adam(net, lazy=True), epochs=1, seed=0,
                  comm=comm)

    for fn in (sparse_on_rank_1_only, other_values_on_rank_1, first_layer_not_dense,
               unsorted_on_rank_1, index_widths_mixed, lazy_optimizer):
        outcomes[fn.__name__] = comm.allgather(capture(fn))
    if rank == 0:
        print("RESULT " + json.dumps(outcomes), flush=True)


if __name__ == "__main__":
    bprop.set_num_threads(1)  # several ranks share two cores
    {"fit": fit, "errors": errors}[sys.argv[1]]()

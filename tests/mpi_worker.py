"""Runs under mpiexec for tests/test_distributed.py (not collected by pytest).

    mpiexec -n N python -m mpi4py tests/mpi_worker.py SCENARIO

Scenarios:
    correctness  data-parallel fit against single-process fit on the full
                 minibatches, several cases; rank 0 prints one RESULT line (JSON)
    errors       mismatched networks, seeds and data: every rank's exception
    fault        rank 1 raises in its second training step; fit must abort all
    fault-outside rank 1 raises outside fit while rank 0 trains (the script runs
                 under ``python -m mpi4py``, which aborts on an uncaught exception)
    layers       a network with BatchNorm, Dropout and a Residual: identical
                 parameters, buffers and dropout clock on every rank, running
                 statistics against a NumPy simulation, masks per rank, errors
"""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np
from mpi4py import MPI

import bprop
from bprop import optim
from bprop.distributed import shard_bounds

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def network(seed, hidden=8, n_in=5, n_out=3, activation="tanh"):
    return bprop.Network([bprop.Dense(n_in, hidden, activation), bprop.Dense(hidden, n_out)],
                         dtype="float64", seed=seed)


def user_mse(output, target, sample_weight=None):
    diff = output - target
    return float(np.mean(diff * diff)), 2.0 * diff / diff.size


def data(n, loss, seed, n_in=5, n_out=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, n_out, n)
    elif loss == "binary_cross_entropy_with_logits":
        y = (rng.random((n, n_out)) < 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((n, n_out))
    return X, y


# (name, optimizer, fit arguments). Each trains 5 steps unless it says otherwise; the
# comments give the minibatch sizes and how 4 ranks split them.
CASES = [
    # 47 rows, batch 10: 10 10 10 10 7; 10 -> 3 3 2 2, 7 -> 2 2 2 1. Fused SGD in the reference.
    ("sgd", lambda net: optim.SGD(net, lr=0.5),
     dict(n=47, loss="softmax_cross_entropy", batch_size=10, metrics=["accuracy"], val=11)),
    # 41 rows, batch 10: the last minibatch has 1 row, three of four ranks get none
    ("adam", lambda net: optim.Adam(net, lr=0.05),
     dict(n=41, loss="mean_squared_error", batch_size=10, metrics=["mse"], val=7)),
    # 55 rows, validation_split 0.2 -> 44 for training, batch 9: 9 9 9 9 8; weights with zeros
    ("adam-weighted", lambda net: optim.Adam(net, lr=0.05, weight_decay=0.01),
     dict(n=55, loss="binary_cross_entropy_with_logits", batch_size=9, metrics=["accuracy"],
          validation_split=0.2, weighted=True)),
    # 13 rows, batch 3: 3 3 3 3 1; with 4 ranks one rank has no row in every step
    ("sgd-nesterov-batch3", lambda net: optim.SGD(net, lr=0.1, momentum=0.9, nesterov=True),
     dict(n=13, loss="softmax_cross_entropy", batch_size=3)),
    # a loss of the user's, run from Python
    ("adam-user-loss", lambda net: optim.Adam(net, lr=0.05),
     dict(n=47, loss=user_mse, batch_size=10)),
    # 3 epochs of 20 rows in batches of 7 (9 steps), reshuffled each epoch, early stopping
    ("adam-3-epochs", lambda net: optim.Adam(net, lr=0.05),
     dict(n=20, loss="mean_squared_error", batch_size=7, epochs=3, early_stopping=1,
          val=9)),
    # a schedule stepped after every minibatch step (lr and momentum), 3 epochs of 3 steps
    ("sgd-one-cycle", lambda net: optim.SGD(net, lr=0.1, momentum=0.9),
     dict(n=20, loss="softmax_cross_entropy", batch_size=7, epochs=3,
          callbacks=lambda opt: [optim.OneCycleLR(opt, 0.5, epochs=3, steps_per_epoch=3)])),
]


def fit_case(spec, make_opt, net, comm_arg, seed=0):
    spec = dict(spec)
    n, loss = spec.pop("n"), spec.pop("loss")
    loss_name = loss if isinstance(loss, str) else "mean_squared_error"
    X, y = data(n, loss_name, 1)
    kwargs = dict(loss=loss, batch_size=spec.pop("batch_size"), epochs=spec.pop("epochs", 1),
                  seed=seed, metrics=spec.pop("metrics", None),
                  early_stopping=spec.pop("early_stopping", None),
                  validation_split=spec.pop("validation_split", 0.0))
    if spec.pop("weighted", False):
        w = np.random.default_rng(2).random(n)
        w[::4] = 0.0
        kwargs["sample_weight"] = w
    val = spec.pop("val", 0)
    if val:
        kwargs["validation_data"] = data(val, loss_name, 3)
    make_callbacks = spec.pop("callbacks", lambda opt: None)
    assert not spec, spec
    opt = make_opt(net)
    history = bprop.fit(net, X, y, optimizer=opt, comm=comm_arg,
                        callbacks=make_callbacks(opt), **kwargs)
    return history, opt


def weights(net):
    return [p.copy() for _, p, _ in net.parameters()]


def correctness():
    results = {}
    for name, make_opt, spec in CASES:
        # Every rank starts from other weights: rank 0's must be broadcast.
        net = network(seed=100 + rank)
        history, opt = fit_case(spec, make_opt, net, comm)
        ref = network(seed=100)
        ref_history, _ = fit_case(spec, make_opt, ref, None)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(weights(net), weights(ref)))
        h = history.history
        h_ref = ref_history.history
        hist_diff = max(
            (abs(u - v) for k in h_ref if k != "time" for u, v in zip(h[k], h_ref[k])),
            default=0.0)
        same_keys = sorted(h) == sorted(h_ref) and all(len(h[k]) == len(h_ref[k]) for k in h)
        # Identical bits on every rank: weights, optimizer state and the whole History.
        fingerprint = zlib.crc32(b"".join(p.tobytes() for p in weights(net)))
        fingerprint = zlib.crc32(repr(h).encode(), fingerprint)
        for arrays in opt.state_dict()["state"].values():
            for a in arrays.values():
                fingerprint = zlib.crc32(a.tobytes(), fingerprint)
        prints = comm.allgather(fingerprint)
        diffs = comm.allgather((diff, hist_diff))
        results[name] = {
            "max_abs_diff": max(d for d, _ in diffs),
            "history_max_abs_diff": max(d for _, d in diffs),
            "history_keys_match": bool(comm.allreduce(int(not same_keys)) == 0),
            "identical_on_all_ranks": len(set(prints)) == 1,
            "steps": opt.step_count,
            "epochs": history.epochs,
        }
    # seed=None: rank 0 draws the seed, every rank shuffles alike
    net = network(seed=100 + rank)
    X, y = data(29, "softmax_cross_entropy", 5)
    bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=0.05), batch_size=6, epochs=2, comm=comm)
    prints = comm.allgather(zlib.crc32(b"".join(p.tobytes() for p in weights(net))))
    results["seed-none"] = {"identical_on_all_ranks": len(set(prints)) == 1}
    # an on_batch_end of the last rank only stops the fourth step: every rank stops there
    net = network(seed=100 + rank)
    seen = []

    def stop_on_last_rank(batch, logs):
        seen.append(batch)
        return rank == size - 1 and len(seen) == 4

    stopper = type("Stopper", (), {"on_batch_end": staticmethod(stop_on_last_rank)})()
    X, y = data(20, "softmax_cross_entropy", 6)  # batches of 7: 3 steps per epoch
    history = bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.1), batch_size=7, epochs=5,
                        seed=0, comm=comm, callbacks=[stopper])
    prints = comm.allgather(zlib.crc32(b"".join(p.tobytes() for p in weights(net))))
    results["batch-stop"] = {"identical_on_all_ranks": len(set(prints)) == 1,
                             "steps": comm.allgather(net._fit_optimizer.step_count),
                             "epochs": history.epochs, "stopped_early": history.stopped_early}
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

    def wider_on_rank_1():
        net = network(seed=0, hidden=9 if rank == 1 else 8)
        bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=0, comm=comm)

    def seed_per_rank():
        net = network(seed=0)
        bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=rank, comm=comm)

    def lr_per_rank():
        net = network(seed=0)
        bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=0.1 * (rank + 1)), epochs=1, seed=0,
                  comm=comm)

    def bad_labels_on_rank_1():
        net = network(seed=0)
        labels = y.copy()
        if rank == 1:
            labels[4] = 7
        bprop.fit(net, X, labels, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=0,
                  comm=comm)

    def bad_everywhere():
        net = network(seed=0)
        bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.1), epochs=0, comm=comm)

    def data_per_rank():
        net = network(seed=0)
        bprop.fit(net, X + rank, y, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=0,
                  comm=comm)

    def diverges():
        # the summed loss overflows: every rank raises the same FloatingPointError
        net = network(seed=0, activation="relu")
        bprop.fit(net, X * 1e3, np.eye(3)[y], loss="mse", optimizer=optim.SGD(net, lr=1e10),
                  batch_size=10, epochs=5, seed=0, comm=comm)

    def still_trains():
        net = network(seed=rank)
        bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.1), epochs=1, seed=0, comm=comm)
        prints = comm.allgather(zlib.crc32(b"".join(p.tobytes() for p in weights(net))))
        assert len(set(prints)) == 1

    for fn in (wider_on_rank_1, seed_per_rank, lr_per_rank, data_per_rank,
               bad_labels_on_rank_1, bad_everywhere, diverges, still_trains):
        outcomes[fn.__name__] = comm.allgather(capture(fn))
    if rank == 0:
        print("RESULT " + json.dumps(outcomes), flush=True)


def fault():
    calls = [0]

    def failing_loss(output, target, sample_weight=None):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise RuntimeError("injected failure in step 2 on rank 1")
        return user_mse(output, target, sample_weight)

    X, y = data(64, "mean_squared_error", 1)
    net = network(seed=0)
    bprop.fit(net, X, y, loss=failing_loss, optimizer=optim.Adam(net), batch_size=8,
              epochs=1000, seed=0, comm=comm)
    print(f"rank {rank}: fit returned", flush=True)  # must not happen


def fault_outside():
    X, y = data(64, "mean_squared_error", 1)
    net = network(seed=0)
    if rank == 1:
        raise RuntimeError("injected failure outside fit on rank 1")
    bprop.fit(net, X, y, loss="mse", optimizer=optim.Adam(net), batch_size=8, epochs=1000,
              seed=0, comm=comm)
    print(f"rank {rank}: fit returned", flush=True)  # must not happen


# ---- BatchNorm, Dropout and nested layers ------------------------------------------------

MOMENTUM = 0.1


def layer_network(seed, inner_activation="relu"):
    """BatchNorm on the input (its statistics are the data's alone, whatever the
    weights), a Dense -> BatchNorm -> Activation -> Dropout block, a Residual with
    a Dropout inside, and the output layer."""
    return bprop.Network([
        bprop.BatchNorm(5, momentum=MOMENTUM), bprop.Dense(5, 8),
        bprop.BatchNorm(8, momentum=MOMENTUM), bprop.Activation("tanh"), bprop.Dropout(0.3),
        bprop.Residual([bprop.Dense(8, 8, inner_activation), bprop.Dropout(0.2)]),
        bprop.Dense(8, 3)], dtype="float64", seed=seed)


def input_statistics(X, w, batch_size, epochs, ranks):
    """The running statistics of the BatchNorm on the input after fit without
    shuffling, in NumPy: each step's rank statistics averaged with the rows of
    the ranks that had positive weight (what DataParallel keeps), and rank 0's
    statistics alone (what broadcasting its buffers would keep)."""
    out = {}
    for name, counted in (("average", ranks), ("rank 0", 1)):
        mean, var = np.zeros(X.shape[1]), np.ones(X.shape[1])
        for _ in range(epochs):
            for lo in range(0, len(X), batch_size):
                Xb = X[lo:lo + batch_size]
                wb = None if w is None else w[lo:lo + batch_size]
                if wb is not None and wb.sum() == 0:
                    continue  # the loop skips a minibatch without weight
                parts = []
                for r in range(counted):
                    a, b = shard_bounds(len(Xb), r, ranks)
                    if b > a and (wb is None or wb[a:b].sum() > 0):
                        parts.append((b - a, Xb[a:b].mean(0), Xb[a:b].var(0, ddof=1)))
                rows = sum(k for k, _, _ in parts)
                m = sum(k * s for k, s, _ in parts) / rows
                v = sum(k * s for k, _, s in parts) / rows
                mean = (1 - MOMENTUM) * mean + MOMENTUM * m
                var = (1 - MOMENTUM) * var + MOMENTUM * v
        out[name] = (mean, var)
    return out


def state_bytes(net, opt, history):
    """Every bit a fit leaves: parameters, buffers, dropout key and clock,
    optimizer state, History."""
    parts = [p.tobytes() for _, p, _ in net.parameters()]
    parts += [b.tobytes() for _, b in net.buffers()]
    parts += [repr((net.dropout_seed, net.dropout_step, net.training)).encode()]
    sd = opt.state_dict()
    parts += [sd["state"][p][k].tobytes() for p in sorted(sd["state"])
              for k in sorted(sd["state"][p])]
    parts += [repr(sd["step"]).encode()]
    parts += [repr((k, v)).encode() for k, v in sorted(history.history.items()) if k != "time"]
    return b"".join(parts)


def layers():
    n, batch_size, epochs = 54, 12, 2  # minibatches of 12 12 12 12 6
    X, y = data(n, "softmax_cross_entropy", 1)
    X[:, 1] = 3.0 * X[:, 1] + 2.0  # an input BatchNorm has work to do
    val = data(9, "softmax_cross_entropy", 3)
    # weighted: rows 4..7 (rank 1's share of the first minibatch on 3 ranks) and the
    # whole second minibatch weigh 0
    w = np.ones(n)
    w[4:8] = 0.0
    w[12:24] = 0.0
    results = {}
    for case, weights in (("unweighted", None), ("weighted", w)):
        def run(comm_arg, seed, weights=weights):
            net = layer_network(seed)
            opt = optim.Adam(net, lr=0.05)
            history = bprop.fit(net, X, y, optimizer=opt, batch_size=batch_size, epochs=epochs,
                                shuffle=False, seed=0, sample_weight=weights,
                                validation_data=val, metrics=["accuracy"], comm=comm_arg)
            return net, opt, history

        # every rank starts from other weights and another dropout key: rank 0's rule
        net, opt, history = run(comm, 100 + rank)
        again = state_bytes(*run(comm, 100 + rank))
        mine = state_bytes(net, opt, history)
        prints = comm.allgather(zlib.crc32(mine))
        last_mask = net.layers[4].mask
        masks = comm.allgather(None if last_mask is None else last_mask.tobytes())
        expected = input_statistics(X, weights, batch_size, epochs, size)
        bn = net.layers[0]
        mean_avg, var_avg = expected["average"]
        mean_0, var_0 = expected["rank 0"]
        single, _, single_history = run(None, 100)
        single_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
            [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()],
            [p for _, p, _ in single.parameters()] + [b for _, b in single.buffers()]))
        results[case] = {
            "identical_on_all_ranks": len(set(prints)) == 1,
            "reproducible": comm.allreduce(int(again != mine)) == 0,
            "dropout_seed": net.dropout_seed,
            "dropout_step": net.dropout_step,
            "single_dropout_step": single.dropout_step,
            "steps": opt.step_count,
            "training": net.training,
            "masks_distinct": len(masks) == len(set(masks)) and None not in masks,
            "running_mean_err": float(np.max(np.abs(bn.running_mean - mean_avg))),
            "running_var_err": float(np.max(np.abs(bn.running_var - var_avg))),
            "rank0_only_mean_diff": float(np.max(np.abs(bn.running_mean - mean_0))),
            "rank0_only_var_diff": float(np.max(np.abs(bn.running_var - var_0))),
            "vs_single_process": single_diff,
            "history_vs_single_process": max(
                abs(u - v) for k in single_history.history if k != "time"
                for u, v in zip(history.history[k], single_history.history[k])),
        }

    def one_row_per_rank():
        net = layer_network(0)
        bprop.fit(net, X[:20], y[:20], optimizer=optim.SGD(net, lr=0.1),
                  batch_size=2 * size - 1, epochs=1, seed=0, comm=comm)

    def nested_mismatch():
        net = layer_network(0, inner_activation="tanh" if rank == 1 else "relu")
        bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=0.1), batch_size=12, epochs=1,
                  seed=0, comm=comm)

    results["one_row_per_rank"] = comm.allgather(capture(one_row_per_rank))
    results["nested_mismatch"] = comm.allgather(capture(nested_mismatch))
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    bprop.set_num_threads(1)  # several ranks share two cores
    {"correctness": correctness, "errors": errors, "fault": fault,
     "fault-outside": fault_outside, "layers": layers}[sys.argv[1]]()

"""Sparse (scipy.sparse CSR) input in bprop.gradcheck and in fit over MPI.

* gradcheck: every parameter's gradient against central differences in float64
  for sparse X, as for dense X (relu and tanh stacks; BatchNorm, Dropout,
  LayerNorm and Residual after the first Dense; both modes; empty rows; int32 and
  int64 indices), a wrong gradient caught, X never densified, bad input refused
  with the network unchanged. gradcheck checks no dL/dX, which bprop does not
  form for sparse X.
* fit(comm=): launches ``mpiexec -n 2 python -m mpi4py tests/mpi_sparse_worker.py
  SCENARIO`` (as tests/test_distributed.py does) and reads what rank 0 reports:
  sparse X and validation data give the weights and History of the dense run
  over the same ranks and of one process; errors reach every rank. Skipped where
  mpi4py or mpiexec is missing (``pip install mpi4py mpich``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sp = pytest.importorskip("scipy.sparse")

import bprop  # noqa: E402
from bprop import losses  # noqa: E402
from bprop.layers import walk  # noqa: E402

EPS = 1e-6                # central differences (test_gradcheck.py's)
MAX_RELATIVE_ERROR = 1e-6
KINK = 1e-4               # relu inputs kept at least this far from 0
FEATURES = 12


# ---- gradcheck ------------------------------------------------------------------------

# The first layer is a Dense (the only layer that takes a sparse X); every other kind
# after it.
CASES = {
    "tanh": lambda: [bprop.Dense(FEATURES, 8, "tanh"), bprop.Dense(8, 6, "tanh"),
                     bprop.Dense(6, 3)],
    "relu": lambda: [bprop.Dense(FEATURES, 8, "relu"), bprop.Dense(8, 6, "relu"),
                     bprop.Dense(6, 3)],
    "batchnorm": lambda: [bprop.Dense(FEATURES, 8, bias=False), bprop.BatchNorm(8, momentum=0.2),
                          bprop.Activation("relu"), bprop.Dense(8, 3)],
    "dropout": lambda: [bprop.Dense(FEATURES, 8, "tanh"), bprop.Dropout(0.3),
                        bprop.Dense(8, 6, "relu"), bprop.Dense(6, 3)],
    "layernorm": lambda: [bprop.Dense(FEATURES, 8), bprop.LayerNorm(8), bprop.Activation("tanh"),
                          bprop.Dense(8, 3)],
    "residual": lambda: [
        bprop.Dense(FEATURES, 6, "tanh"),
        bprop.Residual([bprop.Dense(6, 6, "relu"), bprop.BatchNorm(6), bprop.Dropout(0.2),
                        bprop.Dense(6, 6)]),
        bprop.LayerNorm(6), bprop.Dense(6, 3)],
}


def sparse_batch(rng, rows=8, density=0.35, index=np.int32):
    """A canonical CSR matrix (rows, FEATURES) with rows 2 and 5 empty, and labels."""
    X = sp.random(rows, FEATURES, density=density, format="csr", random_state=rng)
    X.data = rng.standard_normal(X.nnz)
    X = X.tolil()
    X[2, :] = 0.0
    X[5, :] = 0.0
    X = X.tocsr()
    X.eliminate_zeros()
    X.sort_indices()
    X.indices, X.indptr = X.indices.astype(index), X.indptr.astype(index)
    assert X.indptr[3] == X.indptr[2] and X.indptr[6] == X.indptr[5]
    return X, rng.integers(0, 3, rows)


def relu_inputs(net):
    """The inputs of every relu of the last forward pass."""
    for _, _, layer in walk(net.layers):
        if getattr(layer, "activation", None) == "relu":
            yield layer.z if isinstance(layer, bprop.Dense) else layer.input


def network_away_from_kinks(case, X, training, dtype="float64"):
    """The case's network with random biases (an empty row's z is the bias) whose
    forward pass at its dropout step keeps every relu input at least KINK from 0,
    so that no perturbation crosses a kink: the seed is redrawn until it does."""
    for seed in range(100):
        net = bprop.Network(CASES[case](), dtype=dtype, seed=seed)
        bias_rng = np.random.default_rng(seed)
        for name, p, _ in net.parameters():
            if name.endswith(".bias"):
                p[...] = bias_rng.uniform(-0.5, 0.5, p.shape)
        net.train(training)
        step = net.dropout_step
        net.forward(X.astype(net.dtype))  # in training mode the running statistics move
        net.dropout_step = step
        if all(np.min(np.abs(a)) > KINK for a in relu_inputs(net)):
            return net
    raise AssertionError(f"{case}: no seed kept the relu inputs away from the kink")


def refuse_densifying(monkeypatch, X):
    def refuse(*args, **kwargs):
        raise AssertionError("gradcheck densified the sparse X")
    monkeypatch.setattr(type(X), "toarray", refuse)
    monkeypatch.setattr(type(X), "todense", refuse)


@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_passes_on_sparse_input(case, training, index, rng, monkeypatch, record_error):
    X, y = sparse_batch(rng, index=index)
    net = network_away_from_kinks(case, X, training)
    params = [p.copy() for _, p, _ in net.parameters()]
    buffers = [b.copy() for _, b in net.buffers()]
    step = net.dropout_step
    arrays = [a.copy() for a in (X.data, X.indices, X.indptr)]
    refuse_densifying(monkeypatch, X)
    errors = bprop.gradcheck(net, X, y, eps=EPS)
    # every layer with parameters, the first (its dL/dW = X^T delta from the CSR arrays)
    # included
    assert sorted(errors) == sorted({n.rsplit(".", 1)[0] for n, _, _ in net.parameters()})
    assert "layers.0" in errors
    for owner, error in errors.items():
        record_error(f"gradcheck, sparse X, float64, {case}", error)
        assert error <= MAX_RELATIVE_ERROR, f"{case} {owner}: {error:.2e}"
    # a copy is checked: nothing of the network or of X changes
    assert net.training == training and net.dropout_step == step
    for before, (name, p, _) in zip(params, net.parameters()):
        np.testing.assert_array_equal(p, before, err_msg=name)
    for before, (name, b) in zip(buffers, net.buffers()):
        np.testing.assert_array_equal(b, before, err_msg=name)
    for before, a in zip(arrays, (X.data, X.indices, X.indptr)):
        np.testing.assert_array_equal(a, before)
        assert a.dtype == before.dtype


def test_gradcheck_of_sparse_input_with_weights_and_max_checks(rng):
    X, _ = sparse_batch(rng)
    Y = rng.standard_normal((X.shape[0], 3))
    w = rng.uniform(0.5, 2.0, X.shape[0])
    net = network_away_from_kinks("residual", X, True)
    errors = bprop.gradcheck(net, X, Y, "mean_squared_error", sample_weight=w, max_checks=5)
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, errors


def test_gradcheck_of_sparse_input_agrees_with_dense_input(rng):
    # the same function differentiated: the two checks' errors are both rounding
    X, y = sparse_batch(rng)
    net = network_away_from_kinks("batchnorm", X, True)
    sparse_errors = bprop.gradcheck(net, X, y)
    dense_errors = bprop.gradcheck(net, X.toarray(), y)
    assert sorted(sparse_errors) == sorted(dense_errors)
    assert max(sparse_errors.values()) <= MAX_RELATIVE_ERROR
    assert max(dense_errors.values()) <= MAX_RELATIVE_ERROR


def test_gradcheck_finds_a_wrong_gradient_with_sparse_input(rng):
    # test_train.py's wrong loss (twice the true gradient): the check must fail, in
    # the first layer (whose gradient is formed from the CSR arrays) as in the others
    def wrong(output, target, sample_weight=None):
        value, grad = losses.mean_squared_error(output, target, sample_weight)
        return value, 2 * grad

    X, _ = sparse_batch(rng)
    net = network_away_from_kinks("tanh", X, False)
    errors = bprop.gradcheck(net, X, rng.standard_normal((X.shape[0], 3)), wrong)
    assert set(errors) == {"layers.0", "layers.1", "layers.2"}
    for owner, error in errors.items():
        assert error == pytest.approx(0.5, rel=1e-4), owner


def test_gradcheck_converts_other_formats_and_dtypes_once(rng, monkeypatch):
    # a float32 network is checked on its float64 copy; CSC, COO and float32 or
    # integer values become float64 CSR, never dense
    X, y = sparse_batch(rng)
    net = network_away_from_kinks("tanh", X, False, dtype="float32")
    before = [p.copy() for _, p, _ in net.parameters()]
    Xi = sp.csr_matrix((np.arange(1, X.nnz + 1) % 3 - 1.0, X.indices, X.indptr), shape=X.shape)
    for M in (X.tocsc(), X.tocoo(), X.astype(np.float32), Xi.astype(np.int64)):
        refuse_densifying(monkeypatch, M)
        errors = bprop.gradcheck(net, M, y)
        assert max(errors.values()) <= MAX_RELATIVE_ERROR, (M.format, M.dtype, errors)
    assert net.dtype == np.float32
    for b, (name, p, _) in zip(before, net.parameters()):
        np.testing.assert_array_equal(p, b, err_msg=name)


def hand_built(data, indices, indptr, shape):
    """A CSR matrix scipy does not check (as one built by hand from arrays)."""
    X = sp.csr_matrix(shape)
    X.data, X.indices, X.indptr = (np.asarray(data, np.float64), np.asarray(indices, np.int32),
                                   np.asarray(indptr, np.int32))
    return X


@pytest.mark.parametrize("X,error,match", [
    (hand_built([1.0, 2.0], [5, 2], [0, 2, 2], (2, FEATURES)), ValueError,
     r"^\[gradcheck\] X has unsorted or duplicate column indices.*sum_duplicates"),
    (hand_built([1.0, 2.0], [0, FEATURES], [0, 1, 2], (2, FEATURES)), ValueError,
     rf"^\[gradcheck\] X has a column index out of range: it stores column {FEATURES}"),
    (hand_built([1.0, np.nan], [0, 3], [0, 1, 2], (2, FEATURES)), ValueError,
     r"^\[gradcheck\] X must be finite in float64, but X\[1, 3\] = nan"),
    (sp.csr_matrix(np.ones((2, FEATURES - 1))), ValueError,
     rf"^\[gradcheck\] X has {FEATURES - 1} features, but the network expects {FEATURES}"),
    (sp.csr_matrix((0, FEATURES)), ValueError, r"^\[gradcheck\] X has 0 samples"),
    (sp.csr_matrix(np.ones((2, FEATURES), dtype=complex)), TypeError,
     r"^\[gradcheck\] X must hold real numbers .*complex"),
], ids=["unsorted", "out-of-range", "nan", "features", "empty", "complex"])
def test_gradcheck_refuses_invalid_sparse_input(X, error, match):
    net = bprop.Network(CASES["tanh"](), dtype="float64", seed=0)
    before = [p.copy() for _, p, _ in net.parameters()]
    with pytest.raises(error, match=match):
        bprop.gradcheck(net, X, np.zeros(X.shape[0], np.int64))
    for b, (name, p, _) in zip(before, net.parameters()):
        np.testing.assert_array_equal(p, b, err_msg=name)
    assert not net._core.has_forward


@pytest.mark.parametrize("first", [bprop.BatchNorm(FEATURES), bprop.LayerNorm(FEATURES),
                                   bprop.Residual([bprop.Dense(FEATURES, FEATURES)])],
                         ids=["BatchNorm", "LayerNorm", "Residual"])
def test_gradcheck_refuses_sparse_input_without_a_dense_first_layer(first, rng):
    X, y = sparse_batch(rng)
    net = bprop.Network([first, bprop.Dense(FEATURES, 3)], dtype="float64", seed=0)
    name = type(first).__name__
    with pytest.raises(TypeError, match=rf"^\[gradcheck\] X is sparse, which only a Dense first "
                                        rf"layer takes, but layer 0 is {name}; densify it"):
        bprop.gradcheck(net, X, y)
    assert not net._core.has_forward


# ---- fit over MPI ---------------------------------------------------------------------

WORKER = Path(__file__).with_name("mpi_sparse_worker.py")


def _mpiexec():
    # The mpich wheel puts mpiexec next to the interpreter (a venv's bin/).
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
    reason="no mpi4py or mpiexec: pip install mpi4py mpich")

# Against the dense X over the same ranks: only the first layer's products differ
# (the sparse one skips the zeros).
TOL_DENSE = 1e-12
# Against one process (test_distributed.py's tolerance).
TOL_SINGLE = 1e-10


def launch(ranks, scenario, timeout=120):
    """Runs the worker on `ranks` processes; returns rank 0's RESULT."""
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(WORKER), scenario]
    # Ranks share the machine's cores: one bprop thread (and one BLAS thread) each.
    env = dict(os.environ, BPROP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0][len("RESULT "):])


@needs_mpi
def test_fit_over_mpi_on_sparse_input_matches_dense_input(record_error):
    # SGD, Nesterov, Adam with weight decay; sample weights with zeros; a user loss;
    # early stopping over 3 epochs; validation_data (sparse) and validation_split;
    # a rank without rows in some steps (batch 1: in every step, the first included);
    # int64 indices, CSC converted once; BatchNorm, Dropout, Residual and LayerNorm
    # after the first Dense. X's toarray and todense raise in the worker.
    results = launch(2, "fit")
    assert len(results) == 7
    for name, r in results.items():
        assert r["identical_on_all_ranks"], (name, r)
        assert r["sparse_forward_on_all_ranks"], (name, r)
        assert r["steps"] == r["expected_steps"], (name, r)
        assert r["vs_dense"] <= TOL_DENSE, (name, r)
        assert r["history_vs_dense"] <= TOL_DENSE, (name, r)
        record_error("distributed fit, 2 ranks, sparse X vs dense X (abs)", r["vs_dense"])
        if name != "layers":  # each rank normalises its own rows: not one process's run
            assert r["vs_single_process"] < TOL_SINGLE, (name, r)
            assert r["history_vs_single_process"] < TOL_SINGLE, (name, r)
    assert results["sgd"]["validated"] and results["adam-weighted-csc"]["validated"]


@needs_mpi
def test_fit_over_mpi_on_sparse_input_errors_reach_every_rank():
    out = launch(2, "errors")
    # dense X on rank 0, sparse on rank 1: the same error on both, naming the difference
    m = out["sparse_on_rank_1_only"]
    assert m[0].split("] ", 1)[1] == m[1].split("] ", 1)[1], m
    assert all(s.startswith(f"ValueError: [fit, rank {r} of 2] the ranks disagree on the data: "
                            "rank 0 has training X (30, 5) float64, y") for r, s in enumerate(m))
    assert "but rank 1 has training X (30, 5) float64 sparse CSR with" in m[0]
    # one stored value differs: the checksum of the sampled CSR rows
    m = out["other_values_on_rank_1"]
    assert all("the ranks disagree on the data: rank 0 has rows with checksum" in s for s in m)
    # refused on every rank before training
    refused = ("TypeError: [fit] X is sparse, which only a Dense first layer takes, but layer 0 "
               "is BatchNorm; densify it (X.toarray()) or start the network with a Dense layer")
    assert out["first_layer_not_dense"] == [refused] * 2
    # invalid on rank 1 only: its own error there, a RuntimeError naming it on rank 0
    m = out["unsorted_on_rank_1"]
    assert m[1].startswith("ValueError: [fit] X has unsorted or duplicate column indices"), m
    assert m[0].startswith("RuntimeError: [fit, rank 0 of 2] rank 1 failed before training"), m
    assert "unsorted or duplicate column indices" in m[0]
    # int32 indices on rank 0, int64 on rank 1: the same data, trained together, and
    # the weights of the dense run
    assert out["index_widths_mixed"] == ["ok", "ok"]
    # Adam(lazy=True) knows its own batch's rows only: refused on every rank
    assert all(s.startswith("ValueError: [fit] a lazy optimizer (Adam(lr=0.001, betas=(0.9, "
                            "0.999), eps=1e-08, weight_decay=0.0, lazy=True)) cannot train over "
                            "MPI") for s in out["lazy_optimizer"]), out["lazy_optimizer"]

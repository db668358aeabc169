"""Data-parallel fit over MPI (bprop.distributed): each test launches
``mpiexec -n N python -m mpi4py tests/mpi_worker.py SCENARIO`` and reads what
rank 0 reports. Skipped where mpi4py or mpiexec is missing
(``pip install mpi4py mpich``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py")  # the package only: the pytest process never starts MPI

WORKER = Path(__file__).with_name("mpi_worker.py")


def _mpiexec():
    # The mpich wheel puts mpiexec next to the interpreter (a venv's bin/).
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: pip install mpich")

# Correctness: the weights after 5 steps against one process on the full minibatches.
TOL = 1e-10


def launch(ranks, scenario, timeout, module=True):
    """Runs the worker on `ranks` processes; returns (completed process, seconds)."""
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable]
    cmd += ["-m", "mpi4py"] if module else []
    cmd += [str(WORKER), scenario]
    # Ranks share the machine's cores: one bprop thread (and one BLAS thread) each.
    env = dict(os.environ, BPROP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    return proc, time.monotonic() - start


def result(proc):
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_matches_single_process_training(ranks, record_error):
    # SGD (fused in the single-process reference), Nesterov, Adam with and without
    # weight decay, sample weights with zeros, a user loss, 3 epochs with early
    # stopping, a schedule stepped per step; minibatches split unevenly, some ranks
    # without rows (see CASES).
    results = result(launch(ranks, "correctness", timeout=120)[0])
    for name, r in results.items():
        assert r["identical_on_all_ranks"], name
        if name == "seed-none":
            continue
        if name == "batch-stop":  # one rank's on_batch_end stopped every rank after step 4
            assert r["steps"] == [4] * ranks and r["epochs"] == 2 and r["stopped_early"], r
            continue
        assert r["steps"] == (9 if name in ("adam-3-epochs", "sgd-one-cycle") else 5), name
        assert r["history_keys_match"], name
        assert r["max_abs_diff"] < TOL, (name, r)
        assert r["history_max_abs_diff"] < TOL, (name, r)
        record_error(f"distributed fit, {ranks} ranks, weights vs 1 process (abs)",
                     r["max_abs_diff"])


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_batch_norm_and_dropout_leave_every_rank_identical(ranks, record_error):
    # BatchNorm on the input and after a Dense, Dropout in a block and inside a
    # Residual; every rank starts from other weights and another dropout key.
    out = result(launch(ranks, "layers", timeout=120)[0])
    for case, steps in (("unweighted", 10), ("weighted", 8)):
        r = out[case]
        # parameters, buffers, dropout key and clock, optimizer state, History
        assert r["identical_on_all_ranks"], (case, r)
        assert r["reproducible"], (case, r)
        assert r["steps"] == steps and r["training"], (case, r)
        # rank 0's key back on every rank; the clock advanced once per step, as in
        # one process (a rank without rows in a step advances it too)
        assert r["dropout_seed"] == 100, (case, r)
        assert r["dropout_step"] == r["single_dropout_step"] == steps, (case, r)
        assert r["masks_distinct"], (case, r)  # each rank draws its own masks
        # the running statistics are the row-weighted average of the ranks' ...
        assert r["running_mean_err"] < 1e-12 and r["running_var_err"] < 1e-12, (case, r)
        record_error(f"distributed BatchNorm running stats, {ranks} ranks (abs)",
                     max(r["running_mean_err"], r["running_var_err"]))
        if ranks == 1:
            # ... which on one rank are its own, and one rank's fit is one process's
            assert r["vs_single_process"] < TOL, (case, r)
            assert r["history_vs_single_process"] < TOL, (case, r)
        else:
            # ... not rank 0's alone
            assert r["rank0_only_mean_diff"] > 1e-3 and r["rank0_only_var_diff"] > 1e-3, r
    one_row = out["one_row_per_rank"]
    assert len({m.split("] ", 1)[1] for m in one_row}) == 1, one_row
    assert all(m.startswith(f"ValueError: [fit, rank {k} of {ranks}] the network has "
                            "BatchNorm, which needs at least 2 rows per batch") and
               f"at least {2 * ranks} rows" in m for k, m in enumerate(one_row)), one_row
    if ranks > 1:  # a nested layer that differs is named by its dotted path
        assert all("disagree on the network: rank 0 has layers.5.layers.0 Dense(8, 8, "
                   "activation='relu'), but rank 1 has layers.5.layers.0 Dense(8, 8, "
                   "activation='tanh')" in m for m in out["nested_mismatch"]), out
    else:
        assert out["nested_mismatch"] == ["ok"]


def test_rank_dropout_keys_differ_and_are_fixed():
    from bprop.distributed import rank_dropout_key

    keys = [rank_dropout_key(12345, r) for r in range(1, 6)]
    assert len(set(keys)) == 5 and 12345 not in keys
    assert all(0 <= k < 2**64 for k in keys)
    assert keys == [rank_dropout_key(12345, r) for r in range(1, 6)]
    assert rank_dropout_key(12346, 1) != keys[0]


@pytest.mark.parametrize("ranks", [2, 3])
def test_errors_are_raised_on_every_rank(ranks):
    out = result(launch(ranks, "errors", timeout=120)[0])
    for name in ("wider_on_rank_1", "seed_per_rank", "lr_per_rank", "data_per_rank"):
        assert len({m.split("] ", 1)[1] for m in out[name]}) == 1, out[name]
        assert all(m.startswith("ValueError: [fit, rank") for m in out[name]), out[name]
    assert all("disagree on the network: rank 0 has layers.0.weight (5, 8) float64, but "
               "rank 1 has layers.0.weight (5, 9) float64" in m for m in out["wider_on_rank_1"])
    assert all("disagree on the shuffling generator" in m for m in out["seed_per_rank"])
    assert all("disagree on the optimizer: rank 0 has Adam(lr=0.1" in m
               for m in out["lr_per_rank"])
    assert all("disagree on the data" in m for m in out["data_per_rank"])
    # invalid data on rank 1 only: its own error there, a RuntimeError naming it elsewhere
    bad = out["bad_labels_on_rank_1"]
    assert bad[1].startswith("ValueError: [fit] y labels must lie in [0, 3)")
    for r, m in enumerate(bad):
        if r != 1:
            assert m.startswith(f"RuntimeError: [fit, rank {r} of {ranks}] rank 1 failed "
                                "before training"), m
            assert "y labels must lie in [0, 3)" in m
    assert out["bad_everywhere"] == ["ValueError: [fit] epochs must be >= 1, but got 0"] * ranks
    assert all(m.startswith("FloatingPointError: [fit] training diverged in epoch")
               for m in out["diverges"]), out["diverges"]
    assert out["still_trains"] == ["ok"] * ranks  # the communicator survived the errors


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_failing_rank_ends_every_rank(ranks):
    # Rank 1 raises in its second step while the others wait in the allreduce: fit
    # aborts the job (this run is not under python -m mpi4py, so fit alone does it).
    proc, seconds = launch(ranks, "fault", timeout=30, module=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert seconds < 30
    assert f"[bprop.distributed] rank 1 of {ranks}: fit raised RuntimeError" in proc.stderr
    assert "injected failure in step 2 on rank 1" in proc.stderr
    assert "fit returned" not in proc.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_failing_outside_fit_ends_every_rank(ranks):
    # Rank 1 raises before fit while the others train: python -m mpi4py aborts the job.
    proc, seconds = launch(ranks, "fault-outside", timeout=30)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert seconds < 30
    assert "injected failure outside fit on rank 1" in proc.stderr
    assert "fit returned" not in proc.stdout


def test_shard_bounds_split_as_array_split():
    from bprop.distributed import shard_bounds

    for rows in range(1, 12):
        for size in range(1, 6):
            parts = np.array_split(np.arange(rows), size)
            for rank, part in enumerate(parts):
                lo, hi = shard_bounds(rows, rank, size)
                np.testing.assert_array_equal(np.arange(lo, hi), part)


def test_comm_must_be_a_communicator():
    import bprop

    net = bprop.Network([bprop.Dense(2, 2)], dtype="float64", seed=0)
    with pytest.raises(TypeError, match=r"\[fit\] comm must be an mpi4py communicator such as "
                                        r"MPI.COMM_WORLD, but got int"):
        bprop.fit(net, np.zeros((4, 2)), np.zeros(4, dtype=int), comm=3)

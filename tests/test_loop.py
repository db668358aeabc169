"""The training loop (bprop._loop.Loop) with a recording step in place of a network:
which rows each step gets and in which order, what is skipped, how the epoch's loss
is averaged, when the divergence handler runs; and the strategy interface fit
trains through (bprop.train.Local, bprop.distributed.DataParallel)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import bprop
from bprop import _loop
from bprop.distributed import DataParallel
from bprop.train import Local


def recording_step(losses=None):
    """A step that records what it gets and returns the next of `losses` (1.0)."""
    calls = []

    def step(X, y, w, weight):
        calls.append({"X": X.copy(), "y": y.copy(), "w": None if w is None else w.copy(),
                      "weight": weight, "contiguous": X.flags.c_contiguous})
        return 1.0 if losses is None else losses[len(calls) - 1]
    return step, calls


def never(epoch, batch, value):
    raise AssertionError(f"diverged({epoch}, {batch}, {value}) was not expected")


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1, 200])  # one chunk; a minibatch each; 2
@pytest.mark.parametrize("held_by_index", [False, True])
def test_each_step_gets_the_next_minibatch_of_the_order(chunk_bytes, held_by_index,
                                                        monkeypatch, rng):
    monkeypatch.setattr(_loop, "_CHUNK_BYTES", chunk_bytes)
    X = rng.standard_normal((30, 3))
    rows = rng.permutation(30)[:23] if held_by_index else None
    n = 30 if rows is None else 23
    y = np.arange(n)  # sample i's target is i
    w = rng.random(n) + 0.5
    step, calls = recording_step()
    loop = _loop.Loop(X, y, w, 4, step, never, rows=rows)
    assert loop.batches == -(-n // 4)
    for epoch in range(2):
        calls.clear()
        order = rng.permutation(n)
        loop.epoch(epoch, order)
        assert [len(c["y"]) for c in calls] == [4] * (n // 4) + [n % 4]
        np.testing.assert_array_equal(np.concatenate([c["y"] for c in calls]), order)
        taken = order if rows is None else rows[order]
        np.testing.assert_array_equal(np.concatenate([c["X"] for c in calls]), X[taken])
        np.testing.assert_array_equal(np.concatenate([c["w"] for c in calls]), w[order])
        for c in calls:
            assert c["contiguous"]
            assert c["weight"] == float(c["w"].sum(dtype=np.float64))


def test_without_an_order_the_minibatches_are_slices_of_the_data(rng):
    X = rng.standard_normal((10, 2))
    y = np.arange(10)
    seen = []

    def step(Xb, yb, wb, weight):
        seen.append(Xb)
        assert wb is None and weight == Xb.shape[0]
        return 0.5

    assert _loop.Loop(X, y, None, 3, step, never).epoch(0) == (5.0, 10)
    assert [len(b) for b in seen] == [3, 3, 3, 1]
    assert all(np.shares_memory(b, X) for b in seen)


def test_a_batch_size_above_the_samples_is_one_minibatch(rng):
    step, calls = recording_step()
    loop = _loop.Loop(rng.standard_normal((5, 2)), np.arange(5), None, 64, step, never)
    loop.epoch(0, np.arange(5)[::-1])
    assert loop.batches == 1 and len(calls) == 1 and list(calls[0]["y"]) == [4, 3, 2, 1, 0]


def test_zero_weight_minibatches_are_skipped_but_keep_their_index(rng):
    X = rng.standard_normal((12, 2))
    w = np.array([1.0, 1, 1, 0, 0, 0, 2, 2, 2, 1, 0, 0])
    step, calls = recording_step(losses=[1.0, 4.0, math.nan])
    diverged = []

    def record(epoch, batch, value):
        diverged.append((epoch, batch, value))
        raise FloatingPointError("stop")

    loop = _loop.Loop(X, np.arange(12), w, 3, step, record)
    with pytest.raises(FloatingPointError, match="stop"):
        loop.epoch(7)
    # minibatch 1 (weights 0) is not stepped; the third step is minibatch 3
    assert [list(c["y"]) for c in calls] == [[0, 1, 2], [6, 7, 8], [9, 10, 11]]
    assert len(diverged) == 1 and diverged[0][:2] == (7, 3) and math.isnan(diverged[0][2])


def test_the_epoch_loss_is_weighted_by_sample_weights_or_by_rows(rng):
    X = rng.standard_normal((5, 2))
    w = np.array([1.0, 3.0, 0.5, 0.5, 2.0])
    totals = {}
    for by_rows in (False, True):
        step, _ = recording_step(losses=[2.0, 10.0, 1.0])
        loop = _loop.Loop(X, np.arange(5), w, 2, step, never, mean_over_rows=by_rows)
        totals[by_rows] = loop.epoch(0)
    assert totals[False] == (2.0 * 4 + 10.0 * 1 + 1.0 * 2, 7.0)  # weights 4, 1, 2
    assert totals[True] == (2.0 * 2 + 10.0 * 2 + 1.0 * 1, 5)  # scikit-learn's loss_curve_


def test_on_step_gets_the_running_mean(rng):
    step, _ = recording_step(losses=[3.0, 1.0, 2.0])
    loop = _loop.Loop(rng.standard_normal((5, 2)), np.arange(5), None, 2, step, never)
    running = []
    loop.on_step = running.append
    loop.epoch(0)
    assert running == [3.0, 2.0, 2.0]  # (3*2)/2, (3*2 + 1*2)/4, (8 + 2*1)/5


@pytest.mark.parametrize("check_finite", [False, True])
def test_non_finite_parameters_are_caught_each_step_or_once_per_epoch(check_finite, rng):
    param = np.zeros(3)
    diverged = []

    def step(X, y, w, weight):
        if y[0] == 2:
            param[1] = np.inf  # a finite loss that leaves a non-finite weight behind
        return 0.25

    def record(*args):
        diverged.append(args)
        raise FloatingPointError

    loop = _loop.Loop(rng.standard_normal((6, 2)), np.arange(6), None, 2, step, record,
                      params=[param], check_finite=check_finite)
    with pytest.raises(FloatingPointError):
        loop.epoch(4)
    # every step: at the step that made it (minibatch 1); else at the epoch's end,
    # with the epoch's last minibatch and loss
    assert diverged == ([(4, 1, 0.25)] if check_finite else [(4, 2, 0.25)])


def test_fit_trains_through_its_strategy(monkeypatch, rng):
    # Every minibatch goes through the strategy's step function and every score
    # through its outputs: nothing of fit's bypasses the strategy.
    made, scored = [], []
    make, outputs = Local.step_function, Local.outputs

    def step_function(self, *args):
        step = make(self, *args)
        made.append(step)
        return lambda *batch: step(*batch)

    def counted_outputs(self, net, data, batch_size=0):
        scored.append(len(data))
        return outputs(self, net, data, batch_size)

    monkeypatch.setattr(Local, "step_function", step_function)
    monkeypatch.setattr(Local, "outputs", counted_outputs)
    net = bprop.Network([bprop.Dense(3, 4, "tanh"), bprop.Dense(4, 2)], dtype="float64", seed=0)
    X = rng.standard_normal((20, 3))
    y = rng.integers(0, 2, 20)
    history = bprop.fit(net, X, y, epochs=2, batch_size=8, validation_split=0.25,
                        metrics=["accuracy"], seed=0)
    assert len(made) == 1 and net._fit_optimizer.step_count == 2 * 2
    assert scored == [15, 5, 15, 5]  # training metrics, validation: per epoch
    assert history.epochs == 2


def test_the_mpi_strategy_has_every_method_of_the_local_one():
    # fit calls the same methods of either strategy; DataParallel's are exercised
    # only under mpiexec (tests/test_distributed.py), so their names are held here.
    methods = {name: member for name, member in vars(Local).items()
               if callable(member) and not name.startswith("_")}
    assert set(methods) == {"shared_seed", "start", "step_function", "outputs", "slowest",
                            "any", "failed"}
    for name, member in methods.items():
        theirs = inspect.signature(getattr(DataParallel, name)).parameters
        assert list(theirs) == list(inspect.signature(member).parameters), name

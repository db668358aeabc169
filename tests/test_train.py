"""bprop.fit, bprop.evaluate, bprop.gradcheck and History."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import bprop
from bprop import losses, optim, reference


def blobs(rng, n=120, classes=3, features=4, spread=0.4):
    centers = 2.0 * rng.standard_normal((classes, features))
    y = rng.integers(0, classes, size=n)
    X = centers[y] + spread * rng.standard_normal((n, features))
    return X, y


def params_of(net):
    return [p.copy() for _, p, _ in net.parameters()]


def assert_same_params(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def data(rng):
    return blobs(rng)


@pytest.fixture
def small(make_network):
    def make(dtype="float64", seed=0, hidden=8):
        return make_network([(4, hidden, "tanh"), (hidden, 3)], dtype=dtype, seed=seed)
    return make


# ---- learning and History -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_learns_a_toy_problem(data, small, dtype):
    X, y = data
    net = small(dtype)
    history = bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=1e-2), epochs=30, seed=0,
                        metrics=["accuracy"])
    assert isinstance(history, bprop.History)
    assert len(history) == history.epochs == 30
    assert history.loss[-1] < 0.2 * history.loss[0]
    assert history.metrics["accuracy"][-1] > 0.95
    assert bprop.evaluate(net, X, y, metrics=["accuracy"])["accuracy"] > 0.95
    assert len(history.time) == 30 and all(t > 0 for t in history.time)
    assert history.lr == [0.01] * 30
    assert history.val_loss == [] and history.best_epoch is None and not history.stopped_early
    assert set(history.history) == {"loss", "accuracy", "lr", "time"}
    assert "epochs=30" in repr(history)


def test_epoch_loss_is_the_weighted_mean_of_the_batch_losses(data, small):
    X, y = data
    net = small()
    seen = []

    def recording(output, target, sample_weight=None):
        value, grad = losses.softmax_cross_entropy(output, target, sample_weight)
        seen.append((value, len(output)))
        return value, grad

    history = bprop.fit(net, X, y, loss=recording, epochs=1, batch_size=50)
    assert [n for _, n in seen] == [50, 50, 20]
    assert history.loss[0] == pytest.approx(sum(v * n for v, n in seen) / 120, rel=1e-12)


def test_default_optimizer_is_adam_and_is_remembered(data, small):
    X, y = data
    net = small()
    bprop.fit(net, X, y, epochs=1, batch_size=40)
    opt = net._fit_optimizer
    assert isinstance(opt, optim.Adam) and opt.lr == 1e-3 and opt.step_count == 3


# ---- validation ---------------------------------------------------------------------------

def test_validation_split_takes_the_tail_after_a_seeded_shuffle(data, small):
    X, y = data
    net = small()
    history = bprop.fit(net, X, y, epochs=3, seed=7, validation_split=0.25,
                        metrics=["accuracy"])
    order = np.random.default_rng(7).permutation(120)
    held_out = order[90:]
    expected = bprop.evaluate(net, X[held_out], y[held_out], metrics=["accuracy"])
    assert history.val_loss[-1] == pytest.approx(expected["loss"], rel=1e-12)
    assert history.metrics["val_accuracy"][-1] == expected["accuracy"]
    assert len(history.val_loss) == 3


def test_validation_split_without_shuffle_is_the_plain_tail(data, small):
    X, y = data
    net = small()
    history = bprop.fit(net, X, y, epochs=2, shuffle=False, validation_split=0.1)
    assert history.val_loss[-1] == pytest.approx(bprop.evaluate(net, X[108:], y[108:])["loss"],
                                                 rel=1e-12)


def test_validation_data(data, small, rng):
    X, y = data
    Xv, yv = blobs(rng, n=30)
    wv = rng.random(30)
    net = small()
    history = bprop.fit(net, X, y, epochs=2, validation_data=(Xv, yv, wv),
                        metrics=["accuracy"])
    expected = bprop.evaluate(net, Xv, yv, metrics=["accuracy"], sample_weight=wv)
    assert history.val_loss[-1] == pytest.approx(expected["loss"], rel=1e-12)
    assert history.metrics["val_accuracy"][-1] == pytest.approx(expected["accuracy"])
    assert set(history.history) == {"loss", "val_loss", "accuracy", "val_accuracy", "lr",
                                    "time"}


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(validation_split=0.2, validation_data=([[0, 0, 0, 0]], [0])), ValueError,
     r"\[fit\] give validation_split or validation_data, not both"),
    (dict(validation_split=1.0), ValueError, r"validation_split must be < 1.0"),
    (dict(validation_data=([[0, 0, 0]], [0])), ValueError,
     r"\[fit\] validation_data\[0\] has 3 features, but the network expects 4"),
    (dict(validation_data=([[0, 0, 0, 0]], [5])), ValueError,
     r"\[fit\] validation_data\[1\] labels must lie in \[0, 3\)"),
    (dict(validation_data=[[0, 0, 0, 0]]), TypeError, r"validation_data must be \(X_val"),
])
def test_validation_arguments(data, small, kwargs, exc, match):
    X, y = data
    with pytest.raises(exc, match=match):
        bprop.fit(small(), X, y, epochs=1, **kwargs)


def test_validation_split_must_leave_samples_on_both_sides(small):
    X = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"validation_split=0.7 of 3 samples leaves 0 for "
                                         r"training and 3 for validation"):
        bprop.fit(small(), X, [0, 1, 2], validation_split=0.7)
    with pytest.raises(ValueError, match=r"leaves 3 for training and 0 for validation"):
        bprop.fit(small(), X, [0, 1, 2], validation_split=1e-17)
    history = bprop.fit(small(), X, [0, 1, 2], validation_split=0.01, epochs=1)
    assert len(history.val_loss) == 1


# ---- early stopping -------------------------------------------------------------------------

def test_early_stopping_restores_the_best_weights(data, small, rng):
    X, y = data
    # validation labels permuted: the validation loss falls at first, then rises
    Xv, yv = X[:60], (y[:60] + 1) % 3
    net = small()
    snapshots = []

    class Recorder:
        def on_epoch_end(self, epoch, logs):
            snapshots.append(params_of(net))

    history = bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=1e-2), epochs=50, seed=0,
                        validation_data=(Xv, yv), early_stopping=3, callbacks=[Recorder()])
    best = int(np.argmin(history.val_loss))
    assert history.best_epoch == best
    assert history.stopped_early and len(history) == best + 3 + 1 < 50
    assert_same_params(params_of(net), snapshots[best])
    assert bprop.evaluate(net, Xv, yv)["loss"] == pytest.approx(history.val_loss[best],
                                                                rel=1e-12)


def test_early_stopping_restores_the_best_weights_when_the_epochs_run_out(data, small):
    X, y = data
    net = small()
    snapshots = []

    class Recorder:
        def on_epoch_end(self, epoch, logs):
            snapshots.append(params_of(net))

    # lr this large makes the training loss jump about; the best epoch is not the last
    history = bprop.fit(net, X, y, optimizer=optim.SGD(net, lr=3.0), epochs=12, seed=0,
                        early_stopping=100, callbacks=[Recorder()])
    best = int(np.argmin(history.loss))
    assert history.best_epoch == best and not history.stopped_early
    assert_same_params(params_of(net), snapshots[best])


# ---- warm start ----------------------------------------------------------------------------

def test_second_fit_continues_from_weights_and_optimizer_state(data, small):
    X, y = data
    once, twice = small(), small()
    bprop.fit(once, X, y, epochs=4, shuffle=False, batch_size=32)
    bprop.fit(twice, X, y, epochs=2, shuffle=False, batch_size=32)
    opt = twice._fit_optimizer
    bprop.fit(twice, X, y, epochs=2, shuffle=False, batch_size=32)  # optimizer=None: reused
    assert twice._fit_optimizer is opt and opt.step_count == 4 * 4
    assert_same_params(params_of(once), params_of(twice))


def test_warm_start_with_a_generator_continues_the_shuffling(data, small):
    X, y = data
    once, twice = small(), small()
    opt_once, opt_twice = optim.RMSprop(once, lr=1e-3), optim.RMSprop(twice, lr=1e-3)
    bprop.fit(once, X, y, optimizer=opt_once, epochs=4, seed=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    bprop.fit(twice, X, y, optimizer=opt_twice, epochs=1, seed=rng)
    bprop.fit(twice, X, y, optimizer=opt_twice, epochs=3, seed=rng)
    assert_same_params(params_of(once), params_of(twice))


def test_optimizer_of_another_network_is_refused(data, small):
    X, y = data
    with pytest.raises(ValueError, match=r"\[fit\] the optimizer is bound to another network"):
        bprop.fit(small(), X, y, optimizer=optim.Adam(small()))
    with pytest.raises(TypeError, match=r"\[fit\] optimizer must be a bprop.optim optimizer"):
        bprop.fit(small(), X, y, optimizer="adam")


# ---- sample weights ------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["softmax_cross_entropy", losses.softmax_cross_entropy])
def test_integer_sample_weights_equal_repeated_samples(data, small, loss):
    # full batch, no shuffling: weighting a sample by k is the same as repeating it k times
    X, y = data
    X, y = X[:20], y[:20]
    w = np.arange(20) % 3  # zeros drop samples
    rows = np.repeat(np.arange(20), w)
    weighted, repeated = small(), small()
    bprop.fit(weighted, X, y, loss=loss, optimizer=optim.SGD(weighted, lr=0.5), epochs=5,
              batch_size=100, shuffle=False, sample_weight=w)
    bprop.fit(repeated, X[rows], y[rows], loss=loss, optimizer=optim.SGD(repeated, lr=0.5),
              epochs=5, batch_size=100, shuffle=False)
    for a, b in zip(params_of(weighted), params_of(repeated)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    unweighted = small()
    bprop.fit(unweighted, X, y, loss=loss, optimizer=optim.SGD(unweighted, lr=0.5), epochs=5,
              batch_size=100, shuffle=False)
    assert not np.allclose(params_of(unweighted)[0], params_of(weighted)[0])


def test_sample_weights_shift_the_decision(rng, make_network):
    # the same inputs with both labels: the heavier label wins
    X = np.tile(rng.standard_normal((10, 2)), (2, 1))
    y = np.repeat([0, 1], 10)
    w = np.where(y == 1, 5.0, 1.0)
    net = make_network([(2, 2)])
    bprop.fit(net, X, y, optimizer=optim.Adam(net, lr=0.05), epochs=40, sample_weight=w,
              seed=0)
    assert (net.predict(X).argmax(axis=1) == 1).all()


def test_all_zero_weight_batches_are_skipped(data, small):
    X, y = data
    w = np.zeros(120)
    w[:40] = 1.0
    net = small()
    history = bprop.fit(net, X, y, epochs=1, batch_size=40, shuffle=False, sample_weight=w,
                        optimizer=optim.SGD(net, lr=0.1, momentum=0.5))
    assert net._fit_optimizer.step_count == 1 and np.isfinite(history.loss[0])


@pytest.mark.parametrize("w,match", [
    (np.ones(5), r"\[fit\] sample_weight has 5 entries, but X has 120 rows"),
    (-np.ones(120), r"\[fit\] sample_weight must be >= 0"),
    (np.full(120, np.nan), r"\[fit\] sample_weight must be finite"),
    (np.zeros(120), r"\[fit\] sample_weight sums to 0"),
])
def test_sample_weight_errors_in_fit(data, small, w, match):
    X, y = data
    with pytest.raises(ValueError, match=match):
        bprop.fit(small(), X, y, sample_weight=w)


# ---- shuffling -----------------------------------------------------------------------------

def test_shuffling_is_reproducible_with_a_seed(data, small):
    X, y = data
    runs = []
    for seed in (5, 5, 6):
        net = small()
        bprop.fit(net, X, y, epochs=2, seed=seed)
        runs.append(params_of(net))
    assert_same_params(runs[0], runs[1])
    assert not np.array_equal(runs[0][0], runs[2][0])
    unshuffled = []
    for seed in (5, 6):
        net = small()
        bprop.fit(net, X, y, epochs=2, seed=seed, shuffle=False)
        unshuffled.append(params_of(net))
    assert_same_params(*unshuffled)


def test_each_epoch_sees_every_sample_once(data, small):
    X, y = data
    X = X.copy()
    X[:, 0] = np.arange(120)  # a sample id in feature 0
    seen = []

    def recording(output, target, sample_weight=None):
        seen.append(net[0].input[:, 0].copy())
        return losses.softmax_cross_entropy(output, target, sample_weight)

    net = small()
    bprop.fit(net, X, y, loss=recording, epochs=2, batch_size=25, seed=1)
    epochs = [np.concatenate(seen[:5]), np.concatenate(seen[5:])]
    for ids in epochs:
        assert sorted(ids) == list(range(120))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(120))


def test_gathering_in_chunks_does_not_change_the_batches(data, small, monkeypatch, rng):
    X, y = data
    w = rng.random(120)
    runs = []
    for chunk_bytes in (1 << 20, 1, 2000):  # one chunk; one batch per chunk; 4 batches
        monkeypatch.setattr(bprop._loop, "_CHUNK_BYTES", chunk_bytes)
        net = small()
        bprop.fit(net, X, y, epochs=2, batch_size=9, seed=4, sample_weight=w)
        runs.append(params_of(net))
    assert_same_params(runs[0], runs[1])
    assert_same_params(runs[0], runs[2])


# ---- callbacks -----------------------------------------------------------------------------

def test_callbacks_see_every_epoch_and_can_stop(data, small):
    X, y = data
    calls = []

    class Stopper:
        def on_epoch_end(self, epoch, logs):
            calls.append((epoch, dict(logs)))
            return epoch == 2

    class Silent:  # no on_epoch_end: allowed
        pass

    history = bprop.fit(small(), X, y, epochs=10, validation_split=0.2, metrics=["accuracy"],
                        callbacks=[Silent(), Stopper()])
    assert [e for e, _ in calls] == [0, 1, 2] and len(history) == 3 and history.stopped_early
    assert set(calls[0][1]) == {"loss", "val_loss", "accuracy", "val_accuracy", "lr", "time"}
    assert calls[1][1]["loss"] == history.loss[1]


def test_callback_arguments_are_checked(data, small):
    X, y = data

    class Broken:
        on_epoch_end = 3

    with pytest.raises(TypeError, match=r"callbacks\[0\].on_epoch_end must be callable"):
        bprop.fit(small(), X, y, callbacks=[Broken()])
    with pytest.raises(TypeError, match=r"callbacks must be a list"):
        bprop.fit(small(), X, y, callbacks=Broken())


# ---- argument checks -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(epochs=0), ValueError, r"\[fit\] epochs must be >= 1"),
    (dict(epochs=2.0), TypeError, r"\[fit\] epochs must be an int"),
    (dict(batch_size=0), ValueError, r"\[fit\] batch_size must be >= 1"),
    (dict(shuffle="yes"), TypeError, r"\[fit\] shuffle must be a bool"),
    (dict(seed=-1), ValueError, r"\[fit\] seed must be >= 0"),
    (dict(early_stopping=-1), ValueError, r"early_stopping must be >= 0"),
    (dict(metrics=["f1"]), ValueError, r"\[fit\] unknown metric 'f1'"),
    (dict(loss="hinge"), ValueError, r"\[fit\] unknown loss 'hinge'"),
])
def test_fit_arguments(data, small, kwargs, exc, match):
    X, y = data
    net = small()
    before = params_of(net)
    with pytest.raises(exc, match=match):
        bprop.fit(net, X, y, **kwargs)
    assert_same_params(before, params_of(net))


def test_fit_data_checks(data, small):
    X, y = data
    with pytest.raises(ValueError, match=r"\[fit\] X has 3 features, but the network expects 4"):
        bprop.fit(small(), X[:, :3], y)
    with pytest.raises(ValueError, match=r"\[fit\] y has 119 labels, but X has 120 rows"):
        bprop.fit(small(), X, y[:-1])
    with pytest.raises(ValueError, match=r"\[fit\] y labels must lie in \[0, 3\) for 3 classes,"
                                         r" but y\[4\] = 3"):
        bad = y.copy()
        bad[4] = 3
        bprop.fit(small(), X, bad)
    with pytest.raises(ValueError, match=r"\[fit\] y must be 2-D \(batch, 3\)"):
        bprop.fit(small(), X, y.astype(float), loss="mse")
    with pytest.raises(TypeError, match=r"\[fit\] net must be a bprop.Network"):
        bprop.fit(reference.Network([reference.Dense(4, 3)]), X, y)


def test_regression_with_a_one_wide_output_takes_1d_targets(rng, make_network):
    X = rng.uniform(-1, 1, (200, 2))
    y = X[:, 0] - 2 * X[:, 1]
    net = make_network([(2, 1)])
    history = bprop.fit(net, X, y, loss="mse", optimizer=optim.SGD(net, lr=0.1), epochs=30,
                        metrics=["mse"], seed=0)
    assert history.metrics["mse"][-1] == pytest.approx(history.metrics["mse"][-1])
    assert history.metrics["mse"][-1] < 1e-4
    np.testing.assert_allclose(net[0].weight.ravel(), [1, -2], atol=1e-2)


def test_binary_classification_with_bce_and_accuracy(rng, make_network):
    X = rng.standard_normal((200, 2))
    y = (X[:, 0] + X[:, 1] > 0).astype(float)
    net = make_network([(2, 1)])
    bprop.fit(net, X, y, loss="binary_cross_entropy_with_logits", epochs=30, seed=0,
              optimizer=optim.Adam(net, lr=0.05))
    result = bprop.evaluate(net, X, y, loss="bce_with_logits", metrics=["accuracy"])
    assert result["accuracy"] > 0.97


def test_fused_sgd_path_matches_the_python_path(data, small):
    # the built-in loss runs as one C++ call with SGD fused into the backward sweep;
    # the same loss as a plain callable runs forward, loss, backward and step from Python
    X, y = data
    a, b = small(), small()
    bprop.fit(a, X, y, optimizer=optim.SGD(a, lr=0.2), epochs=3, seed=0)
    bprop.fit(b, X, y, loss=losses.softmax_cross_entropy, optimizer=optim.SGD(b, lr=0.2),
              epochs=3, seed=0)
    for p, q in zip(params_of(a), params_of(b)):
        np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-13)
    assert a._fit_optimizer.step_count == b._fit_optimizer.step_count == 12


# ---- divergence ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_divergence_names_epoch_and_layer_and_restores_finite_weights(rng, make_network,
                                                                      dtype):
    X = 100 * rng.standard_normal((64, 3))
    y = rng.standard_normal((64, 1))
    net = make_network([(3, 8, "relu"), (8, 1)], dtype=dtype)
    start = params_of(net)
    # Either the weights overflowed first (they are then restored from the start of
    # the epoch), or the loss did (a non-finite loss updates nothing, so the weights
    # are those before the failing step): both messages name the epoch and a layer.
    with pytest.raises(FloatingPointError,
                       match=r"\[fit\] training diverged in epoch 1/20 \(batch \d+/8\): the "
                             r"loss is (inf|nan); .*layers?[ .]\d") as info:
        bprop.fit(net, X, y, loss="mse", optimizer=optim.SGD(net, lr=10.0), epochs=20,
                  batch_size=8)
    message = str(info.value)
    if "were restored" in message:
        assert_same_params(start, params_of(net))
    else:
        assert "left as they were before the failing step" in message
    assert all(np.isfinite(p).all() for p in params_of(net))
    assert len(info.value.history) == 0


def test_non_finite_loss_with_finite_weights_leaves_them_before_the_step(data, small):
    X, y = data
    net = small()
    calls = []

    def flaky(output, target, sample_weight=None):
        calls.append(1)
        if len(calls) == 6:
            return float("nan"), np.zeros_like(output)
        return losses.softmax_cross_entropy(output, target, sample_weight)

    snapshots = []

    class Recorder:
        def on_epoch_end(self, epoch, logs):
            snapshots.append(params_of(net))

    with pytest.raises(FloatingPointError,
                       match=r"diverged in epoch 2/3 \(batch 2/4\): the loss is nan; the "
                             r"weights are still finite") as info:
        bprop.fit(net, X, y, loss=flaky, epochs=3, batch_size=32, callbacks=[Recorder()])
    assert len(info.value.history) == 1 and net._fit_optimizer.step_count == 5
    assert all(np.isfinite(p).all() for p in params_of(net))


def test_check_finite_catches_non_finite_weights(data, small):
    X, y = data
    net = small()

    def poison(output, target, sample_weight=None):
        value, grad = losses.softmax_cross_entropy(output, target, sample_weight)
        grad[0, 0] = np.inf  # a finite loss, but the step makes a weight non-finite
        return value, grad

    # the inf reaches every layer's gradient; layer 0 is named as the first
    with pytest.raises(FloatingPointError, match=r"\(batch 1/4\): the loss is [0-9.]+; layer 0 "
                                                 r"\(layers.0.weight\) was the first"):
        bprop.fit(net, X, y, loss=poison, epochs=1, check_finite=True,
                  optimizer=optim.SGD(net, lr=0.1))
    assert all(np.isfinite(p).all() for p in params_of(net))


def test_a_non_finite_validation_loss_is_reported_as_divergence(rng, make_network):
    # Regression: the validation-loss check passed _diverged one argument too few, so
    # a non-finite validation loss raised TypeError instead of this error.
    X = rng.standard_normal((40, 3))
    y = rng.standard_normal((40, 2))
    net = make_network([(3, 4, "relu"), (4, 2)], dtype="float64")
    with pytest.raises(FloatingPointError,
                       match=r"\[fit\] training diverged in epoch 1/2 \(validation\): the "
                             r"validation loss is inf; the weights are still finite") as info:
        bprop.fit(net, X, y, loss="mse", epochs=2, validation_data=(X * 1e300, y))
    assert len(info.value.history) == 0
    assert all(np.isfinite(p).all() for p in params_of(net))


# ---- evaluate ------------------------------------------------------------------------------

def test_evaluate(data, small, rng):
    X, y = data
    net = small()
    before = params_of(net)
    w = rng.random(120)
    result = bprop.evaluate(net, X, y, metrics=["accuracy"], sample_weight=w)
    out = net.predict(X)
    assert result["loss"] == pytest.approx(reference.softmax_cross_entropy(out, y, w)[0],
                                           rel=1e-12)
    assert result["accuracy"] == pytest.approx(((out.argmax(1) == y) * w).sum() / w.sum())
    chunked = bprop.evaluate(net, X, y, metrics=["accuracy"], sample_weight=w, batch_size=7)
    assert chunked["loss"] == pytest.approx(result["loss"], rel=1e-12)
    assert bprop.evaluate(net, X, y, loss=None, metrics=["accuracy"]).keys() == {"accuracy"}
    assert_same_params(before, params_of(net))
    with pytest.raises(ValueError, match=r"\[evaluate\] nothing to compute"):
        bprop.evaluate(net, X, y, loss=None)
    with pytest.raises(ValueError, match=r"\[evaluate\] y has 3 labels, but X has 120 rows"):
        bprop.evaluate(net, X, y[:3])


def test_evaluate_metrics_on_probability_and_regression_targets(rng, make_network):
    net = make_network([(3, 2)])
    X = rng.standard_normal((10, 3))
    out = net.predict(X)
    P = rng.random((10, 2))
    P /= P.sum(1, keepdims=True)
    res = bprop.evaluate(net, X, P, metrics=["accuracy"])
    assert res["accuracy"] == pytest.approx(np.mean(out.argmax(1) == P.argmax(1)))
    Y = rng.standard_normal((10, 2))
    res = bprop.evaluate(net, X, Y, loss="mse", metrics=["mse", "mean_squared_error"])
    assert res["mse"] == pytest.approx(np.mean((out - Y) ** 2), rel=1e-12)
    assert res["loss"] == pytest.approx(res["mse"], rel=1e-12)

    def max_error(output, target, sample_weight=None):
        return float(np.abs(output - target).max())

    res = bprop.evaluate(net, X, Y, loss="mse", metrics=[max_error])
    assert res["max_error"] == pytest.approx(np.abs(out - Y).max())


# ---- gradcheck -----------------------------------------------------------------------------

@pytest.mark.parametrize("loss,target", [
    ("softmax_cross_entropy", "labels"),
    ("binary_cross_entropy_with_logits", "probabilities"),
    ("mean_squared_error", "values"),
])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu"])
def test_gradcheck_small_errors(loss, target, activation, rng, make_network):
    net = make_network([(3, 5, activation), (5, 4, activation), (4, 3)])
    X = rng.standard_normal((6, 3))
    y = {"labels": rng.integers(0, 3, 6), "probabilities": rng.random((6, 3)),
         "values": rng.standard_normal((6, 3))}[target]
    errors = bprop.gradcheck(net, X, y, loss)
    assert set(errors) == {"layers.0", "layers.1", "layers.2"}
    assert max(errors.values()) < 1e-6


def test_gradcheck_of_a_float32_network_works_on_a_float64_copy(rng, make_network, data):
    X, y = data
    net = make_network([(4, 6, "tanh"), (6, 3)], dtype="float32")
    bprop.fit(net, X, y, epochs=2)  # leave caches and gradients behind
    before = params_of(net)
    grads = [g.copy() for _, _, g in net.parameters()]
    errors = bprop.gradcheck(net, X[:5], y[:5], "softmax_cross_entropy", max_checks=10)
    assert max(errors.values()) < 1e-6
    assert_same_params(before, params_of(net))
    for (_, _, g), g0 in zip(net.parameters(), grads):
        np.testing.assert_array_equal(g, g0)


def test_gradcheck_finds_a_wrong_gradient(rng, make_network):
    def wrong(output, target, sample_weight=None):
        value, grad = losses.mean_squared_error(output, target, sample_weight)
        return value, 2 * grad  # twice the true gradient

    net = make_network([(3, 4, "tanh"), (4, 2)])
    errors = bprop.gradcheck(net, rng.standard_normal((5, 3)), rng.standard_normal((5, 2)),
                             wrong)
    assert min(errors.values()) == pytest.approx(0.5, rel=1e-4)


# ---- plot and progress -----------------------------------------------------------------------

def test_plot_writes_a_png(data, small, tmp_path):
    X, y = data
    history = bprop.fit(small(), X, y, epochs=3, validation_split=0.2, metrics=["accuracy"],
                        early_stopping=5)
    path = tmp_path / "loss.png"
    history.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history.plot(tmp_path / "log.png", log_scale=True)
    with pytest.raises(ValueError, match=r"\[History.plot\] the history is empty"):
        bprop.History().plot(tmp_path / "empty.png")


def test_plot_without_matplotlib_says_what_to_install(data, small, tmp_path, monkeypatch):
    X, y = data
    history = bprop.fit(small(), X, y, epochs=1)
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"\[History.plot\] needs matplotlib: pip install"):
        history.plot(tmp_path / "x.png")


def test_verbose_shows_a_progress_bar_and_silent_shows_nothing(data, small, capsys):
    X, y = data
    bprop.fit(small(), X, y, epochs=2, validation_split=0.2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    bprop.fit(small(), X, y, epochs=2, validation_split=0.2, early_stopping=3, verbose=True)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss=" in err and "val_loss=" in err
    assert "restored the weights of epoch" in err
